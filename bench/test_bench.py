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
    rows = regularizers.measure(backends, rounds=1, repeat=1, with_torch="torch" in IMPLS,
                                variants=("layer_norm", "zoneout", "layer_norm_proj",
                                          "zoneout_proj"))
    for backend in backends:
        for case, variant in (("gru-train-8", "layer_norm"), ("gru-train-8", "zoneout"),
                              ("lstm-train-8", "layer_norm_proj"),
                              ("lstm-train-8", "zoneout_proj")):
            row = next(r for r in rows if r["impl"] == backend and r["variant"] == variant
                       and r["case"] == case)
            assert row["x plain"] > 0 and row["ms"] > 0
            assert ("speedup over torch" in row) == ("torch" in IMPLS)
    # a projection is an LSTM's only
    assert not any(r["case"] == "gru-train-8" and "proj" in r["variant"] for r in rows)
    assert "| gru-train-8 |" in regularizers.markdown(rows, 1, 1)


def test_cold_start_script_runs():
    """``python -m bench.cold_start`` once, cold then warm, on a backend that compiles nothing
    at run time (a Numba cold start takes minutes: that is what the script measures)."""
    from bench import cold_start
    backend = "cython" if "cython" in IMPLS else "reference"
    rows = cold_start.measure([backend], ["infer"], ["background", "wait"], runs=1)
    assert [(r["backend"], r["kind"], r["mode"], r["cache"]) for r in rows] == [
        (backend, "infer", "-", "cold"), (backend, "infer", "-", "warm")]
    for r in rows:     # no compile modes but Numba's: nothing compiles in the background
        assert all(r[part] > 0 for part in cold_start.PARTS[:4])
        assert r["compiled"] is None and r["then"] is None
    assert f"| {backend} | infer | - | warm |" in cold_start.markdown(rows, 1)


def test_bandwidth_script_runs():
    """``python -m bench.bandwidth`` once on one case: the bytes it counts are the weights'
    (w_ih once, w_hh once a step), and every figure is a positive number."""
    from bench import bandwidth
    from bench.cases import select
    case = select(["lstm-infer-512-b1"])[0]
    layers, total = bandwidth.weight_bytes(case)
    assert layers == [(4 * 512 * 512 * 4, 4 * 512 * 512 * 4)]
    assert total == case.steps * layers[0][0] + layers[0][1]
    impl = "cython" if "cython" in IMPLS else "reference"
    rows = bandwidth.measure([case.name], [impl], threads=1, rounds=1, min_time=0.01)
    assert [r["impl"] for r in rows] == ["read", impl]
    assert all(r["ms"] > 0 and r["GB/s"] > 0 for r in rows) and rows[1]["of read"] > 0
    assert "| lstm-infer-512-b1 | 104 | read |" in bandwidth.markdown(rows, 1, 1)


def test_quantized_script_runs(monkeypatch):
    """``python -m bench.quantized`` on small shapes, one round: the float32 layer of every
    compiled backend under test, fastrnn's bf16 and int8 copies, and PyTorch's and ONNX
    Runtime's float32 and int8 whenever they are installed (PyTorch runs in a process of its
    own and the ONNX Runtime sessions are dropped after, so the benchmarks are not disturbed;
    the checks on their quantized models, such as quantize_dynamic really swapping the
    module, are exercised)."""
    import dataclasses
    import importlib.util

    import numpy as np

    from bench import quantized
    from bench.cases import BY_NAME
    from bench.runners import have_ort

    small = {"layers": 1, "batch": 2, "input_size": 3, "hidden": 8, "steps": 5}
    monkeypatch.setattr(quantized, "SHAPES", tuple(
        dataclasses.replace(BY_NAME[name], name=name + "-8", **small)
        for name in ("lstm-infer-512-b1", "gru-infer-1024-b2", "bilstm-infer")))
    backends = [impl for impl in IMPLS if impl in ("numba", "cython")] or ["reference"]
    with_torch = importlib.util.find_spec("torch") is not None
    with_ort = have_ort()
    rows = quantized.measure(backends, rounds=1, repeat=1, with_torch=with_torch,
                             with_ort=with_ort, settle=0)
    text = quantized.markdown(rows, 1, 1)
    for name in ("lstm-infer-512-b1-8", "gru-infer-1024-b2-8", "bilstm-infer-8"):
        assert f"| {name} |" in text
        got = {r["impl"]: r for r in rows if r["case"] == name}
        for backend in backends:
            assert got[f"fastrnn f32 ({backend})"]["ms"] > 0
        # the quantized copies run on the C kernels, or on NumPy's without the extension
        got = {label.split(" (")[0]: row for label, row in got.items()}
        # (label, bound on max abs err / max abs ref); about 0.3% (fastrnn), 1% (PyTorch
        # int8, per-tensor scales), 0.6% (ONNX Runtime int8) and 3e-7 (float32) here
        expected = [("fastrnn bf16", 0.02), ("fastrnn int8", 0.05)]
        if with_torch:
            expected += [("PyTorch f32", 1e-4), ("PyTorch int8", 0.05)]
            if got["PyTorch bf16"]["ms"] is not None:
                expected.append(("PyTorch bf16", 0.02))
        if with_ort:
            expected.append(("ORT f32", 1e-4))
            if "gru" in name:       # ONNX Runtime has no quantized GRU: said, not timed
                assert got["ORT int8"]["ms"] is None and "GRU" in got["ORT int8"]["note"]
            else:
                expected.append(("ORT int8", 0.05))
        for label, bound in expected:
            row = got[label]
            assert row["ms"] > 0 and 0 <= row["others"][0] <= row["others"][1] <= 1
            _, top, mean = row["error"]
            assert np.isfinite(top) and np.isfinite(mean), (name, label, row["error"])
            assert 0 <= top < bound and 0 <= mean < bound, (name, label, row["error"])
        for label in ("fastrnn bf16", "fastrnn int8"):
            speedup = got[label]["speedup"]
            assert speedup[f"fastrnn f32 ({backends[0]})"] > 0
            assert ("PyTorch int8" in speedup) == with_torch
            assert ("ORT int8" in speedup) == (with_ort and "gru" not in name)
