"""Row-major GEMM for compiled code, on the sgemm / dgemm that scipy.linalg.cython_blas exports.

The address comes from ``get_cython_function_address``. It is registered as a named symbol with
llvmlite and called through ``types.ExternalFunction``, not through a ctypes function object: a
ctypes pointer is baked into the machine code as a "dynamic global" and Numba then refuses to
cache the caller (``cache=True`` would silently do nothing), whereas a named symbol is resolved
again when a cached kernel is loaded.

Fortran BLAS takes every argument by reference; ``_byref`` stores a value in a stack slot of the
calling function and passes its address, so no memory is allocated per call. Row-major is handled
by swapping operands: the row-major C = op(A) @ op(B) is the column-major C^T = op(B)^T op(A)^T.
"""
import numpy as np
import llvmlite.binding as llvm
from numba import njit, types
from numba.core import cgutils
from numba.extending import get_cython_function_address, intrinsic

from . import config


def _external(name, num_args):
    symbol = f"fastrnn_cython_blas_{name}"
    llvm.add_symbol(symbol, get_cython_function_address("scipy.linalg.cython_blas", name))
    return types.ExternalFunction(symbol, types.void(*([types.voidptr] * num_args)))


# transa, transb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc
_sgemm = _external("sgemm", 13)
_dgemm = _external("dgemm", 13)
# trans, m, n, alpha, a, lda, x, incx, beta, y, incy
_sgemv = _external("sgemv", 11)
_dgemv = _external("dgemv", 11)

# the transpose flags of gemm: BLAS characters
NO_TRANS = np.int8(ord("N"))
TRANS = np.int8(ord("T"))


@intrinsic
def _byref(typingctx, value):
    """Address of a stack slot holding ``value`` (valid until the calling function returns)."""
    def codegen(context, builder, signature, args):
        slot = cgutils.alloca_once_value(builder, args[0])
        return builder.bitcast(slot, cgutils.voidptr_t)
    return types.voidptr(value), codegen


@intrinsic
def _data(typingctx, array):
    """Address of the first element of an array view."""
    def codegen(context, builder, signature, args):
        view = context.make_array(signature.args[0])(context, builder, args[0])
        return builder.bitcast(view.data, cgutils.voidptr_t)
    return types.voidptr(array), codegen


@njit(**config.KERNEL)
def gemm(a, trans_a, b, trans_b, c, beta):
    """c = op(a) @ op(b) + beta * c on 2-D row-major views; op(m) = m.T when its flag is TRANS.

    trans_a, trans_b: NO_TRANS or TRANS. beta: 0.0 (overwrite c, whatever it held) or 1.0
    (accumulate into c). Every view needs unit stride along its last axis (slices of columns
    are fine). The flags are int8 globals and beta a float, not bool / int literals: Numba
    compiles a function again for every combination of literal arguments it is called with.
    """
    m, n = c.shape
    k = a.shape[0] if trans_a == TRANS else a.shape[1]
    if m == 0 or n == 0:
        return
    if k == 0:  # BLAS may return at once without applying beta
        if beta == 0:
            c[:, :] = 0
        return
    one = c.dtype.type(1)
    beta_ = c.dtype.type(beta)
    # leading dimensions in elements; BLAS wants at least max(1, columns)
    lda = max(a.strides[0] // a.itemsize, a.shape[1], 1)
    ldb = max(b.strides[0] // b.itemsize, b.shape[1], 1)
    ldc = max(c.strides[0] // c.itemsize, c.shape[1], 1)
    if m == 1:
        # one row (a batch of one, a bias sum): OpenBLAS's GEMM is several times slower here
        # than its GEMV. c[0] (n) = op(b)^T @ op(a)[0] (k); the column-major matrix in b's
        # memory is b^T, of shape (k, n) if trans_b (then GEMV uses its transpose) else (n, k).
        rows, cols = (k, n) if trans_b == TRANS else (n, k)
        incx = lda if trans_a == TRANS else 1
        vargs = (_byref(trans_b), _byref(np.int32(rows)), _byref(np.int32(cols)), _byref(one),
                 _data(b), _byref(np.int32(ldb)), _data(a), _byref(np.int32(incx)),
                 _byref(beta_), _data(c), _byref(np.int32(1)))
        if c.itemsize == 4:
            _sgemv(*vargs)
        else:
            _dgemv(*vargs)
        return
    # column-major view of the same memory: c^T (n, m) = op(b)^T (n, k) @ op(a)^T (k, m)
    args = (_byref(trans_b), _byref(trans_a), _byref(np.int32(n)), _byref(np.int32(m)),
            _byref(np.int32(k)), _byref(one), _data(b), _byref(np.int32(ldb)), _data(a),
            _byref(np.int32(lda)), _byref(beta_), _data(c), _byref(np.int32(ldc)))
    if c.itemsize == 4:
        _sgemm(*args)
    else:
        _dgemm(*args)
