"""A projected LSTM (PyTorch's ``proj_size``) on a backend's unprojected layer kernels.

The cell is ``m = o * tanh(c')``, ``h' = w_hr m``: h is P wide, c and the gates H. h enters the
next step only through ``w_hh h = (w_hh w_hr) m``, so a projected layer is the unprojected one
run on m, H wide, with the recurrent weight ``w_eff = w_hh w_hr`` (G*H, H), and its output is
``y = m w_hr^T``, one product after the loop. The kernels run this with the unprojected cell's
record, unchanged: each step multiplies by a (G*H, H) matrix rather than (G*H, P), the cost of an
LSTM without projection (docs/kernels.md, "Projection"). The reference runs the cell as written.

The first step reads ``w_hh h0``, which this module gives the kernels in one of two forms:

- "input": as P more input columns, ``x_aug = [x, e]``, e is h0 at each row's first step
  (t = 0 forward, lengths[b] - 1 reverse) and zero elsewhere, ``w_ih_aug = [w_ih, w_hh]``; the
  kernels start from m0 = 0. Exact whatever w_hr is; the plain cell's form.
- "state": as the kernels' initial state, an m0 with ``w_hr m0 = h0`` (the least-norm one,
  from w_hr's Gram matrix, checked). A layer-normalized cell normalizes its input and recurrent
  products apart, and zoneout mixes h with the state before the step, so these need the first
  recurrent product to come from the state. When h0 is not ``w_hr m0`` for any m0 within
  rounding (w_hr of low rank), the call runs on the reference.

Backward: dh0 is w_hh^T times the gradient of the first recurrent product ("input": dx_aug's
last P columns at the first steps; "state": the kernels' hidden-side gate gradients there);
dw_hh = dw_eff w_hr^T (plus, "input", dw_ih_aug's last P columns); dw_hr = w_hh^T dw_eff plus the
outputs' and the final state's share, less what dw_eff took at the steps whose h_prev is not
w_hr times a state of this call's graph: "state", each row's first step (m0 is not a function
of w_hr); with truncation, each window's first step (the window starts from h_prev as a
constant). Rows of length 0 have no first step: their final h is h0 and its gradient goes to
dh0. With truncation, dh0 is cut where the kernels cut dc0: at the boundaries between h0 and a
row's first step (the reverse direction's padding).

Zoneout with per-unit keep masks on h (training, z_h > 0) mixes h, P wide, which neither form
has (``zones_h``): the compiled backends run such calls on a loop of their own that carries h
beside m and projects each step (``forward_projected`` in both), this module's ``forward`` on
the reference. Zoneout's expectation (inference) is linear, so with ``h_prev = w_hr m_prev``
the kernels' mix of m at rate z_h gives ``w_hr`` times the mixed h ("state" form); zoneout of
c, H wide, is the kernels' own.

``forward`` and ``backward`` have the contract of ``fastrnn.cells`` (``layer_forward`` /
``layer_backward``), with the backend's own two functions as their first argument.
"""
import contextlib
import os
import threading

import numpy as np
from scipy import linalg
from scipy.linalg import blas as _blas

from . import reference
from .cells import unprojected
from .dispatch import _openblas_threads_functions

__all__ = ["forward", "backward", "zones_h"]


class Cache:
    """What ``forward`` keeps for ``backward``; m0 is the "state" form's initial state (None:
    the "input" form)."""

    def __init__(self, kernel_cache, m, m_n, params, first, lengths, reverse, input_size, m0):
        self.kernel_cache, self.m, self.m_n, self.params = kernel_cache, m, m_n, params
        self.first, self.lengths, self.reverse = first, lengths, reverse
        self.input_size, self.m0 = input_size, m0


def _fortran(a):
    """(f, trans): a Fortran-ordered array f with op(f) = a (trans: transposed), a copy only
    where a is neither C- nor Fortran-ordered."""
    if a.flags.f_contiguous:
        return a, 0
    if a.flags.c_contiguous:
        return a.T, 1
    return np.asfortranarray(a), 0


_blas_threads = None         # (set, get) of SciPy's OpenBLAS thread count, found on first use
_blas_lock = threading.Lock()
# A thread that held the lock at a fork does not exist in the child: give the child a free one.
os.register_at_fork(after_in_child=lambda: globals().__setitem__("_blas_lock", threading.Lock()))


@contextlib.contextmanager
def _one_blas_thread():
    """SciPy's BLAS on one thread for the products here. Run on two, OpenBLAS's second thread
    spins after each product for a while, on the core that the kernels' own thread pool needs
    next (their packed loops make no BLAS call): numba, LSTM training T=150 B=32 H=256 P=128,
    Intel Xeon, 2 cores: 280-370 ms a call with the products on two BLAS threads, 165 on one
    (the unprojected layer: 113)."""
    global _blas_threads
    if _blas_threads is None:
        _blas_threads = _openblas_threads_functions("scipy")
    setter, getter = _blas_threads
    if setter is None:
        yield
        return
    with _blas_lock:
        threads = getter()
        setter(1)
        try:
            yield
        finally:
            setter(threads)


def _product(a, b, out=None):
    """a @ b for 2-D arrays (ADDED into out, C-ordered, when given) on SciPy's BLAS, the one
    the kernels call, not NumPy's (another OpenBLAS, with threads of its own)."""
    if 0 in a.shape or 0 in b.shape or (out is not None and not out.flags.c_contiguous):
        result = np.asarray(a @ b, a.dtype)
        if out is None:
            return result
        out += result
        return out
    gemm = _blas.dgemm if a.dtype == np.float64 else _blas.sgemm
    # (a b)^T = b^T a^T: Fortran-ordered operands and result, no copies of C-ordered arrays
    bt, trans_b = _fortran(b.T)
    at, trans_a = _fortran(a.T)
    if out is None:
        return gemm(1.0, bt, at, trans_a=trans_b, trans_b=trans_a).T
    result = gemm(1.0, bt, at, beta=1.0, c=out.T, trans_a=trans_b, trans_b=trans_a,
                  overwrite_c=1)
    if not np.shares_memory(result, out):
        out[...] = result.T
    return out


def _first_steps(T, lengths, reverse):
    """(rows, t): the rows that have a step and the time index of each one's first."""
    rows = np.flatnonzero(lengths > 0)
    t = lengths[rows] - 1 if reverse else np.zeros(rows.size, np.int64)
    return rows, t


def _cut(low, T, truncate):
    """Per row: whether a truncation boundary (a multiple of ``truncate``) lies in
    [low, T - 1]: the kernels carry a row's state gradient through its padding steps and cut
    it at each boundary there, so these rows' dh0 or dh_n, which this module routes around
    the kernels, are cut too."""
    if truncate is None:
        return np.zeros(low.shape, bool)
    return -(-low // truncate) * truncate <= T - 1


# the largest |w_hr m0 - h0| a "state" form's m0 may leave, relative to the largest |h0|
STATE_RESIDUAL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-10}


def initial_m(h0, w_hr):
    """The least-norm m0 with ``w_hr m0 = h0`` for each row (B, H), in h0's dtype, or None
    when none leaves at most ``STATE_RESIDUAL`` (h0 outside the range of a w_hr of low rank,
    h0 not finite). From w_hr's Gram matrix (P^2 H multiply-adds), or where that is singular
    or leaves too much, from its SVD (lstsq)."""
    dtype = h0.dtype
    if not h0.any():
        return np.zeros((h0.shape[0], w_hr.shape[1]), dtype)
    w, h = w_hr.astype(np.float64), h0.astype(np.float64)
    limit = STATE_RESIDUAL[dtype] * np.abs(h).max()
    if not np.isfinite(limit):
        return None
    # SciPy's LAPACK and BLAS on one thread: NumPy's would leave two threads spinning on the
    # cores the kernels run on next (see _one_blas_thread; a training call 2.1x, not 1.3x)
    solvers = (lambda: _product(linalg.solve(_product(w, w.T), h.T, assume_a="pos").T, w),
               lambda: linalg.lstsq(w, h.T)[0].T)
    with np.errstate(all="ignore"), _one_blas_thread():
        for solve in solvers:
            try:
                m0 = solve().astype(dtype)
            except (linalg.LinAlgError, ValueError):
                continue
            if np.abs(_product(m0.astype(np.float64), w.T) - h).max() <= limit:
                return m0
    return None


def zones_h(zoneout, train):
    """Whether a call's zoneout mixes h per unit in a way neither form has (see the module's
    docstring): keep masks on h, or zoneout of h in training. The compiled backends run such
    calls on a loop of their own that carries h (P wide) beside the cell's m."""
    if zoneout is None:
        return False
    z_h = zoneout[0]
    if np.isscalar(z_h):
        return bool(train) and z_h != 0
    return True


def forward(layer_forward, cell, x, state0, params, lengths, reverse, train, y, state_n,
            threads=None, recurrent_mask=None, zoneout=None):
    if recurrent_mask is not None and train:
        # the masks act on h, P wide, which this form never forms before the product
        raise ValueError("recurrent_mask: a projected LSTM takes no recurrent dropout")
    on_reference = lambda: reference.layer_forward(cell, x, state0, params, lengths, reverse,
                                                   train, y, state_n, zoneout=zoneout)
    if zones_h(zoneout, train):
        # not these forms' (the compiled backends' own loop runs it)
        return on_reference()
    mixes_h = zoneout is not None and zoneout[0] != 0
    w_ih, w_hh = params[0], params[1]
    w_hr = params[-1]
    T, B, I = x.shape
    H, P = w_hr.shape[1], w_hr.shape[0]
    h0, c0 = state0
    first = _first_steps(T, lengths, reverse)
    m0 = None
    if cell.layer_norm or mixes_h:
        m0 = initial_m(h0, w_hr)
        if m0 is None:
            return on_reference()
        x_in, w_in, m_start = x, w_ih, m0
    else:
        x_in = np.zeros((T, B, I + P), x.dtype)
        x_in[:, :, :I] = x
        x_in[first[1], first[0], I:] = h0[first[0]]
        w_in = np.ascontiguousarray(np.concatenate([w_ih, w_hh], axis=1))
        m_start = np.zeros((B, H), x.dtype)
    with _one_blas_thread():
        w_eff = _product(w_hh, w_hr)
    kernel_params = (w_in, w_eff) + tuple(params[2:-1])
    m = np.empty((T, B, H), x.dtype)
    m_n = np.empty((B, H), x.dtype)
    kernel_cache = layer_forward(unprojected(cell), x_in, (m_start, c0), kernel_params, lengths,
                                 reverse, train, m, (m_n, state_n[1]), threads=threads,
                                 zoneout=zoneout)
    if m0 is not None and isinstance(kernel_cache, reference.Cache):
        # the backend ran its reference (a loop compiling): its backward would not give the
        # hidden-side gate gradients that the "state" form's backward reads
        return on_reference()
    with _one_blas_thread():
        y[...] = _product(m.reshape(T * B, H), w_hr.T).reshape(T, B, P)
        h_n = _product(m_n, w_hr.T)
    stayed = lengths == 0                      # no step: the final h is h0
    h_n[stayed] = h0[stayed]
    state_n[0][...] = h_n
    if not train:
        return None
    return Cache(kernel_cache, m, m_n, (w_hh, w_hr), first, lengths, bool(reverse), I, m0)


def backward(layer_backward, cell, cache, dy, dstate_n, truncate, dx, dstate0, dparams,
             threads=None):
    if isinstance(cache, reference.Cache):      # a call forward ran on the reference
        return reference.layer_backward(cell, cache, dy, dstate_n, truncate, dx, dstate0,
                                        dparams)
    w_hh, w_hr = cache.params
    m, m_n, I = cache.m, cache.m_n, cache.input_size
    T, B, H = m.shape
    P = w_hr.shape[0]
    dtype = m.dtype
    lengths = cache.lengths
    stepped = lengths > 0
    dh_n, dc_n = dstate_n
    dw_ih, dw_hh, dw_hr = dparams[0], dparams[1], dparams[-1]
    dm = dm_n = None
    with _one_blas_thread():
        if dy is not None:
            dy2 = np.ascontiguousarray(dy).reshape(T * B, P)
            dm = _product(dy2, w_hr).reshape(T, B, H)
            _product(dy2.T, m.reshape(T * B, H), out=dw_hr)
        if dh_n is not None:
            dm_n = _product(dh_n, w_hr)    # the kernel cuts it on the way as it must
            dm_n[~stepped] = 0             # h_n is h0 there, no function of m_n
            # h_n = w_hr m_n, made at each row's last step: forward, the padding lies between
            reaches = stepped & ~_cut(np.where(cache.reverse, T, lengths), T, truncate)
            _product(dh_n[reaches].T, m_n[reaches], out=dw_hr)
            stayed = ~stepped & ~_cut(np.ones_like(lengths), T, truncate)
            dstate0[0][stayed] += dh_n[stayed]
    state_form = cache.m0 is not None
    dx_in = dx if state_form else np.zeros((T, B, I + P), dtype)
    dw_in = dw_ih if state_form else np.zeros((w_hh.shape[0], I + P), dtype)
    dw_eff = np.zeros((w_hh.shape[0], H), dtype)
    hidden = layer_backward(unprojected(cell), cache.kernel_cache, dm, (dm_n, dc_n), truncate,
                            dx_in, (np.zeros((B, H), dtype), dstate0[1]),
                            (dw_in, dw_eff) + tuple(dparams[2:-1]), threads=threads)
    if state_form and hidden is None:           # nothing ran (T * B == 0): no gradients there
        hidden = np.zeros((T, B, w_hh.shape[0]), dtype)
    rows, t = cache.first
    # h0 enters at each row's first step: reverse, the padding lies between
    kept = ~_cut(lengths[rows] if cache.reverse else np.full(rows.size, T), T, truncate)
    with _one_blas_thread():
        if state_form:
            # w_hh^T times the first recurrent products' gradients (the hidden-side blocks
            # are every block of a layer-normalized cell): dh0, and dw_eff's share at the
            # first steps, (w_hh^T da) m0^T, whose w_hr part is not there (m0 is no w_hr m)
            first_grads = _product(np.ascontiguousarray(hidden[t, rows]), w_hh)
            dstate0[0][rows[kept]] += first_grads[kept]
            dw_hr -= _product(first_grads.T, cache.m0[rows])
            step_grads = lambda step: _product(np.ascontiguousarray(hidden[step]), w_hh)
        else:
            dx += dx_in[:, :, :I]
            dstate0[0][rows[kept]] += dx_in[t[kept], rows[kept], I:]
            dw_ih += dw_in[:, :I]
            dw_hh += dw_in[:, I:]
            step_grads = lambda step: dx_in[step, :, I:]
        _product(dw_eff, w_hr.T, out=dw_hh)
        _product(w_hh.T, dw_eff, out=dw_hr)
        if truncate is not None:
            # a window's first step: the kernels still give dw_eff its share of da m_prev^T,
            # whose w_hr part, (w_hh^T da) m_prev^T, crosses the cut (h_prev = w_hr m_prev is
            # the state the window starts from); a row's first step is left to the above (its
            # m_prev there is padding, m = 0)
            for boundary in range(truncate, T, truncate):
                step, prev = ((boundary - 1, boundary) if cache.reverse
                              else (boundary, boundary - 1))
                dw_hr -= _product(step_grads(step).T, m[prev])
