"""pytest-benchmark suite: every case of ``bench/cases.py`` on every implementation.

    pytest bench/ --benchmark-only                          # all cases, grouped by case
    pytest bench/ --benchmark-only -k "lstm-train-256"      # one case
    pytest bench/ --benchmark-only --benchmark-autosave     # keep the run in .benchmarks/
    pytest bench/ --benchmark-only --benchmark-compare      # compare with the last saved run
    pytest bench/ --benchmark-disable                       # every case once: a smoke run

Each benchmark times one call of ``bench.runners.prepare(case, impl)``'s callable, called once
before its timing, after the warm-up that compiled every case's kernels (``conftest.py``).
Benchmarks are grouped by case, so a fastrnn backend, PyTorch and ONNX Runtime (infer and step
cases only: it has no training) appear side by side;
``extra_info`` carries the case's matmul GFLOP (see ``bench.cases.flops``) for GFLOP/s = gflop /
mean seconds. For the comparison against PyTorch and ONNX Runtime in separate processes, with
medians over alternating rounds, use ``python -m bench.report``.
"""
import pytest

from bench.cases import flops
from bench.conftest import PAIRS, QUICK, case_run


# ids "<case>-<impl>", in case order, as two stacked parametrize marks would give them
@pytest.mark.parametrize("case, impl", PAIRS, ids=[f"{case.name}-{impl}" for case, impl in PAIRS])
def test_case(benchmark, case, impl, threads):
    run = case_run(case, impl, benchmark.disabled)
    benchmark.group = case.name
    benchmark.extra_info.update(impl=impl, kind=case.kind, threads=threads,
                                gflop=flops(case) / 1e9)
    if QUICK:
        benchmark.pedantic(run, rounds=3, iterations=1)
    else:
        benchmark(run)
