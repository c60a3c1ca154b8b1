"""fastrnn.sequence: padding, length masks and each sequence's last step, against naive loops
and against the layers' own final states (the outside oracle for the last step and its
gradient: reading the outputs where a sequence ends must equal reading the final state)."""
import numpy as np
import pytest

from fastrnn.sequence import last_step, last_step_backward, length_mask, pad

from conftest import TOLERANCE, make_layer, max_rel_error, state_parts


def test_pad_is_a_naive_loop():
    rng = np.random.default_rng(0)
    seqs = [rng.standard_normal((n, 3)).astype(np.float32) for n in (4, 1, 0, 7, 2)]
    padded, lengths = pad(seqs, value=-1.0)
    assert padded.shape == (7, 5, 3) and padded.dtype == np.float32
    assert lengths.tolist() == [4, 1, 0, 7, 2] and lengths.dtype == np.int64
    for b, s in enumerate(seqs):
        for t in range(7):
            expected = s[t] if t < len(s) else np.full(3, -1.0)
            assert np.array_equal(padded[t, b], expected)
    batch_first, _ = pad(seqs, value=-1.0, batch_first=True)
    assert batch_first.flags.c_contiguous and np.array_equal(batch_first, padded.swapaxes(0, 1))


def test_pad_token_ids_keep_their_dtype_and_an_empty_list_is_no_float():
    ids, lengths = pad([[3, 1, 4], [], [1, 5]])
    assert ids.dtype.kind == "i"
    assert ids.T.tolist() == [[3, 1, 4], [0, 0, 0], [1, 5, 0]] and lengths.tolist() == [3, 0, 2]
    assert pad([[1, 2]], dtype=np.float64)[0].dtype == np.float64


def test_pad_bad_input():
    with pytest.raises(ValueError, match="sequences: expected a non-empty list"):
        pad([])
    with pytest.raises(ValueError, match="sequences: expected a non-empty list.*ndarray"):
        pad(np.zeros((2, 3)))
    with pytest.raises(ValueError, match=r"sequences\[1\]: expected the feature shape \(3,\)"):
        pad([np.zeros((2, 3)), np.zeros((2, 4))])
    with pytest.raises(ValueError, match=r"sequences\[0\]: expected a sequence"):
        pad([5])


def test_length_mask():
    mask = length_mask([3, 0, 5], 5)
    expected = np.array([[t < n for n in (3, 0, 5)] for t in range(5)])
    assert mask.dtype == bool and np.array_equal(mask, expected)
    assert np.array_equal(length_mask([3, 0, 5], 5, batch_first=True), expected.T)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 4\]"):
        length_mask([3, 5], 4)
    with pytest.raises(TypeError, match="lengths: expected integers"):
        length_mask([1.5], 4)
    with pytest.raises(ValueError, match=r"lengths: expected shape \(B,\)"):
        length_mask([[1]], 4)


@pytest.mark.float32_kernels
@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_last_step_is_the_top_layers_final_state(backend, cell, bidirectional, batch_first):
    T, B, I, H, L = 6, 5, 3, 4, 2
    m = make_layer(cell, I, H, L, backend=backend, dtype=np.float32,
                   bidirectional=bidirectional, batch_first=batch_first)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((B, T, I) if batch_first else (T, B, I)).astype(np.float32)
    lengths = np.array([6, 3, 1, 0, 5])
    y, state = m(x, lengths=lengths)
    h = state_parts(state)[0]                                     # (L*D, B, H)
    D = 2 if bidirectional else 1
    expected = np.concatenate(list(h[-D:]), axis=1)               # (B, D*H)
    y_before = y.copy()
    got = last_step(y, lengths, bidirectional=bidirectional, batch_first=batch_first)
    assert got.shape == (B, D * H) and got.dtype == np.float32
    assert max_rel_error(got, expected) <= TOLERANCE[np.dtype(np.float32)]
    assert np.array_equal(y, y_before)
    # no lengths: every sequence ends at T - 1
    y_full, state_full = m(x)
    h_full = state_parts(state_full)[0]
    assert max_rel_error(last_step(y_full, bidirectional=bidirectional, batch_first=batch_first),
                         np.concatenate(list(h_full[-D:]), axis=1)) \
        <= TOLERANCE[np.dtype(np.float32)]


@pytest.mark.parametrize("bidirectional", [False, True])
def test_last_step_backward_gives_the_final_states_gradient(backend, bidirectional):
    """A loss on last_step(y), back-propagated through dy, gives every gradient that the same
    loss put on the final state (dstate) gives."""
    T, B, I, H, L = 5, 4, 3, 4, 2
    D = 2 if bidirectional else 1
    m = make_layer("lstm", I, H, L, backend=backend, dtype=np.float64,
                   bidirectional=bidirectional)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((T, B, I))
    lengths = np.array([5, 2, 0, 4])
    dlast = rng.standard_normal((B, D * H))
    y, _, cache = m.forward(x, lengths=lengths, train=True)
    m.zero_grad()
    dx_outputs, dstate_outputs = m.backward(
        last_step_backward(dlast, lengths, T, bidirectional=bidirectional), cache)
    grads_outputs = {k: g.copy() for k, g in m.grads.items()}

    dh = np.zeros((L * D, B, H))
    dh[-D:] = dlast.reshape(B, D, H).transpose(1, 0, 2)
    dh[-D:, lengths == 0] = 0      # an empty sequence's final state is its initial state
    y, _, cache = m.forward(x, lengths=lengths, train=True)
    m.zero_grad()
    dx_state, dstate_state = m.backward(None, cache, dstate=(dh, None))
    tol = TOLERANCE[np.dtype(np.float64)]
    assert max_rel_error(dx_outputs, dx_state) <= tol
    for a, b in zip(dstate_outputs, dstate_state):
        assert max_rel_error(a, b) <= tol
    for k in grads_outputs:
        assert max_rel_error(grads_outputs[k], m.grads[k]) <= tol, k
    assert np.abs(grads_outputs["weight_hh_l0"]).max() > 0


@pytest.mark.parametrize("batch_first", [False, True])
def test_last_step_backward_is_the_adjoint(batch_first):
    """<last_step(y), g> == <y, last_step_backward(g)> for every y and g: the backward is the
    transpose of the (linear) gather, zero where nothing was read."""
    T, B, F = 7, 6, 8
    rng = np.random.default_rng(3)
    lengths = np.array([7, 1, 0, 3, 7, 2])
    for bidirectional in (False, True):
        y = rng.standard_normal((B, T, F) if batch_first else (T, B, F))
        g = rng.standard_normal((B, F))
        dy = last_step_backward(g, lengths, T, bidirectional=bidirectional,
                                batch_first=batch_first)
        assert dy.shape == y.shape
        lhs = np.sum(last_step(y, lengths, bidirectional=bidirectional,
                               batch_first=batch_first) * g)
        assert abs(lhs - np.sum(y * dy)) <= 1e-12 * max(1.0, abs(lhs))
        assert np.count_nonzero(dy) == np.count_nonzero(lengths) * F
    g32 = rng.standard_normal((B, F)).astype(np.float32)
    assert last_step_backward(g32, lengths, T).dtype == np.float32


def test_last_step_bad_input():
    y = np.zeros((4, 3, 6), np.float32)
    with pytest.raises(ValueError, match=r"y: expected a layer's outputs of shape \(T, B, F\)"):
        last_step(y[0])
    with pytest.raises(ValueError, match="y: expected an even feature size"):
        last_step(y[..., :5], bidirectional=True)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 4\]"):
        last_step(y, [1, 2, 5])
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3,\)"):
        last_step(y, [1, 2])
    with pytest.raises(ValueError, match=r"dlast: expected shape \(B, F\)"):
        last_step_backward(np.zeros(6), [1, 2, 3], 4)
    with pytest.raises(TypeError, match="dlast: expected a floating-point array"):
        last_step_backward(np.zeros((3, 6), int), [1, 2, 3], 4)
