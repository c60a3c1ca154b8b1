"""pytest-benchmark settings for ``pytest bench/ --benchmark-only``.

Environment:
    FASTRNN_BENCH_BACKENDS  comma-separated implementations to time: fastrnn backends, "torch"
                            and/or "onnxruntime" (default: every compiled backend available
                            here, or the reference if none is). PyTorch and ONNX Runtime only
                            when named: in the same process their threads disturb the others'
                            timings; the fair comparison is ``python -m bench.report``. A name
                            that cannot be timed here is an error, never skipped. ONNX Runtime
                            has no training: its train cases are not collected (said once).
    FASTRNN_BENCH_CASES     comma-separated case names of ``bench/cases.py`` (default: all)
    FASTRNN_BENCH_QUICK     1: a smoke run, 3 calls a benchmark instead of pytest-benchmark's
                            calibrated rounds (``bench.report`` takes it as ``--quick``)
    FASTRNN_BENCH_THREADS   threads for fastrnn and torch (default 2)

The package ``bench`` imports the installed fastrnn, not this checkout's source tree
(``bench/installed.py``). Before the first test the run prints which fastrnn it times, the
implementations it times and every one it does not with the reason, then builds and calls every
selected case once (the warm-up: Numba compiles or loads its cache here) and says how long that
took, so the benchmarks time warm code. ``--benchmark-disable`` skips the warm-up: every case
is then built and called once, untimed (CI's smoke run).

This directory is not in pyproject's testpaths, so a plain ``pytest`` never collects it.
"""
import importlib.util
import os

import pytest

from bench import installed
from bench.cases import select
from bench.runners import ORT, ORT_NO_TRAIN, choose, prepare, runs, set_threads, warm_up

if importlib.util.find_spec("pytest_benchmark") is None:
    raise pytest.UsageError("bench/ needs pytest-benchmark: pip install pytest-benchmark "
                            "(or pip install .[bench])")

THREADS = int(os.environ.get("FASTRNN_BENCH_THREADS", "2"))
QUICK = os.environ.get("FASTRNN_BENCH_QUICK", "").strip() not in ("", "0")
CASES = select(os.environ.get("FASTRNN_BENCH_CASES"))
IMPLS, NOT_TIMED = choose(
    [n.strip() for n in os.environ.get("FASTRNN_BENCH_BACKENDS", "").split(",") if n.strip()],
    "FASTRNN_BENCH_BACKENDS", torch_by_default=False)
# the benchmarks: every selected case on every implementation that has something to time for it
PAIRS = [(case, impl) for case in CASES for impl in IMPLS if runs(case, impl)]

# (case name, impl) -> the exception its warm-up raised
_warm_up_failures = {}


def pytest_collection_finish(session):
    """Before any test: say what is timed and what is not, and warm every selected case up."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")

    def say(line):
        if reporter is not None:
            reporter.write_line("bench: " + line)
            reporter.flush()        # the warm-up can take minutes: show each line as it comes
        else:
            print("bench: " + line, flush=True)

    for line in installed.summary():
        say(line)
    untimed = session.config.getoption("benchmark_disable", False)
    say(f"{'running' if untimed else 'timing'} {', '.join(IMPLS)} on {THREADS} threads, "
        f"{len(CASES)} cases" + (" once each, untimed (--benchmark-disable)" if untimed else
                                 " (FASTRNN_BENCH_QUICK: 3 calls a benchmark)" if QUICK else ""))
    for name, why in NOT_TIMED:
        say(f"not timed: {name}: {why}")
    if ORT in IMPLS and any(not runs(case, ORT) for case in CASES):
        say(f"not timed: {ORT} on the train cases: {ORT_NO_TRAIN}")
    if session.config.option.collectonly:
        return
    if untimed:
        say("no warm-up: with --benchmark-disable every case runs once, untimed")
        return
    pairs = [(item.callspec.params["case"], item.callspec.params["impl"])
             for item in session.items if hasattr(item, "callspec")]
    if pairs:
        for impl in IMPLS:
            set_threads(impl, THREADS)
        _warm_up_failures.update(warm_up(pairs, say))


def case_run(case, impl, disabled):
    """The callable of one timed call of ``case`` on ``impl``, called once already (warm: its
    kernels were compiled in the warm-up) unless the benchmark is ``disabled`` (it then runs just
    once, in the benchmark). Raises what the warm-up raised for this case."""
    if (case.name, impl) in _warm_up_failures:
        raise _warm_up_failures[case.name, impl]
    run, _ = prepare(case, impl, warm=0 if disabled else 1)
    return run


@pytest.fixture(scope="session", autouse=True)
def threads():
    for impl in IMPLS:
        set_threads(impl, THREADS)
    return THREADS
