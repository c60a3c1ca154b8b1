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

from activations cimport relu, relu_backward, sigmoid_inplace, tanh_inplace, tanh_into

# cells.Cell.code, read only by the two switches (layers.pyx forward_row / backward_row)
cdef enum:
    RNN_TANH = 0
    RNN_RELU = 1
    LSTM = 2
    LSTM_PEEPHOLE = 3
    GRU = 4
    GRU_RESET_BEFORE = 5
    NUM_CODES = 6               # one past the last: a new cell's code goes before it


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
            dgates[j] = dh[j] * (1 - gates[j] * gates[j])
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


cdef inline void lstm_backward_row(floating* dgates, floating* dh, floating* dc,
                                   floating* dpeephole,
                                   const floating* gates, const floating* c,
                                   const floating* c_new, const floating* peephole,
                                   Py_ssize_t H) noexcept nogil:
    # dpeephole (3H): this row's running sums of da_i*c, da_f*c, da_o*c' (NULL without peepholes)
    cdef Py_ssize_t j
    cdef const floating* i = gates
    cdef const floating* f = gates + H
    cdef const floating* g = gates + 2 * H
    cdef const floating* o = gates + 3 * H
    cdef floating* da_i = dgates
    cdef floating* da_f = dgates + H
    cdef floating* da_g = dgates + 2 * H
    cdef floating* da_o = dgates + 3 * H
    # h' = o * tanh(c'); tanh(c') passes through da_o
    tanh_into(da_o, c_new, H)
    for j in range(H):
        dc[j] = dc[j] + dh[j] * o[j] * (1 - da_o[j] * da_o[j])
    for j in range(H):
        da_o[j] = dh[j] * da_o[j] * o[j] * (1 - o[j])
    if peephole != NULL:
        # a_o = ... + p_o * c'
        for j in range(H):
            dc[j] = dc[j] + da_o[j] * peephole[2 * H + j]
    # c' = f * c + i * g
    for j in range(H):
        da_i[j] = dc[j] * g[j] * i[j] * (1 - i[j])
    for j in range(H):
        da_f[j] = dc[j] * c[j] * f[j] * (1 - f[j])
    for j in range(H):
        da_g[j] = dc[j] * i[j] * (1 - g[j] * g[j])
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
        y[j] = (1 - z[j]) * nn[j] + z[j] * h[j]
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
        dgates[H + j] = dh[j] * (h[j] - n[j]) * z[j] * (1 - z[j])
    # n = tanh(...)
    for j in range(H):
        dgates[2 * H + j] = dh[j] * (1 - z[j]) * (1 - n[j] * n[j])
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
        da_r[j] = da_n[j] * hn[j] * r[j] * (1 - r[j])
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
        y[j] = (1 - z[j]) * nn[j] + z[j] * h[j]
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
        dgates[j] = dsaved[j] * h[j] * r[j] * (1 - r[j])
    for j in range(H):
        dh[j] = dh[j] + dsaved[j] * r[j]
