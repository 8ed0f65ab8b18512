"""The benchmark harness of ``python -m fastasyncore bench`` (see runner.py)."""
