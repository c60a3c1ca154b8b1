"""Guards at the layers' and ``fastrnn.functional``'s boundary: a training cache that does not
depend on arrays the caller may reuse, outputs that overlap inputs, caches given to another
layer, and arguments of the wrong kind (NumPy integers accepted as ints, bools refused where
they make no sense)."""
import copy

import numpy as np
import pytest

import fastrnn
from fastrnn import functional
from conftest import BACKENDS, assert_all_close, make_layer, random_state, run_layer

T, B, I, H = 4, 2, 3, 3


def _data(m, rng, lengths=True):
    """x, a state, lengths with padding, dy for layer ``m`` (time-major, m's dtype)."""
    x = rng.standard_normal((T, B, m.input_size)).astype(m.dtype)
    dy = rng.standard_normal((T, B, m.num_directions * m.hidden_size)).astype(m.dtype)
    return x, random_state(m, B, rng), (np.array([T, T - 1]) if lengths else None), dy


# --- the training cache keeps nothing of the caller's -----------------------------------------

@pytest.mark.parametrize("cell", ["lstm", "gru_reset_before"])
def test_layer_gradients_are_those_of_the_forward_whatever_the_caller_writes(backend, cell):
    """The caller reuses its input buffer, lengths array and state between forward and
    backward, and changes parameters in place: backward still gives the gradients of the
    forward that ran (the cache holds copies)."""
    rng = np.random.default_rng(1)
    m = make_layer(cell, I, H, 2, bidirectional=True, backend=backend)
    x, state, lengths, dy = _data(m, rng)
    expected = run_layer(m, x.copy(), state, lengths.copy(), dy=dy)
    before = {name: p.copy() for name, p in m.params.items()}

    y, final, cache = m.forward(x, state, lengths, train=True)
    x += 1.0                                      # the next batch, read into the same buffer
    lengths[:] = 1
    for part in state if isinstance(state, tuple) else (state,):
        part[...] = 7.0
    m.params["weight_hh_l0"][0, 0] = 5.0          # e.g. an optimizer step before backward
    m.params["weight_ih_l1_reverse"] += 1.0
    m.params["bias_hh_l1"][...] = 0.0
    m.params["weight_hh_l1"] = 2 * m.params["weight_hh_l1"]     # replaced by a usable array
    m.zero_grad()
    dx, dstate0 = m.backward(dy, cache)
    got = {"y": y, "dx": dx}
    got.update({f"state_n[{i}]": p for i, p in
                enumerate(final if isinstance(final, tuple) else (final,))})
    got.update({f"dstate0[{i}]": p for i, p in
                enumerate(dstate0 if isinstance(dstate0, tuple) else (dstate0,))})
    got.update({"grad " + name: g for name, g in m.grads.items()})
    assert_all_close(got, expected, m.dtype, f"{backend} {cell}")
    assert not np.array_equal(m.params["weight_hh_l0"], before["weight_hh_l0"])


def test_layer_batch_first_input_buffer_reused(backend):
    """batch_first with one batch row: the transposed view of x is C-contiguous, so the layer
    would keep the caller's array itself."""
    rng = np.random.default_rng(2)
    m = make_layer("lstm", I, H, backend=backend, batch_first=True)
    x = rng.standard_normal((1, T, I))
    dy = rng.standard_normal((1, T, H))
    expected = run_layer(m, x.copy(), dy=dy)
    _, _, cache = m.forward(x, train=True)
    x[...] = 0.0
    m.zero_grad()
    m.backward(dy, cache)
    assert_all_close(dict(m.grads), {k[5:]: v for k, v in expected.items()
                                     if k.startswith("grad ")}, m.dtype, backend)


def _functional_args(cell, rng, dtype=np.float64):
    G = {"lstm": 4, "lstm_peephole": 4, "gru": 3, "gru_reset_before": 3}.get(cell, 1)
    args = {"x": rng.standard_normal((T, B, I)), "h0": rng.standard_normal((B, H)),
            "c0": rng.standard_normal((B, H)) if cell.startswith("lstm") else None,
            "w_ih": rng.standard_normal((G * H, I)), "w_hh": rng.standard_normal((G * H, H)),
            "b_ih": rng.standard_normal(G * H), "b_hh": rng.standard_normal(G * H),
            "peephole": rng.standard_normal((3, H)) if cell == "lstm_peephole" else None}
    return {k: None if v is None else v.astype(dtype) for k, v in args.items()}


def _functional_run(cell, args, backend, change=None, **options):
    """forward(train=True), ``change(args)``, backward: every output and gradient."""
    y, h_n, c_n, cache = functional.forward(cell, *args.values(), train=True, backend=backend,
                                            **options)
    if change is not None:
        change(args)
    dy = np.linspace(-1, 1, y.size).reshape(y.shape)
    grads = functional.backward(cache, dy=dy, dh_n=np.ones_like(h_n))
    return {"y": y, "h_n": h_n, **grads}


def test_functional_gradients_are_those_of_the_forward_whatever_the_caller_writes(backend):
    rng = np.random.default_rng(3)
    args = _functional_args("lstm_peephole", rng)
    copies = {k: v.copy() for k, v in args.items()}
    lengths = np.array([T, T - 2])
    expected = _functional_run("lstm_peephole", copies, backend, lengths=lengths.copy())

    def overwrite(a):
        a["x"] += 1.0
        a["w_hh"][0, 0] = 5.0
        a["w_ih"] *= 2.0
        a["peephole"][...] = 0.0
        lengths[:] = 1
    got = _functional_run("lstm_peephole", args, backend, overwrite, lengths=lengths)
    assert_all_close(got, expected, np.float64, backend)


# --- functional: outputs that overlap inputs, grads keys --------------------------------------

_OUTPUT_SHAPES = {"out": (T, B, H), "h_n": (B, H), "c_n": (B, H)}


@pytest.mark.parametrize("output", ["out", "h_n", "c_n"])
@pytest.mark.parametrize("victim", ["x", "h0", "c0", "w_ih", "w_hh", "b_ih", "b_hh", "peephole"])
def test_functional_refuses_an_output_that_overlaps_an_input(backend, output, victim):
    rng = np.random.default_rng(4)
    args = _functional_args("lstm_peephole", rng)
    before = {k: v.copy() for k, v in args.items()}
    shape = _OUTPUT_SHAPES[output]
    size = int(np.prod(shape))
    flat = args[victim].reshape(-1)
    if flat.size < size:           # a bigger array whose tail is the input
        big = np.zeros(size + flat.size)
        big[size:] = flat
        args[victim] = big[size:].reshape(args[victim].shape)
        alias = big[flat.size:flat.size + size].reshape(shape)
    else:
        alias = flat[:size].reshape(shape)
    with pytest.raises(ValueError, match=rf"{output}: expected an array that overlaps no input "
                                         rf"or other output, got one that overlaps {victim}"):
        functional.forward("lstm_peephole", *args.values(), backend=backend, **{output: alias})
    for k, v in args.items():
        np.testing.assert_array_equal(v, before[k], err_msg=k)


def test_functional_refuses_outputs_that_overlap_each_other(backend):
    args = _functional_args("lstm", np.random.default_rng(5))
    state = np.zeros((B, H))
    with pytest.raises(ValueError, match="c_n: .*overlaps h_n"):
        functional.forward("lstm", *args.values(), h_n=state, c_n=state, backend=backend)
    wide = np.zeros((T + 1, B, H))
    with pytest.raises(ValueError, match="h_n: .*overlaps out"):
        functional.forward("lstm", *args.values(), out=wide[:T], h_n=wide[T - 1],
                           backend=backend)


def test_functional_accepts_outputs_beside_inputs_in_one_buffer(backend):
    """Interleaved but disjoint (x and out in one wider array): not an overlap."""
    args = _functional_args("gru", np.random.default_rng(6))
    expected = functional.forward("gru", *args.values(), backend=backend)[:2]
    wide = np.zeros((T, B, H + I))
    wide[..., H:] = args["x"]
    args["x"] = wide[..., H:]
    y, h_n, _, _ = functional.forward("gru", *args.values(), out=wide[..., :H],
                                      backend=backend)
    assert_all_close({"y": wide[..., :H], "h_n": h_n},
                     {"y": expected[0], "h_n": expected[1]}, np.float64, backend)
    assert np.shares_memory(y, wide)


def test_functional_refuses_unknown_and_overlapping_grads(backend):
    args = _functional_args("gru", np.random.default_rng(7))
    _, _, _, cache = functional.forward("gru", *args.values(), train=True, backend=backend)
    with pytest.raises(ValueError, match=r"grads: unexpected key\(s\) \['dW_hh'\] for cell "
                                         r"'gru'; expected some of \['dx', 'dh0', 'dw_ih'"):
        functional.backward(cache, grads={"dW_hh": np.zeros((3 * H, H))})
    with pytest.raises(ValueError, match=r"grads: unexpected key\(s\) \['dc0'\]"):
        functional.backward(cache, grads={"dc0": np.zeros((B, H))})
    same = np.zeros((3 * H,))
    with pytest.raises(ValueError, match=r"grads\['db_hh'\]: .*overlaps grads\['db_ih'\]"):
        functional.backward(cache, grads={"db_ih": same, "db_hh": same})
    with pytest.raises(TypeError, match="grads: expected a dict"):
        functional.backward(cache, grads=[np.zeros((T, B, I))])
    # the right keys still add into the caller's arrays
    dw_hh = np.ones((3 * H, H))
    got = functional.backward(cache, dh_n=np.ones((B, H)), grads={"dw_hh": dw_hh})
    assert got["dw_hh"] is dw_hh
    fresh = functional.backward(cache, dh_n=np.ones((B, H)))
    np.testing.assert_allclose(dw_hh, 1 + fresh["dw_hh"], rtol=1e-12)


# --- errors that help -------------------------------------------------------------------------

def _another_backend(backend):
    others = [b for b in BACKENDS if b != backend] or \
        [b for b in fastrnn.backends() if b != backend]
    return others[0] if others else None


@pytest.mark.parametrize("other,named", [
    ({"bidirectional": True}, "num_directions=1; this layer has num_directions=2"),
    ({"hidden": H + 1}, f"hidden_size={H}; this layer has hidden_size={H + 1}"),
    ({"cell": "gru"}, "cell='lstm'; this layer has cell='gru'"),
    ({"cell": "lstm_peephole"}, "cell='lstm'; this layer has cell='lstm_peephole'"),
    ({"num_layers": 2}, "num_layers=1; this layer has num_layers=2"),
    ({"dtype": np.float32}, "dtype='float64'; this layer has dtype='float32'"),
    ({"bias": False}, "bias=True; this layer has bias=False"),
    ({"backend": "other"}, "backend="),
], ids=["directions", "hidden", "cell", "peephole", "layers", "dtype", "bias", "backend"])
def test_a_cache_given_to_another_layer_is_named(backend, other, named):
    other = dict(other)
    if other.get("backend") == "other":
        other["backend"] = _another_backend(backend)
        if other["backend"] is None:
            pytest.skip("one backend only")
    cell = other.pop("cell", "lstm")
    hidden = other.pop("hidden", H)
    num_layers = other.pop("num_layers", 1)
    made = make_layer("lstm", I, H, backend=backend)
    _, _, cache = made.forward(np.ones((T, B, I)), train=True)
    taker = make_layer(cell, I, hidden, num_layers, **{"backend": backend, **other})
    with pytest.raises(ValueError, match=r"cache: made by forward of another layer, with "
                                         + named.replace("(", r"\(")):
        taker.backward(None, cache)
    # a layer like the one that made it takes it, a copy too, also one pickled by a version
    # that recorded no description
    state = copy.deepcopy(made).__getstate__()
    del state["_identity"]
    unpickled = object.__new__(type(made))
    unpickled.__setstate__(state)
    for twin in (make_layer("lstm", I, H, backend=backend), copy.deepcopy(made), unpickled):
        twin.backward(None, cache)


@pytest.mark.parametrize("huge", [2**63, 2**70, np.uint64(2**64 - 1)])
def test_truncate_beyond_int64_is_no_truncation(backend, huge):
    rng = np.random.default_rng(8)
    m = make_layer("gru", I, H, backend=backend)
    x, state, lengths, dy = _data(m, rng)
    expected = run_layer(m, x, state, lengths, dy=dy)
    got = run_layer(m, x, state, lengths, dy=dy, truncate=huge)
    assert_all_close(got, expected, m.dtype, backend)
    args = _functional_args("gru", rng)
    _, _, _, cache = functional.forward("gru", *args.values(), train=True, backend=backend)
    expected = functional.backward(cache, dy=np.ones((T, B, H)))
    got = functional.backward(cache, dy=np.ones((T, B, H)), truncate=huge)
    assert_all_close(got, expected, np.float64, backend)


def test_a_state_with_a_missing_part_is_named(backend):
    m = make_layer("lstm", I, H, backend=backend)
    h = np.zeros((1, B, H))
    for steps in (T, 1):
        x = np.zeros((steps, B, I))
        with pytest.raises(TypeError, match=r"state: expected a tuple \(h0, c0\) of arrays of "
                                            r"shape \(1, 2, 3\), got c0 None \(state=None"):
            m(x, (h, None))
        with pytest.raises(TypeError, match=r"got h0 None"):
            m.forward(x, (None, h))


@pytest.mark.parametrize("bad,message", [
    ({"w_hh": np.zeros(4 * H)}, r"w_hh: expected 2 dimensions \(4\*H, H\), got shape \(12,\)"),
    ({"w_hh": np.zeros((2, 4 * H, H))}, r"w_hh: expected 2 dimensions"),
    ({"w_ih": np.zeros(4 * H * I)}, r"w_ih: expected shape \(12, 3\), got \(36,\)"),
    ({"peephole": np.zeros(3 * H)}, r"peephole: expected shape \(3, 3\), got \(9,\)"),
    ({"b_ih": np.zeros((4 * H, 1))}, r"b_ih: expected shape \(12,\), got \(12, 1\)"),
])
def test_functional_names_a_weight_of_the_wrong_dimensions(backend, bad, message):
    args = {**_functional_args("lstm_peephole", np.random.default_rng(9)), **bad}
    with pytest.raises(ValueError, match=message):
        functional.forward("lstm_peephole", *args.values(), backend=backend)


def test_numpy_integers_are_ints(backend):
    rng = np.random.default_rng(10)
    plain = fastrnn.LSTM(I, H, 2, backend=backend, dtype=np.float64, seed=5)
    numpy_ints = fastrnn.LSTM(np.int64(I), np.int32(H), np.uint8(2), backend=backend,
                              dtype=np.float64, seed=np.int64(5))
    for name, p in plain.params.items():
        np.testing.assert_array_equal(numpy_ints.params[name], p)
    x, state, _, dy = _data(plain, rng)
    lengths = [np.int64(T), np.int32(T - 1)]
    expected = run_layer(plain, x, state, [T, T - 1], dy=dy, truncate=2)
    got = run_layer(numpy_ints, x, state, lengths, dy=dy, truncate=np.int16(2))
    assert_all_close(got, expected, np.float64, backend)
    args = _functional_args("lstm", rng)
    _, _, _, cache = functional.forward("lstm", *args.values(), train=True,
                                        lengths=np.array(lengths), backend=backend)
    dy = np.ones((T, B, H))
    expected = functional.backward(cache, dy=dy, truncate=2)
    got = functional.backward(cache, dy=dy, truncate=np.int64(2))
    assert_all_close(got, expected, np.float64, backend)


@pytest.mark.parametrize("options,error,message", [
    ({"hidden_size": True}, TypeError, "hidden_size: expected an int >= 1, got bool True"),
    ({"num_layers": np.True_}, TypeError, "num_layers: expected an int >= 1, got bool"),
    ({"seed": True}, TypeError, "seed: expected None or an int >= 0, got bool True"),
    ({"seed": -1}, ValueError, r"seed: expected None or an int >= 0 .*got int -1"),
    ({"seed": 1.5}, TypeError, r"seed: expected None or an int >= 0 .*got float 1.5"),
    ({"bidirectional": "no"}, TypeError, "bidirectional: expected True or False, got str 'no'"),
    ({"batch_first": None}, TypeError, "batch_first: expected True or False, got NoneType"),
    ({"bias": 2}, TypeError, "bias: expected True or False, got int 2"),
    ({"peephole": "yes"}, TypeError, "peephole: expected True or False"),
])
def test_constructor_refuses_nonsense(backend, options, error, message):
    options = {"hidden_size": H, **options}
    hidden = options.pop("hidden_size")
    with pytest.raises(error, match=message):
        fastrnn.LSTM(I, hidden, backend=backend, **options)


def test_flags_take_numpy_bools_and_zero_or_one(backend):
    m = fastrnn.GRU(I, H, bidirectional=np.True_, batch_first=0, bias=1, reset_after=np.False_,
                    backend=backend)
    assert (m.bidirectional, m.batch_first, m.bias, m.reset_after) == (True, False, True, False)
    with pytest.raises(TypeError, match="reset_after: expected True or False"):
        fastrnn.GRU(I, H, reset_after="False", backend=backend)


def test_calls_refuse_bools_where_they_are_nonsense(backend):
    m = make_layer("lstm", I, H, backend=backend)
    x = np.zeros((T, B, I))
    with pytest.raises(TypeError, match="train: expected True or False, got str 'no'"):
        m.forward(x, train="no")
    _, _, cache = m.forward(x, train=True)
    with pytest.raises(TypeError, match="truncate: expected an int >= 1, got bool True"):
        m.backward(None, cache, truncate=True)
    with pytest.raises(TypeError, match="lengths: expected integers, got dtype bool"):
        m(x, lengths=[True, True])
    args = _functional_args("lstm", np.random.default_rng(11))
    for flag in ("reverse", "train"):
        with pytest.raises(TypeError, match=rf"{flag}: expected True or False, got str"):
            functional.forward("lstm", *args.values(), backend=backend, **{flag: "yes"})
    _, _, _, cache = functional.forward("lstm", *args.values(), train=True, backend=backend)
    with pytest.raises(ValueError, match="truncate: expected None or an int >= 1, got True"):
        functional.backward(cache, truncate=True)
