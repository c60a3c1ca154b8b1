/* Products with weights stored in bfloat16 or int8, for fastrnn.quantize (layers.pyx).
 *
 *   out[b*ldo + r] = sum_i W[r0 + r, i] * x[b, i]      r < rows, b < nx
 *
 * in two steps: fr_q_prepare rounds the rows of x to the weights' format once (into a scratch
 * buffer of fr_q_scratch_bytes), then fr_q_product multiplies any rows of W with them.
 *
 * bfloat16: the weights and x rounded to nearest even, NaN kept; every product of two bfloat16
 * numbers is exact in float32 and the sums are float32 (AVX-512 BF16's vdpbf16ps for up to
 * FR_Q_BF16_DOT_ROWS rows of x; else, and on other CPUs, float32 dot products of the same
 * numbers, summed in another order).
 * int8: weights symmetric per row, W[r, i] ~= scale[r] * q[r, i], q in [-127, 127]; each row
 * of x symmetric on its own, x[b, i] ~= sx[b] * p[b, i], sx[b] = max|x[b]| / 127, p rounded
 * to nearest even. The sum of q * p is exact in int32 (AVX-512 VNNI's vpdpbusd, which takes
 * unsigned bytes: p + 128, and 128 * sum_i q[r, i] taken off after), and
 * out = float(sum) * (scale[r] * sx[b]), so the VNNI path and the plain one agree to the bit.
 * A row of x with NaN or infinity gets sx = NaN or inf, so its outputs are NaN, not garbage.
 *
 * Rows of W and of the prepared x are ld elements apart, ld a multiple of FR_Q_PAD with zeros
 * past k (prepared int8 x: p = 0 there), so the vector loops need no tail.
 */
#ifndef FASTRNN_LOWP_H
#define FASTRNN_LOWP_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "rowdot.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) \
    && (__GNUC__ >= 8)
#define FR_Q_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FR_Q_CLONES
#endif
#if defined(__GNUC__) && defined(__x86_64__) && (__GNUC__ >= 10)
#define FR_Q_X86 1
#include <immintrin.h>
#endif

enum { FR_Q_NONE = 0, FR_Q_BF16 = 1, FR_Q_INT8 = 2 };
#define FR_Q_PAD 64                 /* elements: a row's padding, one 64-byte vector of int8 */
#define FR_Q_BLOCK_BYTES (256 * 1024)   /* prepared rows of x met by each group of W's rows */

typedef struct {
    int format;                     /* FR_Q_BF16 or FR_Q_INT8; FR_Q_NONE: not quantized */
    const void* data;               /* (rows, ld) uint16 (bfloat16 bits) or int8 */
    ptrdiff_t ld;                   /* elements between rows, a multiple of FR_Q_PAD */
    ptrdiff_t k;                    /* columns in use */
    const float* scale;             /* int8: per row */
    const int32_t* row_sum;         /* int8: per row, sum of q */
} fr_qweights;

/* Which instructions the products use: 1 the CPU's (when it has them), 0 the plain loops */
static int fr_q_use_isa = 1;
static int fr_q_cpu = -1;           /* bit 0: AVX-512 BF16, bit 1: AVX-512 VNNI; -1 unknown */

static inline int fr_q_cpu_features(void)
{
    if (fr_q_cpu < 0) {
        int f = 0;
#ifdef FR_Q_X86
        __builtin_cpu_init();
        if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) {
            if (__builtin_cpu_supports("avx512bf16")) f |= 1;
            if (__builtin_cpu_supports("avx512vnni")) f |= 2;
        }
#endif
        fr_q_cpu = f;
    }
    return fr_q_cpu;
}

/* 1 when products of `format` run on the CPU's instructions (and are allowed to) */
static inline int fr_q_isa(int format)
{
    int f = fr_q_cpu_features();
    if (!fr_q_use_isa) return 0;
    return format == FR_Q_BF16 ? (f & 1) != 0 : format == FR_Q_INT8 ? (f & 2) != 0 : 0;
}

/* on: 1 the CPU's instructions where it has them, 0 the plain loops; returns the old value */
static inline int fr_q_set_isa(int on)
{
    int old = fr_q_use_isa;
    fr_q_use_isa = on != 0;
    return old;
}

/* bfloat16 products over more rows of x than this widen both operands to float32 (the same
 * numbers: the products are exact either way) and run on rowdot.h's float32 dot products:
 * vdpbf16ps does 32 products in about 2 cycles where two FMA ports do 32 in 1, so it wins
 * only where reading the weights is the limit (measured: 1024 x 512 weights, 4 rows of x,
 * 68 us on vdpbf16ps; 1 row 15 us, float32 49 us; Intel Xeon with AVX-512 BF16) */
#define FR_Q_BF16_DOT_ROWS 4
#define FR_Q_WIDEN_ROWS 16          /* weight rows widened at a time */

static inline size_t fr_q_scratch_bytes(int format, ptrdiff_t ld, ptrdiff_t nx)
{
    if (format == FR_Q_BF16 && nx > FR_Q_BF16_DOT_ROWS)
        return (size_t)(nx * ld) * sizeof(float);
    if (format == FR_Q_BF16) return (size_t)(nx * ld) * 2;
    return (size_t)(nx * ld) + (size_t)nx * sizeof(float);     /* bytes, then the scales */
}

static inline uint16_t fr_bf16_from_float(float v)
{
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);   /* quiet NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline float fr_float_from_bf16(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/* x (nx rows, ldx apart, k used) into scratch, in the layout fr_q_product reads */
static void fr_q_prepare(int format, ptrdiff_t ld, ptrdiff_t k, const float* x, ptrdiff_t ldx,
                         ptrdiff_t nx, void* scratch)
{
    ptrdiff_t b, i;
    if (format == FR_Q_BF16 && nx > FR_Q_BF16_DOT_ROWS) {
        float* out = (float*)scratch;           /* the rounded values, as float32 */
        for (b = 0; b < nx; b++) {
            const float* row = x + b * ldx;
            float* dst = out + b * ld;
            for (i = 0; i < k; i++) dst[i] = fr_float_from_bf16(fr_bf16_from_float(row[i]));
            for (; i < ld; i++) dst[i] = 0.0f;
        }
        return;
    }
    if (format == FR_Q_BF16) {
        uint16_t* out = (uint16_t*)scratch;
        for (b = 0; b < nx; b++) {
            const float* row = x + b * ldx;
            uint16_t* dst = out + b * ld;
            for (i = 0; i < k; i++) dst[i] = fr_bf16_from_float(row[i]);
            for (; i < ld; i++) dst[i] = 0;
        }
        return;
    }
    {
        uint8_t* out = (uint8_t*)scratch;
        float* scales = (float*)(out + nx * ld);
        for (b = 0; b < nx; b++) {
            const float* row = x + b * ldx;
            uint8_t* dst = out + b * ld;
            float top = 0.0f, inv;
            for (i = 0; i < k; i++) {
                float a = fabsf(row[i]);
                if (a > top || a != a) top = a;     /* NaN wins and stays */
            }
            scales[b] = top / 127.0f;
            inv = (top > 0.0f && top <= 3.4028234663852886e38f) ? 127.0f / top : 0.0f;
            for (i = 0; i < k; i++) {
                float v = rintf(row[i] * inv);
                v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;   /* NaN: inv is 0 */
                dst[i] = (uint8_t)((int)v + 128);
            }
            for (; i < ld; i++) dst[i] = 128;
        }
    }
}

/* an int8 sum of q * (p + 128) as the float it stands for (see the top) */
#define FR_Q_INT8_ARGS float* sw, const int32_t* row_sum, const float* sx
static inline float fr_q_int8_value(int32_t s, ptrdiff_t r, ptrdiff_t b, const FR_Q_INT8_ARGS)
{
    return (float)(s - 128 * row_sum[r]) * (sw[r] * sx[b]);
}

/* The plain loops, the reference for the instruction paths below */

FR_Q_CLONES
static void fr_q_dots_bf16_plain(const uint16_t* w, ptrdiff_t ld, ptrdiff_t k, ptrdiff_t rows,
                                 const uint16_t* x, ptrdiff_t nx, float* out, ptrdiff_t ldo)
{
    ptrdiff_t r, b, i;
    for (r = 0; r < rows; r++)
        for (b = 0; b < nx; b++) {
            const uint16_t* wr = w + r * ld;
            const uint16_t* xb = x + b * ld;
            float s = 0.0f;
            #pragma omp simd reduction(+:s)
            for (i = 0; i < k; i++) s += fr_float_from_bf16(wr[i]) * fr_float_from_bf16(xb[i]);
            out[b * ldo + r] = s;
        }
}

FR_Q_CLONES
static void fr_q_dots_int8_plain(const int8_t* w, ptrdiff_t ld, ptrdiff_t rows,
                                 const uint8_t* x, ptrdiff_t nx, const FR_Q_INT8_ARGS,
                                 float* out, ptrdiff_t ldo)
{
    ptrdiff_t r, b, i;
    for (r = 0; r < rows; r++)
        for (b = 0; b < nx; b++) {
            const int8_t* wr = w + r * ld;
            const uint8_t* xb = x + b * ld;
            int32_t s = 0;
            #pragma omp simd reduction(+:s)
            for (i = 0; i < ld; i++) s += (int32_t)xb[i] * (int32_t)wr[i];
            out[b * ldo + r] = fr_q_int8_value(s, r, b, sw, row_sum, sx);
        }
}

#ifdef FR_Q_X86
/* 4 rows of W times NB rows of x (NB = 1, 2 or 4, a constant after inlining): 4*NB sums in
 * registers, every row of W read once for the NB rows. Rows past `rows` repeat the last one
 * (their sums are not stored) */
#define FR_Q_ROWS(T, base, ld, r, n) \
    const T* w0 = base + (r) * ld; \
    const T* w1 = base + ((r) + 1 < (n) ? (r) + 1 : (r)) * ld; \
    const T* w2 = base + ((r) + 2 < (n) ? (r) + 2 : (r)) * ld; \
    const T* w3 = base + ((r) + 3 < (n) ? (r) + 3 : (r)) * ld;

__attribute__((target("avx512f,avx512bw,avx512bf16"), always_inline))
static inline void fr_q_group_bf16(const uint16_t* w, ptrdiff_t ld, ptrdiff_t r, ptrdiff_t rows,
                                   const uint16_t* x, const int NB, float* out, ptrdiff_t ldo)
{
    FR_Q_ROWS(uint16_t, w, ld, r, rows)
    __m512 acc[4][4];
    ptrdiff_t i;
    int b, j;
    for (b = 0; b < NB; b++)
        for (j = 0; j < 4; j++) acc[j][b] = _mm512_setzero_ps();
    if (NB == 1) {
        /* one row of x: a second set of sums over the odd vectors, so that 8 chains of
         * vdpbf16ps hide its latency rather than 4 (ld is a multiple of 64) */
        __m512 odd[4];
        for (j = 0; j < 4; j++) odd[j] = _mm512_setzero_ps();
        for (i = 0; i < ld; i += 64) {
            __m512bh v = (__m512bh)_mm512_loadu_si512(x + i);
            __m512bh u = (__m512bh)_mm512_loadu_si512(x + i + 32);
            acc[0][0] = _mm512_dpbf16_ps(acc[0][0], (__m512bh)_mm512_loadu_si512(w0 + i), v);
            acc[1][0] = _mm512_dpbf16_ps(acc[1][0], (__m512bh)_mm512_loadu_si512(w1 + i), v);
            acc[2][0] = _mm512_dpbf16_ps(acc[2][0], (__m512bh)_mm512_loadu_si512(w2 + i), v);
            acc[3][0] = _mm512_dpbf16_ps(acc[3][0], (__m512bh)_mm512_loadu_si512(w3 + i), v);
            odd[0] = _mm512_dpbf16_ps(odd[0], (__m512bh)_mm512_loadu_si512(w0 + i + 32), u);
            odd[1] = _mm512_dpbf16_ps(odd[1], (__m512bh)_mm512_loadu_si512(w1 + i + 32), u);
            odd[2] = _mm512_dpbf16_ps(odd[2], (__m512bh)_mm512_loadu_si512(w2 + i + 32), u);
            odd[3] = _mm512_dpbf16_ps(odd[3], (__m512bh)_mm512_loadu_si512(w3 + i + 32), u);
        }
        for (j = 0; j < 4 && r + j < rows; j++)
            out[r + j] = _mm512_reduce_add_ps(_mm512_add_ps(acc[j][0], odd[j]));
        return;
    }
    for (i = 0; i < ld; i += 32) {
        __m512i a0 = _mm512_loadu_si512(w0 + i), a1 = _mm512_loadu_si512(w1 + i);
        __m512i a2 = _mm512_loadu_si512(w2 + i), a3 = _mm512_loadu_si512(w3 + i);
        for (b = 0; b < NB; b++) {
            __m512bh v = (__m512bh)_mm512_loadu_si512(x + b * ld + i);
            acc[0][b] = _mm512_dpbf16_ps(acc[0][b], (__m512bh)a0, v);
            acc[1][b] = _mm512_dpbf16_ps(acc[1][b], (__m512bh)a1, v);
            acc[2][b] = _mm512_dpbf16_ps(acc[2][b], (__m512bh)a2, v);
            acc[3][b] = _mm512_dpbf16_ps(acc[3][b], (__m512bh)a3, v);
        }
    }
    for (b = 0; b < NB; b++)
        for (j = 0; j < 4 && r + j < rows; j++)
            out[b * ldo + r + j] = _mm512_reduce_add_ps(acc[j][b]);
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void fr_q_dots_bf16_isa(const uint16_t* w, ptrdiff_t ld, ptrdiff_t rows,
                               const uint16_t* x, ptrdiff_t nx, float* out, ptrdiff_t ldo)
{
    ptrdiff_t r, b;
    for (r = 0; r < rows; r += 4) {
        for (b = 0; b + 4 <= nx; b += 4)
            fr_q_group_bf16(w, ld, r, rows, x + b * ld, 4, out + b * ldo, ldo);
        for (; b + 2 <= nx; b += 2)
            fr_q_group_bf16(w, ld, r, rows, x + b * ld, 2, out + b * ldo, ldo);
        for (; b < nx; b++)
            fr_q_group_bf16(w, ld, r, rows, x + b * ld, 1, out + b * ldo, ldo);
    }
}

__attribute__((target("avx512f,avx512bw,avx512vnni"), always_inline))
static inline void fr_q_group_int8(const int8_t* w, ptrdiff_t ld, ptrdiff_t r, ptrdiff_t rows,
                                   const uint8_t* x, const int NB, const FR_Q_INT8_ARGS,
                                   float* out, ptrdiff_t ldo)
{
    FR_Q_ROWS(int8_t, w, ld, r, rows)
    __m512i acc[4][4];
    ptrdiff_t i;
    int b, j;
    for (b = 0; b < NB; b++)
        for (j = 0; j < 4; j++) acc[j][b] = _mm512_setzero_si512();
    for (i = 0; i < ld; i += 64) {
        __m512i a0 = _mm512_loadu_si512(w0 + i), a1 = _mm512_loadu_si512(w1 + i);
        __m512i a2 = _mm512_loadu_si512(w2 + i), a3 = _mm512_loadu_si512(w3 + i);
        for (b = 0; b < NB; b++) {
            __m512i v = _mm512_loadu_si512(x + b * ld + i);
            acc[0][b] = _mm512_dpbusd_epi32(acc[0][b], v, a0);
            acc[1][b] = _mm512_dpbusd_epi32(acc[1][b], v, a1);
            acc[2][b] = _mm512_dpbusd_epi32(acc[2][b], v, a2);
            acc[3][b] = _mm512_dpbusd_epi32(acc[3][b], v, a3);
        }
    }
    for (b = 0; b < NB; b++)
        for (j = 0; j < 4 && r + j < rows; j++)
            out[b * ldo + r + j] = fr_q_int8_value(_mm512_reduce_add_epi32(acc[j][b]), r + j, b,
                                                   sw, row_sum, sx);
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void fr_q_dots_int8_isa(const int8_t* w, ptrdiff_t ld, ptrdiff_t rows,
                               const uint8_t* x, ptrdiff_t nx, const FR_Q_INT8_ARGS,
                               float* out, ptrdiff_t ldo)
{
    ptrdiff_t r, b;
    for (r = 0; r < rows; r += 4) {
        for (b = 0; b + 4 <= nx; b += 4)
            fr_q_group_int8(w, ld, r, rows, x + b * ld, 4, sw, row_sum, sx + b,
                            out + b * ldo, ldo);
        for (; b + 2 <= nx; b += 2)
            fr_q_group_int8(w, ld, r, rows, x + b * ld, 2, sw, row_sum, sx + b,
                            out + b * ldo, ldo);
        for (; b < nx; b++)
            fr_q_group_int8(w, ld, r, rows, x + b * ld, 1, sw, row_sum, sx + b,
                            out + b * ldo, ldo);
    }
}
#endif

/* out[b*ldo + r] = sum_i W[r0 + r, i] * x[b, i] for r < rows, b < nx; x prepared by
 * fr_q_prepare with the weights' format and ld */
static void fr_q_product(const fr_qweights* q, ptrdiff_t r0, ptrdiff_t rows, const void* xq,
                         ptrdiff_t nx, float* out, ptrdiff_t ldo)
{
    ptrdiff_t ld = q->ld, elem = q->format == FR_Q_BF16 ? 2 : 1, b0, nb;
    ptrdiff_t block = FR_Q_BLOCK_BYTES / (ld * elem) > 4 ? FR_Q_BLOCK_BYTES / (ld * elem) : 4;
    int isa = fr_q_isa(q->format);
    if (q->format == FR_Q_BF16 && nx > FR_Q_BF16_DOT_ROWS) {
        /* x rounded, as float32 (fr_q_prepare); W's rows widened a few at a time into a
         * buffer of this call's own (threads share xq) */
        const uint16_t* w = (const uint16_t*)q->data + r0 * ld;
        const float* x = (const float*)xq;
        float* wide = (float*)malloc((size_t)(FR_Q_WIDEN_ROWS * ld) * sizeof(float));
        ptrdiff_t r, n, i;
        if (wide == NULL) {                     /* no memory: every output NaN, not garbage */
            for (r = 0; r < nx; r++)
                for (i = 0; i < rows; i++) out[r * ldo + i] = NAN;
            return;
        }
        for (r = 0; r < rows; r += FR_Q_WIDEN_ROWS) {
            n = rows - r < FR_Q_WIDEN_ROWS ? rows - r : FR_Q_WIDEN_ROWS;
            for (i = 0; i < n * ld; i++) wide[i] = fr_float_from_bf16(w[r * ld + i]);
            fr_rowdot_f32(wide, ld, n, ld, x, ld, nx, out + r, ldo);
        }
        free(wide);
        return;
    }
    for (b0 = 0; b0 < nx; b0 += block) {
        nb = nx - b0 < block ? nx - b0 : block;
        if (q->format == FR_Q_BF16) {
            const uint16_t* w = (const uint16_t*)q->data + r0 * ld;
            const uint16_t* x = (const uint16_t*)xq + b0 * ld;
#ifdef FR_Q_X86
            if (isa) {
                fr_q_dots_bf16_isa(w, ld, rows, x, nb, out + b0 * ldo, ldo);
                continue;
            }
#endif
            fr_q_dots_bf16_plain(w, ld, ld, rows, x, nb, out + b0 * ldo, ldo);
        } else {
            const int8_t* w = (const int8_t*)q->data + r0 * ld;
            const uint8_t* x = (const uint8_t*)xq + b0 * ld;
            const float* sx = (const float*)((const uint8_t*)xq + nx * ld) + b0;
#ifdef FR_Q_X86
            if (isa) {
                fr_q_dots_int8_isa(w, ld, rows, x, nb, q->scale + r0, q->row_sum + r0, sx,
                                   out + b0 * ldo, ldo);
                continue;
            }
#endif
            fr_q_dots_int8_plain(w, ld, rows, x, nb, q->scale + r0, q->row_sum + r0, sx,
                                 out + b0 * ldo, ldo);
        }
    }
}

#endif
