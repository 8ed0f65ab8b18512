"""Run the fastasyncore benchmark harness: ``python benchmarks/run.py --help``."""
import os
import sys

if __name__ == "__main__":
    # Prefer the source tree next to this file when it is not installed.
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src")
    try:
        import fastasyncore  # noqa: F401
    except ImportError:
        sys.path.insert(0, os.path.normpath(src))
    from fastasyncore._bench.runner import main
    sys.exit(main())
