"""fastasyncore benchmarks: thin entry points around fastasyncore._bench.

    python -m benchmarks [--quick] [--only IDS] [--json FILE] [--plot FILE.png]
    python benchmarks/run.py ...          (the same)
    python -m fastasyncore bench ...      (the same, from an installed package)

The C load generator and reference servers are in
src/fastasyncore/_bench/fabench.c (package data, compiled at run time with the
system ``cc``).
"""
