/* Products with weight rows packed once per call, for layers.pyx (the unit-split loop).
 *
 *   fr_packed_size_SUF(rows, k): elements the packed copy of rows x k weights takes
 *   fr_pack_SUF(w, rs, cs, rows, k, packed): packs W[r, i] = w[r*rs + i*cs], r < rows, i < k
 *       (rs = ldw, cs = 1: the rows of a row-major matrix; rs = 1, cs = ldw: its columns)
 *   fr_packed_product_SUF(packed, rows, k, x, ldx, incx, nx, out, ldo, accumulate):
 *       out[b*ldo + r] (+)= sum_i x[b*ldx + i*incx] * W[r, i]     for r < rows, b < nx
 *       (incx = 1: the rows of x; ldx = 1, incx = ldx': the columns of a row-major x, which
 *       the product copies block by block into micro-panels, one contiguous stream per tile)
 *   (SUF: f32 or f64) -- with rs = ldw, cs = 1 the same product as fr_rowdot_* in rowdot.h;
 *   accumulate != 0 adds the sums to out, else out is overwritten.
 *
 * Layout: panels of FR_NR rows; panel p is a (k, FR_NR) block, packed[p*FR_NR*k + i*FR_NR + j] =
 * W[p*FR_NR + j, i], the last panel padded with zeros. A product reads a panel row by
 * row (contiguous, prefetch-friendly) and keeps MR x FR_NR sums in vector registers for MR rows
 * of x: each step of i is two vector loads, MR broadcasts and 2*MR multiply-adds, with no
 * horizontal sums (the dot-product form of rowdot.h needs one per output and twice the loads).
 * Measured in C on a 2-FMA-port AVX-512 core: 160-170 GFLOP/s at 4-16 rows of x against 90-95
 * for rowdot. The loops are plain GNU C vector code: the compiler picks the instructions for the
 * build's target (-march=native: AVX-512 or AVX2); nothing reorders a sum (NaN survives).
 *
 * Every row's sum runs over i in order, one multiply-add per term, so results do not depend on
 * the thread count or on how the rows of x are grouped.
 */
#ifndef FASTRNN_PANEL_H
#define FASTRNN_PANEL_H

#include <stddef.h>
#include <stdlib.h>
#include <string.h>

/* one vector register; FR_MR_MAX rows of x at a time use 2*FR_MR_MAX accumulators, which
   must fit in the register file with the two weight vectors and a broadcast */
#if defined(__AVX512F__)
#define FR_VBYTES 64
#define FR_VREGS 32
#define FR_MR_MAX 8     /* 16 accumulators of 32 zmm */
#elif defined(__AVX__)
#define FR_VBYTES 32
#define FR_VREGS 16
#define FR_MR_MAX 6     /* 12 accumulators of 16 ymm */
#else
#define FR_VBYTES 16
#define FR_VREGS 16
#define FR_MR_MAX 6
#endif

/* rows of x taken together against every panel */
#ifndef FR_PANEL_X_BLOCK_BYTES
#define FR_PANEL_X_BLOCK_BYTES (256 * 1024)
#endif

/* memory for packed panels, freed with free(): on a 64-byte boundary, so that a panel row
 * (FR_NR elements, one or two cache lines) never straddles a line. malloc's large blocks start
 * 16 bytes past a page (glibc's mmap header), where every other 32-byte load, or every 64-byte
 * one, touched two lines */
static inline void* fr_panel_alloc(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

/* keep a loaded vector in a register: GCC 12 folds a load into every multiply-add that uses
 * it as a memory operand, so each panel vector was loaded once per row of x, mr + 2*mr loads
 * for 2*mr multiply-adds where mr + 2 do (C microbenchmark, one core of an AMD EPYC Zen 3,
 * panels in L1, best of repeated runs: 4 rows of x 65 -> 99 GFLOP/s, its peak; 2 rows 75 ->
 * 87). Only where the accumulators and the kept vectors fit in the registers (fr_panels_rows):
 * 3 rows of two panels at once spilled and fell from 77 to 44. */
#if defined(__GNUC__)
#define FR_KEEP(v) __asm__("" : "+x"(v))
#else
#define FR_KEEP(v) ((void)0)
#endif

/* a hint to bring [p, p + bytes) into the cache before it is read */
static inline void fr_prefetch(const void* p, ptrdiff_t bytes)
{
    const char* c = (const char*)p;
    ptrdiff_t i;
    for (i = 0; i < bytes; i += 64)
        __builtin_prefetch(c + i, 0, 3);
}

#define FR_T float
#define FR_SUF f32
#include "panel_impl.h"
#undef FR_T
#undef FR_SUF

#define FR_T double
#define FR_SUF f64
#include "panel_impl.h"
#undef FR_T
#undef FR_SUF

#endif
