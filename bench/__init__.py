"""Benchmarks: the case table (``cases``), what is timed (``runners``), the pytest-benchmark suite
(``test_bench.py``, run with ``pytest bench/ --benchmark-only``) and the report against PyTorch
(``python -m bench.report``, one process per implementation: ``worker``)."""
