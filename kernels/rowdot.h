/* Dot products of weight rows with a few vectors, and an OpenMP barrier, for layers.pyx.
 *
 *   fr_rowdot_f32 / fr_rowdot_f64 (w, ldw, rows, k, x, ldx, nx, out, ldo):
 *       out[b*ldo + r] = sum_i w[r*ldw + i] * x[b*ldx + i]     for r < rows, b < nx
 *   i.e. out[:nx, :rows] = x[:nx, :k] @ w[:rows, :k].T, with every row of w read once for up to
 *   4 rows of x at a time (the small-batch recurrent product h W_hh^T: weight-bandwidth bound);
 *   for many rows of x (the input projection of all steps) a group of weight rows stays in L1
 *   while it meets every row of x in a block of x that stays in L2.
 *   Four weight rows are summed at once (4*nb independent accumulators): one accumulator chain
 *   would be bound by the FMA latency, not by the bandwidth.
 *
 * The extension is built without -ffast-math, so that NaN survives (for the CPU it is built on,
 * or for plain x86-64 with FASTRNN_PORTABLE=1).
 * A float reduction does not vectorise under those rules unless the compiler is allowed to
 * reorder it: `omp simd reduction` allows exactly that (each lane keeps a partial sum; no
 * assumption about NaN or infinity is made), and GCC's function multi-versioning compiles the
 * kernel for AVX-512, AVX2+FMA and baseline and picks one at load time from the CPU (ifunc).
 *
 *   fr_team_wait(team, threads): a barrier for the `threads` threads of a parallel region that
 *       share `team` (zeroed before the region), which yields the CPU when a partner is late.
 */
#ifndef FASTRNN_ROWDOT_H
#define FASTRNN_ROWDOT_H

#include <stddef.h>
#include <string.h>   /* also defines __GLIBC__ where the C library is glibc (ifunc) */

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__GLIBC__) \
    && (__GNUC__ >= 8)
#define FR_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FR_CLONES
#endif

#define FR_INLINE static inline __attribute__((always_inline))

/* rows of x taken together against each group of weight rows: about half of a 1 MiB L2 */
#define FR_X_BLOCK_BYTES (512 * 1024)

/* A barrier that spins briefly, then yields the CPU while it waits. GOMP's `omp barrier` spins
 * GOMP_SPINCOUNT pauses before it sleeps (10,000 as fastrnn sets it, about 0.2 ms); when the
 * scheduler has put two threads of a region on one CPU (seen on a 2-CPU VM after the process
 * had been idle for 0.3 s: it lasts for whole calls), the waiting thread spins that long on its
 * partner's CPU at every barrier, and a call took 5-6x its time (AMD EPYC, lstm-infer-512-b1:
 * 13 ms against 2.3). Yielding hands the CPU to the partner at once. The
 * counter and the generation are on their own cache lines; the last thread to arrive resets the
 * counter, then moves the generation on (release), which the others wait for (acquire), so
 * every thread's writes before the barrier are seen by every thread after it. */
#include <sched.h>
#define FR_TEAM_SPINS 200       /* pauses before yielding: a few us, a normal arrival skew */
typedef struct {
    long count;
    char pad0[64 - sizeof(long)];
    long generation;
    char pad1[64 - sizeof(long)];
} fr_team;

static inline void fr_team_wait(fr_team* team, int threads)
{
    long gen;
    int spins = 0;
    if (threads <= 1) return;
    gen = __atomic_load_n(&team->generation, __ATOMIC_ACQUIRE);
    if (__atomic_add_fetch(&team->count, 1, __ATOMIC_ACQ_REL) == threads) {
        __atomic_store_n(&team->count, 0, __ATOMIC_RELAXED);
        __atomic_store_n(&team->generation, gen + 1, __ATOMIC_RELEASE);
        return;
    }
    while (__atomic_load_n(&team->generation, __ATOMIC_ACQUIRE) == gen) {
        if (spins < FR_TEAM_SPINS) {
            spins++;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        } else {
            sched_yield();
        }
    }
}

/* One group of R weight rows (R = 4 or 1) times NB rows of x (NB = 1..4).  The sums are
 * written as separate scalars so that `omp simd reduction` gives each its own vector register. */
#define FR_ACC_DECL(T) T s00 = 0, s01 = 0, s02 = 0, s03 = 0, s10 = 0, s11 = 0, s12 = 0, s13 = 0, \
    s20 = 0, s21 = 0, s22 = 0, s23 = 0, s30 = 0, s31 = 0, s32 = 0, s33 = 0;

#define FR_DEFINE(T, SUF)                                                                         \
FR_INLINE void fr_rowdot4_##SUF(const T* restrict w, ptrdiff_t ldw, ptrdiff_t k,                 \
                                const T* restrict x, ptrdiff_t ldx, int nb,                      \
                                T* restrict out, ptrdiff_t ldo)                                  \
{                                                                                                \
    const T* w0 = w; const T* w1 = w + ldw; const T* w2 = w + 2 * ldw; const T* w3 = w + 3 * ldw; \
    const T* x0 = x; const T* x1 = x + ldx; const T* x2 = x + 2 * ldx; const T* x3 = x + 3 * ldx; \
    ptrdiff_t i;                                                                                 \
    FR_ACC_DECL(T)                                                                               \
    if (nb == 1) {                                                                               \
        _Pragma("omp simd reduction(+:s00,s10,s20,s30)")                                         \
        for (i = 0; i < k; i++) {                                                                \
            s00 += w0[i] * x0[i]; s10 += w1[i] * x0[i]; s20 += w2[i] * x0[i]; s30 += w3[i] * x0[i]; \
        }                                                                                        \
    } else if (nb == 2) {                                                                        \
        _Pragma("omp simd reduction(+:s00,s10,s20,s30,s01,s11,s21,s31)")                         \
        for (i = 0; i < k; i++) {                                                                \
            T a = x0[i], b = x1[i];                                                              \
            s00 += w0[i] * a; s10 += w1[i] * a; s20 += w2[i] * a; s30 += w3[i] * a;              \
            s01 += w0[i] * b; s11 += w1[i] * b; s21 += w2[i] * b; s31 += w3[i] * b;              \
        }                                                                                        \
    } else if (nb == 3) {                                                                        \
        _Pragma("omp simd reduction(+:s00,s10,s20,s30,s01,s11,s21,s31,s02,s12,s22,s32)")         \
        for (i = 0; i < k; i++) {                                                                \
            T a = x0[i], b = x1[i], c = x2[i];                                                   \
            s00 += w0[i] * a; s10 += w1[i] * a; s20 += w2[i] * a; s30 += w3[i] * a;              \
            s01 += w0[i] * b; s11 += w1[i] * b; s21 += w2[i] * b; s31 += w3[i] * b;              \
            s02 += w0[i] * c; s12 += w1[i] * c; s22 += w2[i] * c; s32 += w3[i] * c;              \
        }                                                                                        \
    } else {                                                                                     \
        _Pragma("omp simd reduction(+:s00,s10,s20,s30,s01,s11,s21,s31,s02,s12,s22,s32,s03,s13,s23,s33)") \
        for (i = 0; i < k; i++) {                                                                \
            T a = x0[i], b = x1[i], c = x2[i], d = x3[i];                                        \
            s00 += w0[i] * a; s10 += w1[i] * a; s20 += w2[i] * a; s30 += w3[i] * a;              \
            s01 += w0[i] * b; s11 += w1[i] * b; s21 += w2[i] * b; s31 += w3[i] * b;              \
            s02 += w0[i] * c; s12 += w1[i] * c; s22 += w2[i] * c; s32 += w3[i] * c;              \
            s03 += w0[i] * d; s13 += w1[i] * d; s23 += w2[i] * d; s33 += w3[i] * d;              \
        }                                                                                        \
    }                                                                                            \
    out[0] = s00; out[1] = s10; out[2] = s20; out[3] = s30;                                      \
    if (nb > 1) { out[ldo] = s01; out[ldo + 1] = s11; out[ldo + 2] = s21; out[ldo + 3] = s31; }  \
    if (nb > 2) { out[2 * ldo] = s02; out[2 * ldo + 1] = s12; out[2 * ldo + 2] = s22;            \
                  out[2 * ldo + 3] = s32; }                                                      \
    if (nb > 3) { out[3 * ldo] = s03; out[3 * ldo + 1] = s13; out[3 * ldo + 2] = s23;            \
                  out[3 * ldo + 3] = s33; }                                                      \
}                                                                                                \
                                                                                                 \
FR_INLINE void fr_rowdot1_##SUF(const T* restrict w, ptrdiff_t k,                                \
                                const T* restrict x, ptrdiff_t ldx, int nb,                      \
                                T* restrict out, ptrdiff_t ldo)                                  \
{                                                                                                \
    int b;                                                                                       \
    ptrdiff_t i;                                                                                 \
    for (b = 0; b < nb; b++) {                                                                   \
        const T* xb = x + b * ldx;                                                               \
        T s = 0;                                                                                 \
        _Pragma("omp simd reduction(+:s)")                                                       \
        for (i = 0; i < k; i++)                                                                  \
            s += w[i] * xb[i];                                                                   \
        out[b * ldo] = s;                                                                        \
    }                                                                                            \
}                                                                                                \
                                                                                                 \
static FR_CLONES void fr_rowdot_##SUF(const T* w, ptrdiff_t ldw, ptrdiff_t rows, ptrdiff_t k,   \
                                      const T* x, ptrdiff_t ldx, ptrdiff_t nx,                   \
                                      T* out, ptrdiff_t ldo)                                     \
{                                                                                                \
    /* many rows of x (the input projection of all steps): blocks of x that stay in L2, and   \
       within a block every group of 4 weight rows (in L1) meets all its rows */                 \
    ptrdiff_t blk = (ptrdiff_t)(FR_X_BLOCK_BYTES / (sizeof(T) * (size_t)(k > 0 ? k : 1)));      \
    ptrdiff_t c0, c1, b0, r;                                                                     \
    blk = blk < 4 ? 4 : blk / 4 * 4;                                                             \
    for (c0 = 0; c0 < nx; c0 = c1) {                                                             \
        c1 = nx - c0 < blk ? nx : c0 + blk;                                                      \
        for (r = 0; r + 4 <= rows; r += 4)                                                       \
            for (b0 = c0; b0 < c1; b0 += 4)                                                      \
                fr_rowdot4_##SUF(w + r * ldw, ldw, k, x + b0 * ldx, ldx,                         \
                                 (int)(c1 - b0 < 4 ? c1 - b0 : 4), out + b0 * ldo + r, ldo);     \
        for (; r < rows; r++)                                                                    \
            for (b0 = c0; b0 < c1; b0 += 4)                                                      \
                fr_rowdot1_##SUF(w + r * ldw, k, x + b0 * ldx, ldx,                              \
                                 (int)(c1 - b0 < 4 ? c1 - b0 : 4), out + b0 * ldo + r, ldo);     \
    }                                                                                            \
}

FR_DEFINE(float, fallback_f32)
FR_DEFINE(double, f64)

/* float32 with one or two rows of x (the recurrent product of B <= 2, one-step calls): AVX2+FMA
 * intrinsics, 8 (nb 1) or 4 (nb 2) weight rows at a time, whose sums are reduced together by a
 * tree of horizontal adds (9 instructions for 8 sums instead of about 6 each: for H = 128 the
 * separate reductions of `omp simd` cost a third of the kernel's time). */
#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define FR_HAVE_AVX2_KERNEL 1

/* The kernels' inner steps, one text for AVX2 and AVX-512 (LD: the ISA's load, full or masked;
   FMA: its multiply-add). 8 rows x one x row: a_r += w[r, off:] * v */
#define FR_R8_TERMS(LD, FMA, off) do {                                                          \
        a0 = FMA(LD(wr + (off)), v, a0);           a1 = FMA(LD(wr + ldw + (off)), v, a1);       \
        a2 = FMA(LD(wr + 2 * ldw + (off)), v, a2); a3 = FMA(LD(wr + 3 * ldw + (off)), v, a3);   \
        a4 = FMA(LD(wr + 4 * ldw + (off)), v, a4); a5 = FMA(LD(wr + 5 * ldw + (off)), v, a5);   \
        a6 = FMA(LD(wr + 6 * ldw + (off)), v, a6); a7 = FMA(LD(wr + 7 * ldw + (off)), v, a7);   \
    } while (0)
/* 4 rows x two x rows: a_r += w[r, off:] * u, b_r += w[r, off:] * v */
#define FR_R4X2_TERMS(LD, FMA, off) do {                                                        \
        u = LD(x0 + (off)); v = LD(x1 + (off));                                                 \
        q = LD(wr + (off));           a0 = FMA(q, u, a0); b0 = FMA(q, v, b0);                   \
        q = LD(wr + ldw + (off));     a1 = FMA(q, u, a1); b1 = FMA(q, v, b1);                   \
        q = LD(wr + 2 * ldw + (off)); a2 = FMA(q, u, a2); b2 = FMA(q, v, b2);                   \
        q = LD(wr + 3 * ldw + (off)); a3 = FMA(q, u, a3); b3 = FMA(q, v, b3);                   \
    } while (0)
#define FR_AVX2_LOAD(p) _mm256_loadu_ps(p)
/* a load kept in a register: in the 4 x 2 kernel each loaded vector meets two FMAs, and GCC 12
 * folds the load into both as a memory operand, 12 loads for 8 FMAs where 6 do (C
 * microbenchmark, one core of an AMD EPYC Zen 3, rows in L1, best of 12 runs: 65 GFLOP/s
 * folded, 99 kept, its peak). The AVX-512 kernel keeps its loads the same way (the same
 * folding, not measured: no AVX-512 on that CPU) */
#define FR_AVX2_LOAD_KEPT(p) \
    ({ __m256 kept_ = _mm256_loadu_ps(p); __asm__("" : "+x"(kept_)); kept_; })
#define FR_AVX2_MASKED(p) _mm256_maskload_ps((p), m)
#define FR_AVX512_LOAD(p) _mm512_loadu_ps(p)
#define FR_AVX512_LOAD_KEPT(p) \
    ({ __m512 kept_ = _mm512_loadu_ps(p); __asm__("" : "+v"(kept_)); kept_; })
#define FR_AVX512_MASKED(p) _mm512_maskz_loadu_ps(m, (p))

__attribute__((target("avx2,fma")))
static inline __m256 fr_mask_tail(ptrdiff_t left)
{
    /* lanes [0, left) set, left in [0, 8] */
    const __m256i idx = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)left), idx));
}

__attribute__((target("avx2,fma")))
static inline __m256 fr_sum8(__m256 a0, __m256 a1, __m256 a2, __m256 a3,
                             __m256 a4, __m256 a5, __m256 a6, __m256 a7)
{
    /* [sum(a0), ..., sum(a7)] */
    __m256 h0123 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
    __m256 h4567 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
    return _mm256_add_ps(_mm256_permute2f128_ps(h0123, h4567, 0x20),
                         _mm256_permute2f128_ps(h0123, h4567, 0x31));
}

__attribute__((target("avx2,fma")))
static inline void fr_avx2_r8x1(const float* wr, ptrdiff_t ldw, ptrdiff_t k, const float* x0,
                                float* out)
{
    /* out[0:8] = w[0:8, :k] @ x0[:k] */
    ptrdiff_t i, kv = k / 8 * 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0, v;
    for (i = 0; i < kv; i += 8) {
        v = _mm256_loadu_ps(x0 + i);
        FR_R8_TERMS(FR_AVX2_LOAD, _mm256_fmadd_ps, i);
    }
    if (kv < k) {
        __m256i m = _mm256_castps_si256(fr_mask_tail(k - kv));
        v = _mm256_maskload_ps(x0 + kv, m);
        FR_R8_TERMS(FR_AVX2_MASKED, _mm256_fmadd_ps, kv);
    }
    _mm256_storeu_ps(out, fr_sum8(a0, a1, a2, a3, a4, a5, a6, a7));
}

__attribute__((target("avx2,fma")))
static inline void fr_avx2_r4x2(const float* wr, ptrdiff_t ldw, ptrdiff_t k, const float* x0,
                                const float* x1, float* out0, float* out1)
{
    /* out0[0:4] = w[0:4, :k] @ x0[:k];  out1[0:4] = w[0:4, :k] @ x1[:k] */
    ptrdiff_t i, kv = k / 8 * 8;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
           b3 = a0, u, v, q, s;
    for (i = 0; i < kv; i += 8)
        FR_R4X2_TERMS(FR_AVX2_LOAD_KEPT, _mm256_fmadd_ps, i);
    if (kv < k) {
        __m256i m = _mm256_castps_si256(fr_mask_tail(k - kv));
        FR_R4X2_TERMS(FR_AVX2_MASKED, _mm256_fmadd_ps, kv);
    }
    s = fr_sum8(a0, a1, a2, a3, b0, b1, b2, b3);
    _mm_storeu_ps(out0, _mm256_castps256_ps128(s));
    _mm_storeu_ps(out1, _mm256_extractf128_ps(s, 1));
}

/* The same two kernels on 512-bit vectors (AVX-512F), where the CPU has them: half the loads
 * and multiply-adds per term (C microbenchmark, one core, an H = 128 LSTM step's rows from
 * L2, AMD EPYC: 4.4 -> 3.6 us; whole one-step calls on an Intel Xeon: within the noise,
 * bound by L2 bandwidth). Each 16-lane sum is folded to 8 lanes, then reduced by fr_sum8. */
#define FR_FOLD8(a) _mm256_add_ps(_mm512_castps512_ps256(a),                                    \
                                  _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)))

__attribute__((target("avx512f")))
static inline void fr_avx512_r8x1(const float* wr, ptrdiff_t ldw, ptrdiff_t k, const float* x0,
                                  float* out)
{
    /* out[0:8] = w[0:8, :k] @ x0[:k] */
    ptrdiff_t i, kv = k / 16 * 16;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0,
           a7 = a0, v;
    for (i = 0; i < kv; i += 16) {
        v = _mm512_loadu_ps(x0 + i);
        FR_R8_TERMS(FR_AVX512_LOAD, _mm512_fmadd_ps, i);
    }
    if (kv < k) {
        __mmask16 m = (__mmask16)((1u << (k - kv)) - 1);
        v = _mm512_maskz_loadu_ps(m, x0 + kv);
        FR_R8_TERMS(FR_AVX512_MASKED, _mm512_fmadd_ps, kv);
    }
    _mm256_storeu_ps(out, fr_sum8(FR_FOLD8(a0), FR_FOLD8(a1), FR_FOLD8(a2), FR_FOLD8(a3),
                                  FR_FOLD8(a4), FR_FOLD8(a5), FR_FOLD8(a6), FR_FOLD8(a7)));
}

__attribute__((target("avx512f")))
static inline void fr_avx512_r4x2(const float* wr, ptrdiff_t ldw, ptrdiff_t k, const float* x0,
                                  const float* x1, float* out0, float* out1)
{
    /* out0[0:4] = w[0:4, :k] @ x0[:k];  out1[0:4] = w[0:4, :k] @ x1[:k] */
    ptrdiff_t i, kv = k / 16 * 16;
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0,
           b3 = a0, u, v, q;
    __m256 s;
    for (i = 0; i < kv; i += 16)
        FR_R4X2_TERMS(FR_AVX512_LOAD_KEPT, _mm512_fmadd_ps, i);
    if (kv < k) {
        __mmask16 m = (__mmask16)((1u << (k - kv)) - 1);
        FR_R4X2_TERMS(FR_AVX512_MASKED, _mm512_fmadd_ps, kv);
    }
    s = fr_sum8(FR_FOLD8(a0), FR_FOLD8(a1), FR_FOLD8(a2), FR_FOLD8(a3),
                FR_FOLD8(b0), FR_FOLD8(b1), FR_FOLD8(b2), FR_FOLD8(b3));
    _mm_storeu_ps(out0, _mm256_castps256_ps128(s));
    _mm_storeu_ps(out1, _mm256_extractf128_ps(s, 1));
}

/* out[:nx, :rows] = x[:nx, :k] @ w[:rows, :k].T as fr_rowdot_f32: pairs of x rows against
   groups of 4 weight rows, a last odd x row against groups of 8; x in blocks that stay in L2, as
   the fallback does. One driver for the AVX2 and the AVX-512 kernels (ISA: their suffix). */
#define FR_ROWDOT_DRIVER(ISA, TARGET)                                                             \
__attribute__((target(TARGET)))                                                                  \
static void fr_rowdot_##ISA##_f32(const float* w, ptrdiff_t ldw, ptrdiff_t rows, ptrdiff_t k,   \
                                  const float* x, ptrdiff_t ldx, ptrdiff_t nx,                   \
                                  float* out, ptrdiff_t ldo)                                     \
{                                                                                                \
    ptrdiff_t blk = (ptrdiff_t)(FR_X_BLOCK_BYTES / (sizeof(float) * (size_t)(k > 0 ? k : 1)));  \
    ptrdiff_t c0, c1, b0, r, pairs_end;                                                          \
    blk = blk < 2 ? 2 : blk / 2 * 2;                                                             \
    for (c0 = 0; c0 < nx; c0 = c1) {                                                             \
        c1 = nx - c0 < blk ? nx : c0 + blk;                                                      \
        pairs_end = c0 + (c1 - c0) / 2 * 2;                                                      \
        for (r = 0; r + 4 <= rows; r += 4)                                                       \
            for (b0 = c0; b0 < pairs_end; b0 += 2)                                               \
                fr_##ISA##_r4x2(w + r * ldw, ldw, k, x + b0 * ldx, x + (b0 + 1) * ldx,           \
                                out + b0 * ldo + r, out + (b0 + 1) * ldo + r);                   \
        if (r < rows && pairs_end > c0)                                                          \
            fr_rowdot_fallback_f32(w + r * ldw, ldw, rows - r, k, x + c0 * ldx, ldx,             \
                                   pairs_end - c0, out + c0 * ldo + r, ldo);                     \
        if (pairs_end < c1) {   /* one row of x left */                                          \
            for (r = 0; r + 8 <= rows; r += 8)                                                   \
                fr_##ISA##_r8x1(w + r * ldw, ldw, k, x + pairs_end * ldx,                        \
                                out + pairs_end * ldo + r);                                      \
            if (r < rows)                                                                        \
                fr_rowdot_fallback_f32(w + r * ldw, ldw, rows - r, k, x + pairs_end * ldx, ldx,  \
                                       1, out + pairs_end * ldo + r, ldo);                       \
        }                                                                                        \
    }                                                                                            \
}

FR_ROWDOT_DRIVER(avx2, "avx2,fma")
FR_ROWDOT_DRIVER(avx512, "avx512f")
#else
#define FR_HAVE_AVX2_KERNEL 0
#endif

/* the kernel fr_rowdot_f32 takes: 2 AVX-512F, 1 AVX2 and FMA, 0 neither; -1 not yet known
   (benign race: every thread computes the same) */
static int fr_rowdot_isa = -1;

static int fr_rowdot_best_isa(void)
{
#if FR_HAVE_AVX2_KERNEL
    return __builtin_cpu_supports("avx512f")                                   ? 2
           : __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
#else
    return 0;
#endif
}

/* test hook: take at most kernel `isa` (as above; clipped to what the CPU has), -1 the best;
   returns the one taken */
static int fr_rowdot_limit_isa(int isa)
{
    int best = fr_rowdot_best_isa();
    fr_rowdot_isa = isa < 0 || isa > best ? best : isa;
    return fr_rowdot_isa;
}

static void fr_rowdot_f32(const float* w, ptrdiff_t ldw, ptrdiff_t rows, ptrdiff_t k,
                          const float* x, ptrdiff_t ldx, ptrdiff_t nx, float* out, ptrdiff_t ldo)
{
    if (fr_rowdot_isa < 0)
        fr_rowdot_isa = fr_rowdot_best_isa();
#if FR_HAVE_AVX2_KERNEL
    if (fr_rowdot_isa == 2) {
        fr_rowdot_avx512_f32(w, ldw, rows, k, x, ldx, nx, out, ldo);
        return;
    }
    if (fr_rowdot_isa == 1) {
        fr_rowdot_avx2_f32(w, ldw, rows, k, x, ldx, nx, out, ldo);
        return;
    }
#endif
    fr_rowdot_fallback_f32(w, ldw, rows, k, x, ldx, nx, out, ldo);
}

#endif
