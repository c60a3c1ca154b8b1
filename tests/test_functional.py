"""fastrnn.functional, the one-layer one-direction API for embedding the kernels in NumPy code,
on every backend against the reference backend's layer classes (an independent path: the layer
builds its own kernel calls), for every cell and both directions: outputs, final states, every
gradient, with lengths, initial states, final-state gradients, truncation, accumulation into the
caller's gradient arrays, ``out=``/``h_n=``/``c_n=`` buffers (strided views included), and every
error the module raises."""
import numpy as np
import pytest

from conftest import assert_all_close, make_layer, max_rel_error
from fastrnn import functional
from fastrnn.cells import CELLS

T, B, I, H = 5, 3, 4, 3
LENGTHS = np.array([5, 2, 4])        # every sequence ends at its own step; one is padded by 3
GRAD_NAMES = {"dw_ih": "weight_ih", "dw_hh": "weight_hh", "db_ih": "bias_ih",
              "db_hh": "bias_hh", "dpeephole": "peephole"}


def _problem(cell, dtype, seed=0):
    """A reference bidirectional layer (the oracle) and the inputs of one functional call."""
    layer = make_layer(cell, I, H, 1, bidirectional=True, dtype=dtype, seed=seed)
    for p in layer.params.values():     # larger weights: saturating gates, growing relu states
        p *= 2
    rng = np.random.default_rng(seed + 1)
    draw = lambda *shape: rng.standard_normal(shape).astype(dtype)
    has_c = layer.cell.has_cell_state
    data = {"x": draw(T, B, I), "h0": draw(B, H), "c0": draw(B, H) if has_c else None,
            "dy": draw(T, B, H), "dh_n": draw(B, H), "dc_n": draw(B, H) if has_c else None}
    return layer, data


def _weights(layer, reverse):
    suffix = "_l0_reverse" if reverse else "_l0"
    p = layer.params
    return [p["weight_ih" + suffix], p["weight_hh" + suffix], p["bias_ih" + suffix],
            p["bias_hh" + suffix], p.get("peephole" + suffix)]


def _expected(layer, data, reverse, lengths=LENGTHS, truncate=None, dy=True, dstate=True):
    """The reference layer's results for one direction: the other direction gets a zero state
    gradient and zero dy, so it adds nothing to dx."""
    d = int(reverse)
    has_c = layer.cell.has_cell_state

    def both(part):        # (2, B, H): this direction's row, the other zero
        rows = np.zeros((2, B, H), layer.dtype)
        if part is not None:
            rows[d] = part
        return rows
    state = (both(data["h0"]), both(data["c0"])) if has_c else both(data["h0"])
    y, final, cache = layer.forward(data["x"], state, lengths, train=True)
    dy_both = None
    if dy:
        dy_both = np.zeros((T, B, 2 * H), layer.dtype)
        dy_both[..., d * H:(d + 1) * H] = data["dy"]
    dstate_both = None
    if dstate:
        dstate_both = (both(data["dh_n"]), both(data["dc_n"])) if has_c else both(data["dh_n"])
    layer.zero_grad()
    dx, dstate0 = layer.backward(dy_both, cache, dstate_both, truncate=truncate)
    final = final if has_c else (final,)
    dstate0 = dstate0 if has_c else (dstate0,)
    result = {"y": y[..., d * H:(d + 1) * H], "h_n": final[0][d], "dx": dx,
              "dh0": dstate0[0][d]}
    if has_c:
        result.update(c_n=final[1][d], dc0=dstate0[1][d])
    suffix = "_l0_reverse" if reverse else "_l0"
    for key, name in GRAD_NAMES.items():
        if name + suffix in layer.grads:
            result[key] = layer.grads[name + suffix].copy()
    return result


def _functional(cell, layer, data, reverse, backend, lengths=LENGTHS, truncate=None, dy=True,
                dstate=True, grads=None, **buffers):
    y, h_n, c_n, cache = functional.forward(
        cell, data["x"], data["h0"], data["c0"], *_weights(layer, reverse), lengths=lengths,
        reverse=reverse, train=True, backend=backend, **buffers)
    out = functional.backward(cache, data["dy"] if dy else None,
                              data["dh_n"] if dstate else None,
                              data["dc_n"] if dstate else None, truncate=truncate, grads=grads)
    result = {"y": y, "h_n": h_n, **out}
    if c_n is not None:
        result["c_n"] = c_n
    return result


@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_matches_the_reference_layer(backend, cell, reverse, dtype):
    """Lengths, initial states, dy and final-state gradients; the inputs are left as they were."""
    layer, data = _problem(cell, dtype)
    before = {k: None if v is None else v.copy() for k, v in data.items()}
    weights_before = [None if w is None else w.copy() for w in _weights(layer, reverse)]
    got = _functional(cell, layer, data, reverse, backend)
    expected = _expected(layer, data, reverse)
    assert_all_close(got, expected, dtype, f"{cell} reverse={reverse}")
    for key, value in before.items():
        if value is not None:
            np.testing.assert_array_equal(data[key], value, err_msg=f"{key} was written")
    for w, w0 in zip(_weights(layer, reverse), weights_before):
        if w is not None:
            np.testing.assert_array_equal(w, w0)
    # the direction mattered: the other direction's outputs differ
    other = _expected(layer, data, not reverse)
    assert max_rel_error(got["y"], other["y"]) > 1e-3


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_truncate_matches_the_reference_layer(backend, cell, reverse):
    layer, data = _problem(cell, np.float64, seed=2)
    got = _functional(cell, layer, data, reverse, backend, truncate=2)
    assert_all_close(got, _expected(layer, data, reverse, truncate=2), np.float64,
                     f"{cell} truncate=2")
    full = _functional(cell, layer, data, reverse, backend)
    assert max_rel_error(got["dw_hh"], full["dw_hh"]) > 1e-6       # truncation cut something


@pytest.mark.parametrize("cell", ["lstm_peephole", "gru", "rnn_relu"])
def test_gradients_of_the_final_state_alone_and_of_the_outputs_alone(backend, cell):
    """dy=None (no loss on the outputs) and dh_n=dc_n=None (none on the final state)."""
    layer, data = _problem(cell, np.float64, seed=4)
    for dy, dstate in [(False, True), (True, False)]:
        got = _functional(cell, layer, data, False, backend, dy=dy, dstate=dstate)
        expected = _expected(layer, data, False, dy=dy, dstate=dstate)
        assert_all_close(got, expected, np.float64, f"dy={dy} dstate={dstate}")


@pytest.mark.parametrize("cell", ["lstm_peephole", "gru_reset_before", "rnn_tanh"])
def test_backward_adds_into_the_given_gradient_arrays(backend, cell):
    """grads=: every given array receives old + gradient and is the one returned; missing keys
    are allocated."""
    layer, data = _problem(cell, np.float64, seed=6)
    fresh = _functional(cell, layer, data, True, backend)
    rng = np.random.default_rng(7)
    given = {k: rng.standard_normal(v.shape) for k, v in fresh.items()
             if k not in ("y", "h_n", "c_n", "db_hh")}
    start = {k: v.copy() for k, v in given.items()}
    got = _functional(cell, layer, data, True, backend, grads=given)
    for key, array in given.items():
        assert got[key] is array, f"{key}: not the array given"
        assert max_rel_error(array, start[key] + fresh[key]) <= 1e-10, key
    np.testing.assert_allclose(got["db_hh"], fresh["db_hh"], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_output_buffers_strided_views_and_state_buffers(backend, cell):
    """out= a strided view (one direction's half of a wider array), h_n= and c_n= buffers:
    written in place, returned, and nothing around them touched."""
    layer, data = _problem(cell, np.float64, seed=8)
    wide = np.full((T, B, 2 * H), 7.0)
    h_n = np.full((B, H), np.nan)
    c_n = np.full((B, H), np.nan) if layer.cell.has_cell_state else None
    buffers = {"out": wide[..., H:], "h_n": h_n}
    if c_n is not None:
        buffers["c_n"] = c_n
    got = _functional(cell, layer, data, True, backend, **buffers)
    assert np.shares_memory(got["y"], wide) and got["h_n"] is h_n
    if c_n is not None:
        assert got["c_n"] is c_n
    expected = _expected(layer, data, True)
    assert_all_close({"y": wide[..., H:], "h_n": h_n}, {"y": expected["y"],
                     "h_n": expected["h_n"]}, np.float64, "buffers")
    if c_n is not None:
        assert max_rel_error(c_n, expected["c_n"]) <= 1e-10
    assert (wide[..., :H] == 7.0).all(), "out= wrote outside its view"


def test_defaults_full_lengths_zero_biases_and_no_cache_for_inference(backend):
    layer, data = _problem("gru", np.float64, seed=9)
    w_ih, w_hh, b_ih, b_hh, _ = _weights(layer, False)
    args = ("gru", data["x"], data["h0"], None, w_ih, w_hh)
    y_full, h_full, c_none, cache = functional.forward(*args, b_ih, b_hh, backend=backend)
    assert cache is None and c_none is None
    y_lengths, h_lengths, _, _ = functional.forward(*args, b_ih, b_hh, lengths=[T] * B,
                                                    backend=backend)
    np.testing.assert_array_equal(y_full, y_lengths)
    np.testing.assert_array_equal(h_full, h_lengths)
    zero = np.zeros_like(b_ih)
    y_none = functional.forward(*args, backend=backend)[0]
    y_zero = functional.forward(*args, zero, zero, backend=backend)[0]
    np.testing.assert_array_equal(y_none, y_zero)
    assert max_rel_error(y_none, y_full) > 1e-3        # the biases mattered


# ----- errors ---------------------------------------------------------------------------------

def _args(cell="lstm", dtype=np.float64):
    layer, data = _problem(cell, dtype, seed=10)
    w_ih, w_hh, b_ih, b_hh, peephole = _weights(layer, False)
    return dict(cell=cell, x=data["x"], h0=data["h0"], c0=data["c0"], w_ih=w_ih, w_hh=w_hh,
                b_ih=b_ih, b_hh=b_hh, peephole=peephole)


def _forward(args, **changes):
    kwargs = {**args, **changes}
    positional = [kwargs.pop(k) for k in ("cell", "x", "h0", "c0", "w_ih", "w_hh", "b_ih",
                                          "b_hh", "peephole")]
    return functional.forward(*positional, **kwargs)


FORWARD_ERRORS = [
    ({"cell": "lstmm"}, ValueError,
     r"cell: expected one of \[.*'lstm'.*\] or a fastrnn.cells.Cell, got 'lstmm'"),
    ({"w_ih": np.zeros((4 * H, I), np.int64)}, TypeError, r"w_ih: expected float32 or float64"),
    ({"w_ih": np.zeros((4 * H, I), np.float16)}, TypeError, r"w_ih: .*float16"),
    ({"x": np.zeros((T, B))}, ValueError, r"x: expected 3 dimensions \(T, B, I\), got shape"),
    ({"x": np.zeros((T, B, I), np.int32)}, TypeError, r"x: expected a floating-point array"),
    ({"h0": np.zeros((B, H + 1))}, ValueError, r"h0: expected shape \(3, 3\), got \(3, 4\)"),
    ({"h0": np.zeros((B, H), complex)}, TypeError, r"h0: expected a floating-point array"),
    ({"c0": np.zeros((B + 1, H))}, ValueError, r"c0: expected shape \(3, 3\), got \(4, 3\)"),
    ({"w_ih": np.zeros((4 * H, I + 1))}, ValueError, r"w_ih: expected shape \(12, 4\)"),
    ({"w_hh": np.zeros((3 * H, H))}, ValueError, r"w_hh: expected shape \(12, 3\)"),
    ({"b_ih": np.zeros(4 * H + 1)}, ValueError, r"b_ih: expected shape \(12,\)"),
    ({"b_hh": np.zeros((1, 4 * H))}, ValueError, r"b_hh: expected shape \(12,\)"),
    ({"lengths": [5, 2]}, ValueError, r"lengths: expected \(3,\) integers in \[0, 5\]"),
    ({"lengths": [5, 2, 6]}, ValueError, r"lengths: expected \(3,\) integers in \[0, 5\]"),
    ({"lengths": [5, -1, 2]}, ValueError, r"lengths: expected \(3,\) integers"),
    ({"lengths": [5.0, 2.0, 1.0]}, ValueError, r"lengths: expected \(3,\) integers.*float64"),
    ({"out": np.zeros((T, B, H), np.float32)}, ValueError,
     r"out: expected a writable float64 array of shape \(5, 3, 3\), got float32"),
    ({"out": np.zeros((T, B, H + 1))}, ValueError, r"out: expected .*got float64 \(5, 3, 4\)"),
    ({"out": [[0.0]]}, ValueError, r"out: expected .*got list"),
    ({"out": np.zeros((T, B, 2 * H))[..., ::2]}, ValueError, r"out: .*unit stride"),
    ({"h_n": np.zeros((B, H + 1))}, ValueError, r"h_n: expected .*\(3, 3\), got float64"),
    ({"c_n": np.zeros((B, H), np.float32)}, ValueError, r"c_n: expected .*got float32"),
    ({"backend": "numpy"}, ValueError, r"backend: expected 'auto' or one of"),
    ({"backend": 3}, TypeError, r"backend: expected a str, got int"),
]


@pytest.mark.parametrize("changes,error,message", FORWARD_ERRORS,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in
                              enumerate(FORWARD_ERRORS)])
def test_forward_refuses_bad_arguments(changes, error, message):
    args = _args()
    with pytest.raises(error, match=message):
        _forward(args, **{"backend": "reference", **changes})


def test_forward_refuses_read_only_outputs_and_a_missing_peephole():
    args = _args()
    read_only = np.zeros((B, H))
    read_only.flags.writeable = False
    with pytest.raises(ValueError, match="h_n: expected a writable array"):
        _forward(args, h_n=read_only, backend="reference")
    peephole_args = _args("lstm_peephole")
    with pytest.raises(ValueError, match=r"peephole: expected shape \(3, 3\)"):
        _forward(peephole_args, peephole=np.zeros((3, H + 1)), backend="reference")


def _cache(cell="lstm"):
    return _forward(_args(cell), train=True, backend="reference")[3]


BACKWARD_ERRORS = [
    ({"truncate": 0}, ValueError, r"truncate: expected None or an int >= 1, got 0"),
    ({"truncate": True}, ValueError, r"truncate: expected None or an int >= 1, got True"),
    ({"truncate": 2.0}, ValueError, r"truncate: .*got 2.0"),
    ({"dy": np.zeros((T, B, H + 1))}, ValueError,
     r"dy: expected a float array of shape \(5, 3, 3\), got float64 \(5, 3, 4\)"),
    ({"dy": np.zeros((T, B, H), np.int64)}, ValueError, r"dy: expected a float array.*int64"),
    ({"dh_n": np.zeros((B + 1, H))}, ValueError, r"dh_n: expected shape \(3, 3\), got \(4, 3\)"),
    ({"dc_n": np.zeros((B, H), np.int8)}, TypeError, r"dc_n: expected a floating-point array"),
    ({"grads": {"dw_hh": np.zeros((4 * H, H + 1))}}, ValueError,
     r"dw_hh: expected a writable float64 array of shape \(12, 3\), got float64 \(12, 4\)"),
    ({"grads": {"dx": np.zeros((T, B, I), np.float32)}}, ValueError, r"dx: expected .*float32"),
    ({"grads": {"dh0": np.zeros((B, 2 * H))[:, ::2]}}, ValueError, r"dh0: .*unit stride"),
]


@pytest.mark.parametrize("changes,error,message", BACKWARD_ERRORS,
                         ids=[f"{next(iter(c))}-{i}" for i, (c, _, _) in
                              enumerate(BACKWARD_ERRORS)])
def test_backward_refuses_bad_arguments(changes, error, message):
    with pytest.raises(error, match=message):
        functional.backward(_cache(), **changes)


def test_backward_refuses_what_is_not_its_cache():
    layer = make_layer("lstm", I, H)
    _, _, layer_cache = layer.forward(np.zeros((T, B, I)), train=True)
    for cache in (None, layer_cache):
        with pytest.raises(TypeError, match=r"cache: expected the cache of functional.forward"):
            functional.backward(cache)
    # and an inference call keeps none
    assert _forward(_args(), backend="reference")[3] is None



OPTIONS = {"lstm_peephole": {"clip": 1.0, "input_forget": True,
                             "activations": ("hardsigmoid", "softsign", ("scaledtanh", 1.5, 0.5))},
           "gru_reset_before": {"clip": 1.5, "activations": ("sigmoid", "softsign")},
           "gru": {"activations": (("hardsigmoid", 0.3, 0.4), "elu")},
           "rnn_tanh": {"activations": (("leakyrelu", 0.1),), "clip": 2.0}}


@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("cell", sorted(OPTIONS))
def test_a_cell_record_with_options(backend, cell, reverse):
    """A layer's cell record (ONNX's activations, clip, input_forget) as the cell argument."""
    dtype = np.float64
    layer = make_layer(cell, I, H, 1, bidirectional=True, dtype=dtype, seed=2, **OPTIONS[cell])
    for p in layer.params.values():
        p *= 2
    _, data = _problem(cell, dtype, seed=2)
    assert not layer.cell.plain
    got = _functional(layer.cell, layer, data, reverse, backend)
    expected = _expected(layer, data, reverse)
    assert_all_close(got, expected, dtype, f"{cell} with options reverse={reverse}")
    plain = _functional(cell, layer, data, reverse, backend)    # the options mattered
    assert max_rel_error(got["y"], plain["y"]) > 1e-3
