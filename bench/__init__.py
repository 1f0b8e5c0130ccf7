"""The benchmarks (figures in bench/README.md). Run one from the repository root: ``python -m bench.<name>``."""
