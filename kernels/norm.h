/* The sums of the layer-normalized step pairs (kernels/steps.pxd), vectorised.
 *
 *   fr_norm_stats_f32 / _f64 (v, n, eps, &mean, &rstd):
 *       mean of v[0..n) and 1 / sqrt(var + eps), var the biased variance (two passes)
 *   fr_norm_grad_sums_f32 / _f64 (d, raw, gain, mean, rstd, n, dgain, dshift, &s1, &s2):
 *       with v_hat = (raw - mean) * rstd: dgain += d * v_hat, dshift += d, and
 *       s1 = sum(d * gain), s2 = sum(d * gain * v_hat), what LN's backward needs
 *   fr_pair_sums_f32 / _f64 (x, y, n, &sx, &sxy): sum(x), sum(x * y)
 *
 * As rowdot.h explains, the extension is built without -ffast-math (NaN must flow), and a
 * float sum then vectorises only where the compiler may reorder it: `omp simd reduction`
 * allows that and nothing else. Written in Cython, these sums ran one element at a time: the
 * layer-normalized LSTM's training call cost 1.48x the plain one's (lstm-train-256 shape),
 * against 1.33x for the Numba backend, whose fastmath flags allow the reordering.
 */
#ifndef FASTRNN_NORM_H
#define FASTRNN_NORM_H

#include <math.h>
#include <stddef.h>

#define FR_NORM_DEFINE(T, SUF)                                                                    \
static inline void fr_norm_stats_##SUF(const T* v, ptrdiff_t n, double eps, T* mean, T* rstd)   \
{                                                                                                 \
    T total = 0, squares = 0, m;                                                                  \
    ptrdiff_t k;                                                                                  \
    _Pragma("omp simd reduction(+:total)")                                                        \
    for (k = 0; k < n; k++)                                                                       \
        total += v[k];                                                                            \
    m = total / (T)n;                                                                             \
    _Pragma("omp simd reduction(+:squares)")                                                      \
    for (k = 0; k < n; k++) {                                                                     \
        T d = v[k] - m;                                                                           \
        squares += d * d;                                                                         \
    }                                                                                             \
    *mean = m;                                                                                    \
    *rstd = (T)(1.0 / sqrt((double)(squares / (T)n) + eps));                                      \
}                                                                                                 \
                                                                                                  \
static inline void fr_norm_grad_sums_##SUF(const T* d, const T* raw, const T* gain, T mean,     \
                                           T rstd, ptrdiff_t n, T* dgain, T* dshift, T* s1_out,  \
                                           T* s2_out)                                             \
{                                                                                                 \
    T s1 = 0, s2 = 0;                                                                             \
    ptrdiff_t k;                                                                                  \
    _Pragma("omp simd reduction(+:s1, s2)")                                                       \
    for (k = 0; k < n; k++) {                                                                     \
        T v_hat = (raw[k] - mean) * rstd, dv = d[k] * gain[k];                                    \
        dgain[k] += d[k] * v_hat;                                                                 \
        dshift[k] += d[k];                                                                        \
        s1 += dv;                                                                                 \
        s2 += dv * v_hat;                                                                         \
    }                                                                                             \
    *s1_out = s1;                                                                                 \
    *s2_out = s2;                                                                                 \
}                                                                                                 \
                                                                                                  \
static inline void fr_pair_sums_##SUF(const T* x, const T* y, ptrdiff_t n, T* sx_out,           \
                                      T* sxy_out)                                                 \
{                                                                                                 \
    T sx = 0, sxy = 0;                                                                            \
    ptrdiff_t k;                                                                                  \
    _Pragma("omp simd reduction(+:sx, sxy)")                                                      \
    for (k = 0; k < n; k++) {                                                                     \
        sx += x[k];                                                                               \
        sxy += x[k] * y[k];                                                                       \
    }                                                                                             \
    *sx_out = sx;                                                                                 \
    *sxy_out = sxy;                                                                               \
}

FR_NORM_DEFINE(float, f32)
FR_NORM_DEFINE(double, f64)

#endif
