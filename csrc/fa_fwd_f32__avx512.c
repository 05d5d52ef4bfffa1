/* fa_fwd_f32__avx512.c: FlashAttention-2 forward with float32 arithmetic, AVX-512F intrinsics.
 *
 * Serves f32, f16 and bf16 inputs. When the driver packs K/V (every row reused by >= 2 items),
 * each (batch, kv head) is widened once into float32: K in panels of QK_MR keys per 128-key block,
 * element (key r, dim k) at k * QK_MR + r, and V in panels of PV_MR dims, element (key j, dim c)
 * at j * PV_MR + c % PV_MR, so each register tile broadcasts from one contiguous stream (six
 * separate row streams ran Q K^T ~10% slower, NOTES.md); otherwise f32 K rows are read in place
 * through row pointers (any stride, kvcache, paged) and V blocks (and f16/bf16 K blocks) are
 * widened block by block into scratch, V into the same panels.
 *
 * A work item is up to 256 queries of one (batch, head): four 64-query sub-blocks that share each
 * K/V block fetched. The score block is kept transposed (see fa_fwd_avx512_lanes.h):
 *   S^T = K Q^T   6 keys x 4 query vectors register tiles, one key element broadcast against 4
 *                 vectors of the sub-block's packed Q^T (d x 64)
 *   softmax       vertical, per query lane (fa_fwd_avx512_lanes.h)
 *   O^T = alpha O^T + V^T P^T   6 dims x 4 query vectors register tiles, one V element broadcast
 *                 against 4 vectors of P^T; the output is kept transposed too (dims x 64 per
 *                 sub-block), the per-query rescale is one vector per tile row, and the rows are
 *                 transposed back once per item.
 * Blocks are 128 keys: each sub-block's Q^T and O^T, fetched again from L2 for every
 * block, then serve twice the keys of 64-key blocks. Blocks that every row sees whole in calls
 * without pse/mask/softcap/alibi skip the masking.
 */
#include "fa_kernels.h"
#include "fa_fwd_avx512_lanes.h"

#define QB FA_FWD_F32_AVX512_ROWS /* queries per work item: QB / BR sub-blocks */
#define BC 128               /* keys per block (64: 5-9% slower on F1/F2, NOTES.md) */
#define QK_MR 6              /* keys per S^T register tile (x NQV vectors) */
#define PV_MR 6              /* dims per O^T register tile (x NQV query vectors) */
#define DP6(d) (((d) + PV_MR - 1) / PV_MR * PV_MR) /* dims in whole V panels */
#define OTR(d) DPAD(DP6(d))  /* O^T rows per sub-block: whole 16-row groups for the transposes */
#define NPAN ((BC + QK_MR - 1) / QK_MR) /* K panels per block in the packed copy */

/* ---- scratch -------------------------------------------------------------------------------- */

#define PIECE(bytes) ((((size_t)(bytes)) + 63) / 64 * 64)
#define DPAD(d) (((d) + 15) / 16 * 16)

typedef struct {
    fa_lanes ln;         /* ST, m, l, alpha (QB each), lo, hi (QB), c0, c1 (BR) */
    float *QT;           /* per sub-block d x BR: Q^T, padding queries zero */
    float *OT;           /* per sub-block OTR(d) x BR: unnormalized output, transposed */
    float *Kc;           /* BC x dpad: widened K rows (f16/bf16); 16 output rows at the end */
    float *Vc;           /* DP6(d) / PV_MR panels x BC keys x PV_MR: the V block (unpacked) */
    float *vrow;         /* DPAD(d) + 16 floats: one V row widened, zero past d */
    const float *Vpan;   /* the current block's first V panel (Vc, or in the packed copy) */
    int64_t vps;         /* floats from one V panel to the next */
    const float *Kpan;   /* the current K block's panels in the packed copy, or NULL: rows (kp) */
    float *zero;         /* dpad zeros: the K row of keys past the block end */
    const float **kp;    /* BC + QK_MR row pointers */
    const char **pf;     /* 2 BC: K and V rows of the next block, to prefetch */
    int64_t npf, pf_bytes;
} work;

/* The view of sub-block sb: its Q^T, output rows and statistics. */
static work sub_block(const work *w, int64_t sb, int64_t d)
{
    work v = *w;
    v.QT += sb * d * BR;
    v.OT += sb * OTR(d) * BR;
    v.ln.m += sb * BR, v.ln.l += sb * BR, v.ln.alpha += sb * BR;
    v.ln.lo += sb * BR, v.ln.hi += sb * BR;
    return v;
}

static size_t scratch_size(int64_t d)
{
    int64_t dp = DPAD(d);
    return PIECE(d * QB * 4) + PIECE((BC + QK_MR) * BR * 4) + PIECE(QB * OTR(d) * 4) +
           PIECE(BC * dp * 4) + PIECE(DP6(d) * BC * 4) + PIECE((dp + 16) * 4) + PIECE(dp * 4) +
           PIECE((BC + QK_MR) * sizeof(float *)) +
           PIECE(2 * BC * sizeof(char *)) +
           3 * PIECE(QB * 4) + 2 * PIECE(QB * 8) + 2 * PIECE(BR * 4);
}

static work carve(void *buf, int64_t d)
{
    int64_t dp = DPAD(d);
    char *p = (char *)buf;
    work w;
    w.QT = (float *)p, p += PIECE(d * QB * 4);
    w.ln.ST = (float *)p, p += PIECE((BC + QK_MR) * BR * 4);
    w.OT = (float *)p, p += PIECE(QB * OTR(d) * 4);
    w.Kc = (float *)p, p += PIECE(BC * dp * 4);
    w.Vc = (float *)p, p += PIECE(DP6(d) * BC * 4);
    w.vrow = (float *)p, p += PIECE((dp + 16) * 4);
    w.zero = (float *)p, p += PIECE(dp * 4);
    w.kp = (const float **)p, p += PIECE((BC + QK_MR) * sizeof(float *));
    w.pf = (const char **)p, p += PIECE(2 * BC * sizeof(char *));
    w.ln.m = (float *)p, p += PIECE(QB * 4);
    w.ln.l = (float *)p, p += PIECE(QB * 4);
    w.ln.alpha = (float *)p, p += PIECE(QB * 4);
    w.ln.lo = (int64_t *)p, p += PIECE(QB * 8);
    w.ln.hi = (int64_t *)p, p += PIECE(QB * 8);
    w.ln.c0 = (int32_t *)p, p += PIECE(BR * 4);
    w.ln.c1 = (int32_t *)p;
    return w;
}

size_t fa_fwd_f32__avx512_scratch(const fa_fwd_params *p) { return scratch_size(p->d); }

/* ---- micro-kernels -------------------------------------------------------------------------- */

/* Running per-lane statistics of a plain block while its tiles are stored: the block max and
 * the lanes that saw a NaN (block_softmax then skips its max pass). */
typedef struct {
    __m512 scale;
    __m512 max[NQV];
    __mmask16 nan[NQV];
} fused_max;

/* S^T[j0 + r][0..BR) = K[j0 + r] . Q^T for r < MR, keys from row pointers kp (KK 1) or from the
 * panel pan (KK = QK_MR): MR x NQV accumulators (24 at MR = 6, which
 * leaves registers for the 4 Q^T vectors; 10 loads feed 24 FMAs). With fm, the tile is stored
 * scaled (the scores of a plain block, as block_scores would make them) and its first nvalid
 * rows join fm's max. */
INL void qk_tile(const int MR, const int KK, const float *restrict QT, const float *const *kp,
                 const float *pan, int64_t d, float *restrict ST, fused_max *fm, int nvalid)
{
    __m512 acc[QK_MR][NQV];
    const float *kr[QK_MR]; /* key r's dim k at kr[r][k * KK]: a row (KK 1) or a panel (QK_MR) */
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) {
        kr[r] = KK == 1 ? kp[r] : pan + r;
#pragma GCC unroll 16
        for (int v = 0; v < NQV; v++)
            acc[r][v] = _mm512_setzero_ps();
    }
    for (int64_t k = 0; k < d; k++) {
        __m512 q[NQV];
#pragma GCC unroll 16
        for (int v = 0; v < NQV; v++)
            q[v] = _mm512_load_ps(QT + k * BR + v * 16);
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            const __m512 b = _mm512_set1_ps(kr[r][k * KK]);
#pragma GCC unroll 16
            for (int v = 0; v < NQV; v++)
                acc[r][v] = _mm512_fmadd_ps(b, q[v], acc[r][v]);
        }
    }
    if (!fm) {
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++)
#pragma GCC unroll 16
            for (int v = 0; v < NQV; v++)
                _mm512_store_ps(ST + r * BR + v * 16, acc[r][v]);
        return;
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) {
#pragma GCC unroll 16
        for (int v = 0; v < NQV; v++) {
            const __m512 x = _mm512_mul_ps(acc[r][v], fm->scale);
            _mm512_store_ps(ST + r * BR + v * 16, x);
            if (r < nvalid) { /* rows past the block end hold the zero key's scores */
                fm->max[v] = _mm512_max_ps(x, fm->max[v]);
                fm->nan[v] |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
            }
        }
    }
}

/* O^T[c][..] = alpha O^T[c][..] + sum_j V[j][c] P^T[j][..] for MR dims c of one V panel (key j's
 * dims at Vp[j * PV_MR]) and the sub-block's NQV query vectors. The block's sum starts from zero
 * and is added to O once: a two-level summation whose rounding error grows with the block size
 * plus the number of blocks, not with the sequence length. */
INL void pv_tile(const int MR, const float *restrict PT, const float *restrict Vp, int64_t nc,
                 const __m512 *alpha, float *restrict OT)
{
    __m512 acc[PV_MR][NQV];
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 16
        for (int v = 0; v < NQV; v++)
            acc[r][v] = _mm512_setzero_ps();
    for (int64_t j = 0; j < nc; j++) {
        __m512 pv[NQV];
#pragma GCC unroll 16
        for (int v = 0; v < NQV; v++)
            pv[v] = _mm512_load_ps(PT + j * BR + v * 16);
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            const __m512 b = _mm512_set1_ps(Vp[j * PV_MR + r]);
#pragma GCC unroll 16
            for (int v = 0; v < NQV; v++)
                acc[r][v] = _mm512_fmadd_ps(b, pv[v], acc[r][v]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 16
        for (int v = 0; v < NQV; v++)
            _mm512_store_ps(OT + r * BR + v * 16,
                            _mm512_fmadd_ps(alpha[v], _mm512_load_ps(OT + r * BR + v * 16), acc[r][v]));
}

/* Prefetch into L2 the next block's K and V rows [j0, j1): spread over the QK tiles so the
 * misses never pile up in the fill buffers. */
static inline void prefetch_rows(const work *w, int64_t j0, int64_t j1)
{
    j1 = j1 < w->npf ? j1 : w->npf;
    for (int64_t j = j0; j < j1; j++)
        for (int64_t b = 0; b < w->pf_bytes; b += 64) {
            _mm_prefetch(w->pf[2 * j] + b, _MM_HINT_T1);
            if (w->pf[2 * j + 1])
                _mm_prefetch(w->pf[2 * j + 1] + b, _MM_HINT_T1);
        }
}

/* S^T for keys [0, nc) of the block: kp holds the row pointers, padded with zero rows. With
 * `pf` set, also prefetches the next block's rows; with fm, stores final scores of a plain block
 * and takes their max (see qk_tile). */
static void gemm_qk(const work *w, int64_t d, int64_t nc, int pf, fused_max *fm)
{
    int64_t j = 0;
    if (w->Kpan) {
        /* Panels: a tail of <= 4 keys takes a 4-key tile, 5 keys a whole panel (the panel's
         * rows past the sequence end are zero, rows past nc real keys: either is discarded). */
        for (; j < nc; j += QK_MR) {
            const float *pan = w->Kpan + j * d;
            float *ST = w->ln.ST + j * BR;
            if (nc - j <= 4)
                qk_tile(4, QK_MR, w->QT, NULL, pan, d, ST, fm, (int)(nc - j));
            else
                qk_tile(QK_MR, QK_MR, w->QT, NULL, pan, d, ST, fm, (int)(nc - j));
        }
        return;
    }
    for (; j + QK_MR <= nc; j += QK_MR) {
        if (pf)
            prefetch_rows(w, j, j + QK_MR);
        qk_tile(QK_MR, 1, w->QT, w->kp + j, NULL, d, w->ln.ST + j * BR, fm, QK_MR);
    }
    for (; j < nc; j += 4)
        qk_tile(4, 1, w->QT, w->kp + j, NULL, d, w->ln.ST + j * BR, fm, (int)(nc - j));
    if (pf)
        prefetch_rows(w, nc / QK_MR * QK_MR, BC);
}

/* O^T = alpha O^T + V^T P^T over the block's nc keys, every query lane of the sub-block (lanes
 * past its rows hold P = 0 or garbage that no output row reads). */
static void gemm_pv(const work *w, int64_t d, int64_t nc)
{
    __m512 alpha[NQV];
    for (int v = 0; v < NQV; v++)
        alpha[v] = _mm512_loadu_ps(w->ln.alpha + v * 16);
    for (int64_t c0 = 0; c0 < d; c0 += PV_MR) {
        const float *Vp = w->Vpan + c0 / PV_MR * w->vps;
        if (d - c0 <= 4) /* the last panel's padding dims land in O^T rows no output reads */
            pv_tile(4, w->ln.ST, Vp, nc, alpha, w->OT + c0 * BR);
        else
            pv_tile(PV_MR, w->ln.ST, Vp, nc, alpha, w->OT + c0 * BR);
    }
}

/* ---- K/V rows of a block ---------------------------------------------------------------------- */

/* One V row (n dims of dtype t at src) into dims-panels: dim c to dst[(c / PV_MR) ps + c % PV_MR].
 * row: DPAD(n) + 16 floats whose last 16 are zero. */
static inline void v_to_panels(fa_dtype t, const void *src, int64_t n, float *row, float *dst,
                               int64_t ps)
{
    widen_row(t, src, n, row);
    for (int64_t c = 0; c < n; c += PV_MR)
        _mm512_mask_storeu_ps(dst + c / PV_MR * ps, (__mmask16)((1u << PV_MR) - 1),
                              _mm512_loadu_ps(row + c));
}

/* Offset in floats of the K panel holding key j in the packed copy: NPAN panels of QK_MR x d
 * per BC-key block. */
static int64_t k_panel_at(int64_t d, int64_t j)
{
    return (j / BC * NPAN + j % BC / QK_MR) * QK_MR * d;
}

/* Floats of the packed copy's K panels for sk keys (whole blocks of NPAN panels), rounded up
 * to whole vectors so that V's panels after them start on a cache line. */
static int64_t packed_k_floats(int64_t d, int64_t sk)
{
    return DPAD(k_panel_at(d, (sk + BC - 1) / BC * BC));
}

/* K panels and V panels in the packed copy, or else row pointers (f32 K), widened copies
 * (f16/bf16 K) and V copied into panels in scratch, for keys [kb0, kb0 + nc), plus the addresses
 * of the next block's rows (up to kend) for gemm_qk to prefetch: consecutive keys are a head
 * stride apart (often a page or more), beyond the reach of the hardware prefetchers. */
static void block_rows(const fa_fwd_params *p, const fa_seq *s, int64_t hk, const float *packed,
                       int64_t kb0, int64_t nc, int64_t kend, int want_v, work *w)
{
    const int64_t d = p->d, dp = DPAD(d), es = fa_dtype_size(p->dtype);
    w->Kpan = NULL;
    if (packed) {
        /* Contiguous panels and rows: the hardware prefetchers keep up on their own. Packed
         * blocks start at multiples of BC (the item aligns kmin). */
        w->Kpan = packed + k_panel_at(d, kb0);
        w->Vpan = packed + packed_k_floats(d, s->sk) + kb0 * PV_MR;
        w->vps = s->sk * PV_MR;
        w->npf = 0;
        return;
    }
    const int64_t nnext = kend - (kb0 + BC) < BC ? kend - (kb0 + BC) : BC;
    w->npf = nnext > 0 ? nnext : 0;
    for (int64_t j = 0; j < w->npf; j++) {
        w->pf[2 * j] = fa_key_ptr(p, &p->k, s, kb0 + BC + j, hk, es);
        w->pf[2 * j + 1] = want_v ? fa_key_ptr(p, &p->v, s, kb0 + BC + j, hk, es) : NULL;
    }
    w->pf_bytes = d * es;
    for (int64_t j = 0; j < nc; j++) {
        const char *kr = fa_key_ptr(p, &p->k, s, kb0 + j, hk, es);
        if (p->dtype == FA_F32) {
            w->kp[j] = (const float *)kr;
        } else {
            widen_row(p->dtype, kr, d, w->Kc + j * dp);
            w->kp[j] = w->Kc + j * dp;
        }
        /* V is always copied, into panels (the layout pv_tile reads; rows at a large
         * power-of-two stride would also all land in the same few L1 sets). */
        if (want_v)
            v_to_panels(p->dtype, fa_key_ptr(p, &p->v, s, kb0 + j, hk, es), d, w->vrow,
                        w->Vc + j * PV_MR, BC * PV_MR);
    }
    w->Vpan = w->Vc;
    w->vps = BC * PV_MR;
    for (int64_t j = nc; j < nc + 4; j++) /* the tiles of gemm_qk overrun nc by at most 3 */
        w->kp[j] = w->zero;
}

/* Packed copy of (batch bi, kv head hk), float32: K as NPAN panels per BC-key block, panel t of
 * block b holding keys b BC + t QK_MR + r (r < QK_MR) at [k * QK_MR + r] (keys past sk zero); then
 * V as DP6(d) / PV_MR panels over all keys, panel t holding dim t PV_MR + c of key j at
 * [j * PV_MR + c] (dims past d zero). */
size_t fa_fwd_f32__avx512_pack_bytes(const fa_fwd_params *p, int64_t sk)
{
    return (size_t)(packed_k_floats(p->d, sk) + sk * DP6(p->d)) * sizeof(float);
}

void fa_fwd_f32__avx512_pack(const fa_fwd_params *p, int64_t bi, int64_t hk, void *dst)
{
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t d = p->d, es = fa_dtype_size(p->dtype);
    float *Kp = (float *)dst, *Vp = Kp + packed_k_floats(d, s.sk);
    float rows[QK_MR][512] __attribute__((aligned(64))); /* one panel's keys widened, d <= 512 */
    float vrow[512 + 16] __attribute__((aligned(64))); /* zero past d: v_to_panels reads on */
    memset(vrow, 0, sizeof vrow);
    for (int64_t j0 = 0, n; j0 < s.sk; j0 += n) {
        /* keys j0.. of one panel: a block's last panel ends at the block end (or at sk), its
         * missing keys stored as zeros */
        const int64_t end = (j0 / BC + 1) * BC < s.sk ? (j0 / BC + 1) * BC : s.sk;
        n = end - j0 < QK_MR ? end - j0 : QK_MR;
        float *pan = Kp + k_panel_at(d, j0);
        __m512 r[16], o[16];
        for (int64_t i = 0; i < n; i++)
            widen_row(p->dtype, fa_key_ptr(p, &p->k, &s, j0 + i, hk, es), d, rows[i]);
        /* 16 dims at a time: the panel's rows transposed, each dim's QK_MR keys stored at once */
        for (int64_t k0 = 0; k0 < d; k0 += 16) {
            for (int i = 0; i < 16; i++)
                r[i] = i < n ? _mm512_load_ps(rows[i] + k0) : _mm512_setzero_ps();
            fa_t16(r, o);
            for (int64_t k = k0; k < d && k < k0 + 16; k++)
                _mm512_mask_storeu_ps(pan + k * QK_MR, (__mmask16)((1u << QK_MR) - 1), o[k - k0]);
        }
        for (int64_t i = 0; i < n; i++)
            v_to_panels(p->dtype, fa_key_ptr(p, &p->v, &s, j0 + i, hk, es), d, vrow,
                        Vp + (j0 + i) * PV_MR, s.sk * PV_MR);
    }
    /* the last block's panels past sk (never read) and the vector padding: zeros, not garbage */
    const int64_t used = s.sk > 0 ? k_panel_at(d, s.sk - 1) + QK_MR * d : 0; /* through sk - 1's */
    memset(Kp + used, 0, (size_t)(packed_k_floats(d, s.sk) - used) * sizeof(float));
}

/* ---- the work item ---------------------------------------------------------------------------- */

fa_status fa_fwd_f32__avx512_item(const fa_fwd_params *p, int64_t bi, int64_t h, int64_t q0,
                                  const void *packed, void *buf)
{
    const int64_t d = p->d, dp = DPAD(d);
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t hk = h / (p->h / p->hk);
    const int64_t nrows = s.sq - q0 < QB ? s.sq - q0 : QB;
    const int64_t nsub = (nrows + BR - 1) / BR;
    const int64_t es = fa_dtype_size(p->dtype);
    work w = carve(buf, d);
    const int has_drop = p->dropout_p > 0;
    const uint64_t thr = fa_dropout_threshold(p->dropout_p);
    const int featured = p->pse || p->mask || p->softcap > 0 || p->alibi;

    /* Visible keys of every row, of every sub-block and of the whole item. */
    int64_t kmin, kmax, smin[QB / BR], smax[QB / BR];
    item_bands(p, &s, q0, nrows, &w.ln, smin, smax, &kmin, &kmax);
    if (packed) /* the packed panels come in whole blocks: keys before a row's band get masked */
        kmin = kmin / BC * BC;

    /* Q^T per sub-block, padding queries zero; statistics start empty (or at the sink logit,
     * one extra key whose exp(sink - m) enters the denominator only). */
    memset(w.QT, 0, (size_t)(d * BR * nsub) * 4);
    for (int64_t r0 = 0; r0 < nrows; r0 += 16) {
        /* 16 query rows widened into Kc (rows past the end zero), then transposed 16 x 16 */
        for (int64_t r = r0; r < r0 + 16; r++) {
            if (r < nrows) {
                const char *src = (const char *)p->q.ptr +
                                  (s.q_batch * p->q.sb + (s.q_row0 + q0 + r) * p->q.sr + h * p->q.sh) * es;
                widen_row(p->dtype, src, d, w.Kc + (r - r0) * dp);
            } else {
                memset(w.Kc + (r - r0) * dp, 0, (size_t)dp * 4);
            }
        }
        float *qt = w.QT + (r0 / BR) * d * BR + r0 % BR;
        int64_t k = 0;
        for (; k + 16 <= d; k += 16)
            transpose16(w.Kc + k, dp, qt + k * BR, BR);
        for (; k < d; k++)
            for (int64_t r = 0; r < 16; r++)
                qt[k * BR + r] = w.Kc[r * dp + k];
    }
    for (int64_t r = 0; r < nsub * BR; r++) {
        w.ln.m[r] = -INFINITY;
        w.ln.l[r] = 0;
        if (p->sink && r < nrows) {
            w.ln.m[r] = p->sink[h];
            w.ln.l[r] = 1;
        }
    }
    memset(w.OT, 0, (size_t)(nsub * OTR(d) * BR) * 4);
    memset(w.vrow, 0, (size_t)(dp + 16) * 4);
    memset(w.zero, 0, (size_t)dp * 4);

    /* Each key block is fetched once and used by every sub-block whose band meets it. */
    for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BC) {
        const int64_t nc = kmax - kb0 < BC ? kmax - kb0 : BC;
        block_rows(p, &s, hk, (const float *)packed, kb0, nc, kmax, 1, &w);
        int pf_done = 0;
        for (int64_t sb = 0; sb < nsub; sb++) {
            if (smin[sb] >= kb0 + nc || smax[sb] <= kb0)
                continue;
            work v = sub_block(&w, sb, d);
            const int64_t qs = q0 + sb * BR;
            const int64_t nr = nrows - sb * BR < BR ? nrows - sb * BR : BR;
            /* Keys of the block past this sub-block's last visible key (causal diagonal) are
             * masked for all its rows: leave them out instead. */
            const int64_t ncs = smax[sb] - kb0 < nc ? smax[sb] - kb0 : nc;
            const int full = block_band(&v.ln, nr, kb0, ncs);
            if (full && !featured) {
                /* plain block: scale and block max taken as the tiles are stored, so neither
                 * block_scores nor the max pass of block_softmax reads S^T again */
                fused_max fm;
                fm.scale = _mm512_set1_ps((float)p->scale);
                for (int q = 0; q < NQV; q++)
                    fm.max[q] = _mm512_set1_ps(-INFINITY), fm.nan[q] = 0;
                gemm_qk(&v, d, ncs, !pf_done, &fm);
                block_softmax(&v.ln, ncs, fm.max, fm.nan);
            } else {
                gemm_qk(&v, d, ncs, !pf_done, NULL);
                block_scores(p, &s, h, qs, nr, kb0, ncs, &v.ln);
                block_softmax(&v.ln, ncs, NULL, NULL);
            }
            pf_done = 1;
            if (has_drop)
                block_dropout(p, &s, h, qs, nr, kb0, &v.ln, v.ln.ST, thr);
            gemm_pv(&v, d, ncs);
        }
    }

    const float drop_scale = has_drop ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    for (int64_t r0 = 0; r0 < nrows; r0 += 16) {
        /* 16 output rows back from O^T into Kc, then normalized and stored */
        const float *OT = w.OT + (r0 / BR) * OTR(d) * BR + r0 % BR;
        for (int64_t c0 = 0; c0 < d; c0 += 16)
            transpose16(OT + c0 * BR, BR, w.Kc + c0, dp);
        for (int64_t r = r0; r < nrows && r < r0 + 16; r++)
            finish_row(p, &s, h, q0 + r, &w.ln, r, w.Kc + (r - r0) * dp, drop_scale);
    }

    /* S_dmask (testing aid): recompute the scores block by block and write the normalized
     * probabilities of the visible columns, dropped entries negated. */
    if (p->s_dmask) {
        for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BC) {
            const int64_t nc = kmax - kb0 < BC ? kmax - kb0 : BC;
            block_rows(p, &s, hk, (const float *)packed, kb0, nc, kmax, 0, &w);
            for (int64_t sb = 0; sb < nsub; sb++) {
                if (smin[sb] >= kb0 + nc || smax[sb] <= kb0)
                    continue;
                work v = sub_block(&w, sb, d);
                const int64_t qs = q0 + sb * BR;
                const int64_t nr = nrows - sb * BR < BR ? nrows - sb * BR : BR;
                block_band(&v.ln, nr, kb0, nc);
                gemm_qk(&v, d, nc, 0, NULL);
                block_scores(p, &s, h, qs, nr, kb0, nc, &v.ln);
                s_dmask_block(p, &s, h, qs, nr, kb0, nc, has_drop, thr, &v.ln);
            }
        }
    }
    return FA_OK;
}
