"""Parity: every compiled backend against the NumPy reference, through the layer classes.

Every cell and variant x stacks of 1-3 layers x one or two directions x options (lengths,
initial states, final-state gradients, truncation, batch-first, dropout, strided inputs) x
float32 and float64. Outputs, final states and every gradient are compared at the tolerance
of the dtype. Shapes are drawn at random per case, size 1 and odd sizes included, but every case
exercises what it names, and asserts so on the reference: truncation cuts (T > k, one sequence
longer than k) and changes the gradients; lengths pad (B >= 2, one sequence empty) and change the
outputs; initial states change the outputs; dropout is on (p > 0, at least two layers: it acts
between layers) and changes the outputs. T >= 3 everywhere and every case but "plain" starts
from a random state, so no recurrent weight's gradient is zero by construction (with T = 1 and a
zero state, d weight_hh = 0 on every backend, and the comparison tests nothing): asserted.
"""
import contextlib
import zlib

import numpy as np
import pytest

from conftest import (COMPILED_BACKENDS, TOLERANCE, assert_all_close, make_layer,
                      max_rel_error, random_state, run_layer, small_batch_max, state_parts)
from fastrnn.cells import CELLS

STACKS = [(1, False), (1, True), (2, False), (3, True)]   # (num_layers, bidirectional)
OPTIONS = ["plain", "lengths+states", "truncate", "batch_first+dropout"]

pytestmark = pytest.mark.skipif(not COMPILED_BACKENDS, reason="no compiled backend here")


def _case_rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _shapes(rng, cell, option):
    T = int(rng.choice([3, 5, 7]))
    B = int(rng.choice([2, 3, 4] if option == "lengths+states" else [1, 3, 4]))
    I = int(rng.choice([1, 3, 6]))
    # relu: one unit is often dead at every step, and its gradients all zero
    H = int(rng.choice([2, 5, 8] if cell == "rnn_relu" else [1, 2, 5, 8]))
    return T, B, I, H


def _case(cell, dtype, stack, option, rng):
    """The layer options and call arguments of one parity case, and the changes (layer options
    and call arguments) that each undo a part of its option, to check that every part
    mattered."""
    num_layers, bidirectional = stack
    T, B, I, H = _shapes(rng, cell, option)
    layer_options = dict(num_layers=num_layers, bidirectional=bidirectional, dtype=dtype)
    undo = []
    if option == "batch_first+dropout":
        layer_options.update(num_layers=max(2, num_layers), batch_first=True, dropout=0.3)
        undo = [{"dropout": 0.0}]
    probe = make_layer(cell, I, H, **layer_options)
    D = probe.num_directions
    x = rng.standard_normal((B, T, I) if probe.batch_first else (T, B, I)).astype(dtype)
    dy = rng.standard_normal(x.shape[:2] + (D * H,)).astype(dtype)
    call = dict(x=x, dy=dy)
    if option == "lengths+states":
        lengths = rng.integers(0, T + 1, size=B)
        lengths[0], lengths[-1] = T, 0       # one whole sequence, one empty: padding
        call.update(lengths=lengths, state=random_state(probe, B, rng),
                    dstate=random_state(probe, B, rng))
        undo = [{"lengths": None}, {"state": None}]
    elif option == "truncate":
        k = int(rng.integers(1, 4))
        T = max(T, k + 1)                    # at least one cut
        x = rng.standard_normal((T, B, I)).astype(dtype)
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0] = T
        call.update(x=x, dy=rng.standard_normal((T, B, D * H)).astype(dtype), lengths=lengths,
                    truncate=k, dstate=random_state(probe, B, rng),
                    state=random_state(probe, B, rng))
        undo = [{"truncate": None}]
    elif option == "batch_first+dropout":
        # a strided x: every other feature column of a wider array
        wide = np.zeros(x.shape[:2] + (2 * I,), dtype)
        wide[..., ::2] = x
        call["x"] = wide[..., ::2]
        # no loss on the outputs (many-to-one); but a relu layer's final state alone is often
        # dead in every unit, which would leave nothing to compare
        call["dy"] = dy if cell == "rnn_relu" else None
        call.update(state=random_state(probe, B, rng), dstate=random_state(probe, B, rng))
    return layer_options, call, (I, H), undo


def _assert_option_mattered(cell, option, layer_options, call, sizes, undo, result):
    """The reference without each part of the case's option gives other numbers: the case
    tested it."""
    for changes in undo:
        layer_undo = {k: v for k, v in changes.items() if k in layer_options}
        call_undo = {k: v for k, v in changes.items() if k in call}
        m = make_layer(cell, *sizes, backend="reference", seed=7,
                       **{**layer_options, **layer_undo})
        without = run_layer(m, **{**call, **call_undo})
        change = max(max_rel_error(result[key], without[key]) for key in result)
        assert change > 10 * TOLERANCE[np.dtype(layer_options["dtype"])], \
            f"{option} without {changes}: the results change by {change:.3g} only"


@pytest.mark.parametrize("option", OPTIONS)
@pytest.mark.parametrize("stack", STACKS, ids=lambda s: f"L{s[0]}{'bi' if s[1] else ''}")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_backend_matches_reference(backend_name, cell, dtype, stack, option):
    rng = _case_rng(cell, np.dtype(dtype).name, stack, option)
    layer_options, call, sizes, undo = _case(cell, dtype, stack, option, rng)
    results = {}
    for name in ("reference", backend_name):
        m = make_layer(cell, *sizes, backend=name, seed=7, **layer_options)
        results[name] = run_layer(m, **call)
    assert_all_close(results[backend_name], results["reference"], dtype,
                     f"{backend_name} vs reference")
    for key, value in results["reference"].items():
        if key.startswith("grad weight_hh"):
            assert np.any(value != 0), f"{key} is zero: the comparison tests nothing"
    _assert_option_mattered(cell, option, layer_options, call, sizes, undo,
                            results["reference"])


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_inference_equals_training_forward(backend_name, cell, dtype):
    """``m(x)`` (no cache kept) gives the outputs and states of ``m.forward(train=True)``: the
    same bits on the same forward loop, the same numbers to rounding when inference takes the
    small-batch loop (dot products summed in another order than BLAS's GEMM)."""
    rng = _case_rng("inference", cell)
    m = make_layer(cell, 3, 5, 2, bidirectional=True, backend=backend_name, dtype=dtype)
    x = rng.standard_normal((6, 4, 3)).astype(dtype)
    lengths = np.array([6, 3, 1, 0])
    state = random_state(m, 4, rng)
    results = {}
    for path in ("default", "gemm loop"):
        with small_batch_max(backend_name, 0) if path == "gemm loop" else contextlib.nullcontext():
            y_infer, state_infer = m(x, state, lengths)
            y_train, state_train, _ = m.forward(x, state, lengths, train=True)
        results[path] = [(y_infer, y_train)] + list(zip(state_parts(state_infer),
                                                        state_parts(state_train)))
    for a, b in results["gemm loop"]:
        np.testing.assert_array_equal(a, b)
    for a, b in results["default"]:
        assert_all_close({"": a}, {"": b}, dtype, "inference vs training forward")


@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_noncontiguous_inputs_give_same_results(backend_name, cell):
    """A sliced x, a Fortran-ordered state and a transposed batch-first x change nothing."""
    rng = _case_rng("strided", cell)
    T, B, I, H = 5, 3, 4, 6
    m = make_layer(cell, I, H, 2, bidirectional=True, backend=backend_name)
    x = rng.standard_normal((T, B, I))
    state = random_state(m, B, rng)
    dy = rng.standard_normal((T, B, 2 * H))
    expected = run_layer(m, x, state, dy=dy)

    x_sliced = np.repeat(x, 2, axis=0)[::2]                          # every other time step
    state_f = tuple(np.asfortranarray(s) for s in state) if isinstance(state, tuple) \
        else np.asfortranarray(state)
    dy_strided = np.concatenate([dy, dy], axis=2)[..., : 2 * H]
    assert_all_close(run_layer(m, x_sliced, state_f, dy=dy_strided), expected, np.float64,
                     "strided")

    mb = make_layer(cell, I, H, 2, bidirectional=True, backend=backend_name, batch_first=True)
    got = run_layer(mb, x.transpose(1, 0, 2), state, dy=dy.transpose(1, 0, 2))
    got["y"] = got["y"].transpose(1, 0, 2)
    got["dx"] = got["dx"].transpose(1, 0, 2)
    assert_all_close(got, expected, np.float64, "batch_first")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_random_cases_match_reference(backend_name, dtype):
    """Hypothesis draws cells, shapes, lengths, directions and truncation at random."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.settings(max_examples=20, deadline=None, database=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(cell=st.sampled_from(sorted(CELLS)), T=st.integers(1, 9),
                      B=st.integers(1, 5), I=st.integers(1, 7), H=st.integers(1, 9),
                      num_layers=st.integers(1, 2), bidirectional=st.booleans(),
                      truncate=st.none() | st.integers(1, 4), seed=st.integers(0, 2**16))
    def check(cell, T, B, I, H, num_layers, bidirectional, truncate, seed):
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((T, B, I)).astype(dtype)
        lengths = rng.integers(0, T + 1, size=B)
        dy = rng.standard_normal((T, B, (2 if bidirectional else 1) * H)).astype(dtype)
        results = {}
        for name in ("reference", backend_name):
            m = make_layer(cell, I, H, num_layers, bidirectional=bidirectional, backend=name,
                           dtype=dtype, seed=seed)
            results[name] = run_layer(m, x, random_state(m, B, np.random.default_rng(seed)),
                                      lengths, dy, truncate=truncate)
        assert_all_close(results[backend_name], results["reference"], dtype, backend_name)

    check()
