"""Reduced-precision inference: ``fastrnn.quantize(layer, weights="bfloat16" | "int8")``.

The layer returned is a copy of ``layer`` whose input and recurrent weights (``weight_ih_l*``,
``weight_hh_l*``) are stored as :class:`QuantizedWeight`; biases, peepholes and layer-norm
parameters stay float32. It is called like the original, ``y, state = q(x, state, lengths)``,
and refuses training. What a product computes (kernels/lowp.h has the same words):

- ``"bfloat16"``: the weights and each product's other operand (x, or the state) rounded to
  bfloat16, to nearest even; products of two bfloat16 numbers are exact in float32, and they
  are summed in float32 (AVX-512 BF16's ``vdpbf16ps`` where the CPU has it, else AVX2's FMA).
- ``"int8"``: each weight row symmetric, ``W[r] ~= scale[r] * q[r]`` with ``q`` in [-127, 127];
  each row of the other operand the same way at every product (dynamic quantization, as
  PyTorch's ``quantize_dynamic``, but symmetric); the integer sums are exact (int32, AVX-512
  VNNI's ``vpdpbusd`` where the CPU has it, else AVX2's ``vpmaddwd``) and scaled back to float32.

The products run in C (the Cython extension); ``backend="reference"`` runs the same arithmetic
in NumPy, the oracle of the tests.
"""
import copy

import numpy as np

__all__ = ["quantize", "QuantizedWeight", "FORMATS"]

FORMATS = ("bfloat16", "int8")
PAD = 64                # elements: a stored row's length is a multiple (lowp.h's FR_Q_PAD)
_MAX_COLUMNS = 65536    # int8: 255 * 127 * k must stay within int32 (vpdpbusd does not saturate)


def _bfloat16_bits(a):
    """float32 array -> uint16 bfloat16 bits, rounded to nearest even; NaN stays NaN."""
    u = np.ascontiguousarray(a, np.float32).view(np.uint32)
    rounded = ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    nan = (u & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    bits = np.where(nan, (u >> np.uint32(16)) | np.uint32(0x40), rounded)
    return bits.astype(np.uint16)


def _float_from_bfloat16(bits):
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def round_to_bfloat16(a):
    """a (float32) with every element rounded to the nearest bfloat16, as float32."""
    return _float_from_bfloat16(_bfloat16_bits(a))


def _int8_rows(a):
    """Symmetric int8 of each row of a (float32, rows on the last axis): (q, scale) with
    a ~= scale[..., None] * q, as lowp.h's fr_q_prepare computes it, to the bit."""
    a = np.asarray(a, np.float32)
    with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
        top = np.abs(a).max(axis=-1) if a.shape[-1] else np.zeros(a.shape[:-1], np.float32)
        scale = (top / np.float32(127)).astype(np.float32)
        usable = (top > 0) & np.isfinite(top)
        inv = np.where(usable, np.float32(127) / np.where(usable, top, 1), 0).astype(np.float32)
        q = np.rint(a * inv[..., None])
        q = np.clip(np.nan_to_num(q, nan=0.0), -127, 127)
    return q.astype(np.int8), scale


class QuantizedWeight:
    """A (rows, k) float32 weight matrix stored in bfloat16 or int8 (see the module's text).

    ``data`` (rows, ld) uint16 bfloat16 bits or int8, ld a multiple of 64, zeros past k;
    int8: ``scale`` (rows,) float32 and ``row_sum`` (rows,) int32, the sum of each row of q.
    Row slices (``w[a:b]``) share the storage; ``v @ w.T`` is the product the compiled kernels
    compute, in NumPy (the reference backend's)."""

    __array_ufunc__ = None          # NumPy leaves `v @ w.T` to _Transposed.__rmatmul__
    dtype = np.dtype(np.float32)    # of the values it stands for, and of its products

    def __init__(self, weight, format):
        if format not in FORMATS:
            raise ValueError(f"weights: expected one of {', '.join(map(repr, FORMATS))}, "
                             f"got {format!r}")
        weight = np.asarray(weight, np.float32)
        if weight.ndim != 2:
            raise ValueError(f"weight: expected a 2-d array, got shape {weight.shape}")
        rows, k = weight.shape
        if format == "int8" and k > _MAX_COLUMNS:
            raise ValueError(f"weight: int8 products take at most {_MAX_COLUMNS} columns, "
                             f"got {k}")
        ld = max(PAD, -(-k // PAD) * PAD)
        self.format = format
        self.shape = (rows, k)
        if format == "bfloat16":
            self.data = np.zeros((rows, ld), np.uint16)
            self.data[:, :k] = _bfloat16_bits(weight)
            self.scale = np.zeros(0, np.float32)
            self.row_sum = np.zeros(0, np.int32)
        else:
            q, self.scale = _int8_rows(weight)
            self.data = np.zeros((rows, ld), np.int8)
            self.data[:, :k] = q
            self.row_sum = q.sum(axis=1, dtype=np.int32)

    @classmethod
    def _view(cls, format, shape, data, scale, row_sum):
        w = cls.__new__(cls)
        w.format, w.shape, w.data, w.scale, w.row_sum = format, shape, data, scale, row_sum
        return w

    @property
    def nbytes(self):
        """Bytes of the stored weights, scales and row sums."""
        return self.data.nbytes + self.scale.nbytes + self.row_sum.nbytes

    def __getitem__(self, rows):
        if not isinstance(rows, slice):
            raise TypeError("a QuantizedWeight takes row slices only, w[a:b]")
        data = self.data[rows]
        int8 = self.format == "int8"
        return self._view(self.format, (data.shape[0], self.shape[1]), data,
                          self.scale[rows] if int8 else self.scale,
                          self.row_sum[rows] if int8 else self.row_sum)

    def copy(self):
        return self._view(self.format, self.shape, self.data.copy(), self.scale.copy(),
                          self.row_sum.copy())

    def dequantized(self):
        """The float32 matrix the stored weights stand for."""
        k = self.shape[1]
        if self.format == "bfloat16":
            return _float_from_bfloat16(self.data[:, :k])
        return self.data[:, :k].astype(np.float32) * self.scale[:, None]

    @property
    def T(self):
        return _Transposed(self)

    def product(self, v):
        """v @ W.T, with v (..., k), as the compiled kernels compute it (float32)."""
        v = np.asarray(v, np.float32)
        lead, k = v.shape[:-1], self.shape[1]
        v = v.reshape(-1, k)
        if self.format == "bfloat16":
            out = round_to_bfloat16(v).astype(np.float64) \
                @ self.dequantized().astype(np.float64).T
            out = out.astype(np.float32)
        else:
            p, sx = _int8_rows(v)
            sums = p.astype(np.float64) @ self.data[:, :k].astype(np.float64).T   # exact
            out = sums.astype(np.float32) * (self.scale[None, :] * sx[:, None])
        return out.reshape(lead + (self.shape[0],))

    def __repr__(self):
        return f"QuantizedWeight({self.format}, shape={self.shape})"


class _Transposed:
    """``w.T`` of a QuantizedWeight: only ``v @ w.T``."""

    __array_ufunc__ = None

    def __init__(self, weight):
        self.weight = weight

    def __rmatmul__(self, v):
        return self.weight.product(v)


def quantize(layer, weights="bfloat16", *, backend="auto"):
    """An inference-only copy of ``layer`` (fastrnn.RNN, LSTM or GRU, float32) whose input and
    recurrent weights are stored as ``weights``, "bfloat16" or "int8" (see fastrnn.quantized).

    ``y, state = q(x, state=None, lengths=None)`` as with the layer; ``q.forward(...,
    train=True)`` is refused. backend: "cython" (the C kernels, AVX-512 BF16 / VNNI where the
    CPU has them, AVX2 elsewhere), "reference" (the same arithmetic in NumPy) or "auto"
    (cython when it is built)."""
    from . import dispatch
    from .layers import _RNNBase, _aligned_zeros
    if not isinstance(layer, _RNNBase):
        raise TypeError(f"layer: expected a fastrnn RNN, LSTM or GRU, got "
                        f"{type(layer).__name__}")
    if weights not in FORMATS:
        raise ValueError(f"weights: expected one of {', '.join(map(repr, FORMATS))}, "
                         f"got {weights!r}")
    if layer.quantized:
        raise ValueError(f"layer: already quantized ({layer.quantized}); quantize the "
                         f"float32 layer")
    if layer.dtype != np.float32:
        raise TypeError(f"layer: expected a float32 layer (products accumulate in float32), "
                        f"got {layer.dtype.name}; copy its state_dict into a float32 layer")
    if layer.proj_size:
        raise ValueError("layer: a projected LSTM (proj_size) cannot be quantized yet")
    if backend == "auto":
        backend = "cython" if "cython" in dispatch.backends() else "reference"
    if backend not in ("cython", "reference"):
        raise ValueError(f"backend: expected 'cython', 'reference' or 'auto' for a quantized "
                         f"layer (its products are C kernels of the Cython extension), "
                         f"got {backend!r}")
    kernels = dispatch.get_backend(backend)
    layer._check_params()
    q = copy.copy(layer)
    q.params = {}
    for name, value in layer.params.items():
        if name.startswith(("weight_ih", "weight_hh")):
            q.params[name] = QuantizedWeight(value, weights)
        else:
            q.params[name] = _aligned_zeros(value.shape, value.dtype)
            q.params[name][...] = value
    q.grads = {}
    q.quantized = weights
    q.backend, q._kernels = backend, kernels
    q._call_step = q._backend_call_step()
    q._identity = q._describe()
    return q
