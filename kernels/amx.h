/* float32 products on the AMX tile unit (Intel Sapphire Rapids and later), as accurate as
 * float32 arithmetic: each operand is split into three bfloat16 parts, a = a0 + a1 + a2
 * exactly (a0 the top 8 significant bits of a, a1 the next 8, a2 the last 8), and
 *
 *     a b ~= a0 b0 + a0 b1 + a1 b0 + a0 b2 + a1 b1 + a2 b0
 *
 * six bfloat16 products, each exact in float32, summed in float32 by the tile unit. What is
 * dropped (a1 b2 + a2 b1 + a2 b2, with |a1| < 2^-7 |a| and |a2| < 2^-15 |a|) is below 2^-21
 * |a b|, a few units in float32's last place: the result is within a few float32 rounding
 * errors of the exact one, like a float32 sum in another order (measured against a double
 * sum: 7.5e-8 to 9.5e-8 of sum |x w| at k = 512-1024, at most 4e-7 over random shapes and
 * scales, where a float32 multiply-add chain gave 1.8e-7 to 2.4e-7). This is the "bf16x6" scheme (Henry, Tang, Heinecke, "Leveraging the
 * bfloat16 artificial intelligence datatype for higher-precision computations", 2019).
 * The tile unit does 1024 bfloat16 flops a cycle against 64 float32 flops of two AVX-512 FMA
 * ports; six products leave 170, and the kernel below ran at 280-300 GFLOP/s a core (float32
 * flops) against 150-200 for panel.h's.
 *
 * The same interface as panel.h's f32 functions, with its own packed layout:
 *
 *   fr_amx_init(): 1 when the CPU has AMX-TILE and AMX-BF16 and the kernel lets this process
 *       use the tile registers (Linux, arch_prctl ARCH_REQ_XCOMP_PERM), else 0; checked once
 *   fr_amx_packed_size(rows, k): floats the packed copy of rows x k weights takes
 *   fr_amx_offset(r0, k): where the packed rows from r0 (a multiple of FR_AMX_PANEL) start
 *   fr_amx_pack(w, rs, cs, rows, k, packed): packs W[r, i] = w[r*rs + i*cs]
 *   fr_amx_product(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate):
 *       out[b*ldo + r] (+)= sum_i x[b*ldx + i*incx] * W[r, i]     for r < rows, b < nx
 *
 * Layout: panels of 32 weight rows (two tiles of 16 output columns); the k terms padded with
 * zeros to a multiple of 32 (kp). Panel p holds, for each part q and each of its two tiles t,
 * kp/2 tile rows of 64 bytes: tile row kk holds the pairs (W[r, 2kk], W[r, 2kk+1]) part q of
 * the 16 weight rows r of tile t (the pair-interleaved "VNNI" order the tile unit reads).
 * x is split per call, a block of rows at a time, into three row-major bfloat16 copies.
 *
 * NaN in x or W gives NaN; an infinity gives NaN too where float32 arithmetic gives +-inf
 * (its lower parts are 0, and inf * 0 = NaN): values that large are garbage either way.
 * The tile unit flushes bfloat16 subnormals to zero, so terms below 1e-33 or so may be lost.
 */
#ifndef FASTRNN_AMX_H
#define FASTRNN_AMX_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "panel.h"      /* fr_prefetch */

#define FR_AMX_PANEL 32          /* weight rows of a panel: two tiles of 16 output columns */
#define FR_AMX_X_BLOCK_BYTES (96 * 1024)   /* split rows of x taken together against every panel
                                              (under glibc's first mmap threshold: 192 KB blocks
                                              cost 1 MB of peak RSS in rnn-train-512) */

static inline ptrdiff_t fr_amx_kp(ptrdiff_t k)
{
    return (k + 31) / 32 * 32;
}

static inline ptrdiff_t fr_amx_packed_size(ptrdiff_t rows, ptrdiff_t k)
{
    /* 3 parts x 32 rows x kp bfloat16 = 48 kp floats a panel */
    return (rows + FR_AMX_PANEL - 1) / FR_AMX_PANEL * 48 * fr_amx_kp(k);
}

static inline ptrdiff_t fr_amx_offset(ptrdiff_t r0, ptrdiff_t k)
{
    return r0 / FR_AMX_PANEL * 48 * fr_amx_kp(k);
}

#if defined(__x86_64__) && defined(__linux__) && \
    ((defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11) || \
     (defined(__clang__) && __clang_major__ >= 12))
#define FR_AMX_BUILT 1
#else
#define FR_AMX_BUILT 0
#endif

#if FR_AMX_BUILT

#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#define FR_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,amx-tile,amx-bf16")))

static int fr_amx_state = -1;            /* -1: not checked yet */

static int fr_amx_init(void)
{
    unsigned int a, b, c, d;
    unsigned long perm = 0;
    if (fr_amx_state >= 0)
        return fr_amx_state;
    fr_amx_state = 0;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d))
        return 0;
    /* EDX bit 22: AMX-BF16, bit 24: AMX-TILE; EBX bits 16, 30: AVX512F, AVX512BW */
    if (!(d & (1u << 22)) || !(d & (1u << 24)) || !(b & (1u << 16)) || !(b & (1u << 30)))
        return 0;
    /* ARCH_REQ_XCOMP_PERM (0x1023) for XTILEDATA (state component 18); then
       ARCH_GET_XCOMP_PERM (0x1022) to see it granted */
    if (syscall(SYS_arch_prctl, 0x1023, 18) != 0)
        return 0;
    if (syscall(SYS_arch_prctl, 0x1022, &perm) != 0 || !(perm & (1ul << 18)))
        return 0;
    fr_amx_state = 1;
    return 1;
}

/* the tile configuration every product loads: palette 1, tiles 0-7 of 16 rows x 64 bytes */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} fr_amx_config;

FR_AMX_TARGET static inline void fr_amx_configure(void)
{
    fr_amx_config cfg;
    int t;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (t = 0; t < 8; t++) {
        cfg.colsb[t] = 64;
        cfg.rows[t] = 16;
    }
    _tile_loadconfig(&cfg);
}

/* 16 floats -> their three bfloat16 parts (a0 + a1 + a2 = a exactly: each cut off the top 8
   significant bits of what is left, and the subtraction of a cut is exact). Infinities and NaN
   keep only a0, a NaN's quiet bit set so that its cut cannot become an infinity. */
FR_AMX_TARGET static inline void fr_amx_split16(__m512 v, __m256i* p0, __m256i* p1, __m256i* p2)
{
    const __m512i top = _mm512_set1_epi32((int)0xffff0000u);
    const __m512i expo = _mm512_set1_epi32(0x7f800000);
    __m512i u = _mm512_castps_si512(v);
    __mmask16 special = _mm512_cmpeq_epi32_mask(_mm512_and_si512(u, expo), expo);
    __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                            expo);
    __m512i h0 = _mm512_and_si512(u, top);
    __m512 r1 = _mm512_sub_ps(v, _mm512_castsi512_ps(h0));
    __m512i h1 = _mm512_and_si512(_mm512_castps_si512(r1), top);
    __m512 r2 = _mm512_sub_ps(r1, _mm512_castsi512_ps(h1));
    __m512i h2 = _mm512_and_si512(_mm512_castps_si512(r2), top);
    h0 = _mm512_mask_or_epi32(h0, nan, h0, _mm512_set1_epi32(0x00400000));
    h1 = _mm512_maskz_mov_epi32((__mmask16)~special, h1);
    h2 = _mm512_maskz_mov_epi32((__mmask16)~special, h2);
    *p0 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(h0, 16));
    *p1 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(h1, 16));
    *p2 = _mm512_cvtepi32_epi16(_mm512_srli_epi32(h2, 16));
}

/* 32 floats (v0, then v1) -> their three bfloat16 parts, 32 each in order, as fr_amx_split16
   does 16 at a time but in about half the instructions when none is infinite or NaN: the last
   part is what is left after two cuts (8 significant bits at most: already a bfloat16 in its
   top half), and one two-source word shuffle takes the top halves of 32 lanes at once */
FR_AMX_TARGET static inline void fr_amx_split32(__m512 v0, __m512 v1, __m512i* p0, __m512i* p1,
                                                __m512i* p2)
{
    /* 0x99: quiet or signalling NaN, +inf or -inf */
    if (_mm512_fpclass_ps_mask(v0, 0x99) | _mm512_fpclass_ps_mask(v1, 0x99)) {
        __m256i a[3], b[3];
        fr_amx_split16(v0, &a[0], &a[1], &a[2]);
        fr_amx_split16(v1, &b[0], &b[1], &b[2]);
        *p0 = _mm512_inserti64x4(_mm512_castsi256_si512(a[0]), b[0], 1);
        *p1 = _mm512_inserti64x4(_mm512_castsi256_si512(a[1]), b[1], 1);
        *p2 = _mm512_inserti64x4(_mm512_castsi256_si512(a[2]), b[2], 1);
        return;
    }
    {
        const __m512 top = _mm512_castsi512_ps(_mm512_set1_epi32((int)0xffff0000u));
        /* word j of the result: the top half of lane j of v0 (j < 16), of v1 after */
        const __m512i odd = _mm512_set_epi16(
            63, 61, 59, 57, 55, 53, 51, 49, 47, 45, 43, 41, 39, 37, 35, 33,
            31, 29, 27, 25, 23, 21, 19, 17, 15, 13, 11, 9, 7, 5, 3, 1);
        __m512 a0 = _mm512_and_ps(v0, top), b0 = _mm512_and_ps(v1, top);
        __m512 ra = _mm512_sub_ps(v0, a0), rb = _mm512_sub_ps(v1, b0);
        __m512 a1 = _mm512_and_ps(ra, top), b1 = _mm512_and_ps(rb, top);
        __m512 a2 = _mm512_sub_ps(ra, a1), b2 = _mm512_sub_ps(rb, b1);
        *p0 = _mm512_permutex2var_epi16(_mm512_castps_si512(a0), odd, _mm512_castps_si512(b0));
        *p1 = _mm512_permutex2var_epi16(_mm512_castps_si512(a1), odd, _mm512_castps_si512(b1));
        *p2 = _mm512_permutex2var_epi16(_mm512_castps_si512(a2), odd, _mm512_castps_si512(b2));
    }
}

/* n (<= 16) floats from src, stride inc, zeros after them */
FR_AMX_TARGET static inline __m512 fr_amx_load16(const float* src, ptrdiff_t inc, ptrdiff_t n)
{
    __mmask16 m = n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
    if (inc == 1)
        return _mm512_maskz_loadu_ps(m, src);
    if (inc > 0 && inc <= 0x7fffffff / 16) {
        const __m512i idx = _mm512_mullo_epi32(
            _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
            _mm512_set1_epi32((int)inc));
        return _mm512_mask_i32gather_ps(_mm512_setzero_ps(), m, idx, src, 4);
    }
    {
        float tmp[16];
        ptrdiff_t j;
        for (j = 0; j < 16; j++)
            tmp[j] = j < n ? src[j * inc] : 0.0f;
        return _mm512_loadu_ps(tmp);
    }
}

/* r[j] := the column j of the 16 x 16 matrix of 32-bit lanes whose row i is r[i] */
FR_AMX_TARGET static inline void fr_amx_transpose16(__m512i r[16])
{
    __m512i t[16], u[16];
    int i, c;
    for (i = 0; i < 8; i++) {     /* 128-bit block b: (r2i[4b], r2i+1[4b], r2i[4b+1], ...) */
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (i = 0; i < 4; i++) {     /* u[4i + c], block b: rows 4i .. 4i+3 of column 4b + c */
        u[4 * i + 0] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        u[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        u[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (c = 0; c < 4; c++) {     /* column 4b + c: block b of u[c], u[4+c], u[8+c], u[12+c] */
        __m512i p0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
        __m512i p1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
        __m512i q0 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
        __m512i q1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
        r[0 + c] = _mm512_shuffle_i32x4(p0, q0, 0x88);
        r[4 + c] = _mm512_shuffle_i32x4(p0, q0, 0xdd);
        r[8 + c] = _mm512_shuffle_i32x4(p1, q1, 0x88);
        r[12 + c] = _mm512_shuffle_i32x4(p1, q1, 0xdd);
    }
}

/* fr_amx_split_x for x = the columns of a row-major matrix (ldx = 1: the weight gradients'
   d^T, x[b, i] = x[i*incx + b]), where a row of the tile is a column of the source: 32 terms
   i of the tile's 16 rows b are read as 32 runs of 64 bytes (the next 32 fetched ahead), split,
   interleaved in pairs of terms (32 bits a pair, 16 pairs a vector) and transposed in
   registers. (Gathering each row of the tile instead took twice as long.) */
FR_AMX_TARGET static void fr_amx_split_xt(const float* x, ptrdiff_t incx, ptrdiff_t k,
                                          ptrdiff_t c0, ptrdiff_t c1, uint16_t* buf)
{
    const ptrdiff_t kp = fr_amx_kp(k);
    const ptrdiff_t tiles = (c1 - c0 + 15) / 16;
    const __m512i pairs = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    __m512i P[3][16];
    __m256i a[3], b[3];
    ptrdiff_t m, b0, nb, i, j, i0;
    int q;
    for (m = 0; m < tiles; m++) {
        uint16_t* tile = buf + m * 3 * 16 * kp;
        b0 = c0 + m * 16;
        nb = c1 - b0 < 16 ? c1 - b0 : 16;
        for (i = 0; i < kp; i += 32) {
            for (j = 0; j < 16; j++) {
                __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
                i0 = i + 2 * j;
                if (i0 + 33 < k) {
                    fr_prefetch(x + (i0 + 32) * incx + b0, 64);
                    fr_prefetch(x + (i0 + 33) * incx + b0, 64);
                }
                if (i0 < k)
                    v0 = fr_amx_load16(x + i0 * incx + b0, 1, nb);
                if (i0 + 1 < k)
                    v1 = fr_amx_load16(x + (i0 + 1) * incx + b0, 1, nb);
                fr_amx_split16(v0, &a[0], &a[1], &a[2]);
                fr_amx_split16(v1, &b[0], &b[1], &b[2]);
                for (q = 0; q < 3; q++)       /* lane b: the pair (term i0, term i0+1) of row b */
                    P[q][j] = _mm512_permutex2var_epi16(_mm512_castsi256_si512(a[q]), pairs,
                                                        _mm512_castsi256_si512(b[q]));
            }
            for (q = 0; q < 3; q++) {
                fr_amx_transpose16(P[q]);     /* P[q][b]: row b's pairs, terms i .. i+31 */
                for (j = 0; j < 16; j++)
                    _mm512_storeu_si512(tile + (q * 16 + j) * kp + i, P[q][j]);
            }
        }
    }
}

/* rows c0 .. c1 of x, x[b, i] = x[b*ldx + i*incx], split into buf: tiles of 16 rows (rows past
   c1 zero), tile m holding parts q = 0, 1, 2 as 16 rows of kp bfloat16 each (zeros past k):
   buf[((m*3 + q)*16 + row)*kp + i] */
FR_AMX_TARGET static void fr_amx_split_x(const float* x, ptrdiff_t ldx, ptrdiff_t incx,
                                         ptrdiff_t k, ptrdiff_t c0, ptrdiff_t c1, uint16_t* buf)
{
    const ptrdiff_t kp = fr_amx_kp(k);
    const ptrdiff_t tiles = (c1 - c0 + 15) / 16;
    ptrdiff_t b0, nb, i, m, row;
    __m512i p[3];
    int q;
    if (ldx == 1 && incx != 1) {
        fr_amx_split_xt(x, incx, k, c0, c1, buf);
        return;
    }
    for (m = 0; m < tiles; m++) {
        uint16_t* tile = buf + m * 3 * 16 * kp;
        b0 = c0 + m * 16;
        nb = c1 - b0 < 16 ? c1 - b0 : 16;
        for (i = 0; i < kp; i += 32) {
            const ptrdiff_t ni = k - i < 16 ? (k - i > 0 ? k - i : 0) : 16;
            const ptrdiff_t ni1 = k - i - 16 < 16 ? (k - i - 16 > 0 ? k - i - 16 : 0) : 16;
            for (row = 0; row < 16; row++) {
                const float* src = x + (b0 + row) * ldx + i * incx;
                __m512 v0 = row < nb && ni > 0 ? fr_amx_load16(src, incx, ni)
                                               : _mm512_setzero_ps();
                __m512 v1 = row < nb && ni1 > 0 ? fr_amx_load16(src + 16 * incx, incx, ni1)
                                                : _mm512_setzero_ps();
                fr_amx_split32(v0, v1, &p[0], &p[1], &p[2]);
                for (q = 0; q < 3; q++)
                    _mm512_storeu_si512(tile + (q * 16 + row) * kp + i, p[q]);
            }
        }
    }
}

/* fr_amx_pack for W's rows contiguous (cs = 1: the rows of a row-major matrix): 32 terms of
   each of a tile's 16 weight rows are read as two runs of 64 bytes, split (the bfloat16 parts
   of a row then hold its pairs of terms in order, 32 bits a pair) and transposed in registers,
   so that row kk of the tile holds pair kk of every weight row. (Gathering each tile row, 16
   floats a row apart, packed 6 GB/s: a third of small-batch inference's input projection.) */
FR_AMX_TARGET static void fr_amx_pack_rows(const float* w, ptrdiff_t rs, ptrdiff_t rows,
                                           ptrdiff_t k, float* packed)
{
    const ptrdiff_t kp = fr_amx_kp(k);
    __m512i P[3][16];
    ptrdiff_t r0, i, n;
    int r, q;
    for (r0 = 0; r0 < rows; r0 += 16) {
        /* tile of rows r0 .. r0+15, part q: panel + (q*2 + t) * 16 * kp, row kk at + kk * 32 */
        uint16_t* tile = (uint16_t*)packed + r0 / FR_AMX_PANEL * 3 * FR_AMX_PANEL * kp
                         + (r0 % FR_AMX_PANEL) * kp;
        for (i = 0; i < kp; i += 32) {
            n = k - i;                       /* terms left in each row (<= 0: padding) */
            for (r = 0; r < 16; r++) {
                __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
                if (r0 + r < rows && n > 0) {
                    const float* src = w + (r0 + r) * rs + i;
                    v0 = fr_amx_load16(src, 1, n);
                    if (n > 16)
                        v1 = fr_amx_load16(src + 16, 1, n - 16);
                }
                /* lane kk of each part: the pair (term i+2kk, i+2kk+1) */
                fr_amx_split32(v0, v1, &P[0][r], &P[1][r], &P[2][r]);
            }
            for (q = 0; q < 3; q++) {
                fr_amx_transpose16(P[q]);     /* P[q][kk]: lane r = pair kk of row r0 + r */
                for (r = 0; r < 16; r++)
                    _mm512_storeu_si512(tile + q * 2 * 16 * kp + (i / 2 + r) * 32, P[q][r]);
            }
        }
    }
    /* a panel's second tile when rows end in its first: zeros */
    if (rows % FR_AMX_PANEL > 0 && rows % FR_AMX_PANEL <= 16)
        for (q = 0; q < 3; q++)
            memset((uint16_t*)packed + (rows / FR_AMX_PANEL) * 3 * FR_AMX_PANEL * kp
                       + (q * 2 + 1) * 16 * kp,
                   0, (size_t)16 * kp * sizeof(uint16_t));
}

/* pack W[r, i] = w[r*rs + i*cs], r < rows, i < k (layout above). A tile row takes terms 2kk
   and 2kk+1 of 16 weight rows, split and interleaved; the tiles of up to 4 panels are filled
   together when rs = 1 (the columns of a row-major matrix), so that each term is one read of
   up to 512 contiguous bytes rather than 64 bytes a row apart (the prefetcher lost those) */
FR_AMX_TARGET static void fr_amx_pack(const float* w, ptrdiff_t rs, ptrdiff_t cs,
                                      ptrdiff_t rows, ptrdiff_t k, float* packed)
{
    const ptrdiff_t kp = fr_amx_kp(k);
    if (cs == 1 && rs != 1) {
        fr_amx_pack_rows(w, rs, rows, k, packed);
        return;
    }
    /* 16-bit interleave of two 16-lane vectors: the pairs (a[j], b[j]) in order of j */
    const __m512i pairs = _mm512_set_epi16(
        47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    ptrdiff_t p0, r0, kk, nr;
    __m256i a[3], b[3];
    int q;
    /* rows gathered (cs = 1, rs = a row apart): a panel at a time, its 32 rows' lines in L1 */
    const ptrdiff_t span = (rs == 1 ? 4 : 1) * FR_AMX_PANEL;
    for (p0 = 0; p0 < rows; p0 += span) {
        const ptrdiff_t p1 = rows - p0 < span ? rows : p0 + span;
        const ptrdiff_t tile_end = p0 + (p1 - p0 + FR_AMX_PANEL - 1) / FR_AMX_PANEL * FR_AMX_PANEL;
        for (kk = 0; kk < kp / 2; kk++) {
            const ptrdiff_t i = 2 * kk;
            for (r0 = p0; r0 < tile_end; r0 += 16) {
                /* tile t of part q of the panel: panel + (q*2 + t) * 16 * kp, row kk at + kk * 32 */
                uint16_t* tile = (uint16_t*)packed + r0 / FR_AMX_PANEL * 3 * FR_AMX_PANEL * kp
                                 + (r0 % FR_AMX_PANEL) * kp + kk * 32;
                __m512 v0 = _mm512_setzero_ps(), v1 = _mm512_setzero_ps();
                nr = p1 - r0 < 16 ? p1 - r0 : 16;
                if (nr > 0 && i < k)
                    v0 = fr_amx_load16(w + r0 * rs + i * cs, rs, nr);
                if (nr > 0 && i + 1 < k)
                    v1 = fr_amx_load16(w + r0 * rs + (i + 1) * cs, rs, nr);
                fr_amx_split16(v0, &a[0], &a[1], &a[2]);
                fr_amx_split16(v1, &b[0], &b[1], &b[2]);
                for (q = 0; q < 3; q++)
                    _mm512_storeu_si512(tile + q * 2 * 16 * kp,
                                        _mm512_permutex2var_epi16(_mm512_castsi256_si512(a[q]),
                                                                  pairs,
                                                                  _mm512_castsi256_si512(b[q])));
            }
        }
    }
}

/* one 16 x 16 float tile of out from tile register `C` (a constant), rows b < nb and columns
   j < nc valid: stored in place when whole, else through a buffer */
#define FR_AMX_STORE(C, o, ldo, nb, nc, accumulate)                                           \
    do {                                                                                       \
        if ((nb) == 16 && (nc) == 16 && !(accumulate)) {                                       \
            _tile_stored(C, (o), (ldo) * 4);                                                   \
        } else {                                                                               \
            float tmp_[16 * 16];                                                               \
            ptrdiff_t b_, j_;                                                                  \
            _tile_stored(C, tmp_, 64);                                                         \
            for (b_ = 0; b_ < (nb); b_++)                                                      \
                for (j_ = 0; j_ < (nc); j_++)                                                  \
                    (o)[b_ * (ldo) + j_] = (accumulate) ? (o)[b_ * (ldo) + j_] + tmp_[b_ * 16 + j_] \
                                                        : tmp_[b_ * 16 + j_];                  \
        }                                                                                      \
    } while (0)

/* the six part products, parts loaded in an order that reuses a loaded tile: A tiles in
   registers 4 (and 5), B tiles in 6, 7; sums in 0-3 */
#define FR_AMX_LA2(q) do { _tile_loadd(4, a + (q) * 16 * kp + i, kp * 2);                      \
                           _tile_loadd(5, a + (3 + (q)) * 16 * kp + i, kp * 2); } while (0)
#define FR_AMX_LA1(q) _tile_loadd(4, a + (q) * 16 * kp + i, kp * 2)
#define FR_AMX_LB(q) do { _tile_loadd(6, w + (q) * 32 * kp + i * 16, 64);                      \
                          _tile_loadd(7, w + ((q) * 2 + 1) * 16 * kp + i * 16, 64); } while (0)
#define FR_AMX_DP4 do { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7);                      \
                        _tile_dpbf16ps(2, 5, 6); _tile_dpbf16ps(3, 5, 7); } while (0)
#define FR_AMX_DP2 do { _tile_dpbf16ps(0, 4, 6); _tile_dpbf16ps(1, 4, 7); } while (0)

/* out[b*ldo + r] = 0 (or left as it is, accumulate) for an empty sum (k = 0) */
static inline void fr_amx_no_terms(ptrdiff_t rows, ptrdiff_t nx, float* out, ptrdiff_t ldo,
                                   int accumulate)
{
    ptrdiff_t b;
    if (!accumulate)
        for (b = 0; b < nx; b++)
            memset(out + b * ldo, 0, (size_t)rows * sizeof(float));
}

/* valid columns of tile t (0 or 1) of the panel of rows from p */
static inline ptrdiff_t fr_amx_panel_cols(ptrdiff_t rows, ptrdiff_t p, int t)
{
    ptrdiff_t left = rows - p - 16 * t;
    return left < 0 ? 0 : (left < 16 ? left : 16);
}

/* out[b*ldo + j] (+)= x[b] . W[p + j] for the rows b = c0 .. c1-1 of x, split into buf
   (tiles of 16 rows from c0, fr_amx_split_x), and the up to 32 weight rows p + j of one packed
   panel w (nc0, nc1 of them in its two tiles); the tile configuration loaded */
FR_AMX_TARGET static void fr_amx_panel_times_x(const uint16_t* w, ptrdiff_t kp, ptrdiff_t nc0,
                                               ptrdiff_t nc1, const uint16_t* buf,
                                               ptrdiff_t c0, ptrdiff_t c1, float* out,
                                               ptrdiff_t ldo, ptrdiff_t p, int accumulate)
{
    const ptrdiff_t tiles = (c1 - c0 + 15) / 16;
    ptrdiff_t m, i, nb0, nb1;
    for (m = 0; m < tiles; m += 2) {
        const uint16_t* a = buf + m * 3 * 16 * kp;
        float* o = out + (c0 + m * 16) * ldo + p;
        /* whole tiles added to out in place (loaded into the sums, stored back) */
        int in_place;
        nb0 = c1 - (c0 + m * 16) < 16 ? c1 - (c0 + m * 16) : 16;
        if (m + 1 < tiles) {
            nb1 = c1 - (c0 + m * 16 + 16) < 16 ? c1 - (c0 + m * 16 + 16) : 16;
            in_place = accumulate && nb0 == 16 && nb1 == 16 && nc0 == 16 && nc1 == 16;
            if (in_place) {
                _tile_loadd(0, o, ldo * 4);
                _tile_loadd(1, o + 16, ldo * 4);
                _tile_loadd(2, o + 16 * ldo, ldo * 4);
                _tile_loadd(3, o + 16 * ldo + 16, ldo * 4);
            } else {
                _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            }
            for (i = 0; i < kp; i += 32) {
                FR_AMX_LA2(2); FR_AMX_LB(0); FR_AMX_DP4;   /* a2 b0 */
                FR_AMX_LA2(1); FR_AMX_DP4;                 /* a1 b0 */
                FR_AMX_LB(1); FR_AMX_DP4;                  /* a1 b1 */
                FR_AMX_LA2(0); FR_AMX_DP4;                 /* a0 b1 */
                FR_AMX_LB(2); FR_AMX_DP4;                  /* a0 b2 */
                FR_AMX_LB(0); FR_AMX_DP4;                  /* a0 b0 */
            }
            if (in_place) {
                _tile_stored(0, o, ldo * 4);
                _tile_stored(1, o + 16, ldo * 4);
                _tile_stored(2, o + 16 * ldo, ldo * 4);
                _tile_stored(3, o + 16 * ldo + 16, ldo * 4);
            } else {
                FR_AMX_STORE(0, o, ldo, nb0, nc0, accumulate);
                if (nc1 > 0)
                    FR_AMX_STORE(1, o + 16, ldo, nb0, nc1, accumulate);
                FR_AMX_STORE(2, o + 16 * ldo, ldo, nb1, nc0, accumulate);
                if (nc1 > 0)
                    FR_AMX_STORE(3, o + 16 * ldo + 16, ldo, nb1, nc1, accumulate);
            }
        } else {
            in_place = accumulate && nb0 == 16 && nc0 == 16 && nc1 == 16;
            if (in_place) {
                _tile_loadd(0, o, ldo * 4);
                _tile_loadd(1, o + 16, ldo * 4);
            } else {
                _tile_zero(0); _tile_zero(1);
            }
            for (i = 0; i < kp; i += 32) {
                FR_AMX_LA1(2); FR_AMX_LB(0); FR_AMX_DP2;
                FR_AMX_LA1(1); FR_AMX_DP2;
                FR_AMX_LB(1); FR_AMX_DP2;
                FR_AMX_LA1(0); FR_AMX_DP2;
                FR_AMX_LB(2); FR_AMX_DP2;
                FR_AMX_LB(0); FR_AMX_DP2;
            }
            if (in_place) {
                _tile_stored(0, o, ldo * 4);
                _tile_stored(1, o + 16, ldo * 4);
            } else {
                FR_AMX_STORE(0, o, ldo, nb0, nc0, accumulate);
                if (nc1 > 0)
                    FR_AMX_STORE(1, o + 16, ldo, nb0, nc1, accumulate);
            }
        }
    }
}

FR_AMX_TARGET static void fr_amx_product(const float* packed, ptrdiff_t rows, ptrdiff_t k,
                                         const float* x, ptrdiff_t ldx, ptrdiff_t incx,
                                         ptrdiff_t nx, float* out, ptrdiff_t ldo, int accumulate)
{
    const ptrdiff_t kp = fr_amx_kp(k);
    const uint16_t* wp = (const uint16_t*)packed;
    ptrdiff_t blk = FR_AMX_X_BLOCK_BYTES / (6 * kp) / 32 * 32;
    ptrdiff_t c0, c1, p, i;
    uint16_t* buf;
    if (nx <= 0 || rows <= 0)
        return;
    if (k <= 0) {
        fr_amx_no_terms(rows, nx, out, ldo, accumulate);
        return;
    }
    blk = blk < 32 ? 32 : blk;
    if (blk > (nx + 15) / 16 * 16)
        blk = (nx + 15) / 16 * 16;
    buf = (uint16_t*)aligned_alloc(64, (size_t)(blk * 3 * kp) * sizeof(uint16_t));
    if (buf == NULL) {
        /* no memory for the split copy: the slow exact-enough way, W rebuilt from its parts */
        ptrdiff_t b, r;
        for (b = 0; b < nx; b++)
            for (r = 0; r < rows; r++) {
                const uint16_t* wt = wp + fr_amx_offset(r, k) * 2 + (r % 32) / 16 * 16 * kp;
                float s = 0;
                for (i = 0; i < k; i++) {
                    float wv = 0;
                    int q;
                    for (q = 0; q < 3; q++) {
                        uint32_t u = (uint32_t)wt[q * 32 * kp + (i / 2) * 32 + (r % 16) * 2 + i % 2] << 16;
                        float f;
                        memcpy(&f, &u, 4);
                        wv += f;
                    }
                    s += x[b * ldx + i * incx] * wv;
                }
                out[b * ldo + r] = accumulate ? out[b * ldo + r] + s : s;
            }
        return;
    }
    fr_amx_configure();
    for (c0 = 0; c0 < nx; c0 = c1) {
        c1 = nx - c0 < blk ? nx : c0 + blk;
        fr_amx_split_x(x, ldx, incx, k, c0, c1, buf);
        for (p = 0; p < rows; p += FR_AMX_PANEL)
            fr_amx_panel_times_x(wp + fr_amx_offset(p, k) * 2, kp, fr_amx_panel_cols(rows, p, 0),
                                 fr_amx_panel_cols(rows, p, 1), buf, c0, c1, out, ldo, p,
                                 accumulate);
    }
    _tile_release();
    free(buf);
}

#else  /* no AMX in this build: never available, the functions never called */

static int fr_amx_init(void) { return 0; }
static void fr_amx_pack(const float* w, ptrdiff_t rs, ptrdiff_t cs, ptrdiff_t rows, ptrdiff_t k,
                        float* packed)
{
    (void)w; (void)rs; (void)cs; (void)rows; (void)k; (void)packed;
}
static void fr_amx_product(const float* packed, ptrdiff_t rows, ptrdiff_t k, const float* x,
                           ptrdiff_t ldx, ptrdiff_t incx, ptrdiff_t nx, float* out,
                           ptrdiff_t ldo, int accumulate)
{
    (void)packed; (void)rows; (void)k; (void)x; (void)ldx; (void)incx; (void)nx; (void)out;
    (void)ldo; (void)accumulate;
}

#endif
#endif
