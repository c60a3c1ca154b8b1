/* The body of panel.h for one element type: included once with FR_T = float, FR_SUF = f32
 * and once with FR_T = double, FR_SUF = f64 (no include guard on purpose). */

#define FR_CAT2(a, b) a##_##b
#define FR_CAT(a, b) FR_CAT2(a, b)
#define FR_FN(name) FR_CAT(name, FR_SUF)

#define FR_VEC FR_FN(fr_vec)
#define FR_LANES ((ptrdiff_t)(FR_VBYTES / sizeof(FR_T)))
#define FR_NR (2 * FR_LANES)

typedef FR_T FR_VEC __attribute__((vector_size(FR_VBYTES)));

static inline __attribute__((always_inline)) FR_VEC FR_FN(fr_vload)(const FR_T* p)
{
    FR_VEC v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* rows of one panel: a product over rows [r0, r1) with r0 a multiple of it starts at
   packed + r0 * k */
static inline ptrdiff_t FR_FN(fr_panel_width)(void)
{
    return FR_NR;
}

static inline ptrdiff_t FR_FN(fr_packed_size)(ptrdiff_t rows, ptrdiff_t k)
{
    return (rows + FR_NR - 1) / FR_NR * FR_NR * k;
}

static void FR_FN(fr_pack)(const FR_T* w, ptrdiff_t rs, ptrdiff_t cs, ptrdiff_t rows,
                           ptrdiff_t k, FR_T* packed)
{
    /* row i of a panel gathers element i of its FR_NR weight rows: the writes are contiguous
       and the FR_NR rows being read stay in L1 (the other order, a panel column at a time,
       was 10-50x slower: every write a different cache line); with rs = 1 (a transposed
       matrix) the reads are contiguous too */
    ptrdiff_t p, i, j, cols;
    for (p = 0; p < rows; p += FR_NR) {
        FR_T* panel = packed + p * k;
        const FR_T* w_p = w + p * rs;
        cols = rows - p < FR_NR ? rows - p : FR_NR;
        for (i = 0; i < k; i++) {
            for (j = 0; j < cols; j++)
                panel[i * FR_NR + j] = w_p[j * rs + i * cs];
            for (; j < FR_NR; j++)
                panel[i * FR_NR + j] = 0;
        }
    }
}

/* np consecutive panels times mr rows of x (np, mr: constants once inlined, 2*np*mr
   accumulators <= 2*FR_MR_MAX): out[b*ldo + q*FR_NR + j] for b < mr, q < np, j < FR_NR, but
   only the first `cols` columns of the last panel. Several panels at once for few rows of x:
   each sum is a chain of dependent multiply-adds, and 2*mr chains alone would leave the FMA
   units waiting on their latency. */
static inline __attribute__((always_inline)) void
FR_FN(fr_panels_rows)(const FR_T* panel, ptrdiff_t k, const int np, const FR_T* x, ptrdiff_t ldx,
                      ptrdiff_t incx, const int mr, FR_T* out, ptrdiff_t ldo, ptrdiff_t cols,
                      int accumulate)
{
    FR_VEC lo[4][FR_MR_MAX], hi[4][FR_MR_MAX];
    FR_T tail[2 * FR_LANES];
    const ptrdiff_t stride = FR_NR * k;    /* from one panel to the next */
    ptrdiff_t i;
    int b, q;
#pragma GCC unroll 4
    for (q = 0; q < np; q++) {
#pragma GCC unroll 8
        for (b = 0; b < mr; b++) {
            lo[q][b] = (FR_VEC){0};
            hi[q][b] = (FR_VEC){0};
        }
    }
    for (i = 0; i < k; i++) {
#pragma GCC unroll 4
        for (q = 0; q < np; q++) {
            FR_VEC w0 = FR_FN(fr_vload)(panel + q * stride + i * FR_NR);
            FR_VEC w1 = FR_FN(fr_vload)(panel + q * stride + i * FR_NR + FR_LANES);
            if (2 * np * mr + 2 * np + 1 <= FR_VREGS) {     /* else they would spill */
                FR_KEEP(w0);
                FR_KEEP(w1);
            }
#pragma GCC unroll 8
            for (b = 0; b < mr; b++) {
                FR_T s = x[b * ldx + i * incx];
                lo[q][b] += s * w0;
                hi[q][b] += s * w1;
            }
        }
    }
#pragma GCC unroll 4
    for (q = 0; q < np; q++) {
#pragma GCC unroll 8
        for (b = 0; b < mr; b++) {
            FR_T* o = out + b * ldo + q * FR_NR;
            if (accumulate) {
                if (q < np - 1 || cols == FR_NR) {
                    lo[q][b] += FR_FN(fr_vload)(o);
                    hi[q][b] += FR_FN(fr_vload)(o + FR_LANES);
                } else {
                    ptrdiff_t j;
                    for (j = 0; j < cols; j++)
                        tail[j] = o[j];
                    for (; j < FR_NR; j++)
                        tail[j] = 0;
                    lo[q][b] += FR_FN(fr_vload)(tail);
                    hi[q][b] += FR_FN(fr_vload)(tail + FR_LANES);
                }
            }
            if (q < np - 1 || cols == FR_NR) {
                memcpy(o, &lo[q][b], sizeof lo[q][b]);
                memcpy(o + FR_LANES, &hi[q][b], sizeof hi[q][b]);
            } else {
                memcpy(tail, &lo[q][b], sizeof lo[q][b]);
                memcpy(tail + FR_LANES, &hi[q][b], sizeof hi[q][b]);
                memcpy(o, tail, (size_t)cols * sizeof(FR_T));
            }
        }
    }
}

/* every panel times rows b0 .. b1 of x, mr at a time ((b1 - b0) a multiple of mr): a group of
   panels meets all those rows while it is in L1. The mr rows from b start at x + b * ldt. */
static inline __attribute__((always_inline)) void
FR_FN(fr_panels_block)(const FR_T* packed, ptrdiff_t rows, ptrdiff_t k, const FR_T* x,
                       ptrdiff_t ldt, ptrdiff_t ldx, ptrdiff_t incx, ptrdiff_t b0, ptrdiff_t b1,
                       const int mr, FR_T* out, ptrdiff_t ldo, int accumulate)
{
    const int np = 2 * FR_MR_MAX / (2 * mr) >= 4 ? 4 : (2 * FR_MR_MAX / (2 * mr) >= 2 ? 2 : 1);
    ptrdiff_t p, b, cols;
    for (p = 0; p + np * FR_NR <= rows; p += np * FR_NR)
        for (b = b0; b < b1; b += mr)
            FR_FN(fr_panels_rows)(packed + p * k, k, np, x + b * ldt, ldx, incx, mr,
                                  out + b * ldo + p, ldo, FR_NR, accumulate);
    for (; p < rows; p += FR_NR) {         /* the panels left, one at a time */
        cols = rows - p < FR_NR ? rows - p : FR_NR;
        for (b = b0; b < b1; b += mr)
            FR_FN(fr_panels_rows)(packed + p * k, k, 1, x + b * ldt, ldx, incx, mr,
                                  out + b * ldo + p, ldo, cols, accumulate);
    }
}

/* rows c0 .. c1 of x (column stride incx > 1) copied as tiles of FR_MR_MAX rows, the last one
   narrower, each a micro-panel: buf[(b - c0) * k + i * w + j] = x[(b + j) * ldx + i * incx] for
   the tile of w rows from b. The product then reads each tile as one contiguous stream instead
   of k lines far apart (x = the columns of a row-major matrix: the weight gradients' d^T, whose
   strided reads ran the product at 70-75 % of its speed on contiguous rows). */
static void FR_FN(fr_pack_x)(const FR_T* x, ptrdiff_t ldx, ptrdiff_t incx, ptrdiff_t k,
                             ptrdiff_t c0, ptrdiff_t c1, FR_T* buf)
{
    ptrdiff_t i, b, j, w;
    if (ldx == 1) {               /* a row of the source at a time: contiguous reads */
        for (i = 0; i < k; i++) {
            const FR_T* src = x + i * incx;
            for (b = c0; b + FR_MR_MAX <= c1; b += FR_MR_MAX)
                memcpy(buf + (b - c0) * k + i * FR_MR_MAX, src + b, FR_MR_MAX * sizeof(FR_T));
            for (j = 0; j < c1 - b; j++)
                buf[(b - c0) * k + i * (c1 - b) + j] = src[b + j];
        }
        return;
    }
    for (b = c0; b < c1; b += FR_MR_MAX) {
        w = c1 - b < FR_MR_MAX ? c1 - b : FR_MR_MAX;
        for (i = 0; i < k; i++)
            for (j = 0; j < w; j++)
                buf[(b - c0) * k + i * w + j] = x[(b + j) * ldx + i * incx];
    }
}

static void FR_FN(fr_packed_product)(const FR_T* packed, ptrdiff_t rows, ptrdiff_t k,
                                     const FR_T* x, ptrdiff_t ldx, ptrdiff_t incx,
                                     ptrdiff_t nx, FR_T* out, ptrdiff_t ldo, int accumulate)
{
    /* rows of x in blocks that stay in L2, FR_MR_MAX at a time, then the rows left; with
       incx > 1 each block is first copied into tiles (fr_pack_x) */
    ptrdiff_t blk = (ptrdiff_t)(FR_PANEL_X_BLOCK_BYTES / (sizeof(FR_T) * (size_t)(k > 0 ? k : 1)));
    ptrdiff_t c0, c1, full;
    FR_T* buf = NULL;
    const FR_T* xs;
    ptrdiff_t lt, lx, ix;
    blk = blk < FR_MR_MAX ? FR_MR_MAX : blk / FR_MR_MAX * FR_MR_MAX;
    if (incx != 1 && k > 1)
        buf = (FR_T*)malloc((size_t)(blk * k) * sizeof(FR_T));   /* NULL: read x in place */
    for (c0 = 0; c0 < nx; c0 = c1) {
        c1 = nx - c0 < blk ? nx : c0 + blk;
        full = c0 + (c1 - c0) / FR_MR_MAX * FR_MR_MAX;
        if (buf != NULL) {
            FR_FN(fr_pack_x)(x, ldx, incx, k, c0, c1, buf);
            xs = buf - c0 * k; lt = k; lx = 1; ix = FR_MR_MAX;
        } else {
            xs = x; lt = ldx; lx = ldx; ix = incx;
        }
        if (full > c0)
            FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, c0, full, FR_MR_MAX, out, ldo, accumulate);
        if (buf != NULL)
            ix = c1 - full;           /* the narrower last tile */
        switch (c1 - full) {   /* a constant row count for the compiler */
        case 1: FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, full, c1, 1, out, ldo, accumulate); break;
        case 2: FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, full, c1, 2, out, ldo, accumulate); break;
        case 3: FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, full, c1, 3, out, ldo, accumulate); break;
        case 4: FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, full, c1, 4, out, ldo, accumulate); break;
        case 5: FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, full, c1, 5, out, ldo, accumulate); break;
#if FR_MR_MAX > 6
        case 6: FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, full, c1, 6, out, ldo, accumulate); break;
        case 7: FR_FN(fr_panels_block)(packed, rows, k, xs, lt, lx, ix, full, c1, 7, out, ldo, accumulate); break;
#endif
        default: break;
        }
    }
    free(buf);
}

#undef FR_CAT2
#undef FR_CAT
#undef FR_FN
#undef FR_VEC
#undef FR_LANES
#undef FR_NR
