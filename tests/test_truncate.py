"""Truncated backpropagation: ``backward(truncate=k)`` equals running the windows [0, k),
[k, 2k), ... one after another with the state carried, each with its own backward."""
import numpy as np
import pytest

from conftest import (TOLERANCE, assert_all_close, make_layer, max_rel_error, random_state,
                      result_dict, run_layer)
from fastrnn.cells import CELLS


def _windows_result(m, x, state, lengths, dy, dstate, k):
    """Run the windows by hand; the same flat dict as ``run_layer``."""
    T = x.shape[0]
    m.zero_grad()
    ys, dxs, first_dstate0 = [], [], None
    starts = list(range(0, T, k))
    for start in starts:
        stop = min(start + k, T)
        window_lengths = np.clip(lengths - start, 0, stop - start)
        y, state, cache = m.forward(x[start:stop], state, window_lengths, train=True)
        last = start == starts[-1]
        dx, dstate0 = m.backward(dy[start:stop], cache, dstate if last else None)
        ys.append(y)
        dxs.append(dx)
        if first_dstate0 is None:
            first_dstate0 = dstate0
    return result_dict(np.concatenate(ys), np.concatenate(dxs), state, first_dstate0, m.grads)


@pytest.mark.parametrize("k", [1, 2, 3, 7])
@pytest.mark.parametrize("cell", sorted(CELLS))
def test_truncate_equals_windows(backend, cell, k):
    rng = np.random.default_rng(k)
    T, B, I, H = 7, 3, 2, 4
    m = make_layer(cell, I, H, 2, backend=backend)
    x = rng.standard_normal((T, B, I))
    state = random_state(m, B, rng)
    dstate = random_state(m, B, rng)
    dy = rng.standard_normal((T, B, H))
    lengths = np.array([7, 3, 6])
    truncated = run_layer(m, x, state, lengths, dy, dstate, truncate=k)
    windows = _windows_result(m, x, state, lengths, dy, dstate, k)
    assert_all_close(truncated, windows, np.float64, f"truncate={k}")
    if k < T:  # and truncation did change something
        full = run_layer(m, x, state, lengths, dy, dstate)
        assert max_rel_error(full["grad weight_hh_l0"], truncated["grad weight_hh_l0"]) > 1e-6


@pytest.mark.parametrize("cell", ["lstm", "gru", "rnn_tanh"])
def test_truncate_reverse_direction_cuts_the_same_boundaries(backend, cell):
    """The reverse half of a bidirectional layer, truncated at k, equals a forward layer run on
    the time-reversed input, truncated at k (T a multiple of k, so the boundaries coincide)."""
    rng = np.random.default_rng(5)
    T, B, I, H, k = 6, 2, 3, 4, 2
    bi = make_layer(cell, I, H, 1, bidirectional=True, backend=backend)
    fwd = make_layer(cell, I, H, 1, backend=backend)
    rev = make_layer(cell, I, H, 1, backend=backend)
    fwd.load_state_dict({n: p for n, p in bi.params.items() if not n.endswith("_reverse")})
    rev.load_state_dict({n[: -len("_reverse")]: p for n, p in bi.params.items()
                         if n.endswith("_reverse")})
    x = rng.standard_normal((T, B, I))
    dy = rng.standard_normal((T, B, 2 * H))
    got = run_layer(bi, x, dy=dy, truncate=k)
    a = run_layer(fwd, x, dy=dy[..., :H], truncate=k)
    b = run_layer(rev, x[::-1], dy=dy[::-1, :, H:], truncate=k)
    tol = TOLERANCE[np.dtype(np.float64)]
    assert max_rel_error(got["y"], np.concatenate([a["y"], b["y"][::-1]], axis=2)) < tol
    assert max_rel_error(got["dx"], a["dx"] + b["dx"][::-1]) < tol
    for name in fwd.params:
        assert max_rel_error(got["grad " + name], a["grad " + name]) < tol
        assert max_rel_error(got["grad " + name + "_reverse"], b["grad " + name]) < tol


def test_truncate_at_least_T_changes_nothing(backend):
    rng = np.random.default_rng(0)
    m = make_layer("lstm", 3, 4, 2, bidirectional=True, backend=backend)
    x = rng.standard_normal((5, 2, 3))
    dy = rng.standard_normal((5, 2, 8))
    assert_all_close(run_layer(m, x, dy=dy, truncate=5), run_layer(m, x, dy=dy), np.float64)
