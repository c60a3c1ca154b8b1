"""fastrnn.quantize: bfloat16 and int8 weights for inference.

The oracle is the reference backend running the same arithmetic in NumPy
(fastrnn.quantized.QuantizedWeight.product): one step of the C kernels matches it to float32
rounding, on the CPU's instructions and on the plain loops; over many steps the two may round a
state to a neighbouring bfloat16 or int8 value where they differ in the last float32 bit, so
whole layers are held to the format's own step. int8's two instruction paths give the same
numbers to the bit. Against the float32 layer, the errors stay within the bounds the README
states."""
import copy
import pickle

import numpy as np
import pytest

import fastrnn
from fastrnn.cells import CELLS
from fastrnn.quantized import QuantizedWeight, round_to_bfloat16
from conftest import BACKENDS, make_layer, max_rel_error

FORMATS = ("bfloat16", "int8")
HAVE_CYTHON = "cython" in BACKENDS
needs_cython = pytest.mark.skipif(not HAVE_CYTHON, reason="the Cython extension is not built")
# the cell variants: the six cells, layer norm, ONNX's activations and clip, zoneout (its
# inference rule)
VARIANTS = [(cell, {}) for cell in sorted(CELLS)] + [
    ("lstm", {"layer_norm": True}), ("gru", {"layer_norm": True}),
    ("lstm", {"activations": ("hardsigmoid", "tanh", "tanh"), "clip": 2.0}),
    ("lstm", {"zoneout": (0.1, 0.3)}), ("gru", {"zoneout": 0.2})]
# one step of the C kernels against the NumPy arithmetic (float32 sums in another order)
STEP_TOL = 2e-5
# whole layers, compiled against reference: a state rounded to a neighbouring value
LAYER_TOL = {"bfloat16": 1e-2, "int8": 1e-2}
# against the float32 layer (README's bounds, H = 32, 8 steps; measured over 3 seeds: 3.9e-3
# and 8.4e-3 at most; layer norm, which scales each product to unit variance, 3.5e-2, 6.6e-2)
FLOAT32_TOL = {"bfloat16": 1e-2, "int8": 2e-2}
FLOAT32_TOL_NORM = {"bfloat16": 0.1, "int8": 0.15}


def _isa_paths():
    """The instruction paths to test: the plain loops always, and every faster one the CPU
    has for either format (AVX2 on every x86-64 CPU of the project, AVX-512 on some)."""
    if not HAVE_CYTHON:
        return []
    from fastrnn import _cy
    best = {_cy.quantized_path("bfloat16"), _cy.quantized_path("int8")}
    return [p for p in ("plain", "avx2", "avx512") if p == "plain" or p in best
            or (p == "avx2" and "avx512" in best)]


@pytest.fixture(params=_isa_paths())
def isa(request):
    from fastrnn import _cy
    old = _cy.set_quantized_path(request.param)
    yield request.param
    _cy.set_quantized_path(old)


def _layer(cell, I=11, H=32, L=1, seed=0, **options):
    return make_layer(cell, I, H, L, backend="cython" if HAVE_CYTHON else "reference",
                      dtype=np.float32, seed=seed, **options)


def _inputs(m, T, B, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, B, m.input_size)).astype(np.float32)
    rows = m.num_layers * m.num_directions
    parts = tuple((0.5 * rng.standard_normal((rows, B, m.hidden_size))).astype(np.float32)
                  for _ in m.cell.state_names)
    return x, parts if len(parts) == 2 else parts[0]


def _flat(y, state):
    return [y] + (list(state) if isinstance(state, tuple) else [state])


# -- the products ---------------------------------------------------------------------------

@needs_cython
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("B", [1, 3, 6, 40])      # bfloat16: vdpbf16ps up to 4 rows, else FMA
@pytest.mark.parametrize("cell,options", VARIANTS, ids=lambda v: str(v))
def test_one_step_matches_the_arithmetic(cell, options, B, fmt, isa):
    """T = 1 from a given state: the C kernels' products are the NumPy arithmetic's."""
    m = _layer(cell, **options)
    x, state = _inputs(m, 1, B)
    compiled = fastrnn.quantize(m, fmt)(x, state)
    oracle = fastrnn.quantize(m, fmt, backend="reference")(x, state)
    for a, e in zip(_flat(*compiled), _flat(*oracle)):
        assert max_rel_error(a, e) <= STEP_TOL


@needs_cython
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("B", [1, 5])
@pytest.mark.parametrize("cell,options", VARIANTS, ids=lambda v: str(v))
def test_layers_match_the_arithmetic(cell, options, B, fmt, isa):
    """Two layers, both directions, lengths with 0 and padding, 9 steps."""
    m = _layer(cell, L=2, bidirectional=True, **options)
    x, state = _inputs(m, 9, B)
    lengths = np.array([9, 0, 4, 9, 1][:B])
    compiled = fastrnn.quantize(m, fmt)(x, state, lengths)
    oracle = fastrnn.quantize(m, fmt, backend="reference")(x, state, lengths)
    for a, e in zip(_flat(*compiled), _flat(*oracle)):
        assert max_rel_error(a, e) <= LAYER_TOL[fmt]
    assert (compiled[0][4:, min(2, B - 1)] == 0).all() if B > 2 else True


@needs_cython
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("merge", ["sum", "ave"])
def test_merged_directions(merge, fmt):
    m = _layer("lstm", L=2, bidirectional=True, merge=merge)
    x, state = _inputs(m, 6, 3)
    compiled = fastrnn.quantize(m, fmt)(x, state)
    oracle = fastrnn.quantize(m, fmt, backend="reference")(x, state)
    assert compiled[0].shape == (6, 3, 32)
    for a, e in zip(_flat(*compiled), _flat(*oracle)):
        assert max_rel_error(a, e) <= LAYER_TOL[fmt]


@needs_cython
@pytest.mark.parametrize("path", [p for p in _isa_paths() if p != "plain"])
@pytest.mark.parametrize("B", [1, 3, 20])
@pytest.mark.parametrize("cell,options", VARIANTS, ids=lambda v: str(v))
def test_int8_paths_agree_to_the_bit(cell, options, B, path):
    """The integer sums are exact: AVX-512 VNNI, AVX2 and the plain loops give the same layer."""
    from fastrnn import _cy
    if path == "avx512" and _cy.quantized_path("int8") != "avx512":
        pytest.skip("this CPU has AVX-512 BF16 but not VNNI")
    m = _layer(cell, L=2, bidirectional=True, **options)
    q = fastrnn.quantize(m, "int8")
    x, state = _inputs(m, 7, B)
    outputs = {}
    for p in (path, "plain"):
        old = _cy.set_quantized_path(p)
        try:
            assert _cy.quantized_path("int8") == p
            outputs[p] = q(x, state)
        finally:
            _cy.set_quantized_path(old)
    for a, b in zip(_flat(*outputs[path]), _flat(*outputs["plain"])):
        np.testing.assert_array_equal(a, b)


@needs_cython
def test_instruction_paths():
    """Each format takes the best path the CPU has, at most the one set; names are checked."""
    from fastrnn import _cy
    order = ("plain", "avx2", "avx512")
    best = {fmt: _cy.quantized_path(fmt) for fmt in FORMATS}
    for cap in order:
        old = _cy.set_quantized_path(cap)
        try:
            for fmt in FORMATS:
                expected = min(order.index(best[fmt]), order.index(cap))
                assert _cy.quantized_path(fmt) == order[expected]
        finally:
            assert _cy.set_quantized_path(old) == cap
    with pytest.raises(ValueError, match="path: expected one of"):
        _cy.set_quantized_path("avx9")
    with pytest.raises(ValueError, match="format: expected 'bfloat16' or 'int8'"):
        _cy.quantized_path("float16")


@pytest.mark.parametrize("fmt", FORMATS)
def test_weight_storage(fmt):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((7, 70)).astype(np.float32)
    q = QuantizedWeight(w, fmt)
    assert q.shape == (7, 70) and q.data.shape == (7, 128)
    assert (q.data[:, 70:] == 0).all()
    back = q.dequantized()
    if fmt == "bfloat16":
        assert q.data.dtype == np.uint16 and q.nbytes == 7 * 128 * 2
        np.testing.assert_array_equal(back, round_to_bfloat16(w))
        assert np.abs(back - w).max() <= np.abs(w).max() * 2.0 ** -9
    else:
        assert q.data.dtype == np.int8 and q.nbytes == 7 * 128 + 7 * 4 + 7 * 4
        assert np.abs(q.data).max() == 127
        np.testing.assert_array_equal(q.row_sum, q.data.sum(axis=1))
        step = np.abs(w).max(axis=1, keepdims=True) / 127
        assert (np.abs(back - w) <= step / 2 * (1 + 1e-6)).all()
    # a row slice is the rows' own quantization
    np.testing.assert_array_equal(q[2:5].dequantized(), back[2:5])


def test_bfloat16_rounding():
    values = np.array([1.0, 1 + 2 ** -8, 1 + 3 * 2 ** -8, -2.5, 0.0, np.inf, np.nan,
                       3.4e38], np.float32)
    r = round_to_bfloat16(values)
    np.testing.assert_array_equal(r[:6], [1.0, 1.0, 1 + 4 * 2 ** -8, -2.5, 0.0, np.inf])
    assert np.isnan(r[6]) and r[7] == np.inf                  # ties to even; overflow to inf


# -- against float32 ------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell,options", VARIANTS, ids=lambda v: str(v))
def test_close_to_float32(cell, options, fmt):
    m = _layer(cell, L=2, **options)
    x, state = _inputs(m, 8, 3)
    y32, s32 = m(x, state)
    y, s = fastrnn.quantize(m, fmt)(x, state)
    tol = (FLOAT32_TOL_NORM if options.get("layer_norm") else FLOAT32_TOL)[fmt]
    for a, e in zip(_flat(y, s), _flat(y32, s32)):
        err = max_rel_error(a, e)
        assert err <= tol
        assert err > 0                      # the weights really are stored rounded


# -- the layer's behaviour ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", FORMATS)
def test_nan_in_nan_out(fmt):
    m = _layer("lstm", L=2)
    x, state = _inputs(m, 5, 3)
    x[2, 1, 4] = np.nan
    y, (h, c) = fastrnn.quantize(m, fmt)(x, state)
    assert np.isnan(y[2:, 1]).all() and np.isfinite(y[:, [0, 2]]).all()
    assert np.isnan(h[:, 1]).all() and np.isfinite(h[:, [0, 2]]).all()


@pytest.mark.parametrize("fmt", FORMATS)
def test_caller_arrays_and_layer_untouched(fmt):
    m = _layer("gru", L=2, bidirectional=True)
    before = {k: v.copy() for k, v in m.params.items()}
    x, state = _inputs(m, 6, 2)
    lengths = np.array([6, 3])
    x[5, 1] = np.nan                                   # padding: ignored
    kept = [x.copy(), state.copy(), lengths.copy()]
    for a in (x, state, lengths):
        a.flags.writeable = False
    q = fastrnn.quantize(m, fmt)
    y, _ = q(x, state, lengths)
    for a, b in zip((x, state, lengths), kept):
        np.testing.assert_array_equal(a, b)
    assert np.isfinite(y).all() and (y[3:, 1] == 0).all()
    for k, v in m.params.items():
        np.testing.assert_array_equal(v, before[k])
    m.params["weight_hh_l0"][...] = 0                  # the copy does not follow the layer
    np.testing.assert_array_equal(q(x, state, lengths)[0], y)


@pytest.mark.parametrize("fmt", FORMATS)
def test_batch_first_and_one_step_calls(fmt):
    m = _layer("lstm", batch_first=True)
    q = fastrnn.quantize(m, fmt)
    x = np.random.default_rng(2).standard_normal((2, 4, 11)).astype(np.float32)
    y, state = q(x)
    assert y.shape == (2, 4, 32)
    # step by step, carrying the state, gives the same as one call
    s, steps = None, []
    for t in range(4):
        y_t, s = q(np.ascontiguousarray(x[:, t:t + 1]), s)
        steps.append(y_t)
    np.testing.assert_allclose(np.concatenate(steps, axis=1), y, rtol=0, atol=1e-6)
    np.testing.assert_allclose(s[0], state[0], rtol=0, atol=1e-6)


@needs_cython
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_one_step_calls_take_the_compiled_path(cell, fmt, isa):
    """A one-step call goes through the backend's whole-call step (layer_call_step), with the
    quantized weights, and gives the general path's numbers (two layers, both directions)."""
    m = _layer(cell, L=2, bidirectional=True)
    q = fastrnn.quantize(m, fmt)
    x, state = _inputs(m, 1, 3)
    stepped = q._call_step(q._step_spec, q.params, q.batch_first, x, state)
    assert stepped is not None
    general = q.forward(x, state, train=False)[:2]
    oracle = fastrnn.quantize(m, fmt, backend="reference")(x, state)
    for a, g, e in zip(_flat(*stepped), _flat(*general), _flat(*oracle)):
        np.testing.assert_allclose(a, g, rtol=0, atol=1e-6)
        assert max_rel_error(a, e) <= LAYER_TOL[fmt]


@pytest.mark.parametrize("fmt", FORMATS)
def test_copies_and_pickles(fmt):
    q = fastrnn.quantize(_layer("gru"), fmt)
    x, state = _inputs(q, 4, 2)
    y = q(x, state)[0]
    for other in (copy.deepcopy(q), pickle.loads(pickle.dumps(q))):
        assert other.quantized == fmt
        np.testing.assert_array_equal(other(x, state)[0], y)
    assert f"quantized={fmt!r}" in repr(q)


def test_memory():
    m = _layer("lstm", I=128, H=128)
    sizes = {fmt: sum(p.nbytes for p in fastrnn.quantize(m, fmt).params.values())
             for fmt in FORMATS}
    full = sum(p.nbytes for p in m.params.values())
    assert sizes["bfloat16"] < 0.51 * full and sizes["int8"] < 0.28 * full


def test_refusals():
    m = _layer("lstm")
    q = fastrnn.quantize(m, "int8")
    x, _ = _inputs(m, 3, 2)
    with pytest.raises(ValueError, match="train: a quantized layer"):
        q.forward(x, train=True)
    with pytest.raises(ValueError, match="load_state_dict: this layer is quantized"):
        q.load_state_dict(m.state_dict())
    with pytest.raises(ValueError, match="already quantized"):
        fastrnn.quantize(q, "bfloat16")
    with pytest.raises(ValueError, match="weights: expected one of 'bfloat16', 'int8', "
                                         "got 'int4'"):
        fastrnn.quantize(m, "int4")
    with pytest.raises(TypeError, match="expected a float32 layer .* got float64"):
        fastrnn.quantize(make_layer("lstm", 3, 4), "int8")
    with pytest.raises(ValueError, match="proj_size"):
        fastrnn.quantize(fastrnn.LSTM(3, 4, proj_size=2, backend="reference"), "int8")
    with pytest.raises(ValueError, match="backend: expected 'cython', 'reference' or 'auto'"):
        fastrnn.quantize(m, "int8", backend="numba")
    with pytest.raises(TypeError, match="layer: expected a fastrnn RNN, LSTM or GRU, got dict"):
        fastrnn.quantize({}, "int8")
    with pytest.raises(ValueError, match="x: expected input_size 11"):
        q(np.zeros((2, 2, 5), np.float32))
    pytest.importorskip("onnx")
    from fastrnn import onnx as fastrnn_onnx
    with pytest.raises(ValueError, match="quantized='int8' .fastrnn.quantize. has no ONNX form"):
        fastrnn_onnx.export(q, "unused.onnx")
