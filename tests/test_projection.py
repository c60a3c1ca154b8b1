"""LSTM with a projection, PyTorch's ``proj_size``: h = W_hr (o * tanh(c)), P wide.

PyTorch's nn.LSTM(proj_size=P) is the outside oracle (outputs, final states, every gradient,
loaded from its state_dict); the reference, which runs the cell as written, is the oracle for
what PyTorch has not (peepholes, lengths of 0, truncation, merge modes, ONNX's options). The
compiled backends run it on the unprojected kernels (fastrnn.projection), so these tests are
what says that rewriting is right.
"""
import os
import pickle
import signal

import numpy as np
import pytest

import fastrnn
from fastrnn import projection
from conftest import (COMPILED_BACKENDS, TOLERANCE, assert_all_close, central_difference,
                      max_rel_error, run_layer)

torch = pytest.importorskip("torch")

TORCH_DTYPE = {np.float32: torch.float32, np.float64: torch.float64}


def _state(m, B, rng):
    L, D = m.num_layers, m.num_directions
    return ((0.5 * rng.standard_normal((L * D, B, m.proj_size))).astype(m.dtype),
            (0.5 * rng.standard_normal((L * D, B, m.hidden_size))).astype(m.dtype))


def _loss_grads(m, T, B, rng):
    D, L = m.num_directions, m.num_layers
    dy = rng.standard_normal((T, B, m.output_size)).astype(m.dtype)
    dstate = (rng.standard_normal((L * D, B, m.proj_size)).astype(m.dtype),
              rng.standard_normal((L * D, B, m.hidden_size)).astype(m.dtype))
    return dy, dstate


def _torch_result(module, x, state, lengths, dy, dstate):
    t = lambda a: torch.tensor(a, requires_grad=True)
    xt, h0, c0 = t(x), t(state[0]), t(state[1])
    if lengths is not None:
        packed = torch.nn.utils.rnn.pack_padded_sequence(xt, torch.tensor(lengths),
                                                         enforce_sorted=False)
        y_packed, (h_n, c_n) = module(packed, (h0, c0))
        y, _ = torch.nn.utils.rnn.pad_packed_sequence(y_packed, total_length=x.shape[0])
    else:
        y, (h_n, c_n) = module(xt, (h0, c0))
    loss = (y * torch.tensor(dy)).sum() + (h_n * torch.tensor(dstate[0])).sum() \
        + (c_n * torch.tensor(dstate[1])).sum()
    loss.backward()
    result = {"y": y.detach().numpy(), "dx": xt.grad.numpy(),
              "state_n[0]": h_n.detach().numpy(), "state_n[1]": c_n.detach().numpy(),
              "dstate0[0]": h0.grad.numpy(), "dstate0[1]": c0.grad.numpy()}
    for name, p in module.named_parameters():
        result["grad " + name] = p.grad.numpy()
    return result


@pytest.mark.filterwarnings("ignore:LSTM with projections is not supported with oneDNN")
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("shape", [(1, False, 3, None), (2, True, 4, [7, 3, 5, 1]),
                                   (3, False, 1, [2, 7, 7, 4])],
                         ids=["L1-P3", "L2bi-P4-lengths", "L3-P1-lengths"])
def test_matches_pytorch(backend, shape, dtype):
    num_layers, bidirectional, P, lengths = shape
    T, B, I, H = 7, 4, 5, 6
    rng = np.random.default_rng(num_layers)
    torch.manual_seed(num_layers)
    module = torch.nn.LSTM(I, H, num_layers, bidirectional=bidirectional,
                           proj_size=P).to(TORCH_DTYPE[dtype])
    m = fastrnn.LSTM(I, H, num_layers, bidirectional=bidirectional, proj_size=P, dtype=dtype,
                     backend=backend)
    state_dict = {k: v.detach().numpy() for k, v in module.state_dict().items()}
    assert {k: v.shape for k, v in state_dict.items()} == \
        {k: v.shape for k, v in m.params.items()}
    m.load_state_dict(state_dict)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state = _state(m, B, rng)
    dy, dstate = _loss_grads(m, T, B, rng)
    expected = _torch_result(module, x, state, lengths, dy, dstate)
    ours = run_layer(m, x, state, lengths, dy, dstate)
    assert ours.keys() == expected.keys()
    assert_all_close(ours, expected, dtype, f"{backend} vs PyTorch")
    y, final = m(x, state, lengths)                     # inference gives the same
    assert max_rel_error(y, expected["y"]) <= TOLERANCE[np.dtype(dtype)]
    assert max_rel_error(final[0], expected["state_n[0]"]) <= TOLERANCE[np.dtype(dtype)]


# what PyTorch has not: each against the reference, which runs the cell as written
CASES = {
    "peephole-lengths0": dict(peephole=True, lengths=[5, 0, 3]),
    "truncate-reverse-lengths0": dict(bidirectional=True, truncate=2, lengths=[0, 5, 2]),
    "merge-mul": dict(bidirectional=True, merge="mul", num_layers=2),
    "merge-ave-batch-first": dict(bidirectional=True, merge="ave", batch_first=True),
    "options": dict(clip=0.7, activations=("hardsigmoid", "softsign", "tanh"),
                    input_forget=True, lengths=[5, 4, 1]),
    "dropout": dict(num_layers=2, dropout=0.4),
    "bias-false-keras-init": dict(bias=False, init="keras", num_layers=2),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("compiled", COMPILED_BACKENDS)
def test_matches_reference(compiled, case, dtype):
    options = dict(CASES[case])
    lengths = options.pop("lengths", None)
    truncate = options.pop("truncate", None)
    num_layers = options.pop("num_layers", 1)
    T, B, I, H, P = 5, 3, 4, 6, 2
    rng = np.random.default_rng(len(case))
    results = {}
    for backend in ("reference", compiled):
        m = fastrnn.LSTM(I, H, num_layers, proj_size=P, dtype=dtype, backend=backend, seed=3,
                         **options)
        x = rng.standard_normal((T, B, I)).astype(dtype)
        if m.batch_first:
            x = x.transpose(1, 0, 2).copy()
        state = _state(m, B, rng)
        dy, dstate = _loss_grads(m, T, B, rng)
        if m.batch_first:
            dy = dy.transpose(1, 0, 2).copy()
        m.rng = np.random.default_rng(11)                   # the same dropout masks
        results[backend] = run_layer(m, x, state, lengths, dy, dstate, truncate=truncate)
        rng = np.random.default_rng(len(case))              # the same arrays again
        assert results[backend]["y"].shape[-1] == m.output_size
    assert_all_close(results[compiled], results["reference"], dtype, f"{compiled} {case}")


def test_reference_gradients_central_differences():
    """The reference's own gradients of a projected, peephole, bidirectional stack with
    lengths and truncation, by central differences (float64): every parameter, x, h0, c0."""
    T, B, I, H, P = 4, 2, 3, 4, 2
    rng = np.random.default_rng(5)
    m = fastrnn.LSTM(I, H, 2, proj_size=P, peephole=True, bidirectional=True, dtype=np.float64,
                     backend="reference", seed=2)
    x = rng.standard_normal((T, B, I))
    h0, c0 = _state(m, B, rng)
    lengths = [4, 2]
    dy, (dh, dc) = _loss_grads(m, T, B, rng)

    def loss():
        y, (h_n, c_n) = m(x, (h0, c0), lengths)
        return float((y * dy).sum() + (h_n * dh).sum() + (c_n * dc).sum())

    ours = run_layer(m, x, (h0, c0), lengths, dy, (dh, dc))
    checks = {"dx": x, "dstate0[0]": h0, "dstate0[1]": c0}
    checks.update({"grad " + name: p for name, p in m.params.items()})
    for key, arr in checks.items():
        numeric = central_difference(loss, arr)
        assert max_rel_error(ours[key], numeric) < 1e-6, key


@pytest.mark.float32_kernels
def test_state_and_output_shapes(backend):
    m = fastrnn.LSTM(3, 8, 2, proj_size=5, bidirectional=True, backend=backend)
    assert m.params["weight_hh_l1_reverse"].shape == (32, 5)
    assert m.params["weight_ih_l1"].shape == (32, 10)
    assert m.params["weight_hr_l0_reverse"].shape == (5, 8)
    assert m.output_size == 10
    x = np.ones((4, 2, 3), np.float32)
    y, (h, c) = m(x)
    assert (y.shape, h.shape, c.shape) == ((4, 2, 10), (4, 2, 5), (4, 2, 8))
    # one step, whose call takes the general path: the forward direction's first step
    one = fastrnn.LSTM(3, 8, 1, proj_size=5, bidirectional=True, backend=backend)
    y, _ = one(x)
    zeros = (np.zeros((2, 2, 5), np.float32), np.zeros((2, 2, 8), np.float32))
    for state in (None, zeros):
        y1, _ = one(x[:1], state)
        np.testing.assert_allclose(y1[..., :5], y[:1, :, :5], rtol=1e-5, atol=1e-6)
    assert "proj_size=5" in repr(m)
    assert pickle.loads(pickle.dumps(m)).proj_size == 5


@pytest.mark.parametrize("options", [{}, {"layer_norm": True}, {"zoneout": (0.2, 0.3)}],
                         ids=["plain", "layer_norm", "zoneout"])
def test_keeps_callers_arrays_and_nan(backend, options):
    """Training and inference leave the caller's x and state as they were, in each of
    fastrnn.projection's forms ("input"; "state" with layer norm; zoneout on h, whose training
    runs on the reference); NaN in x reaches only its row's later steps."""
    m = fastrnn.LSTM(3, 6, proj_size=2, backend=backend, dtype=np.float64, **options)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 3, 3))
    state = _state(m, 3, rng)
    copies = [a.copy() for a in (x, *state)]
    y, final, cache = m.forward(x, state, [5, 2, 0])
    m.backward(np.ones_like(y), cache, tuple(np.ones_like(s) for s in final))
    y_inferred, _ = m(x, state, [5, 2, 0])
    for a, b in zip((x, *state), copies):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(final[0][0, 2], state[0][0, 2])    # length 0: h0 kept
    x[2, 1, 0] = np.nan                           # row 1's step 2 is padding: no effect
    x[1, 0, 0] = np.nan                           # row 0 from step 1 on: NaN
    y2, final2 = m(x, state, [5, 2, 0])
    assert np.isnan(y2[1:, 0]).all() and not np.isnan(y2[:1, 0]).any()
    np.testing.assert_allclose(y2[:, 1:], y_inferred[:, 1:], rtol=1e-12, atol=1e-14)
    assert np.isnan(final2[0][0, 0]).all() and not np.isnan(final2[0][0, 1:]).any()


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_initial_m_solves_w_hr_m0_equals_h0(dtype):
    """The "state" form's m0: w_hr m0 = h0 to rounding, the least-norm solution (in w_hr's
    row space); zeros for a zero h0; None for an h0 no m0 gives (w_hr of rank 1) or not
    finite."""
    rng = np.random.default_rng(1)
    w_hr = rng.uniform(-0.4, 0.4, (3, 6)).astype(dtype)
    h0 = (0.5 * rng.standard_normal((4, 3))).astype(dtype)
    m0 = projection.initial_m(h0, w_hr)
    assert m0.dtype == dtype and m0.shape == (4, 6)
    assert max_rel_error(m0.astype(np.float64) @ w_hr.T.astype(np.float64), h0) \
        < TOLERANCE[np.dtype(dtype)]
    _, _, vt = np.linalg.svd(w_hr.astype(np.float64))
    assert np.abs(m0 @ vt[3:].T).max() < 1e3 * np.finfo(dtype).eps    # no null-space part
    np.testing.assert_array_equal(projection.initial_m(np.zeros_like(h0), w_hr), 0)
    low_rank = np.outer([1.0, 2.0, -1.0], rng.standard_normal(6)).astype(dtype)
    assert projection.initial_m(h0, low_rank) is None
    inside = np.outer(rng.standard_normal(4), [1.0, 2.0, -1.0]).astype(dtype)
    assert projection.initial_m(inside, low_rank) is not None
    h0[1, 2] = np.nan
    assert projection.initial_m(h0, w_hr) is None


@pytest.mark.parametrize("compiled", COMPILED_BACKENDS)
def test_state_form_runs_the_reference_without_an_m0(compiled, monkeypatch):
    """A projected layer-normalized LSTM whose h0 no m0 gives (w_hr of rank 1) runs the call
    on the reference, the same numbers; with h0 in w_hr's range it runs the kernels; NaN in
    h0 gives NaN in the rows it reaches, not an error."""
    results = {}
    calls = []
    original = projection.reference.layer_forward
    monkeypatch.setattr(projection.reference, "layer_forward",
                        lambda *a, **k: calls.append(1) or original(*a, **k))
    for name in ("reference", compiled):
        m = fastrnn.LSTM(3, 6, proj_size=3, layer_norm=True, backend=name, dtype=np.float64,
                         seed=2)
        rng = np.random.default_rng(0)
        m.params["weight_hr_l0"][...] = np.outer([1.0, 2.0, -1.0], rng.standard_normal(6))
        x = rng.standard_normal((5, 3, 3))
        state = _state(m, 3, rng)
        dy, dstate = _loss_grads(m, 5, 3, rng)
        calls.clear()
        results[name] = run_layer(m, x, state, [5, 2, 0], dy, dstate)
    assert calls == [1]
    assert_all_close(results[compiled], results["reference"], np.float64, "low rank")
    calls.clear()
    inside = (state[0][:, :, :1] * np.array([1.0, 2.0, -1.0]), state[1])
    m(x, inside)
    assert calls == []
    nan_state = (state[0].copy(), state[1])
    nan_state[0][0, 1, 0] = np.nan
    y, (h_n, _) = m(x, nan_state)
    assert np.isnan(y[:, 1]).all() and not np.isnan(y[:, [0, 2]]).any()


@pytest.mark.float32_kernels
@pytest.mark.parametrize("compiled", COMPILED_BACKENDS)
def test_state_form_with_no_steps(compiled):
    """The "state" form's kernel contract with T = 0: the final state is the initial one and
    its gradient goes to dh0, dc0 (nothing ran, so there are no hidden-side gradients)."""
    kernels = fastrnn.get_backend(compiled)
    cell = fastrnn.LSTM(3, 6, proj_size=2, layer_norm=True, backend="reference").cell
    rng = np.random.default_rng(0)
    shapes = cell.param_shapes(3, 6, 2)
    params = tuple(rng.standard_normal(shapes[n]).astype(np.float32) for n in cell.param_names)
    x = np.zeros((0, 3, 3), np.float32)
    state0 = (rng.standard_normal((3, 2)).astype(np.float32), np.zeros((3, 6), np.float32))
    y = np.zeros((0, 3, 2), np.float32)
    state_n = tuple(np.zeros_like(s) for s in state0)
    cache = kernels.layer_forward(cell, x, state0, params, np.zeros(3, np.int64), False, True,
                                  y, state_n)
    np.testing.assert_array_equal(state_n[0], state0[0])
    dstate_n = tuple(rng.standard_normal(s.shape).astype(np.float32) for s in state0)
    dstate0 = tuple(np.zeros_like(s) for s in state0)
    dparams = tuple(np.zeros_like(p) for p in params)
    kernels.layer_backward(cell, cache, y, dstate_n, 2, np.zeros_like(x), dstate0, dparams)
    for d0, d_n in zip(dstate0, dstate_n):
        np.testing.assert_array_equal(d0, d_n)
    assert not any(d.any() for d in dparams)


def test_state_form_while_the_kernels_run_their_reference():
    """A backend whose layer_forward runs its reference (Numba while a loop compiles) gives a
    reference cache, whose backward has no hidden-side gradients: the "state" form then runs
    the projected call on the reference itself, and backward takes it from there."""
    cell = fastrnn.LSTM(3, 6, proj_size=3, layer_norm=True, backend="reference").cell
    rng = np.random.default_rng(4)
    shapes = cell.param_shapes(3, 6, 3)
    params = tuple(0.3 * rng.standard_normal(shapes[n]) for n in cell.param_names)
    x = rng.standard_normal((4, 2, 3))
    state0 = (0.5 * rng.standard_normal((2, 3)), 0.5 * rng.standard_normal((2, 6)))
    lengths = np.array([4, 2])
    dy = rng.standard_normal((4, 2, 3))
    results = []
    for run in (projection.forward, fastrnn.reference.layer_forward):
        y, state_n = np.zeros((4, 2, 3)), (np.zeros((2, 3)), np.zeros((2, 6)))
        args = (cell, x, state0, params, lengths, False, True, y, state_n)
        if run is projection.forward:
            cache = run(fastrnn.reference.layer_forward, *args)
            assert isinstance(cache, fastrnn.reference.Cache)
        else:
            cache = run(*args)
        dx, dstate0 = np.zeros_like(x), tuple(np.zeros_like(s) for s in state0)
        dparams = tuple(np.zeros_like(p) for p in params)
        projection.backward(None, cell, cache, dy, (None, None), 2, dx, dstate0, dparams)
        results.append((y, *state_n, dx, *dstate0, *dparams))
    for ours, theirs in zip(*results):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("value", [6, 7, -1, 2.0, True, "2"])
def test_refuses_bad_proj_size(value):
    with pytest.raises(ValueError, match=r"proj_size: expected an int in \[0, hidden_size\) = "
                                         r"\[0, 6\)"):
        fastrnn.LSTM(3, 6, proj_size=value)


def test_refusals():
    with pytest.raises(ValueError, match="recurrent_dropout: not available with proj_size"):
        fastrnn.LSTM(3, 6, proj_size=2, recurrent_dropout=0.2)
    for cls in (fastrnn.GRU, fastrnn.RNN):
        with pytest.raises(ValueError, match="proj_size: only an LSTM has a projection"):
            cls(3, 6, proj_size=2)
        assert cls(3, 6, proj_size=0).proj_size == 0
    m = fastrnn.LSTM(3, 6, 1, proj_size=2)
    x = np.zeros((2, 1, 3), np.float32)
    with pytest.raises(ValueError, match=r"state h0: expected shape \(1, 1, 2\), got "
                                         r"\(1, 1, 6\)"):
        m(x, (np.zeros((1, 1, 6), np.float32), np.zeros((1, 1, 6), np.float32)))
    with pytest.raises(TypeError, match=r"shapes \(1, 1, 2\) and \(1, 1, 6\)"):
        m(x, np.zeros((1, 1, 2), np.float32))
    with pytest.raises(ValueError, match=r"params\['weight_hr_l0'\]: expected shape \(2, 6\)"):
        m.params["weight_hr_l0"] = np.zeros((6, 2), np.float32)
        m(x)
    with pytest.raises(ValueError, match="a projected LSTM"):
        fastrnn.functional.forward(m.cell, x, np.zeros((1, 2)), np.zeros((1, 6)),
                                   np.zeros((24, 3)), np.zeros((24, 2)))
    _, _, cache = fastrnn.LSTM(3, 6, 1, proj_size=3).forward(x)
    with pytest.raises(ValueError, match="proj_size=3"):
        fastrnn.LSTM(3, 6, 1, proj_size=2).backward(None, cache)


def test_onnx_export_refuses():
    onnx_io = pytest.importorskip("fastrnn.onnx")
    with pytest.raises(ValueError, match="proj_size=2 has no ONNX form"):
        onnx_io.export(fastrnn.LSTM(3, 6, proj_size=2))


@pytest.mark.float32_kernels
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.parametrize("compiled", COMPILED_BACKENDS)
def test_a_fork_while_another_thread_holds_the_blas_lock(compiled):
    """A child forked while another thread is inside the projection's products (holding its
    lock) runs a projected layer rather than waiting for ever on a lock nobody will free."""
    from fastrnn import projection
    m = fastrnn.LSTM(3, 6, proj_size=2, backend=compiled)
    x = np.ones((4, 2, 3), np.float32)
    expected, _ = m(x)
    with projection._blas_lock:
        pid = os.fork()
        if pid == 0:                                    # the child: exit 0 on success
            signal.alarm(30)                            # a hang ends the child, not the suite
            try:
                y, _ = m(x)
                os._exit(0 if np.allclose(y, expected, rtol=1e-5, atol=1e-6) else 1)
            finally:
                os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
