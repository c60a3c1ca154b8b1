/* Products with weights stored in bfloat16 or int8, for fastrnn.quantize (layers.pyx).
 *
 *   out[b*ldo + r] = sum_i W[r0 + r, i] * x[b, i]      r < rows, b < nx
 *
 * in two steps: fr_q_prepare rounds the rows of x to the weights' format once (into a scratch
 * buffer of fr_q_scratch_bytes), then fr_q_product multiplies any rows of W with them.
 *
 * bfloat16: the weights and x rounded to nearest even, NaN kept; every product of two bfloat16
 * numbers is exact in float32 and the sums are float32 (AVX-512 BF16's vdpbf16ps; AVX2's FMA
 * on the numbers widened in registers; a plain loop: each sums in its own order). layers.pyx
 * uses these only where reading the weights is the limit (FR_Q_BF16_DOT_ROWS,
 * FR_Q_BF16_INPUT_DOT_ROWS below; else widened weights on float32 kernels: fr_q_round_bf16,
 * fr_q_widen_bf16).
 * int8: weights symmetric per row, W[r, i] ~= scale[r] * q[r, i], q in [-127, 127]; each row
 * of x symmetric on its own, x[b, i] ~= sx[b] * p[b, i], sx[b] = max|x[b]| / 127, p rounded
 * to nearest even. The sum of q * p is exact in int32 (AVX-512 VNNI's vpdpbusd, which takes
 * unsigned bytes: p + 128, and 128 * sum_i q[r, i] taken off after; AVX2's vpmaddwd on both
 * widened to int16), and out = float(sum) * (scale[r] * sx[b]), so the VNNI path, the AVX2
 * one and the plain one agree to the bit.
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

/* The products' instruction paths. Each format takes the best the CPU has, at most
 * fr_q_max_path (lowered for tests and measurements): AVX-512 BF16's vdpbf16ps for bfloat16 and
 * AVX-512 VNNI's vpdpbusd for int8; else AVX2 with FMA (bfloat16 widened in registers, int8
 * through int16 pairs); else the plain loops. */
enum { FR_Q_PLAIN = 0, FR_Q_AVX2 = 1, FR_Q_AVX512 = 2 };
static int fr_q_max_path = FR_Q_AVX512;
static int fr_q_cpu = -1;   /* bit 0: AVX-512 BF16, 1: AVX-512 VNNI, 2: AVX2 and FMA; -1 unknown */

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
        if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) f |= 4;
#endif
        fr_q_cpu = f;
    }
    return fr_q_cpu;
}

/* the path products of `format` take here */
static inline int fr_q_path(int format)
{
    int f = fr_q_cpu_features();
    int avx512 = format == FR_Q_BF16 ? (f & 1) != 0 : (f & 2) != 0;
    if (format == FR_Q_NONE) return FR_Q_PLAIN;
    if (avx512 && fr_q_max_path >= FR_Q_AVX512) return FR_Q_AVX512;
    if ((f & 4) && fr_q_max_path >= FR_Q_AVX2) return FR_Q_AVX2;
    return FR_Q_PLAIN;
}

/* the most the products may use from now on; returns the old value */
static inline int fr_q_set_max_path(int path)
{
    int old = fr_q_max_path;
    fr_q_max_path = path < FR_Q_PLAIN ? FR_Q_PLAIN : path > FR_Q_AVX512 ? FR_Q_AVX512 : path;
    return old;
}

/* bfloat16 products over more rows of x than this run in layers.pyx on float32 kernels, with
 * x rounded (fr_q_round_bf16) and the weights widened (fr_q_widen_bf16): the same exact
 * products, summed in another order. vdpbf16ps does 32 products in about 2 cycles where two
 * FMA ports do 32 in 1, so it wins only where reading the weights is the limit (measured:
 * 1024 x 512 weights, 1 row of x: 15 us, float32 dot products 46-52 us; 4 rows: 68 us,
 * float32 121 us but float32 packed panels faster still; Intel Xeon with AVX-512 BF16) */
static ptrdiff_t fr_q_bf16_dot_rows = 4;     /* settable, for measuring (layers.pyx) */
#define FR_Q_BF16_DOT_ROWS fr_q_bf16_dot_rows
/* the same for a call's input product, whose x W_ih^T over T*B rows is one product: up to
 * 64 rows it ran faster on vdpbf16ps than widened (lstm-infer-512-b1, 25 rows: 1.38x the
 * float32 call against 1.15x; gru-infer-1024-b2, 50 rows: 1.22x against 1.10x; with 600
 * rows, lstm-infer-256-b4, 0.66x against 0.75x; Intel Xeon) */
static ptrdiff_t fr_q_bf16_input_dot_rows = 64;
#define FR_Q_BF16_INPUT_DOT_ROWS fr_q_bf16_input_dot_rows

static inline size_t fr_q_scratch_bytes(int format, ptrdiff_t ld, ptrdiff_t nx)
{
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

/* x (nx rows, ldx apart, k used) rounded to bfloat16, as float32, into out (rows ldo apart):
 * the operand of a product over many rows, run on float32 kernels against widened weights */
static void fr_q_round_bf16(const float* x, ptrdiff_t ldx, ptrdiff_t nx, ptrdiff_t k,
                            float* out, ptrdiff_t ldo)
{
    ptrdiff_t b, i;
    for (b = 0; b < nx; b++)
        for (i = 0; i < k; i++)
            out[b * ldo + i] = fr_float_from_bf16(fr_bf16_from_float(x[b * ldx + i]));
}

/* bfloat16 rows r0 .. r0+rows of q as float32 (the same numbers), rows ld apart */
static void fr_q_widen_bf16(const fr_qweights* q, ptrdiff_t r0, ptrdiff_t rows, float* out)
{
    const uint16_t* w = (const uint16_t*)q->data + r0 * q->ld;
    ptrdiff_t i;
    for (i = 0; i < rows * q->ld; i++) out[i] = fr_float_from_bf16(w[i]);
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

/* the 4 values of rows r .. r+3 (those below `rows`) of one row of out */
__attribute__((always_inline))
static inline void fr_q_store4(float* out, ptrdiff_t r, ptrdiff_t rows, __m128 v)
{
    if (r + 4 <= rows) {
        _mm_storeu_ps(out + r, v);
    } else {
        float tmp[4];
        ptrdiff_t j;
        _mm_storeu_ps(tmp, v);
        for (j = 0; r + j < rows; j++) out[r + j] = tmp[j];
    }
}

/* fr_q_int8_value of the int32 sums of rows r .. r+3 against one row of x, four at a time:
 * the same operations, so the same floats */
__attribute__((always_inline))
static inline void fr_q_int8_store4(float* out, ptrdiff_t r, ptrdiff_t rows, __m128i sums,
                                    const float* sw, const int32_t* row_sum, float sx)
{
    __m128i rs;
    __m128 scale;
    if (r + 4 <= rows) {
        rs = _mm_loadu_si128((const __m128i*)(row_sum + r));
        scale = _mm_loadu_ps(sw + r);
    } else {
        int32_t rs_tail[4] = {0, 0, 0, 0};
        float sw_tail[4] = {0, 0, 0, 0};
        ptrdiff_t j;
        for (j = 0; r + j < rows; j++) { rs_tail[j] = row_sum[r + j]; sw_tail[j] = sw[r + j]; }
        rs = _mm_loadu_si128((const __m128i*)rs_tail);
        scale = _mm_loadu_ps(sw_tail);
    }
    fr_q_store4(out, r, rows,
                _mm_mul_ps(_mm_cvtepi32_ps(_mm_sub_epi32(sums, _mm_slli_epi32(rs, 7))),
                           _mm_mul_ps(scale, _mm_set1_ps(sx))));
}

/* the four sums of a, b, c, d (16 lanes each) as one vector: with short rows (k = 128-256)
 * a reduction per sum cost more instructions than the products (perf: int8 bilstm-infer) */
__attribute__((target("avx512f,avx512bw"), always_inline))
static inline __m128i fr_q_sum4_epi32(__m512i a, __m512i b, __m512i c, __m512i d)
{
    __m256i a2 = _mm256_add_epi32(_mm512_castsi512_si256(a), _mm512_extracti64x4_epi64(a, 1));
    __m256i b2 = _mm256_add_epi32(_mm512_castsi512_si256(b), _mm512_extracti64x4_epi64(b, 1));
    __m256i c2 = _mm256_add_epi32(_mm512_castsi512_si256(c), _mm512_extracti64x4_epi64(c, 1));
    __m256i d2 = _mm256_add_epi32(_mm512_castsi512_si256(d), _mm512_extracti64x4_epi64(d, 1));
    __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a2, b2), _mm256_hadd_epi32(c2, d2));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* the upper 8 floats of v (AVX-512F alone: _mm512_extractf32x8_ps needs AVX-512DQ) */
__attribute__((target("avx512f"), always_inline))
static inline __m256 fr_q_high8(__m512 v)
{
    return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1));
}

__attribute__((target("avx512f,avx512bw"), always_inline))
static inline __m128 fr_q_sum4_ps(__m512 a, __m512 b, __m512 c, __m512 d)
{
    __m256 a2 = _mm256_add_ps(_mm512_castps512_ps256(a), fr_q_high8(a));
    __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(b), fr_q_high8(b));
    __m256 c2 = _mm256_add_ps(_mm512_castps512_ps256(c), fr_q_high8(c));
    __m256 d2 = _mm256_add_ps(_mm512_castps512_ps256(d), fr_q_high8(d));
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a2, b2), _mm256_hadd_ps(c2, d2));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

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
            acc[j][0] = _mm512_add_ps(acc[j][0], odd[j]);
        fr_q_store4(out, r, rows, fr_q_sum4_ps(acc[0][0], acc[1][0], acc[2][0], acc[3][0]));
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
        fr_q_store4(out + b * ldo, r, rows,
                    fr_q_sum4_ps(acc[0][b], acc[1][b], acc[2][b], acc[3][b]));
}

__attribute__((target("avx512f,avx512bw,avx512bf16")))
static void fr_q_dots_bf16_avx512(const uint16_t* w, ptrdiff_t ld, ptrdiff_t rows,
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
        fr_q_int8_store4(out + b * ldo, r, rows,
                         fr_q_sum4_epi32(acc[0][b], acc[1][b], acc[2][b], acc[3][b]),
                         sw, row_sum, sx[b]);
}

__attribute__((target("avx512f,avx512bw,avx512vnni")))
static void fr_q_dots_int8_avx512(const int8_t* w, ptrdiff_t ld, ptrdiff_t rows,
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

/* AVX2 with FMA: 16 registers of 8 lanes, so groups of 4 rows of W by 1 or 2 rows of x */

/* the four sums of a, b, c, d (8 lanes each) as one vector */
__attribute__((target("avx2,fma"), always_inline))
static inline __m128 fr_q_sum4_ps_avx2(__m256 a, __m256 b, __m256 c, __m256 d)
{
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

__attribute__((target("avx2,fma"), always_inline))
static inline __m128i fr_q_sum4_epi32_avx2(__m256i a, __m256i b, __m256i c, __m256i d)
{
    __m256i abcd = _mm256_hadd_epi32(_mm256_hadd_epi32(a, b), _mm256_hadd_epi32(c, d));
    return _mm_add_epi32(_mm256_castsi256_si128(abcd), _mm256_extracti128_si256(abcd, 1));
}

/* 16 bfloat16 numbers as two vectors of float32: the even ones (each 32-bit lane's low half,
 * shifted up) and the odd ones (its high half, the low bits cleared). w and x split alike, so
 * the products pair up: two ALU operations widen 16 numbers, where a load-and-convert per 8
 * would cost twice the instructions of the multiply-adds */
#define FR_Q_KEEP(v) __asm__("" : "+x"(v))      /* a loaded vector kept in a register */
#define FR_Q_BF16_EVEN(v) _mm256_castsi256_ps(_mm256_slli_epi32((v), 16))
#define FR_Q_BF16_ODD(v) _mm256_castsi256_ps(_mm256_and_si256((v), high))

__attribute__((target("avx2,fma"), always_inline))
static inline void fr_q_group_bf16_avx2(const uint16_t* w, ptrdiff_t ld, ptrdiff_t r,
                                        ptrdiff_t rows, const uint16_t* x, const int NB,
                                        float* out, ptrdiff_t ldo)
{
    FR_Q_ROWS(uint16_t, w, ld, r, rows)
    const __m256i high = _mm256_set1_epi32((int)0xffff0000u);
    __m256 acc[4][2], odd[4];
    ptrdiff_t i;
    int b, j;
    for (j = 0; j < 4; j++) {
        acc[j][0] = acc[j][1] = odd[j] = _mm256_setzero_ps();
    }
    if (NB == 1) {
        /* the odd terms in sums of their own: 8 chains of FMA to hide its latency */
        for (i = 0; i < ld; i += 16) {
            __m256i u = _mm256_loadu_si256((const __m256i*)(x + i));
            __m256 xe = FR_Q_BF16_EVEN(u), xo = FR_Q_BF16_ODD(u);
            __m256i v0 = _mm256_loadu_si256((const __m256i*)(w0 + i));
            __m256i v1 = _mm256_loadu_si256((const __m256i*)(w1 + i));
            __m256i v2 = _mm256_loadu_si256((const __m256i*)(w2 + i));
            __m256i v3 = _mm256_loadu_si256((const __m256i*)(w3 + i));
            acc[0][0] = _mm256_fmadd_ps(FR_Q_BF16_EVEN(v0), xe, acc[0][0]);
            acc[1][0] = _mm256_fmadd_ps(FR_Q_BF16_EVEN(v1), xe, acc[1][0]);
            acc[2][0] = _mm256_fmadd_ps(FR_Q_BF16_EVEN(v2), xe, acc[2][0]);
            acc[3][0] = _mm256_fmadd_ps(FR_Q_BF16_EVEN(v3), xe, acc[3][0]);
            odd[0] = _mm256_fmadd_ps(FR_Q_BF16_ODD(v0), xo, odd[0]);
            odd[1] = _mm256_fmadd_ps(FR_Q_BF16_ODD(v1), xo, odd[1]);
            odd[2] = _mm256_fmadd_ps(FR_Q_BF16_ODD(v2), xo, odd[2]);
            odd[3] = _mm256_fmadd_ps(FR_Q_BF16_ODD(v3), xo, odd[3]);
        }
        for (j = 0; j < 4; j++) acc[j][0] = _mm256_add_ps(acc[j][0], odd[j]);
    } else {
        /* two rows of x: one weight row at a time, each loaded once and kept in a register
         * (GCC 12 otherwise loaded each twice, as an operand of the shift and of the and, and
         * spilled accumulators: 23 GB/s of bfloat16 a core from L2, 37 so, AMD EPYC Zen 3); the
         * same multiply-adds in the same order */
        const uint16_t* wr[4] = {w0, w1, w2, w3};
        for (i = 0; i < ld; i += 16) {
            __m256i u = _mm256_loadu_si256((const __m256i*)(x + i));
            __m256i t = _mm256_loadu_si256((const __m256i*)(x + ld + i));
            __m256 ue, uo, te, to;
            FR_Q_KEEP(u);
            FR_Q_KEEP(t);
            ue = FR_Q_BF16_EVEN(u);
            uo = FR_Q_BF16_ODD(u);
            te = FR_Q_BF16_EVEN(t);
            to = FR_Q_BF16_ODD(t);
            for (j = 0; j < 4; j++) {
                __m256i v = _mm256_loadu_si256((const __m256i*)(wr[j] + i));
                __m256 e, o;
                FR_Q_KEEP(v);
                e = FR_Q_BF16_EVEN(v);
                o = FR_Q_BF16_ODD(v);
                acc[j][0] = _mm256_fmadd_ps(e, ue, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(e, te, acc[j][1]);
                acc[j][0] = _mm256_fmadd_ps(o, uo, acc[j][0]);
                acc[j][1] = _mm256_fmadd_ps(o, to, acc[j][1]);
            }
        }
    }
    for (b = 0; b < NB; b++)
        fr_q_store4(out + b * ldo, r, rows,
                    fr_q_sum4_ps_avx2(acc[0][b], acc[1][b], acc[2][b], acc[3][b]));
}
#undef FR_Q_BF16_EVEN
#undef FR_Q_BF16_ODD
#undef FR_Q_KEEP

__attribute__((target("avx2,fma")))
static void fr_q_dots_bf16_avx2(const uint16_t* w, ptrdiff_t ld, ptrdiff_t rows,
                                const uint16_t* x, ptrdiff_t nx, float* out, ptrdiff_t ldo)
{
    ptrdiff_t r, b;
    for (r = 0; r < rows; r += 4) {
        for (b = 0; b + 2 <= nx; b += 2)
            fr_q_group_bf16_avx2(w, ld, r, rows, x + b * ld, 2, out + b * ldo, ldo);
        for (; b < nx; b++)
            fr_q_group_bf16_avx2(w, ld, r, rows, x + b * ld, 1, out + b * ldo, ldo);
    }
}

/* int8: 16 bytes of each widened to int16 (x unsigned, W signed), vpmaddwd's pairs summed in
 * int32: exact (2 * 255 * 127 a pair), so the same sums as VNNI's and the plain loop's.
 * vpmaddubsw would take 32 bytes at once but saturates its int16 pairs (up to 64770) */
__attribute__((target("avx2,fma"), always_inline))
static inline void fr_q_group_int8_avx2(const int8_t* w, ptrdiff_t ld, ptrdiff_t r,
                                        ptrdiff_t rows, const uint8_t* x, const int NB,
                                        const FR_Q_INT8_ARGS, float* out, ptrdiff_t ldo)
{
    FR_Q_ROWS(int8_t, w, ld, r, rows)
    __m256i acc[4][2];
    ptrdiff_t i;
    int b, j;
    for (j = 0; j < 4; j++) acc[j][0] = acc[j][1] = _mm256_setzero_si256();
    if (NB == 2) {
        /* named sums: with the array GCC 12 kept one in memory, a store and a load on the
         * loop's critical path every step (one core of an AMD EPYC Zen 3, rows in L1: 18 ->
         * 33 GB/s of int8) */
        __m256i s00 = acc[0][0], s10 = s00, s20 = s00, s30 = s00, s01 = s00, s11 = s00,
                s21 = s00, s31 = s00;
        for (i = 0; i < ld; i += 16) {
            __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w0 + i)));
            __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w1 + i)));
            __m256i a2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w2 + i)));
            __m256i a3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w3 + i)));
            __m256i u = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(x + i)));
            __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(x + ld + i)));
            s00 = _mm256_add_epi32(s00, _mm256_madd_epi16(u, a0));
            s10 = _mm256_add_epi32(s10, _mm256_madd_epi16(u, a1));
            s20 = _mm256_add_epi32(s20, _mm256_madd_epi16(u, a2));
            s30 = _mm256_add_epi32(s30, _mm256_madd_epi16(u, a3));
            s01 = _mm256_add_epi32(s01, _mm256_madd_epi16(v, a0));
            s11 = _mm256_add_epi32(s11, _mm256_madd_epi16(v, a1));
            s21 = _mm256_add_epi32(s21, _mm256_madd_epi16(v, a2));
            s31 = _mm256_add_epi32(s31, _mm256_madd_epi16(v, a3));
        }
        acc[0][0] = s00; acc[1][0] = s10; acc[2][0] = s20; acc[3][0] = s30;
        acc[0][1] = s01; acc[1][1] = s11; acc[2][1] = s21; acc[3][1] = s31;
    } else
    for (i = 0; i < ld; i += 16) {
        __m256i a0 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w0 + i)));
        __m256i a1 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w1 + i)));
        __m256i a2 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w2 + i)));
        __m256i a3 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(w3 + i)));
        for (b = 0; b < NB; b++) {
            __m256i v = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(x + b * ld + i)));
            acc[0][b] = _mm256_add_epi32(acc[0][b], _mm256_madd_epi16(v, a0));
            acc[1][b] = _mm256_add_epi32(acc[1][b], _mm256_madd_epi16(v, a1));
            acc[2][b] = _mm256_add_epi32(acc[2][b], _mm256_madd_epi16(v, a2));
            acc[3][b] = _mm256_add_epi32(acc[3][b], _mm256_madd_epi16(v, a3));
        }
    }
    for (b = 0; b < NB; b++)
        fr_q_int8_store4(out + b * ldo, r, rows,
                         fr_q_sum4_epi32_avx2(acc[0][b], acc[1][b], acc[2][b], acc[3][b]),
                         sw, row_sum, sx[b]);
}

__attribute__((target("avx2,fma")))
static void fr_q_dots_int8_avx2(const int8_t* w, ptrdiff_t ld, ptrdiff_t rows,
                                const uint8_t* x, ptrdiff_t nx, const FR_Q_INT8_ARGS,
                                float* out, ptrdiff_t ldo)
{
    ptrdiff_t r, b;
    for (r = 0; r < rows; r += 4) {
        for (b = 0; b + 2 <= nx; b += 2)
            fr_q_group_int8_avx2(w, ld, r, rows, x + b * ld, 2, sw, row_sum, sx + b,
                                 out + b * ldo, ldo);
        for (; b < nx; b++)
            fr_q_group_int8_avx2(w, ld, r, rows, x + b * ld, 1, sw, row_sum, sx + b,
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
    int path = fr_q_path(q->format);
    for (b0 = 0; b0 < nx; b0 += block) {
        nb = nx - b0 < block ? nx - b0 : block;
        if (q->format == FR_Q_BF16) {
            const uint16_t* w = (const uint16_t*)q->data + r0 * ld;
            const uint16_t* x = (const uint16_t*)xq + b0 * ld;
#ifdef FR_Q_X86
            if (path == FR_Q_AVX512) {
                fr_q_dots_bf16_avx512(w, ld, rows, x, nb, out + b0 * ldo, ldo);
                continue;
            }
            if (path == FR_Q_AVX2) {
                fr_q_dots_bf16_avx2(w, ld, rows, x, nb, out + b0 * ldo, ldo);
                continue;
            }
#endif
            fr_q_dots_bf16_plain(w, ld, ld, rows, x, nb, out + b0 * ldo, ldo);
        } else {
            const int8_t* w = (const int8_t*)q->data + r0 * ld;
            const uint8_t* x = (const uint8_t*)xq + b0 * ld;
            const float* sx = (const float*)((const uint8_t*)xq + nx * ld) + b0;
#ifdef FR_Q_X86
            if (path == FR_Q_AVX512) {
                fr_q_dots_int8_avx512(w, ld, rows, x, nb, q->scale + r0, q->row_sum + r0, sx,
                                   out + b0 * ldo, ldo);
                continue;
            }
            if (path == FR_Q_AVX2) {
                fr_q_dots_int8_avx2(w, ld, rows, x, nb, q->scale + r0, q->row_sum + r0, sx,
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
