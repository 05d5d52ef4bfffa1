/* fa_fwd_impl.h: the FlashAttention-2 forward kernel, written once and compiled per ISA.
 *
 * A per-ISA translation unit (fa_fwd__scalar.c, fa_fwd__avx2.c, fa_fwd__avx512.c) defines
 *   FA_ACC, FA_ACC_IS_DOUBLE, FA_VBYTES   (see fa_vec.h)
 *   FA_MR, FA_NR    register tile of the micro-kernels: FA_MR rows x FA_NR vectors
 *   FA_BR, FA_BC    query rows per work item, keys per block (FA_BR % FA_MR == 0,
 *                   FA_BC % (FA_NR * VLEN) == 0)
 *   FA_NAME(x)      the name of symbol x for this build
 * and includes this file.
 *
 * One call computes a work item: FA_BR query rows of one (batch, head). Q rows are converted to
 * the accumulator type once; K blocks are packed transposed (d x FA_BC) and V blocks row-major
 * (FA_BC x dpad), zero-padded, so both micro-kernels run on aligned full vectors: once per
 * (batch, kv head) by FA_NAME(pack) where the driver packs, else per block in the item's
 * scratch. For each key
 * block that intersects any row's visible band:
 *   S = Q K^T               (micro-kernel qk_tile)
 *   S = mask(softcap(scale * (S + pse)) + alibi)  per row, keys outside [lo, hi) -> -inf
 *   online softmax: m' = max(m, rowmax S); O *= exp(m - m'); l = l exp(m - m') + sum exp(S - m')
 *   P = exp(S - m'), dropped entries zeroed (the sum l is taken before dropout)
 *   O += P V                (micro-kernel pv_tile)
 * and finally out = O / l / (1 - p_drop), lse = m + log l; a row that saw no key gets 0 and +inf.
 * Memory: the scratch is O(FA_BR * d + FA_BC * d), never S x S.
 */
#include <math.h>
#include <float.h>

#include "fa_params.h"
#include "fa_seq.h"
#include "fa_philox.h"
#include "fa_vec.h"
#include "fa_cvt.h"
#include "fa_kernels.h"

#define BRP FA_BR /* rows per item, already a multiple of FA_MR */
#define DPAD(d) (((d) + VLEN - 1) / VLEN * VLEN)

/* ---- conversions ------------------------------------------------------------------------- */

/* Convert n elements of type t at src into acc_t. */
FA_INLINE void load_row(fa_dtype t, const void *src, int64_t n, acc_t *dst)
{
    switch (t) {
    case FA_F32: {
        const float *s = (const float *)src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)s[i];
        break;
    }
    case FA_F64: {
        const double *s = (const double *)src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)s[i];
        break;
    }
    case FA_F16: {
        const _Float16 *s = (const _Float16 *)src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)(float)s[i];
        break;
    }
    case FA_BF16: {
        const uint16_t *s = (const uint16_t *)src;
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)fa_bf16_to_f32(s[i]);
        break;
    }
    }
}

FA_INLINE void store_row(fa_dtype t, const acc_t *src, acc_t mul, int64_t n, void *dst)
{
    switch (t) {
    case FA_F32: {
        float *o = (float *)dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = (float)(src[i] * mul);
        break;
    }
    case FA_F64: {
        double *o = (double *)dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = (double)(src[i] * mul);
        break;
    }
    case FA_F16: {
        _Float16 *o = (_Float16 *)dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = (_Float16)(float)(src[i] * mul);
        break;
    }
    case FA_BF16: {
        uint16_t *o = (uint16_t *)dst;
        for (int64_t i = 0; i < n; i++)
            o[i] = fa_f32_to_bf16((float)(src[i] * mul));
        break;
    }
    }
}

FA_INLINE acc_t load_one(fa_dtype t, const void *base, int64_t idx)
{
    switch (t) {
    case FA_F32:
        return (acc_t)((const float *)base)[idx];
    case FA_F64:
        return (acc_t)((const double *)base)[idx];
    case FA_F16:
        return (acc_t)(float)((const _Float16 *)base)[idx];
    case FA_BF16:
        return (acc_t)fa_bf16_to_f32(((const uint16_t *)base)[idx]);
    }
    return 0;
}

/* ---- micro-kernels --------------------------------------------------------------------------- */

/* S[FA_MR x NV*VLEN] = mul (Q[FA_MR x d] . Kt[d x NV*VLEN]); Q row-major (ldq), Kt row-major
 * (ldk). mul is the score scale for plain scores (the same single rounding as row_scores'
 * x * scale, one pass fewer), else 1. */
FA_INLINE void qk_tile(const int NV, const acc_t *restrict Q, int64_t ldq, const acc_t *restrict Kt,
                       int64_t ldk, int64_t d, acc_t *restrict S, int64_t lds, acc_t mul)
{
    vec_t acc[FA_MR][FA_NR];
    for (int r = 0; r < FA_MR; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = vsplat(0);
    for (int64_t k = 0; k < d; k++) {
        vec_t kv[FA_NR];
        for (int v = 0; v < NV; v++)
            kv[v] = vload(Kt + k * ldk + v * VLEN);
        for (int r = 0; r < FA_MR; r++) {
            vec_t qb = vsplat(Q[r * ldq + k]);
            for (int v = 0; v < NV; v++)
                acc[r][v] += qb * kv[v];
        }
    }
    for (int r = 0; r < FA_MR; r++)
        for (int v = 0; v < NV; v++)
            vstore(S + r * lds + v * VLEN, acc[r][v] * mul);
}

/* O[FA_MR x NV*VLEN] = alpha O + P[FA_MR x nc] . V[nc x NV*VLEN], alpha per row: the online
 * softmax's rescale of O rides on the tile's store instead of a pass over O per row. */
FA_INLINE void pv_tile(const int NV, const acc_t *restrict P, int64_t ldp, const acc_t *restrict V,
                       int64_t ldv, int64_t nc, acc_t *restrict O, int64_t ldo,
                       const acc_t *restrict alpha)
{
    /* Summed from zero and added to O once per block: a two-level summation, so the rounding
     * error grows with the block size plus the number of blocks, not the sequence length. */
    vec_t acc[FA_MR][FA_NR];
    for (int r = 0; r < FA_MR; r++)
        for (int v = 0; v < NV; v++)
            acc[r][v] = vsplat(0);
    for (int64_t j = 0; j < nc; j++) {
        vec_t vv[FA_NR];
        for (int v = 0; v < NV; v++)
            vv[v] = vload(V + j * ldv + v * VLEN);
        for (int r = 0; r < FA_MR; r++) {
            vec_t pb = vsplat(P[r * ldp + j]);
            for (int v = 0; v < NV; v++)
                acc[r][v] += pb * vv[v];
        }
    }
    for (int r = 0; r < FA_MR; r++) {
        const vec_t a = vsplat(alpha[r]);
        for (int v = 0; v < NV; v++)
            vstore(O + r * ldo + v * VLEN, vload(O + r * ldo + v * VLEN) * a + acc[r][v]);
    }
}

/* Expand a call with a runtime vector count nv (1..FA_NR) into constant-count instances. */
#define FA_NV_SWITCH(nv, CALL)                                                                     \
    switch (nv) {                                                                                  \
    case 1: CALL(1); break;                                                                        \
    case 2: if (FA_NR >= 2) { CALL(2); } break;                                                    \
    case 3: if (FA_NR >= 3) { CALL(3); } break;                                                    \
    default: if (FA_NR >= 4) { CALL(4); } break;                                                   \
    }

/* S[rows x ncp] = mul (Q . Kt) for rows a multiple of FA_MR and ncp a multiple of VLEN. */
static void gemm_qk(const acc_t *Q, int64_t rows, int64_t d, const acc_t *Kt, int64_t ncp,
                    acc_t *S, acc_t mul)
{
    for (int64_t c0 = 0; c0 < ncp; c0 += FA_NR * VLEN) {
        int nv = (int)((ncp - c0) / VLEN);
        if (nv > FA_NR)
            nv = FA_NR;
        for (int64_t r0 = 0; r0 < rows; r0 += FA_MR) {
#define QK_CALL(N) qk_tile(N, Q + r0 * d, d, Kt + c0, FA_BC, d, S + r0 * FA_BC + c0, FA_BC, mul)
            FA_NV_SWITCH(nv, QK_CALL)
#undef QK_CALL
        }
    }
}

/* O[rows x dpad] = alpha O + P[rows x nc] . V[nc x dpad], alpha per row. */
static void gemm_pv(const acc_t *P, int64_t rows, int64_t nc, const acc_t *V, int64_t dpad,
                    acc_t *O, const acc_t *alpha)
{
    for (int64_t c0 = 0; c0 < dpad; c0 += FA_NR * VLEN) {
        int nv = (int)((dpad - c0) / VLEN);
        if (nv > FA_NR)
            nv = FA_NR;
        for (int64_t r0 = 0; r0 < rows; r0 += FA_MR) {
#define PV_CALL(N)                                                                                 \
    pv_tile(N, P + r0 * FA_BC, FA_BC, V + c0, dpad, nc, O + r0 * dpad + c0, dpad, alpha + r0)
            FA_NV_SWITCH(nv, PV_CALL)
#undef PV_CALL
        }
    }
}

/* ---- scratch ----------------------------------------------------------------------------------- */

typedef struct {
    acc_t *Q;  /* BRP x d */
    acc_t *Kt; /* d x FA_BC */
    acc_t *V;  /* FA_BC x dpad */
    acc_t *S;  /* BRP x FA_BC */
    acc_t *O;  /* BRP x dpad */
    acc_t *m, *l, *alpha; /* per row: running max and sum, this block's rescale of O */
    int64_t *lo, *hi;
} scratch;

/* Bytes of each scratch piece, each rounded up to 64 so every piece starts on a cache line. */
#define FA_PIECE(n) ((((size_t)(n) * sizeof(acc_t)) + 63) / 64 * 64)

static size_t scratch_bytes(int64_t d)
{
    int64_t dp = DPAD(d);
    return FA_PIECE(BRP * d) + FA_PIECE(d * FA_BC) + FA_PIECE(FA_BC * dp) + FA_PIECE(BRP * FA_BC) +
           FA_PIECE(BRP * dp) + 3 * FA_PIECE(BRP) + 2 * ((BRP * sizeof(int64_t) + 63) / 64 * 64);
}

static scratch carve(void *buf, int64_t d)
{
    int64_t dp = DPAD(d);
    char *p = (char *)buf;
    scratch s;
    s.Q = (acc_t *)p, p += FA_PIECE(BRP * d);
    s.Kt = (acc_t *)p, p += FA_PIECE(d * FA_BC);
    s.V = (acc_t *)p, p += FA_PIECE(FA_BC * dp);
    s.S = (acc_t *)p, p += FA_PIECE(BRP * FA_BC);
    s.O = (acc_t *)p, p += FA_PIECE(BRP * dp);
    s.m = (acc_t *)p, p += FA_PIECE(BRP);
    s.l = (acc_t *)p, p += FA_PIECE(BRP);
    s.alpha = (acc_t *)p, p += FA_PIECE(BRP);
    s.lo = (int64_t *)p, p += (BRP * sizeof(int64_t) + 63) / 64 * 64;
    s.hi = (int64_t *)p;
    return s;
}

/* Scratch one thread needs for one work item; the driver passes it 64-byte aligned. */
size_t FA_NAME(scratch)(const fa_fwd_params *p)
{
    return scratch_bytes(p->d);
}

/* ---- packing ------------------------------------------------------------------------------------ */

/* Kt[c][.] for keys kb0..kb0+nc, transposed to d x FA_BC, columns >= nc zeroed up to ncp. */
static void pack_k(const fa_fwd_params *p, const fa_seq *s, int64_t hk, int64_t kb0, int64_t nc,
                   int64_t ncp, acc_t *Kt, acc_t *tmp)
{
    int64_t d = p->d, es = fa_dtype_size(p->dtype);
    for (int64_t c = 0; c < nc; c++) {
        load_row(p->dtype, fa_key_ptr(p, &p->k, s, kb0 + c, hk, es), d, tmp);
        for (int64_t k = 0; k < d; k++)
            Kt[k * FA_BC + c] = tmp[k];
    }
    for (int64_t k = 0; k < d; k++)
        for (int64_t c = nc; c < ncp; c++)
            Kt[k * FA_BC + c] = 0;
}

/* V rows for keys kb0..kb0+nc as nc x dpad, padding (columns >= d, rows up to ncp) zeroed. */
static void pack_v(const fa_fwd_params *p, const fa_seq *s, int64_t hk, int64_t kb0, int64_t nc,
                   int64_t ncp, acc_t *V)
{
    int64_t d = p->d, dp = DPAD(d), es = fa_dtype_size(p->dtype);
    for (int64_t c = 0; c < nc; c++) {
        acc_t *row = V + c * dp;
        load_row(p->dtype, fa_key_ptr(p, &p->v, s, kb0 + c, hk, es), d, row);
        for (int64_t k = d; k < dp; k++)
            row[k] = 0;
    }
    for (int64_t c = nc; c < ncp; c++)
        for (int64_t k = 0; k < dp; k++)
            V[c * dp + k] = 0;
}

/* ---- the packed copy ------------------------------------------------------------------------- */

/* The driver's copy of one (batch, kv head)'s K and V (fa_kernels.h), made once and read by every
 * query block and GQA head: nb = ceil(sk / FA_BC) blocks of Kt (d x FA_BC each, as pack_k leaves
 * them), then V as nb * FA_BC rows of dpad (as pack_v), keys past sk zero. Without it each item
 * would transpose every K block it visits again (a fifth of the AVX2 forward's time at S = 2048,
 * perf). */
static int64_t packed_blocks(int64_t sk)
{
    return (sk + FA_BC - 1) / FA_BC;
}

size_t FA_NAME(pack_bytes)(const fa_fwd_params *p, int64_t sk)
{
    return (size_t)(packed_blocks(sk) * FA_BC * (p->d + DPAD(p->d))) * sizeof(acc_t);
}

void FA_NAME(pack)(const fa_fwd_params *p, int64_t bi, int64_t hk, void *dst)
{
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t d = p->d, nb = packed_blocks(s.sk);
    acc_t *Kt = (acc_t *)dst, *V = Kt + nb * d * FA_BC;
    acc_t tmp[512]; /* one K row; d <= 512 (validated) */
    for (int64_t b = 0; b < nb; b++) {
        const int64_t kb0 = b * FA_BC, nc = s.sk - kb0 < FA_BC ? s.sk - kb0 : FA_BC;
        pack_k(p, &s, hk, kb0, nc, FA_BC, Kt + b * d * FA_BC, tmp);
        pack_v(p, &s, hk, kb0, nc, FA_BC, V + kb0 * DPAD(d));
    }
}

/* ---- scores of one row of one block ----------------------------------------------------------- */

/* Turns the raw dot products S[0..ncp) of query row i against keys kb0.. into final scores:
 * pse, scale, softcap, alibi, explicit mask; keys outside [c0, c1) become -inf. scale is the
 * score scale, or 1 for scores gemm_qk already scaled. */
static void row_scores(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i, int64_t kb0,
                       int64_t ncp, int64_t c0, int64_t c1, acc_t scale, acc_t *S)
{
    if (p->pse && !p->pse_after_scale) {
        const int64_t base = s->q_batch * p->pse_sb + h * p->pse_sh + i * p->pse_sr;
        for (int64_t c = c0; c < c1; c++)
            S[c] += load_one(p->pse_dtype, p->pse, base + (kb0 + c) * p->pse_sc);
    }
    const int softcap = p->softcap > 0;
    const acc_t cap = (acc_t)p->softcap, inv_cap = (acc_t)(1.0 / p->softcap);
    const int alibi = p->alibi != NULL;
    acc_t slope = 0, diag = 0;
    if (alibi) {
        slope = (acc_t)p->alibi[s->bi * p->alibi_sb + h];
        diag = (acc_t)(i + s->sk - s->sq - kb0); /* alibi distance is bottom-right aligned */
    }
    const vec_t iota = viota();
    const vec_t ninf = vsplat(-INFINITY);
    for (int64_t c = 0; c < ncp; c += VLEN) {
        vec_t x = vload(S + c) * scale;
        if (softcap)
            x = cap * vtanh(x * inv_cap);
        vec_t col = iota + (acc_t)c;
        if (alibi) {
            vec_t dist = vsplat(diag) - col;
            dist = vsel(dist < (acc_t)0, -dist, dist);
            x = x - slope * dist;
        }
        veci_t in = (col >= (acc_t)c0) & (col < (acc_t)c1);
        vstore(S + c, vsel(in, x, ninf));
    }
    if (p->pse && p->pse_after_scale) {
        const int64_t base = s->q_batch * p->pse_sb + h * p->pse_sh + i * p->pse_sr;
        for (int64_t c = c0; c < c1; c++)
            S[c] += load_one(p->pse_dtype, p->pse, base + (kb0 + c) * p->pse_sc);
    }
    if (p->mask) {
        const acc_t fill = (acc_t)p->mask_fill;
        const uint8_t *mrow =
            p->mask + s->q_batch * p->mask_sb + h * p->mask_sh + i * p->mask_sr;
        for (int64_t c = c0; c < c1; c++)
            if (mrow[(kb0 + c) * p->mask_sc])
                S[c] = fill;
    }
}

/* Zero the dropped entries of P[0..ncp) for row i (the kept ones are rescaled at the end). */
static void row_dropout(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i, int64_t kb0,
                        int64_t c0, int64_t c1, acc_t *P, uint64_t thr)
{
    const uint64_t bh = (uint64_t)(s->bi * p->h + h);
    int64_t j0 = kb0 + c0, j1 = kb0 + c1;
    for (int64_t j4 = j0 & ~(int64_t)3; j4 < j1; j4 += 4) {
        uint32_t r[4];
        fa_dropout_draw4(p->seed, p->offset, bh, (uint64_t)i, (uint64_t)(j4 >> 2), r);
        for (int t = 0; t < 4; t++) {
            int64_t j = j4 + t;
            if (j >= j0 && j < j1 && (uint64_t)r[t] < thr)
                P[j - kb0] = 0;
        }
    }
}

/* ---- the work item ----------------------------------------------------------------------------- */

fa_status FA_NAME(item)(const fa_fwd_params *p, int64_t bi, int64_t h, int64_t q0,
                        const void *packed, void *buf)
{
    const int64_t d = p->d, dp = DPAD(d);
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t hk = h / (p->h / p->hk);
    const int64_t nrows = s.sq - q0 < FA_BR ? s.sq - q0 : FA_BR;
    const int64_t rows = (nrows + FA_MR - 1) / FA_MR * FA_MR;
    const int64_t es = fa_dtype_size(p->dtype);
    scratch w = carve(buf, d);
    const int has_drop = p->dropout_p > 0;
    const uint64_t thr = fa_dropout_threshold(p->dropout_p);
    /* Scores need nothing but the scale (applied by gemm_qk) and the band mask. */
    const int plain = !p->pse && !(p->softcap > 0) && !p->alibi && !p->mask;

    /* Visible key range of the whole item. */
    int64_t kmin = INT64_MAX, kmax = 0;
    for (int64_t r = 0; r < nrows; r++) {
        fa_row_band(p, &s, q0 + r, &w.lo[r], &w.hi[r]);
        if (w.lo[r] < w.hi[r]) {
            kmin = w.lo[r] < kmin ? w.lo[r] : kmin;
            kmax = w.hi[r] > kmax ? w.hi[r] : kmax;
        }
    }

    /* Q rows in the accumulator type, padding rows zero. */
    for (int64_t r = 0; r < rows; r++) {
        acc_t *qr = w.Q + r * d;
        if (r < nrows) {
            const char *src = (const char *)p->q.ptr +
                              (s.q_batch * p->q.sb + (s.q_row0 + q0 + r) * p->q.sr + h * p->q.sh) * es;
            load_row(p->dtype, src, d, qr);
        } else {
            for (int64_t k = 0; k < d; k++)
                qr[k] = 0;
        }
        w.m[r] = -INFINITY;
        w.l[r] = 0;
        if (p->sink && r < nrows) {
            w.m[r] = (acc_t)p->sink[h]; /* the sink logit enters as one extra key, exp(0) = 1 */
            w.l[r] = 1;
        }
    }
    for (int64_t k = 0; k < rows * dp; k++)
        w.O[k] = 0;

    /* Packed blocks start at multiples of FA_BC: the first one may begin before some rows'
     * bands, whose keys row_scores masks as in any partial block. Keys of a packed block past
     * nc (up to ncp) are real keys outside every band (or zeros past sk): masked the same way. */
    const acc_t *Kp = (const acc_t *)packed;
    const acc_t *Vp = Kp ? Kp + packed_blocks(s.sk) * d * FA_BC : NULL;
    if (Kp && kmin < kmax)
        kmin = kmin / FA_BC * FA_BC;
    for (int64_t kb0 = kmin; kb0 < kmax; kb0 += FA_BC) {
        const int64_t nc = kmax - kb0 < FA_BC ? kmax - kb0 : FA_BC;
        const int64_t ncp = (nc + VLEN - 1) / VLEN * VLEN;
        const acc_t *Kt = w.Kt, *V = w.V;
        if (Kp) {
            Kt = Kp + kb0 / FA_BC * d * FA_BC;
            V = Vp + kb0 * dp;
        } else {
            pack_k(p, &s, hk, kb0, nc, ncp, w.Kt, w.V);
            pack_v(p, &s, hk, kb0, nc, ncp, w.V);
        }
        gemm_qk(w.Q, rows, d, Kt, ncp, w.S, plain ? (acc_t)p->scale : (acc_t)1);
        for (int64_t r = 0; r < rows; r++) {
            acc_t *Sr = w.S + r * FA_BC;
            int64_t c0 = 0, c1 = 0;
            w.alpha[r] = 1;
            if (r < nrows) {
                c0 = (w.lo[r] > kb0 ? w.lo[r] : kb0) - kb0;
                c1 = (w.hi[r] < kb0 + nc ? w.hi[r] : kb0 + nc) - kb0;
            }
            if (c0 >= c1) {
                for (int64_t c = 0; c < ncp; c++)
                    Sr[c] = 0;
                continue;
            }
            /* Plain scores left the GEMM scaled: only rows with a band edge in the block are
             * left to mask (a scale of 1 is exact). */
            if (!plain || c0 > 0 || c1 < ncp)
                row_scores(p, &s, h, q0 + r, kb0, ncp, c0, c1, plain ? 1 : (acc_t)p->scale, Sr);
            vec_t vm = vsplat(-INFINITY);
            for (int64_t c = 0; c < ncp; c += VLEN)
                vm = vmax(vm, vload(Sr + c));
            const acc_t bm = vhmax(vm);
            const acc_t m_old = w.m[r];
            /* A NaN score (NaN input) must poison the row, not be skipped as "nothing visible". */
            const acc_t m_new = (bm > m_old || bm != bm) ? bm : m_old;
            if (m_new == -INFINITY) { /* nothing visible yet (only possible with -inf fills) */
                for (int64_t c = 0; c < ncp; c++)
                    Sr[c] = 0;
                continue;
            }
            vec_t vs = vsplat(0);
            const vec_t vmn = vsplat(m_new);
            for (int64_t c = 0; c < ncp; c += VLEN) {
                vec_t e = vexp_nonpos(vload(Sr + c) - vmn);
                vstore(Sr + c, e);
                vs += e;
            }
            const acc_t alpha = sexp_nonpos(m_old - m_new);
            w.l[r] = w.l[r] * alpha + vhsum(vs);
            w.m[r] = m_new;
            w.alpha[r] = alpha; /* O's rescale, applied by gemm_pv's tile stores */
            if (has_drop)
                row_dropout(p, &s, h, q0 + r, kb0, c0, c1, Sr, thr);
        }
        gemm_pv(w.S, rows, ncp, V, dp, w.O, w.alpha);
    }

    /* Normalize and write out, lse and the statistics. */
    const acc_t drop_scale = has_drop ? (acc_t)(1.0 / (1.0 - p->dropout_p)) : (acc_t)1;
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t i = q0 + r;
        const fa_dtype ot = fa_out_dtype(p);
        char *dst = (char *)p->o + (s.q_batch * p->o_sb + (s.q_row0 + i) * p->o_sr + h * p->o_sh) * fa_dtype_size(ot);
        const int empty = w.l[r] == 0; /* NaN sums (NaN inputs) propagate, never read as empty */
        const int invalid = p->invalid_line_zero && w.m[r] == (acc_t)p->mask_fill;
        acc_t *Or = w.O + r * dp;
        if (empty || invalid) {
            for (int64_t k = 0; k < d; k++)
                Or[k] = 0;
        }
        store_row(ot, Or, empty || invalid ? (acc_t)0 : drop_scale / w.l[r], d, dst);
        const int64_t srow = p->cu_q ? s.q_row0 + i : i;
        const int64_t sb = p->cu_q ? 0 : s.bi;
        if (p->lse) {
            acc_t v = empty ? (acc_t)INFINITY : w.m[r] + (acc_t)log((double)w.l[r]);
            ((acc_t *)p->lse)[sb * p->lse_sb + h * p->lse_sh + srow * p->lse_sr] = v;
        }
        if (p->rowmax) {
            const int64_t o = sb * p->stat_sb + h * p->stat_sh + srow * p->stat_sr;
            ((acc_t *)p->rowmax)[o] = w.m[r];
            ((acc_t *)p->rowsum)[o] = invalid ? (acc_t)FLT_MAX : w.l[r];
        }
    }

    /* S_dmask (testing aid): a second pass writes the normalized probabilities, dropped entries
     * negated. Only when asked for, so it costs nothing otherwise. */
    if (p->s_dmask) {
        for (int64_t kb0 = kmin; kb0 < kmax; kb0 += FA_BC) {
            const int64_t nc = kmax - kb0 < FA_BC ? kmax - kb0 : FA_BC;
            const int64_t ncp = (nc + VLEN - 1) / VLEN * VLEN;
            const acc_t *Kt = w.Kt;
            if (Kp)
                Kt = Kp + kb0 / FA_BC * d * FA_BC;
            else
                pack_k(p, &s, hk, kb0, nc, ncp, w.Kt, w.V);
            gemm_qk(w.Q, rows, d, Kt, ncp, w.S, 1);
            for (int64_t r = 0; r < nrows; r++) {
                acc_t *Sr = w.S + r * FA_BC;
                int64_t c0 = (w.lo[r] > kb0 ? w.lo[r] : kb0) - kb0;
                int64_t c1 = (w.hi[r] < kb0 + nc ? w.hi[r] : kb0 + nc) - kb0;
                if (c0 >= c1 || !(w.l[r] > 0))
                    continue;
                row_scores(p, &s, h, q0 + r, kb0, ncp, c0, c1, (acc_t)p->scale, Sr);
                for (int64_t c = c0; c < c1; c++)
                    Sr[c] = sexp_nonpos(Sr[c] - w.m[r]) / w.l[r];
                float *out = p->s_dmask + s.bi * p->sd_sb + h * p->sd_sh + (q0 + r) * p->sd_sr;
                for (int64_t c = c0; c < c1; c++)
                    out[kb0 + c] = (float)Sr[c];
                if (has_drop) {
                    /* Mark dropped entries by the sign bit: reuse the dropout pass on a copy. */
                    for (int64_t c = c0; c < c1; c++)
                        Sr[c] = 1;
                    row_dropout(p, &s, h, q0 + r, kb0, c0, c1, Sr, thr);
                    for (int64_t c = c0; c < c1; c++)
                        if (Sr[c] == 0)
                            out[kb0 + c] = -out[kb0 + c];
                }
            }
        }
    }
    return FA_OK;
}
