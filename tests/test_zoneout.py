"""Zoneout (``zoneout=``, Krueger et al. 2016): in training each state unit keeps its value
from before the step with probability z (masks drawn per step from ``m.rng``, kept in the
cache); in inference the state is the expectation z * before + (1 - z) * new.

The outside oracle is PyTorch written the way its users must: a loop over time of
``nn.LSTMCell`` / ``nn.GRUCell`` / ``nn.RNNCell`` (PyTorch's own cells, loaded with the layer's
weights) mixing the states with fastrnn's masks, differentiated by autograd. Central
differences check the reference where PyTorch has no cell (the reset-before GRU, layer norm,
lengths, a projection); each compiled backend is checked against the reference on each path
of its loop.
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
    "rnn_relu": (fastrnn.RNN, {"nonlinearity": "relu"}),
    "lstm_layer_norm": (fastrnn.LSTM, {"layer_norm": True}),
    "gru_layer_norm": (fastrnn.GRU, {"layer_norm": True, "reset_after": False}),
}
RATES = {fastrnn.LSTM: (0.3, 0.6), fastrnn.GRU: 0.4, fastrnn.RNN: 0.4}   # LSTM (z_c, z_h)


def _layer(case, I, H, L=1, backend="reference", **options):
    cls, cell_options = CASES[case]
    return cls(I, H, L, zoneout=RATES[cls], backend=backend, **cell_options, **options)


def _masks(m, x, seed):
    """The zoneout masks a training forward from m.rng = default_rng(seed) draws."""
    m.rng = np.random.default_rng(seed)
    _, _, cache = m.forward(x, train=True)
    m.rng = np.random.default_rng(seed)
    return cache.zoneout_masks


def _torch_loop(torch, m, x, state, keeps, dy=None, dstate=None):
    """The layer as a loop over time of PyTorch's cells, each state mixed with the one before
    by keeps[row] (per state: a (T, B, width) mask or a rate), full-length sequences."""
    nn = torch.nn
    leaf = lambda a: torch.tensor(a, requires_grad=True)
    P = {name: leaf(p) for name, p in m.params.items()}
    xt = leaf(x)
    s0 = [leaf(s) for s in state]
    T, lstm = x.shape[0], m.mode == "LSTM"
    inp, finals = xt, [[], []]
    for layer in range(m.num_layers):
        outs = []
        for d in range(m.num_directions):
            suffix = f"_l{layer}" + ("_reverse" if d else "")
            row = layer * m.num_directions + d
            make = {"LSTM": nn.LSTMCell, "GRU": nn.GRUCell,
                    "RNN": lambda i, h, bias: nn.RNNCell(i, h, bias, m.cell.activation)}[m.mode]
            cell = make(inp.shape[2], m.hidden_size, bias=m.bias).to(P["weight_ih" + suffix].dtype)
            # the layer's own tensors in the cell, so that autograd reaches them
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                if name + suffix in P:
                    delattr(cell, name)
                    setattr(cell, name, P[name + suffix])
            k = [torch.tensor(z[:, :, :]) if isinstance(z, np.ndarray) else z
                 for z in keeps[row]]
            kt = lambda s, t: k[s][t] if isinstance(k[s], torch.Tensor) else k[s]
            h = s0[0][row]
            c = s0[1][row] if lstm else None
            ys = [None] * T
            for t in (range(T - 1, -1, -1) if d else range(T)):
                if lstm:
                    h_new, c_new = cell(inp[t], (h, c))
                    c = kt(1, t) * c + (1 - kt(1, t)) * c_new
                else:
                    h_new = cell(inp[t], h)
                h = kt(0, t) * h + (1 - kt(0, t)) * h_new
                ys[t] = h
            outs.append(torch.stack(ys))
            finals[0].append(h)
            finals[1].append(c)
        inp = torch.cat(outs, dim=2)
    return torch_loop_results(torch, inp, finals, (xt, s0, P), dy, dstate)


TORCH_CASES = ["lstm", "gru", "rnn_relu"]      # the cells PyTorch has


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("stack", [(1, False, True), (2, True, True), (2, False, False)],
                         ids=["L1", "L2bi", "L2-nobias"])
@pytest.mark.parametrize("case", TORCH_CASES)
def test_training_matches_pytorch_cells_loop(case, stack, dtype):
    """Outputs, final states and every gradient with the layer's masks, against PyTorch's
    cells in a loop mixing the states with the same masks."""
    torch = pytest.importorskip("torch")
    L, bidirectional, bias = stack
    rng = np.random.default_rng(stable_seed(case, stack))
    m = _layer(case, 5, 6, L, bidirectional=bidirectional, bias=bias, dtype=dtype, seed=3)
    x, state, dy, dstate = layer_arrays(m, 7, 3, rng)
    keeps = _masks(m, x, 4)
    ours = run_layer(m, x, state_arg(state), None, dy, state_arg(dstate))
    theirs = _torch_loop(torch, m, x, state, keeps, dy, dstate)
    assert sorted(ours) == sorted(theirs)
    assert_all_close(ours, theirs, dtype, case)


@pytest.mark.parametrize("case", TORCH_CASES)
def test_inference_is_the_expectation(backend, case):
    """Without train, the state is z * before + (1 - z) * new at every step: PyTorch's cells
    mixing with the rates."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(5)
    m = _layer(case, 4, 5, 2, bidirectional=True, dtype=np.float64, seed=2, backend=backend)
    x, state, _, _ = layer_arrays(m, 6, 3, rng)
    rates = m._zoneout_rates
    y, final = m(x, state_arg(state))
    theirs = _torch_loop(torch, m, x, state, [rates] * 4)
    final = final if isinstance(final, tuple) else (final,)
    assert max_rel_error(y, theirs["y"]) < 1e-10
    for s, f in enumerate(final):
        assert max_rel_error(f, theirs[f"state_n[{s}]"]) < 1e-10


@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_gradients_central_differences(case):
    """Every parameter, x and the initial state by central differences in float64, with the
    masks fixed (m.rng reseeded before each forward): two layers, both directions, lengths
    with a 0, and (LSTM) a projection."""
    T, B = 4, 3
    rng = np.random.default_rng(7)
    options = {"proj_size": 2} if case == "lstm" else {}
    m = _layer(case, 3, 4, 2, bidirectional=True, dtype=np.float64, seed=5, **options)
    x, state, dy, dstate = layer_arrays(m, T, B, rng)
    lengths = [4, 0, 2]

    def loss():
        m.rng = np.random.default_rng(9)
        y, final, _ = m.forward(x, state_arg(state), lengths, train=True)
        final = final if isinstance(final, tuple) else (final,)
        return float((y * dy).sum() + sum((f * d).sum() for f, d in zip(final, dstate)))

    m.rng = np.random.default_rng(9)
    ours = run_layer(m, x, state_arg(state), lengths, dy, state_arg(dstate))
    checks = {"dx": x}
    checks.update({f"dstate0[{k}]": s for k, s in enumerate(state)})
    checks.update({"grad " + name: p for name, p in m.params.items()})
    for key, arr in checks.items():
        assert max_rel_error(ours[key], central_difference(loss, arr)) < 1e-6, key


@pytest.mark.parametrize("case", ["lstm", "gru_reset_before"])
def test_truncation_is_the_windows_run_one_after_another(case):
    """The reference kernel with masks and truncation at 2 against the windows [0, 2),
    [2, 4), [4, 5) run one after another, each with its slice of the masks."""
    cls, options = CASES[case]
    cell = cells.cell_for(cls.mode, **options)
    T, B, I, H = 5, 3, 3, 4
    rng = np.random.default_rng(8)
    shapes = cell.param_shapes(I, H)
    params = tuple(0.5 * rng.standard_normal(shapes[name]) for name in cell.param_names)
    x = rng.standard_normal((T, B, I))
    state0 = tuple(0.5 * rng.standard_normal((B, H)) for _ in cell.state_names)
    lengths = np.array([5, 3, 0])
    keeps = tuple((rng.random((T, B, H)) < 0.4).astype(float) for _ in cell.state_names)
    dy = rng.standard_normal((T, B, H))
    dstate_n = tuple(rng.standard_normal((B, H)) for _ in cell.state_names)
    zeros = lambda: tuple(np.zeros((B, H)) for _ in cell.state_names)
    state_n = zeros()
    cache = reference.layer_forward(cell, x, state0, params, lengths, False, True,
                                    np.zeros((T, B, H)), state_n, zoneout=keeps)
    dx_cut = np.zeros_like(x)
    dparams_cut = tuple(np.zeros_like(p) for p in params)
    reference.layer_backward(cell, cache, dy, dstate_n, 2, dx_cut, zeros(), dparams_cut)
    dx_windows = np.zeros_like(x)
    dparams_windows = tuple(np.zeros_like(p) for p in params)
    state = state0
    for a, b in ((0, 2), (2, 4), (4, 5)):
        state_n = zeros()
        window = reference.layer_forward(cell, x[a:b], state, params,
                                         np.clip(lengths - a, 0, b - a), False, True,
                                         np.zeros((b - a, B, H)), state_n,
                                         zoneout=tuple(k[a:b] for k in keeps))
        reference.layer_backward(cell, window, dy[a:b], dstate_n if b == T else zeros(),
                                 None, dx_windows[a:b], zeros(), dparams_windows)
        state = state_n
    assert max_rel_error(dx_cut, dx_windows) < 1e-12
    for name, ours, theirs in zip(cell.param_names, dparams_cut, dparams_windows):
        assert max_rel_error(ours, theirs) < 1e-12, name


# (T, B, layers, bidirectional, lengths, recurrent dropout, truncate, train): small rows (the
# unit-split loop); many rows (the packed products on the pool); lengths with a 0 and states;
# recurrent dropout (the BLAS path); truncation; inference (rates, both loops)
KERNEL_CASES = {
    "small": (5, 3, 1, False, None, 0.0, None, True),
    "packed": (10, 20, 1, False, None, 0.0, None, True),
    "lengths": (6, 4, 2, True, [6, 0, 3, 5], 0.0, None, True),
    "masks": (5, 3, 2, True, [5, 2, 4], 0.3, None, True),
    "truncate": (7, 3, 1, True, [7, 5, 1], 0.0, 3, True),
    "infer": (6, 4, 2, True, [6, 0, 3, 5], 0.0, None, False),
    "infer-packed": (10, 20, 1, False, None, 0.0, None, False),
}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kernel_case", sorted(KERNEL_CASES))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_backend_matches_reference(backend, case, kernel_case, dtype):
    """Outputs, final states and every gradient of a compiled backend with zoneout against
    the reference, with the same masks, on each path of its loop."""
    T, B, L, bidirectional, lengths, recurrent_dropout, truncate, train = \
        KERNEL_CASES[kernel_case]
    results = {}
    for name in ("reference", backend):
        m = _layer(case, 4, 6, L, bidirectional=bidirectional,
                   recurrent_dropout=recurrent_dropout, dtype=dtype, backend=name, seed=9)
        rng = np.random.default_rng(3)
        x, state, dy, dstate = layer_arrays(m, T, B, rng)
        if train:
            m.rng = np.random.default_rng(4)
            results[name] = run_layer(m, x, state_arg(state), lengths, dy, state_arg(dstate),
                                      truncate=truncate)
        else:
            y, final = m(x, state_arg(state), lengths)
            final = final if isinstance(final, tuple) else (final,)
            results[name] = {"y": y, **{f"state_n[{s}]": f for s, f in enumerate(final)}}
    assert_all_close(results[backend], results["reference"], dtype, f"{backend} {case}")


def test_masks_are_drawn_per_step_and_replayed_from_rng():
    m = fastrnn.LSTM(3, 40, 2, bidirectional=True, zoneout=(0.1, 0.6), backend="reference",
                     seed=1)
    x = np.random.default_rng(0).standard_normal((50, 8, 3)).astype(np.float32)
    m.rng = np.random.default_rng(2)
    y1, _, cache = m.forward(x, train=True)
    assert len(cache.zoneout_masks) == 4
    for keeps in cache.zoneout_masks:
        mask_h, mask_c = keeps                      # state order: h, then c
        assert mask_h.shape == mask_c.shape == (50, 8, 40) and mask_h.dtype == np.float32
        assert set(np.unique(mask_h)) | set(np.unique(mask_c)) == {0.0, 1.0}
        assert abs(mask_h.mean() - 0.6) < 0.02 and abs(mask_c.mean() - 0.1) < 0.02
        assert (mask_h[0] != mask_h[1]).any()       # a new mask at every step
    m.rng = np.random.default_rng(2)
    y2, _, cache2 = m.forward(x, train=True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(cache.zoneout_masks[3][0], cache2.zoneout_masks[3][0])
    _, _, other = m.forward(x, train=True)          # rng moved on: other masks
    assert (other.zoneout_masks[0][0] != cache.zoneout_masks[0][0]).any()
    g = fastrnn.GRU(3, 4, zoneout=0.2, backend="reference")
    _, _, cache = g.forward(x, train=True)
    assert len(cache.zoneout_masks[0]) == 1 and cache.zoneout_masks[0][0].shape == (50, 8, 4)
    _, _, cache = fastrnn.GRU(3, 4, backend="reference").forward(x, train=True)
    assert cache.zoneout_masks == [None]
    # one state's rate 0: no mask drawn for it
    _, _, cache = fastrnn.LSTM(3, 4, zoneout=(0.0, 0.5), backend="reference").forward(x)
    assert cache.zoneout_masks[0][1] == 0.0 and cache.zoneout_masks[0][0].shape == (50, 8, 4)


def test_zoneout_changes_the_numbers_and_zero_is_none(backend):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((6, 2, 3))
    plain = fastrnn.GRU(3, 5, dtype=np.float64, backend=backend, seed=1)
    zero = fastrnn.GRU(3, 5, zoneout=0.0, dtype=np.float64, backend=backend, seed=1)
    zoned = fastrnn.GRU(3, 5, zoneout=0.5, dtype=np.float64, backend=backend, seed=1)
    np.testing.assert_array_equal(plain(x)[0], zero(x)[0])
    assert max_rel_error(zoned(x)[0], plain(x)[0]) > 1e-2
    # training: the masks' units that keep their value carry it unchanged
    zoned.rng = np.random.default_rng(1)
    y, _, cache = zoned.forward(x, train=True)
    keep = cache.zoneout_masks[0][0]
    np.testing.assert_array_equal(y[1:][keep[1:] == 1], y[:-1][keep[1:] == 1])
    assert (keep == 1).any() and (keep == 0).any()


@pytest.mark.parametrize("case", ["lstm", "gru"])
def test_one_step_calls(backend, case):
    """A call on one time step (which the compiled backends' one-step kernel does not take
    with zoneout) gives the reference's numbers, in a loop carrying the state."""
    rng = np.random.default_rng(6)
    ours = _layer(case, 3, 8, 2, dtype=np.float32, seed=4, backend=backend)
    ref = _layer(case, 3, 8, 2, dtype=np.float32, seed=4)
    assert ours._call_step is None
    x = rng.standard_normal((5, 1, 2, 3)).astype(np.float32)
    s_ours = s_ref = None
    for t in range(5):
        y_ours, s_ours = ours(x[t], s_ours)
        y_ref, s_ref = ref(x[t], s_ref)
        assert max_rel_error(y_ours, y_ref) < 1e-4


@pytest.mark.parametrize("case", ["lstm", "gru_layer_norm"])
def test_caller_arrays_are_never_written(backend, case):
    cls, options = CASES[case]
    name = case.replace("_layer_norm", "")
    name = "gru_reset_before" if case == "gru_layer_norm" else name
    check_caller_arrays_untouched(backend, name, zoneout=RATES[cls],
                                  layer_norm=options.get("layer_norm", False))


@pytest.mark.parametrize("cls, value, match", [
    (fastrnn.GRU, -0.1, r"zoneout: expected a number for GRU, each in \[0, 1\), got -0.1"),
    (fastrnn.RNN, 1.0, r"zoneout: expected a number for RNN"),
    (fastrnn.GRU, (0.1, 0.2), r"zoneout: expected a number for GRU"),
    (fastrnn.GRU, True, "zoneout"),
    (fastrnn.LSTM, (0.1,), r"zoneout: expected a number or a pair \(z_c, z_h\) for LSTM"),
    (fastrnn.LSTM, (0.1, 1.5), r"got \(0.1, 1.5\)"),
    (fastrnn.LSTM, "0.1", "zoneout"),
])
def test_refusals(cls, value, match):
    with pytest.raises(ValueError, match=match):
        cls(3, 4, zoneout=value, backend="reference")


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("layer_norm", [False, True], ids=["plain", "layer_norm"])
@pytest.mark.parametrize("rates", [(0.3, 0.0), (0.0, 0.3), (0.2, 0.4)],
                         ids=["c_only", "h_only", "both"])
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_projection_matches_reference(backend, rates, layer_norm, dtype):
    """A projected LSTM with zoneout (z_c, z_h) on a compiled backend against the reference:
    training (the same masks; with z_h > 0 on the backend's loop that carries the P-wide h,
    test_projected_zoneout_loop), with lengths, truncation, both directions and two layers;
    and inference, whose expectation the kernels take as a mix of m at z_h
    (fastrnn.projection)."""
    T, B, lengths = 9, 4, [9, 3, 0, 6]
    results, inferred = {}, {}
    for name in ("reference", backend):
        m = fastrnn.LSTM(4, 6, 2, bidirectional=True, proj_size=3, zoneout=rates,
                         layer_norm=layer_norm, dtype=dtype, backend=name, seed=9)
        x, state, dy, dstate = layer_arrays(m, T, B, np.random.default_rng(3))
        m.rng = np.random.default_rng(5)
        results[name] = run_layer(m, x, state_arg(state), lengths, dy, state_arg(dstate),
                                  truncate=2)
        y, (h_n, c_n) = m(x, state_arg(state), lengths)
        inferred[name] = {"y": y, "h_n": h_n, "c_n": c_n}
    assert_all_close(results[backend], results["reference"], dtype, f"{backend} training")
    assert_all_close(inferred[backend], inferred["reference"], dtype, f"{backend} inference")
    # the rates are used: zoneout's expectation differs from no zoneout
    m.zoneout = (0.0, 0.0)
    assert max_rel_error(m(x, state_arg(state), lengths)[0], inferred[backend]["y"]) > 1e-3


PROJECTED_CELLS = {"plain": {}, "peephole": {"peephole": True},
                   "options": {"clip": 1.5, "input_forget": True},
                   "layer_norm": {"layer_norm_eps": 1e-5}}


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell_options", sorted(PROJECTED_CELLS))
@pytest.mark.parametrize("backend", COMPILED_BACKENDS)
def test_projected_zoneout_loop(backend, cell_options, reverse, dtype):
    """The compiled backends' own loop for a projected LSTM whose zoneout mixes h per unit
    (fastrnn.projection.zones_h: h, P wide, carried beside the cell's m): keep masks on h and
    c, lengths with a 0, truncation, the final state's gradient, against the reference's
    layer_forward / layer_backward, for every LSTM variant; and a rate in training, which mixes
    h per unit too. The call runs compiled, not on the reference."""
    kernels = fastrnn.get_backend(backend)
    cell = cells.cell_for("LSTM", projected=True, **PROJECTED_CELLS[cell_options])
    T, B, I, H, P = 7, 4, 3, 6, 4
    rng = np.random.default_rng(stable_seed(cell_options, reverse))
    shapes = cell.param_shapes(I, H, P)
    params = tuple((0.5 * rng.standard_normal(shapes[n])).astype(dtype)
                   for n in cell.param_names)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    state0 = ((0.5 * rng.standard_normal((B, P))).astype(dtype),
              (0.5 * rng.standard_normal((B, H))).astype(dtype))
    lengths = np.array([7, 3, 0, 5])
    masks = ((rng.random((T, B, P)) < 0.4).astype(dtype),
             (rng.random((T, B, H)) < 0.3).astype(dtype))
    dy = rng.standard_normal((T, B, P)).astype(dtype)
    dstate_n = (rng.standard_normal((B, P)).astype(dtype),
                rng.standard_normal((B, H)).astype(dtype))
    for zoneout in (masks, (0.4, masks[1])):
        results = {}
        for name, module in (("reference", reference), (backend, kernels)):
            y = np.zeros((T, B, P), dtype)
            state_n = (np.zeros((B, P), dtype), np.zeros((B, H), dtype))
            cache = module.layer_forward(cell, x, state0, params, lengths, reverse, True, y,
                                         state_n, zoneout=zoneout)
            assert isinstance(cache, reference.Cache) == (name == "reference")
            dx = np.zeros_like(x)
            dstate0 = tuple(np.zeros_like(s) for s in state0)
            dparams = tuple(np.zeros_like(p) for p in params)
            module.layer_backward(cell, cache, dy, dstate_n, 3, dx, dstate0, dparams)
            results[name] = {"y": y, "h_n": state_n[0], "c_n": state_n[1], "dx": dx,
                             "dh0": dstate0[0], "dc0": dstate0[1],
                             **{f"d{n}": d for n, d in zip(cell.param_names, dparams)}}
        assert_all_close(results[backend], results["reference"], dtype,
                         f"{backend} {cell_options}")
        # the masks are used: h of the rows past their length stays, and y is zero there
        np.testing.assert_array_equal(results[backend]["y"][3:, 1], 0)


def test_onnx_export_refuses(tmp_path):
    pytest.importorskip("onnx")
    import fastrnn.onnx
    with pytest.raises(ValueError, match=r"layer: zoneout=0.1 has no ONNX form"):
        fastrnn.onnx.export(fastrnn.GRU(3, 4, zoneout=0.1, backend="reference"),
                            str(tmp_path / "unused.onnx"))


def test_repr_pickle_and_caches_of_other_rates():
    import pickle
    m = fastrnn.LSTM(3, 4, zoneout=(0.1, 0.2), backend="reference")
    assert "zoneout=(0.1, 0.2)" in repr(m)
    assert pickle.loads(pickle.dumps(m)).zoneout == (0.1, 0.2)
    assert fastrnn.GRU(3, 4, zoneout=0.3, backend="reference").zoneout == 0.3
    x = np.zeros((2, 1, 3), np.float32)
    _, _, cache = m.forward(x)
    other = fastrnn.LSTM(3, 4, zoneout=0.2, backend="reference")
    with pytest.raises(ValueError, match=r"zoneout=\(0.1, 0.2\)"):
        other.backward(None, cache)
