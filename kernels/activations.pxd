# Activations for float and double, inline, usable without the GIL.
#
# NaN goes in, NaN comes out: every clamp and select here is written so that a comparison with
# NaN (always false) keeps the argument itself. No -ffast-math (setup.py).
#
# float32 uses its own exp, with no libm call and no branch, so the gate loops that call it
# vectorise (libm's expf/tanhf are opaque calls that keep a loop scalar); it is accurate to a few
# units in the last place (sigmoid 2.5, tanh 4.4 at most), far inside the float32 tolerance.
# float64 uses libm. The array forms at the end are what the cell steps call.
from cython cimport floating
from libc.math cimport exp, tanh
from libc.stdint cimport int32_t


cdef union _f32_bits:
    float f
    int32_t i


cdef inline float _exp_f32(float x) noexcept nogil:
    # e^x = 2^n e^r with n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2]
    cdef float n, r, p
    cdef _f32_bits scale
    x = <float>88.0 if x > <float>88.0 else x        # e^88 < FLT_MAX; NaN passes both
    x = <float>-87.0 if x < <float>-87.0 else x      # keeps 2^n a normal number
    # round to nearest by adding and removing 1.5 * 2^23 (exact without -ffast-math)
    n = (x * <float>1.4426950408889634 + <float>12582912.0) - <float>12582912.0
    # ln 2 in two parts (Cody-Waite) so n * ln2_hi is exact
    r = (x - n * <float>0.693359375) - n * <float>-2.1219444005469057e-4
    # Taylor polynomial of e^r to r^7: truncation below 1e-8 on |r| <= 0.347
    p = <float>1.984126984126984e-4
    p = p * r + <float>1.3888888888888889e-3
    p = p * r + <float>8.333333333333333e-3
    p = p * r + <float>4.1666666666666664e-2
    p = p * r + <float>0.16666666666666666
    p = p * r + <float>0.5
    p = p * r + <float>1.0
    p = p * r + <float>1.0
    scale.i = (<int32_t>n + 127) << 23             # 2^n from its exponent bits
    return p * scale.f


cdef inline float _tanh_f32(float a) noexcept nogil:
    # |a| < 0.25: odd Taylor series to a^9; else 1 - 2 / (e^(2|a|) + 1); the sign restored last.
    # Both are computed and one selected, so there is no branch to keep a loop scalar.
    cdef float x = -a if a < 0 else a
    cdef float x2 = x * x
    cdef float small = x + x * x2 * (<float>-0.3333333333333333 + x2 * (
        <float>0.13333333333333333 + x2 * (<float>-0.05396825396825397
                                           + x2 * <float>0.021869488536155203)))
    cdef float big = <float>1.0 - <float>2.0 / (_exp_f32(x + x) + <float>1.0)
    cdef float t = small if x < <float>0.25 else big   # NaN takes big, which is NaN
    return -t if a < 0 else t


cdef inline floating sigmoid(floating a) noexcept nogil:
    cdef double e
    if floating is float:
        return <float>1.0 / (<float>1.0 + _exp_f32(-a))   # e^-a is clamped: never inf
    else:
        # 1 / (1 + e^-a); for a < 0 the form e^a / (1 + e^a) keeps e^-a from overflowing
        if a >= 0:
            return 1 / (1 + exp(-a))
        e = exp(a)
        return e / (1 + e)                 # also taken by NaN: e is NaN


cdef inline floating tanh_(floating a) noexcept nogil:
    if floating is float:
        return _tanh_f32(a)
    else:
        return tanh(a)


cdef inline floating relu(floating a) noexcept nogil:
    # max(a, 0) with NaN kept (np.maximum does the same)
    return 0 if a <= 0 else a


cdef inline floating relu_backward(floating dy, floating y) noexcept nogil:
    # dL/da from dL/dy and the output y = relu(a): dy where y > 0; else y itself, which is 0, or
    # NaN from a NaN input, which must reach the gradients too (as the reference does)
    return dy if y > 0 else y


cdef inline void sigmoid_inplace(floating* a, Py_ssize_t n) noexcept nogil:
    # a[:n] = sigmoid(a[:n])
    cdef Py_ssize_t j
    for j in range(n):
        a[j] = sigmoid(a[j])


cdef inline void tanh_inplace(floating* a, Py_ssize_t n) noexcept nogil:
    # a[:n] = tanh(a[:n])
    cdef Py_ssize_t j
    for j in range(n):
        a[j] = tanh_(a[j])


cdef inline void tanh_into(floating* out, const floating* a, Py_ssize_t n) noexcept nogil:
    # out[:n] = tanh(a[:n])
    cdef Py_ssize_t j
    for j in range(n):
        out[j] = tanh_(a[j])
