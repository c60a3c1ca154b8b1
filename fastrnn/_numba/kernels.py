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
  h W_hh^T, over its weight rows packed into panels once per call (``pack_panels``,
  ``panel_product``: register tiles of up to 8 batch rows x 32 units) when the call is long
  enough to pay for the packing, else as dot products (``dot_rows``: each weight row read once
  for up to 4 batch rows), and runs the step for its units and every batch row. h is
  double-buffered (threads read all of h_in while each writes its units of h_out). The whole
  loop is one parallel region: the threads meet after each step (each phase for GRU
  reset-before) on atomic counters (``units_loop_part``, ~0.2 us), where a launch per step
  cost ~1.5 us (omp; ~120 us with workqueue).
  Its weight rows are the same every step, so they stay in the thread's core's cache. The
  input projection of all T steps is done first in the same region by the same threads, for
  their own units, with the same kernel (no BLAS: OpenBLAS's pool threads go on spinning after
  a call and then take the cores from the unit threads).

``step`` is one step of inference of one layer and direction, both products as unit-split
dot products: layer_step, and each row of a layer's one-step call (layer_call_step). It takes
the whole (rows, B, H) state arrays and a row, and works on borrowed arrays (see borrowed).

Why a switch and not step functions passed as arguments: a function argument is part of the
compiled type, so each cell would compile its own copy of the loop (and Numba does not cache
functions that take other dispatchers as arguments). With the switch, each loop and each pass
compiles once per dtype with every cell in it; the branch costs nothing next to a row.

Outside the time loop: the input projection of all T steps is done before it; after the
backward loop the weight and input gradients are merged GEMMs over all T*B rows, and the bias
and peephole gradients are reductions done as GEMMs with a vector of ones.

The batch-row loop over packed weights (B <= config.PACKED_B_MAX, calls long enough to pay
for packing; fastrnn._numba decides): the per-step products multiply over w_hh packed once per
call (its rows forward, its columns backward) with ``block_product``, the same register tiles
as the unit-split loop's; on a pool of threads (the default) the input projection, dx and the
weight gradients are packed products too (``pack_and_multiply``, ``weight_gradient``) and the
bias gradients column sums (``packed_gradients``), so the call makes no BLAS call and every
product (split by panels) and pass (split by rows) runs on all the threads.

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

import llvmlite.binding as _llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .. import cells
from . import amx, config
from .blas import NO_TRANS, TRANS, gemm

RNN_TANH = cells.RNN_TANH.code
RNN_RELU = cells.RNN_RELU.code
LSTM = cells.LSTM.code
LSTM_PEEPHOLE = cells.LSTM_PEEPHOLE.code
GRU = cells.GRU.code
GRU_RESET_BEFORE = cells.GRU_RESET_BEFORE.code


# ---------------------------------------------------------------------------------------------
# Borrowed arrays. Numba counts references to an array's memory with atomic adds (NRT_incref /
# NRT_decref): at the entry and exit of every compiled function it is passed to, and for every
# view or slice made of it. A one-step call of the kernels here makes about 300 (LSTM H = 128: 20 %
# of its time; the threads of the unit-split loop make theirs on the same counters). A borrowed
# array is the same array with no owner: its views and slices are counted on nothing (the
# runtime returns at once for a null owner). Only for arrays that something else keeps alive
# for the whole use: the caller's arguments, or a local kept to the end by keep_alive.

@intrinsic
def borrowed(typingctx, a):
    """a as an array that holds no reference (see above)."""
    if not isinstance(a, types.Array):
        return None

    def codegen(context, builder, signature, args):
        view = context.make_array(a)(context, builder, value=args[0])
        view.meminfo = cgutils.get_null_value(view.meminfo.type)
        view.parent = cgutils.get_null_value(view.parent.type)
        return view._getvalue()
    return a(a), codegen


@intrinsic
def keep_alive(typingctx, a):
    """Nothing, but a is in use up to here (Numba frees a local after its last use)."""
    if not isinstance(a, types.Array):
        return None
    return types.none(a), lambda context, builder, signature, args: context.get_dummy_value()


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
# The forward steps loop over slices of [j0, j1), from 0: a loop over range(j0, j1) indexing
# a[j] is NOT vectorised (j might be negative, and Numba's wraparound of negative indices makes
# the address a select), and ran scalar: 9.4 us against 2.3 a step for 4 rows x 128 units of
# LSTM, float32; same results, bit for bit.

# RNN:  h_new = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu
#
# The forward row steps work on a range of hidden units [j0, j1) of batch row b (the whole row
# in the batch-row loop, one thread's units in the unit-split loop): gate block g of unit j is
# at g*H + j. They read the state from h_in / c_in and write it to h_out / c_out; the batch-row
# loop passes the same array for both (in place), the unit-split loop two buffers for h (other
# threads read all of h_in while this one writes its units of h_out) and one for c (a unit's c
# is only ever read by the thread that owns it).

@njit(**config.KERNEL)
def rnn_forward_row(b, t, j0, j1, gs, go, relu, train, gates, hgates, b_ih, b_hh, h_in, h_out,
                    y, h_prev):
    zero = h_in.dtype.type(0)
    n = j1 - j0
    a, hg = gates[t, b, go:go + n], hgates[b, go:go + n]
    h_row, h_new = h_in[b, j0:j1], h_out[b, j0:j1]
    bi, bh, y_row = b_ih[j0:j1], b_hh[j0:j1], y[t, b, j0:j1]
    for k in range(n):
        a[k] = a[k] + bi[k] + (hg[k] + bh[k])
    if relu:
        for k in range(n):
            a[k] = zero if a[k] < zero else a[k]  # not max(): NaN must stay NaN
    else:
        for k in range(n):
            a[k] = tanh(a[k])
    if train:
        h_prev_row = h_prev[t, b, j0:j1]
        for k in range(n):
            h_prev_row[k] = h_row[k]
    for k in range(n):
        h_new[k] = a[k]
    for k in range(n):
        y_row[k] = a[k]


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
def lstm_forward_row(b, t, j0, j1, gs, go, peep, train, gates, hgates, b_ih, b_hh, peephole,
                     h_in, h_out, c_in, c_out, y, h_prev, c_prev):
    H = h_in.shape[1]
    n = j1 - j0
    a, hg = gates[t, b], hgates[b]
    a_i, a_f = a[go:go + n], a[gs + go:gs + go + n]
    a_g, a_o = a[2 * gs + go:2 * gs + go + n], a[3 * gs + go:3 * gs + go + n]
    h_row, h_new, c_row, c_new = h_in[b, j0:j1], h_out[b, j0:j1], c_in[b, j0:j1], c_out[b, j0:j1]
    # a = x W_ih^T + b_ih + h W_hh^T + b_hh, blocks i f g o; then activated in place
    for g in range(4):
        lo, go_g = g * H + j0, g * gs + go
        a_g_, hg_g = a[go_g:go_g + n], hg[go_g:go_g + n]
        bi_g, bh_g = b_ih[lo:lo + n], b_hh[lo:lo + n]
        for k in range(n):
            a_g_[k] = a_g_[k] + bi_g[k] + (hg_g[k] + bh_g[k])
    if peep:
        p_i, p_f, p_o = peephole[0, j0:j1], peephole[1, j0:j1], peephole[2, j0:j1]
        for k in range(n):
            a_i[k] += p_i[k] * c_row[k]
            a_f[k] += p_f[k] * c_row[k]
    for k in range(n):
        a_i[k] = sigmoid(a_i[k])
    for k in range(n):
        a_f[k] = sigmoid(a_f[k])
    for k in range(n):
        a_g[k] = tanh(a_g[k])
    if train:
        h_prev_row, c_prev_row = h_prev[t, b, j0:j1], c_prev[t, b, j0:j1]
        for k in range(n):
            h_prev_row[k] = h_row[k]
            c_prev_row[k] = c_row[k]
    for k in range(n):
        # c_new = f * c + i * g
        c_new[k] = a_f[k] * c_row[k] + a_i[k] * a_g[k]
    if peep:
        for k in range(n):
            a_o[k] += p_o[k] * c_new[k]
    for k in range(n):
        o = sigmoid(a_o[k])
        a_o[k] = o
        # h_new = o * tanh(c_new)
        h_new[k] = o * tanh(c_new[k])
    y_row = y[t, b, j0:j1]
    for k in range(n):
        y_row[k] = h_new[k]


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
def gru_rz_row(a, hg, b_ih, b_hh, j0, n, gs, go):
    """r and z of one row, units [j0, j0 + n), both GRU forms: a = sigmoid(a + b_ih + (hg +
    b_hh)) in blocks 0 and 1 (a, hg: the row's gates and h W_hh^T, laid out as in
    forward_units)."""
    H = b_ih.shape[0] // 3
    for g in range(2):
        lo, go_g = g * H + j0, g * gs + go
        a_g, hg_g = a[go_g:go_g + n], hg[go_g:go_g + n]
        bi_g, bh_g = b_ih[lo:lo + n], b_hh[lo:lo + n]
        for k in range(n):
            a_g[k] = sigmoid(a_g[k] + bi_g[k] + (hg_g[k] + bh_g[k]))      # r, z


@njit(**config.KERNEL)
def gru_new_state_row(b, t, j0, j1, train, a_z, a_n, h_in, h_out, y, h_prev):
    """The end of a GRU row's step, both forms: h' = (1 - z) * n + z * h into h_out and y, and
    with train the old h into h_prev first."""
    one = h_in.dtype.type(1)
    n = j1 - j0
    h_row, h_new = h_in[b, j0:j1], h_out[b, j0:j1]
    if train:
        h_prev_row = h_prev[t, b, j0:j1]
        for k in range(n):
            h_prev_row[k] = h_row[k]
    for k in range(n):
        z = a_z[k]
        h_new[k] = (one - z) * a_n[k] + z * h_row[k]
    y_row = y[t, b, j0:j1]
    for k in range(n):
        y_row[k] = h_new[k]


@njit(**config.KERNEL)
def gru_forward_row(b, t, j0, j1, gs, go, train, gates, hgates, b_ih, b_hh, h_in, h_out, y,
                    h_prev, hn_saved):
    H = h_in.shape[1]
    n = j1 - j0
    a, hg = gates[t, b], hgates[b]
    a_r, a_z, a_n = a[go:go + n], a[gs + go:gs + go + n], a[2 * gs + go:2 * gs + go + n]
    n0 = 2 * H + j0
    hg_n, bi_n, bh_n = hg[2 * gs + go:2 * gs + go + n], b_ih[n0:n0 + n], b_hh[n0:n0 + n]
    gru_rz_row(a, hg, b_ih, b_hh, j0, n, gs, go)
    for k in range(n):
        hg_n[k] += bh_n[k]                                               # hn = W_hn h + b_hn
    for k in range(n):
        a_n[k] = tanh(a_n[k] + bi_n[k] + a_r[k] * hg_n[k])               # n
    if train:
        hn_row = hn_saved[t, b, j0:j1]
        for k in range(n):
            hn_row[k] = hg_n[k]
    gru_new_state_row(b, t, j0, j1, train, a_z, a_n, h_in, h_out, y, h_prev)


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
def gru_reset_before_forward_row(b, t, j0, j1, gs, go, phase, train, gates, hgates, b_ih, b_hh,
                                 h_in, h_out, y, h_prev, rh):
    H = h_in.shape[1]
    n = j1 - j0
    a, hg, h_row = gates[t, b], hgates[b], h_in[b, j0:j1]
    if phase == 0:
        gru_rz_row(a, hg, b_ih, b_hh, j0, n, gs, go)
        a_r, rh_row = a[go:go + n], rh[b, j0:j1]
        for k in range(n):
            rh_row[k] = a_r[k] * h_row[k]     # between the phases: hn = rh @ W_hn.T
    else:
        lo, go_n = 2 * H + j0, 2 * gs + go
        a_n, hg_n = a[go_n:go_n + n], hg[go_n:go_n + n]
        bi_n, bh_n = b_ih[lo:lo + n], b_hh[lo:lo + n]
        for k in range(n):
            a_n[k] = tanh(a_n[k] + bi_n[k] + (hg_n[k] + bh_n[k]))         # n
        gru_new_state_row(b, t, j0, j1, train, a[gs + go:gs + go + n], a_n, h_in, h_out, y,
                          h_prev)


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
def forward_units(code, phase, t, b, j0, j1, gs, go, lengths, train, gates, hgates, b_ih, b_hh,
                  peephole, h_in, h_out, c, y, h_prev, saved, rh):
    """The forward step of row b, units [j0, j1), for the cell ``code``; padding rows too.
    Gate block g of unit j0 + k is at g*gs + go + k in gates[t, b] and hgates[b] (gs = H, go =
    j0: the layout of the layer; see units_pass for the other), at g*H + j0 + k in the biases."""
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
        rnn_forward_row(b, t, j0, j1, gs, go, code == RNN_RELU, train, gates, hgates, b_ih,
                        b_hh, h_in, h_out, y, h_prev)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_forward_row(b, t, j0, j1, gs, go, code == LSTM_PEEPHOLE, train, gates, hgates,
                         b_ih, b_hh, peephole, h_in, h_out, c, c, y, h_prev, saved)
    elif code == GRU:
        gru_forward_row(b, t, j0, j1, gs, go, train, gates, hgates, b_ih, b_hh, h_in, h_out, y,
                        h_prev, saved)
    else:
        gru_reset_before_forward_row(b, t, j0, j1, gs, go, phase, train, gates, hgates, b_ih,
                                     b_hh, h_in, h_out, y, h_prev, rh)


@njit(**config.PARALLEL)
def forward_rows(code, phase, t, lengths, train, gates, hgates, b_ih, b_hh, peephole, h, c, y,
                 h_prev, saved, rh):
    H = h.shape[1]
    for row in prange(h.shape[0]):
        b = np.int64(row)  # one type for the row steps in the serial and the parallel typing
        forward_units(code, phase, t, b, 0, H, H, 0, lengths, train, gates, hgates, b_ih, b_hh,
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


def _dot_tile(R, MR):
    """An intrinsic ``tile(w, r, v, b, out, col)``: out[b + m, col + i] = w[r + i, :Kv] .
    v[b + m, :Kv] for i < R, m < MR, Kv = K less K modulo the lanes of a vector (the caller adds
    the rest). R*MR full-width vector accumulators, one vector load of each of the R weight rows
    and the MR rows of v per step along k; the sums end in one tree of shuffles and adds over all
    the accumulators at once (pairs of accumulators share each add). The same tile on the same
    rows gives the same sums to the last bit, in any order of tiles.

    Written in LLVM vector types for the reason _panel_tile is: left to the loop vectoriser,
    _rows_x1's half-width vectors read a float32 LSTM step's 512 KB of weights in 5.3 us a core
    where the Cython backend's 512-bit kernel takes 3.3 (aligned weights, L2). w and v must be
    C-contiguous (their rows are read with vector loads); out any layout."""

    @intrinsic
    def tile(typingctx, w, r, v, b, out, col):
        arrays = (w, v, out)
        if not (all(isinstance(a, types.Array) for a in arrays)
                and w.layout == "C" and v.layout == "C"
                and (w.ndim, v.ndim, out.ndim) == (2, 2, 2)
                and w.dtype == v.dtype == out.dtype
                and w.dtype in (types.float32, types.float64)
                and all(isinstance(i, types.Integer) for i in (r, b, col))):
            return None
        sig = types.void(w, r, v, b, out, col)

        def codegen(context, builder, signature, args):
            w_ty, _, v_ty, _, out_ty, _ = signature.args
            w_a = context.make_array(w_ty)(context, builder, args[0])
            v_a = context.make_array(v_ty)(context, builder, args[2])
            out_a = context.make_array(out_ty)(context, builder, args[4])
            r_i, b_i, col_i = (context.cast(builder, args[k], signature.args[k], types.intp)
                               for k in (1, 3, 5))
            intp = context.get_value_type(types.intp)
            i32 = ir.IntType(32)
            real = context.get_value_type(w_ty.dtype)
            itemsize = context.get_abi_sizeof(real)
            lanes = config.PANEL_VECTOR_BYTES // itemsize
            vec = ir.VectorType(real, lanes)
            vec_ptr = vec.as_pointer()

            def const(n):
                return ir.Constant(intp, n)

            def row(ty, a, i):
                return cgutils.get_item_pointer(context, builder, ty, a, [i, const(0)])

            w_rows = [row(w_ty, w_a, builder.add(r_i, const(i))) for i in range(R)]
            v_rows = [row(v_ty, v_a, builder.add(b_i, const(m))) for m in range(MR)]
            chunks = builder.sdiv(builder.extract_value(v_a.shape, 1), const(lanes))
            acc = [cgutils.alloca_once(builder, vec) for _ in range(R * MR)]   # m * R + i
            for a in acc:
                builder.store(ir.Constant(vec, None), a)
            with cgutils.for_range(builder, chunks) as loop:
                k = builder.mul(loop.index, const(lanes))

                def load(p):
                    return builder.load(builder.bitcast(builder.gep(p, [k]), vec_ptr),
                                        align=itemsize)

                ws = [load(p) for p in w_rows]
                for m in range(MR):
                    x = load(v_rows[m])
                    for i in range(R):
                        a = acc[m * R + i]
                        product = builder.fmul(ws[i], x, flags=_PANEL_FLAGS)
                        builder.store(builder.fadd(builder.load(a), product,
                                                   flags=_PANEL_FLAGS), a)
            # the sums: each vector holds groups of `size` lanes, one group per accumulator, in
            # accumulator order; two vectors become one by adding the lower and the upper half
            # of every group, until each group is one lane
            parts, size = [builder.load(a) for a in acc], lanes

            def halves(x, y, n, upper):
                # lanes of x (then y) whose place in their group of n is in its lower (upper) half
                groups = [g for g in range(0, 2 * lanes, n) if y is not None or g < lanes]
                mask = [g + upper * (n // 2) + j for g in groups for j in range(n // 2)]
                return builder.shuffle_vector(x, y if y is not None else x,
                                              ir.Constant(ir.VectorType(i32, len(mask)), mask))

            while size > 1:
                if len(parts) > 1:
                    parts = [builder.fadd(halves(x, y, size, 0), halves(x, y, size, 1),
                                          flags=_PANEL_FLAGS)
                             for x, y in zip(parts[0::2], parts[1::2])]
                else:
                    x = parts[0]
                    parts = [builder.fadd(halves(x, None, size, 0), halves(x, None, size, 1),
                                          flags=_PANEL_FLAGS)]
                    lanes = lanes // 2     # the vector is half as long now
                size //= 2
            total = 0
            for part in parts:
                for j in range(part.type.count):
                    m, i = divmod(total, R)
                    dst = cgutils.get_item_pointer(
                        context, builder, out_ty, out_a,
                        [builder.add(b_i, const(m)), builder.add(col_i, const(i))])
                    builder.store(builder.extract_element(part, ir.Constant(i32, j)), dst)
                    total += 1
            return context.get_dummy_value()

        return sig, codegen

    return tile


_dot_8x1 = _dot_tile(8, 1)
_dot_4x2 = _dot_tile(4, 2)


@njit(**config.KERNEL)
def _dot_tail(w, r, R, v, b, MR, out, col, k0):
    """Adds what a _dot_tile left out, k >= k0, to its results."""
    for m in range(MR):
        for i in range(R):
            s = out[b + m, col + i]
            for k in range(k0, v.shape[1]):
                s += w[r + i, k] * v[b + m, k]
            out[b + m, col + i] = s


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


# dot_rows' runs of rows when it reads them last to first
ZIGZAG_ROWS = 32


@njit(**config.KERNEL)
def dot_rows(w, stride, first_block, blocks, j0, j1, v, out, gs, go, backwards=False):
    """out[b, g*gs + go + j - j0] = w[r] . v[b] for the rows r = g*stride + j, first_block <= g
    < first_block + blocks, j0 <= j < j1, every batch row b of v (B, K); w (rows, K), out (B,
    .); gs = stride, go = j0 put each result in column r.

    Tiles of 4 weight rows x 4 (or 2, or 1) batch rows: up to 16 accumulators in one loop over
    k, each weight and each element of v loaded once per tile (the reductions vectorise:
    fastmath "reassoc"; many dot products in flight hide the horizontal sum that ends each).
    A unit range of a thread is read once per 4 batch rows, so it stays in the core's cache.

    backwards: the blocks and their rows last to first, in runs of ZIGZAG_ROWS from the block's
    start (the same tiles, so the same sums to the last bit): the unit-split loop reads every
    other step so, and a thread's rows that about fill its L2 are then still there when read
    again (see the Cython loop)."""
    n = j1 - j0
    n4 = n // 4 * 4
    for i in range(blocks):
        g = first_block + blocks - 1 - i if backwards else first_block + i
        r0 = g * stride + j0
        col = g * gs + go
        wg, og = w[r0:r0 + n], out[:, col:col + n]
        if n4 < n:
            _rows_single(wg, n4, n, v, og)
        if not backwards:
            _rows_tiles(wg, 0, n4, v, og)
        else:
            end = n4
            while end > 0:
                start = (end - 1) // ZIGZAG_ROWS * ZIGZAG_ROWS
                _rows_tiles(wg, start, end, v, og)
                end = start


@njit(**config.KERNEL)
def _rows_tiles(w, r0, r1, v, out):
    """out[:, r] = w[r] . v[:] for r in [r0, r1), r1 - r0 a multiple of 4: every batch row."""
    if r1 <= r0:
        return
    B = v.shape[0]
    b = 0
    while b + 4 <= B:
        _rows_x4(w, r0, r1, v, b, out)
        b += 4
    if b + 2 <= B:
        _rows_vector_x2(w, r0, r1, v, b, out)
        b += 2
    if b < B:
        _rows_vector_x1(w, r0, r1, v, b, out)


def _rows_vector_x1(w, r0, r1, v, b, out):
    """_rows_x1 in 8-row vector tiles (_dot_8x1) where w and v are C-contiguous (the 4 rows
    a range may have over a multiple of 8: _rows_x1)."""


def _rows_vector_x2(w, r0, r1, v, b, out):
    """_rows_x2 in vector tiles of 4 rows x 2 vectors (_dot_4x2) where w and v are
    C-contiguous."""


def _vector_rows(tile, R, MR, loop):
    def choose(w, r0, r1, v, b, out):
        if not (isinstance(w, types.Array) and isinstance(v, types.Array)
                and w.layout == "C" and v.layout == "C"):
            return lambda w, r0, r1, v, b, out: loop(w, r0, r1, v, b, out)

        def rows(w, r0, r1, v, b, out):
            K = v.shape[1]
            k0 = K - K % (config.PANEL_VECTOR_BYTES // v.itemsize)
            r = r0
            while r + R <= r1:
                tile(w, r, v, b, out, r)
                if k0 < K:
                    _dot_tail(w, r, R, v, b, MR, out, r, k0)
                r += R
            loop(w, r, r1, v, b, out)
        return rows
    return choose


overload(_rows_vector_x1, jit_options=config.KERNEL)(_vector_rows(_dot_8x1, 8, 1, _rows_x1))
overload(_rows_vector_x2, jit_options=config.KERNEL)(_vector_rows(_dot_4x2, 4, 2, _rows_x2))


# ---------------------------------------------------------------------------------------------
# Packed panels: the unit-split loop's products with the weights packed once per call.
#
# pack_panels stores a block of n weight rows w[r0 .. r0+n-1] (each of length K) as panels of
# NR consecutive rows, panel q a contiguous (K, NR) block: packed[q, i, j] = w[r0 + q*NR + j, i]
# (the last panel zero-padded). NR is two vector registers' worth of lanes (PANEL_BYTES, see
# config.PANEL_VECTOR_BYTES): 32 float32 or 16 float64 with AVX-512. The product then computes
# an MR x NR tile of the result (MR batch rows) at a time: for each i, the NR weights of row i
# of the panel (two vector loads) times x[b, i] broadcast, added to MR x 2 vector accumulators
# that stay in registers for the whole loop over K. No horizontal sums, and each operation is
# elementwise over the lanes, so nothing is reassociated (NaN propagates as usual).
#
# The tile is written as an intrinsic in LLVM vector types: Numba's loop vectoriser would pick
# half-width vectors on CPUs where LLVM prefers 256-bit ones (every AVX-512 Intel core), and
# measured that runs at ~100 GFLOP/s a core against ~150 at full width (float32, B = 16,
# K = 256); the dot products of dot_rows at ~85-95.

PANEL_BYTES = 2 * config.PANEL_VECTOR_BYTES
_PANEL_FLAGS = ("contract",)      # a * b + c may become one fused multiply-add; nothing else


def _panel_tile(MR, NP):
    """An intrinsic ``tile(packed, q, v, b, out, col, cols, accumulate)``: out[b + m, col + c]
    (+)= sum_i v[b + m, i] * packed[q + c // NR, i, c % NR] for m < MR, c < min(cols, NP*NR):
    MR rows of v against the NP panels q .. q+NP-1, 2*MR*NP vector accumulators; accumulate
    (a run-time flag) adds the sums to out, else out is overwritten. When cols < NP*NR (a
    last, padded panel) the tile goes through a stack buffer and only cols columns are
    written. packed and out C-contiguous, v any layout (a transposed view: its elements are
    read with its column stride), all of one dtype."""

    @intrinsic
    def tile(typingctx, packed, q, v, b, out, col, cols, accumulate):
        arrays = (packed, v, out)
        if not (all(isinstance(a, types.Array) for a in arrays)
                and packed.layout == "C" and out.layout == "C"
                and (packed.ndim, v.ndim, out.ndim) == (3, 2, 2)
                and packed.dtype == v.dtype == out.dtype
                and packed.dtype in (types.float32, types.float64)
                and all(isinstance(i, types.Integer) for i in (q, b, col, cols))
                and isinstance(accumulate, types.Boolean)):
            return None
        sig = types.void(packed, q, v, b, out, col, cols, accumulate)

        def codegen(context, builder, signature, args):
            packed_ty, _, v_ty, _, out_ty, _, _, _ = signature.args
            packed_a = context.make_array(packed_ty)(context, builder, args[0])
            v_a = context.make_array(v_ty)(context, builder, args[2])
            out_a = context.make_array(out_ty)(context, builder, args[4])
            q_i, b_i, col_i, cols_i = (context.cast(builder, args[k], signature.args[k],
                                                    types.intp) for k in (1, 3, 5, 6))
            add = args[7]
            intp = context.get_value_type(types.intp)
            real = context.get_value_type(packed_ty.dtype)
            itemsize = context.get_abi_sizeof(real)
            lanes = config.PANEL_VECTOR_BYTES // itemsize
            NR = 2 * lanes
            vec = ir.VectorType(real, lanes)
            vec_ptr = vec.as_pointer()

            def const(n):
                return ir.Constant(intp, n)

            K = builder.extract_value(packed_a.shape, 1)
            panel = builder.mul(K, const(NR))                      # elements per panel
            first = builder.gep(packed_a.data, [builder.mul(q_i, panel)])
            v_rows = [cgutils.get_item_pointer(context, builder, v_ty, v_a,
                                               [builder.add(b_i, const(m)), const(0)])
                      for m in range(MR)]
            # elements from one i to the next in a row of v
            v_inc = const(1) if v_ty.layout == "C" else builder.sdiv(
                builder.extract_value(v_a.strides, 1), const(itemsize))
            # the accumulators: allocas of vector type, promoted to registers by LLVM
            acc = [[cgutils.alloca_once(builder, vec) for _ in range(2 * NP)] for _ in range(MR)]
            zero = ir.Constant(vec, None)
            for row in acc:
                for a in row:
                    builder.store(zero, a)
            undef = ir.Constant(vec, ir.Undefined)
            splat = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
            with cgutils.for_range(builder, K) as loop:
                i = loop.index
                w = []
                for p in range(NP):
                    at = builder.gep(first, [builder.add(builder.mul(const(p), panel),
                                                         builder.mul(i, const(NR)))])
                    for half in range(2):
                        ptr = builder.bitcast(builder.gep(at, [const(half * lanes)]), vec_ptr)
                        w.append(builder.load(ptr, align=itemsize))
                for m in range(MR):
                    s = builder.load(builder.gep(v_rows[m], [builder.mul(i, v_inc)]))
                    s = builder.shuffle_vector(
                        builder.insert_element(undef, s, ir.Constant(ir.IntType(32), 0)),
                        undef, splat)
                    for k in range(2 * NP):
                        product = builder.fmul(s, w[k], flags=_PANEL_FLAGS)
                        total = builder.fadd(builder.load(acc[m][k]), product, flags=_PANEL_FLAGS)
                        builder.store(total, acc[m][k])
            full = builder.icmp_signed(">=", cols_i, const(NP * NR))
            with builder.if_else(full, likely=True) as (whole, part):
                with whole:
                    for m in range(MR):
                        dst = cgutils.get_item_pointer(context, builder, out_ty, out_a,
                                                       [builder.add(b_i, const(m)), col_i])
                        for k in range(2 * NP):
                            ptr = builder.bitcast(builder.gep(dst, [const(k * lanes)]), vec_ptr)
                            total = builder.load(acc[m][k])
                            old = builder.load(ptr, align=itemsize)
                            total = builder.select(add, builder.fadd(old, total), total)
                            builder.store(total, ptr, align=itemsize)
                with part:
                    buffer = cgutils.alloca_once(builder, real, size=NP * NR)
                    for m in range(MR):
                        for k in range(2 * NP):
                            ptr = builder.bitcast(builder.gep(buffer, [const(k * lanes)]),
                                                  vec_ptr)
                            builder.store(builder.load(acc[m][k]), ptr, align=itemsize)
                        dst = cgutils.get_item_pointer(context, builder, out_ty, out_a,
                                                       [builder.add(b_i, const(m)), col_i])
                        with cgutils.for_range(builder, cols_i) as copy:
                            c = copy.index
                            total = builder.load(builder.gep(buffer, [c]))
                            old = builder.load(builder.gep(dst, [c]))
                            total = builder.select(add, builder.fadd(old, total), total)
                            builder.store(total, builder.gep(dst, [c]))
            return context.get_dummy_value()

        return sig, codegen

    return tile


# The tiles: rows of v x panels. 16 accumulators where there are 32 registers (AVX-512), 8
# otherwise; measured (float32, AVX-512): 8x1 and 4x2 ~150 GFLOP/s at B = 16 and 4; 2x2 and
# 1x4 are bound by the cache's bandwidth (wider tiles measured no faster).
_WIDE = config.PANEL_ACCUMULATORS >= 16
_tile_8x1 = _panel_tile(8, 1)
_tile_4x2 = _panel_tile(4, 2 if _WIDE else 1)
_tile_4x1 = _panel_tile(4, 1)
_tile_2x2 = _panel_tile(2, 2)
_tile_2x1 = _panel_tile(2, 1)
_tile_1x4 = _panel_tile(1, 4)
_tile_1x1 = _panel_tile(1, 1)
_PAIR = 2 if _WIDE else 1        # panels per 4-row tile


@njit(**config.KERNEL)
def panel_width(a):
    """NR, the rows per panel for the dtype of a."""
    return PANEL_BYTES // a.itemsize


@njit(**config.KERNEL)
def panel_buffer(shape, like):
    """An uninitialised array of this shape for panels, dtype of like, starting on a 64-byte
    boundary (a panel row is then whole cache lines)."""
    n = 1
    for s in shape:
        n *= s
    align = 64 // like.itemsize
    flat = np.empty(n + align, like.dtype)
    skip = (-(flat.ctypes.data // like.itemsize)) % align
    return flat[skip:skip + n].reshape(shape)


@njit(**config.KERNEL)
def pack_panels(w, r0, n, packed):
    """packed[q, i, j] = w[r0 + q*NR + j, i] for q*NR + j < n, zero after: the n rows of w from
    r0 on as panels of NR rows, packed (>= ceil(n / NR), K, NR), w (rows, K).

    Written row of the panel by row (contiguous stores, loads from NR rows of w whose cache
    lines stay in L1 for the next 16 i or so): 2.4x faster than reading w row by row."""
    zero = w.dtype.type(0)
    NR = packed.shape[2]
    K = w.shape[1]
    for q in range(-(-n // NR)):
        panel = packed[q]
        r = r0 + q * NR
        m = min(NR, n - q * NR)                  # real rows in this panel
        for i in range(K):
            line = panel[i]
            for j in range(m):
                line[j] = w[r + j, i]
            for j in range(m, NR):
                line[j] = zero


@njit(**config.KERNEL)
def panel_product(packed, col, n, v, out):
    """out[b, col + r] = w[r0 + r] . v[b] for r < n, every batch row b of v (B, K); packed is
    what pack_panels(w, r0, n, packed) made, out (B, >= col + n).

    Tiles of 8 (or 4, 2, 1) batch rows x 1 (or 2, 4) panels, the panel loop inside the row
    loop: a thread's panels are read once per tile of rows and stay in its core's cache."""
    B = v.shape[0]
    NR = packed.shape[2]
    b = 0
    while b < B:
        left = B - b
        if _WIDE and left >= 8:
            for q in range(-(-n // NR)):
                _tile_8x1(packed, q, v, b, out, col + q * NR, n - q * NR, False)
            b += 8
        else:
            mr = 4 if left >= 4 else (2 if left >= 2 else 1)
            _rows_times_panels(mr, packed, v, b, out, col, n, False)
            b += mr


@njit(**config.KERNEL)
def _rows_times_panels(mr, packed, v, b, out, col, n, accumulate):
    """Rows b .. b + mr - 1 of v (mr = 4, 2 or 1) times every panel, as panel_product and
    block_product take them: the tile of mr rows over as many panels as fit the registers
    (4x2, 2x2, 1x4), then the panels left one at a time."""
    NR = packed.shape[2]
    panels = -(-n // NR)
    whole = n // NR                                  # panels with NR real rows
    step = _PAIR if mr == 4 else (2 if mr == 2 else 4)
    q = 0
    while q + step <= whole:
        if mr == 4:
            _tile_4x2(packed, q, v, b, out, col + q * NR, n - q * NR, accumulate)
        elif mr == 2:
            _tile_2x2(packed, q, v, b, out, col + q * NR, n - q * NR, accumulate)
        else:
            _tile_1x4(packed, q, v, b, out, col + q * NR, n - q * NR, accumulate)
        q += step
    while q < panels:
        if mr == 4:
            _tile_4x1(packed, q, v, b, out, col + q * NR, n - q * NR, accumulate)
        elif mr == 2:
            _tile_2x1(packed, q, v, b, out, col + q * NR, n - q * NR, accumulate)
        else:
            _tile_1x1(packed, q, v, b, out, col + q * NR, n - q * NR, accumulate)
        q += 1


# ---------------------------------------------------------------------------------------------
# The GEMM loop over packed weights (B <= config.PACKED_B_MAX and T*B rows enough to pay for
# packing; see forward_loop, backward_loop). The per-step products run over w_hh packed once
# per call (its rows forward, its columns backward: pack_panels of the transposed view), the
# input projection and backward's products after the loop pack their weights (or a chunk of
# the weight gradients' operand) and multiply in the same parallel launch; each product splits
# its panels over the threads (one launch per product, ~1.5 us), the passes their batch rows.

_MR = 8 if _WIDE else 4           # rows of v per tile against one panel
_X_BLOCK_BYTES = config.PANEL_X_BLOCK_BYTES
_GRAD_CHUNK = config.GRAD_CHUNK
_tile_mr = _tile_8x1 if _WIDE else _tile_4x1


@njit(**config.KERNEL)
def pack_tiles(v, c0, tiles):
    """tiles[t, i, j] = v[c0 + t*MR + j, i] for the tiles.shape[0] tiles of MR rows of v from
    c0: each tile of rows as one contiguous stream (a micro-panel) for _tile_mr."""
    MR = tiles.shape[2]
    for i in range(v.shape[1]):
        for t in range(tiles.shape[0]):
            line = tiles[t, i]
            for j in range(MR):
                line[j] = v[c0 + t * MR + j, i]


@njit(**config.KERNEL)
def block_product(packed, n, v, out, col, accumulate):
    """out[b, col + r] (+)= sum_i v[b, i] * W[r, i] for r < n and every row b of v (B, K), W
    packed by pack_panels into packed (>= ceil(n / NR), K, NR); v of any layout (a transposed
    view is read with its column stride); accumulate: add to out, else overwrite it.

    The rows of v in blocks of about config.PANEL_X_BLOCK_BYTES, which stay in L2 while each
    panel in turn meets all of them, _MR rows at a time (the panel stays in L1 or L2 for the
    block); the rows left over take smaller tiles over several panels. A v whose rows are
    not contiguous (the transposed operand of the weight gradients) has each block copied
    into micro-panels first (pack_tiles): read in place, K lines far apart for every tile,
    the product ran at 70-75 % of its speed on contiguous rows."""
    B, K = v.shape
    NR = packed.shape[2]
    panels = -(-n // NR)
    blk = max(_MR, _X_BLOCK_BYTES // (v.itemsize * max(1, K)) // _MR * _MR)
    tiled = K > 1 and v.strides[1] != v.itemsize and B >= _MR
    tiles = np.empty((blk // _MR if tiled else 0, K, _MR), v.dtype)
    for c0 in range(0, B, blk):
        c1 = min(B, c0 + blk)
        full = c0 + (c1 - c0) // _MR * _MR
        if tiled:
            mine = tiles[:(full - c0) // _MR]
            pack_tiles(v, c0, mine)
            for q in range(panels):
                for t in range(mine.shape[0]):
                    _tile_mr(packed, q, mine[t].T, 0, out[c0 + t * _MR:], col + q * NR,
                             n - q * NR, accumulate)
        else:
            for q in range(panels):
                for b in range(c0, full, _MR):
                    _tile_mr(packed, q, v, b, out, col + q * NR, n - q * NR, accumulate)
        b = full
        while b < c1:                     # fewer than _MR rows left: smaller tiles
            left = c1 - b
            mr = 4 if left >= 4 else (2 if left >= 2 else 1)
            _rows_times_panels(mr, packed, v, b, out, col, n, accumulate)
            b += mr


@njit(**config.KERNEL)
def panel_part(p, P, n, NR):
    """Rows [r0, r1) of part p of P when n rows in panels of NR are split by whole panels."""
    per = -(-(-(-n // NR)) // P)
    r0 = min(n, p * per * NR)
    return r0, min(n, r0 + per * NR)


@njit(**config.PARALLEL)
def _product_parts(P, packed, n, v, out, col, accumulate):
    NR = packed.shape[2]
    for part in prange(P):
        r0, r1 = panel_part(np.int64(part), P, n, NR)
        if r0 < r1:
            block_product(packed[r0 // NR:], r1 - r0, v, out, col + r0, accumulate)


@njit(**config.KERNEL)
def packed_product(P, packed, n, v, out, col, accumulate):
    """block_product with the panels split over P threads (one launch), or on this thread."""
    P = min(P, -(-n // packed.shape[2]))
    if P > 1:
        _product_parts(P, packed, n, v, out, col, accumulate)
    else:
        block_product(packed, n, v, out, col, accumulate)


@njit(**config.PARALLEL)
def _pack_multiply_parts(P, w, n, v, out, accumulate, packed):
    NR = packed.shape[2]
    for part in prange(P):
        r0, r1 = panel_part(np.int64(part), P, n, NR)
        if r0 < r1:
            mine = packed[r0 // NR:]
            pack_panels(w, r0, r1 - r0, mine)
            block_product(mine, r1 - r0, v, out, r0, accumulate)


@njit(**config.KERNEL)
def pack_and_multiply(P, w, n, v, out, accumulate, flat):
    """A one-off product: out[b, r] (+)= v[b] . w[r] for r < n, every row b of v; w (>= n, K)
    and v of any layout. The rows of w are split by whole panels over P threads, each packing
    its own (into flat, an aligned buffer of >= ceil(n / NR) * K * NR elements) and multiplying
    them in the same launch."""
    NR = panel_width(flat)
    K = w.shape[1]
    panels = -(-n // NR)
    packed = flat[:panels * K * NR].reshape((panels, K, NR))
    P = min(P, panels)
    if P > 1:
        _pack_multiply_parts(P, w, n, v, out, accumulate, packed)
    else:
        pack_panels(w, 0, n, packed)
        block_product(packed, n, v, out, 0, accumulate)


@njit(**config.KERNEL)
def weight_gradient(P, d, v, out, flat):
    """out (M, K) += d^T v, d (TB, M) and v (TB, K) of any layout: over chunks of
    config.GRAD_CHUNK rows of T*B, a chunk of v packed by columns (W[c, r] = v[r, c]) and
    multiplied by the chunk of d read by columns, so the chunk stays in L2 while every row of
    out meets it. flat: >= ceil(K / NR) * GRAD_CHUNK * NR elements."""
    TB = d.shape[0]
    K = v.shape[1]
    for r0 in range(0, TB, _GRAD_CHUNK):
        r1 = min(TB, r0 + _GRAD_CHUNK)
        pack_and_multiply(P, v[r0:r1].T, K, d[r0:r1].T, out, True, flat)


@njit(**config.KERNEL)
def _column_sums_part(d, m0, m1, out):
    acc = np.zeros(m1 - m0, d.dtype)
    for r in range(d.shape[0]):
        row = d[r, m0:m1]
        for m in range(m1 - m0):
            acc[m] += row[m]
    for m in range(m1 - m0):
        out[m0 + m] += acc[m]


@njit(**config.PARALLEL)
def _column_sums_parts(P, d, out):
    M = d.shape[1]
    per = -(-M // P)
    for part in prange(P):
        m0 = min(M, part * per)
        m1 = min(M, m0 + per)
        if m0 < m1:
            _column_sums_part(d, m0, m1, out)


@njit(**config.KERNEL)
def column_sums(P, d, out):
    """out[m] += sum_r d[r, m], d (TB, M) of any layout: the columns split over P threads, the
    rows read in order, each column summed from zero and then added to out."""
    if P > 1 and d.shape[1] >= 2 * 64:
        _column_sums_parts(P, d, out)
    else:
        _column_sums_part(d, 0, d.shape[1], out)


@njit(**config.KERNEL)
def pack_step_weights(P, use_amx, w, r0, n, amx_packed, panels):
    """Rows r0 .. r0+n-1 of w packed once per call for the per-step products: on the tile
    unit's layout into amx_packed (P threads), else as panels into panels."""
    if use_amx:
        amx.pack_parts(P, w, r0, n, amx_packed)
    else:
        pack_panels(w, r0, n, panels)


@njit(**config.KERNEL)
def step_product(P, use_amx, amx_packed, panels, n, v, out, col, accumulate):
    """out[:, col:col + n] (+)= v @ W.T over what pack_step_weights packed (the same use_amx)."""
    if use_amx:
        amx.product_parts(P, amx_packed, n, v, out, col, accumulate)
    else:
        packed_product(P, panels, n, v, out, col, accumulate)


@njit(**config.KERNEL)
def one_off_product(P, use_amx, w, n, v, out, flat, amx_flat):
    """out += v @ w[:n].T by pack_and_multiply, or on the tile unit (amx_flat)."""
    if use_amx:
        amx.pack_and_multiply(P, w, n, v, out, True, amx_flat)
    else:
        pack_and_multiply(P, w, n, v, out, True, flat)


@njit(**config.KERNEL)
def any_weight_gradient(P, use_amx, d, v, out, flat, amx_flat):
    """out += d^T v by weight_gradient, or on the tile unit (amx_flat)."""
    if use_amx:
        amx.weight_gradient(P, d, v, out, amx_flat)
    else:
        weight_gradient(P, d, v, out, flat)


@njit(**config.KERNEL)
def packed_gradients(P, code, use_amx, amx_flat, x, w_ih, h_prev, saved, dgates, dgates_n,
                     dpeep_rows, dx, dw_ih, dw_hh, db_ih, db_hh, dpeephole):
    """What weight_gradients does with BLAS, as packed products and column sums on P
    threads; use_amx: the products on the tile unit (T*B >= amx.MIN_ROWS), packing into
    amx_flat (the loop's, done with) when it is big enough."""
    T, B, I = x.shape
    GH = dgates.shape[2]
    H = h_prev.shape[2]
    TB = T * B
    NR = panel_width(x)
    x2 = x.reshape((TB, I))
    dx2 = dx.reshape((TB, I))
    dg2 = dgates.reshape((TB, GH))
    hp2 = h_prev.reshape((TB, H))
    use_amx = use_amx and TB >= amx.MIN_ROWS
    flat = panel_buffer((0 if use_amx else
                         max(-(-I // NR) * GH, -(-max(I, H) // NR) * min(TB, _GRAD_CHUNK)) * NR,),
                        x)
    need = max(amx.packed_size(I, GH),
               amx.packed_size(max(I, H), min(TB, _GRAD_CHUNK))) if use_amx else 0
    if amx_flat.shape[0] < need:
        amx_flat = amx.buffer(need)
    # dx += dgates @ w_ih (input side): W[c, g] = w_ih[g, c]                 (T*B, I)
    if code == GRU:
        dgn2 = dgates_n.reshape((TB, H))
        one_off_product(P, use_amx, w_ih[:2 * H].T, I, dg2[:, :2 * H], dx2, flat, amx_flat)
        one_off_product(P, use_amx, w_ih[2 * H:].T, I, dgn2, dx2, flat, amx_flat)
        # dw_ih[:2H] += dgates[:, :2H].T @ x;  dw_ih[2H:] += dgates_n.T @ x
        any_weight_gradient(P, use_amx, dg2[:, :2 * H], x2, dw_ih[:2 * H], flat, amx_flat)
        any_weight_gradient(P, use_amx, dgn2, x2, dw_ih[2 * H:], flat, amx_flat)
    else:
        one_off_product(P, use_amx, w_ih.T, I, dg2, dx2, flat, amx_flat)
        # dw_ih += dgates.T @ x                                                (G*H, I)
        any_weight_gradient(P, use_amx, dg2, x2, dw_ih, flat, amx_flat)
    # hidden side: dgates is the gradient of W_hh h + b_hh
    if code == GRU_RESET_BEFORE:
        # dw_hh[:2H] += dgates[:, :2H].T @ h_prev;  dw_hh[2H:] += dgates[:, 2H:].T @ rh
        any_weight_gradient(P, use_amx, dg2[:, :2 * H], hp2, dw_hh[:2 * H], flat, amx_flat)
        any_weight_gradient(P, use_amx, dg2[:, 2 * H:], saved.reshape((TB, H)), dw_hh[2 * H:],
                            flat, amx_flat)
    else:
        # dw_hh += dgates.T @ h_prev                                           (G*H, H)
        any_weight_gradient(P, use_amx, dg2, hp2, dw_hh, flat, amx_flat)
    # bias gradients: column sums of dgates (GRU: the input side's n block from dgates_n)
    sums = np.zeros(GH, x.dtype)
    column_sums(P, dg2, sums)
    for j in range(GH):
        db_hh[j] += sums[j]
    if code == GRU:
        for j in range(2 * H):
            db_ih[j] += sums[j]
        column_sums(P, dgates_n.reshape((TB, H)), db_ih[2 * H:])
    else:
        for j in range(GH):
            db_ih[j] += sums[j]
    if code == LSTM_PEEPHOLE:
        column_sums(1, dpeep_rows, dpeephole.reshape((3 * H,)))


@njit(**config.KERNEL)
def units_pass(p, P, code, phase, t, active, lengths, train, w_hh, packed_hh, own, gates,
               hgates, b_ih, b_hh, peephole, h_in, h_out, c, y, h_prev, saved, rh, backwards):
    """Thread p's share of one step (one phase for GRU reset-before) of the unit-split loop;
    backwards: its dot products read w_hh last row first (every other step; see dot_rows).
    packed_hh (P, G, panels, H, NR): each thread's rows of w_hh as panels (units_input), or
    empty: dot products on w_hh. own: gates (T, B, G*C) and hgates (B, G*C) are part p's own,
    gate block g of its unit j0 + k at column g*C + k (see forward_loop); else the layer's,
    (T, B, G*H) and (B, G*H)."""
    B, H = h_in.shape
    G = w_hh.shape[0] // H
    j0, j1 = unit_range(p, P, H)
    if j0 >= j1:
        return
    gs, go = (hgates.shape[1] // G, 0) if own else (H, j0)
    if active:
        # h W_hh^T, all gates; reset-before: h W_hh^T for r and z, or (r * h) W_hn^T
        g0, g1 = (0, G) if code != GRU_RESET_BEFORE else ((0, 2) if phase == 0 else (2, 3))
        v = rh if code == GRU_RESET_BEFORE and phase == 1 else h_in
        if packed_hh.shape[0] > 0:
            for g in range(g0, g1):
                panel_product(packed_hh[p, g], g * gs + go, j1 - j0, v, hgates)
        else:
            dot_rows(w_hh, H, g0, g1 - g0, j0, j1, v, hgates, gs, go, backwards and phase == 0)
    for row in range(B):
        forward_units(code, phase, t, np.int64(row), j0, j1, gs, go, lengths, train, gates,
                      hgates, b_ih, b_hh, peephole, h_in, h_out, c, y, h_prev, saved, rh)


@njit(**config.KERNEL)
def units_input(p, P, H, x2, w_ih, own, gates2, w_hh, packed_ih, packed_hh, amx_ih):
    """Thread p's units of the input projection of all steps: gates2 (T*B, G*H, or G*C when
    own: see units_pass) = x2 W_ih^T for the gate rows of its units (no BLAS in the unit-split
    loop: OpenBLAS's threads would go on spinning for a while after the call and take the
    cores from the unit threads).

    With panels (packed_hh not empty): the thread packs its rows of each gate block of w_ih
    into packed_ih[p] (panels, I, NR), one block at a time, and multiplies them with every row
    of x2; then packs its rows of w_hh into packed_hh[p] (G, panels, H, NR) for the steps.
    amx_ih (P, amx.packed_size(rows, I)), not empty: the blocks of w_ih packed into amx_ih[p]
    and multiplied on the tile unit instead (float32; the per-step products stay on panels:
    4-8 small products a thread and step, each would set up the tiles again)."""
    j0, j1 = unit_range(p, P, H)
    if j0 >= j1:
        return
    G = w_ih.shape[0] // H
    gs, go = (gates2.shape[1] // G, 0) if own else (H, j0)
    if packed_hh.shape[0] > 0:
        for g in range(G):
            if amx_ih.shape[0] > 0:
                amx.pack(w_ih, g * H + j0, j1 - j0, amx_ih[p])
                amx.product(amx_ih[p], j1 - j0, x2.shape[1], x2, gates2, g * gs + go, False)
            else:
                pack_panels(w_ih, g * H + j0, j1 - j0, packed_ih[p])
                panel_product(packed_ih[p], g * gs + go, j1 - j0, x2, gates2)
        for g in range(G):
            pack_panels(w_hh, g * H + j0, j1 - j0, packed_hh[p, g])
    else:
        dot_rows(w_ih, H, 0, G, j0, j1, x2, gates2, gs, go)


# The unit-split loop in one parallel region: instead of a launch per step (~1.5 us, and the
# other thread wakes late), the P threads run every step and meet after each one on a shared
# counter. Substep 0 is the input projection (units_input), then one substep per step and phase.
# Part p of substep k is claimed with a compare-and-swap of claimed[p] from k - 1 to k, so a part
# runs exactly once whoever runs it: thread p claims its own part first; a thread that waits
# too long for the others claims and runs theirs (the region then finishes when threads are
# fewer than parts, or one is descheduled, instead of waiting forever). done counts finished
# parts: substep k is complete when done == (k + 1) * P. The counters are atomic (seq_cst),
# each on its own cache line; the atomics order the threads' plain loads and stores.

_X86 = _llvm.get_process_triple().split("-")[0] in ("x86_64", "i386", "i686")
_SYNC_STRIDE = 8                 # int64 elements between counters: one 64-byte line each
_SPIN_STEAL = 2000               # pauses (~0.05-0.1 us each) before taking another part
_SPIN_STEAL_AGAIN = 20           # the same after a substep that needed it


def _atomic_codegen_pointer(context, builder, arr_ty, arr, index, index_ty):
    a = context.make_array(arr_ty)(context, builder, arr)
    i = context.cast(builder, index, index_ty, types.intp)
    return cgutils.get_item_pointer(context, builder, arr_ty, a, [i])


def _sync_array(arr):
    return (isinstance(arr, types.Array) and arr.dtype == types.int64 and arr.ndim == 1
            and arr.layout == "C" and arr.mutable)


@intrinsic
def atomic_load(typingctx, arr, i):
    """arr[i], an atomic (seq_cst) load; arr int64 C-contiguous."""
    if not (_sync_array(arr) and isinstance(i, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _atomic_codegen_pointer(context, builder, signature.args[0], args[0], args[1],
                                      signature.args[1])
        return builder.load_atomic(ptr, "seq_cst", 8)

    return types.int64(arr, i), codegen


@intrinsic
def atomic_add(typingctx, arr, i, v):
    """arr[i] += v atomically (seq_cst); returns the old value."""
    if not (_sync_array(arr) and isinstance(i, types.Integer) and isinstance(v, types.Integer)):
        return None

    def codegen(context, builder, signature, args):
        ptr = _atomic_codegen_pointer(context, builder, signature.args[0], args[0], args[1],
                                      signature.args[1])
        value = context.cast(builder, args[2], signature.args[2], types.int64)
        return builder.atomic_rmw("add", ptr, value, "seq_cst")

    return types.int64(arr, i, v), codegen


@intrinsic
def atomic_claim(typingctx, arr, i, expected, new):
    """Compare-and-swap (seq_cst): arr[i] = new if arr[i] == expected; returns whether it did."""
    if not (_sync_array(arr) and all(isinstance(x, types.Integer) for x in (i, expected, new))):
        return None

    def codegen(context, builder, signature, args):
        ptr = _atomic_codegen_pointer(context, builder, signature.args[0], args[0], args[1],
                                      signature.args[1])
        old = context.cast(builder, args[2], signature.args[2], types.int64)
        value = context.cast(builder, args[3], signature.args[3], types.int64)
        pair = builder.cmpxchg(ptr, old, value, "seq_cst", "seq_cst")
        return builder.extract_value(pair, 1)

    return types.boolean(arr, i, expected, new), codegen


@intrinsic
def spin_pause(typingctx):
    """The x86 pause instruction in a spin loop (nothing elsewhere)."""
    def codegen(context, builder, signature, args):
        if _X86:
            pause = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(ir.VoidType(), []), "llvm.x86.sse2.pause")
            builder.call(pause, [])
        return context.get_dummy_value()

    return types.void(), codegen


@njit(**config.KERNEL)
def units_substep(q, k, P, T, H, reverse, code, x2, w_ih, lengths, train, w_hh, packed_ih,
                  packed_hh, amx_ih, gates, hgates, gates_own, hgates_own, b_ih, b_hh, peephole, h,
                  h2, c, y, h_prev, saved, rh):
    """Part q of substep k (see above): the input projection (k = 0), else one phase of a
    step. gates_own (P, T, B, G*C), hgates_own (P, B, G*C): each part's own (see units_pass),
    or empty: the parts share gates and hgates."""
    own = gates_own.shape[0] > 0
    gq = gates_own[q] if own else gates
    hq = hgates_own[q] if own else hgates
    if k == 0:
        units_input(q, P, H, x2, w_ih, own, gq.reshape((x2.shape[0], gq.shape[2])), w_hh,
                    packed_ih, packed_hh, amx_ih)
        return
    phases = 2 if code == GRU_RESET_BEFORE else 1
    s = (k - 1) // phases
    phase = k - 1 - s * phases
    t = T - 1 - s if reverse else s
    rh_t = saved[t] if train and code == GRU_RESET_BEFORE else rh
    h_in, h_out = (h, h2) if s % 2 == 0 else (h2, h)
    units_pass(q, P, code, phase, t, any_active(t, lengths), lengths, train, w_hh, packed_hh,
               own, gq, hq, b_ih, b_hh, peephole, h_in, h_out, c, y, h_prev, saved, rh_t,
               s % 2 == 1)


@njit(**config.KERNEL)
def units_loop_part(p, P, T, H, reverse, code, x2, w_ih, lengths, train, w_hh, packed_ih, packed_hh,
                    amx_ih, gates, hgates, gates_own, hgates_own, b_ih, b_hh, peephole, h, h2, c, y,
                    h_prev, saved, rh, sync):
    """Thread p's side of the one-region loop: sync (>= (P + 1) * _SYNC_STRIDE,) int64, done at
    0 and claimed[q] at (q + 1) * _SYNC_STRIDE, all zero but claimed = -1 on entry."""
    phases = 2 if code == GRU_RESET_BEFORE else 1
    limit = _SPIN_STEAL
    for k in range(1 + T * phases):
        if atomic_claim(sync, (p + 1) * _SYNC_STRIDE, k - 1, k):
            units_substep(p, k, P, T, H, reverse, code, x2, w_ih, lengths, train, w_hh, packed_ih,
                          packed_hh, amx_ih, gates, hgates, gates_own, hgates_own, b_ih, b_hh,
                          peephole, h, h2, c, y, h_prev, saved, rh)
            atomic_add(sync, 0, 1)
        target = (k + 1) * P
        spins = 0
        stole = False
        while atomic_load(sync, 0) < target:
            if spins < limit:
                spins += 1
                spin_pause()
                continue
            for q in range(P):
                if q != p and atomic_claim(sync, (q + 1) * _SYNC_STRIDE, k - 1, k):
                    stole = True
                    units_substep(q, k, P, T, H, reverse, code, x2, w_ih, lengths, train, w_hh,
                                  packed_ih, packed_hh, amx_ih, gates, hgates, gates_own,
                                  hgates_own, b_ih, b_hh, peephole, h, h2, c, y, h_prev, saved, rh)
                    atomic_add(sync, 0, 1)
            spins = 0
        limit = _SPIN_STEAL_AGAIN if stole else _SPIN_STEAL


@njit(**config.PARALLEL)
def units_loop_parallel(P, T, H, reverse, code, x2, w_ih, lengths, train, w_hh, packed_ih,
                        packed_hh, amx_ih, gates, hgates, gates_own, hgates_own, b_ih, b_hh,
                        peephole, h, h2, c, y, h_prev, saved, rh, sync):
    for p in prange(P):
        units_loop_part(np.int64(p), P, T, H, reverse, code, x2, w_ih, lengths, train, w_hh,
                        packed_ih, packed_hh, amx_ih, gates, hgates, gates_own, hgates_own, b_ih,
                        b_hh, peephole, h, h2, c, y, h_prev, saved, rh, sync)


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
        dot_rows(w_ih, H, 0, G, j0, j1, x, gates[0], H, j0)         # x W_ih^T
        if code != GRU_RESET_BEFORE:
            dot_rows(w_hh, H, 0, G, j0, j1, h0, hgates, H, j0)
        else:
            dot_rows(w_hh, H, 0, 2, j0, j1, h0, hgates, H, j0)
    else:
        dot_rows(w_hh, H, 2, 1, j0, j1, rh, hgates, H, j0)
    for row in range(B):
        forward_units(code, phase, 0, np.int64(row), j0, j1, H, j0, lengths, False, gates,
                      hgates, b_ih, b_hh, peephole, h0, h_n, c, y, none3, none3, rh)


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


def step(code, threads, min_work, batch_first, x, h0, c0, row, w_ih, w_hh, b_ih, b_hh, peephole,
         h_n, c_n, out, col):
    """One step of one layer and direction, compiled per dtype: layer_step, and the layer's
    whole one-step call (fastrnn._numba.layer_call_step) a row at a time. Returns 0, or the
    position (1-based, in layer_step's argument list: x = 1 ... c_n = 10; out 11) of the first
    array whose shape does not fit or that overlaps an input it may not (h_n, c_n).

    x (1, B, I), or (B, 1, I) with batch_first; h0, c0, h_n, c_n (rows, B, H), the step's at
    [row]; then h_n[row] is also copied to out[..., col:col + H], out (1, B, W) or (B, 1, W)
    (out may be h_n itself, row 0 and col 0). threads: the most threads to use; min_work: split
    over threads only from this many multiply-adds (G*H*(I+H)*B) on. Absent: c0 and c_n
    (1, 0, 0) arrays, peephole a (0, 0) one."""
    B = x.shape[0] if batch_first else x.shape[1]
    if x.shape[1 if batch_first else 0] != 1:
        return 1
    I = x.shape[2]
    H = h0.shape[2]
    GH = w_hh.shape[0]
    cell_state = code == LSTM or code == LSTM_PEEPHOLE
    G = 4 if cell_state else (3 if code == GRU or code == GRU_RESET_BEFORE else 1)
    if row < 0 or h0.shape[0] <= row or h0.shape[1] != B:
        return 2
    if cell_state and (c0.shape[0] <= row or c0.shape[1] != B or c0.shape[2] != H):
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
    if h_n.shape[0] <= row or h_n.shape[1] != B or h_n.shape[2] != H:
        return 9
    if cell_state and (c_n.shape[0] <= row or c_n.shape[1] != B or c_n.shape[2] != H):
        return 10
    if out.shape[0] * out.shape[1] != B or col < 0 or out.shape[2] < col + H:
        return 11
    if _overlaps(h_n, x) or _overlaps(h_n, h0) or _overlaps(h_n, c0) or _overlaps(h_n, c_n):
        return 9
    if _overlaps(c_n, x) or _overlaps(c_n, h0) or _overlaps(c_n, c0):
        return 10
    if B == 0 or H == 0:
        return 0
    # one workspace: gates (1, B, GH), hgates (B, GH), rh (B, H) for GRU reset-before
    n_rh = B * H if code == GRU_RESET_BEFORE else 0
    work = np.empty(2 * B * GH + n_rh, x.dtype)
    lengths_own = np.ones(B, np.int64)
    # everything below borrowed: the caller holds the arguments, keep_alive the locals
    x2 = borrowed(x).reshape((B, I))
    h0_r, h_n_r = borrowed(h0)[row], borrowed(h_n)[row]
    rc = row if cell_state else 0                 # absent c0 and c_n are (1, 0, 0)
    c0_r, c_n_r = borrowed(c0)[rc], borrowed(c_n)[rc]
    w_ih, w_hh, b_ih, b_hh = borrowed(w_ih), borrowed(w_hh), borrowed(b_ih), borrowed(b_hh)
    peephole, lengths, flat = borrowed(peephole), borrowed(lengths_own), borrowed(work)
    gates = flat[:B * GH].reshape((1, B, GH))
    hgates = flat[B * GH:2 * B * GH].reshape((B, GH))
    rh = flat[2 * B * GH:].reshape((B, H) if code == GRU_RESET_BEFORE else (0, 0))
    none3 = gates[:0]
    y = h_n_r.reshape((1, B, H))
    if cell_state:
        c_n_r[:, :] = c0_r                # the LSTM step updates c in place
    P = 1
    if G * H * (I + H) * B >= min_work:
        P = unit_parts(threads, H)
    phases = 2 if code == GRU_RESET_BEFORE else 1
    for phase in range(phases):
        if P > 1:
            step_pass_parallel(P, code, phase, x2, w_ih, w_hh, b_ih, b_hh, peephole, h0_r,
                               h_n_r, c_n_r, y, gates, hgates, rh, lengths, none3)
        else:
            step_pass(0, 1, code, phase, x2, w_ih, w_hh, b_ih, b_hh, peephole, h0_r, h_n_r,
                      c_n_r, y, gates, hgates, rh, lengths, none3)
    out2 = borrowed(out).reshape((B, out.shape[2]))
    for b in range(B):
        for j in range(H):
            out2[b, col + j] = h_n_r[b, j]
    keep_alive(work)
    keep_alive(lengths_own)
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
                 pack, use_amx, y, gates, h_prev, saved, hgates, h, h2, c, rh, gates_own,
                 hgates_own):
    """Run one layer, one direction. h and c hold the initial state and end as the final one.

    gates (T, B, G*H), h_prev and saved (T, B, H): the cache, cut from one workspace; h_prev and
    saved are empty unless train. hgates (B, G*H); rh (B, H) scratch for GRU reset-before
    inference (when training, r * h goes straight into saved).
    units: 0 for the batch-row loop (a GEMM per step); P >= 1 for the unit-split loop on P
    threads, which needs h2 (B, H), the second state buffer (empty otherwise); with pack,
    its products run over weights packed into panels (pack_panels, panel_product), else as
    dot products (dot_rows). gates_own (P, T, B, G*C), hgates_own (P, B, G*C): for the
    unit-split loop on P > 1 threads in inference, each thread's gates and hgates in its own
    buffer (C: the units of the first thread, unit_range), and gates then empty; else empty.
    units = 0 with pack: the batch-row loop's per-step products over w_hh packed once (its
    rows), on this thread, with BLAS for the input projection; units = -P (pack set): the
    same on a pool of P threads (products split by panels, passes by rows), the input
    projection a packed product too: no BLAS call. use_amx (float32 only, amx.AVAILABLE): in
    the batch-row loop, the products over at least amx.MIN_ROWS rows of x take the tile unit;
    in the unit-split loop with pack, the input projection (units_input).
    """
    T, B, I = x.shape
    GH, H = w_hh.shape
    # reset-before: h @ W_hn.T is replaced by (r * h) @ W_hn.T, which needs r first; so its
    # steps run in two phases (r, z then n), with that GEMM between them
    first = 2 * H if code == GRU_RESET_BEFORE else GH
    phases = 2 if code == GRU_RESET_BEFORE else 1
    if units > 0:
        # pack: the weight rows of each thread as panels (see pack_panels), packed by the
        # thread itself once per call (fastrnn._numba decides, see config.PANEL_MIN_ROWS)
        NR = panel_width(x)
        panels = -(-unit_range(0, units, H)[1] // NR)      # the most a thread has per block
        P = units if pack else 0
        packed_ih = panel_buffer((P, panels, I, NR), x)
        packed_hh = panel_buffer((P, GH // H, panels, H, NR), x)
        # the input projection on the tile unit when the call packs and has a tile of rows:
        # a buffer per thread for one block of its rows of w_ih, else none
        amx_parts = P if use_amx and T * B >= amx.MIN_ROWS else 0
        amx_rows = amx.packed_size(unit_range(0, units, H)[1], I)
        amx_ih = amx.buffer(amx_parts * amx_rows).reshape((amx_parts, amx_rows))
        x2 = x.reshape((T * B, I))
        if units > 1:
            # gates = x @ w_ih.T, then the steps, in one parallel region (units_loop_part).
            # Inference: each part's gates and hgates in its own buffers (gates_own,
            # hgates_own), not interleaved with the other parts' in rows of the layer's
            # (T, B, G*H): parts that write next to each other's columns slow each other down
            # (measured, LSTM H=256, 2 parts, the elementwise pass alone: 3.9-4.3 -> 2.5 us a
            # step at B=4, 16.5 -> 11.4 at B=16; whole calls 13-17% faster). Training keeps
            # the layer's gates: they are the cache.
            sync = np.zeros((units + 1) * _SYNC_STRIDE, np.int64)
            for q in range(units):
                sync[(q + 1) * _SYNC_STRIDE] = -1
            units_loop_parallel(units, T, H, reverse, code, x2, w_ih, lengths, train, w_hh,
                                packed_ih, packed_hh, amx_ih, gates, hgates, gates_own, hgates_own,
                                b_ih, b_hh, peephole, h, h2, c, y, h_prev, saved, rh, sync)
        else:
            # gates = x @ w_ih.T                                           (T*B, G*H)
            units_input(0, 1, H, x2, w_ih, False, gates.reshape((T * B, GH)), w_hh, packed_ih,
                        packed_hh, amx_ih)
            # h double-buffered as in the parallel loop
            h_in, h_out = h, h2
            for s in range(T):
                t = T - 1 - s if reverse else s
                active = any_active(t, lengths)
                rh_t = saved[t] if train and code == GRU_RESET_BEFORE else rh
                for phase in range(phases):
                    units_pass(0, 1, code, phase, t, active, lengths, train, w_hh, packed_hh,
                               False, gates, hgates, b_ih, b_hh, peephole, h_in, h_out, c, y,
                               h_prev, saved, rh_t, s % 2 == 1)
                h_in, h_out = h_out, h_in
        if T % 2 == 1:
            h[:, :] = h2
        return
    if units < 0 or pack:
        P = max(1, -units)
        NR = panel_width(x)
        amx_in = use_amx and units < 0 and T * B >= amx.MIN_ROWS
        amx_h = use_amx and B >= amx.MIN_ROWS
        # w_hh's panels (none when the tile unit takes the per-step products)
        first_panels = 0 if amx_h else -(-first // NR)
        n_panels = -(-H // NR) if phases == 2 and not amx_h else 0
        # panel.h-style panels for what does not take the tile unit (empty when nothing)
        flat = panel_buffer((max(-(-GH // NR) * I if units < 0 and not amx_in else 0,
                                 (first_panels + n_panels) * H) * NR,), x)
        # the same on the tile unit: its layout, float32 (empty unless used)
        amx_first = amx.packed_size(first, H) if amx_h else 0
        amx_flat = amx.buffer(max(amx.packed_size(GH, I) if amx_in else 0,
                                  amx_first + (amx.packed_size(H, H) if amx_h else 0)))
        # gates = x @ w_ih.T                                               (T*B, G*H)
        if amx_in:
            amx.pack_and_multiply(P, w_ih, GH, x.reshape((T * B, I)),
                                  gates.reshape((T * B, GH)), False, amx_flat)
        elif units < 0:
            pack_and_multiply(P, w_ih, GH, x.reshape((T * B, I)), gates.reshape((T * B, GH)),
                              False, flat)
        else:
            gemm(x.reshape((T * B, I)), NO_TRANS, w_ih, TRANS, gates.reshape((T * B, GH)), 0.0)
        # w_hh's rows packed; GRU reset-before: its n block's apart, packed on their own
        packed_hh = flat[:first_panels * H * NR].reshape((first_panels, H, NR))
        packed_n = flat[first_panels * H * NR:(first_panels + n_panels) * H * NR].reshape(
            (n_panels, H, NR))
        amx_n = amx_flat[amx_first:]
        pack_step_weights(P, amx_h, w_hh, 0, first, amx_flat, packed_hh)
        if phases == 2:
            pack_step_weights(P, amx_h, w_hh, first, H, amx_n, packed_n)
        for s in range(T):
            t = T - 1 - s if reverse else s
            active = any_active(t, lengths)
            if active:
                # hgates[:, :first] = h @ w_hh[:first].T                     (B, G*H or 2H)
                step_product(P, amx_h, amx_flat, packed_hh, first, h, hgates, 0, False)
            rh_t = saved[t] if train and code == GRU_RESET_BEFORE else rh
            for phase in range(phases):
                if phase == 1 and active:
                    # hgates[:, 2H:] = rh @ w_hh[2H:].T                      (B, H)
                    step_product(P, amx_h, amx_n, packed_n, H, rh_t, hgates, first, False)
                forward_rows(code, phase, t, lengths, train, gates, hgates, b_ih, b_hh,
                             peephole, h, c, y, h_prev, saved, rh_t)
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


def backward_loop(code, x, w_ih, w_hh, peephole, lengths, reverse, truncate, pack, use_amx, pool,
                  gates, h_prev, saved, dy, has_dy, dgates, dgates_n, dh, dc, drh, dpeep_rows,
                  ones, dx, dw_ih, dw_hh, db_ih, db_hh, dpeephole):
    """Backward through one layer, one direction; ADDS into dx, dw_*, db_*, dpeephole.

    dh, dc (B, H) hold the gradient of the final state and end as that of the initial state.
    dgates (T, B, G*H) written whole; dgates_n (T, B, H) GRU only; drh (B, H) GRU reset-before
    only; dpeep_rows (B, 3H) zeros, LSTM with peepholes only; ones (T*B,) all ones.
    truncate: 0 for none. pack: the per-step products over w_hh's columns packed once (see
    forward_loop); pool > 0: on that many threads, and the products after the loop packed too
    (no BLAS call: packed_gradients); pool = 0: on this thread, and BLAS after the loop.
    use_amx: as in forward_loop.
    """
    T = x.shape[0]
    GH, H = w_hh.shape
    first = 2 * H if code == GRU_RESET_BEFORE else GH
    phases = 2 if code == GRU_RESET_BEFORE else 1
    P = max(1, pool)
    # the columns of w_hh as panels, W[u, g] = w_hh[g, u]; GRU reset-before: those of its n
    # block apart (empty unless pack)
    NR = panel_width(x)
    col_panels = -(-H // NR) if pack else 0
    amx_h = pack and use_amx and x.shape[1] >= amx.MIN_ROWS
    packed_hh = panel_buffer((0 if amx_h else col_panels, first, NR), x)
    packed_n = panel_buffer((col_panels if phases == 2 and not amx_h else 0, H, NR), x)
    # or on the tile unit: w_hh's columns in its layout (empty unless used)
    amx_first = amx.packed_size(H, first) if amx_h else 0
    amx_hh = amx.buffer(amx_first + (amx.packed_size(H, H) if amx_h and phases == 2 else 0))
    amx_n = amx_hh[amx_first:]
    if pack:
        pack_step_weights(P, amx_h, w_hh[:first].T, 0, H, amx_hh, packed_hh)
        if phases == 2:
            pack_step_weights(P, amx_h, w_hh[first:].T, 0, H, amx_n, packed_n)
    for s in range(T):
        t = s if reverse else T - 1 - s
        active = any_active(t, lengths)
        for phase in range(phases):
            if phase == 1 and active:
                # drh = dgates[t][:, 2H:] @ w_hh[2H:]                        (B, H)
                if pack:
                    step_product(P, amx_h, amx_n, packed_n, H, dgates[t][:, 2 * H:], drh, 0,
                                 False)
                else:
                    gemm(dgates[t][:, 2 * H:], NO_TRANS, w_hh[2 * H:], NO_TRANS, drh, 0.0)
            backward_rows(code, phase, t, lengths, gates, h_prev, saved, peephole, dy, has_dy,
                          dgates, dgates_n, dh, dc, drh, dpeep_rows)
        if active:
            # dh += dgates[t][:, :first] @ w_hh[:first]                      (B, H)
            if pack:
                step_product(P, amx_h, amx_hh, packed_hh, H, dgates[t][:, :first], dh, 0, True)
            else:
                gemm(dgates[t][:, :first], NO_TRANS, w_hh[:first], NO_TRANS, dh, 1.0)
        # the state gradient leaving step t crosses the boundary to the step before it in time
        # order (t - 1 forward, t + 1 reverse); truncation cuts boundaries at multiples of k
        boundary = t + 1 if reverse else t
        if truncate > 0 and 0 < boundary < T and boundary % truncate == 0:
            dh[:] = 0
            dc[:] = 0
    if pack and pool > 0:
        packed_gradients(P, code, use_amx, amx_hh, x, w_ih, h_prev, saved, dgates, dgates_n,
                         dpeep_rows, dx, dw_ih, dw_hh, db_ih, db_hh, dpeephole)
    else:
        weight_gradients(code, x, w_ih, gates, h_prev, saved, dgates, dgates_n, dpeep_rows,
                         ones, dx, dw_ih, dw_hh, db_ih, db_hh, dpeephole)


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
