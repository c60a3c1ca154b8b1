"""Batches of sequences of different lengths: padding, masks and each sequence's last step.

    ids, lengths = pad([[3, 1, 4], [1, 5], [9, 2, 6, 5]])   # (T, B) = (4, 3), lengths [3, 2, 4]
    mask = length_mask(lengths, T=4)                        # (T, B) True where a step is real
    y, state, cache = lstm.forward(embed(ids), lengths=lengths, train=True)
    summary = last_step(y, lengths, bidirectional=True)     # (B, 2H)
    ...
    dy = last_step_backward(dsummary, lengths, T=4, bidirectional=True)
    lstm.backward(dy, cache)

A many-to-one model reads each sequence where it ends: the forward direction at the sequence's
own last step ``lengths[b] - 1`` (not at ``T - 1``, where a padded sequence's output is zero) and
the reverse direction at step 0, where it has read the whole sequence. For a layer started from a
zero state this is the top layer's final hidden state, taken from the outputs, so that its
gradient goes back through ``dy`` as any other loss on the outputs does.
"""
import numpy as np

from .layers import _lengths as _checked_lengths

__all__ = ["pad", "length_mask", "last_step", "last_step_backward"]


def pad(sequences, *, value=0, dtype=None, batch_first=False):
    """Stack sequences of different lengths into one array, padded at the end with ``value``.

    sequences  a non-empty list of array-likes, each of shape ``(L_b, *feature)`` with the same
               feature shape (token ids: 1-D; vectors: ``(L_b, F)``); ``L_b`` may be 0
    Returns ``(padded, lengths)``: ``padded`` ``(T, B, *feature)`` (``(B, T, *feature)`` with
    ``batch_first``), ``T = max L_b``, of ``dtype`` (default: NumPy's common type of the
    sequences), and ``lengths`` ``(B,)`` int64, ready for a layer's ``lengths``.
    """
    if not isinstance(sequences, (list, tuple)) or not sequences:
        got = "an empty one" if isinstance(sequences, (list, tuple)) else type(sequences).__name__
        raise ValueError(f"sequences: expected a non-empty list of sequences, got {got}")
    arrays = [np.asarray(s) for s in sequences]
    for b, a in enumerate(arrays):
        if a.ndim < 1:
            raise ValueError(f"sequences[{b}]: expected a sequence (at least 1-D), got a scalar")
    # an empty sequence ([] is float64 and 1-D) says nothing about the dtype or feature shape
    filled = [a for a in arrays if len(a)] or arrays
    feature = filled[0].shape[1:]
    for b, a in enumerate(arrays):
        if len(a) and a.shape[1:] != feature:
            raise ValueError(f"sequences[{b}]: expected the feature shape {feature} of the "
                             f"first non-empty sequence, got shape {a.shape}")
    if dtype is None:
        dtype = np.result_type(*filled)
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    T, B = int(lengths.max()), len(arrays)
    padded = np.full((T, B) + feature, value, dtype=dtype)              # (T, B, *feature)
    for b, a in enumerate(arrays):
        if len(a):
            padded[:len(a), b] = a
    if batch_first:
        padded = np.ascontiguousarray(padded.swapaxes(0, 1))
    return padded, lengths


def length_mask(lengths, T, *, batch_first=False):
    """Boolean ``(T, B)`` (``(B, T)`` with ``batch_first``): True at the steps ``t < lengths[b]``,
    the positions a loss should count (``softmax_cross_entropy(..., mask=...)``)."""
    lengths = np.asarray(lengths)
    if lengths.ndim != 1:
        raise ValueError(f"lengths: expected shape (B,), got {lengths.shape}")
    lengths = _checked_lengths(lengths, T, lengths.shape[0])
    mask = np.arange(T)[:, None] < lengths[None, :]                     # (T, B)
    return np.ascontiguousarray(mask.T) if batch_first else mask


def _check_outputs(name, shape, bidirectional):
    if len(shape) != 3:
        raise ValueError(f"{name}: expected a layer's outputs of shape (T, B, F), got {shape}")
    if bidirectional and shape[2] % 2:
        raise ValueError(f"{name}: expected an even feature size (two directions) with "
                         f"bidirectional=True, got shape {shape}")


def _last_step_index(lengths, T, B, bidirectional, F):
    """For each (row b, feature f) the time step to read: lengths[b] - 1 for the forward
    features, 0 for the reverse ones; and which rows have a step at all (length > 0)."""
    lengths = _checked_lengths(lengths, T, B) if lengths is not None \
        else np.full(B, T, dtype=np.int64)
    steps = np.repeat((lengths - 1)[:, None], F, axis=1)                # (B, F)
    if bidirectional:
        steps[:, F // 2:] = 0
    return np.maximum(steps, 0), lengths > 0


def last_step(y, lengths=None, *, bidirectional=False, batch_first=False):
    """Each sequence's output where it ends: ``(B, F)`` from a layer's outputs ``y`` ``(T, B, F)``
    (``(B, T, F)`` with ``batch_first``).

    The forward features come from step ``lengths[b] - 1``; with ``bidirectional=True`` the
    reverse half (``[..., F//2:]``) comes from step 0, where the reverse direction has read the
    whole sequence. ``lengths=None`` means all T steps; a sequence of length 0 gives zeros.
    Returns a new array of ``y``'s dtype.
    """
    y = np.asarray(y)
    _check_outputs("y", y.shape, bidirectional)
    if batch_first:
        y = y.swapaxes(0, 1)
    T, B, F = y.shape
    steps, nonempty = _last_step_index(lengths, T, B, bidirectional, F)
    # last[b, f] = y[steps[b, f], b, f]
    last = y[steps, np.arange(B)[:, None], np.arange(F)[None, :]]       # (B, F)
    last[~nonempty] = 0
    return last


def last_step_backward(dlast, lengths, T, *, bidirectional=False, batch_first=False):
    """The gradient of ``last_step``: ``dy`` ``(T, B, F)`` (``(B, T, F)`` with
    ``batch_first``), zero except where ``last_step`` read, which gets ``dlast`` ``(B, F)``.
    Pass it to the layer's ``backward`` as ``dy`` (add it to any other gradient of ``y``)."""
    dlast = np.asarray(dlast)
    if dlast.ndim != 2:
        raise ValueError(f"dlast: expected shape (B, F), got {dlast.shape}")
    if dlast.dtype.kind != "f":
        raise TypeError(f"dlast: expected a floating-point array, got dtype {dlast.dtype}")
    B, F = dlast.shape
    _check_outputs("dlast", (T, B, F), bidirectional)
    steps, nonempty = _last_step_index(lengths, T, B, bidirectional, F)
    dy = np.zeros((T, B, F), dtype=dlast.dtype)
    rows = np.flatnonzero(nonempty)
    # y[steps[b, f], b, f] was read once: its gradient is dlast[b, f]
    dy[steps[rows], rows[:, None], np.arange(F)[None, :]] = dlast[rows]
    return np.ascontiguousarray(dy.swapaxes(0, 1)) if batch_first else dy
