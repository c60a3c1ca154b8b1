"""Layer-normalized LSTM and GRU (``layer_norm=True``, fastrnn.cells.LAYER_NORM_CODES).

The outside oracle is PyTorch written the way its users must write a layer-normalized LSTM or
GRU: a loop over time of torch products and ``F.layer_norm``, differentiated by autograd
(outputs, final states, every gradient). The reference runs the cells; central differences
check its gradients where PyTorch's loop is not written (lengths, truncation, recurrent
dropout masks, a projection). Each compiled backend is checked against the reference on each
path of its loop.
"""
import numpy as np
import pytest

import fastrnn
from fastrnn import cells, reference
from conftest import (COMPILED_BACKENDS, assert_all_close, central_difference,
                      check_caller_arrays_untouched, layer_arrays, max_rel_error,
                      run_layer, stable_seed, state_arg, torch_loop_results)

CASES = {   # name: (layer class, options)
    "lstm": (fastrnn.LSTM, {}),
    "gru": (fastrnn.GRU, {"reset_after": True}),
    "gru_reset_before": (fastrnn.GRU, {"reset_after": False}),
}


def _layer(case, I, H, L=1, **options):
    cls, cell_options = CASES[case]
    return cls(I, H, L, layer_norm=True, backend="reference", **cell_options, **options)


def _torch_stack(torch, m, x, state, dy, dstate):
    """The layer written as a loop over time in PyTorch (autograd), full-length sequences."""
    F = torch.nn.functional
    leaf = lambda a: torch.tensor(a, requires_grad=True)
    P = {name: leaf(p) for name, p in m.params.items()}
    xt = leaf(x)
    s0 = [leaf(s) for s in state]
    T, H, eps = x.shape[0], m.hidden_size, m.cell.layer_norm_eps
    ln = lambda v, w, b: F.layer_norm(v, (v.shape[-1],), w, b, eps)
    lstm, reset_after = m.mode == "LSTM", getattr(m, "reset_after", True)
    inp, finals = xt, [[], []]
    for layer in range(m.num_layers):
        outs = []
        for d in range(m.num_directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            p = lambda k: P[k + suffix]
            bias = lambda k: P[k + suffix] if k + suffix in P else 0
            row = layer * m.num_directions + d
            h = s0[0][row]
            c = s0[1][row] if lstm else None
            ys = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                nx = ln(inp[t] @ p("weight_ih").T, p("ln_ih_weight"), p("ln_ih_bias")) \
                    + bias("bias_ih")
                w_hh, b_hh, lw, lb = p("weight_hh"), bias("bias_hh"), p("ln_hh_weight"), \
                    p("ln_hh_bias")
                if lstm:
                    a = nx + ln(h @ w_hh.T, lw, lb) + b_hh
                    i, f, g, o = a.chunk(4, dim=1)
                    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                    h = torch.sigmoid(o) * torch.tanh(ln(c, p("ln_cell_weight"),
                                                         p("ln_cell_bias")))
                    if "weight_hr" + suffix in P:
                        h = h @ p("weight_hr").T
                    ys[t] = h
                    continue
                x_r, x_z, x_n = nx.chunk(3, dim=1)
                b_hh = b_hh if isinstance(b_hh, int) else b_hh.reshape(3, H)
                b = (lambda k: 0) if isinstance(b_hh, int) else (lambda k: b_hh[k])
                if reset_after:
                    h_r, h_z, h_n = (ln(h @ w_hh.T, lw, lb) + (0 if isinstance(b_hh, int)
                                                               else b_hh.reshape(-1))) \
                        .chunk(3, dim=1)
                    r, z = torch.sigmoid(x_r + h_r), torch.sigmoid(x_z + h_z)
                    n = torch.tanh(x_n + r * h_n)
                else:
                    h_rz = ln(h @ w_hh[:2 * H].T, lw[:2 * H], lb[:2 * H])
                    r = torch.sigmoid(x_r + h_rz[:, :H] + b(0))
                    z = torch.sigmoid(x_z + h_rz[:, H:] + b(1))
                    n = torch.tanh(x_n + ln((r * h) @ w_hh[2 * H:].T, lw[2 * H:], lb[2 * H:])
                                   + b(2))
                h = (1 - z) * n + z * h
                ys[t] = h
            outs.append(torch.stack(ys))
            finals[0].append(h)
            finals[1].append(c)
        inp = torch.cat(outs, dim=2)
    return torch_loop_results(torch, inp, finals, (xt, s0, P), dy, dstate)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stack", [(1, False, True), (2, True, True), (2, False, False)],
                         ids=["L1", "L2bi", "L2-nobias"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_pytorch_loop(case, stack, dtype):
    """Outputs, final states and every gradient against PyTorch's loop with F.layer_norm."""
    torch = pytest.importorskip("torch")
    L, bidirectional, bias = stack
    rng = np.random.default_rng(stable_seed(case, stack))
    m = _layer(case, 5, 6, L, bidirectional=bidirectional, bias=bias, dtype=dtype, seed=3)
    for name, p in m.params.items():          # gains and shifts away from 1 and 0
        if name.startswith("ln_"):
            p += (0.3 * rng.standard_normal(p.shape)).astype(dtype)
    x, state, dy, dstate = layer_arrays(m, 7, 3, rng)
    ours = run_layer(m, x, state_arg(state), None, dy, state_arg(dstate))
    theirs = _torch_stack(torch, m, x, state, dy, dstate)
    assert sorted(ours) == sorted(theirs)
    assert_all_close(ours, theirs, dtype, case)


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
def test_projected_reference_matches_pytorch_loop(dtype):
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    m = _layer("lstm", 4, 6, 2, proj_size=3, bidirectional=True, dtype=dtype, seed=4)
    x, state, dy, dstate = layer_arrays(m, 5, 2, rng)
    assert_all_close(run_layer(m, x, state_arg(state), None, dy, state_arg(dstate)),
                     _torch_stack(torch, m, x, state, dy, dstate), dtype, "proj_size=3")


def test_layer_norm_changes_the_numbers():
    """The same weights with and without normalization differ (the option is not ignored),
    and with the normalization's gains at 0 the products no longer reach the gates."""
    rng = np.random.default_rng(2)
    m = _layer("lstm", 3, 5, dtype=np.float64, seed=1)
    plain = fastrnn.LSTM(3, 5, dtype=np.float64, backend="reference", seed=1)
    for name in plain.params:
        plain.params[name][...] = m.params[name]
    x = rng.standard_normal((4, 2, 3))
    assert max_rel_error(m(x)[0], plain(x)[0]) > 1e-2
    for name in ("ln_ih_weight_l0", "ln_hh_weight_l0"):
        m.params[name][...] = 0
    x2 = rng.standard_normal((4, 2, 3))
    np.testing.assert_array_equal(m(x)[0], m(x2)[0])      # the input no longer matters


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_gradients_central_differences(case):
    """Every parameter (the normalization's gains and shifts included), x and the initial
    state, by central differences in float64: two layers, bidirectional, lengths with a 0,
    and (LSTM) a projection."""
    T, B = 4, 3
    rng = np.random.default_rng(7)
    options = {"proj_size": 2} if case == "lstm" else {}
    m = _layer(case, 3, 4, 2, bidirectional=True, dtype=np.float64, seed=5, **options)
    for name, p in m.params.items():
        if name.startswith("ln_"):
            p += 0.3 * rng.standard_normal(p.shape)
    x, state, dy, dstate = layer_arrays(m, T, B, rng)
    lengths = [4, 0, 2]

    def loss():
        y, final = m(x, state_arg(state), lengths)
        final = final if isinstance(final, tuple) else (final,)
        return float((y * dy).sum() + sum((f * d).sum() for f, d in zip(final, dstate)))

    ours = run_layer(m, x, state_arg(state), lengths, dy, state_arg(dstate))
    checks = {"dx": x}
    checks.update({f"dstate0[{k}]": s for k, s in enumerate(state)})
    checks.update({"grad " + name: p for name, p in m.params.items()})
    for key, arr in checks.items():
        numeric = central_difference(loss, arr)
        assert max_rel_error(ours[key], numeric) < 1e-6, key


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_gradients_with_masks_and_truncation(case, reverse):
    """The reference's layer kernel with recurrent dropout masks (fixed) and lengths, by
    central differences; with truncation, against the windows run one after another."""
    cls, options = CASES[case]
    cell = cells.cell_for(cls.mode if hasattr(cls, "mode") else case.upper(),
                          layer_norm_eps=1e-5, **options)
    T, B, I, H = 5, 3, 3, 4
    rng = np.random.default_rng(8)
    shapes = cell.param_shapes(I, H)
    params = tuple(0.5 * rng.standard_normal(shapes[name]) for name in cell.param_names)
    x = rng.standard_normal((T, B, I))
    state0 = tuple(0.5 * rng.standard_normal((B, H)) for _ in cell.state_names)
    lengths = np.array([5, 3, 0])
    mask = (rng.random((cell.num_gates, B, H)) > 0.3) / 0.7
    dy = rng.standard_normal((T, B, H))
    dstate_n = tuple(rng.standard_normal((B, H)) for _ in cell.state_names)

    def run(train=True):
        y = np.zeros((T, B, H))
        state_n = tuple(np.zeros((B, H)) for _ in cell.state_names)
        cache = reference.layer_forward(cell, x, state0, params, lengths, reverse, train, y,
                                        state_n, recurrent_mask=mask)
        return y, state_n, cache

    def loss():
        y, state_n, _ = run()
        return float((y * dy).sum() + sum((s * d).sum() for s, d in zip(state_n, dstate_n)))

    _, _, cache = run()
    dx = np.zeros_like(x)
    dstate0 = tuple(np.zeros_like(s) for s in state0)
    dparams = tuple(np.zeros_like(p) for p in params)
    reference.layer_backward(cell, cache, dy, dstate_n, None, dx, dstate0, dparams)
    checks = [("dx", dx, x)] + [(f"dstate0[{k}]", d, s) for k, (d, s) in
                                enumerate(zip(dstate0, state0))]
    checks += [(name, d, p) for name, d, p in zip(cell.param_names, dparams, params)]
    for name, ours, arr in checks:
        assert max_rel_error(ours, central_difference(loss, arr)) < 1e-6, name
    # truncation at 2: forward, the gradients of the windows [0, 2), [2, 4), [4, 5) run one
    # after another, each from the state the one before ended in (the masks are per row, the
    # same at every step); reverse, only that the cut changes the gradients
    dx_cut = np.zeros_like(x)
    dparams_cut = tuple(np.zeros_like(p) for p in params)
    reference.layer_backward(cell, cache, dy, dstate_n, 2, dx_cut,
                             tuple(np.zeros_like(s) for s in state0), dparams_cut)
    assert max_rel_error(dx_cut, dx) > 1e-3
    if reverse:
        return
    dx_windows = np.zeros_like(x)
    dparams_windows = tuple(np.zeros_like(p) for p in params)
    state = state0
    for a, b in ((0, 2), (2, 4), (4, 5)):
        y = np.zeros((b - a, B, H))
        state_n = tuple(np.zeros((B, H)) for _ in cell.state_names)
        window = reference.layer_forward(cell, x[a:b], state, params,
                                         np.clip(lengths - a, 0, b - a), False, True, y,
                                         state_n, recurrent_mask=mask)
        d_end = dstate_n if b == T else tuple(np.zeros((B, H)) for _ in cell.state_names)
        reference.layer_backward(cell, window, dy[a:b], d_end, None, dx_windows[a:b],
                                 tuple(np.zeros((B, H)) for _ in cell.state_names),
                                 dparams_windows)
        state = state_n
    assert max_rel_error(dx_cut, dx_windows) < 1e-12
    for name, ours, theirs in zip(cell.param_names, dparams_cut, dparams_windows):
        assert max_rel_error(ours, theirs) < 1e-12, name


def test_parameters_names_and_initial_values():
    m = fastrnn.LSTM(3, 4, 2, layer_norm=True, bidirectional=True, init="keras",
                     backend="reference")
    for suffix in ("_l0", "_l1_reverse"):
        for part, size in (("ih", 16), ("hh", 16), ("cell", 4)):
            np.testing.assert_array_equal(m.params[f"ln_{part}_weight{suffix}"], np.ones(size))
            np.testing.assert_array_equal(m.params[f"ln_{part}_bias{suffix}"], np.zeros(size))
    g = fastrnn.GRU(3, 4, layer_norm=True, layer_norm_eps=1e-3, backend="reference")
    assert sorted(k for k in g.params if k.startswith("ln_")) == [
        "ln_hh_bias_l0", "ln_hh_weight_l0", "ln_ih_bias_l0", "ln_ih_weight_l0"]
    assert g.cell.layer_norm_eps == 1e-3 and g.params["ln_ih_weight_l0"].shape == (12,)


def test_eps_is_used():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 2, 3))
    a = fastrnn.GRU(3, 4, layer_norm=True, layer_norm_eps=1e-5, backend="reference", seed=1)
    b = fastrnn.GRU(3, 4, layer_norm=True, layer_norm_eps=1.0, backend="reference", seed=1)
    assert max_rel_error(a(x)[0], b(x)[0]) > 1e-3


def test_nan_in_one_row_stays_in_that_row():
    m = _layer("lstm", 3, 4, 2, dtype=np.float64, seed=2)
    x = np.random.default_rng(1).standard_normal((4, 3, 3))
    x[1, 1, 0] = np.nan
    y, (h, c) = m(x)
    assert np.isnan(y[1:, 1]).all() and not np.isnan(y[:, [0, 2]]).any()
    assert not np.isnan(y[0]).any()


@pytest.mark.parametrize("options, match", [
    ({"cls": fastrnn.RNN}, "only LSTM and GRU"),
    ({"peephole": True}, "not with peephole"),
    ({"clip": 3.0}, "not with ONNX's activations, clip or input_forget"),
    ({"layer_norm_eps": 0.0}, r"layer_norm_eps: expected a positive finite number, got 0.0"),
    ({"layer_norm_eps": float("nan")}, "layer_norm_eps"),
    ({"layer_norm": "yes"}, "layer_norm: expected True or False"),
])
def test_refusals(options, match):
    options = dict(options)
    cls = options.pop("cls", fastrnn.LSTM)
    options.setdefault("layer_norm", True)
    with pytest.raises((ValueError, TypeError), match=match):
        cls(3, 4, backend="reference", **options)


# (T, B, layers, bidirectional, lengths, recurrent dropout, truncate): small rows; many rows
# (the packed products on the thread pool); lengths with a 0 and states; both directions of a
# stack with recurrent dropout (the BLAS path); truncation; a stack's truncation whose windows
# end in rows' padding (lengths 3 and 0 cut at 2, 4 and 6 in both directions)
KERNEL_CASES = {
    "small": (5, 3, 1, False, None, 0.0, None),
    "packed": (10, 20, 1, False, None, 0.0, None),
    "lengths": (6, 4, 2, True, [6, 0, 3, 5], 0.0, None),
    "masks": (5, 3, 2, True, [5, 2, 4], 0.3, None),
    "truncate": (7, 3, 1, True, [7, 5, 1], 0.0, 3),
    "truncate_stack": (9, 4, 2, True, [9, 3, 0, 6], 0.0, 2),
}
# a projected LSTM (fastrnn.projection's "state" form: the kernels start from an m0 with
# w_hr m0 = h0), on every path but recurrent dropout, which a projection refuses
BACKEND_CASES = dict(CASES, lstm_projected=(fastrnn.LSTM, {"proj_size": 3}))
BACKEND_PAIRS = [(case, kernel_case) for case in sorted(BACKEND_CASES)
                 for kernel_case in sorted(KERNEL_CASES)
                 if not (case == "lstm_projected" and kernel_case == "masks")]


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("case, kernel_case", BACKEND_PAIRS)
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backend_matches_reference(backend, case, kernel_case, dtype):
    """Outputs, final states and every gradient of a compiled backend's layer-normalized
    kernels against the reference, on each path its loop takes."""
    T, B, L, bidirectional, lengths, recurrent_dropout, truncate = KERNEL_CASES[kernel_case]
    cls, options = BACKEND_CASES[case]
    results = {}
    for name in ("reference", backend):
        m = cls(4, 6, L, bidirectional=bidirectional, recurrent_dropout=recurrent_dropout,
                layer_norm=True, dtype=dtype, backend=name, seed=9, **options)
        rng = np.random.default_rng(3)
        for key, p in m.params.items():
            if key.startswith("ln_"):
                p += (0.3 * rng.standard_normal(p.shape)).astype(dtype)
        x, state, dy, dstate = layer_arrays(m, T, B, rng)
        results[name] = run_layer(m, x, state_arg(state), lengths, dy, state_arg(dstate),
                                  truncate=truncate)
    assert_all_close(results[backend], results["reference"], dtype, f"{backend} {case}")


@pytest.mark.float32_kernels
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backward_returns_the_hidden_side_gradients(backend):
    """The compiled layer_backward's return (fastrnn.cells): a layer-normalized LSTM's raw
    recurrent-product gradients step by step, (T, B, G*H), zeros at padding, whose product
    with h_prev^T summed over the steps is dW_hh; None for the plain LSTM (no hidden-side
    block)."""
    kernels = fastrnn.get_backend(backend)
    rng = np.random.default_rng(5)
    T, B, I, H = 4, 3, 3, 5
    lengths = np.array([4, 2, 0])
    for layer_norm in (True, False):
        cell = cells.cell_for("LSTM", layer_norm_eps=1e-5 if layer_norm else None)
        shapes = cell.param_shapes(I, H)
        params = tuple((0.5 * rng.standard_normal(shapes[n])).astype(np.float32)
                       for n in cell.param_names)
        x = rng.standard_normal((T, B, I)).astype(np.float32)
        state0 = tuple((0.5 * rng.standard_normal((B, H))).astype(np.float32) for _ in range(2))
        y = np.zeros((T, B, H), np.float32)
        state_n = tuple(np.zeros((B, H), np.float32) for _ in range(2))
        cache = kernels.layer_forward(cell, x, state0, params, lengths, False, True, y, state_n)
        dparams = tuple(np.zeros_like(p) for p in params)
        hidden = kernels.layer_backward(cell, cache, rng.standard_normal(y.shape).astype(
            np.float32), (None, None), None, np.zeros_like(x), tuple(np.zeros_like(s)
                                                                      for s in state0), dparams)
        if not layer_norm:
            assert hidden is None
            continue
        assert hidden.shape == (T, B, 4 * H)
        assert not hidden[2:, 1].any() and not hidden[:, 2].any() and hidden[:2, 1].any()
        h_prev = np.concatenate([state0[0][None], y[:-1]])
        h_prev[2:, 1] = 0
        dw_hh = np.einsum("tbg,tbh->gh", hidden.astype(np.float64), h_prev)
        assert max_rel_error(dparams[1], dw_hh) < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_caller_arrays_are_never_written(backend, case):
    check_caller_arrays_untouched(backend, case, layer_norm=True)


def test_export_and_functional_refuse():
    pytest.importorskip("onnx")
    import fastrnn.onnx
    m = _layer("gru", 3, 4)
    with pytest.raises(ValueError, match="layer_norm=True has no ONNX form"):
        fastrnn.onnx.export(m, "unused.onnx")
    with pytest.raises(ValueError, match="layer-normalized cell is not taken here"):
        fastrnn.functional.forward(m.cell, np.zeros((2, 1, 3)), np.zeros((1, 4)), None,
                                   m.params["weight_ih_l0"], m.params["weight_hh_l0"])
