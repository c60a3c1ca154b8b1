"""pytest-benchmark settings for ``pytest bench/ --benchmark-only``.

Environment:
    FASTRNN_BENCH_BACKENDS  comma-separated implementations to time: fastrnn backends and/or
                            "torch" (default: every compiled backend available here, or the
                            reference if none is). PyTorch only when named: in the same process
                            its OpenMP threads disturb the others' timings; the fair comparison
                            is ``python -m bench.report``.
    FASTRNN_BENCH_THREADS   threads for fastrnn and torch (default 2)

This directory is not in pyproject's testpaths, so a plain ``pytest`` never collects it.
"""
import importlib.util
import os

import pytest

import fastrnn
from bench.runners import TORCH, set_threads

if importlib.util.find_spec("pytest_benchmark") is None:
    raise pytest.UsageError("bench/ needs pytest-benchmark: pip install pytest-benchmark "
                            "(or pip install .[bench])")

THREADS = int(os.environ.get("FASTRNN_BENCH_THREADS", "2"))


def implementations():
    available = fastrnn.backends()
    have_torch = importlib.util.find_spec("torch") is not None
    wanted = os.environ.get("FASTRNN_BENCH_BACKENDS", "").strip()
    if not wanted:
        return [b for b in available if b != "reference"] or ["reference"]
    names = [n.strip() for n in wanted.split(",") if n.strip()]
    missing = [n for n in names if n not in available and not (n == TORCH and have_torch)]
    if missing:  # asked for something that isn't here: fail loudly, don't skip
        raise RuntimeError(f"FASTRNN_BENCH_BACKENDS asks for {missing}, not available here "
                           f"(fastrnn backends: {available}; torch installed: {have_torch})")
    return names


IMPLS = implementations()


@pytest.fixture(scope="session", autouse=True)
def threads():
    for impl in IMPLS:
        set_threads(impl, THREADS)
    return THREADS
