"""Central-difference gradient checks of the reference, in float64, through the layer classes.

The loss is <y, dy> + <h_n, dh_n> (+ <c_n, dc_n>), so its gradient is what ``backward(dy, cache,
dstate)`` returns. Every input, initial-state and parameter element is perturbed in turn.
"""
import zlib

import numpy as np
import pytest

from conftest import CELL_OPTIONS, central_difference, make_layer, random_state, state_parts

EPS = 1e-6
# central differences carry O(EPS**2) truncation and O(1e-16 / EPS) rounding error
TOL = 1e-7


def _loss(m, x, state, lengths, dy, dstate, dropout_seed):
    m.rng = np.random.default_rng(dropout_seed)      # the same dropout mask every time
    y, final, _ = m.forward(x, state, lengths, train=True)
    return float((y * dy).sum() + sum((f * d).sum() for f, d in
                                      zip(state_parts(final), state_parts(dstate))))


def _check(m, x, state, lengths, dy, dstate, dropout_seed=0):
    m.rng = np.random.default_rng(dropout_seed)
    _, _, cache = m.forward(x, state, lengths, train=True)
    m.zero_grad()
    dx, dstate0 = m.backward(dy, cache, dstate)

    def f():
        return _loss(m, x, state, lengths, dy, dstate, dropout_seed)

    worst = 0.0
    pairs = [("x", x, dx)] + [(f"state[{i}]", s, d) for i, (s, d) in
                              enumerate(zip(state_parts(state), state_parts(dstate0)))]
    pairs += [(name, m.params[name], m.grads[name]) for name in m.params]
    for name, arr, analytic in pairs:
        numeric = central_difference(f, arr, EPS)
        err = np.abs(numeric - analytic).max() / max(1.0, np.abs(numeric).max())
        assert err < TOL, f"{name}: central differences differ by {err:.3g}"
        worst = max(worst, err)
    return worst


@pytest.mark.parametrize("cell", sorted(CELL_OPTIONS))
@pytest.mark.parametrize("variant", ["one-layer", "lengths+reverse", "two-layers+dropout"])
def test_reference_gradients_match_central_differences(cell, variant):
    rng = np.random.default_rng(zlib.crc32(f"{cell} {variant}".encode()))
    T, B, I, H = 4, 3, 3, 2
    options = {"one-layer": dict(num_layers=1),
               "lengths+reverse": dict(num_layers=1, bidirectional=True),
               "two-layers+dropout": dict(num_layers=2, bidirectional=True, dropout=0.4)}[variant]
    num_layers = options.pop("num_layers")
    m = make_layer(cell, I, H, num_layers, seed=3, **options)
    for p in m.params.values():                  # larger weights: gates away from saturation
        p *= 2.0
    x = rng.standard_normal((T, B, I))
    state = random_state(m, B, rng)
    dstate = random_state(m, B, rng)
    dy = rng.standard_normal((T, B, m.num_directions * H))
    lengths = np.array([4, 2, 0]) if variant != "one-layer" else None
    _check(m, x, state, lengths, dy, dstate)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_reference_gradients_without_bias_and_batch_first(cell):
    rng = np.random.default_rng(11)
    m = make_layer(cell, 2, 3, 1, seed=5, bias=False, batch_first=True)
    assert not any(name.startswith("bias") for name in m.params)
    x = rng.standard_normal((2, 3, 2))           # (B, T, I)
    dy = rng.standard_normal((2, 3, 3))
    _check(m, x, random_state(m, 2, rng), None, dy, random_state(m, 2, rng))
