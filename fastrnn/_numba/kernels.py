"""The compiled kernels: one step pair per cell, and the generic time loops that run them.

Steps and loops share this file on purpose: Numba's cache checks only the source file of the
function it caches, so a loop cached from another file would go on running an edited step.

A cell's step pair: ``<cell>_forward_row`` / ``<cell>_backward_row``, side by side, with the
equations of ``fastrnn.reference`` (each backward line undoes the forward line quoted above it).
The forward step works on one batch row and a range of hidden units [j0, j1) (gate block g of
unit j at g*H + j), reading the state from h_in (c_in) and writing it to h_out (c_out), so one
step serves both forward loops; the backward step works on a whole batch row. The recurrent
products are not in the pair: they are the same for every cell and live in the generic time
loops, ``forward_loop`` / ``backward_loop``, which switch on ``cell.code`` to call the steps.

Two forward time loops (``units`` chooses, see fastrnn._numba.set_small_batch_max):

- batch-row loop (any B): per step the GEMM (B, H) x (H, G*H) into a gate buffer, then one
  fused elementwise pass, ``forward_rows``, that splits the batch rows over threads (prange; the
  caller picks how many, see config.PARALLEL_MIN_ELEMENTS). The GRU that resets before the
  recurrent matmul needs r before W_hn (r * h), so its steps run in two phases with a second,
  (B, H) x (H, H), GEMM between them.
- unit-split loop (small B): the hidden units are split into P contiguous ranges, one per
  thread (``units_pass``); per step each thread computes the gate rows of its units of
  h W_hh^T as dot products (``dot_rows``: each weight row read once for up to 4 batch rows)
  and runs the step for its units and every batch row. h is double-buffered (threads read all
  of h_in while each writes its units of h_out); one parallel launch per step (two for GRU
  reset-before) is the synchronisation. Its weight rows are the same every step, so they stay
  in the thread's core's cache. The input projection of all T steps is done before the loop by
  the same threads, for their own units, with the same dot kernel (no BLAS: OpenBLAS's pool
  threads go on spinning after a call and then take the cores from the unit threads).

``step`` is ``layer_step``: one step of inference, both products as unit-split dot products.

Why a switch and not step functions passed as arguments: a function argument is part of the
compiled type, so each cell would compile its own copy of the loop (and Numba does not cache
functions that take other dispatchers as arguments). With the switch, each loop and each pass
compiles once per dtype with every cell in it; the branch costs nothing next to a row.

Outside the time loop: the input projection of all T steps is done before it; after the
backward loop the weight and input gradients are merged GEMMs over all T*B rows, and the bias
and peephole gradients are reductions done as GEMMs with a vector of ones.

Arguments (H hidden size, G gates; every (T, B, .) buffer is indexed by the real time t):

    code       cells.Cell.code
    phase      0, or 1 for the second half of a GRU reset-before step
    t, b       time index, batch row
    lengths    (B,) rows with t >= lengths[b] are padding: y zero, state unchanged, zero gradient
    train      keep what backward needs (activated gates, h_prev, the cell's saved buffer)
    gates      (T, B, G*H)  in: x @ w_ih.T (input side, b_ih not added); out: activated gates
    hgates     (B, G*H)     the recurrent projection of this step, h @ w_hh.T
    h, c       (B, H)       running state, updated in place (c: LSTM only)
    h_in, h_out (B, H)      the state before and after the step: the same array in the
                            batch-row loop, the two buffers of h in the unit-split loop
    j0, j1                  the range of hidden units a forward step works on
    y          (T, B, H)    output, any strides
    h_prev     (T, B, H)    state before each step (train only)
    saved      (T, B, H)    the cell's extra buffer, cells.Cell.cache_buffers (train only):
                            LSTM c_prev, GRU hn = W_hn h + b_hn, GRU reset-before rh = r * h
    rh         (B, H)       GRU reset-before: r * h of this step (saved[t] when training)
    dy         (T, B, H)    gradient of y, any strides; read only when has_dy
    dgates     (T, B, G*H)  gradient of the gate pre-activations, hidden side (what w_hh sees)
    dgates_n   (T, B, H)    GRU reset-after: the input side of the n gate's gradient, da_n,
                            which differs from the hidden side da_n * r
    dh, dc     (B, H)       running gradient of the state, updated in place
    drh        (B, H)       GRU reset-before: gradient of r * h, from the phase-0 GEMM
    dpeep_rows (B, 3H)      LSTM with peepholes: per-row sums of the peephole gradient

Padding rows of the cache buffers are written as zeros so that the merged weight-gradient GEMMs
after the loop see exact zeros there, whatever the state holds.
"""
import math

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from .. import cells
from . import config
from .blas import NO_TRANS, TRANS, gemm

RNN_TANH = cells.RNN_TANH.code
RNN_RELU = cells.RNN_RELU.code
LSTM = cells.LSTM.code
LSTM_PEEPHOLE = cells.LSTM_PEEPHOLE.code
GRU = cells.GRU.code
GRU_RESET_BEFORE = cells.GRU_RESET_BEFORE.code


# ---------------------------------------------------------------------------------------------
# Activations. float64 calls libm. float32 uses a rational function that the compiler can
# vectorise (libm calls stay scalar, and in float32 the activations would cost about as much as
# the GEMMs): tanh(x) = x P(x^2) / Q(x^2) on [-9, 9], with P and Q of degree 4, fitted for
# fastrnn by iterated reweighted least squares on the relative error (2e-8 in exact arithmetic,
# at most 4e-7 absolute in float32 arithmetic); past +-9, tanh is +-1 to float32 precision.
# sigmoid(x) = (1 + tanh(x / 2)) / 2. The clamps are comparisons, not min/max, so NaN stays NaN.

_TANH_P = tuple(np.float32(v) for v in (
    9.9999997947802333e-01, 1.3381033315360685e-01, 3.4955971695395235e-03,
    2.0609228019879896e-05, 1.3354857370743151e-08))
_TANH_Q = tuple(np.float32(v) for v in (
    1.0, 4.6714348913906895e-01, 2.5877016792081171e-02, 3.2856494739010104e-04,
    7.7766397540451526e-07))
_TANH_CLAMP = np.float32(9.0)
_HALF = np.float32(0.5)


def tanh(a):
    """tanh for the kernels (compiled through the overload below)."""
    return math.tanh(a)


def sigmoid(a):
    """The logistic function for the kernels (compiled through the overload below)."""
    return 1 / (1 + math.exp(-a))


def _tanh_float32(a):
    p0, p1, p2, p3, p4 = _TANH_P
    q0, q1, q2, q3, q4 = _TANH_Q
    x = _TANH_CLAMP if a > _TANH_CLAMP else a
    x = -_TANH_CLAMP if x < -_TANH_CLAMP else x
    s = x * x
    p = (((p4 * s + p3) * s + p2) * s + p1) * s + p0
    q = (((q4 * s + q3) * s + q2) * s + q1) * s + q0
    return x * p / q


@overload(tanh, jit_options=config.KERNEL)
def _tanh_overload(a):
    if a == types.float32:
        return _tanh_float32
    return lambda a: math.tanh(a)


@overload(sigmoid, jit_options=config.KERNEL)
def _sigmoid_overload(a):
    if a == types.float32:
        return lambda a: _HALF + _HALF * tanh(_HALF * a)
    return lambda a: 1.0 / (1.0 + math.exp(-a))


# ---------------------------------------------------------------------------------------------
# Row steps. Each is a few short loops over the row rather than one long one: a loop that
# touches only a few arrays is vectorised by the compiler (it must check at run time that the
# arrays do not overlap, and gives up when there are too many), and the row stays in L1 cache
# across the loops, so this is still one pass over the step's memory.

# RNN:  h_new = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu
#
# The forward row steps work on a range of hidden units [j0, j1) of batch row b (the whole row
# in the batch-row loop, one thread's units in the unit-split loop): gate block g of unit j is
# at g*H + j. They read the state from h_in / c_in and write it to h_out / c_out; the batch-row
# loop passes the same array for both (in place), the unit-split loop two buffers for h (other
# threads read all of h_in while this one writes its units of h_out) and one for c (a unit's c
# is only ever read by the thread that owns it).

@njit(**config.KERNEL)
def rnn_forward_row(b, t, j0, j1, relu, train, gates, hgates, b_ih, b_hh, h_in, h_out, y,
                    h_prev):
    zero = h_in.dtype.type(0)
    a, hg, h_row, h_new, y_row = gates[t, b], hgates[b], h_in[b], h_out[b], y[t, b]
    for j in range(j0, j1):
        a[j] = a[j] + b_ih[j] + (hg[j] + b_hh[j])
    if relu:
        for j in range(j0, j1):
            a[j] = zero if a[j] < zero else a[j]  # not max(): NaN must stay NaN
    else:
        for j in range(j0, j1):
            a[j] = tanh(a[j])
    if train:
        h_prev_row = h_prev[t, b]
        for j in range(j0, j1):
            h_prev_row[j] = h_row[j]
    for j in range(j0, j1):
        h_new[j] = a[j]
        y_row[j] = a[j]


@njit(**config.KERNEL)
def rnn_backward_row(b, t, relu, gates, dy, has_dy, dgates, dh):
    zero = dh.dtype.type(0)
    one = dh.dtype.type(1)
    H = dh.shape[1]
    h_new, da, dh_row = gates[t, b], dgates[t, b], dh[b]
    if has_dy:
        dy_row = dy[t, b]
        for j in range(H):
            dh_row[j] += dy_row[j]
    # h_new = act(a); relu: the slope is 1 where h_new > 0, else 0, and h_new (0 or NaN)
    # equals that product there, so a NaN from the input reaches the gradients
    if relu:
        for j in range(H):
            da[j] = dh_row[j] if h_new[j] > zero else h_new[j]
    else:
        for j in range(H):
            da[j] = dh_row[j] * (one - h_new[j] * h_new[j])
    for j in range(H):
        dh_row[j] = zero  # dh_prev = da @ w_hh: the GEMM after this pass


# ---------------------------------------------------------------------------------------------
# LSTM, gates i, f, g, o; with peepholes p_i, p_f see the old cell and p_o the new one.
# Saved: c_prev, the cell before the step (backward recomputes the new cell from it).

@njit(**config.KERNEL)
def lstm_forward_row(b, t, j0, j1, peep, train, gates, hgates, b_ih, b_hh, peephole, h_in,
                     h_out, c_in, c_out, y, h_prev, c_prev):
    H = h_in.shape[1]
    a, hg, y_row = gates[t, b], hgates[b], y[t, b]
    h_row, h_new, c_row, c_new = h_in[b], h_out[b], c_in[b], c_out[b]
    # a = x W_ih^T + b_ih + h W_hh^T + b_hh, blocks i f g o; then activated in place
    for g in range(4):
        for j in range(g * H + j0, g * H + j1):
            a[j] = a[j] + b_ih[j] + (hg[j] + b_hh[j])
    if peep:
        for j in range(j0, j1):
            a[j] += peephole[0, j] * c_row[j]
            a[H + j] += peephole[1, j] * c_row[j]
    for g in range(2):
        for j in range(g * H + j0, g * H + j1):
            a[j] = sigmoid(a[j])              # i, f
    for j in range(2 * H + j0, 2 * H + j1):
        a[j] = tanh(a[j])                     # g
    if train:
        h_prev_row, c_prev_row = h_prev[t, b], c_prev[t, b]
        for j in range(j0, j1):
            h_prev_row[j] = h_row[j]
            c_prev_row[j] = c_row[j]
    for j in range(j0, j1):
        # c_new = f * c + i * g
        c_new[j] = a[H + j] * c_row[j] + a[j] * a[2 * H + j]
    if peep:
        for j in range(j0, j1):
            a[3 * H + j] += peephole[2, j] * c_new[j]
    for j in range(j0, j1):
        o = sigmoid(a[3 * H + j])
        a[3 * H + j] = o
        # h_new = o * tanh(c_new)
        h_new[j] = o * tanh(c_new[j])
    for j in range(j0, j1):
        y_row[j] = h_new[j]


@njit(**config.KERNEL)
def lstm_backward_row(b, t, peep, gates, c_prev, peephole, dy, has_dy, dgates, dh, dc,
                      dpeep_rows):
    zero = dh.dtype.type(0)
    one = dh.dtype.type(1)
    H = dh.shape[1]
    a, c_old, da, dh_row, dc_row = gates[t, b], c_prev[t, b], dgates[t, b], dh[b], dc[b]
    if has_dy:
        dy_row = dy[t, b]
        for j in range(H):
            dh_row[j] += dy_row[j]
    # c_new = f * c_old + i * g, recomputed; da's i and f blocks hold tanh(c_new) and c_new
    # until the i, f, g gradients overwrite them
    for j in range(H):
        c_new = a[H + j] * c_old[j] + a[j] * a[2 * H + j]
        da[j] = tanh(c_new)
        da[H + j] = c_new
    for j in range(H):
        # h_new = o * tanh(c_new)
        tanh_c = da[j]
        o = a[3 * H + j]
        da[3 * H + j] = dh_row[j] * tanh_c * o * (one - o)                 # da_o
        dc_row[j] += dh_row[j] * o * (one - tanh_c * tanh_c)               # dc_new
    if peep:
        p, dp = peephole, dpeep_rows[b]
        for j in range(H):
            # a_o = ... + p_o * c_new
            dc_row[j] += da[3 * H + j] * p[2, j]
            dp[2 * H + j] += da[3 * H + j] * da[H + j]
    for j in range(H):
        # c_new = f * c_old + i * g
        dc_new = dc_row[j]
        i, f, g = a[j], a[H + j], a[2 * H + j]
        da[j] = dc_new * g * i * (one - i)                                 # da_i
        da[H + j] = dc_new * c_old[j] * f * (one - f)                      # da_f
        da[2 * H + j] = dc_new * i * (one - g * g)                         # da_g
        dc_row[j] = dc_new * f                                             # dc_old
    if peep:
        p, dp = peephole, dpeep_rows[b]
        for j in range(H):
            # a_i = ... + p_i * c_old;  a_f = ... + p_f * c_old
            dc_row[j] += da[j] * p[0, j] + da[H + j] * p[1, j]
            dp[j] += da[j] * c_old[j]
            dp[H + j] += da[H + j] * c_old[j]
    for j in range(H):
        dh_row[j] = zero  # dh_prev = da @ w_hh: the GEMM after this pass


# ---------------------------------------------------------------------------------------------
# GRU, reset after the recurrent matmul (PyTorch):  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
# Saved: hn = W_hn h + b_hn.

@njit(**config.KERNEL)
def gru_forward_row(b, t, j0, j1, train, gates, hgates, b_ih, b_hh, h_in, h_out, y, h_prev,
                    hn_saved):
    one = h_in.dtype.type(1)
    H = h_in.shape[1]
    a, hg, h_row, h_new, y_row = gates[t, b], hgates[b], h_in[b], h_out[b], y[t, b]
    for g in range(2):
        for j in range(g * H + j0, g * H + j1):
            a[j] = sigmoid(a[j] + b_ih[j] + (hg[j] + b_hh[j]))          # r, z
    for j in range(2 * H + j0, 2 * H + j1):
        hg[j] += b_hh[j]                                                 # hn = W_hn h + b_hn
    for j in range(j0, j1):
        a[2 * H + j] = tanh(a[2 * H + j] + b_ih[2 * H + j] + a[j] * hg[2 * H + j])   # n
    if train:
        h_prev_row, hn_row = h_prev[t, b], hn_saved[t, b]
        for j in range(j0, j1):
            h_prev_row[j] = h_row[j]
            hn_row[j] = hg[2 * H + j]
    for j in range(j0, j1):
        # h_new = (1 - z) * n + z * h
        z = a[H + j]
        h_new[j] = (one - z) * a[2 * H + j] + z * h_row[j]
    for j in range(j0, j1):
        y_row[j] = h_new[j]


@njit(**config.KERNEL)
def gru_zn_backward_row(a, h_old, da, dh_row):
    """The z and n blocks of a GRU row's gate gradient, both GRU forms (n's inside differs, not
    its derivative), then dh_row *= z, the part of dL/dh that skips the recurrent GEMM."""
    one = dh_row.dtype.type(1)
    H = dh_row.shape[0]
    for j in range(H):
        # h_new = (1 - z) * n + z * h;  n = tanh(...)
        z, n = a[H + j], a[2 * H + j]
        da[H + j] = dh_row[j] * (h_old[j] - n) * z * (one - z)            # da_z
        da[2 * H + j] = dh_row[j] * (one - z) * (one - n * n)              # da_n
    for j in range(H):
        dh_row[j] *= a[H + j]


@njit(**config.KERNEL)
def gru_backward_row(b, t, gates, h_prev, hn_saved, dy, has_dy, dgates, dgates_n, dh):
    one = dh.dtype.type(1)
    H = dh.shape[1]
    a, h_old, hn, da, da_n_in, dh_row = (gates[t, b], h_prev[t, b], hn_saved[t, b], dgates[t, b],
                                         dgates_n[t, b], dh[b])
    if has_dy:
        dy_row = dy[t, b]
        for j in range(H):
            dh_row[j] += dy_row[j]
    gru_zn_backward_row(a, h_old, da, dh_row)  # the GEMM after this pass adds dgates[t] @ w_hh
    for j in range(H):
        da_n_in[j] = da[2 * H + j]            # x_n = W_in x + b_in sees da_n
    for j in range(H):
        r = a[j]
        da[j] = da[2 * H + j] * hn[j] * r * (one - r)                       # da_r
        da[2 * H + j] *= r                    # hn = W_hn h + b_hn sees da_n * r


# ---------------------------------------------------------------------------------------------
# GRU, reset before the recurrent matmul (original GRU, ONNX):
#     n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
# Saved: rh = r * h. Phase 0 computes r and z (and r * h), phase 1 the n gate and the new h.

@njit(**config.KERNEL)
def gru_reset_before_forward_row(b, t, j0, j1, phase, train, gates, hgates, b_ih, b_hh, h_in,
                                 h_out, y, h_prev, rh):
    one = h_in.dtype.type(1)
    H = h_in.shape[1]
    a, hg, h_row = gates[t, b], hgates[b], h_in[b]
    if phase == 0:
        for g in range(2):
            for j in range(g * H + j0, g * H + j1):
                a[j] = sigmoid(a[j] + b_ih[j] + (hg[j] + b_hh[j]))      # r, z
        rh_row = rh[b]
        for j in range(j0, j1):
            rh_row[j] = a[j] * h_row[j]       # between the phases: hn = rh @ W_hn.T
    else:
        for j in range(2 * H + j0, 2 * H + j1):
            a[j] = tanh(a[j] + b_ih[j] + (hg[j] + b_hh[j]))               # n
        if train:
            h_prev_row = h_prev[t, b]
            for j in range(j0, j1):
                h_prev_row[j] = h_row[j]
        h_new = h_out[b]
        for j in range(j0, j1):
            # h_new = (1 - z) * n + z * h
            z = a[H + j]
            h_new[j] = (one - z) * a[2 * H + j] + z * h_row[j]
        y_row = y[t, b]
        for j in range(j0, j1):
            y_row[j] = h_new[j]


@njit(**config.KERNEL)
def gru_reset_before_backward_row(b, t, phase, gates, h_prev, dy, has_dy, dgates, dh, drh):
    one = dh.dtype.type(1)
    H = dh.shape[1]
    a, h_old, da, dh_row = gates[t, b], h_prev[t, b], dgates[t, b], dh[b]
    if phase == 0:
        if has_dy:
            dy_row = dy[t, b]
            for j in range(H):
                dh_row[j] += dy_row[j]
        gru_zn_backward_row(a, h_old, da, dh_row)
        # the GEMM after this phase: drh = da_n @ W_hn
    else:
        drh_row = drh[b]
        for j in range(H):
            # rh = r * h
            r = a[j]
            da[j] = drh_row[j] * h_old[j] * r * (one - r)                 # da_r
        for j in range(H):
            dh_row[j] += drh_row[j] * a[j]
        # the GEMM after this phase adds dgates[t][:, :2H] @ w_hh[:2H] to dh


# =============================================================================================
# The fused elementwise passes: batch rows split over threads, the cell chosen by code

@njit(**config.KERNEL)
def forward_units(code, phase, t, b, j0, j1, lengths, train, gates, hgates, b_ih, b_hh,
                  peephole, h_in, h_out, c, y, h_prev, saved, rh):
    """The forward step of row b, units [j0, j1), for the cell ``code``; padding rows too."""
    zero = h_in.dtype.type(0)
    if t >= lengths[b]:
        # padding: the state stays; the output and what backward reads are zero
        last_phase = phase == 1 or code != GRU_RESET_BEFORE
        if code == GRU_RESET_BEFORE and phase == 0:
            for j in range(j0, j1):
                rh[b, j] = zero
        if last_phase:
            for j in range(j0, j1):
                h_out[b, j] = h_in[b, j]
                y[t, b, j] = zero
            if train:
                for j in range(j0, j1):
                    h_prev[t, b, j] = zero
                if saved.shape[0] > 0:
                    for j in range(j0, j1):
                        saved[t, b, j] = zero
    elif code == RNN_TANH or code == RNN_RELU:
        rnn_forward_row(b, t, j0, j1, code == RNN_RELU, train, gates, hgates, b_ih, b_hh, h_in,
                        h_out, y, h_prev)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_forward_row(b, t, j0, j1, code == LSTM_PEEPHOLE, train, gates, hgates, b_ih, b_hh,
                         peephole, h_in, h_out, c, c, y, h_prev, saved)
    elif code == GRU:
        gru_forward_row(b, t, j0, j1, train, gates, hgates, b_ih, b_hh, h_in, h_out, y, h_prev,
                        saved)
    else:
        gru_reset_before_forward_row(b, t, j0, j1, phase, train, gates, hgates, b_ih, b_hh,
                                     h_in, h_out, y, h_prev, rh)


@njit(**config.PARALLEL)
def forward_rows(code, phase, t, lengths, train, gates, hgates, b_ih, b_hh, peephole, h, c, y,
                 h_prev, saved, rh):
    H = h.shape[1]
    for row in prange(h.shape[0]):
        b = np.int64(row)  # one type for the row steps in the serial and the parallel typing
        forward_units(code, phase, t, b, 0, H, lengths, train, gates, hgates, b_ih, b_hh,
                      peephole, h, h, c, y, h_prev, saved, rh)


# ---------------------------------------------------------------------------------------------
# The unit-split loop (small batches): the hidden units are split over P threads; thread p
# owns units [j0, j1) and per step computes the gate rows {g*H + j} of h W_hh^T for its units
# as dot products of rows of W_hh (contiguous in the row-major (G*H, H) matrix) with the rows
# of h, each weight read once per step for up to 4 batch rows, then runs the cell's step for its
# units. Its weight rows are the same every step, so they stay in its core's caches.

@njit(**config.KERNEL)
def unit_range(p, P, H):
    """Units [j0, j1) of part p of P: contiguous, multiples of 16 units but for the last."""
    chunk = -(-H // P)
    chunk = -(-chunk // 16) * 16
    j0 = min(H, p * chunk)
    return j0, min(H, j0 + chunk)


@njit(**config.KERNEL)
def unit_parts(threads, H):
    """How many parts to split H units into: at most one per thread, at least 16 units each."""
    return max(1, min(threads, -(-H // 16)))


@njit(**config.KERNEL)
def _rows_x4(w, r0, r1, v, b, out):
    """out[b:b+4, r] = w[r] . v[b:b+4] for r in [r0, r1), r1 - r0 a multiple of 4: tiles of
    4 weight rows x 4 vectors, 16 accumulators in one loop over k."""
    zero = v.dtype.type(0)
    v0, v1, v2, v3 = v[b], v[b + 1], v[b + 2], v[b + 3]
    K = v.shape[1]
    for r in range(r0, r1, 4):
        w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
        a0, a1, a2, a3, b0, b1, b2, b3 = zero, zero, zero, zero, zero, zero, zero, zero
        c0, c1, c2, c3, d0, d1, d2, d3 = zero, zero, zero, zero, zero, zero, zero, zero
        for k in range(K):
            x0, x1, x2, x3 = w0[k], w1[k], w2[k], w3[k]
            y0, y1, y2, y3 = v0[k], v1[k], v2[k], v3[k]
            a0 += x0 * y0
            a1 += x1 * y0
            a2 += x2 * y0
            a3 += x3 * y0
            b0 += x0 * y1
            b1 += x1 * y1
            b2 += x2 * y1
            b3 += x3 * y1
            c0 += x0 * y2
            c1 += x1 * y2
            c2 += x2 * y2
            c3 += x3 * y2
            d0 += x0 * y3
            d1 += x1 * y3
            d2 += x2 * y3
            d3 += x3 * y3
        out[b, r], out[b, r + 1], out[b, r + 2], out[b, r + 3] = a0, a1, a2, a3
        out[b + 1, r], out[b + 1, r + 1], out[b + 1, r + 2], out[b + 1, r + 3] = b0, b1, b2, b3
        out[b + 2, r], out[b + 2, r + 1], out[b + 2, r + 2], out[b + 2, r + 3] = c0, c1, c2, c3
        out[b + 3, r], out[b + 3, r + 1], out[b + 3, r + 2], out[b + 3, r + 3] = d0, d1, d2, d3


@njit(**config.KERNEL)
def _rows_x2(w, r0, r1, v, b, out):
    """As _rows_x4 for two vectors v[b], v[b + 1]: 8 accumulators."""
    zero = v.dtype.type(0)
    v0, v1 = v[b], v[b + 1]
    K = v.shape[1]
    for r in range(r0, r1, 4):
        w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
        s0, s1, s2, s3, q0, q1, q2, q3 = zero, zero, zero, zero, zero, zero, zero, zero
        for k in range(K):
            y0, y1 = v0[k], v1[k]
            s0 += w0[k] * y0
            s1 += w1[k] * y0
            s2 += w2[k] * y0
            s3 += w3[k] * y0
            q0 += w0[k] * y1
            q1 += w1[k] * y1
            q2 += w2[k] * y1
            q3 += w3[k] * y1
        out[b, r], out[b, r + 1], out[b, r + 2], out[b, r + 3] = s0, s1, s2, s3
        out[b + 1, r], out[b + 1, r + 1], out[b + 1, r + 2], out[b + 1, r + 3] = q0, q1, q2, q3


@njit(**config.KERNEL)
def _rows_x1(w, r0, r1, v, b, out):
    """As _rows_x4 for one vector v[b]: 4 accumulators."""
    zero = v.dtype.type(0)
    v0 = v[b]
    K = v.shape[1]
    for r in range(r0, r1, 4):
        w0, w1, w2, w3 = w[r], w[r + 1], w[r + 2], w[r + 3]
        s0, s1, s2, s3 = zero, zero, zero, zero
        for k in range(K):
            y0 = v0[k]
            s0 += w0[k] * y0
            s1 += w1[k] * y0
            s2 += w2[k] * y0
            s3 += w3[k] * y0
        out[b, r], out[b, r + 1], out[b, r + 2], out[b, r + 3] = s0, s1, s2, s3


@njit(**config.KERNEL)
def _rows_single(w, r0, r1, v, out):
    """out[b, r] = w[r] . v[b], one dot product at a time (the < 4 rows left over)."""
    zero = v.dtype.type(0)
    for r in range(r0, r1):
        wr = w[r]
        for b in range(v.shape[0]):
            vb = v[b]
            s0 = zero
            for k in range(v.shape[1]):
                s0 += wr[k] * vb[k]
            out[b, r] = s0


@njit(**config.KERNEL)
def dot_rows(w, stride, first_block, blocks, j0, j1, v, out):
    """out[b, r] = w[r] . v[b] for the rows r = g*stride + j, first_block <= g < first_block
    + blocks, j0 <= j < j1, every batch row b of v (B, K); w (rows, K), out (B, rows).

    Tiles of 4 weight rows x 4 (or 2, or 1) batch rows: up to 16 accumulators in one loop over
    k, each weight and each element of v loaded once per tile (the reductions vectorise:
    fastmath "reassoc"; many dot products in flight hide the horizontal sum that ends each).
    A unit range of a thread is read once per 4 batch rows, so it stays in the core's cache."""
    B = v.shape[0]
    for g in range(first_block, first_block + blocks):
        r0, r1 = g * stride + j0, g * stride + j1
        r4 = r0 + (r1 - r0) // 4 * 4
        if r4 > r0:
            b = 0
            while b + 4 <= B:
                _rows_x4(w, r0, r4, v, b, out)
                b += 4
            if b + 2 <= B:
                _rows_x2(w, r0, r4, v, b, out)
                b += 2
            if b < B:
                _rows_x1(w, r0, r4, v, b, out)
        if r4 < r1:
            _rows_single(w, r4, r1, v, out)


@njit(**config.KERNEL)
def units_pass(p, P, code, phase, t, active, lengths, train, w_hh, gates, hgates, b_ih, b_hh,
               peephole, h_in, h_out, c, y, h_prev, saved, rh):
    """Thread p's share of one step (one phase for GRU reset-before) of the unit-split loop."""
    B, H = h_in.shape
    G = w_hh.shape[0] // H
    j0, j1 = unit_range(p, P, H)
    if j0 >= j1:
        return
    if active:
        if code != GRU_RESET_BEFORE:
            dot_rows(w_hh, H, 0, G, j0, j1, h_in, hgates)           # h W_hh^T, all gates
        elif phase == 0:
            dot_rows(w_hh, H, 0, 2, j0, j1, h_in, hgates)           # h W_hh^T, r and z
        else:
            dot_rows(w_hh, H, 2, 1, j0, j1, rh, hgates)             # (r * h) W_hn^T
    for row in range(B):
        forward_units(code, phase, t, np.int64(row), j0, j1, lengths, train, gates, hgates,
                      b_ih, b_hh, peephole, h_in, h_out, c, y, h_prev, saved, rh)


@njit(**config.KERNEL)
def units_input(p, P, H, x2, w_ih, gates2):
    """Thread p's units of the input projection of all steps: gates2 (T*B, G*H) = x2 W_ih^T
    for the gate rows of its units (no BLAS in the unit-split loop: OpenBLAS's threads would
    go on spinning for a while after the call and take the cores from the unit threads)."""
    j0, j1 = unit_range(p, P, H)
    if j0 < j1:
        dot_rows(w_ih, H, 0, w_ih.shape[0] // H, j0, j1, x2, gates2)


@njit(**config.PARALLEL)
def units_input_parallel(P, H, x2, w_ih, gates2):
    for p in prange(P):
        units_input(np.int64(p), P, H, x2, w_ih, gates2)


@njit(**config.PARALLEL)
def units_pass_parallel(P, code, phase, t, active, lengths, train, w_hh, gates, hgates, b_ih,
                        b_hh, peephole, h_in, h_out, c, y, h_prev, saved, rh):
    for p in prange(P):
        units_pass(np.int64(p), P, code, phase, t, active, lengths, train, w_hh, gates, hgates,
                   b_ih, b_hh, peephole, h_in, h_out, c, y, h_prev, saved, rh)


# ---------------------------------------------------------------------------------------------
# One step of inference (layer_step): both products as dot products, then the cell's step.

@njit(**config.KERNEL)
def step_pass(p, P, code, phase, x, w_ih, w_hh, b_ih, b_hh, peephole, h0, h_n, c, y, gates,
              hgates, rh, lengths, none3):
    B, H = h0.shape
    G = w_hh.shape[0] // H
    j0, j1 = unit_range(p, P, H)
    if j0 >= j1:
        return
    if phase == 0:
        dot_rows(w_ih, H, 0, G, j0, j1, x, gates[0])                 # x W_ih^T
        if code != GRU_RESET_BEFORE:
            dot_rows(w_hh, H, 0, G, j0, j1, h0, hgates)
        else:
            dot_rows(w_hh, H, 0, 2, j0, j1, h0, hgates)
    else:
        dot_rows(w_hh, H, 2, 1, j0, j1, rh, hgates)
    for row in range(B):
        forward_units(code, phase, 0, np.int64(row), j0, j1, lengths, False, gates, hgates,
                      b_ih, b_hh, peephole, h0, h_n, c, y, none3, none3, rh)


@njit(**config.PARALLEL)
def step_pass_parallel(P, code, phase, x, w_ih, w_hh, b_ih, b_hh, peephole, h0, h_n, c, y,
                       gates, hgates, rh, lengths, none3):
    for p in prange(P):
        step_pass(np.int64(p), P, code, phase, x, w_ih, w_hh, b_ih, b_hh, peephole, h0, h_n, c,
                  y, gates, hgates, rh, lengths, none3)


@njit(**config.KERNEL)
def _overlaps(a, b):
    """Whether the memory of two C-contiguous arrays overlaps (by address range)."""
    if a.size == 0 or b.size == 0:
        return False
    a0, b0 = a.ctypes.data, b.ctypes.data
    return a0 < b0 + b.size * b.itemsize and b0 < a0 + a.size * a.itemsize


def step(code, threads, min_work, x, h0, c0, w_ih, w_hh, b_ih, b_hh, peephole, h_n, c_n):
    """layer_step, compiled per dtype (fastrnn._numba). Returns 0, or the position (1-based,
    in layer_step's argument list: x = 1 ... c_n = 10) of the first array whose shape does not
    fit or that overlaps an input it may not (h_n, c_n).

    threads: the most threads to use; min_work: split over threads only from this many
    multiply-adds (G*H*(I+H)*B) on. c0, c_n, peephole are empty arrays when absent."""
    B, I = x.shape
    H = h0.shape[1]
    GH = w_hh.shape[0]
    cell_state = code == LSTM or code == LSTM_PEEPHOLE
    G = 4 if cell_state else (3 if code == GRU or code == GRU_RESET_BEFORE else 1)
    if h0.shape[0] != B:
        return 2
    if cell_state and (c0.shape[0] != B or c0.shape[1] != H):
        return 3
    if w_ih.shape[0] != G * H or w_ih.shape[1] != I:
        return 4
    if GH != G * H or w_hh.shape[1] != H:
        return 5
    if b_ih.shape[0] != GH:
        return 6
    if b_hh.shape[0] != GH:
        return 7
    if code == LSTM_PEEPHOLE and (peephole.shape[0] != 3 or peephole.shape[1] != H):
        return 8
    if h_n.shape[0] != B or h_n.shape[1] != H:
        return 9
    if cell_state and (c_n.shape[0] != B or c_n.shape[1] != H):
        return 10
    if _overlaps(h_n, x) or _overlaps(h_n, h0) or _overlaps(h_n, c0) or _overlaps(h_n, c_n):
        return 9
    if _overlaps(c_n, x) or _overlaps(c_n, h0) or _overlaps(c_n, c0):
        return 10
    if B == 0 or H == 0:
        return 0
    gates = np.empty((1, B, GH), x.dtype)
    hgates = np.empty((B, GH), x.dtype)
    rh = np.empty((B, H) if code == GRU_RESET_BEFORE else (0, 0), x.dtype)
    lengths = np.ones(B, np.int64)
    none3 = gates[:0]
    y = h_n.reshape((1, B, H))
    if cell_state:
        c_n[:, :] = c0                    # the LSTM step updates c in place
    P = 1
    if G * H * (I + H) * B >= min_work:
        P = unit_parts(threads, H)
    phases = 2 if code == GRU_RESET_BEFORE else 1
    for phase in range(phases):
        if P > 1:
            step_pass_parallel(P, code, phase, x, w_ih, w_hh, b_ih, b_hh, peephole, h0, h_n,
                               c_n, y, gates, hgates, rh, lengths, none3)
        else:
            step_pass(0, 1, code, phase, x, w_ih, w_hh, b_ih, b_hh, peephole, h0, h_n, c_n, y,
                      gates, hgates, rh, lengths, none3)
    return 0


@njit(**config.PARALLEL)
def backward_rows(code, phase, t, lengths, gates, h_prev, saved, peephole, dy, has_dy, dgates,
                  dgates_n, dh, dc, drh, dpeep_rows):
    zero = dh.dtype.type(0)
    for row in prange(dh.shape[0]):
        b = np.int64(row)  # one type for the row steps in the serial and the parallel typing
        if t >= lengths[b]:
            # padding: the state gradient passes through; no gradient reaches the weights
            if phase == 0:
                for j in range(dgates.shape[2]):
                    dgates[t, b, j] = zero
                for j in range(dgates_n.shape[2]):
                    dgates_n[t, b, j] = zero
        elif code == RNN_TANH or code == RNN_RELU:
            rnn_backward_row(b, t, code == RNN_RELU, gates, dy, has_dy, dgates, dh)
        elif code == LSTM or code == LSTM_PEEPHOLE:
            lstm_backward_row(b, t, code == LSTM_PEEPHOLE, gates, saved, peephole, dy, has_dy,
                              dgates, dh, dc, dpeep_rows)
        elif code == GRU:
            gru_backward_row(b, t, gates, h_prev, saved, dy, has_dy, dgates, dgates_n, dh)
        else:
            gru_reset_before_backward_row(b, t, phase, gates, h_prev, dy, has_dy, dgates, dh,
                                          drh)


@njit(**config.KERNEL)
def any_active(t, lengths):
    for b in range(lengths.shape[0]):
        if t < lengths[b]:
            return True
    return False


# =============================================================================================
# The generic time loops. Not decorated: fastrnn._numba compiles each with one explicit
# signature per dtype (see _signatures there).

def forward_loop(code, x, w_ih, w_hh, b_ih, b_hh, peephole, lengths, reverse, train, units,
                 y, gates, h_prev, saved, hgates, h, h2, c, rh):
    """Run one layer, one direction. h and c hold the initial state and end as the final one.

    gates (T, B, G*H), h_prev and saved (T, B, H): the cache, cut from one workspace; h_prev and
    saved are empty unless train. hgates (B, G*H); rh (B, H) scratch for GRU reset-before
    inference (when training, r * h goes straight into saved).
    units: 0 for the batch-row loop (a GEMM per step); P >= 1 for the unit-split loop on P
    threads, which needs h2 (B, H), the second state buffer (empty otherwise).
    """
    T, B, I = x.shape
    GH, H = w_hh.shape
    # reset-before: h @ W_hn.T is replaced by (r * h) @ W_hn.T, which needs r first; so its
    # steps run in two phases (r, z then n), with that GEMM between them
    first = 2 * H if code == GRU_RESET_BEFORE else GH
    phases = 2 if code == GRU_RESET_BEFORE else 1
    if units > 0:
        # gates = x @ w_ih.T                                               (T*B, G*H)
        if units > 1:
            units_input_parallel(units, H, x.reshape((T * B, I)), w_ih,
                                 gates.reshape((T * B, GH)))
        else:
            units_input(0, 1, H, x.reshape((T * B, I)), w_ih, gates.reshape((T * B, GH)))
        # unit-split loop: h double-buffered (threads read all of h_in while each writes its
        # units of h_out); one parallel launch per step and phase is the synchronisation
        h_in, h_out = h, h2
        for s in range(T):
            t = T - 1 - s if reverse else s
            active = any_active(t, lengths)
            rh_t = saved[t] if train and code == GRU_RESET_BEFORE else rh
            for phase in range(phases):
                if units > 1:
                    units_pass_parallel(units, code, phase, t, active, lengths, train, w_hh,
                                        gates, hgates, b_ih, b_hh, peephole, h_in, h_out, c, y,
                                        h_prev, saved, rh_t)
                else:
                    units_pass(0, 1, code, phase, t, active, lengths, train, w_hh, gates,
                               hgates, b_ih, b_hh, peephole, h_in, h_out, c, y, h_prev, saved,
                               rh_t)
            h_in, h_out = h_out, h_in
        if T % 2 == 1:
            h[:, :] = h2
        return
    # gates = x @ w_ih.T                                                   (T*B, G*H)
    gemm(x.reshape((T * B, I)), NO_TRANS, w_ih, TRANS, gates.reshape((T * B, GH)), 0.0)
    for s in range(T):
        t = T - 1 - s if reverse else s
        active = any_active(t, lengths)
        if active:
            # hgates[:, :first] = h @ w_hh[:first].T                         (B, G*H or 2H)
            gemm(h, NO_TRANS, w_hh[:first], TRANS, hgates[:, :first], 0.0)
        rh_t = saved[t] if train and code == GRU_RESET_BEFORE else rh
        for phase in range(phases):
            if phase == 1 and active:
                # hgates[:, 2H:] = rh @ w_hh[2H:].T                          (B, H)
                gemm(rh_t, NO_TRANS, w_hh[2 * H:], TRANS, hgates[:, 2 * H:], 0.0)
            forward_rows(code, phase, t, lengths, train, gates, hgates, b_ih, b_hh, peephole, h,
                         c, y, h_prev, saved, rh_t)


def backward_loop(code, x, w_ih, w_hh, peephole, lengths, reverse, truncate,
                  gates, h_prev, saved, dy, has_dy, dgates, dgates_n, dh, dc, drh, dpeep_rows,
                  ones, dx, dw_ih, dw_hh, db_ih, db_hh, dpeephole):
    """Backward through one layer, one direction; ADDS into dx, dw_*, db_*, dpeephole.

    dh, dc (B, H) hold the gradient of the final state and end as that of the initial state.
    dgates (T, B, G*H) written whole; dgates_n (T, B, H) GRU only; drh (B, H) GRU reset-before
    only; dpeep_rows (B, 3H) zeros, LSTM with peepholes only; ones (T*B,) all ones.
    truncate: 0 for none.
    """
    T = x.shape[0]
    GH, H = w_hh.shape
    first = 2 * H if code == GRU_RESET_BEFORE else GH
    phases = 2 if code == GRU_RESET_BEFORE else 1
    for s in range(T):
        t = s if reverse else T - 1 - s
        active = any_active(t, lengths)
        for phase in range(phases):
            if phase == 1 and active:
                # drh = dgates[t][:, 2H:] @ w_hh[2H:]                        (B, H)
                gemm(dgates[t][:, 2 * H:], NO_TRANS, w_hh[2 * H:], NO_TRANS, drh, 0.0)
            backward_rows(code, phase, t, lengths, gates, h_prev, saved, peephole, dy, has_dy,
                          dgates, dgates_n, dh, dc, drh, dpeep_rows)
        if active:
            # dh += dgates[t][:, :first] @ w_hh[:first]                      (B, H)
            gemm(dgates[t][:, :first], NO_TRANS, w_hh[:first], NO_TRANS, dh, 1.0)
        # the state gradient leaving step t crosses the boundary to the step before it in time
        # order (t - 1 forward, t + 1 reverse); truncation cuts boundaries at multiples of k
        boundary = t + 1 if reverse else t
        if truncate > 0 and 0 < boundary < T and boundary % truncate == 0:
            dh[:] = 0
            dc[:] = 0
    weight_gradients(code, x, w_ih, gates, h_prev, saved, dgates, dgates_n, dpeep_rows, ones,
                     dx, dw_ih, dw_hh, db_ih, db_hh, dpeephole)


@njit(**config.KERNEL)
def weight_gradients(code, x, w_ih, gates, h_prev, saved, dgates, dgates_n, dpeep_rows, ones,
                     dx, dw_ih, dw_hh, db_ih, db_hh, dpeephole):
    """The merged GEMMs and reductions over all T*B rows, after the backward time loop."""
    T, B, I = x.shape
    GH = dgates.shape[2]
    H = h_prev.shape[2]
    x2 = x.reshape((T * B, I))
    dx2 = dx.reshape((T * B, I))
    dgates2 = dgates.reshape((T * B, GH))
    h_prev2 = h_prev.reshape((T * B, H))
    ones2 = ones.reshape((1, T * B))
    db_ih2 = db_ih.reshape((1, GH))
    # hidden side: dgates is the gradient of W_hh h + b_hh
    if code == GRU_RESET_BEFORE:
        # dw_hh[:2H] += dgates[:, :2H].T @ h_prev                          (2H, H)
        gemm(dgates2[:, :2 * H], TRANS, h_prev2, NO_TRANS, dw_hh[:2 * H], 1.0)
        # dw_hh[2H:] += dgates[:, 2H:].T @ rh                              (H, H)
        gemm(dgates2[:, 2 * H:], TRANS, saved.reshape((T * B, H)), NO_TRANS, dw_hh[2 * H:], 1.0)
    else:
        # dw_hh += dgates.T @ h_prev                                       (G*H, H)
        gemm(dgates2, TRANS, h_prev2, NO_TRANS, dw_hh, 1.0)
    # db_hh += dgates.sum(axis=0)  (as ones @ dgates)                      (1, G*H)
    gemm(ones2, NO_TRANS, dgates2, NO_TRANS, db_hh.reshape((1, GH)), 1.0)
    # input side: the same gradient, except for the n gate of the GRU (reset after)
    if code == GRU:
        dgates_n2 = dgates_n.reshape((T * B, H))
        # dw_ih[:2H] += dgates[:, :2H].T @ x                               (2H, I)
        gemm(dgates2[:, :2 * H], TRANS, x2, NO_TRANS, dw_ih[:2 * H], 1.0)
        # dw_ih[2H:] += dgates_n.T @ x                                     (H, I)
        gemm(dgates_n2, TRANS, x2, NO_TRANS, dw_ih[2 * H:], 1.0)
        # dx += dgates[:, :2H] @ w_ih[:2H]                                 (T*B, I)
        gemm(dgates2[:, :2 * H], NO_TRANS, w_ih[:2 * H], NO_TRANS, dx2, 1.0)
        # dx += dgates_n @ w_ih[2H:]                                       (T*B, I)
        gemm(dgates_n2, NO_TRANS, w_ih[2 * H:], NO_TRANS, dx2, 1.0)
        # db_ih[:2H] += dgates[:, :2H].sum(axis=0)                         (1, 2H)
        gemm(ones2, NO_TRANS, dgates2[:, :2 * H], NO_TRANS, db_ih2[:, :2 * H], 1.0)
        # db_ih[2H:] += dgates_n.sum(axis=0)                               (1, H)
        gemm(ones2, NO_TRANS, dgates_n2, NO_TRANS, db_ih2[:, 2 * H:], 1.0)
    else:
        # dw_ih += dgates.T @ x                                            (G*H, I)
        gemm(dgates2, TRANS, x2, NO_TRANS, dw_ih, 1.0)
        # dx += dgates @ w_ih                                              (T*B, I)
        gemm(dgates2, NO_TRANS, w_ih, NO_TRANS, dx2, 1.0)
        # db_ih += dgates.sum(axis=0)                                      (1, G*H)
        gemm(ones2, NO_TRANS, dgates2, NO_TRANS, db_ih2, 1.0)
    if code == LSTM_PEEPHOLE:
        # dpeephole += dpeep_rows.sum(axis=0)                              (1, 3H)
        gemm(ones2[:, :B], NO_TRANS, dpeep_rows, NO_TRANS, dpeephole.reshape((1, 3 * H)), 1.0)
