"""Benchmarks: the case table (``cases``), what is timed (``runners``), the pytest-benchmark suite
(``test_bench.py``, run with ``pytest bench/ --benchmark-only``) and the report against PyTorch
and ONNX Runtime (``python -m bench.report``, one process per implementation: ``worker``).

Importing this package first makes ``import fastrnn`` take the installed package rather than the
checkout's source tree (see ``bench.installed``), for every entry point alike.
"""
import os

from bench.installed import use_installed

use_installed()
# what is timed is the compiled loops: a first call waits for its loop to compile (cold_start
# sets the mode it measures)
os.environ.setdefault("FASTRNN_NUMBA_COMPILE", "wait")
