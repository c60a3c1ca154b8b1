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
from bench.conftest import IMPLS, PAIRS, QUICK, case_run


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


def test_regularizers_script_runs(monkeypatch):
    """``python -m bench.regularizers`` on small shapes, one round: every compiled backend
    under test with each variant, and the PyTorch loops when torch is."""
    from bench import regularizers
    monkeypatch.setattr(regularizers, "SHAPES", (("lstm-train-8", "LSTM", 2, 3, 8, 5),
                                                 ("gru-train-8", "GRU", 2, 3, 8, 5)))
    backends = [impl for impl in IMPLS if impl in ("numba", "cython")]
    rows = regularizers.measure(backends, rounds=1, repeat=1, with_torch="torch" in IMPLS)
    for backend in backends:
        for variant in ("layer_norm", "zoneout"):
            row = next(r for r in rows if r["impl"] == backend and r["variant"] == variant
                       and r["case"] == "gru-train-8")
            assert row["x plain"] > 0 and row["ms"] > 0
            assert ("speedup over torch" in row) == ("torch" in IMPLS)
    assert "| gru-train-8 |" in regularizers.markdown(rows, 1, 1)


def test_cold_start_script_runs():
    """``python -m bench.cold_start`` once, cold then warm, on a backend that compiles nothing
    at run time (a Numba cold start takes minutes: that is what the script measures)."""
    from bench import cold_start
    backend = "cython" if "cython" in IMPLS else "reference"
    rows = cold_start.measure([backend], ["infer"], runs=1)
    assert [(r["backend"], r["kind"], r["cache"]) for r in rows] == [
        (backend, "infer", "cold"), (backend, "infer", "warm")]
    for r in rows:
        assert all(r[part] > 0 for part in cold_start.PARTS)
    assert f"| {backend} | infer | warm |" in cold_start.markdown(rows, 1)
