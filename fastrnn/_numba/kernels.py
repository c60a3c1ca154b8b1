"""The Numba layer kernels: one step pair per cell, and the generic loops that run them.

The same design as the Cython backend (kernels/layers.pyx, kernels/steps.pxd), with the same
names. Where the two differ, it is said here once:

- Numba's cache checks only the source file of the function it caches, so the steps, the
  switch, the products and the loops all live in this one file (a loop cached from another
  file would go on running an edited step).
- Numba has no structs of pointers: the parameters travel as one tuple ``params = (w_ih, w_hh,
  b_ih, b_hh, peephole, options)`` (peephole a (0, 0) array for the cells without one, options
  a float64 array, empty for the cells without options, so that one compiled signature serves
  every cell), their gradients as ``dparams``; a new parameter is a
  new field of both. The workspaces travel as tuples too (``ws``, ``cache``, ``grads``, and a
  step's views ``step``, ``cache_t``, ``grads_t``: see Cache).
- Threads are Numba's (prange, its OpenMP or TBB layer), not OpenMP's directly; the unit-split
  loop meets on atomic counters of its own instead of OpenMP barriers (see Threads).
- The thresholds are each backend's own, measured on its kernels: packing from
  config.PANEL_MIN_ROWS rows here (the Cython backend's _PACK_MIN_ROWS), threads in the
  unit-split loop from config.UNITS_PARALLEL_MIN_WORK; and with several threads the unit-split
  loop's gates go to per-thread buffers (``gates_own``, ``hh_own``), where Cython's threads
  share the layer's ``gates``.

Cells
    ``cells.Cell.kernel_spec()`` is the cell as the loops read it, the tuple ``spec = (code, G,
    states, saved_width, second_block, hidden_blocks, first_hidden_block)``: everything but
    the per-row step follows from these numbers. ``<cell>_forward_row`` /
    ``<cell>_backward_row`` are each cell's step pair, side by side, with the equations of
    ``fastrnn.reference`` (each backward line undoes the forward line quoted above it).
    ``forward_row`` / ``backward_row`` are the one switch on ``code``, plus the padding
    (t >= lengths[b]) that is the same for every cell. A step has one phase per product:
    product 0 (of h, gate blocks [0, second_block)) then phase 0; when second_block < G,
    product 1 (of the step's saved buffer, blocks [second_block, G)) then phase 1. Backward
    runs the phases last to first, each followed by the transposed product of its blocks.

    Why a switch and not step functions passed as arguments: a function argument is part of
    the compiled type, so each cell would compile its own copy of the loop (and Numba does not
    cache functions that take other dispatchers). With the switch each loop compiles once per
    dtype with every cell in it; the branch costs nothing next to a row.

Loops (``plan = (loop, threads, packed, pool, use_amx)``, chosen by fastrnn._numba)
    ``forward_rows_loop`` (loop ROWS, any B): the input projection of all T steps first, then
    per step and phase the product into ``hh`` and ``forward_pass``, which splits the batch
    rows over threads. ``forward_units_loop`` (loop UNITS, small B): the hidden units split
    into ``threads`` contiguous ranges, one per thread, each computing its units' gate rows of
    the product with its own weight rows (which stay in its core's cache) and running the step
    for its units of every row; the state is double-buffered, so one meeting per phase.
    ``backward_loop``: per step the passes (``backward_pass``) and the transposed products,
    then the weight, bias and input gradients over all T*B rows at once
    (``parameter_gradients``).

Products
    ``dot_rows``: dot products of weight rows with the rows of h, in register tiles (the
    unit-split loop without packing, and ``step``). ``pack_panels`` / ``panel_product``: the
    weights packed once per call into panels of NR rows and multiplied in register tiles
    (the unit-split loop when the call is long enough, see config.PANEL_MIN_ROWS).
    ``packed``: the batch-row loop's per-step products over w_hh packed once per call (its
    rows forward, its columns backward), ``block_product`` / ``packed_product``; ``pool``:
    the input projection and the gradient products after backward's loop are packed products
    too (``pack_and_multiply``, ``weight_gradient``, ``column_sums``), so the call makes no
    BLAS call. ``use_amx``: float32 packed products on the AMX tile unit (amx.py). Otherwise
    BLAS (blas.gemm).

Threads
    ``threads`` is the unit-split loop's part count, or the pool's thread count; the passes
    of an unpooled call run on the thread count fastrnn._numba sets around the call. The
    unit-split loop is one parallel region whose threads meet after each phase on atomic
    counters (``units_loop_part``), where a launch per step would cost ~1.5 us (omp).

Cache (buffers cut by fastrnn._numba from one allocation; every (T, B, .) one is indexed by
the real time t)
    gates     (T, B, G*H)  x W_ih^T (no bias), then the activated gates, in place
    h_slots   (T+1, B, H)  train: slot t the state before step t, the final state at slot T;
                           inference: 2 slots in turn (``step_slots``)
    c_slots   like h_slots for cells with states == 2, else (slots, 0, 0)
    saved     (T, B, saved_width*H) train: the cell's saved buffers (GRU hn, GRU reset-before
                           rh); inference: (1, B, saved_width*H) when a later product reads
                           it, else (1, 0, 0)
    hh        (B, G*H)     scratch: the step's recurrent products
    Backward: dgates (T, B, G*H) the gradient of the gate pre-activations on the INPUT side
    (what x, w_ih, b_ih see); dgates_hh (T, B, hidden_blocks*H) the hidden side of the
    hidden-side blocks (GRU: da_n * r), what w_hh, b_hh see there; dhh (B, G*H) the step's
    hidden side whole, the operand of the state product (when hidden_blocks > 0); dh, dc
    (B, H) the running state gradient; dsaved (B, H) the gradient of product 1's source;
    dpeep (B, 3H) per-row peephole gradient sums; ones (T*B,) for BLAS's bias sums.
    Padding: backward writes exact zeros into dgates, dgates_hh and dhh there, and the
    forward zeroes the saved buffer a later product reads, so nothing from padding reaches
    the gradients.
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

# the cell codes, read only by forward_row and backward_row
RNN_TANH = cells.RNN_TANH.code
RNN_RELU = cells.RNN_RELU.code
LSTM = cells.LSTM.code
LSTM_PEEPHOLE = cells.LSTM_PEEPHOLE.code
GRU = cells.GRU.code
GRU_RESET_BEFORE = cells.GRU_RESET_BEFORE.code
RNN_OPTIONS = cells.OPTIONS_CODES["RNN"]
LSTM_OPTIONS = cells.OPTIONS_CODES["LSTM"]
GRU_OPTIONS = cells.OPTIONS_CODES["GRU"]
# the codes with a step pair here: fastrnn._numba refuses a record with another one
LSTM_NORM = cells.LAYER_NORM_CODES["LSTM"]
GRU_NORM = cells.LAYER_NORM_CODES["GRU"]

CODES = (RNN_TANH, RNN_RELU, LSTM, LSTM_PEEPHOLE, GRU, GRU_RESET_BEFORE, RNN_OPTIONS,
         LSTM_OPTIONS, GRU_OPTIONS, LSTM_NORM, GRU_NORM)

# plan[0], the forward loop
ROWS, UNITS = 0, 1


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



# =============================================================================================
# Cells: one step pair per cell
#
# A forward row works on batch row b and the units [j0, j1) of ``cols = (j0, j1, gs, go)``:
# gate block g of unit j0 + k is at g*gs + go + k in gates and hh (gs = H, go = j0: the
# layer's layout; the unit-split loop's own buffers: gs = its units, go = 0), at g*H + j0 + k
# in the biases. ``step = (gates, hh, h, h_new, c, c_new, saved, y)``: the step's (B, .) views,
# the state read from h (c) and written to h_new (c_new). A backward row works on a whole row:
# ``cache_t = (gates, h, c, c_new, saved)`` of step t, ``grads_t = (dgates, dgates_hh, dhh, dh,
# dc, dsaved, dpeep, dy)`` (dgates, dgates_hh and dy step t's; dy (0, 0) when there is none).
#
# Each row is a few short loops rather than one long one: a loop that touches only a few
# arrays is vectorised by the compiler (it must check at run time that the arrays do not
# overlap, and gives up when there are too many), and the row stays in L1 cache across the
# loops. The forward rows loop over slices from 0: a loop over range(j0, j1) indexing a[j] is
# NOT vectorised (Numba's wraparound of negative indices makes the address a select): 9.4 us
# against 2.3 a step for 4 rows x 128 units of LSTM, float32.

@njit(**config.KERNEL)
def preactivation_row(a, hg, b_ih, b_hh, blocks, H, j0, n, gs, go):
    """a = (x W_ih^T + b_ih) + (h W_hh^T + b_hh), summed in the reference's order, in the
    first ``blocks`` gate blocks of a row's units [j0, j0 + n) (a, hg: the row's gates and hh)."""
    for g in range(blocks):
        lo, go_g = g * H + j0, g * gs + go
        a_g, hg_g = a[go_g:go_g + n], hg[go_g:go_g + n]
        bi_g, bh_g = b_ih[lo:lo + n], b_hh[lo:lo + n]
        for k in range(n):
            a_g[k] = a_g[k] + bi_g[k] + (hg_g[k] + bh_g[k])


# RNN:  h' = act(W_ih x + b_ih + W_hh h + b_hh), act = tanh or relu

@njit(**config.KERNEL)
def rnn_forward_row(b, cols, relu, params, step):
    j0, j1, gs, go = cols
    _, _, b_ih, b_hh, _, _ = params
    gates, hh, _, h_new, _, _, _, y = step
    zero = gates.dtype.type(0)
    n = j1 - j0
    a, hg = gates[b, go:go + n], hh[b, go:go + n]
    bi, bh = b_ih[j0:j1], b_hh[j0:j1]
    h_row, y_row = h_new[b, j0:j1], y[b, j0:j1]
    for k in range(n):
        a[k] = a[k] + bi[k] + (hg[k] + bh[k])
    if relu:
        for k in range(n):
            a[k] = zero if a[k] < zero else a[k]  # not max(): NaN must stay NaN
    else:
        for k in range(n):
            a[k] = tanh(a[k])
    for k in range(n):
        h_row[k] = a[k]
    for k in range(n):
        y_row[k] = a[k]


@njit(**config.KERNEL)
def rnn_backward_row(b, relu, cache_t, grads_t):
    gates = cache_t[0]
    dgates, dh = grads_t[0], grads_t[3]
    zero = dh.dtype.type(0)
    one = dh.dtype.type(1)
    h_new, da, dh_row = gates[b], dgates[b], dh[b]
    # h' = act(a); relu: the slope is 1 where h' > 0, else 0, and h' (0 or NaN) equals that
    # product there, so a NaN from the input reaches the gradients
    if relu:
        for j in range(dh.shape[1]):
            da[j] = dh_row[j] if h_new[j] > zero else h_new[j]
    else:
        for j in range(dh.shape[1]):
            da[j] = dh_row[j] * (one - h_new[j] * h_new[j])
    for j in range(dh.shape[1]):
        dh_row[j] = zero  # dL/dh is all dgates @ w_hh: the product after this pass


# LSTM, gates i, f, g, o; with peepholes (3, H), p_i and p_f see c, p_o sees c'

@njit(**config.KERNEL)
def lstm_forward_row(b, cols, peep, params, step):
    j0, j1, gs, go = cols
    _, _, b_ih, b_hh, peephole, _ = params
    gates, hh, h, h_new, c, c_new, _, y = step
    H = h.shape[1]
    n = j1 - j0
    a, hg = gates[b], hh[b]
    a_i, a_f = a[go:go + n], a[gs + go:gs + go + n]
    a_g, a_o = a[2 * gs + go:2 * gs + go + n], a[3 * gs + go:3 * gs + go + n]
    c_row, c_new_row, h_new_row = c[b, j0:j1], c_new[b, j0:j1], h_new[b, j0:j1]
    # a = x W_ih^T + b_ih + h W_hh^T + b_hh, blocks i f g o; then activated in place
    preactivation_row(a, hg, b_ih, b_hh, 4, H, j0, n, gs, go)
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
    for k in range(n):
        # c' = f * c + i * g
        c_new_row[k] = a_f[k] * c_row[k] + a_i[k] * a_g[k]
    if peep:
        for k in range(n):
            a_o[k] += p_o[k] * c_new_row[k]
    for k in range(n):
        o = sigmoid(a_o[k])
        a_o[k] = o
        # h' = o * tanh(c')
        h_new_row[k] = o * tanh(c_new_row[k])
    y_row = y[b, j0:j1]
    for k in range(n):
        y_row[k] = h_new_row[k]


@njit(**config.KERNEL)
def lstm_cell_backward(a, c_old, da, dc_row):
    """The i, f, g blocks of an LSTM row's gate gradient from dc_row = dL/dc', which becomes
    dL/dc (a: the row's activated gates)."""
    one = da.dtype.type(1)
    H = dc_row.shape[0]
    for j in range(H):
        # c' = f * c + i * g
        dc_new = dc_row[j]
        i, f, g = a[j], a[H + j], a[2 * H + j]
        da[j] = dc_new * g * i * (one - i)                                 # da_i
        da[H + j] = dc_new * c_old[j] * f * (one - f)                      # da_f
        da[2 * H + j] = dc_new * i * (one - g * g)                         # da_g
        dc_row[j] = dc_new * f                                             # dc


@njit(**config.KERNEL)
def lstm_backward_row(b, peep, params, cache_t, grads_t):
    peephole = params[4]
    gates, _, c, c_new, _ = cache_t
    dgates, _, _, dh, dc, _, dpeep, _ = grads_t
    one = dh.dtype.type(1)
    H = dh.shape[1]
    a, c_old, c_nw, da, dh_row, dc_row = gates[b], c[b], c_new[b], dgates[b], dh[b], dc[b]
    # da's i block holds tanh(c') until the i, f, g gradients overwrite it
    for j in range(H):
        da[j] = tanh(c_nw[j])
    for j in range(H):
        # h' = o * tanh(c')
        tanh_c = da[j]
        o = a[3 * H + j]
        da[3 * H + j] = dh_row[j] * tanh_c * o * (one - o)                 # da_o
        dc_row[j] += dh_row[j] * o * (one - tanh_c * tanh_c)               # dc'
    if peep:
        p, dp = peephole, dpeep[b]
        for j in range(H):
            # a_o = ... + p_o * c'
            dc_row[j] += da[3 * H + j] * p[2, j]
            dp[2 * H + j] += da[3 * H + j] * c_nw[j]
    lstm_cell_backward(a, c_old, da, dc_row)
    if peep:
        p, dp = peephole, dpeep[b]
        for j in range(H):
            # a_i = ... + p_i * c;  a_f = ... + p_f * c
            dc_row[j] += da[j] * p[0, j] + da[H + j] * p[1, j]
            dp[j] += da[j] * c_old[j]
            dp[H + j] += da[H + j] * c_old[j]
    for j in range(H):
        dh_row[j] = 0  # dL/dh is all dgates @ w_hh: the product after this pass


# GRU, reset after the recurrent product (PyTorch):  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))
# Saved: hn = W_hn h + b_hn. Hidden side of the n block: da_n * r (dgates_hh).

@njit(**config.KERNEL)
def gru_rz_row(a, hg, b_ih, b_hh, j0, n, gs, go):
    """r and z of one row, units [j0, j0 + n), both GRU forms: a = sigmoid(a + b_ih + (hg +
    b_hh)) in blocks 0 and 1 (a, hg: the row's gates and hh)."""
    H = b_ih.shape[0] // 3
    for g in range(2):
        lo, go_g = g * H + j0, g * gs + go
        a_g, hg_g = a[go_g:go_g + n], hg[go_g:go_g + n]
        bi_g, bh_g = b_ih[lo:lo + n], b_hh[lo:lo + n]
        for k in range(n):
            a_g[k] = sigmoid(a_g[k] + bi_g[k] + (hg_g[k] + bh_g[k]))      # r, z


@njit(**config.KERNEL)
def gru_new_state_row(b, j0, j1, a_z, a_n, step):
    """The end of a GRU row's step, both forms: h' = (1 - z) * n + z * h into h_new and y."""
    _, _, h, h_new, _, _, _, y = step
    one = h.dtype.type(1)
    n = j1 - j0
    h_row, h_new_row, y_row = h[b, j0:j1], h_new[b, j0:j1], y[b, j0:j1]
    for k in range(n):
        z = a_z[k]
        h_new_row[k] = (one - z) * a_n[k] + z * h_row[k]
    for k in range(n):
        y_row[k] = h_new_row[k]


@njit(**config.KERNEL)
def gru_forward_row(b, cols, params, step):
    j0, j1, gs, go = cols
    _, _, b_ih, b_hh, _, _ = params
    gates, hh, _, _, _, _, saved, _ = step
    H = b_ih.shape[0] // 3
    n = j1 - j0
    a, hg = gates[b], hh[b]
    a_r, a_z, a_n = a[go:go + n], a[gs + go:gs + go + n], a[2 * gs + go:2 * gs + go + n]
    n0 = 2 * H + j0
    hg_n, bi_n, bh_n = hg[2 * gs + go:2 * gs + go + n], b_ih[n0:n0 + n], b_hh[n0:n0 + n]
    gru_rz_row(a, hg, b_ih, b_hh, j0, n, gs, go)
    for k in range(n):
        hg_n[k] += bh_n[k]                                               # hn = W_hn h + b_hn
    for k in range(n):
        a_n[k] = tanh(a_n[k] + bi_n[k] + a_r[k] * hg_n[k])               # n
    if saved.shape[0] > 0:
        hn_row = saved[b, j0:j1]
        for k in range(n):
            hn_row[k] = hg_n[k]
    gru_new_state_row(b, j0, j1, a_z, a_n, step)


@njit(**config.KERNEL)
def gru_zn_backward_row(a, h_old, da, dh_row):
    """The z and n blocks of a GRU row's gate gradient, both GRU forms (n's inside differs, not
    its derivative), then dh_row *= z, the part of dL/dh that skips the recurrent product."""
    one = dh_row.dtype.type(1)
    H = dh_row.shape[0]
    for j in range(H):
        # h' = (1 - z) * n + z * h;  n = tanh(...)
        z, n = a[H + j], a[2 * H + j]
        da[H + j] = dh_row[j] * (h_old[j] - n) * z * (one - z)            # da_z
        da[2 * H + j] = dh_row[j] * (one - z) * (one - n * n)              # da_n
    for j in range(H):
        dh_row[j] *= a[H + j]


@njit(**config.KERNEL)
def gru_backward_row(b, cache_t, grads_t):
    # dhh: the hidden side, dL/d(W_hh h + b_hh); its n block, da_n * r, differs from dgates'
    # and is also kept in dgates_hh for dW_hn and db_hn after the loop
    gates, h, _, _, saved = cache_t
    dgates, dgates_hh, dhh, dh, _, _, _, _ = grads_t
    one = dh.dtype.type(1)
    H = dh.shape[1]
    a, h_old, hn, da, dh_row = gates[b], h[b], saved[b], dgates[b], dh[b]
    d_hidden, da_hh = dhh[b], dgates_hh[b]
    gru_zn_backward_row(a, h_old, da, dh_row)     # n = tanh(x_n + r * hn)
    for j in range(H):
        r = a[j]
        da[j] = da[2 * H + j] * hn[j] * r * (one - r)                       # da_r
    # a_n = x_n + r * (W_hn h + b_hn): the hidden side of the n block
    for j in range(H):
        d_hidden[2 * H + j] = da[2 * H + j] * a[j]
    for j in range(2 * H):
        d_hidden[j] = da[j]
    for j in range(H):
        da_hh[j] = d_hidden[2 * H + j]


# GRU, reset before the recurrent product (original GRU, ONNX):
#     n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
# Saved: rh = r * h, the source of product 1. Phase 0: r, z and rh; phase 1: n and h'.

@njit(**config.KERNEL)
def gru_reset_before_forward_row(b, cols, phase, params, step):
    j0, j1, gs, go = cols
    _, _, b_ih, b_hh, _, _ = params
    gates, hh, h, _, _, _, saved, _ = step
    H = b_ih.shape[0] // 3
    n = j1 - j0
    a, hg = gates[b], hh[b]
    if phase == 0:
        gru_rz_row(a, hg, b_ih, b_hh, j0, n, gs, go)
        a_r, h_row, rh_row = a[go:go + n], h[b, j0:j1], saved[b, j0:j1]
        for k in range(n):
            rh_row[k] = a_r[k] * h_row[k]     # product 1: hh's n block = rh @ W_hn.T
    else:
        lo, go_n = 2 * H + j0, 2 * gs + go
        a_n, hg_n = a[go_n:go_n + n], hg[go_n:go_n + n]
        bi_n, bh_n = b_ih[lo:lo + n], b_hh[lo:lo + n]
        for k in range(n):
            a_n[k] = tanh(a_n[k] + bi_n[k] + (hg_n[k] + bh_n[k]))         # n
        gru_new_state_row(b, j0, j1, a[gs + go:gs + go + n], a_n, step)


@njit(**config.KERNEL)
def gru_rh_backward(a, h_old, ds, da, dh_row):
    """rh = r * h of a reset-before GRU row, backward for ds = dL/drh: da_r into da's r block
    and the part of dL/dh through rh added into dh_row."""
    one = da.dtype.type(1)
    for j in range(dh_row.shape[0]):
        r = a[j]
        da[j] = ds[j] * h_old[j] * r * (one - r)                           # da_r
    for j in range(dh_row.shape[0]):
        dh_row[j] += ds[j] * a[j]


@njit(**config.KERNEL)
def gru_reset_before_backward_row(b, phase, cache_t, grads_t):
    gates, h, _, _, _ = cache_t
    dgates, _, _, dh, _, dsaved, _, _ = grads_t
    a, h_old, da, dh_row = gates[b], h[b], dgates[b], dh[b]
    if phase == 1:
        gru_zn_backward_row(a, h_old, da, dh_row)
        # product 1 after this pass: dsaved = da_n @ W_hn
    else:
        gru_rh_backward(a, h_old, dsaved[b], da, dh_row)
        # product 0 after this pass: dh += da_rz @ w_hh[:2H]


# Cells with options (ONNX's activations, clip, input_forget), one step pair per mode.
# params[5], ``options``, is cells.Cell.option_values(): (clip (inf: none), input_forget, then
# (kind, alpha, beta) per activation slot, kind the index in cells.ACTIVATIONS). These step
# pairs keep each gate's pre-activation (unclipped) in gates, not the activated gate: the
# backward takes the activations and their slopes from it. The kinds are switched on per
# element: these cells are for the models that need them, not tuned.

@njit(**config.KERNEL)
def activate(kind, alpha, beta, one, a):
    """ONNX's activation ``kind`` (index in cells.ACTIVATIONS) of a; NaN stays NaN."""
    zero = one - one
    if kind == 1:
        return tanh(a)
    if kind == 2:
        return sigmoid(a)
    if kind == 0:
        return zero if a < zero else a                               # relu
    if kind == 3:
        return alpha * a + beta                                      # affine
    if kind == 4:
        return alpha * a if a < zero else a                          # leakyrelu
    if kind == 5:
        return a if a > alpha or a != a else zero                    # thresholdedrelu
    if kind == 6:
        return alpha * tanh(beta * a)                                # scaledtanh
    if kind == 7:
        u = alpha * a + beta                                         # hardsigmoid
        u = zero if u < zero else u
        return one if u > one else u
    if kind == 8:
        return alpha * math.expm1(a) if a < zero else a              # elu
    if kind == 9:
        return a / (one + abs(a))                                    # softsign
    # softplus, log(1 + e^a) without overflow
    return (a if a > zero else zero) + math.log1p(math.exp(-abs(a)))


@njit(**config.KERNEL)
def activation_slope(kind, alpha, beta, one, a):
    """d activate(kind, a) / da; NaN where a is NaN."""
    zero = one - one
    if a != a:
        return a
    if kind == 1:
        t = tanh(a)
        return one - t * t
    if kind == 2:
        s = sigmoid(a)
        return s * (one - s)
    if kind == 0:
        return one if a > zero else zero
    if kind == 3:
        return alpha
    if kind == 4:
        return alpha if a < zero else one
    if kind == 5:
        return one if a > alpha else zero
    if kind == 6:
        t = tanh(beta * a)
        return alpha * beta * (one - t * t)
    if kind == 7:
        u = alpha * a + beta
        return alpha if u > zero and u < one else zero
    if kind == 8:
        return alpha * math.exp(a) if a < zero else one
    if kind == 9:
        d = one + abs(a)
        return one / (d * d)
    return sigmoid(a)


@njit(**config.KERNEL)
def option_slot(options, slot, like):
    """(kind, alpha, beta, clip) of activation slot ``slot`` of options, alpha, beta and clip
    in the dtype of the array ``like`` (a float64 one would take the float32 kernels' gates
    through float64, libm and scalar code)."""
    k = 2 + 3 * slot
    real = like.dtype.type
    return np.int64(options[k]), real(options[k + 1]), real(options[k + 2]), real(options[0])


@njit(**config.KERNEL)
def gate_block(act, a, out):
    """out = act(clip(a)) over a block of units, act = option_slot(...); the kind is switched
    on once, so that the usual ones (sigmoid, tanh) vectorise; NaN stays NaN."""
    kind, alpha, beta, clip = act
    one = out.dtype.type(1)
    if kind == 2:
        for k in range(a.shape[0]):
            v = a[k]
            out[k] = sigmoid(clip if v > clip else (-clip if v < -clip else v))
    elif kind == 1:
        for k in range(a.shape[0]):
            v = a[k]
            out[k] = tanh(clip if v > clip else (-clip if v < -clip else v))
    else:
        for k in range(a.shape[0]):
            v = a[k]
            out[k] = activate(kind, alpha, beta, one,
                              clip if v > clip else (-clip if v < -clip else v))


@njit(**config.KERNEL)
def slope_block(act, a, d):
    """d *= d act(clip(a)) / da over a block of units: zero where the clip cut a (a NaN in d
    stays NaN), NaN where a is NaN."""
    kind, alpha, beta, clip = act
    one = d.dtype.type(1)
    zero = one - one
    if kind == 2:
        for k in range(a.shape[0]):
            s = sigmoid(a[k])
            d[k] = d[k] * (zero if a[k] < -clip or a[k] > clip else s * (one - s))
    elif kind == 1:
        for k in range(a.shape[0]):
            t = tanh(a[k])
            d[k] = d[k] * (zero if a[k] < -clip or a[k] > clip else one - t * t)
    else:
        for k in range(a.shape[0]):
            v = a[k]
            d[k] = d[k] * (zero if v < -clip or v > clip else
                           activation_slope(kind, alpha, beta, one, v))


# RNN with options: h' = f(clip(W_ih x + b_ih + W_hh h + b_hh))

@njit(**config.KERNEL)
def rnn_options_forward_row(b, cols, params, step):
    j0, j1, gs, go = cols
    _, _, b_ih, b_hh, _, options = params
    gates, hh, _, h_new, _, _, _, y = step
    n = j1 - j0
    a, hg = gates[b, go:go + n], hh[b, go:go + n]
    bi, bh = b_ih[j0:j1], b_hh[j0:j1]
    h_row, y_row = h_new[b, j0:j1], y[b, j0:j1]
    for k in range(n):
        a[k] = a[k] + bi[k] + (hg[k] + bh[k])                        # kept: the pre-activation
    gate_block(option_slot(options, 0, gates), a, h_row)
    for k in range(n):
        y_row[k] = h_row[k]


@njit(**config.KERNEL)
def rnn_options_backward_row(b, params, cache_t, grads_t):
    gates = cache_t[0]
    dgates, dh = grads_t[0], grads_t[3]
    a, da, dh_row = gates[b], dgates[b], dh[b]
    for j in range(dh.shape[1]):
        da[j] = dh_row[j]
    slope_block(option_slot(params[5], 0, dh), a, da)
    for j in range(dh.shape[1]):
        dh_row[j] = 0  # dL/dh is all dgates @ w_hh: the product after this pass


# LSTM with options (peepholes when params[4] has them):
#     i = f(clip(a_i [+ p_i c]));  f = 1 - i with input_forget, else f(clip(a_f [+ p_f c]))
#     g = g(clip(a_g));  c' = f c + i g;  o = f(clip(a_o [+ p_o c']));  h' = o h(c')
# The forward keeps the activated gates in hh's row (the products are added in by then).

@njit(**config.KERNEL)
def lstm_options_forward_row(b, cols, params, step):
    j0, j1, gs, go = cols
    _, _, b_ih, b_hh, peephole, options = params
    gates, hh, h, h_new, c, c_new, _, y = step
    one = gates.dtype.type(1)
    act_f, act_g = option_slot(options, 0, gates), option_slot(options, 1, gates)
    kh, ah, bh_, _ = option_slot(options, 2, gates)
    act_h = (kh, ah, bh_, gates.dtype.type(math.inf))     # the cell output is not clipped
    H = h.shape[1]
    n = j1 - j0
    a, hg = gates[b], hh[b]
    a_i, a_f = a[go:go + n], a[gs + go:gs + go + n]
    a_g, a_o = a[2 * gs + go:2 * gs + go + n], a[3 * gs + go:3 * gs + go + n]
    i, f = hg[go:go + n], hg[gs + go:gs + go + n]
    g, o = hg[2 * gs + go:2 * gs + go + n], hg[3 * gs + go:3 * gs + go + n]
    c_row, c_new_row, h_new_row = c[b, j0:j1], c_new[b, j0:j1], h_new[b, j0:j1]
    y_row = y[b, j0:j1]
    preactivation_row(a, hg, b_ih, b_hh, 4, H, j0, n, gs, go)
    if peephole.shape[0] > 0:
        p_i, p_f = peephole[0, j0:j1], peephole[1, j0:j1]
        for k in range(n):
            a_i[k] += p_i[k] * c_row[k]
            a_f[k] += p_f[k] * c_row[k]
    gate_block(act_f, a_i, i)
    if options[1] != 0:                                   # input_forget: f = 1 - i
        for k in range(n):
            f[k] = one - i[k]
    else:
        gate_block(act_f, a_f, f)
    gate_block(act_g, a_g, g)
    for k in range(n):
        # c' = f * c + i * g
        c_new_row[k] = f[k] * c_row[k] + i[k] * g[k]
    if peephole.shape[0] > 0:
        p_o = peephole[2, j0:j1]
        for k in range(n):
            a_o[k] += p_o[k] * c_new_row[k]
    gate_block(act_f, a_o, o)
    # h' = o * h(c'), h(c') passing through y
    gate_block(act_h, c_new_row, y_row)
    for k in range(n):
        y_row[k] = o[k] * y_row[k]
    for k in range(n):
        h_new_row[k] = y_row[k]


@njit(**config.KERNEL)
def lstm_options_backward_row(b, params, cache_t, grads_t):
    peephole, options = params[4], params[5]
    gates, _, c, c_new, _ = cache_t
    dgates, _, _, dh, dc, _, dpeep, _ = grads_t
    one = dh.dtype.type(1)
    act_f, act_g = option_slot(options, 0, dh), option_slot(options, 1, dh)
    kh, ah, bh_, _ = option_slot(options, 2, dh)
    act_h = (kh, ah, bh_, dh.dtype.type(math.inf))
    input_forget = options[1] != 0
    peep = peephole.shape[0] > 0
    H = dh.shape[1]
    a, c_old, c_nw, da, dh_row, dc_row = gates[b], c[b], c_new[b], dgates[b], dh[b], dc[b]
    a_i, a_f, a_g, a_o = a[:H], a[H:2 * H], a[2 * H:3 * H], a[3 * H:]
    da_i, da_f, da_g, da_o = da[:H], da[H:2 * H], da[2 * H:3 * H], da[3 * H:]
    # the blocks of da hold the gates and h(c') on the way to the gradients
    gate_block(act_f, a_o, da_o)                                             # o
    gate_block(act_h, c_nw, da_i)                                            # h(c')
    for j in range(H):
        da_f[j] = dh_row[j] * da_o[j]
    slope_block(act_h, c_nw, da_f)
    for j in range(H):
        # h' = o * h(c')
        dc_row[j] += da_f[j]                                                 # dc'
        da_o[j] = dh_row[j] * da_i[j]                                        # do
    slope_block(act_f, a_o, da_o)                                            # da_o
    if peep:
        dp = dpeep[b]
        for j in range(H):
            # a_o = ... + p_o * c'
            dc_row[j] += da_o[j] * peephole[2, j]
            dp[2 * H + j] += da_o[j] * c_nw[j]
    gate_block(act_f, a_i, da_i)                                             # i
    if not input_forget:
        gate_block(act_f, a_f, da_f)                                         # f
    gate_block(act_g, a_g, da_g)                                             # g
    for j in range(H):
        # c' = f * c + i * g
        dc_new = dc_row[j]
        i, g = da_i[j], da_g[j]
        f = one - i if input_forget else da_f[j]
        da_i[j] = dc_new * g                                                 # di
        da_f[j] = dc_new * c_old[j]                                          # df
        da_g[j] = dc_new * i                                                 # dg
        dc_row[j] = dc_new * f                                               # dc
    if input_forget:
        for j in range(H):
            # f = 1 - i: the f block's pre-activation is not used
            da_i[j] -= da_f[j]
            da_f[j] = 0
    else:
        slope_block(act_f, a_f, da_f)                                        # da_f
    slope_block(act_f, a_i, da_i)                                            # da_i
    slope_block(act_g, a_g, da_g)                                            # da_g
    if peep:
        dp = dpeep[b]
        for j in range(H):
            # a_i = ... + p_i * c;  a_f = ... + p_f * c
            dc_row[j] += da_i[j] * peephole[0, j] + da_f[j] * peephole[1, j]
            dp[j] += da_i[j] * c_old[j]
            dp[H + j] += da_f[j] * c_old[j]
    for j in range(H):
        dh_row[j] = 0  # dL/dh is all dgates @ w_hh: the product after this pass


# GRU with options, both forms (reset_after: spec has one product):
#     r = f(clip(.)), z = f(clip(.)), n = g(clip(x_n + r * hn)) or g(clip(x_n + W_hn (r h) + b_hn))
# saved: hn or rh, as the plain GRU's. The forward keeps r and z in hh's row once the products
# are added in (reset-before: hh's r and z blocks last until phase 1), and n in its n block.

@njit(**config.KERNEL)
def gru_options_forward_row(b, cols, phase, reset_after, params, step):
    j0, j1, gs, go = cols
    _, _, b_ih, b_hh, _, options = params
    gates, hh, h, h_new, _, _, saved, y = step
    one = gates.dtype.type(1)
    act_f, act_g = option_slot(options, 0, gates), option_slot(options, 1, gates)
    H = b_ih.shape[0] // 3
    n = j1 - j0
    a, hg = gates[b], hh[b]
    a_r, a_z, a_n = a[go:go + n], a[gs + go:gs + go + n], a[2 * gs + go:2 * gs + go + n]
    r, z, nn = hg[go:go + n], hg[gs + go:gs + go + n], hg[2 * gs + go:2 * gs + go + n]
    if phase == 0:
        preactivation_row(a, hg, b_ih, b_hh, 2, H, j0, n, gs, go)
        gate_block(act_f, a_r, r)
        gate_block(act_f, a_z, z)
    n0 = 2 * H + j0
    bi_n, bh_n = b_ih[n0:n0 + n], b_hh[n0:n0 + n]
    if reset_after:
        for k in range(n):
            nn[k] += bh_n[k]                                             # hn = W_hn h + b_hn
        if saved.shape[0] > 0:
            hn_row = saved[b, j0:j1]
            for k in range(n):
                hn_row[k] = nn[k]
        for k in range(n):
            a_n[k] = a_n[k] + bi_n[k] + r[k] * nn[k]
    elif phase == 0:
        h_row, rh_row = h[b, j0:j1], saved[b, j0:j1]
        for k in range(n):
            rh_row[k] = r[k] * h_row[k]     # product 1: hh's n block = rh @ W_hn.T
        return
    else:
        for k in range(n):
            a_n[k] = a_n[k] + bi_n[k] + (nn[k] + bh_n[k])
    gate_block(act_g, a_n, nn)                                           # n
    h_row, h_new_row, y_row = h[b, j0:j1], h_new[b, j0:j1], y[b, j0:j1]
    for k in range(n):
        # h' = (1 - z) * n + z * h
        h_new_row[k] = (one - z[k]) * nn[k] + z[k] * h_row[k]
    for k in range(n):
        y_row[k] = h_new_row[k]


@njit(**config.KERNEL)
def gru_options_backward_row(b, phase, reset_after, params, cache_t, grads_t):
    gates, h, _, _, saved = cache_t
    dgates, dgates_hh, dhh, dh, _, dsaved, _, _ = grads_t
    one = dh.dtype.type(1)
    act_f, act_g = option_slot(params[5], 0, dh), option_slot(params[5], 1, dh)
    H = dh.shape[1]
    a, h_old, da, dh_row = gates[b], h[b], dgates[b], dh[b]
    a_r, a_z, a_n = a[:H], a[H:2 * H], a[2 * H:]
    da_r, da_z, da_n = da[:H], da[H:2 * H], da[2 * H:]
    if reset_after or phase == 1:
        gate_block(act_f, a_z, da_z)                                     # z
        gate_block(act_g, a_n, da_n)                                     # n
        for j in range(H):
            # h' = (1 - z) * n + z * h
            z = da_z[j]
            da_z[j] = dh_row[j] * (h_old[j] - da_n[j])                   # dz
            da_n[j] = dh_row[j] * (one - z)                              # dn
            dh_row[j] *= z
        slope_block(act_f, a_z, da_z)                                    # da_z
        slope_block(act_g, a_n, da_n)                                    # da_n
    if reset_after:
        # a_n = x_n + r * hn, hn = W_hn h + b_hn: the hidden side of the n block is da_n * r
        hn, d_hidden, da_hh = saved[b], dhh[b], dgates_hh[b]
        gate_block(act_f, a_r, d_hidden[:H])                             # r
        for j in range(H):
            d_hidden[2 * H + j] = da_n[j] * d_hidden[j]
            da_r[j] = da_n[j] * hn[j]                                    # dr
        slope_block(act_f, a_r, da_r)                                    # da_r
        for j in range(2 * H):
            d_hidden[j] = da[j]
        for j in range(H):
            da_hh[j] = d_hidden[2 * H + j]
    elif phase == 0:
        ds = dsaved[b]
        gate_block(act_f, a_r, da_r)                                     # r
        for j in range(H):
            # rh = r * h
            dh_row[j] += ds[j] * da_r[j]
            da_r[j] = ds[j] * h_old[j]                                   # dr
        slope_block(act_f, a_r, da_r)                                    # da_r


# The options cells' part of the switch, through an overload on the type of params[5]: the
# one-step kernel, which takes plain cells only, has it None and compiles none of the options
# step pairs; the loops have the options array and compile them.

def options_forward_row(code, phase, reset_after, b, cols, params, step, options):
    """The forward row of a cell that reads params[5], ``options``: an options cell or a
    layer-normalized one (compiled through the overload below: to nothing where options is
    None, the one-step kernel's, which runs neither)."""


def options_backward_row(code, phase, reset_after, b, params, cache_t, grads_t, options):
    """The backward row of a cell that reads params[5] (see options_forward_row)."""


@overload(options_forward_row, jit_options=config.KERNEL)
def _options_forward_row_overload(code, phase, reset_after, b, cols, params, step, options):
    if isinstance(options, types.NoneType):
        return lambda code, phase, reset_after, b, cols, params, step, options: None

    def impl(code, phase, reset_after, b, cols, params, step, options):
        if code == RNN_OPTIONS:
            rnn_options_forward_row(b, cols, params, step)
        elif code == LSTM_OPTIONS:
            lstm_options_forward_row(b, cols, params, step)
        elif code == GRU_OPTIONS:
            gru_options_forward_row(b, cols, phase, reset_after, params, step)
        elif code == LSTM_NORM:
            lstm_norm_forward_row(b, params, step)
        elif code == GRU_NORM:
            gru_norm_forward_row(b, phase, reset_after, params, step)
    return impl


@overload(options_backward_row, jit_options=config.KERNEL)
def _options_backward_row_overload(code, phase, reset_after, b, params, cache_t, grads_t,
                                   options):
    if isinstance(options, types.NoneType):
        return lambda code, phase, reset_after, b, params, cache_t, grads_t, options: None

    def impl(code, phase, reset_after, b, params, cache_t, grads_t, options):
        if code == RNN_OPTIONS:
            rnn_options_backward_row(b, params, cache_t, grads_t)
        elif code == LSTM_OPTIONS:
            lstm_options_backward_row(b, params, cache_t, grads_t)
        elif code == GRU_OPTIONS:
            gru_options_backward_row(b, phase, reset_after, params, cache_t, grads_t)
        elif code == LSTM_NORM:
            lstm_norm_backward_row(b, params, cache_t, grads_t)
        elif code == GRU_NORM:
            gru_norm_backward_row(b, phase, reset_after, params, cache_t, grads_t)
    return impl


# Layer-normalized cells (cells.LAYER_NORM_CODES), the batch-row loop only (a row's
# normalization needs all its units). params[4], ``norm``, holds the gains and shifts as rows
# of G*H: ln_ih weight, bias, ln_hh weight, bias (LSTM: then ln_cell weight, bias, first H
# entries); params[5] is (eps,). In training the saved buffer keeps each step's raw products
# after the cell's own saved columns, ax = x W_ih^T (G*H) then ah (G*H: h W_hh^T, the
# reset-before GRU's product 0 then product 1); backward recomputes the means and variances
# from them, and the gradients of norm's rows (ln_ih bias: that of b_ih too; ln_hh bias: of
# b_hh) are summed per row in grads_t[6], like the peepholes'.

@njit(**config.KERNEL)
def norm_stats(v, eps):
    """(mean, 1 / sqrt(var + eps)) of the vector v, var the biased variance; in v's dtype
    (eps is a float64, as are the sizes' quotients in Numba: cast, or float32 rows would be
    computed in float64)."""
    dt = v.dtype.type
    inv_n = dt(1) / dt(v.shape[0])
    total = dt(0)
    for k in range(v.shape[0]):
        total += v[k]
    mean = total * inv_n
    total = dt(0)
    for k in range(v.shape[0]):
        d = v[k] - mean
        total += d * d
    return mean, dt(1) / math.sqrt(total * inv_n + dt(eps))


@njit(**config.KERNEL)
def norm_backward(d, raw, gain, eps, out, dgain, dshift):
    """Backward of LN(raw) * gain + shift for d, its gradient: out = dL/draw (out may be d),
    dgain += d * LN(raw), dshift += d."""
    n = raw.shape[0]
    mean, rstd = norm_stats(raw, eps)
    s1 = raw.dtype.type(0)
    s2 = raw.dtype.type(0)
    inv_n = raw.dtype.type(1) / raw.dtype.type(n)
    for k in range(n):
        v_hat = (raw[k] - mean) * rstd
        dgain[k] += d[k] * v_hat
        dshift[k] += d[k]
        dv_hat = d[k] * gain[k]
        s1 += dv_hat
        s2 += dv_hat * v_hat
    s1 *= inv_n
    s2 *= inv_n
    for k in range(n):
        v_hat = (raw[k] - mean) * rstd
        out[k] = rstd * (d[k] * gain[k] - s1 - v_hat * s2)


@njit(**config.KERNEL)
def norm_add(v, gain, shift, bias, eps, out):
    """out = (out +) LN(v) * gain + shift + bias; out is v itself or holds the other term."""
    mean, rstd = norm_stats(v, eps)
    for k in range(v.shape[0]):
        out[k] = ((v[k] - mean) * rstd * gain[k] + shift[k]) + bias[k]


# LSTM:  a = LN(ax) + LN(ah) + b_ih + b_hh;  c' = f c + i g;  h' = o tanh(LN(c'))

@njit(**config.KERNEL)
def lstm_norm_forward_row(b, params, step):
    _, _, b_ih, b_hh, norm, options = params
    gates, hh, _, h_new, c, c_new, saved, y = step
    eps = options[0]
    H = h_new.shape[1]
    GH = 4 * H
    a, hg = gates[b], hh[b]
    if saved.shape[0] > 0:                      # training: the raw products for backward
        kept = saved[b]
        for k in range(GH):
            kept[k] = a[k]
        for k in range(GH):
            kept[GH + k] = hg[k]
    mean_x, rstd_x = norm_stats(a, eps)
    mean_h, rstd_h = norm_stats(hg, eps)
    g_x, s_x, g_h, s_h = norm[0], norm[1], norm[2], norm[3]
    for k in range(GH):
        a[k] = (((a[k] - mean_x) * rstd_x * g_x[k] + s_x[k])
                + ((hg[k] - mean_h) * rstd_h * g_h[k] + s_h[k]) + b_ih[k]) + b_hh[k]
    for k in range(H):
        a[k] = sigmoid(a[k])
    for k in range(H, 2 * H):
        a[k] = sigmoid(a[k])
    for k in range(2 * H, 3 * H):
        a[k] = tanh(a[k])
    for k in range(3 * H, GH):
        a[k] = sigmoid(a[k])
    c_row, c_new_row, h_new_row, y_row = c[b], c_new[b], h_new[b], y[b]
    for k in range(H):
        c_new_row[k] = a[H + k] * c_row[k] + a[k] * a[2 * H + k]          # c' = f c + i g
    mean_c, rstd_c = norm_stats(c_new_row, eps)
    g_c, s_c = norm[4], norm[5]
    for k in range(H):
        h_new_row[k] = a[3 * H + k] * tanh((c_new_row[k] - mean_c) * rstd_c * g_c[k] + s_c[k])
    for k in range(H):
        y_row[k] = h_new_row[k]


@njit(**config.KERNEL)
def lstm_norm_backward_row(b, params, cache_t, grads_t):
    _, _, _, _, norm, options = params
    gates, _, c, c_new, saved = cache_t
    dgates, dgates_hh, dhh, dh, dc, _, sums, _ = grads_t
    eps = options[0]
    one = dh.dtype.type(1)
    H = dh.shape[1]
    GH = 4 * H
    a, c_old, c_nw, da, dh_row, dc_row = gates[b], c[b], c_new[b], dgates[b], dh[b], dc[b]
    row_sums, g_c, s_c = sums[b], norm[4], norm[5]
    # h' = o * tanh(LN(c')); da's i block holds LN(c') without gain, its f block the gradient
    # of the normalized c' times the gain, until the i, f, g gradients overwrite them; its o
    # block tanh(LN(c')), until da_o does
    mean_c, rstd_c = norm_stats(c_nw, eps)
    for j in range(H):
        da[j] = (c_nw[j] - mean_c) * rstd_c
        da[3 * H + j] = da[j] * g_c[j] + s_c[j]
    for j in range(3 * H, GH):
        da[j] = tanh(da[j])     # apart, as the Cython step does (there it kept a loop scalar)
    for j in range(H):
        t = da[3 * H + j]
        o = a[3 * H + j]
        da[3 * H + j] = dh_row[j] * t * o * (one - o)                     # da_o
        d_ln = dh_row[j] * o * (one - t * t)
        row_sums[4 * GH + j] += d_ln * da[j]                               # ln_cell weight
        row_sums[5 * GH + j] += d_ln                                       # ln_cell bias
        da[H + j] = d_ln * g_c[j]
    s1 = dh.dtype.type(0)
    s2 = dh.dtype.type(0)
    for j in range(H):
        s1 += da[H + j]
        s2 += da[H + j] * da[j]
    s1 *= one / dh.dtype.type(H)
    s2 *= one / dh.dtype.type(H)
    for j in range(H):
        dc_row[j] += rstd_c * (da[H + j] - s1 - da[j] * s2)               # dc'
    lstm_cell_backward(a, c_old, da, dc_row)
    # a = LN(ax) + LN(ah) + b_ih + b_hh: da is the gradient of both normalizations
    kept, d_ah = saved[b], dgates_hh[b]
    norm_backward(da, kept[GH:2 * GH], norm[2], eps, d_ah, row_sums[2 * GH:3 * GH],
                  row_sums[3 * GH:4 * GH])
    norm_backward(da, kept[:GH], norm[0], eps, da, row_sums[:GH], row_sums[GH:2 * GH])
    d_hidden = dhh[b]
    for j in range(GH):
        d_hidden[j] = d_ah[j]
    for j in range(H):
        dh_row[j] = 0  # dL/dh is all dhh @ w_hh: the product after this pass


# GRU:  nx = LN(ax) + b_ih;  reset after: nh = LN(ah) + b_hh, n = tanh(nx_n + r * nh_n);
# reset before (phase 0: r, z, rh; phase 1: n, h'): nh_rz = LN(ah_rz) + b_hrz, and
# n = tanh(nx_n + LN(ah_n) + b_hn), ah_n = rh W_hn^T. Saved: the plain cell's (hn or rh),
# then ax (3H) and ah (3H). The gates buffer keeps r, z, n as the plain cells', and between
# the reset-before GRU's phases nx_n in the n block.

@njit(**config.KERNEL)
def gru_norm_forward_row(b, phase, reset_after, params, step):
    _, _, b_ih, b_hh, norm, options = params
    gates, hh, h, _, _, _, saved, _ = step
    eps = options[0]
    H = h.shape[1]
    GH = 3 * H
    a, hg = gates[b], hh[b]
    keep = saved.shape[0] > 0 and saved.shape[1] > H      # training (else at most rh)
    g_h, s_h = norm[2], norm[3]
    if phase == 1:
        # reset before: n = tanh(nx_n + LN(ah_n) + b_hn), then h'
        hg_n = hg[2 * H:]
        if keep:
            kept = saved[b]
            for k in range(H):
                kept[6 * H + k] = hg_n[k]
        mean_n, rstd_n = norm_stats(hg_n, eps)
        a_n = a[2 * H:]
        for k in range(H):
            a_n[k] = tanh((a_n[k] + ((hg_n[k] - mean_n) * rstd_n * g_h[2 * H + k]
                                     + s_h[2 * H + k])) + b_hh[2 * H + k])
        gru_new_state_row(b, 0, H, a[H:2 * H], a_n, step)
        return
    width = GH if reset_after else 2 * H          # the normalized recurrent product
    if keep:
        kept = saved[b]
        for k in range(GH):
            kept[H + k] = a[k]
        for k in range(width):
            kept[4 * H + k] = hg[k]
    norm_add(a, norm[0], norm[1], b_ih, eps, a)                           # nx
    norm_add(hg[:width], g_h, s_h, b_hh, eps, hg)                         # nh
    for k in range(2 * H):
        a[k] = sigmoid(a[k] + hg[k])                                       # r, z
    if reset_after:
        for k in range(H):
            a[2 * H + k] = tanh(a[2 * H + k] + a[k] * hg[2 * H + k])       # n
        if keep:
            kept = saved[b]
            for k in range(H):
                kept[k] = hg[2 * H + k]                                    # hn
        gru_new_state_row(b, 0, H, a[H:2 * H], a[2 * H:], step)
    else:
        rh_row, h_row = saved[b], h[b]
        for k in range(H):
            rh_row[k] = a[k] * h_row[k]       # product 1: hh's n block = rh @ W_hn.T


@njit(**config.KERNEL)
def gru_norm_backward_row(b, phase, reset_after, params, cache_t, grads_t):
    _, _, _, _, norm, options = params
    gates, h, _, _, saved = cache_t
    dgates, dgates_hh, dhh, dh, _, dsaved, sums, _ = grads_t
    eps = options[0]
    one = dh.dtype.type(1)
    H = dh.shape[1]
    GH = 3 * H
    a, h_old, da, dh_row, kept = gates[b], h[b], dgates[b], dh[b], saved[b]
    d_ah, d_hidden, row_sums = dgates_hh[b], dhh[b], sums[b]
    g_h = norm[2]
    if reset_after or phase == 1:
        gru_zn_backward_row(a, h_old, da, dh_row)      # da_z, da_n; dh_row *= z
    if reset_after:
        for j in range(H):
            r = a[j]
            d_ah[2 * H + j] = da[2 * H + j] * r      # the n block of LN(ah)'s gradient
            da[j] = da[2 * H + j] * kept[j] * r * (one - r)                # da_r (kept: hn)
        for j in range(2 * H):
            d_ah[j] = da[j]
        norm_backward(d_ah, kept[4 * H:7 * H], g_h, eps, d_ah, row_sums[2 * GH:3 * GH],
                      row_sums[3 * GH:4 * GH])
    elif phase == 1:
        # n = tanh(nx_n + LN(ah_n) + b_hn): product 1 after this pass, dsaved = d_ah_n @ W_hn
        norm_backward(da[2 * H:], kept[6 * H:7 * H], g_h[2 * H:], eps, d_ah[2 * H:],
                      row_sums[2 * GH + 2 * H:3 * GH], row_sums[3 * GH + 2 * H:4 * GH])
        for j in range(2 * H, GH):
            d_hidden[j] = d_ah[j]
        return
    else:
        gru_rh_backward(a, h_old, dsaved[b], da, dh_row)
        for j in range(2 * H):
            d_ah[j] = da[j]
        norm_backward(d_ah[:2 * H], kept[4 * H:6 * H], g_h[:2 * H], eps, d_ah[:2 * H],
                      row_sums[2 * GH:2 * GH + 2 * H], row_sums[3 * GH:3 * GH + 2 * H])
    width = GH if reset_after else 2 * H
    for j in range(width):
        d_hidden[j] = d_ah[j]
    # nx = LN(ax) + b_ih: da is its gradient
    norm_backward(da, kept[H:4 * H], norm[0], eps, da, row_sums[:GH], row_sums[GH:2 * GH])


# =============================================================================================
# Zoneout (Krueger et al. 2016), the same for every cell, after its step: each state unit
# becomes k * (its value before the step) + (1 - k) * (the cell's new value), k the unit's
# keep weight (a 0/1 mask in training, the rate for the expectation), and y the new h so made.
# ``zone_t = (keep, raw_c)`` of step t: keep (B, states*H), h's weights then c's, or (1, .)
# for the same weights in every row; raw_c (B, H), training with a cell state: where the
# forward keeps the cell's own c' (the LSTM's backward reads tanh(c'), not the mixed c),
# else (0, 0). Backward splits the gradient of the mixed state: (1 - k) of it goes into the
# cell's step, k of it (``carry`` (B, states*H)) straight to the state before the step.
# ``zone_t`` None (the one-step kernel): no zoneout compiled in.

def zoneout_forward_row(b, cols, states, zone_t, step):
    """Zoneout of the units cols of row b after the step (see above)."""


def zoneout_split_row(b, zone_t, dh, dc):
    """Backward, before the step: the gradient of the mixed state split (see above)."""


def zoneout_carry_row(b, zone_t, dh, dc):
    """Backward, after the step: the carried part added to the state's gradient."""


@overload(zoneout_forward_row, jit_options=config.EXACT_MIX)
def _zoneout_forward_row_overload(b, cols, states, zone_t, step):
    if isinstance(zone_t, types.NoneType):
        return lambda b, cols, states, zone_t, step: None

    def impl(b, cols, states, zone_t, step):
        keep, raw_c = zone_t
        if keep.shape[1] == 0:
            return
        j0, j1, _, _ = cols
        _, _, h, h_new, c, c_new, _, y = step
        H = h.shape[1]
        one = h.dtype.type(1)
        k = keep[b if keep.shape[0] > 1 else 0]
        kh, old, new, out = k[j0:j1], h[b, j0:j1], h_new[b, j0:j1], y[b, j0:j1]
        for j in range(j1 - j0):
            new[j] = kh[j] * old[j] + (one - kh[j]) * new[j]
            out[j] = new[j]
        if states == 2:
            kc, old, new = k[H + j0:H + j1], c[b, j0:j1], c_new[b, j0:j1]
            if raw_c.shape[0] > 0:
                raw = raw_c[b, j0:j1]
                for j in range(j1 - j0):
                    raw[j] = new[j]
            for j in range(j1 - j0):
                new[j] = kc[j] * old[j] + (one - kc[j]) * new[j]
    return impl


@overload(zoneout_split_row, jit_options=config.KERNEL)
def _zoneout_split_row_overload(b, zone_t, dh, dc):
    def impl(b, zone_t, dh, dc):
        keep, carry = zone_t
        if keep.shape[1] == 0:
            return
        H = dh.shape[1]
        one = dh.dtype.type(1)
        k, kept = keep[b if keep.shape[0] > 1 else 0], carry[b]
        for s in range(keep.shape[1] // H):
            d = dh[b] if s == 0 else dc[b]
            for j in range(H):
                kept[s * H + j] = k[s * H + j] * d[j]
                d[j] *= one - k[s * H + j]
    return impl


@overload(zoneout_carry_row, jit_options=config.KERNEL)
def _zoneout_carry_row_overload(b, zone_t, dh, dc):
    def impl(b, zone_t, dh, dc):
        keep, carry = zone_t
        if keep.shape[1] == 0:
            return
        H = dh.shape[1]
        kept = carry[b]
        for s in range(keep.shape[1] // H):
            d = dh[b] if s == 0 else dc[b]
            for j in range(H):
                d[j] += kept[s * H + j]
    return impl


# =============================================================================================
# The switch: the only place that reads the cell's code

@njit(**config.KERNEL)
def forward_row(spec, phase, b, cols, padding, params, step, zone_t):
    """One phase of the forward step of row b, units cols[0]..cols[1]-1, for the cell of
    spec, and after the last phase zone_t's zoneout; a padding row (t >= lengths[b]) keeps
    its state and outputs zero."""
    code, G, states, saved_width, second, _, _ = spec
    if padding:
        # the state passes through, the output is zero; before the last phase the saved row,
        # a later product's source, is zeroed (never stale)
        j0, j1, _, _ = cols
        _, _, h, h_new, c, c_new, saved, y = step
        H = h.shape[1]
        if phase == 0 and second < G:
            for w in range(saved_width):
                for j in range(w * H + j0, w * H + j1):
                    saved[b, j] = 0
            return
        for j in range(j0, j1):
            h_new[b, j] = h[b, j]
            y[b, j] = 0
        if states == 2:
            for j in range(j0, j1):
                c_new[b, j] = c[b, j]
    elif code == RNN_TANH or code == RNN_RELU:
        rnn_forward_row(b, cols, code == RNN_RELU, params, step)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_forward_row(b, cols, code == LSTM_PEEPHOLE, params, step)
    elif code == GRU:
        gru_forward_row(b, cols, params, step)
    elif code == GRU_RESET_BEFORE:
        gru_reset_before_forward_row(b, cols, phase, params, step)
    else:
        options_forward_row(code, phase, second == G, b, cols, params, step, params[5])
    if not padding and phase == (0 if second == G else 1):
        zoneout_forward_row(b, cols, states, zone_t, step)


@njit(**config.KERNEL)
def backward_row(spec, phase, b, padding, params, cache_t, grads_t, zone_t):
    """One phase of the backward step of row b (phases run last to first): dgates (and the
    hidden side) of the row, and the part of dh, dc that does not go through w_hh; zone_t's
    zoneout around the step."""
    code, G, _, _, second, hidden_blocks, _ = spec
    dgates, dgates_hh, dhh, dh, dc, _, _, dy = grads_t
    H = dh.shape[1]
    first_phase = phase == (0 if second == G else 1)
    if padding:
        # no gradient reaches the parameters or x; the state gradient passes through
        if first_phase:
            dgates[b, :] = 0
            if hidden_blocks > 0:
                dgates_hh[b, :] = 0
                dhh[b, :] = 0
        return
    if first_phase and dy.shape[0] > 0:
        dh_row, dy_row = dh[b], dy[b]
        for j in range(H):
            dh_row[j] += dy_row[j]             # dL/dh' = from later steps + from y
    if first_phase:
        zoneout_split_row(b, zone_t, dh, dc)
    if code == RNN_TANH or code == RNN_RELU:
        rnn_backward_row(b, code == RNN_RELU, cache_t, grads_t)
    elif code == LSTM or code == LSTM_PEEPHOLE:
        lstm_backward_row(b, code == LSTM_PEEPHOLE, params, cache_t, grads_t)
    elif code == GRU:
        gru_backward_row(b, cache_t, grads_t)
    elif code == GRU_RESET_BEFORE:
        gru_reset_before_backward_row(b, phase, cache_t, grads_t)
    else:
        options_backward_row(code, phase, second == G, b, params, cache_t, grads_t, params[5])
    if phase == 0:
        zoneout_carry_row(b, zone_t, dh, dc)


@njit(**config.PARALLEL)
def forward_pass(spec, phase, t, lengths, params, step, zone_t):
    """One phase of step t for every batch row, the rows split over threads."""
    H = step[2].shape[1]
    cols = (np.int64(0), np.int64(H), np.int64(H), np.int64(0))
    for row in prange(step[2].shape[0]):
        b = np.int64(row)  # one type for the row steps in the serial and the parallel typing
        forward_row(spec, phase, b, cols, t >= lengths[b], params, step, zone_t)


@njit(**config.PARALLEL)
def backward_pass(spec, phase, t, lengths, params, cache_t, grads_t, zone_t):
    """One backward phase of step t for every batch row, the rows split over threads."""
    for row in prange(grads_t[3].shape[0]):
        b = np.int64(row)
        backward_row(spec, phase, b, t >= lengths[b], params, cache_t, grads_t, zone_t)


@njit(**config.KERNEL)
def step_zone(zone, raw, t):
    """Step t's zone_t (see Zoneout) from the call's zone (T, B, states*H), or (1, ., .) for
    the same weights at every step, and raw (T, B, H) (training with a cell state: the
    forward's raw c, backward's carry source) or (1, 0, 0)."""
    return zone[t if zone.shape[0] > 1 else 0], raw[t if raw.shape[0] > 1 else 0]


@njit(**config.KERNEL)
def any_active(t, lengths):
    """Whether some row is inside its sequence at step t (else no product is needed)."""
    for b in range(lengths.shape[0]):
        if t < lengths[b]:
            return True
    return False


@njit(**config.KERNEL)
def slot_after(t, T, reverse):
    """The slot of h_slots / c_slots (train) holding the state after step t: the state before
    the next step in processing order, the final one at T."""
    if reverse:
        return t - 1 if t > 0 else T
    return t + 1


@njit(**config.KERNEL)
def step_slots(s, T, reverse, train):
    """(t, cur, nxt, ts) of the s-th step in processing order: its time index, the slots of
    the state before and after it, and its row of saved (see the module's Cache)."""
    t = T - 1 - s if reverse else s
    if not train:
        return t, s & 1, (s + 1) & 1, 0
    return t, t, slot_after(t, T, reverse), t


# =============================================================================================
# Products

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
# packing; see forward_rows, backward_loop). The per-step products run over w_hh packed once
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



# =============================================================================================
# Loops. forward_units, forward_rows and backward_loop (and forward_projected and
# backward_projected, further down) are not decorated: fastrnn._numba compiles each with one
# explicit signature per dtype (see _signatures there).
#
# The unit-split loop (small batches): the hidden units are split over P threads; thread p
# owns units [j0, j1) and per step computes the gate rows {g*H + j} of the product for its
# units, over its weight rows packed into panels once per call (panel_product) when the call
# is long enough to pay for the packing, else as dot products (dot_rows, each weight read once
# per step for up to 4 batch rows), then runs the cell's step for its units of every row. Its
# weight rows are the same every step, so they stay in its core's caches. The input projection
# of all T steps is done first by the same threads, for their own units, with the same kernel
# (no BLAS: OpenBLAS's pool threads go on spinning after a call and then take the cores from
# the unit threads).

@njit(**config.KERNEL)
def units_pass(p, P, spec, phase, t, lengths, params, packed_hh, own, step, backwards, zone_t):
    """Thread p's share of one phase of a step of the unit-split loop: the product of the
    phase's blocks for its units, then their rows. packed_hh (P, G, panels, H, NR): each
    thread's rows of w_hh as panels (units_input), or empty: dot products on w_hh (backwards:
    last row first, every other step; see dot_rows). own: gates and hh of step are part p's
    own, (B, G*C) (see forward_units_loop), else the layer's (B, G*H)."""
    _, G, _, _, second, _, _ = spec
    gates, hh, h, _, _, _, saved, _ = step
    w_hh = params[1]
    B, H = h.shape
    j0, j1 = unit_range(p, P, H)
    if j0 >= j1:
        return
    gs, go = (hh.shape[1] // G, 0) if own else (H, j0)
    if any_active(t, lengths):
        # hh[:, blocks of the phase] = source @ w_hh[those rows].T: h, then the saved buffer
        g0, g1 = (0, second) if phase == 0 else (second, G)
        v = h if phase == 0 else saved
        if packed_hh.shape[0] > 0:
            for g in range(g0, g1):
                panel_product(packed_hh[p, g], g * gs + go, j1 - j0, v, hh)
        else:
            dot_rows(w_hh, H, g0, g1 - g0, j0, j1, v, hh, gs, go, backwards and phase == 0)
    cols = (j0, j1, gs, go)
    for row in range(B):
        forward_row(spec, phase, np.int64(row), cols, t >= lengths[row], params, step, zone_t)


@njit(**config.KERNEL)
def units_input(p, P, params, x2, gates2, own, panels):
    """Thread p's units of the input projection of all steps: gates2 (T*B, G*H, or G*C when
    own: see units_pass) = x2 W_ih^T for the gate rows of its units.

    panels = (packed_ih, packed_hh, amx_ih). With panels (packed_hh not empty): the thread
    packs its rows of each gate block of w_ih into packed_ih[p] (panels, I, NR), one block at
    a time, and multiplies them with every row of x2; then packs its rows of w_hh into
    packed_hh[p] (G, panels, H, NR) for the steps. amx_ih (P, amx.packed_size(rows, I)), not
    empty: the blocks of w_ih packed into amx_ih[p] and multiplied on the tile unit instead
    (float32; the per-step products stay on panels: 4-8 small products a thread and step,
    each would set up the tiles again)."""
    w_ih, w_hh = params[0], params[1]
    packed_ih, packed_hh, amx_ih = panels
    H = w_hh.shape[1]
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
def units_substep(q, k, P, spec, reverse, train, lengths, params, units, ws, y):
    """Part q of substep k (see above): the input projection (k = 0), else one phase of a
    step. units = (x2, packed_ih, packed_hh, amx_ih, gates_own, hh_own): gates_own (P, T, B,
    G*C) and hh_own (P, B, G*C) each part's own (see forward_units_loop), or empty: the parts
    share the gates and hh of ws."""
    x2, packed_ih, packed_hh, amx_ih, gates_own, hh_own = units
    gates, h_slots, c_slots, saved, hh, _, zone, raw_c = ws
    own = gates_own.shape[0] > 0
    gq = gates_own[q] if own else gates
    hq = hh_own[q] if own else hh
    if k == 0:
        units_input(q, P, params, x2, gq.reshape((x2.shape[0], gq.shape[2])), own,
                    (packed_ih, packed_hh, amx_ih))
        return
    phases = 1 if spec[4] == spec[1] else 2
    s = (k - 1) // phases
    phase = k - 1 - s * phases
    t, cur, nxt, ts = step_slots(s, y.shape[0], reverse, train)
    step = (gq[t], hq, h_slots[cur], h_slots[nxt], c_slots[cur], c_slots[nxt], saved[ts], y[t])
    units_pass(q, P, spec, phase, t, lengths, params, packed_hh, own, step, s % 2 == 1,
               step_zone(zone, raw_c, t))


@njit(**config.KERNEL)
def units_loop_part(p, P, spec, reverse, train, lengths, params, units, ws, y, sync):
    """Thread p's side of the one-region loop: sync (>= (P + 1) * _SYNC_STRIDE,) int64, done at
    0 and claimed[q] at (q + 1) * _SYNC_STRIDE, all zero but claimed = -1 on entry."""
    phases = 1 if spec[4] == spec[1] else 2
    limit = _SPIN_STEAL
    for k in range(1 + y.shape[0] * phases):
        if atomic_claim(sync, (p + 1) * _SYNC_STRIDE, k - 1, k):
            units_substep(p, k, P, spec, reverse, train, lengths, params, units, ws, y)
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
                    units_substep(q, k, P, spec, reverse, train, lengths, params, units, ws, y)
                    atomic_add(sync, 0, 1)
            spins = 0
        limit = _SPIN_STEAL_AGAIN if stole else _SPIN_STEAL


@njit(**config.PARALLEL)
def units_loop_parallel(P, spec, reverse, train, lengths, params, units, ws, y, sync):
    for p in prange(P):
        units_loop_part(np.int64(p), P, spec, reverse, train, lengths, params, units, ws, y,
                        sync)


@njit(**config.KERNEL)
def forward_units_loop(spec, x, params, lengths, reverse, train, plan, y, ws, own):
    """The unit-split loop on plan's P threads (see above). packed: the products over
    weights packed into panels by each thread (pack_panels, panel_product), else dot
    products (dot_rows); use_amx: the input projection on the tile unit when packed. own =
    (gates_own, hh_own): for P > 1 in inference, each part's gates and hh in its own buffers
    (gates of ws then empty), not interleaved with the other parts' in the layer's rows;
    training keeps the layer's gates: they are the cache. Else both empty."""
    # parts that write next to each other's columns slow each other down (measured, LSTM
    # H=256, 2 parts, the pass alone: 3.9-4.3 -> 2.5 us a step at B=4, 16.5 -> 11.4 at B=16)
    _, P, packed, _, use_amx = plan
    T, B, I = x.shape
    G = spec[1]
    H = params[1].shape[1]
    NR = panel_width(x)
    C = unit_range(0, P, H)[1]                   # the most units a thread has
    panels = -(-C // NR)
    parts = P if packed else 0
    packed_ih = panel_buffer((parts, panels, I, NR), x)
    packed_hh = panel_buffer((parts, G, panels, H, NR), x)
    # the input projection on the tile unit when the call packs and has a tile of rows: a
    # buffer per thread for one block of its rows of w_ih
    amx_parts = parts if use_amx and T * B >= amx.MIN_ROWS else 0
    amx_rows = amx.packed_size(C, I)
    amx_ih = amx.buffer(amx_parts * amx_rows).reshape((amx_parts, amx_rows))
    units = (x.reshape((T * B, I)), packed_ih, packed_hh, amx_ih, own[0], own[1])
    if P > 1:
        sync = np.zeros((P + 1) * _SYNC_STRIDE, np.int64)
        for q in range(P):
            sync[(q + 1) * _SYNC_STRIDE] = -1
        units_loop_parallel(P, spec, reverse, train, lengths, params, units, ws, y, sync)
    else:
        phases = 1 if spec[4] == G else 2
        for k in range(1 + T * phases):
            units_substep(0, k, 1, spec, reverse, train, lengths, params, units, ws, y)


# Recurrent dropout (recurrent_mask (G, B, H)): gate block g's product is of h * mask[g]. The
# loops take masks on their BLAS path only (fastrnn._numba runs a masked call unpacked, on the
# batch-row loop): block by block, through a (B, H) buffer of the masked state.

@njit(**config.KERNEL)
def masked_products(h, mask, w_hh, blocks, h_masked, hh):
    """hh[:, block g] = (h * mask[g]) @ w_hh[block g].T for the first ``blocks`` blocks."""
    B, H = h.shape
    for g in range(blocks):
        for b in range(B):
            for j in range(H):
                h_masked[b, j] = h[b, j] * mask[g, b, j]
        gemm(h_masked, NO_TRANS, w_hh[g * H:(g + 1) * H], TRANS, hh[:, g * H:(g + 1) * H], 0.0)


@njit(**config.KERNEL)
def masked_products_backward(d, mask, w_hh, blocks, d_masked, dh):
    """dh += (d[:, block g] @ w_hh[block g]) * mask[g], summed over the first ``blocks``
    blocks g."""
    B, H = dh.shape
    for g in range(blocks):
        gemm(d[:, g * H:(g + 1) * H], NO_TRANS, w_hh[g * H:(g + 1) * H], NO_TRANS, d_masked, 0.0)
        for b in range(B):
            for j in range(H):
                dh[b, j] += d_masked[b, j] * mask[g, b, j]


@njit(**config.KERNEL)
def scale_columns(a, scale):
    """a[:, :H] *= scale (B, H): the first H columns of each row."""
    B, H = scale.shape
    for b in range(B):
        for j in range(H):
            a[b, j] *= scale[b, j]


@njit(**config.KERNEL)
def forward_rows_loop(spec, x, params, lengths, reverse, train, plan, y, ws):
    """The batch-row loop: the input projection of all steps, then per step and phase the
    product into hh and the pass. packed: the products over w_hh packed once per call (its
    rows), on this thread (BLAS for the input projection), or with pool on plan's threads
    (products split by panels, passes by rows), the input projection a packed product too:
    no BLAS call. use_amx (float32 only, amx.AVAILABLE): the packed products over at least
    amx.MIN_ROWS rows of x on the tile unit. Else BLAS."""
    _, G, _, _, second, _, _ = spec
    _, threads, packed, pool, use_amx = plan
    w_ih, w_hh = params[0], params[1]
    gates, h_slots, c_slots, saved, hh, mask, zone, raw_c = ws
    T, B, I = x.shape
    H = w_hh.shape[1]
    GH = G * H
    phases = 1 if second == G else 2
    n0, n1 = second * H, GH - second * H        # the rows of w_hh of products 0 and 1
    P = threads if pool else 1
    NR = panel_width(x)
    masked = mask.shape[0] > 0                  # recurrent dropout (never packed)
    h_masked = np.empty((B, H) if masked else (0, 0), x.dtype)
    amx_in = use_amx and pool and T * B >= amx.MIN_ROWS
    amx_h = use_amx and packed and B >= amx.MIN_ROWS
    # w_hh's panels, product 0's then product 1's (none when the tile unit takes them), in
    # the buffer that first holds w_ih's for the input projection
    p0 = -(-n0 // NR) if packed and not amx_h else 0
    p1 = -(-n1 // NR) if packed and not amx_h else 0
    flat = panel_buffer((max(-(-GH // NR) * I if pool and not amx_in else 0,
                             (p0 + p1) * H) * NR,), x)
    # the same on the tile unit: its layout, float32 (empty unless used)
    a0 = amx.packed_size(n0, H) if amx_h else 0
    a1 = amx.packed_size(n1, H) if amx_h and n1 > 0 else 0
    amx_flat = amx.buffer(max(amx.packed_size(GH, I) if amx_in else 0, a0 + a1))
    # gates = x @ w_ih.T                                                   (T*B, G*H)
    x2, gates2 = x.reshape((T * B, I)), gates.reshape((T * B, GH))
    if amx_in:
        amx.pack_and_multiply(P, w_ih, GH, x2, gates2, False, amx_flat)
    elif pool:
        pack_and_multiply(P, w_ih, GH, x2, gates2, False, flat)
    else:
        gemm(x2, NO_TRANS, w_ih, TRANS, gates2, 0.0)
    panels0 = flat[:p0 * H * NR].reshape((p0, H, NR))
    panels1 = flat[p0 * H * NR:(p0 + p1) * H * NR].reshape((p1, H, NR))
    amx_1 = amx_flat[a0:]
    if packed:
        pack_step_weights(P, amx_h, w_hh, 0, n0, amx_flat, panels0)
        if phases == 2:
            pack_step_weights(P, amx_h, w_hh, n0, n1, amx_1, panels1)
    for s in range(T):
        t, cur, nxt, ts = step_slots(s, T, reverse, train)
        step = (gates[t], hh, h_slots[cur], h_slots[nxt], c_slots[cur], c_slots[nxt],
                saved[ts], y[t])
        active = any_active(t, lengths)
        for phase in range(phases):
            if active and phase == 0:
                # hh[:, :n0] = h @ w_hh[:n0].T                                 (B, n0)
                if packed:
                    step_product(P, amx_h, amx_flat, panels0, n0, step[2], hh, 0, False)
                elif masked:
                    masked_products(step[2], mask, w_hh, second, h_masked, hh)
                else:
                    gemm(step[2], NO_TRANS, w_hh[:n0], TRANS, hh[:, :n0], 0.0)
            elif active:
                if masked:
                    # rh = r * (h * mask[n]): the phase made r * h
                    scale_columns(step[6], mask[second])
                # hh[:, n0:] = saved[:, :H] @ w_hh[n0:].T  (the saved buffers' first H
                # columns: a layer-normalized cell keeps its products after them)  (B, n1)
                if packed:
                    step_product(P, amx_h, amx_1, panels1, n1, step[6][:, :H], hh, n0, False)
                else:
                    gemm(step[6][:, :H], NO_TRANS, w_hh[n0:], TRANS, hh[:, n0:], 0.0)
            forward_pass(spec, phase, t, lengths, params, step, step_zone(zone, raw_c, t))


def forward_units(spec, x, params, lengths, reverse, train, plan, y, ws, own):
    """One layer, one direction (see the module's Loops and Cache) on the unit-split loop.
    The state before the first step is in its slot of ws's h_slots and c_slots
    (fastrnn._numba puts it there) and the final one ends in its slot. The two forward loops
    are compiled apart, so that a first call compiles only the one it runs."""
    forward_units_loop(spec, x, params, lengths, reverse, train, plan, y, ws, own)


def forward_rows(spec, x, params, lengths, reverse, train, plan, y, ws, own):
    """``forward_units`` on the batch-row loop (``own`` unused: the same signature)."""
    forward_rows_loop(spec, x, params, lengths, reverse, train, plan, y, ws)


def backward_loop(spec, x, params, lengths, reverse, truncate, plan, cache, dy, grads,
                  dparams, dx):
    """Backward through one layer, one direction; ADDS into dparams and dx.

    cache = (gates, h_slots, c_slots, saved) of forward; grads = (dgates, dgates_hh, dhh, dh,
    dc, dsaved, dpeep, ones) (see the module's Cache): dh, dc hold the gradient of the final
    state and end as that of the initial state; dpeep zeros; ones all ones. dy (T, B, H), or
    (T, 0, 0) for none. truncate: 0 for none. plan: packed, the per-step products over w_hh's
    columns packed once; pool: on its threads, and the products after the loop packed too
    (no BLAS call), else on this thread and BLAS after the loop."""
    _, G, _, _, second, hidden_blocks, _ = spec
    _, threads, packed, pool, use_amx = plan
    w_hh = params[1]
    gates, h_slots, c_slots, saved, mask, zone, raw_c = cache
    dgates, dgates_hh, dhh, dh, dc, dsaved, dpeep, _, carry = grads
    T, B, _ = x.shape
    H = w_hh.shape[1]
    phases = 1 if second == G else 2
    masked = mask.shape[0] > 0                  # recurrent dropout (never packed)
    d_masked = np.empty((B, H) if masked else (0, 0), x.dtype)
    n0, n1 = second * H, (G - second) * H
    P = threads if pool else 1
    # the columns of w_hh as panels, W[u, g] = w_hh[g, u], product 0's and product 1's
    NR = panel_width(x)
    amx_h = packed and use_amx and B >= amx.MIN_ROWS
    col_panels = -(-H // NR) if packed and not amx_h else 0
    panels0 = panel_buffer((col_panels, n0, NR), x)
    panels1 = panel_buffer((col_panels if phases == 2 else 0, n1, NR), x)
    # or on the tile unit: w_hh's columns in its layout (empty unless used)
    a0 = amx.packed_size(H, n0) if amx_h else 0
    amx_hh = amx.buffer(a0 + (amx.packed_size(H, n1) if amx_h and phases == 2 else 0))
    amx_1 = amx_hh[a0:]
    if packed:
        pack_step_weights(P, amx_h, w_hh[:n0].T, 0, H, amx_hh, panels0)
        if phases == 2:
            pack_step_weights(P, amx_h, w_hh[n0:].T, 0, H, amx_1, panels1)
    for s in range(T):
        t = s if reverse else T - 1 - s
        active = any_active(t, lengths)
        # the state gradient leaving step t crosses the boundary to the step before it in time
        # order (t - 1 forward, t + 1 reverse); truncation cuts boundaries at multiples of k
        boundary = t + 1 if reverse else t
        cut = truncate > 0 and 0 < boundary < T and boundary % truncate == 0
        # the cell's own c' of the step: with zoneout, the forward's raw c, not the mixed slot
        cache_t = (gates[t], h_slots[t], c_slots[t],
                   raw_c[t] if raw_c.shape[1] > 0 else c_slots[slot_after(t, T, reverse)],
                   saved[t])
        zone_t = (zone[t if zone.shape[0] > 1 else 0], carry)
        grads_t = (dgates[t], dgates_hh[t], dhh, dh, dc, dsaved, dpeep, dy[t])
        d = dhh if hidden_blocks > 0 else dgates[t]      # the hidden side of step t
        for i in range(phases):
            phase = phases - 1 - i
            backward_pass(spec, phase, t, lengths, params, cache_t, grads_t, zone_t)
            if active and phase == 1:
                # dsaved = d[:, n0:] @ w_hh[n0:]                               (B, H)
                if packed:
                    step_product(P, amx_h, amx_1, panels1, H, d[:, n0:], dsaved, 0, False)
                else:
                    gemm(d[:, n0:], NO_TRANS, w_hh[n0:], NO_TRANS, dsaved, 0.0)
                if masked:
                    scale_columns(dsaved, mask[second])       # rh = r * (h * mask[n])
            elif active and not cut:
                # dh += d[:, :n0] @ w_hh[:n0]                                  (B, H)
                if packed:
                    step_product(P, amx_h, amx_hh, panels0, H, d[:, :n0], dh, 0, True)
                elif masked:
                    masked_products_backward(d, mask, w_hh, second, d_masked, dh)
                else:
                    gemm(d[:, :n0], NO_TRANS, w_hh[:n0], NO_TRANS, dh, 1.0)
        if cut:
            dh[:] = 0
            dc[:] = 0
    # let the step panels go before the gradient products allocate theirs: Numba would free
    # them only at the end of this block (LSTM H=512 training: peak RSS +4 MB)
    panels0 = panels1 = panel_buffer((0, 0, NR), x)
    parameter_gradients((P if packed and pool else 0, use_amx, amx_hh), spec, x, params, cache,
                        grads, dparams, dx)


@njit(**config.KERNEL)
def hidden_side_runs(g0, g1, first_hidden, hidden_blocks):
    """The gate blocks [g0, g1) of a product in three runs [a0, a1): before, among and after
    the hidden-side blocks (run 1 is the one whose hidden side is dgates_hh, not dgates).
    Runs may be empty (a0 >= a1)."""
    h0, h1 = first_hidden, first_hidden + hidden_blocks
    return ((g0, min(g1, h0)), (max(g0, h0), min(g1, h1)), (max(g0, h1), g1))


@njit(**config.KERNEL)
def gradient_operands(k, spec, T, cache, grads):
    """(source, d_in, d_hh) of product k over all T*B rows: its source (h before each step,
    or the saved buffer), and dgates and dgates_hh as (T*B, .) matrices."""
    h_slots, saved = cache[1], cache[3]
    dgates, dgates_hh = grads[0], grads[1]
    B, H = h_slots.shape[1], h_slots.shape[2]
    if k == 0:
        source = h_slots.reshape((h_slots.shape[0] * B, H))[:T * B]
    else:
        source = saved.reshape((T * B, saved.shape[2]))[:, :H]
    return (source, dgates.reshape((T * B, dgates.shape[2])),
            dgates_hh.reshape((T * B, dgates_hh.shape[2])))


@njit(**config.KERNEL)
def parameter_gradients(pool, spec, x, params, cache, grads, dparams, dx):
    """After backward's loop, over all T*B rows (dgates is zero at padding): dx += dgates @
    w_ih, dw_ih += dgates.T @ x, db_ih += dgates.sum(0); for each product, dw_hh[its blocks]
    += D.T @ its source and db_hh[its blocks] += D.sum(0), D = dgates except on the
    hidden-side blocks, dgates_hh. pool = (P, use_amx, amx_flat), P > 0: packed products and
    column sums on P threads (use_amx: on the tile unit from amx.MIN_ROWS rows, packing into
    amx_flat, the loop's, when it is big enough); P = 0: BLAS."""
    _, G, _, _, second, hidden_blocks, first_hidden = spec
    P, use_amx, amx_flat = pool
    w_ih = params[0]
    dpeep, ones = grads[6], grads[7]
    dw_ih, dw_hh, db_ih, db_hh, dpeephole = dparams
    T, B, I = x.shape
    H = w_ih.shape[0] // G
    GH, TB = G * H, T * B
    NR = panel_width(x)
    x2, dx2 = x.reshape((TB, I)), dx.reshape((TB, I))
    use_amx = P > 0 and use_amx and TB >= amx.MIN_ROWS
    flat = panel_buffer((0 if use_amx or P == 0 else
                         max(-(-I // NR) * GH, -(-max(I, H) // NR) * min(TB, _GRAD_CHUNK)) * NR,),
                        x)
    need = max(amx.packed_size(I, GH),
               amx.packed_size(max(I, H), min(TB, _GRAD_CHUNK))) if use_amx else 0
    if amx_flat.shape[0] < need:
        amx_flat = amx.buffer(need)
    ones2 = ones.reshape((1, TB))
    sums = np.zeros(GH if P > 0 else 0, x.dtype)    # dgates.sum(0), shared by db_ih and db_hh
    mask = cache[4]                                 # recurrent dropout: P == 0 then
    source_masked = np.empty((TB, H) if mask.shape[0] > 0 else (0, 0), x.dtype)
    for k in range(1 if second == G else 2):
        source, d_in, d_hh = gradient_operands(k, spec, T, cache, grads)
        if k == 0:
            # dx += dgates @ w_ih (packed: W[c, g] = w_ih[g, c]);  dw_ih += dgates.T @ x;
            # db_ih += dgates.sum(0)
            if P > 0:
                one_off_product(P, use_amx, w_ih.T, I, d_in, dx2, flat, amx_flat)
                any_weight_gradient(P, use_amx, d_in, x2, dw_ih, flat, amx_flat)
                column_sums(P, d_in, sums)
                for j in range(GH):
                    db_ih[j] += sums[j]
            else:
                gemm(d_in, NO_TRANS, w_ih, NO_TRANS, dx2, 1.0)
                gemm(d_in, TRANS, x2, NO_TRANS, dw_ih, 1.0)
                gemm(ones2, NO_TRANS, d_in, NO_TRANS, db_ih.reshape((1, GH)), 1.0)
        g0, g1 = (0, second) if k == 0 else (second, G)
        runs = hidden_side_runs(g0, g1, first_hidden, hidden_blocks)
        for r in range(3):
            a0, a1 = runs[r]
            if a0 >= a1:
                continue
            # dw_hh[blocks] += d[blocks].T @ source;  db_hh[blocks] += d[blocks].sum(0)
            d = d_hh[:, (a0 - first_hidden) * H:(a1 - first_hidden) * H] if r == 1 \
                else d_in[:, a0 * H:a1 * H]
            db = db_hh[a0 * H:a1 * H]
            if P == 0 and k == 0 and mask.shape[0] > 0:
                # block g of product 0 was of h * mask[g]
                for g in range(a0, a1):
                    for row in range(TB):
                        b = row % B
                        for j in range(H):
                            source_masked[row, j] = source[row, j] * mask[g, b, j]
                    gemm(d[:, (g - a0) * H:(g - a0 + 1) * H], TRANS, source_masked, NO_TRANS,
                         dw_hh[g * H:(g + 1) * H], 1.0)
                gemm(ones2, NO_TRANS, d, NO_TRANS, db.reshape((1, db.shape[0])), 1.0)
                continue
            if P == 0:
                gemm(d, TRANS, source, NO_TRANS, dw_hh[a0 * H:a1 * H], 1.0)
                gemm(ones2, NO_TRANS, d, NO_TRANS, db.reshape((1, db.shape[0])), 1.0)
                continue
            any_weight_gradient(P, use_amx, d, source, dw_hh[a0 * H:a1 * H], flat, amx_flat)
            if r == 1:
                column_sums(P, d, db)
            else:
                for j in range(a1 * H - a0 * H):
                    db[j] += sums[a0 * H + j]
    if dpeep.shape[1] > 0:
        # dpeephole += dpeep.sum(0)
        column_sums(1, dpeep, dpeephole.reshape((dpeep.shape[1],)))


# ---------------------------------------------------------------------------------------------
# A projected LSTM whose h is zoned out per unit (fastrnn.projection): h is P wide, h' = k h +
# (1 - k) w_hr m with m = o * tanh(c') the cell's own output, H wide. Such an h is no product of
# the m the cell makes, so these loops carry it beside the cell's state: the cell's slots
# (h_slots) hold m, the projection's slots (proj_slots, (slots, B, P)) hold h, each step's
# product is of h with w_hh (G*H, P), and after the pass m is projected and mixed. The cell's
# own zoneout sees only c (its h weights are 0). The batch-row loop on BLAS, never packed
# (as recurrent dropout's masks).

@njit(**config.EXACT_MIX)
def projected_zoneout_row(b, t, padding, keep, h, h_raw, h_new, y):
    """Row b of step t: h_new = k h + (1 - k) h_raw (y the same), keep (T, B, P) masks or
    (1, 1, P) rates; a padding row keeps h, y zero."""
    P = h.shape[1]
    if padding:
        for j in range(P):
            h_new[b, j] = h[b, j]
            y[b, j] = 0
        return
    one = h.dtype.type(1)
    k = keep[t if keep.shape[0] > 1 else 0, b if keep.shape[1] > 1 else 0]
    for j in range(P):
        v = k[j] * h[b, j] + (one - k[j]) * h_raw[b, j]
        h_new[b, j] = v
        y[b, j] = v


@njit(**config.KERNEL)
def projected_zoneout_backward_row(b, t, padding, keep, dy, dh, dh_raw):
    """Undoes projected_zoneout_row: dh (the gradient of h after step t) with dy[t] splits into
    dh_raw = (1 - k) of it, for w_hr m, and k of it, kept in dh for h before the step; a padding
    row keeps dh, dh_raw zero."""
    P = dh.shape[1]
    if padding:
        for j in range(P):
            dh_raw[b, j] = 0
        return
    one = dh.dtype.type(1)
    k = keep[t if keep.shape[0] > 1 else 0, b if keep.shape[1] > 1 else 0]
    with_dy = dy.shape[0] > 0
    for j in range(P):
        d = dh[b, j] + dy[b, j] if with_dy else dh[b, j]
        dh_raw[b, j] = (one - k[j]) * d
        dh[b, j] = k[j] * d


def forward_projected(spec, x, params, w_hr, lengths, reverse, train, y, ws, proj):
    """The loop of a projected LSTM with zoneout of h (see above; not decorated: fastrnn._numba
    compiles it with a signature per dtype). ws as forward_rows_loop's (h_slots: m; zone with
    h weights 0, c's own); proj = (proj_slots, h_raw (B, P) scratch, keep): h before the first
    step is in its slot of proj_slots, the final one ends in its slot."""
    gates, m_slots, c_slots, saved, hh, _, zone, raw_c = ws
    proj_slots, h_raw, keep = proj
    w_ih, w_hh = params[0], params[1]
    T, B, I = x.shape
    GH = gates.shape[2]
    # gates = x @ w_ih.T                                                   (T*B, G*H)
    gemm(x.reshape((T * B, I)), NO_TRANS, w_ih, TRANS, gates.reshape((T * B, GH)), 0.0)
    phase = np.int64(0)
    for s in range(T):
        t, cur, nxt, ts = step_slots(s, T, reverse, train)
        m_new = m_slots[nxt]
        # the cell writes m as its h and as its y (a strided view: the type forward_rows_loop
        # gives forward_pass, whose compiled code this loop then shares)
        step = (gates[t], hh, m_slots[cur], m_new, c_slots[cur], c_slots[nxt], saved[ts],
                m_new[:, ::1])
        active = any_active(t, lengths)
        if active:
            # hh = h @ w_hh.T                                                  (B, G*H)
            gemm(proj_slots[cur], NO_TRANS, w_hh, TRANS, hh, 0.0)
        forward_pass(spec, phase, t, lengths, params, step, step_zone(zone, raw_c, t))
        if active:
            # h_raw = m @ w_hr.T                                               (B, P)
            gemm(m_new, NO_TRANS, w_hr, TRANS, h_raw, 0.0)
        for b in range(B):
            projected_zoneout_row(b, t, t >= lengths[b], keep, proj_slots[cur], h_raw,
                                  proj_slots[nxt], y[t])


def backward_projected(spec, x, params, w_hr, lengths, reverse, truncate, cache, proj, dy,
                       grads, dparams, dx, dw_hr):
    """Backward of forward_projected; ADDS into dparams, dx and dw_hr. cache as
    backward_loop's (h_slots: m), grads too (dh: the gradient of m, (B, H)); proj =
    (proj_slots, keep, dh_proj (B, P): the gradient of h after the last step on entry, of h0
    on exit, dh_raw (B, P) scratch)."""
    _, _, _, _, _, hidden_blocks, _ = spec
    gates, m_slots, c_slots, saved, mask, zone, raw_c = cache
    proj_slots, keep, dh, dh_raw = proj
    dgates, dgates_hh, dhh, dm, dc, dsaved, dpeep, _, carry = grads
    w_hh = params[1]
    T, B, _ = x.shape
    no_dy = dy[0, :0]
    phase = np.int64(0)
    for s in range(T):
        t = s if reverse else T - 1 - s
        active = any_active(t, lengths)
        boundary = t + 1 if reverse else t          # as in backward_loop
        cut = truncate > 0 and 0 < boundary < T and boundary % truncate == 0
        after = slot_after(t, T, reverse)
        for b in range(B):
            projected_zoneout_backward_row(b, t, t >= lengths[b], keep,
                                           dy[t] if dy.shape[1] > 0 else no_dy, dh, dh_raw)
        if active:
            # dm = dh_raw @ w_hr  (B, H);  dw_hr += dh_raw.T @ m  (P, H)
            gemm(dh_raw, NO_TRANS, w_hr, NO_TRANS, dm, 0.0)
            gemm(dh_raw, TRANS, m_slots[after], NO_TRANS, dw_hr, 1.0)
        cache_t = (gates[t], m_slots[t], c_slots[t],
                   raw_c[t] if raw_c.shape[1] > 0 else c_slots[after], saved[t])
        zone_t = (zone[t if zone.shape[0] > 1 else 0], carry)
        grads_t = (dgates[t], dgates_hh[t], dhh, dm, dc, dsaved, dpeep, no_dy)
        backward_pass(spec, phase, t, lengths, params, cache_t, grads_t, zone_t)
        if active and not cut:
            # dh += d @ w_hh, d the step's hidden side                         (B, P)
            gemm(dhh if hidden_blocks > 0 else dgates[t], NO_TRANS, w_hh, NO_TRANS, dh, 1.0)
        if cut:
            dh[:] = 0
            dc[:] = 0
    # w_hh's gradient is of h, the projection's slots. BLAS (pool size 0), no tile unit: the
    # flag a boolean expression, not the literal False, so the call has backward_loop's types
    # and shares its compiled parameter_gradients
    parameter_gradients((np.int64(0), truncate < 0, amx.buffer(0)), spec, x, params,
                        (gates, proj_slots, c_slots, saved, mask, zone, raw_c), grads, dparams,
                        dx)


# ---------------------------------------------------------------------------------------------
# One step of inference for the layer's one-step call (fastrnn._numba.layer_call_step): both
# products as unit-split dot products, then the cell's step, on borrowed arrays.

@njit(**config.KERNEL)
def step_pass(p, P, spec, phase, x2, params, step):
    _, G, _, _, second, _, _ = spec
    w_ih, w_hh = params[0], params[1]
    gates, hh, h, _, _, _, saved, _ = step
    B, H = h.shape
    j0, j1 = unit_range(p, P, H)
    if j0 >= j1:
        return
    if phase == 0:
        dot_rows(w_ih, H, 0, G, j0, j1, x2, gates, H, j0)          # x W_ih^T
        dot_rows(w_hh, H, 0, second, j0, j1, h, hh, H, j0)
    else:
        dot_rows(w_hh, H, second, G - second, j0, j1, saved, hh, H, j0)
    cols = (j0, j1, H, j0)
    for row in range(B):
        forward_row(spec, phase, np.int64(row), cols, False, params, step, None)


@njit(**config.PARALLEL)
def step_pass_parallel(P, spec, phase, x2, params, step):
    for p in prange(P):
        step_pass(np.int64(p), P, spec, phase, x2, params, step)


def step(spec, threads, batch_first, x, state0, row, params, state_n, out, col):
    """One step of one layer and direction, compiled per dtype: the layer's one-step call
    (fastrnn._numba.layer_call_step) a row (layer and direction) at a time. Returns 0, or 1
    when an argument's shape does not fit (the call then takes the layer's general path).

    x (1, B, I), or (B, 1, I) with batch_first; state0 = (h0, c0), state_n = (h_n, c_n), each
    (rows, B, H), the step's at [row] (c0, c_n (1, 0, 0) for cells without c); h_n[row] is
    also copied to out[..., col:col + H], out (1, B, W) or (B, 1, W). threads: the most
    threads to use, from config.STEP_PARALLEL_MIN_WORK multiply-adds (G*H*(I+H)*B) on."""
    _, G, states, saved_width, second, _, _ = spec
    h0, c0 = state0
    h_n, c_n = state_n
    w_ih, w_hh, b_ih, b_hh, peephole, options = params
    B = x.shape[0] if batch_first else x.shape[1]
    I, H = x.shape[2], h0.shape[2]
    GH = G * H
    if (x.shape[1 if batch_first else 0] != 1 or row < 0 or h0.shape[0] <= row
            or h0.shape[1] != B or w_ih.shape[0] != GH or w_ih.shape[1] != I
            or w_hh.shape[0] != GH or w_hh.shape[1] != H or b_ih.shape[0] != GH
            or b_hh.shape[0] != GH
            or (peephole.size > 0 and (peephole.shape[0] != 3 or peephole.shape[1] != H))
            or (states == 2 and (c0.shape[0] <= row or c0.shape[1] != B or c0.shape[2] != H))):
        return 1
    if B == 0 or H == 0:
        return 0
    # one workspace: gates (B, GH), hh (B, GH), saved (B, saved_width*H) for a second product
    n_saved = B * saved_width * H if second < G else 0
    work = np.empty(2 * B * GH + n_saved, x.dtype)
    # everything below borrowed: the caller holds the arguments, keep_alive the locals
    flat = borrowed(work)
    rc = row if states == 2 else 0                # absent c0 and c_n are (1, 0, 0)
    h_new = borrowed(h_n)[row]
    views = (flat[:B * GH].reshape((B, GH)), flat[B * GH:2 * B * GH].reshape((B, GH)),
             borrowed(h0)[row], h_new, borrowed(c0)[rc], borrowed(c_n)[rc],
             flat[2 * B * GH:].reshape((B, saved_width * H) if second < G else (0, 0)), h_new)
    params = (borrowed(w_ih), borrowed(w_hh), borrowed(b_ih), borrowed(b_hh), borrowed(peephole),
              options)                                  # None: plain cells only here
    x2 = borrowed(x).reshape((B, I))
    P = 1
    if GH * (I + H) * B >= config.STEP_PARALLEL_MIN_WORK:
        P = unit_parts(threads, H)
    for phase in range(1 if second == G else 2):
        if P > 1:
            step_pass_parallel(P, spec, phase, x2, params, views)
        else:
            step_pass(0, 1, spec, phase, x2, params, views)
    out2 = borrowed(out).reshape((B, out.shape[2]))
    for b in range(B):
        for j in range(H):
            out2[b, col + j] = h_new[b, j]
    keep_alive(work)
    return 0
