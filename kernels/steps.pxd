# One step of each cell, for ONE batch row: the step pair per cell, side by side (fastrnn/cells.py
# has the records, fastrnn/reference.py the same steps in NumPy). The time loops of layers.pyx
# make the recurrent products and call these, through forward_row / backward_row (the one switch
# on the cell's code), for every row inside its sequence.
#
# Arguments: written buffers, read buffers, sizes. Per row, with H hidden units and G gates:
#
#   gates     (G*H)  forward in: x W_ih^T (this row, this step); out: the activated gates, kept
#                    for backward (RNN: h' itself)
#   hh        (G*H)  this step's recurrent products (h W_hh^T; GRU reset-before's n block:
#                    (r*h) W_hn^T); the GRU step may overwrite it
#   b_ih, b_hh (G*H) biases, added here: a = (x W_ih^T + b_ih) + (h W_hh^T + b_hh) as the reference
#   h, c      (H)    the state before the step; h_new, c_new after it; y (H) the output row
#   saved     (H)    the cell's saved buffer of this row (cells.Cell.saved): GRU hn, GRU
#                    reset-before rh = r*h, the source of its second product
#   phase     0, 1   forward: the pass after product `phase`; backward: the pass that undoes it
#   dgates    (G*H)  backward out: dL/d(x W_ih^T + b_ih), the input side of every gate
#   dh, dc    (H)    backward in: dL/dh', dL/dc' (dy already added); out: the part of dL/dh, dL/dc
#                    that does not go through W_hh (the loop adds the products' part)
#
# The forward steps work on a range of n units of the row (n = H for a whole row): every pointer
# is offset by the first unit j0, and H is the stride between the gate blocks (gates, hh, b_ih,
# b_hh, peephole); the unit-split loop of layers.pyx gives each thread its own range.
#
# Speed: the float loops must vectorise. A loop whose body writes several arrays through
# pointers the compiler cannot tell apart needs a run-time overlap test per pair, and past ten
# of them GCC keeps the loop scalar. So each step is a few short loops, one equation each, that
# write one or two arrays; the row (a few KB) stays in L1 between them.
from cython cimport floating

from libc.math cimport INFINITY, exp, expm1, fabs, log1p
from libc.string cimport memcpy

from activations cimport (relu, relu_backward, sigmoid, sigmoid_inplace, tanh_, tanh_inplace,
                          tanh_into)

# cells.Cell.code, read only by the two switches (layers.pyx forward_row / backward_row)
cdef enum:
    RNN_TANH = 0
    RNN_RELU = 1
    LSTM = 2
    LSTM_PEEPHOLE = 3
    GRU = 4
    GRU_RESET_BEFORE = 5
    RNN_OPTIONS = 6             # cells.OPTIONS_CODES: the step pairs with options
    LSTM_OPTIONS = 7
    GRU_OPTIONS = 8
    LSTM_NORM = 9               # cells.LAYER_NORM_CODES: the layer-normalized step pairs
    GRU_NORM = 10
    NUM_CODES = 11              # one past the last: a new cell's code goes before it


cdef inline void _preactivation(floating* gates, const floating* hh, const floating* b_ih,
                                const floating* b_hh, Py_ssize_t blocks, Py_ssize_t n,
                                Py_ssize_t H) noexcept nogil:
    # the first n units of each of the first `blocks` gate blocks (stride H):
    # gates = (x W_ih^T + b_ih) + (h W_hh^T + b_hh), summed in the reference's order
    cdef Py_ssize_t j, k
    cdef floating* a
    for k in range(blocks):
        a = gates + k * H
        for j in range(n):
            a[j] = a[j] + b_ih[k * H + j] + (hh[k * H + j] + b_hh[k * H + j])


# ---------------------------------------------------------------------------------------------
# RNN:  h' = act(W_ih x + b_ih + W_hh h + b_hh)

cdef inline void rnn_forward_row(floating* gates, floating* h_new, floating* y,
                                 const floating* hh, const floating* b_ih, const floating* b_hh,
                                 Py_ssize_t n, Py_ssize_t H, bint use_relu) noexcept nogil:
    cdef Py_ssize_t j
    _preactivation(gates, hh, b_ih, b_hh, 1, n, H)
    if use_relu:
        for j in range(n):
            gates[j] = relu(gates[j])
    else:
        tanh_inplace(gates, n)             # gates keeps h': backward reads act'(a) off it
    for j in range(n):
        h_new[j] = gates[j]
        y[j] = gates[j]


cdef inline void rnn_backward_row(floating* dgates, floating* dh, const floating* gates,
                                  Py_ssize_t H, bint use_relu) noexcept nogil:
    cdef Py_ssize_t j
    if use_relu:
        for j in range(H):
            # h' = relu(a)
            dgates[j] = relu_backward(dh[j], gates[j])
    else:
        for j in range(H):
            # h' = tanh(a)
            dgates[j] = dh[j] * (<floating>1 - gates[j] * gates[j])
    for j in range(H):
        dh[j] = 0                          # dL/dh is all dgates @ W_hh


# ---------------------------------------------------------------------------------------------
# LSTM, gates i, f, g, o; with peephole (3H, rows i, f, o): p_i, p_f see c, p_o sees c'

cdef inline void lstm_forward_row(floating* gates, floating* h_new, floating* c_new, floating* y,
                                  const floating* hh, const floating* b_ih, const floating* b_hh,
                                  const floating* c, const floating* peephole,
                                  Py_ssize_t n, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef floating* i = gates
    cdef floating* f = gates + H
    cdef floating* g = gates + 2 * H
    cdef floating* o = gates + 3 * H
    _preactivation(gates, hh, b_ih, b_hh, 4, n, H)
    if peephole != NULL:
        for j in range(n):
            i[j] = i[j] + peephole[j] * c[j]
        for j in range(n):
            f[j] = f[j] + peephole[H + j] * c[j]
    sigmoid_inplace(i, n)
    sigmoid_inplace(f, n)
    tanh_inplace(g, n)
    for j in range(n):
        c_new[j] = f[j] * c[j] + i[j] * g[j]
    if peephole != NULL:
        for j in range(n):
            o[j] = o[j] + peephole[2 * H + j] * c_new[j]
    sigmoid_inplace(o, n)
    # h' = o * tanh(c'), tanh(c') passing through y
    tanh_into(y, c_new, n)
    for j in range(n):
        y[j] = o[j] * y[j]
    for j in range(n):
        h_new[j] = y[j]


cdef inline void _lstm_igf_backward(floating* dgates, const floating* dc,
                                    const floating* gates, const floating* c,
                                    Py_ssize_t H) noexcept nogil:
    # c' = f * c + i * g: the i, f, g blocks of dgates from dc = dL/dc'
    cdef Py_ssize_t j
    cdef const floating* i = gates
    cdef const floating* f = gates + H
    cdef const floating* g = gates + 2 * H
    for j in range(H):
        dgates[j] = dc[j] * g[j] * i[j] * (<floating>1 - i[j])
    for j in range(H):
        dgates[H + j] = dc[j] * c[j] * f[j] * (<floating>1 - f[j])
    for j in range(H):
        dgates[2 * H + j] = dc[j] * i[j] * (<floating>1 - g[j] * g[j])


cdef inline void lstm_backward_row(floating* dgates, floating* dh, floating* dc,
                                   floating* dpeephole,
                                   const floating* gates, const floating* c,
                                   const floating* c_new, const floating* peephole,
                                   Py_ssize_t H) noexcept nogil:
    # dpeephole (3H): this row's running sums of da_i*c, da_f*c, da_o*c' (NULL without peepholes)
    cdef Py_ssize_t j
    cdef const floating* f = gates + H
    cdef const floating* o = gates + 3 * H
    cdef floating* da_i = dgates
    cdef floating* da_f = dgates + H
    cdef floating* da_o = dgates + 3 * H
    # h' = o * tanh(c'); tanh(c') passes through da_o
    tanh_into(da_o, c_new, H)
    for j in range(H):
        dc[j] = dc[j] + dh[j] * o[j] * (<floating>1 - da_o[j] * da_o[j])
    for j in range(H):
        da_o[j] = dh[j] * da_o[j] * o[j] * (<floating>1 - o[j])
    if peephole != NULL:
        # a_o = ... + p_o * c'
        for j in range(H):
            dc[j] = dc[j] + da_o[j] * peephole[2 * H + j]
    # c' = f * c + i * g
    _lstm_igf_backward(dgates, dc, gates, c, H)
    if peephole != NULL:
        # a_i = ... + p_i * c;  a_f = ... + p_f * c
        for j in range(H):
            dc[j] = dc[j] * f[j] + da_i[j] * peephole[j] + da_f[j] * peephole[H + j]
        for j in range(H):
            dpeephole[j] += da_i[j] * c[j]
        for j in range(H):
            dpeephole[H + j] += da_f[j] * c[j]
        for j in range(H):
            dpeephole[2 * H + j] += da_o[j] * c_new[j]
    else:
        for j in range(H):
            dc[j] = dc[j] * f[j]
    for j in range(H):
        dh[j] = 0                          # dL/dh is all dgates @ W_hh


# ---------------------------------------------------------------------------------------------
# GRU, reset after the recurrent matmul:  n = tanh(W_in x + b_in + r * (W_hn h + b_hn))

cdef inline void gru_forward_row(floating* gates, floating* saved, floating* h_new, floating* y,
                                 floating* hh, const floating* b_ih, const floating* b_hh,
                                 const floating* h, Py_ssize_t n, Py_ssize_t H) noexcept nogil:
    # saved (H): hn = W_hn h + b_hn for backward (NULL when nothing is kept)
    cdef Py_ssize_t j
    cdef floating* r = gates
    cdef floating* z = gates + H
    cdef floating* nn = gates + 2 * H
    cdef floating* hn = hh + 2 * H
    _preactivation(gates, hh, b_ih, b_hh, 2, n, H)
    sigmoid_inplace(r, n)
    sigmoid_inplace(z, n)
    for j in range(n):
        hn[j] = hn[j] + b_hh[2 * H + j]   # W_hn h + b_hn, in place in the scratch
    for j in range(n):
        nn[j] = nn[j] + b_ih[2 * H + j] + r[j] * hn[j]
    tanh_inplace(nn, n)
    # h' = (1 - z) * n + z * h
    for j in range(n):
        y[j] = (<floating>1 - z[j]) * nn[j] + z[j] * h[j]
    for j in range(n):
        h_new[j] = y[j]
    if saved != NULL:
        for j in range(n):
            saved[j] = hn[j]


cdef inline void _gru_zn_backward_row(floating* dgates, floating* dh,
                                      const floating* gates, const floating* h,
                                      Py_ssize_t H) noexcept nogil:
    # the z and n blocks of dgates, for both GRU forms (the inside of n differs, not the
    # derivative of its tanh); then dh *= z, the part of dL/dh that skips the recurrent GEMM
    cdef Py_ssize_t j
    cdef const floating* z = gates + H
    cdef const floating* n = gates + 2 * H
    # h' = (1 - z) * n + z * h
    for j in range(H):
        dgates[H + j] = dh[j] * (h[j] - n[j]) * z[j] * (<floating>1 - z[j])
    # n = tanh(...)
    for j in range(H):
        dgates[2 * H + j] = dh[j] * (<floating>1 - z[j]) * (<floating>1 - n[j] * n[j])
    for j in range(H):
        dh[j] = dh[j] * z[j]


cdef inline void gru_backward_row(floating* dgates, floating* dhh, floating* dgates_hh,
                                  floating* dh,
                                  const floating* gates, const floating* h, const floating* hn,
                                  Py_ssize_t H) noexcept nogil:
    # dhh (3H): dL/d(W_hh h + b_hh), the hidden side; its n block, da_n * r, differs from dgates'
    # n block and is also kept in dgates_hh (H) for dW_hn and db_hn after the loop
    cdef Py_ssize_t j
    cdef const floating* r = gates
    cdef floating* da_r = dgates
    cdef floating* da_n = dgates + 2 * H
    _gru_zn_backward_row(dgates, dh, gates, h, H)   # n = tanh(x_n + r * hn)
    for j in range(H):
        da_r[j] = da_n[j] * hn[j] * r[j] * (<floating>1 - r[j])
    # a_n = x_n + r * (W_hn h + b_hn): the hidden side of the n block
    for j in range(H):
        dhh[2 * H + j] = da_n[j] * r[j]
    for j in range(2 * H):
        dhh[j] = dgates[j]
    for j in range(H):
        dgates_hh[j] = dhh[2 * H + j]


# ---------------------------------------------------------------------------------------------
# GRU, reset before the recurrent matmul:  n = tanh(W_in x + b_in + W_hn (r * h) + b_hn)
# Two phases: after product 0 (blocks r, z of h W_hh^T) r, z and r*h; after product 1
# ((r*h) W_hn^T into the n block) n and h'.

cdef inline void gru_reset_before_forward_row(int phase, floating* gates, floating* saved,
                                              floating* h_new, floating* y,
                                              const floating* hh, const floating* b_ih,
                                              const floating* b_hh, const floating* h,
                                              Py_ssize_t n, Py_ssize_t H) noexcept nogil:
    # saved (H): rh = r * h, the source of product 1 (kept for backward's dW_hn)
    cdef Py_ssize_t j
    cdef floating* z = gates + H
    cdef floating* nn = gates + 2 * H
    if phase == 0:
        _preactivation(gates, hh, b_ih, b_hh, 2, n, H)
        sigmoid_inplace(gates, n)          # r
        sigmoid_inplace(z, n)
        for j in range(n):
            saved[j] = gates[j] * h[j]
        return
    for j in range(n):
        nn[j] = nn[j] + b_ih[2 * H + j] + hh[2 * H + j] + b_hh[2 * H + j]
    tanh_inplace(nn, n)
    # h' = (1 - z) * n + z * h
    for j in range(n):
        y[j] = (<floating>1 - z[j]) * nn[j] + z[j] * h[j]
    for j in range(n):
        h_new[j] = y[j]


cdef inline void gru_reset_before_backward_row(int phase, floating* dgates, floating* dh,
                                               const floating* dsaved, const floating* gates,
                                               const floating* h, Py_ssize_t H) noexcept nogil:
    # phase 1: the z and n blocks of dgates (the loop then makes dsaved = da_n @ W_hn);
    # phase 0, dsaved (H) = dL/d(r*h): the r block (the loop then adds da_rz @ W_hr,hz to dh)
    cdef Py_ssize_t j
    cdef const floating* r = gates
    if phase == 1:
        _gru_zn_backward_row(dgates, dh, gates, h, H)   # n = tanh(x_n + W_hn rh + b_hn)
        return
    # rh = r * h
    for j in range(H):
        dgates[j] = dsaved[j] * h[j] * r[j] * (<floating>1 - r[j])
    for j in range(H):
        dh[j] = dh[j] + dsaved[j] * r[j]


# ---------------------------------------------------------------------------------------------
# Cells with options (ONNX's activations, clip, input_forget), one step pair per mode.
# ``options`` is cells.Cell.option_values() (float64): clip (inf: none), input_forget, then
# (kind, alpha, beta) per activation slot, kind the index in cells.ACTIVATIONS. These step pairs
# keep each gate's pre-activation (unclipped) in gates, not the activated gate: the backward
# takes the activations and their slopes from it. The kinds are switched on per element: these
# cells are for the models that need them, not tuned.

cdef struct Activation:
    int kind
    double alpha, beta, clip


cdef inline Activation option_slot(const double* options, int slot) noexcept nogil:
    cdef Activation act
    act.kind = <int>options[2 + 3 * slot]
    act.alpha, act.beta, act.clip = options[3 + 3 * slot], options[4 + 3 * slot], options[0]
    return act


cdef inline floating activate(Activation act, floating a) noexcept nogil:
    # ONNX's activation act.kind of a; NaN stays NaN
    cdef floating alpha = <floating>act.alpha, beta = <floating>act.beta, u
    if act.kind == 1:
        return tanh_(a)
    if act.kind == 2:
        return sigmoid(a)
    if act.kind == 0:
        return 0 if a < 0 else a                                   # relu
    if act.kind == 3:
        return alpha * a + beta                                    # affine
    if act.kind == 4:
        return alpha * a if a < 0 else a                           # leakyrelu
    if act.kind == 5:
        return a if a > alpha or a != a else 0                     # thresholdedrelu
    if act.kind == 6:
        return alpha * tanh_(beta * a)                             # scaledtanh
    if act.kind == 7:
        u = alpha * a + beta                                       # hardsigmoid
        u = 0 if u < 0 else u
        return 1 if u > 1 else u
    if act.kind == 8:
        return <floating>(alpha * expm1(a)) if a < 0 else a        # elu
    if act.kind == 9:
        return a / (<floating>1 + fabs(a))                                   # softsign
    # softplus, log(1 + e^a) without overflow
    return <floating>((a if a > 0 else 0) + log1p(exp(-fabs(a))))


cdef inline floating activation_slope(Activation act, floating a) noexcept nogil:
    # d activate(act, a) / da; NaN where a is NaN
    cdef floating alpha = <floating>act.alpha, beta = <floating>act.beta, t, u
    if a != a:
        return a
    if act.kind == 1:
        t = tanh_(a)
        return <floating>1 - t * t
    if act.kind == 2:
        t = sigmoid(a)
        return t * (<floating>1 - t)
    if act.kind == 0:
        return 1 if a > 0 else 0
    if act.kind == 3:
        return alpha
    if act.kind == 4:
        return alpha if a < 0 else 1
    if act.kind == 5:
        return 1 if a > alpha else 0
    if act.kind == 6:
        t = tanh_(beta * a)
        return alpha * beta * (<floating>1 - t * t)
    if act.kind == 7:
        u = alpha * a + beta
        return alpha if u > 0 and u < 1 else 0
    if act.kind == 8:
        return <floating>(alpha * exp(a)) if a < 0 else 1
    if act.kind == 9:
        t = <floating>1 + fabs(a)
        return <floating>1 / (t * t)
    return sigmoid(a)


cdef inline void gate_block(Activation act, const floating* a, floating* out,
                            Py_ssize_t n) noexcept nogil:
    # out = act(clip(a)) over a block of n units; the kind is switched on once, so that the
    # usual ones (sigmoid, tanh) vectorise; NaN stays NaN
    cdef Py_ssize_t k
    cdef floating clip = <floating>act.clip, v
    if act.kind == 2:
        for k in range(n):
            v = a[k]
            out[k] = sigmoid(clip if v > clip else (-clip if v < -clip else v))
    elif act.kind == 1:
        for k in range(n):
            v = a[k]
            out[k] = tanh_(clip if v > clip else (-clip if v < -clip else v))
    else:
        for k in range(n):
            v = a[k]
            out[k] = activate(act, clip if v > clip else (-clip if v < -clip else v))


cdef inline void slope_block(Activation act, const floating* a, floating* d,
                             Py_ssize_t n) noexcept nogil:
    # d *= d act(clip(a)) / da over a block of n units: zero where the clip cut a (a NaN in d
    # stays NaN), NaN where a is NaN
    cdef Py_ssize_t k
    cdef floating clip = <floating>act.clip, s
    if act.kind == 2:
        for k in range(n):
            s = sigmoid(a[k])
            d[k] = d[k] * (0 if a[k] < -clip or a[k] > clip else s * (<floating>1 - s))
    elif act.kind == 1:
        for k in range(n):
            s = tanh_(a[k])
            d[k] = d[k] * (0 if a[k] < -clip or a[k] > clip else <floating>1 - s * s)
    else:
        for k in range(n):
            d[k] = d[k] * (0 if a[k] < -clip or a[k] > clip else activation_slope(act, a[k]))


# RNN with options: h' = f(clip(W_ih x + b_ih + W_hh h + b_hh))

cdef inline void rnn_options_forward_row(floating* gates, floating* h_new, floating* y,
                                         const floating* hh, const floating* b_ih,
                                         const floating* b_hh, const double* options,
                                         Py_ssize_t n, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    _preactivation(gates, hh, b_ih, b_hh, 1, n, H)        # gates keeps the pre-activation
    gate_block(option_slot(options, 0), gates, h_new, n)
    for j in range(n):
        y[j] = h_new[j]


cdef inline void rnn_options_backward_row(floating* dgates, floating* dh, const floating* gates,
                                          const double* options, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(H):
        dgates[j] = dh[j]
    slope_block(option_slot(options, 0), gates, dgates, H)
    for j in range(H):
        dh[j] = 0          # dL/dh is all dgates @ W_hh: the loop's product after this pass


# LSTM with options (peephole NULL: none):
#     i = f(clip(a_i [+ p_i c]));  f = 1 - i with input_forget, else f(clip(a_f [+ p_f c]))
#     g = g(clip(a_g));  c' = f c + i g;  o = f(clip(a_o [+ p_o c']));  h' = o h(c')
# The forward keeps the activated gates in hh's row (the products are added in by then).

cdef inline void lstm_options_forward_row(floating* gates, floating* h_new, floating* c_new,
                                          floating* y, floating* hh, const floating* b_ih,
                                          const floating* b_hh, const floating* c,
                                          const floating* peephole, const double* options,
                                          Py_ssize_t n, Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef Activation act_f = option_slot(options, 0), act_g = option_slot(options, 1)
    cdef Activation act_h = option_slot(options, 2)
    cdef floating* i = hh
    cdef floating* f = hh + H
    cdef floating* g = hh + 2 * H
    cdef floating* o = hh + 3 * H
    act_h.clip = INFINITY                                  # the cell output is not clipped
    _preactivation(gates, hh, b_ih, b_hh, 4, n, H)
    if peephole != NULL:
        for j in range(n):
            gates[j] = gates[j] + peephole[j] * c[j]
        for j in range(n):
            gates[H + j] = gates[H + j] + peephole[H + j] * c[j]
    gate_block(act_f, gates, i, n)
    if options[1] != 0:                                    # input_forget: f = 1 - i
        for j in range(n):
            f[j] = <floating>1 - i[j]
    else:
        gate_block(act_f, gates + H, f, n)
    gate_block(act_g, gates + 2 * H, g, n)
    for j in range(n):
        c_new[j] = f[j] * c[j] + i[j] * g[j]
    if peephole != NULL:
        for j in range(n):
            gates[3 * H + j] = gates[3 * H + j] + peephole[2 * H + j] * c_new[j]
    gate_block(act_f, gates + 3 * H, o, n)
    # h' = o * h(c'), h(c') passing through y
    gate_block(act_h, c_new, y, n)
    for j in range(n):
        y[j] = o[j] * y[j]
    for j in range(n):
        h_new[j] = y[j]


cdef inline void lstm_options_backward_row(floating* dgates, floating* dh, floating* dc,
                                           floating* dpeep, const floating* gates,
                                           const floating* c, const floating* c_new,
                                           const floating* peephole, const double* options,
                                           Py_ssize_t H) noexcept nogil:
    # the blocks of dgates hold the gates and h(c') on the way to the gradients
    cdef Py_ssize_t j
    cdef Activation act_f = option_slot(options, 0), act_g = option_slot(options, 1)
    cdef Activation act_h = option_slot(options, 2)
    cdef bint input_forget = options[1] != 0
    cdef floating* da_i = dgates
    cdef floating* da_f = dgates + H
    cdef floating* da_g = dgates + 2 * H
    cdef floating* da_o = dgates + 3 * H
    cdef floating i, f, g, dc_new
    act_h.clip = INFINITY
    gate_block(act_f, gates + 3 * H, da_o, H)                              # o
    gate_block(act_h, c_new, da_i, H)                                      # h(c')
    for j in range(H):
        da_f[j] = dh[j] * da_o[j]
    slope_block(act_h, c_new, da_f, H)
    # h' = o * h(c')
    for j in range(H):
        dc[j] = dc[j] + da_f[j]                                            # dc'
    for j in range(H):
        da_o[j] = dh[j] * da_i[j]                                          # do
    slope_block(act_f, gates + 3 * H, da_o, H)                             # da_o
    if peephole != NULL:
        # a_o = ... + p_o * c'
        for j in range(H):
            dc[j] = dc[j] + da_o[j] * peephole[2 * H + j]
        for j in range(H):
            dpeep[2 * H + j] = dpeep[2 * H + j] + da_o[j] * c_new[j]
    gate_block(act_f, gates, da_i, H)                                      # i
    if not input_forget:
        gate_block(act_f, gates + H, da_f, H)                              # f
    gate_block(act_g, gates + 2 * H, da_g, H)                              # g
    for j in range(H):
        # c' = f * c + i * g
        dc_new = dc[j]
        i, g = da_i[j], da_g[j]
        f = <floating>1 - i if input_forget else da_f[j]
        da_i[j] = dc_new * g                                               # di
        da_f[j] = dc_new * c[j]                                            # df
        da_g[j] = dc_new * i                                               # dg
        dc[j] = dc_new * f                                                 # dc
    if input_forget:
        # f = 1 - i: the f block's pre-activation is not used
        for j in range(H):
            da_i[j] = da_i[j] - da_f[j]
        for j in range(H):
            da_f[j] = 0
    else:
        slope_block(act_f, gates + H, da_f, H)                             # da_f
    slope_block(act_f, gates, da_i, H)                                     # da_i
    slope_block(act_g, gates + 2 * H, da_g, H)                             # da_g
    if peephole != NULL:
        # a_i = ... + p_i * c;  a_f = ... + p_f * c
        for j in range(H):
            dc[j] = dc[j] + da_i[j] * peephole[j] + da_f[j] * peephole[H + j]
        for j in range(H):
            dpeep[j] = dpeep[j] + da_i[j] * c[j]
            dpeep[H + j] = dpeep[H + j] + da_f[j] * c[j]
    for j in range(H):
        dh[j] = 0          # dL/dh is all dgates @ W_hh: the loop's product after this pass


# GRU with options, both forms:
#     r = f(clip(.)), z = f(clip(.)), n = g(clip(x_n + r * hn)) or g(clip(x_n + W_hn (r h) + b_hn))
# saved: hn or rh, as the plain GRU's. The forward keeps r and z in hh's row once the products
# are added in (reset-before: hh's r and z blocks last until phase 1), and n in its n block.

cdef inline void gru_options_forward_row(int phase, bint reset_after, floating* gates,
                                         floating* saved, floating* h_new, floating* y,
                                         floating* hh, const floating* b_ih,
                                         const floating* b_hh, const floating* h,
                                         const double* options, Py_ssize_t n,
                                         Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j
    cdef Activation act_f = option_slot(options, 0), act_g = option_slot(options, 1)
    cdef floating* r = hh
    cdef floating* z = hh + H
    cdef floating* nn = hh + 2 * H
    cdef floating* a_n = gates + 2 * H
    if phase == 0:
        _preactivation(gates, hh, b_ih, b_hh, 2, n, H)
        gate_block(act_f, gates, r, n)
        gate_block(act_f, gates + H, z, n)
    if reset_after:
        for j in range(n):
            nn[j] = nn[j] + b_hh[2 * H + j]   # hn = W_hn h + b_hn, in place in the scratch
        if saved != NULL:
            for j in range(n):
                saved[j] = nn[j]
        for j in range(n):
            a_n[j] = a_n[j] + b_ih[2 * H + j] + r[j] * nn[j]
    elif phase == 0:
        for j in range(n):
            saved[j] = r[j] * h[j]            # rh, the source of product 1
        return
    else:
        for j in range(n):
            a_n[j] = a_n[j] + b_ih[2 * H + j] + nn[j] + b_hh[2 * H + j]
    gate_block(act_g, a_n, nn, n)             # n
    # h' = (1 - z) * n + z * h
    for j in range(n):
        y[j] = (<floating>1 - z[j]) * nn[j] + z[j] * h[j]
    for j in range(n):
        h_new[j] = y[j]


cdef inline void gru_options_backward_row(int phase, bint reset_after, floating* dgates,
                                          floating* dhh, floating* dgates_hh, floating* dh,
                                          const floating* dsaved, const floating* gates,
                                          const floating* h, const floating* saved,
                                          const double* options, Py_ssize_t H) noexcept nogil:
    # reset_after: saved = hn, dhh and dgates_hh as gru_backward_row's; reset-before: phase 1
    # the z and n blocks, phase 0 (dsaved = dL/d(r*h)) the r block
    cdef Py_ssize_t j
    cdef Activation act_f = option_slot(options, 0), act_g = option_slot(options, 1)
    cdef floating* da_r = dgates
    cdef floating* da_z = dgates + H
    cdef floating* da_n = dgates + 2 * H
    cdef floating z
    if reset_after or phase == 1:
        gate_block(act_f, gates + H, da_z, H)                            # z
        gate_block(act_g, gates + 2 * H, da_n, H)                        # n
        for j in range(H):
            # h' = (1 - z) * n + z * h
            z = da_z[j]
            da_z[j] = dh[j] * (h[j] - da_n[j])                           # dz
            da_n[j] = dh[j] * (<floating>1 - z)                                    # dn
            dh[j] = dh[j] * z
        slope_block(act_f, gates + H, da_z, H)                           # da_z
        slope_block(act_g, gates + 2 * H, da_n, H)                       # da_n
    if reset_after:
        # a_n = x_n + r * hn, hn = W_hn h + b_hn: the hidden side of the n block is da_n * r
        gate_block(act_f, gates, dhh, H)                                 # r
        for j in range(H):
            dhh[2 * H + j] = da_n[j] * dhh[j]
        for j in range(H):
            da_r[j] = da_n[j] * saved[j]                                 # dr
        slope_block(act_f, gates, da_r, H)                               # da_r
        for j in range(2 * H):
            dhh[j] = dgates[j]
        for j in range(H):
            dgates_hh[j] = dhh[2 * H + j]
    elif phase == 0:
        gate_block(act_f, gates, da_r, H)                                # r
        for j in range(H):
            # rh = r * h
            dh[j] = dh[j] + dsaved[j] * da_r[j]
        for j in range(H):
            da_r[j] = dsaved[j] * h[j]                                   # dr
        slope_block(act_f, gates, da_r, H)                               # da_r


# ---------------------------------------------------------------------------------------------
# Layer-normalized cells (cells.LAYER_NORM_CODES), whole rows only (the batch-row loop): see
# the Numba backend's kernels.py, whose step pairs these are. ``norm``: the gains and shifts as
# rows of G*H (ln_ih weight, bias, ln_hh weight, bias; the LSTM's ln_cell weight, bias in the
# first H entries of rows 4 and 5); ``kept``: the row's saved buffer from its ax column on
# (after the plain cell's own), where training keeps the raw products, NULL in inference;
# ``sums`` (rows * G*H): this row's running sums of the gradients of norm's rows.

cdef extern from "norm.h" nogil:
    # the sums, vectorised (see the header)
    void fr_norm_stats_f32(const float* v, Py_ssize_t n, double eps, float* mean, float* rstd)
    void fr_norm_stats_f64(const double* v, Py_ssize_t n, double eps, double* mean,
                           double* rstd)
    void fr_norm_grad_sums_f32(const float* d, const float* raw, const float* gain, float mean,
                               float rstd, Py_ssize_t n, float* dgain, float* dshift,
                               float* s1, float* s2)
    void fr_norm_grad_sums_f64(const double* d, const double* raw, const double* gain,
                               double mean, double rstd, Py_ssize_t n, double* dgain,
                               double* dshift, double* s1, double* s2)
    void fr_pair_sums_f32(const float* x, const float* y, Py_ssize_t n, float* sx, float* sxy)
    void fr_pair_sums_f64(const double* x, const double* y, Py_ssize_t n, double* sx,
                          double* sxy)


cdef inline void _norm_stats(const floating* v, Py_ssize_t n, double eps, floating* mean,
                             floating* rstd) noexcept nogil:
    # mean and 1 / sqrt(var + eps) of v[0..n), the biased variance, two passes
    if floating is float:
        fr_norm_stats_f32(v, n, eps, mean, rstd)
    else:
        fr_norm_stats_f64(v, n, eps, mean, rstd)


cdef inline void _norm_backward(const floating* d, const floating* raw, const floating* gain,
                                double eps, floating* out, floating* dgain, floating* dshift,
                                Py_ssize_t n) noexcept nogil:
    # backward of LN(raw) * gain + shift for d, its gradient: out = dL/draw (out may be d),
    # dgain += d * LN(raw), dshift += d
    cdef Py_ssize_t k
    cdef floating mean, rstd, v_hat, s1, s2
    _norm_stats(raw, n, eps, &mean, &rstd)
    if floating is float:
        fr_norm_grad_sums_f32(d, raw, gain, mean, rstd, n, dgain, dshift, &s1, &s2)
    else:
        fr_norm_grad_sums_f64(d, raw, gain, mean, rstd, n, dgain, dshift, &s1, &s2)
    s1 = s1 / n
    s2 = s2 / n
    for k in range(n):
        v_hat = (raw[k] - mean) * rstd
        out[k] = rstd * (d[k] * gain[k] - s1 - v_hat * s2)


cdef inline void _norm_add(floating* out, const floating* v, const floating* gain,
                           const floating* shift, const floating* bias, double eps,
                           Py_ssize_t n) noexcept nogil:
    # out = LN(v) * gain + shift + bias (out may be v)
    cdef Py_ssize_t k
    cdef floating mean, rstd
    _norm_stats(v, n, eps, &mean, &rstd)
    for k in range(n):
        out[k] = ((v[k] - mean) * rstd * gain[k] + shift[k]) + bias[k]


# LSTM:  a = LN(ax) + LN(ah) + b_ih + b_hh;  c' = f c + i g;  h' = o tanh(LN(c'))

cdef inline void lstm_norm_forward_row(floating* gates, floating* h_new, floating* c_new,
                                       floating* y, floating* kept, const floating* hh,
                                       const floating* b_ih, const floating* b_hh,
                                       const floating* c, const floating* norm, double eps,
                                       Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j, GH = 4 * H
    cdef floating mean_x, rstd_x, mean_h, rstd_h, mean_c, rstd_c
    cdef floating* i = gates
    cdef floating* f = gates + H
    cdef floating* g = gates + 2 * H
    cdef floating* o = gates + 3 * H
    if kept != NULL:                    # training: the raw products for backward
        memcpy(kept, gates, GH * sizeof(floating))
        memcpy(kept + GH, hh, GH * sizeof(floating))
    _norm_stats(gates, GH, eps, &mean_x, &rstd_x)
    _norm_stats(hh, GH, eps, &mean_h, &rstd_h)
    for j in range(GH):
        gates[j] = (((gates[j] - mean_x) * rstd_x * norm[j] + norm[GH + j])
                    + ((hh[j] - mean_h) * rstd_h * norm[2 * GH + j] + norm[3 * GH + j])
                    + b_ih[j]) + b_hh[j]
    sigmoid_inplace(i, H)
    sigmoid_inplace(f, H)
    tanh_inplace(g, H)
    sigmoid_inplace(o, H)
    for j in range(H):
        c_new[j] = f[j] * c[j] + i[j] * g[j]
    _norm_stats(c_new, H, eps, &mean_c, &rstd_c)
    for j in range(H):
        y[j] = (c_new[j] - mean_c) * rstd_c * norm[4 * GH + j] + norm[5 * GH + j]
    tanh_inplace(y, H)
    for j in range(H):
        y[j] = o[j] * y[j]
    for j in range(H):
        h_new[j] = y[j]


cdef inline void lstm_norm_backward_row(floating* dgates, floating* dgates_hh, floating* dhh,
                                        floating* dh, floating* dc, floating* sums,
                                        const floating* gates, const floating* c,
                                        const floating* c_new, const floating* kept,
                                        const floating* norm, double eps,
                                        Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j, GH = 4 * H
    cdef floating mean_c, rstd_c, t, d_ln, s1, s2
    cdef const floating* f = gates + H
    cdef const floating* o = gates + 3 * H
    cdef floating* da_i = dgates
    cdef floating* da_f = dgates + H
    cdef floating* da_o = dgates + 3 * H
    # h' = o * tanh(LN(c')); da_i holds LN(c') without gain and da_f the gradient of the
    # normalized c' times the gain, until the i, f, g gradients overwrite them; da_o holds
    # tanh(LN(c')) until it is overwritten
    _norm_stats(c_new, H, eps, &mean_c, &rstd_c)
    for j in range(H):
        da_i[j] = (c_new[j] - mean_c) * rstd_c
        da_o[j] = da_i[j] * norm[4 * GH + j] + norm[5 * GH + j]
    tanh_inplace(da_o, H)       # apart: in the loop below it kept the loop scalar
    for j in range(H):
        t = da_o[j]
        da_o[j] = dh[j] * t * o[j] * (<floating>1 - o[j])
        d_ln = dh[j] * o[j] * (<floating>1 - t * t)
        sums[4 * GH + j] = sums[4 * GH + j] + d_ln * da_i[j]
        sums[5 * GH + j] = sums[5 * GH + j] + d_ln
        da_f[j] = d_ln * norm[4 * GH + j]
    if floating is float:
        fr_pair_sums_f32(da_f, da_i, H, &s1, &s2)
    else:
        fr_pair_sums_f64(da_f, da_i, H, &s1, &s2)
    s1 = s1 / H
    s2 = s2 / H
    for j in range(H):
        dc[j] = dc[j] + rstd_c * (da_f[j] - s1 - da_i[j] * s2)
    # c' = f * c + i * g
    _lstm_igf_backward(dgates, dc, gates, c, H)
    for j in range(H):
        dc[j] = dc[j] * f[j]
    # a = LN(ax) + LN(ah) + b_ih + b_hh: dgates is the gradient of both normalizations
    _norm_backward(dgates, kept + GH, norm + 2 * GH, eps, dgates_hh, sums + 2 * GH,
                   sums + 3 * GH, GH)
    _norm_backward(dgates, kept, norm, eps, dgates, sums, sums + GH, GH)
    memcpy(dhh, dgates_hh, GH * sizeof(floating))
    for j in range(H):
        dh[j] = 0                          # dL/dh is all dhh @ W_hh


# GRU:  nx = LN(ax) + b_ih;  reset after: nh = LN(ah) + b_hh, n = tanh(nx_n + r * nh_n);
# reset before (phase 0: r, z, rh; phase 1: n, h'): nh_rz = LN(ah_rz) + b_hrz,
# n = tanh(nx_n + LN(ah_n) + b_hn). saved: hn (reset after) or rh (reset before), then kept:
# ax (3H), ah (3H).

cdef inline void gru_norm_forward_row(int phase, bint reset_after, floating* gates,
                                      floating* saved, floating* kept, floating* h_new,
                                      floating* y, floating* hh, const floating* b_ih,
                                      const floating* b_hh, const floating* h,
                                      const floating* norm, double eps,
                                      Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j, GH = 3 * H, width = 3 * H if reset_after else 2 * H
    cdef floating mean_n, rstd_n
    cdef floating* z = gates + H
    cdef floating* nn = gates + 2 * H
    if phase == 1:
        # reset before: n = tanh(nx_n + LN(ah_n) + b_hn), then h'
        if kept != NULL:
            memcpy(kept + 5 * H, hh + 2 * H, H * sizeof(floating))
        _norm_stats(hh + 2 * H, H, eps, &mean_n, &rstd_n)
        for j in range(H):
            nn[j] = (nn[j] + ((hh[2 * H + j] - mean_n) * rstd_n * norm[2 * GH + 2 * H + j]
                              + norm[3 * GH + 2 * H + j])) + b_hh[2 * H + j]
        tanh_inplace(nn, H)
    else:
        if kept != NULL:
            memcpy(kept, gates, GH * sizeof(floating))
            memcpy(kept + GH, hh, width * sizeof(floating))
        _norm_add(gates, gates, norm, norm + GH, b_ih, eps, GH)                  # nx
        _norm_add(hh, hh, norm + 2 * GH, norm + 3 * GH, b_hh, eps, width)       # nh
        for j in range(2 * H):
            gates[j] = gates[j] + hh[j]
        sigmoid_inplace(gates, 2 * H)                                            # r, z
        if not reset_after:
            for j in range(H):
                saved[j] = gates[j] * h[j]     # product 1: hh's n block = rh W_hn^T
            return
        for j in range(H):
            nn[j] = nn[j] + gates[j] * hh[2 * H + j]
        tanh_inplace(nn, H)
        if kept != NULL:
            memcpy(saved, hh + 2 * H, H * sizeof(floating))                    # hn
    # h' = (1 - z) * n + z * h
    for j in range(H):
        y[j] = (<floating>1 - z[j]) * nn[j] + z[j] * h[j]
    for j in range(H):
        h_new[j] = y[j]


cdef inline void gru_norm_backward_row(int phase, bint reset_after, floating* dgates,
                                       floating* dgates_hh, floating* dhh, floating* dh,
                                       const floating* dsaved, floating* sums,
                                       const floating* gates, const floating* h,
                                       const floating* saved, const floating* kept,
                                       const floating* norm, double eps,
                                       Py_ssize_t H) noexcept nogil:
    cdef Py_ssize_t j, GH = 3 * H, width = 3 * H if reset_after else 2 * H
    cdef const floating* r = gates
    if reset_after or phase == 1:
        _gru_zn_backward_row(dgates, dh, gates, h, H)      # da_z, da_n; dh *= z
    if reset_after:
        for j in range(H):
            dgates_hh[2 * H + j] = dgates[2 * H + j] * r[j]
        for j in range(H):
            dgates[j] = dgates[2 * H + j] * saved[j] * r[j] * (<floating>1 - r[j])    # da_r (saved: hn)
        memcpy(dgates_hh, dgates, 2 * H * sizeof(floating))
        _norm_backward(dgates_hh, kept + GH, norm + 2 * GH, eps, dgates_hh, sums + 2 * GH,
                       sums + 3 * GH, GH)
    elif phase == 1:
        # n = tanh(nx_n + LN(ah_n) + b_hn): the loop then makes dsaved = dhh_n @ W_hn
        _norm_backward(dgates + 2 * H, kept + 5 * H, norm + 2 * GH + 2 * H, eps,
                       dgates_hh + 2 * H, sums + 2 * GH + 2 * H, sums + 3 * GH + 2 * H, H)
        memcpy(dhh + 2 * H, dgates_hh + 2 * H, H * sizeof(floating))
        return
    else:
        # rh = r * h
        for j in range(H):
            dgates[j] = dsaved[j] * h[j] * r[j] * (<floating>1 - r[j])
        for j in range(H):
            dh[j] = dh[j] + dsaved[j] * r[j]
        memcpy(dgates_hh, dgates, 2 * H * sizeof(floating))
        _norm_backward(dgates_hh, kept + GH, norm + 2 * GH, eps, dgates_hh, sums + 2 * GH,
                       sums + 3 * GH, 2 * H)
    memcpy(dhh, dgates_hh, width * sizeof(floating))
    # nx = LN(ax) + b_ih: dgates is its gradient
    _norm_backward(dgates, kept, norm, eps, dgates, sums, sums + GH, GH)
