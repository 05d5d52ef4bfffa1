/* fa_bwd_impl.h: the FlashAttention-2 backward kernel, written once and compiled per ISA.
 *
 * A per-ISA translation unit (fa_bwd__scalar.c, fa_bwd__avx2.c, fa_bwd__avx512.c and the fa_bwd64__
 * float64 builds) defines
 *   FA_ACC, FA_ACC_IS_DOUBLE, FA_VBYTES   accumulator type and vector width (see fa_vec.h)
 *   FA_MR, FA_NR    register tile of the micro-kernel: FA_MR rows x FA_NR vectors
 *   FA_NAME(x)      the name of symbol x for this build
 * and includes this file. Blocks are FA_BWD_BLOCK_ROWS query rows by FA_BWD_BLOCK_KEYS keys.
 *
 * The math is the one stated in fa_bwd_params.h (Dao 2023, Algorithm 2). Three entry points (no
 * packk: the driver's K/V workspace is not used):
 *   prep  D_i = dO_i . O_i, the per-row P = exp(s - m) * il statistics, and Q, dO converted to
 *         acc_t rows, per (batch, head, rows);
 *   dkdv  one chunk of key blocks (c, c + nch, ...) of one (batch, kv head), in groups of KG
 *         blocks: it converts each key block once into K^T, V^T and K rows in acc_t in its
 *         scratch (every key block belongs to one chunk, so this is the only conversion, and it
 *         lands in L2 right before use, with no O(S d) copy of K/V); then for each query head of
 *         the GQA group (in order), each query block (in order) and each of the group's key
 *         blocks that the block's band reaches it recomputes S, P, dP, dS and accumulates
 *         dV += (P z r)^T dO, dK += dX^T Q (owned rows: the group sum needs no reduction) and
 *         dQ += dX K into the chunk's own dQ partial sums;
 *   dq    one query block of one (batch, head): dQ = the chunks' partial sums, added in order.
 * Each entry point covers the current panel's query rows only (fa_bwd_ws: p0, pn, prow); dkdv of a
 * panel after the first continues dK/dV from the outputs (fa_bwd_driver.c, "Panels").
 * That is FlashAttention-2's 5 block GEMMs per (query block, key block). Where the GPU kernel adds
 * dQ with atomics, the partial sums per chunk give the same work with no races and a fixed
 * summation order: the number of chunks depends on the problem only (fa_bwd_driver.c), so results
 * are bitwise identical for every thread count.
 *
 * Every block GEMM is one micro-kernel shape: C[rows x cols] (+)= A . B with B row-major in
 * vectors and A read through two strides, broadcast one element at a time, so A may be a
 * transposed view (P^T, dS^T) at no packing cost. K and V are packed transposed (d x keys) for the
 * products with Q and dO, K also row-major (keys x dpad) for dQ, in the item's scratch; Q and dO
 * row-major (rows x dpad) in the driver's workspace (fa_bwd_ws). Packed buffers are zero-padded
 * to whole vectors, so padding contributes exact zeros; padding rows of a block are computed and
 * then discarded.
 * Accumulation is in acc_t throughout (dK/dV in the item's scratch, dQ in the partial sums) and
 * each gradient is rounded once to the input dtype when stored.
 *
 * Register tiles: the micro-kernel keeps FA_MR x FA_NR vector accumulators; per k step it loads
 * FA_NR vectors of B and broadcasts FA_MR elements of A. FA_MR must divide the block sizes.
 */
#include "fa_bwd_rows.h" /* conversions, row statistics, bw_row: shared with the AMX kernel */

#define BR FA_BWD_BLOCK_ROWS
#define BC FA_BWD_BLOCK_KEYS
#define DPAD(d) FA_BWD_DPAD(d)
#define RUP(n, m) (((n) + (m) - 1) / (m) * (m))

/* Padded blocks must fit the scratch (blocks are whole tiles) and the last query block's padding
 * rows must exist in the workspace (the driver pads 8 rows). */
_Static_assert(BR % FA_MR == 0 && BC % FA_MR == 0 && BC % (FA_VBYTES / sizeof(FA_ACC)) == 0,
               "blocks must be whole register tiles and whole vectors");
_Static_assert(FA_MR <= 8, "the workspace pads 8 query rows");

/* ---- the micro-kernel and the block GEMM ------------------------------------------------------ */

/* C[FA_MR x NV*VLEN] (+)= A[FA_MR x kn] . B[kn x NV*VLEN], A(r, k) = A[r*ars + k*aks]; without add,
 * C = mul (A . B) (the score scale applied as the tile is stored). The FA_MR x NV accumulators
 * stay in registers for the whole k loop: per k, NV vector loads of B and FA_MR broadcasts feed
 * FA_MR*NV FMAs. */
FA_INLINE void bw_tile(const int NV, const int add, const acc_t *restrict A, int64_t ars,
                       int64_t aks, const acc_t *restrict B, int64_t ldb, int64_t kn,
                       acc_t *restrict C, int64_t ldc, acc_t mul)
{
    /* With add, the block's sum starts from zero and is added to C once: a two-level summation,
     * so the rounding error of dK/dV/dQ grows with the block size plus the number of blocks, not
     * with the sequence length. */
    vec_t acc[FA_MR][FA_NR];
    for (int r = 0; r < FA_MR; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = vsplat(0);
    for (int64_t k = 0; k < kn; k++) {
        vec_t b[FA_NR];
        for (int v = 0; v < NV; v++)
            b[v] = vload(B + k * ldb + v * VLEN);
        for (int r = 0; r < FA_MR; r++) {
            vec_t a = vsplat(A[r * ars + k * aks]);
            for (int v = 0; v < NV; v++)
                acc[r][v] += a * b[v];
        }
    }
    for (int r = 0; r < FA_MR; r++)
        for (int v = 0; v < NV; v++)
            vstore(C + r * ldc + v * VLEN, add ? vload(C + r * ldc + v * VLEN) + acc[r][v] : acc[r][v] * mul);
}

/* C[rows x cols] (+)= A . B (without add: C = mul (A . B)); rows a multiple of FA_MR, cols of
 * VLEN. The register tile's vector count is a compile-time constant in each instance, chosen for
 * the columns left. */
static void bw_gemm(int add, int64_t rows, int64_t cols, int64_t kn, const acc_t *A, int64_t ars,
                    int64_t aks, const acc_t *B, int64_t ldb, acc_t *C, int64_t ldc, acc_t mul)
{
    for (int64_t c0 = 0; c0 < cols; c0 += FA_NR * VLEN) {
        int64_t nv = (cols - c0) / VLEN;
        for (int64_t r0 = 0; r0 < rows; r0 += FA_MR) {
            const acc_t *a = A + r0 * ars;
            acc_t *c = C + r0 * ldc + c0;
            if (nv >= FA_NR) {
                if (add)
                    bw_tile(FA_NR, 1, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
                else
                    bw_tile(FA_NR, 0, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
            } else if (nv == 1) {
                if (add)
                    bw_tile(1, 1, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
                else
                    bw_tile(1, 0, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
            } else if (FA_NR > 2 && nv == 2) {
                if (add)
                    bw_tile(2, 1, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
                else
                    bw_tile(2, 0, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
            } else if (FA_NR > 3 && nv == 3) {
                if (add)
                    bw_tile(3, 1, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
                else
                    bw_tile(3, 0, a, ars, aks, B + c0, ldb, kn, c, ldc, mul);
            }
        }
    }
}

/* ---- scratch ------------------------------------------------------------------------------------ */

/* Key blocks per group: the dkdv pass reads each query block's Q, dO and dQ partials once per group
 * of this many key blocks of its chunk instead of once per key block (see dkdv). */
#define KG 4

typedef struct {
    acc_t *dK, *dV; /* KG x BC x dpad accumulators (dkdv pass), one BC x dpad slab per block */
    acc_t *Kt, *Vt; /* KG x d x BC: the group's key blocks transposed, columns past the keys 0 */
    acc_t *Kr;      /* KG x BC x dpad: the group's keys row-major, padding columns 0 */
    acc_t *dQ;      /* BR x dpad accumulator (dq pass) */
    acc_t *S, *dP;  /* BR x BC: scores -> P z r; dO V^T -> dX */
    acc_t *G, *Z;   /* BC: per-row chain factor and dropout keep * r */
    acc_t *stat;    /* 3 x BR: m, il, D of the block's rows */
    int64_t *lo, *hi;
} bw_scratch;

#define PIECE(n) (((size_t)(n) * sizeof(acc_t) + 63) / 64 * 64)
#define IPIECE(n) (((size_t)(n) * sizeof(int64_t) + 63) / 64 * 64)

size_t FA_NAME(scratch)(const fa_bwd_params *p)
{
    const int64_t dp = DPAD(p->f.d);
    return 2 * PIECE(KG * BC * dp) + 2 * PIECE(KG * p->f.d * BC) + PIECE(KG * BC * dp) +
           PIECE(BR * dp) + 2 * PIECE(BR * BC) + 2 * PIECE(BC) +
           PIECE(3 * BR) + 2 * IPIECE(BR);
}

static bw_scratch bw_carve(void *buf, int64_t d)
{
    const int64_t dp = DPAD(d);
    char *q = (char *)buf;
    bw_scratch w;
#define TAKE(field, n) (w.field = (acc_t *)q, q += PIECE(n))
    TAKE(dK, KG * BC * dp);
    TAKE(dV, KG * BC * dp);
    TAKE(Kt, KG * d * BC);
    TAKE(Vt, KG * d * BC);
    TAKE(Kr, KG * BC * dp);
    TAKE(dQ, BR * dp);
    TAKE(S, BR * BC);
    TAKE(dP, BR * BC);
    TAKE(G, BC);
    TAKE(Z, BC);
    TAKE(stat, 3 * BR);
#undef TAKE
    w.lo = (int64_t *)q, q += IPIECE(BR);
    w.hi = (int64_t *)q;
    return w;
}

/* Packed Q (or dO) rows of head h starting at row i. */
FA_INLINE const acc_t *bw_rows(const fa_bwd_ws *ws, const void *base, const fa_seq *s, int64_t h,
                               int64_t i)
{
    return (const acc_t *)base + (h * ws->qstride + bw_prow(ws, s, i)) * ws->dpad;
}

/* ---- packing ------------------------------------------------------------------------------------ */

#if defined(__AVX512F__) && !FA_ACC_IS_DOUBLE
#include "fa_t16.h"

/* The row of the keys past the sequence end in a 16-key transpose: d <= 512 zeros. */
static const float bw_zero_row[512];

/* dst[j * ldd + i] = rows[i][j0 + j] for i < 16, j < n <= 16: a 16 x 16 block transposed in
 * registers (fa_t16.h; one masked row load per key instead of a scalar store per element). */
static void bw_t16(const float *const *rows, int64_t j0, int64_t n, float *dst, int64_t ldd)
{
    const __mmask16 m = (__mmask16)((1u << n) - 1);
    __m512 r[16], o[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_maskz_loadu_ps(m, rows[i] + j0);
    fa_t16(r, o);
    for (int j = 0; j < n; j++)
        _mm512_storeu_ps(dst + j * ldd, o[j]);
}
#endif

/* Keys [k0, k0 + BC) of kv head hk of sequence s into Kt, Vt (d x BC, columns past the sequence's
 * last key zero) and Kr (rows x dpad, padding columns zero). */
static void bw_pack(const fa_bwd_params *p, const fa_seq *s, int64_t hk, int64_t k0, acc_t *Kt,
                    acc_t *Vt, acc_t *Kr)
{
    const fa_fwd_params *f = &p->f;
    const int64_t d = f->d, dp = DPAD(d), es = fa_dtype_size(f->dtype);
    const int64_t nc = s->sk - k0 < BC ? s->sk - k0 : BC;
    int64_t c = 0; /* columns [0, c) of Kt/Vt are done */
#if defined(__AVX512F__) && !FA_ACC_IS_DOUBLE
    if (f->dtype == FA_F32) {
        /* float32 K/V rows are read in place, 16 keys at a time, and transposed in registers; the
         * keys past nc of the last 16 are zero rows, so their columns come out zero. */
        const float *kp[16], *vp[16];
        for (; c < nc; c += 16) {
            for (int i = 0; i < 16; i++) {
                const int in = c + i < nc;
                kp[i] = in ? (const float *)fa_key_ptr(f, &f->k, s, k0 + c + i, hk, es) : bw_zero_row;
                vp[i] = in ? (const float *)fa_key_ptr(f, &f->v, s, k0 + c + i, hk, es) : bw_zero_row;
                if (in) {
                    memcpy(Kr + (c + i) * dp, kp[i], (size_t)d * sizeof(float));
                    memset(Kr + (c + i) * dp + d, 0, (size_t)(dp - d) * sizeof(float));
                }
            }
            for (int64_t j0 = 0; j0 < d; j0 += 16) {
                const int64_t n = d - j0 < 16 ? d - j0 : 16;
                bw_t16(kp, j0, n, Kt + j0 * BC + c, BC);
                bw_t16(vp, j0, n, Vt + j0 * BC + c, BC);
            }
        }
    }
#endif
    if (c == 0) {
        acc_t vrow[DPAD(512)];
        for (; c < nc; c++) {
            acc_t *kr = Kr + c * dp;
            bw_load(f->dtype, fa_key_ptr(f, &f->k, s, k0 + c, hk, es), d, kr);
            bw_load(f->dtype, fa_key_ptr(f, &f->v, s, k0 + c, hk, es), d, vrow);
            for (int64_t k = d; k < dp; k++)
                kr[k] = 0;
            for (int64_t k = 0; k < d; k++) {
                Kt[k * BC + c] = kr[k];
                Vt[k * BC + c] = vrow[k];
            }
        }
    }
    for (int64_t k = 0; k < d; k++)
        for (int64_t x = c; x < BC; x++)
            Kt[k * BC + x] = Vt[k * BC + x] = 0;
}

/* ---- preprocess --------------------------------------------------------------------------------- */

void FA_NAME(prep)(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi, int64_t h, int64_t q0,
                   int64_t n)
{
    const fa_fwd_params *f = &p->f;
    const fa_seq s = fa_seq_of(f, bi);
    const int64_t d = f->d, dp = DPAD(d), es = fa_dtype_size(f->dtype);
    for (int64_t i = q0; i < q0 + n && i < s.sq; i++) {
        const int64_t pr = s.q_row0 + i;
        acc_t *qr = (acc_t *)bw_rows(ws, ws->Q, &s, h, i);
        acc_t *dor = (acc_t *)bw_rows(ws, ws->dO, &s, h, i);
        bw_load(f->dtype, (const char *)f->q.ptr + (s.q_batch * f->q.sb + pr * f->q.sr + h * f->q.sh) * es, d, qr);
        bw_load(f->dtype, (const char *)p->dout.ptr + (s.q_batch * p->dout.sb + pr * p->dout.sr + h * p->dout.sh) * es, d, dor);
        for (int64_t k = d; k < dp; k++)
            qr[k] = dor[k] = 0;
        bw_row_stats(p, ws, &s, h, i, dor);
    }
}

/* Whether any of the nr rows' bands (from bw_bands) reaches keys [k0, k1). */
static int bw_reach(const int64_t *lo, const int64_t *hi, int64_t nr, int64_t k0, int64_t k1)
{
    int any = 0;
    for (int64_t r = 0; r < nr; r++)
        any |= lo[r] < hi[r] && lo[r] < k1 && hi[r] > k0;
    return any;
}

/* S = Q Kt and dP = dO Vt for rows [q0, q0 + nr) against the key block at kb0, then every row
 * through bw_row. Q/dO rows past nr are read (they exist: the workspace pads) and their results
 * replaced by zeros, since a GEMM row depends only on its own A row. */
static void bw_block(const fa_bwd_params *p, const fa_seq *s, int64_t h, int64_t q0, int64_t nr,
                     const acc_t *Q, const acc_t *dO, const acc_t *Kt, const acc_t *Vt, int64_t kb0,
                     int64_t nc, int64_t ncp, bw_scratch *w, uint64_t thr, bw_pf *pf)
{
    const int64_t d = p->f.d, dp = DPAD(d), nrp = RUP(nr, FA_MR);
    /* Plain scores leave the GEMM already scaled (as the forward's tile store does): one
     * multiply per stored vector instead of a pass over the block in bw_row. */
    const int plain = bw_plain(&p->f);
    bw_gemm(0, nrp, ncp, d, Q, dp, 1, Kt, BC, w->S, BC, plain ? (acc_t)p->f.scale : 1);
    bw_gemm(0, nrp, ncp, d, dO, dp, 1, Vt, BC, w->dP, BC, 1);
    for (int64_t r = 0; r < nrp; r++) {
        acc_t *Sr = w->S + r * BC, *dPr = w->dP + r * BC;
        int64_t c0 = 0, c1 = 0;
        if (r < nr) {
            c0 = (w->lo[r] > kb0 ? w->lo[r] : kb0) - kb0;
            c1 = (w->hi[r] < kb0 + nc ? w->hi[r] : kb0 + nc) - kb0;
        }
        bw_row_s(p, s, h, q0 + r, kb0, ncp, c0, c1, w->stat[r], w->stat[BR + r],
                 w->stat[2 * BR + r], Sr, dPr, w->G, w->Z, thr, plain);
        bw_pf_some(pf);
    }
}

/* m, il, D of rows [q0, q0 + nr) of head h into w->stat. */
static void bw_stats(const fa_bwd_params *p, const fa_bwd_ws *ws, const fa_seq *s, int64_t h,
                     int64_t q0, int64_t nr, bw_scratch *w)
{
    for (int64_t r = 0; r < nr; r++) {
        int64_t at = bw_ws_at(p, ws, s, h, q0 + r);
        w->stat[r] = ((const acc_t *)ws->m)[at];
        w->stat[BR + r] = ((const acc_t *)ws->il)[at];
        w->stat[2 * BR + r] = ((const acc_t *)ws->D)[at];
    }
}

/* ---- dK/dV (and dQ partials): one chunk of key blocks of one (batch, kv head) ------------------- */

fa_status FA_NAME(dkdv)(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi, int64_t hk,
                        int64_t chunk, void *buf)
{
    const fa_fwd_params *f = &p->f;
    const fa_seq s = fa_seq_of(f, bi);
    const int64_t d = f->d, dp = DPAD(d), es = fa_dtype_size(f->dtype), G = f->h / f->hk;
    const uint64_t thr = fa_dropout_threshold(f->dropout_p);
    const int64_t part = f->h * ws->qstride * dp; /* accumulators per chunk of dQ partials */
    acc_t *dQp = (acc_t *)ws->dQp + chunk * part;
    bw_scratch w = bw_carve(buf, d);

    /* The panel's query rows of this sequence: [p0, p1). */
    const int64_t p0 = ws->p0, p1 = s.sq < p0 + ws->pn ? s.sq : p0 + ws->pn;
    if (p1 <= p0 && p0 > 0)
        return FA_OK; /* no rows here: dK/dV keep what the earlier panels stored */

    /* This item alone owns its chunk's partial sums of the group's rows: start them at zero. */
    for (int64_t g = 0; p1 > p0 && g < G; g++)
        memset(dQp + (hk * G + g) * ws->qstride * dp + bw_prow(ws, &s, p0) * dp, 0,
               (size_t)((p1 - p0) * dp) * sizeof(acc_t));

    /* The chunk's key blocks k0 = (chunk + t nch) BC go in groups of KG consecutive ones (in t).
     * For each query block the group's blocks run back to back, so the query block's Q, dO and
     * dQ partials (streamed from L3 when a head's rows exceed L2) are fetched once per group and
     * reused from L1/L2, while the group's K/V blocks and dK/dV accumulators stay in L2. The
     * summation order is the per-block one: each dK/dV block sums over (g, q0) in order and each
     * dQ partial over the chunk's key blocks in order. */
    const int64_t step = ws->nch * BC, dslab = BC * dp;
    for (int64_t kg = chunk * BC; kg < s.sk; kg += KG * step) {
        int64_t nb = 0;
        while (nb < KG && kg + nb * step < s.sk)
            nb++;
        const int64_t klast = kg + (nb - 1) * step, kend = klast + (s.sk - klast < BC ? s.sk - klast : BC);
        /* The first panel starts dK/dV at zero and stores every key (zeros where no row looks);
         * a later one continues from what the previous panel stored (exact: the outputs are in
         * acc_t, fa_bwd_driver.c), and skips a group that none of its rows reaches. */
        if (p0 > 0) {
            int any = 0;
            for (int64_t q0 = p0; !any && q0 < p1; q0 += BR)
                any = bw_bands(p, &s, q0, p1 - q0 < BR ? p1 - q0 : BR, kg, kend, w.lo, w.hi);
            if (!any)
                continue;
        }
        for (int64_t t = 0; t < nb; t++) {
            const int64_t k0 = kg + t * step, nc = s.sk - k0 < BC ? s.sk - k0 : BC;
            if (p0 == 0) {
                memset(w.dK + t * dslab, 0, (size_t)dslab * sizeof(acc_t));
                memset(w.dV + t * dslab, 0, (size_t)dslab * sizeof(acc_t));
                continue;
            }
            for (int64_t c = 0; c < nc; c++) {
                const int64_t phys = s.k_row0 + k0 + c;
                acc_t *dk = w.dK + t * dslab + c * dp, *dv = w.dV + t * dslab + c * dp;
                bw_load(f->dtype, (const char *)p->dk + (s.k_batch * p->dk_sb + phys * p->dk_sr + hk * p->dk_sh) * es, d, dk);
                bw_load(f->dtype, (const char *)p->dv + (s.k_batch * p->dv_sb + phys * p->dv_sr + hk * p->dv_sh) * es, d, dv);
                for (int64_t x = d; x < dp; x++)
                    dk[x] = dv[x] = 0;
            }
            /* Rows past a ragged block's last key take sums that are never stored: keep them
             * defined. */
            memset(w.dK + t * dslab + nc * dp, 0, (size_t)((BC - nc) * dp) * sizeof(acc_t));
            memset(w.dV + t * dslab + nc * dp, 0, (size_t)((BC - nc) * dp) * sizeof(acc_t));
        }
        for (int64_t t = 0; t < nb; t++)
            bw_pack(p, &s, hk, kg + t * step, w.Kt + t * d * BC, w.Vt + t * d * BC, w.Kr + t * dslab);

        for (int64_t g = 0; g < G; g++) {
            const int64_t h = hk * G + g;
            for (int64_t q0 = p0; q0 < p1; q0 += BR) {
                const int64_t nr = p1 - q0 < BR ? p1 - q0 : BR, nrp = RUP(nr, FA_MR);
                /* Skip query blocks that reach none of the group's span (which includes other
                 * chunks' blocks when nch > 1: a cheap superset test; each block is tested below). */
                if (!bw_bands(p, &s, q0, nr, kg, kend, w.lo, w.hi))
                    continue;
                const acc_t *Q = bw_rows(ws, ws->Q, &s, h, q0), *dO = bw_rows(ws, ws->dO, &s, h, q0);
                acc_t *dQr = dQp + h * ws->qstride * dp + bw_prow(ws, &s, q0) * dp;
                bw_stats(p, ws, &s, h, q0, nr, &w);
                /* The next query block's rows (contiguous after this block's) into L2. */
                const int64_t nn = p1 - q0 - BR < BR ? (p1 - q0 - BR > 0 ? p1 - q0 - BR : 0) : BR;
                const int64_t nbytes = nn * dp * (int64_t)sizeof(acc_t);
                bw_pf pf = bw_pf_init(Q + BR * dp, nbytes, dO + BR * dp, nbytes, dQr + BR * dp, nbytes,
                                      nb * nrp);
                for (int64_t t = 0; t < nb; t++) {
                    const int64_t k0 = kg + t * step, nc = s.sk - k0 < BC ? s.sk - k0 : BC;
                    if (!bw_reach(w.lo, w.hi, nr, k0, k0 + nc))
                        continue;
                    const int64_t ncp = RUP(nc, VLEN), ncr = RUP(ncp, FA_MR);
                    const acc_t *Kt = w.Kt + t * d * BC, *Vt = w.Vt + t * d * BC, *Kr = w.Kr + t * dslab;
                    acc_t *dK = w.dK + t * dslab, *dV = w.dV + t * dslab;
                    bw_block(p, &s, h, q0, nr, Q, dO, Kt, Vt, k0, nc, ncp, &w, thr, &pf);
                    /* dV += (P z r)^T dO and dK += dX^T Q: the transposes are read through A's
                     * strides; only the nr real rows enter the sum. Rows of dK/dV past nc see
                     * S/dP columns that bw_row zeroed (up to ncp) or never wrote (up to ncr);
                     * they are never stored. */
                    bw_gemm(1, ncr, dp, nr, w.S, 1, BC, dO, dp, dV, dp, 1);
                    bw_gemm(1, ncr, dp, nr, w.dP, 1, BC, Q, dp, dK, dp, 1);
                    /* dQ += dX K into the chunk's partial sums. A ragged last block goes through
                     * the scratch: its padding rows are another sequence's rows, owned by another
                     * item. */
                    if (nr == nrp) {
                        bw_gemm(1, nrp, dp, nc, w.dP, BC, 1, Kr, dp, dQr, dp, 1);
                    } else {
                        bw_gemm(0, nrp, dp, nc, w.dP, BC, 1, Kr, dp, w.dQ, dp, 1);
                        for (int64_t x = 0; x < nr * dp; x += VLEN)
                            vstore(dQr + x, vload(dQr + x) + vload(w.dQ + x));
                    }
                    if (p->dpse) {
                        acc_t *dpse = (acc_t *)p->dpse;
                        for (int64_t r = 0; r < nr; r++) {
                            acc_t *row = dpse + bi * p->dpse_sb + h * p->dpse_sh + (q0 + r) * p->dpse_sr;
                            const acc_t *x = w.dP + r * BC;
                            for (int64_t c = 0; c < nc; c++)
                                row[(k0 + c) * p->dpse_sc] += x[c];
                        }
                    }
                }
            }
        }

        for (int64_t t = 0; t < nb; t++) {
            const int64_t k0 = kg + t * step, nc = s.sk - k0 < BC ? s.sk - k0 : BC;
            for (int64_t c = 0; c < nc; c++) {
                const int64_t phys = s.k_row0 + k0 + c;
                bw_store(f->dtype, w.dK + t * dslab + c * dp, d,
                         (char *)p->dk + (s.k_batch * p->dk_sb + phys * p->dk_sr + hk * p->dk_sh) * es);
                bw_store(f->dtype, w.dV + t * dslab + c * dp, d,
                         (char *)p->dv + (s.k_batch * p->dv_sb + phys * p->dv_sr + hk * p->dv_sh) * es);
            }
        }
    }
    return FA_OK;
}

/* ---- dQ: the chunks' partial sums of one query block of one (batch, head), in chunk order ------ */

fa_status FA_NAME(dq)(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi, int64_t h,
                      int64_t q0, void *buf)
{
    const fa_fwd_params *f = &p->f;
    const fa_seq s = fa_seq_of(f, bi);
    const int64_t d = f->d, dp = DPAD(d), es = fa_dtype_size(f->dtype);
    const int64_t nr = s.sq - q0 < BR ? s.sq - q0 : BR;
    const int64_t part = f->h * ws->qstride * dp;
    bw_scratch w = bw_carve(buf, d);
    for (int64_t r = 0; r < nr; r++) {
        const acc_t *src = (const acc_t *)ws->dQp + h * ws->qstride * dp + bw_prow(ws, &s, q0 + r) * dp;
        for (int64_t x = 0; x < dp; x += VLEN) {
            vec_t a = vload(src + x);
            for (int64_t c = 1; c < ws->nch; c++)
                a += vload(src + c * part + x);
            vstore(w.dQ + x, a);
        }
        const int64_t pr = s.q_row0 + q0 + r;
        bw_store(f->dtype, w.dQ, d, (char *)p->dq + (s.q_batch * p->dq_sb + pr * p->dq_sr + h * p->dq_sh) * es);
    }
    return FA_OK;
}
