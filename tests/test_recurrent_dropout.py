"""Recurrent dropout (``recurrent_dropout=p``, Keras's): with ``forward(..., train=True)`` each
layer and direction draws from ``m.rng`` one mask per gate block, (G, B, H), 0 or 1/(1-p), kept
for every time step; gate block g's recurrent product is of ``h * mask[g]`` (reset-before GRU:
the candidate's is of ``r * (h * mask[2])``); the carried state is not masked; inference uses
no masks.

Oracles:
  * Keras 3 itself (PyTorch backend) with its masks forced to fastrnn's, mapped to Keras's gate
    order (LSTM i, f, c, o = ours; GRU z, r, h = our blocks 1, 0, 2): outputs, final states and,
    through torch autograd, every gradient (float32, 1e-4);
  * central differences in float64 on the reference, the masks replayed by reseeding ``m.rng``;
  * masks that are the same for every batch row equal a layer without masks whose ``weight_hh``
    block g has its columns scaled by the mask (h * m) W^T = h (W diag m)^T, on every backend;
  * every backend against the reference, the same masks by seeding both layers' rng alike.
"""
import copy
import os
from contextlib import nullcontext
import pickle
import zlib

import numpy as np
import pytest

import fastrnn
from conftest import (CELL_OPTIONS, COMPILED_BACKENDS, TOLERANCE, assert_all_close,
                      central_difference, make_layer, max_rel_error, packing, random_state,
                      result_dict, small_batch_max, state_parts)
from fastrnn.cells import CELLS
from fastrnn.convert import from_keras
from fastrnn.dispatch import get_backend

P = 0.4
GATES = {"RNN": 1, "LSTM": 4, "GRU": 3}
DTYPES = [np.float32, np.float64]
DTYPE_IDS = ["f32", "f64"]


def _rng(*key):
    return np.random.default_rng(zlib.crc32(repr(key).encode()))


def _train(m, seed, x, state=None, lengths=None, dy=None, dstate=None, truncate=None):
    """Forward with the cache (masks drawn from a generator seeded with ``seed``) and backward:
    every output and gradient in a flat dict, and the layer's cache."""
    m.rng = np.random.default_rng(seed)
    y, final, cache = m.forward(x, state, lengths, train=True)
    m.zero_grad()
    dx, dstate0 = m.backward(dy, cache, dstate, truncate=truncate)
    return result_dict(y, dx, final, dstate0, m.grads), cache


def _assert_masks_drop_and_keep(cache):
    """Each layer and direction's masks have dropped units and kept ones: they act."""
    for k, mask in enumerate(cache.recurrent_masks):
        assert mask is not None, k
        assert (mask == 0).any() and (mask != 0).any(), f"mask {k} is all {mask.flat[0]}"


# ---------------------------------------------------------------------------------------------
# 1. Keras 3 itself, its recurrent dropout masks forced to fastrnn's

@pytest.fixture(scope="module")
def keras():
    os.environ.setdefault("KERAS_BACKEND", "torch")
    keras = pytest.importorskip("keras")
    if not keras.__version__.startswith("3."):
        pytest.skip(f"Keras 3 needed, found {keras.__version__}")
    if keras.backend.backend() != "torch":
        pytest.skip(f"Keras on torch needed (gradients by torch autograd), found "
                    f"{keras.backend.backend()}")
    pytest.importorskip("torch")
    return keras


# Keras's mask k is for Keras's gate block k; KERAS_MASK_ORDER[kind][k] is that block in
# fastrnn's order (LSTM: i, f, c, o = i, f, g, o; GRU: z, r, h = our 1, 0, 2)
KERAS_MASK_ORDER = {"LSTM": [0, 1, 2, 3], "GRU": [1, 0, 2], "SimpleRNN": [0]}

KERAS_CASES = {
    "lstm": ("LSTM", {}),
    "lstm-no-bias": ("LSTM", {"use_bias": False}),
    "lstm-relu-hard-sigmoid": ("LSTM", {"activation": "relu",
                                        "recurrent_activation": "hard_sigmoid"}),
    "gru-reset-after": ("GRU", {"reset_after": True}),
    "gru-reset-before": ("GRU", {"reset_after": False}),
    "simple-rnn-tanh": ("SimpleRNN", {}),
    "simple-rnn-relu": ("SimpleRNN", {"activation": "relu"}),
    "bidirectional-lstm": ("Bidirectional", ("LSTM", {})),
    "bidirectional-gru-reset-before": ("Bidirectional", ("GRU", {"reset_after": False})),
}


def _keras_layer(keras, case, units, p):
    kind, config = KERAS_CASES[case]
    if kind == "Bidirectional":
        inner_kind, inner = config
        return inner_kind, keras.layers.Bidirectional(getattr(keras.layers, inner_kind)(
            units, recurrent_dropout=p, return_sequences=True, return_state=True, **inner))
    return kind, getattr(keras.layers, kind)(units, recurrent_dropout=p, return_sequences=True,
                                             return_state=True, **config)


def _keras_train(keras, layer, cells_masks, x, states0, dy, dstates):
    """Keras's training forward with each cell's recurrent dropout masks forced (one list per
    cell, in Keras's order), and torch autograd of <y, dy> + <states, dstates>: outputs, states
    and the gradients of x, the initial states and the weights (layer.trainable_weights)."""
    import torch
    cells = ([layer.forward_layer.cell, layer.backward_layer.cell]
             if hasattr(layer, "forward_layer") else [layer.cell])
    assert len(cells) == len(cells_masks)
    for cell, masks in zip(cells, cells_masks):
        tensors = [keras.ops.convert_to_tensor(m) for m in masks]
        forced = tensors if len(tensors) > 1 else tensors[0]   # SimpleRNN: one mask
        cell.get_recurrent_dropout_mask = lambda step_input, forced=forced: forced
    xt = torch.tensor(x, requires_grad=True)
    init = [torch.tensor(s, requires_grad=True) for s in states0]
    for v in layer.trainable_weights:
        v.value.grad = None
    y, *states = layer(xt, initial_state=init, training=True)
    loss = (y * torch.tensor(dy)).sum()
    for s, d in zip(states, dstates):
        loss = loss + (s * torch.tensor(d)).sum()
    loss.backward()
    numpy = [t.detach().numpy() for t in (y, *states)]
    return (numpy[0], numpy[1:], xt.grad.numpy(), [s.grad.numpy() for s in init],
            [v.value.grad.numpy() for v in layer.trainable_weights])


@pytest.mark.float32_kernels
@pytest.mark.parametrize("case", list(KERAS_CASES))
def test_training_forward_and_gradients_equal_keras(keras, backend, case):
    rng = _rng("keras", case)
    B, T, I, U = 3, 6, 4, 5
    kind, layer = _keras_layer(keras, case, U, P)
    layer.build((B, T, I))
    layer.set_weights([rng.uniform(-0.8, 0.8, w.shape).astype(np.float32)
                       for w in layer.get_weights()])
    x = rng.standard_normal((B, T, I)).astype(np.float32)

    m = from_keras(layer, backend=backend)          # carries Keras's recurrent_dropout
    assert m.recurrent_dropout == P
    # inference: no masks on either side
    y_keras_inference = keras.ops.convert_to_numpy(layer(x, training=False)[0])
    assert max_rel_error(m(x)[0], y_keras_inference) <= 1e-4

    D, G = m.num_directions, GATES[m.mode]
    state = random_state(m, B, rng)
    dstate = random_state(m, B, rng)
    dy = rng.standard_normal((B, T, D * U)).astype(np.float32)
    ours, cache = _train(m, 5, x, state, dy=dy, dstate=dstate)
    _assert_masks_drop_and_keep(cache)
    masks = cache.recurrent_masks                        # per direction (G, B, U), our order
    assert [mk.shape for mk in masks] == [(G, B, U)] * D
    order = KERAS_MASK_ORDER[kind]

    # Keras's states: h (and c) of the forward layer, then of the backward one
    parts = state_parts(state)
    states0 = [p[d] for d in range(D) for p in parts]
    dstates = [p[d] for d in range(D) for p in state_parts(dstate)]
    y_k, states_k, dx_k, dstates0_k, dweights_k = _keras_train(
        keras, layer, [[mk[j] for j in order] for mk in masks], x, states0, dy, dstates)

    assert max_rel_error(ours["y"], y_k) <= 1e-4
    final = [ours[f"state_n[{i}]"] for i in range(len(parts))]
    assert max_rel_error(np.stack([f[d] for d in range(D) for f in final]),
                         np.stack(states_k)) <= 1e-4
    assert max_rel_error(ours["dx"], dx_k) <= 1e-4
    d0 = [ours[f"dstate0[{i}]"] for i in range(len(parts))]
    assert max_rel_error(np.stack([g[d] for d in range(D) for g in d0]),
                         np.stack(dstates0_k)) <= 1e-4
    # Keras's weight gradients in our layout: from_keras maps weights linearly
    grads_k = from_keras(type(layer).__name__, dweights_k, layer.get_config(),
                         backend="reference").params
    inner = layer.forward_layer if hasattr(layer, "forward_layer") else layer
    single_bias = kind != "GRU" or not inner.get_config()["reset_after"]
    for name in m.grads:
        want = grads_k[name]
        if name.startswith("bias_hh") and single_bias:
            # Keras has one bias, on the input side; ours on the hidden side is added to the
            # same pre-activation (after the mask, which acts on h only): the same gradient
            want = grads_k[name.replace("bias_hh", "bias_ih")]
        assert max_rel_error(ours["grad " + name], want) <= 1e-4, name

    # the masks act on Keras's side too, each on its own gate block: Keras with the masks in
    # another order (rolled by one block; SimpleRNN: none) gives other outputs
    if G > 1:
        rolled = [[mk[j] for j in np.roll(order, 1)] for mk in masks]
        y_rolled = _keras_train(keras, layer, rolled, x, states0, dy, dstates)[0]
        assert max_rel_error(y_rolled, y_k) > 1e-3
    y_unmasked = m.forward(x, state, train=False)[0]
    assert max_rel_error(y_unmasked, y_k) > 1e-3


# ---------------------------------------------------------------------------------------------
# 2. Central differences of the reference, float64, the masks replayed

EPS = 1e-6
TOL = 1e-7


def _gradcheck(m, x, state, lengths, dy, dstate, seed):
    ours, cache = _train(m, seed, x, state, lengths, dy, dstate)

    def loss():
        m.rng = np.random.default_rng(seed)              # the same masks every time
        y, final, _ = m.forward(x, state, lengths, train=True)
        return float((y * dy).sum() + sum((f * d).sum() for f, d in
                                          zip(state_parts(final), state_parts(dstate))))

    pairs = [("x", x, ours["dx"])]
    pairs += [(f"state[{i}]", s, ours[f"dstate0[{i}]"])
              for i, s in enumerate(state_parts(state))]
    pairs += [(name, m.params[name], ours["grad " + name]) for name in m.params]
    for name, arr, analytic in pairs:
        numeric = central_difference(loss, arr, EPS)
        err = np.abs(numeric - analytic).max() / max(1.0, np.abs(numeric).max())
        assert err < TOL, f"{name}: central differences differ by {err:.3g}"
    return cache


@pytest.mark.parametrize("variant", ["one-layer", "bidirectional+lengths", "two-layers+dropout"])
@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_reference_gradients_match_central_differences(cell, variant):
    rng = _rng("gradcheck", cell, variant)
    T, B, I, H = 4, 3, 3, 2
    options = {"one-layer": dict(num_layers=1),
               "bidirectional+lengths": dict(num_layers=1, bidirectional=True),
               "two-layers+dropout": dict(num_layers=2, bidirectional=True, dropout=0.3)}[variant]
    m = make_layer(cell, I, H, seed=3, recurrent_dropout=P, **options)
    for p in m.params.values():                          # gates away from saturation
        p *= 2.0
    x = rng.standard_normal((T, B, I))
    state = random_state(m, B, rng)
    dstate = random_state(m, B, rng)
    dy = rng.standard_normal((T, B, m.num_directions * H))
    lengths = None if variant == "one-layer" else np.array([4, 2, 0])
    cache = _gradcheck(m, x, state, lengths, dy, dstate, seed=11)
    _assert_masks_drop_and_keep(cache)


# ---------------------------------------------------------------------------------------------
# 3. Every backend against the reference, the same masks

# (num_layers, bidirectional, B, lengths, layer options, truncate)
PARITY = {
    "lengths": (1, False, 3, True, {}, None),
    "bidirectional-2-layers+dropout": (2, True, 3, True, {"dropout": 0.3}, None),
    "truncate-2": (1, True, 3, True, {}, 2),
    "batch-1": (2, True, 1, False, {}, None),
    "batch-20+dropout": (2, True, 20, True, {"dropout": 0.25}, 2),
    "batch_first": (1, True, 3, True, {"batch_first": True}, None),
}


def _parity_call(m, rng, B, with_lengths, T=5):
    D, H = m.num_directions, m.hidden_size
    x = rng.standard_normal((B, T, m.input_size) if m.batch_first else (T, B, m.input_size))
    dy = rng.standard_normal(x.shape[:2] + (D * H,))
    lengths = None
    if with_lengths:
        lengths = rng.integers(1, T + 1, size=B)
        lengths[0], lengths[1], lengths[-1] = T, T - 2, 0   # one whole, one shorter, one empty
    return dict(x=x.astype(m.dtype), dy=dy.astype(m.dtype), lengths=lengths,
                state=random_state(m, B, rng), dstate=random_state(m, B, rng))


def _parity(backend, cell, dtype, num_layers, bidirectional, B, with_lengths, options,
            truncate, key, context=None, I=3, H=5):
    rng = _rng("parity", key, cell, np.dtype(dtype).name)
    layers = {name: make_layer(cell, I, H, num_layers, backend=name, dtype=dtype, seed=7,
                               bidirectional=bidirectional, recurrent_dropout=P, **options)
              for name in ("reference", backend)}
    call = _parity_call(layers["reference"], rng, B, with_lengths)
    results, caches = {}, {}
    for name, m in layers.items():
        with context(name) if context is not None and name != "reference" else nullcontext():
            results[name], caches[name] = _train(m, 9, truncate=truncate, **call)
    # the case exercises the masks: drawn, some units dropped, and the result changed by them
    _assert_masks_drop_and_keep(caches["reference"])
    for a, b in zip(caches[backend].recurrent_masks, caches["reference"].recurrent_masks):
        np.testing.assert_array_equal(a, b)
    plain = make_layer(cell, I, H, num_layers, dtype=dtype, seed=7, bidirectional=bidirectional,
                       **options)
    unmasked, _ = _train(plain, 9, truncate=truncate, **call)
    assert max_rel_error(unmasked["y"], results["reference"]["y"]) > 1e-3
    for name, g in results["reference"].items():
        if name.startswith("grad weight_hh"):
            assert np.abs(g).max() > 0, name
    return assert_all_close(results[backend], results["reference"], dtype, f"{backend} {key}")


@pytest.mark.parametrize("case", list(PARITY))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_backend_matches_reference(backend, cell, dtype, case):
    num_layers, bidirectional, B, with_lengths, options, truncate = PARITY[case]
    _parity(backend, cell, dtype, num_layers, bidirectional, B, with_lengths, options, truncate,
            case)


# cells with ONNX's options: clip, input_forget, activations other than the usual ones
OPTION_CELLS = {
    "lstm-clip-input_forget": ("lstm", {"clip": 2.0, "input_forget": True}),
    "lstm_peephole-clip": ("lstm_peephole", {"clip": 1.5}),
    "gru-activations-clip": ("gru", {"activations": ("hardsigmoid", "softsign"), "clip": 2.0}),
    "gru_reset_before-activations": ("gru_reset_before",
                                     {"activations": (("leakyrelu", 0.1), "tanh")}),
    "rnn-activations": ("rnn_tanh", {"activations": ("softsign",)}),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("case", list(OPTION_CELLS))
def test_backend_matches_reference_with_cell_options(backend, case, dtype):
    cell, options = OPTION_CELLS[case]
    m = make_layer(cell, 3, 5, backend=backend, dtype=dtype, **options)
    assert not m.cell.plain
    _parity(backend, cell, dtype, 2, True, 4, True, {"dropout": 0.2, **options}, 2, case)


# the compiled backends' forward paths (tests/test_small_batch.py): small_batch_max forced to 0
# and above every B (the unit-split loop: training calls with masks must not lose them there),
# packed weights on and off, the packed GEMM loop pooled or serial
PATHS = {"gemm": (0, False, True), "gemm-packed": (0, True, True),
         "gemm-packed-serial": (0, True, False),
         "unit-split": (10**6, False, True), "unit-split-packed": (10**6, True, True)}


def _path(path):
    limit, packed, pool = PATHS[path]

    class Context:
        def __init__(self, name):
            self.name = name
            self.stack = []

        def __enter__(self):
            kernels = get_backend(self.name)
            if not pool and not hasattr(kernels, "_set_pool"):
                pytest.skip(f"{self.name} has no separate serial packed path")
            if hasattr(kernels, "_set_pool"):
                old = kernels._set_pool(pool)
                self.stack.append(lambda: kernels._set_pool(old))
            for ctx in (small_batch_max(self.name, limit), packing(self.name, packed)):
                ctx.__enter__()
                self.stack.append(lambda ctx=ctx: ctx.__exit__(None, None, None))
            return self

        def __exit__(self, *exc):
            while self.stack:
                self.stack.pop()()
            return False
    return Context


@pytest.mark.parametrize("path", list(PATHS))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cell", sorted(CELLS))
@pytest.mark.parametrize("backend_name", COMPILED_BACKENDS)
def test_every_forward_path_matches_reference(backend_name, cell, dtype, path):
    # units enough to be split over threads, with ragged ends (tests/test_small_batch.py)
    _parity(backend_name, cell, dtype, 1, True, 5, True, {}, None, f"path {path}",
            context=_path(path), I=7, H=19)


# ---------------------------------------------------------------------------------------------
# 4. Semantics

class _Draws:
    """A stand-in for m.rng whose random() hands out the given arrays in turn, checking the
    shape asked for."""

    def __init__(self, arrays):
        self.arrays = list(arrays)

    def random(self, shape):
        a = self.arrays.pop(0)
        assert a.shape == tuple(shape), (a.shape, shape)
        return a


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_batch_uniform_masks_equal_column_scaled_recurrent_weights(backend, cell, dtype):
    """Masks the same for every batch row: (h * m_g) W_g^T = h (W_g diag m_g)^T, so the layer
    equals one without recurrent dropout whose weight_hh block g has its columns scaled by m_g
    (reset-before GRU's candidate: W_n (r * h * m) = (W_n diag m)(r * h)); weight_hh's gradient
    is the unmasked one times m_g by column, every other result the same."""
    rng = _rng("columns", cell, np.dtype(dtype).name)
    T, B, I, H, L = 5, 4, 3, 6, 2
    p = 0.5                                              # masks 0 or 2
    m = make_layer(cell, I, H, L, backend=backend, dtype=dtype, seed=2, bidirectional=True,
                   recurrent_dropout=p)
    plain = make_layer(cell, I, H, L, backend=backend, dtype=dtype, seed=2, bidirectional=True)
    G, D = m.cell.num_gates, m.num_directions
    draws, scales = [], {}
    for layer in range(L):
        for direction in range(D):
            u = rng.random((G, 1, H))
            u[:, 0, 0], u[:, 0, 1] = 0.1, 0.9              # one unit dropped, one kept per block
            draws.append(np.broadcast_to(u, (G, B, H)).copy())
            suffix = f"_l{layer}" + ("_reverse" if direction else "")
            scales[suffix] = np.where(u[:, 0] >= p, 1 / (1 - p), 0.0)    # (G, H)
            w = plain.params["weight_hh" + suffix]
            for g in range(G):
                w[g * H:(g + 1) * H] *= scales[suffix][g][None, :].astype(dtype)
    x = rng.standard_normal((T, B, I)).astype(dtype)
    dy = rng.standard_normal((T, B, D * H)).astype(dtype)
    lengths = np.array([5, 3, 5, 1])
    state, dstate = random_state(m, B, rng), random_state(m, B, rng)

    m.rng = _Draws(draws)
    y, final, cache = m.forward(x, state, lengths, train=True)
    assert not m.rng.arrays
    m.zero_grad()
    dx, dstate0 = m.backward(dy, cache, dstate)
    got = result_dict(y, dx, final, dstate0, m.grads)
    want, _ = _train(plain, 0, x, state, lengths, dy, dstate)
    for suffix, s in scales.items():
        g = want["grad weight_hh" + suffix]
        for k in range(G):
            g[k * H:(k + 1) * H] *= s[k][None, :].astype(dtype)
    assert_all_close(got, want, dtype, f"{backend} {cell}")
    # and the scaling mattered
    unscaled = make_layer(cell, I, H, L, dtype=dtype, seed=2, bidirectional=True)
    assert max_rel_error(unscaled.forward(x, state, lengths, train=False)[0], y) > 1e-3


@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_rows_with_lengths_equal_each_row_alone(backend, cell):
    """Row b of a padded batch (lengths) is row b alone, on its own steps, with its rows of the
    masks (mask[:, b]): the masks follow the batch row, whichever rows a step still runs. Short
    and empty rows come before longer ones, so that a step's k-th running row is not row k."""
    rng = _rng("rows", cell)
    T, I, H, L = 5, 3, 4, 2
    lengths = np.array([2, 5, 0, 4, 1])
    B = lengths.size
    dtype = np.float64
    m = make_layer(cell, I, H, L, backend=backend, dtype=dtype, seed=6, bidirectional=True,
                   recurrent_dropout=P)
    G, D = m.cell.num_gates, m.num_directions
    draws = [rng.random((G, B, H)) for _ in range(L * D)]     # what m.rng.random gives
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, D * H))
    state, dstate = random_state(m, B, rng), random_state(m, B, rng)
    m.rng = _Draws(draws)
    y, final, cache = m.forward(x, state, lengths, train=True)
    _assert_masks_drop_and_keep(cache)
    m.zero_grad()
    dx, dstate0 = m.backward(dy, cache, dstate)
    batch = result_dict(y, dx, final, dstate0, m.grads)
    grads_sum = {name: np.zeros_like(g) for name, g in m.grads.items()}
    for b, n in enumerate(lengths):
        rows = slice(b, b + 1)
        if n == 0:          # nothing runs: zero outputs, the state passes through
            np.testing.assert_array_equal(batch["y"][:, b], 0)
            np.testing.assert_array_equal(batch["dx"][:, b], 0)
            for i, s in enumerate(state_parts(state)):
                np.testing.assert_array_equal(batch[f"state_n[{i}]"][:, b], s[:, b])
            continue
        m.rng = _Draws([d[:, rows] for d in draws])
        sub_state = tuple(s[:, rows] for s in state_parts(state))
        sub_dstate = tuple(s[:, rows] for s in state_parts(dstate))
        if not m.cell.has_cell_state:
            sub_state, sub_dstate = sub_state[0], sub_dstate[0]
        y_b, final_b, cache_b = m.forward(x[:n, rows], sub_state, train=True)
        m.zero_grad()
        dx_b, dstate0_b = m.backward(dy[:n, rows], cache_b, sub_dstate)
        alone = result_dict(y_b, dx_b, final_b, dstate0_b, m.grads)
        tol = TOLERANCE[np.dtype(dtype)]
        for key in ("y", "dx"):
            assert max_rel_error(batch[key][:n, rows], alone[key]) <= tol, (b, key)
            np.testing.assert_array_equal(batch[key][n:, b], 0)
        for key in alone:
            if key.startswith(("state_n", "dstate0")):
                assert max_rel_error(batch[key][:, rows], alone[key]) <= tol, (b, key)
        for name in grads_sum:
            grads_sum[name] += alone["grad " + name]
    for name, g in grads_sum.items():
        assert max_rel_error(batch["grad " + name], g) <= TOLERANCE[np.dtype(dtype)], name


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
def test_masks_in_the_cache(cls, dtype):
    B, H, L = 3, 4, 2
    m = cls(2, H, L, bidirectional=True, recurrent_dropout=0.3, dtype=dtype,
            backend="reference", seed=1)
    G = GATES[m.mode]
    x = np.random.default_rng(0).standard_normal((5, B, 2))
    _, _, cache = m.forward(x, train=True)
    masks = cache.recurrent_masks
    assert len(masks) == L * 2                           # per layer and direction
    for mask in masks:
        assert isinstance(mask, np.ndarray) and mask.shape == (G, B, H)
        assert mask.dtype == np.dtype(dtype)
        np.testing.assert_array_equal(np.unique(mask),
                                      np.array([0, 1 / (1 - 0.3)], dtype=dtype))
    # every layer, direction and gate block a draw of its own
    blocks = [mask[g] for mask in masks for g in range(G)]
    for i in range(len(blocks)):
        for j in range(i):
            assert not np.array_equal(blocks[i], blocks[j]), (i, j)
    assert m.forward(x, train=False)[2] is None          # inference: no cache, no masks


@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
def test_drop_fraction_near_p(cls):
    p, B, H = 0.3, 400, 64
    m = cls(2, H, recurrent_dropout=p, backend="reference", seed=2)
    _, _, cache = m.forward(np.zeros((1, B, 2), np.float32), train=True)
    (mask,) = cache.recurrent_masks
    assert mask.size == GATES[m.mode] * B * H   # >= 25600: the fraction's std. dev. < 0.003
    assert abs((mask == 0).mean() - p) < 0.015
    assert abs(mask.mean() - 1) < 0.03                   # unbiased: E[mask] = 1
    for g in range(mask.shape[0]):
        assert abs((mask[g] == 0).mean() - p) < 0.03, g


@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_inference_uses_no_masks(backend, cell):
    rng = _rng("inference", cell)
    T, B, I, H = 4, 3, 3, 5
    m = make_layer(cell, I, H, 2, backend=backend, bidirectional=True, seed=4,
                   recurrent_dropout=0.6, dropout=0.3)
    plain = make_layer(cell, I, H, 2, backend=backend, bidirectional=True, seed=4)
    for name in m.params:
        np.testing.assert_array_equal(m.params[name], plain.params[name])
    x = rng.standard_normal((T, B, I))
    state = random_state(m, B, rng)
    lengths = np.array([4, 2, 0])
    before = copy.deepcopy(m.rng.bit_generator.state)
    for args in [(x, state, lengths), (x, state, None), (x[:1], state, None)]:   # one step too
        y, final = m(*args)
        y0, final0 = plain(*args)
        np.testing.assert_array_equal(y, y0)
        for a, b in zip(state_parts(final), state_parts(final0)):
            np.testing.assert_array_equal(a, b)
        y, final, cache = m.forward(*args, train=False)
        assert cache is None
        # forward(train=False) of one step takes the general path, the call the one-step one:
        # the same numbers up to rounding
        tol = TOLERANCE[np.dtype(m.dtype)]
        np.testing.assert_allclose(y, y0, rtol=tol, atol=tol)
    assert m.rng.bit_generator.state == before           # inference draws nothing
    # a training forward does use masks: other outputs
    y_train = m.forward(x, state, lengths, train=True)[0]
    assert max_rel_error(y_train, m(x, state, lengths)[0]) > 1e-3


@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_replaying_rng_replays_everything(backend, cell):
    rng = _rng("replay", cell)
    T, B, I, H = 5, 3, 3, 4
    m = make_layer(cell, I, H, 2, backend=backend, bidirectional=True, seed=4,
                   recurrent_dropout=P, dropout=0.2)
    call = dict(x=rng.standard_normal((T, B, I)), state=random_state(m, B, rng),
                dy=rng.standard_normal((T, B, 2 * H)), dstate=random_state(m, B, rng),
                lengths=np.array([5, 3, 0]))
    first, cache1 = _train(m, 21, **call)
    second, cache2 = _train(m, 21, **call)
    for key in first:
        np.testing.assert_array_equal(first[key], second[key], err_msg=key)
    for a, b in zip(cache1.recurrent_masks, cache2.recurrent_masks):
        np.testing.assert_array_equal(a, b)
    # a copy (deepcopy, pickle) keeps the option and replays the same
    for twin in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert twin.recurrent_dropout == P
        again, _ = _train(twin, 21, **call)
        for key in first:
            np.testing.assert_array_equal(first[key], again[key], err_msg=key)
    # another seed: other masks, other numbers
    other, cache3 = _train(m, 22, **call)
    assert not np.array_equal(cache3.recurrent_masks[0], cache1.recurrent_masks[0])
    assert max_rel_error(other["y"], first["y"]) > 1e-3
    # without reseeding, the next forward draws new masks
    _, _, cache4 = m.forward(call["x"], train=True)
    assert not np.array_equal(cache4.recurrent_masks[0], cache3.recurrent_masks[0])


@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
def test_zero_recurrent_dropout_changes_nothing(backend, cell, monkeypatch):
    rng = _rng("zero", cell)
    T, B, I, H = 5, 3, 3, 4
    call = dict(x=rng.standard_normal((T, B, I)), dy=rng.standard_normal((T, B, 2 * H)),
                lengths=np.array([5, 3, 0]))
    results = []
    for options in [{}, {"recurrent_dropout": 0}, {"recurrent_dropout": 0.0}]:
        m = make_layer(cell, I, H, 2, backend=backend, bidirectional=True, seed=4, dropout=0.3,
                       **options)
        assert m.recurrent_dropout == 0.0 and "recurrent_dropout" not in repr(m)
        seen = []
        kernels = m._kernels
        forward = kernels.layer_forward

        def spy(*args, **kwargs):
            seen.append(kwargs.get("recurrent_mask"))
            return forward(*args, **kwargs)
        monkeypatch.setattr(kernels, "layer_forward", spy)
        result, cache = _train(m, 3, state=random_state(m, B, _rng("zero state", cell)), **call)
        monkeypatch.undo()
        assert cache.recurrent_masks == [None] * 4
        assert seen == [None] * 4                        # the kernels get no masks
        results.append(result)
    for other in results[1:]:
        for key in results[0]:
            np.testing.assert_array_equal(other[key], results[0][key], err_msg=key)
    # the dropout between layers is the generator's first draw, as before recurrent dropout:
    # recurrent_dropout=0 draws nothing
    m.rng = np.random.default_rng(3)
    _, _, cache = m.forward(call["x"], lengths=call["lengths"], train=True)
    first = np.random.default_rng(3).random((T, B, 2 * H)) >= 0.3
    np.testing.assert_array_equal(cache.masks[0], (first / 0.7).astype(m.dtype))
    # the dropout between layers draws the same masks as without the option: a layer with
    # recurrent dropout draws its masks from the same generator, so its dropout masks differ
    m = make_layer(cell, I, H, 2, backend=backend, bidirectional=True, seed=4, dropout=0.3,
                   recurrent_dropout=P)
    masked, _ = _train(m, 3, state=random_state(m, B, _rng("zero state", cell)), **call)
    assert max_rel_error(masked["y"], results[0]["y"]) > 1e-3


def test_repr_and_cache_identity():
    m = fastrnn.GRU(2, 3, recurrent_dropout=0.25, backend="reference")
    assert "recurrent_dropout=0.25" in repr(m)
    assert fastrnn.GRU(2, 3, recurrent_dropout=np.float32(0.25)).recurrent_dropout == 0.25
    assert type(fastrnn.GRU(2, 3, recurrent_dropout=np.float32(0.25)).recurrent_dropout) \
        is float
    _, _, cache = m.forward(np.zeros((2, 1, 2)), train=True)
    other = fastrnn.GRU(2, 3, recurrent_dropout=0.5, backend="reference")
    with pytest.raises(ValueError, match="recurrent_dropout"):
        other.backward(None, cache, np.zeros((1, 1, 3)))


# ---------------------------------------------------------------------------------------------
# 5. Errors

@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5, True, "0.1", float("nan"), float("inf"),
                                   None, [0.1]],
                         ids=["-0.1", "1.0", "1.5", "True", "str", "nan", "inf", "None", "list"])
@pytest.mark.parametrize("cls", [fastrnn.LSTM, fastrnn.GRU, fastrnn.RNN])
def test_bad_recurrent_dropout_is_named(cls, value):
    with pytest.raises(ValueError, match="recurrent_dropout"):
        cls(2, 3, recurrent_dropout=value, backend="reference")


@pytest.mark.parametrize("value", [0, 0.0, 0.5, 0.999, np.float64(0.1)])
def test_good_recurrent_dropout_is_taken(value):
    m = fastrnn.LSTM(2, 3, recurrent_dropout=value, backend="reference")
    assert m.recurrent_dropout == float(value)
