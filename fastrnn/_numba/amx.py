"""float32 products on the AMX tile unit for the Numba backend: kernels/amx.h's two kernels (the
three-part bfloat16 split, six part products: as accurate as float32 arithmetic; see that
file), called from the compiled loops.

Numba cannot emit the tile instructions, so the loops call the C kernels that the Cython
extension fastrnn._cy.amx_export carries: their addresses are registered as two LLVM symbols
(llvmlite's add_symbol) that the intrinsics below call by name. A call by name, not through a
ctypes pointer: a function holding a pointer could not be cached, and the loops would compile
again in every process. Without the extension or the CPU support the symbols point at a stub
that is never called (``AVAILABLE`` is False and the loops never take the AMX branch).

The layout of the packed weights is amx.h's: ``packed_size(rows, k)`` float32 elements, the
rows from r0 (a multiple of ``PANEL``) at ``offset(r0, k)``.
"""
import ctypes

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import config

__all__ = ["AVAILABLE", "PANEL", "MIN_ROWS", "packed_size", "buffer", "offset", "pack", "product",
           "pack_parts", "product_parts", "pack_and_multiply", "weight_gradient"]

PANEL = 32          # weight rows of a panel (amx.h's FR_AMX_PANEL)
MIN_ROWS = 16       # rows of x from which a product takes the tile unit (one tile of rows)
_PACK_SYMBOL = "fastrnn_amx_pack"
_PRODUCT_SYMBOL = "fastrnn_amx_product"


def _stub(*args):           # pragma: no cover - never called: AVAILABLE is False with it
    raise RuntimeError("fastrnn: the AMX kernels are not available")


_STUB = ctypes.CFUNCTYPE(None)(_stub)      # kept alive: its address is registered below


def _register():
    try:
        from fastrnn._cy import amx_export
        addresses = amx_export.addresses()
        available = amx_export.available()
    except ImportError:
        addresses, available = None, False
    if addresses is None:
        stub = ctypes.cast(_STUB, ctypes.c_void_p).value
        addresses = {"pack": stub, "product": stub}
    llvm.add_symbol(_PACK_SYMBOL, addresses["pack"])
    llvm.add_symbol(_PRODUCT_SYMBOL, addresses["product"])
    return bool(available)


AVAILABLE = _register()

_I64 = ir.IntType(64)
_PTR = ir.IntType(8).as_pointer()


def _call_by_name(context, builder, name, arg_types, args, pointers):
    """Emit a call of the C function `name` (void result): every argument cast to int64, the
    positions in `pointers` passed as pointers."""
    values = [context.cast(builder, value, ty, types.int64) for value, ty in zip(args, arg_types)]
    values = [builder.inttoptr(v, _PTR) if i in pointers else v for i, v in enumerate(values)]
    fnty = ir.FunctionType(ir.VoidType(), [_PTR if i in pointers else _I64
                                           for i in range(len(values))])
    fn = cgutils.get_or_insert_function(builder.module, fnty, name)
    builder.call(fn, values)
    return context.get_dummy_value()


@intrinsic
def _pack_call(typingctx, w, rs, cs, rows, k, packed):
    """fr_amx_pack(w, rs, cs, rows, k, packed), addresses and sizes as integers."""
    arg_types = (w, rs, cs, rows, k, packed)

    def codegen(context, builder, signature, args):
        return _call_by_name(context, builder, _PACK_SYMBOL, arg_types, args, (0, 5))
    return types.void(*arg_types), codegen


@intrinsic
def _product_call(typingctx, packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate):
    """fr_amx_product(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate) (accumulate is
    an int in C: passed as int64, its low half read, per the x86-64 calling convention)."""
    arg_types = (packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate)

    def codegen(context, builder, signature, args):
        return _call_by_name(context, builder, _PRODUCT_SYMBOL, arg_types, args, (0, 3, 7))
    return types.void(*arg_types), codegen


@njit(**config.KERNEL)
def packed_size(rows, k):
    """float32 elements of the packed copy of rows x k weights."""
    return -(-rows // PANEL) * 48 * (-(-k // 32) * 32)


@njit(**config.KERNEL)
def buffer(n):
    """n float32 elements for packed weights, from a 64-byte boundary."""
    flat = np.empty(n + 16, np.float32)
    skip = (-(flat.ctypes.data // 4)) % 16
    return flat[skip:skip + n]


@njit(**config.KERNEL)
def offset(r0, k):
    """Where the packed rows from r0 (a multiple of PANEL) start."""
    return r0 // PANEL * 48 * (-(-k // 32) * 32)


@njit(**config.KERNEL)
def pack(w, r0, n, packed):
    """Rows r0 .. r0+n-1 of w (2-D float32, any strides) packed into packed (1-D float32,
    >= packed_size(n, K) elements)."""
    size = w.itemsize
    _pack_call(w.ctypes.data + r0 * w.strides[0], w.strides[0] // size, w.strides[1] // size,
               n, w.shape[1], packed.ctypes.data)


@njit(**config.KERNEL)
def product(packed, n, k, v, out, col, accumulate):
    """out[b, col + r] (+)= sum_i v[b, i] W[r, i] for r < n, every row b of v (2-D float32,
    any strides; k = v.shape[1]); out's rows contiguous."""
    size = v.itemsize
    if out.shape[1] > 1 and out.strides[1] != size:
        raise ValueError("amx.product: out's rows must be contiguous")
    _product_call(packed.ctypes.data, n, k, v.ctypes.data, v.strides[0] // size,
                  v.strides[1] // size, v.shape[0], out.ctypes.data + col * size,
                  out.strides[0] // size, 1 if accumulate else 0)


@njit(**config.KERNEL)
def _part(p, P, n, unit):
    """Rows [r0, r1) of part p of P when n rows are split in whole units of `unit` rows (as
    kernels.panel_part, which this module cannot import: kernels imports it)."""
    per = -(-(-(-n // unit)) // P) * unit
    r0 = min(n, p * per)
    return r0, min(n, r0 + per)


@njit(**config.PARALLEL)
def _pack_parallel(P, w, r0, n, packed):
    for part in prange(P):
        a, b = _part(np.int64(part), P, n, PANEL)
        if a < b:
            pack(w, r0 + a, b - a, packed[offset(a, w.shape[1]):])


@njit(**config.KERNEL)
def pack_parts(P, w, r0, n, packed):
    """pack with the panels split over P threads."""
    P = min(P, -(-n // PANEL))
    if P > 1:
        _pack_parallel(P, w, r0, n, packed)
    else:
        pack(w, r0, n, packed)


@njit(**config.PARALLEL)
def _product_parallel(P, packed, n, v, out, col, accumulate):
    k = v.shape[1]
    for part in prange(P):
        a, b = _part(np.int64(part), P, n, PANEL)
        if a < b:
            product(packed[offset(a, k):], b - a, k, v, out, col + a, accumulate)


@njit(**config.KERNEL)
def product_parts(P, packed, n, v, out, col, accumulate):
    """product with the panels split over P threads (one launch), or on this thread."""
    P = min(P, -(-n // PANEL))
    if P > 1:
        _product_parallel(P, packed, n, v, out, col, accumulate)
    else:
        product(packed, n, v.shape[1], v, out, col, accumulate)


@njit(**config.PARALLEL)
def _pack_multiply_parallel(P, w, n, v, out, accumulate, packed):
    k = w.shape[1]
    for part in prange(P):
        a, b = _part(np.int64(part), P, n, PANEL)
        if a < b:
            mine = packed[offset(a, k):]
            pack(w, a, b - a, mine)
            product(mine, b - a, k, v, out, a, accumulate)


@njit(**config.KERNEL)
def pack_and_multiply(P, w, n, v, out, accumulate, flat):
    """A one-off product: out[b, r] (+)= v[b] . w[r] for r < n; the rows of w split by whole
    panels over P threads, each packing its own into flat (>= packed_size(n, K) elements)."""
    P = min(P, -(-n // PANEL))
    if P > 1:
        _pack_multiply_parallel(P, w, n, v, out, accumulate, flat)
    else:
        pack(w, 0, n, flat)
        product(flat, n, w.shape[1], v, out, 0, accumulate)


@njit(**config.PARALLEL)
def _rows_parallel(P, packed, n, d, out):
    # rows of out (of d^T) split in whole 16-row tiles: each thread splits only its part of d^T
    for part in prange(P):
        m0, m1 = _part(np.int64(part), P, d.shape[1], MIN_ROWS)
        if m0 < m1:
            product(packed, n, d.shape[0], d[:, m0:m1].T, out[m0:m1], 0, True)


@njit(**config.KERNEL)
def weight_gradient(P, d, v, out, flat):
    """out (M, K) += d^T v, d (TB, M) and v (TB, K): over chunks of config.GRAD_CHUNK rows of
    T*B, a chunk of v packed by columns (split over the threads), then the rows of out split
    over them. flat: >= packed_size(K, GRAD_CHUNK) elements."""
    TB, M = d.shape
    K = v.shape[1]
    P = max(1, min(P, -(-M // 16)))
    for r0 in range(0, TB, config.GRAD_CHUNK):
        r1 = min(TB, r0 + config.GRAD_CHUNK)
        pack_parts(P, v[r0:r1].T, 0, K, flat)
        if P > 1:
            _rows_parallel(P, flat, K, d[r0:r1], out)
        else:
            product(flat, K, r1 - r0, d[r0:r1].T, out, 0, True)
