/* fa_decode__avx512.c: forward attention for work items of few query rows (decoding), AVX-512.
 *
 * A decode step (one new token per sequence; with GQA folding the G query heads of a kv head are
 * the G rows of one head) reads each K/V row once and does ~4 flops per element read and query
 * row: it is bound by memory bandwidth, not arithmetic. So:
 *   - One work item covers every head of its query rows (fa_fwd_kernel.all_heads) and walks the
 *     kv heads of each key block together: at BSHD strides the block's K and V rows of all heads
 *     are one contiguous range, read once, in order. (Items of one kv head read 256-byte rows a
 *     head stride apart: measured 3x slower per byte, the hardware prefetchers see no stream.)
 *     Split-KV (fa_driver.c) gives the cores work when there are few sequences.
 *   - K/V are read in place (no packed copy: every row is used by one item), widened to float32
 *     in registers as loaded, with a software prefetch of the next key block.
 *   - scores: per key, each 16-column chunk of K is loaded once and FMA'd into one accumulator
 *     per query row of the head; the 16-lane partial sums of 16 keys are then reduced by a
 *     transposing add tree into one vector of 16 scores per row (no horizontal sum per key).
 *   - softmax: online, per row, over blocks of BK keys, as in fa_fwd_impl.h.
 *   - P V: per 16-column chunk of V, each chunk is loaded once and FMA'd into one accumulator per
 *     row; the block's sum starts from zero and is added to O once (two-level summation: the
 *     error grows with BK plus the number of blocks, not with sk).
 * Float32 arithmetic throughout; bf16 and f16 widen exactly. A head's row count is padded to 1, 2,
 * 4, 8 or 16 so each count compiles to its own register allocation.
 * fa_driver.c routes here only calls this kernel supports (decode_fits): at most FA_DECODE_ROWS
 * queries per sequence, no S_dmask. Everything else of fa_fwd_params is honoured: bands
 * (causal/window, bottom-right anchored, prefix), softcap, alibi, pse, explicit mask, dropout, sink,
 * kvcache addressing (paged, seqlen_k, leftpad, cache_batch_idx), varlen, split-KV partials
 * (kclip, out_acc), lse and the NPU statistics.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "fa_cvt.h"
#include "fa_kernels.h"
#include "fa_philox_avx512.h"
#include "fa_seq.h"

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 64
#include "fa_vec.h" /* vexp_nonpos, vtanh: the same float32 exp/tanh as the other kernels */

#define NR_MAX FA_DECODE_ROWS /* query rows per item and head */
#define BK 64                 /* keys per block */
#define SLOTS 32              /* (head, row) pairs whose scores one pass over a key block makes */
#define DPAD(d) (((d) + 15) / 16 * 16)
#define PIECE(bytes) ((((size_t)(bytes)) + 63) / 64 * 64)

/* Row count of a head with n query rows, padded to an instantiated one (1, 2, 4, 8, 16). */
static int64_t pad_rows(int64_t n)
{
    return n <= 1 ? 1 : n <= 2 ? 2 : n <= 4 ? 4 : n <= 8 ? 8 : NR_MAX;
}

/* Rows per head an item holds: the call's longest query count (p->sq), padded. */
static int64_t rows_cap(const fa_fwd_params *p)
{
    return pad_rows(p->sq < NR_MAX ? p->sq : NR_MAX);
}

typedef struct {
    int64_t rc;         /* rows per head (rows_cap) */
    float *Q;           /* h x rc x dp, padding rows and columns zero */
    float *O;           /* h x rc x dp: unnormalized output */
    float *m, *l;       /* h x rc: running max and sum */
    float *S;           /* h x rc x BK: scores, then probabilities */
    float *T;           /* SLOTS x 16 x 16: per-key partial sums awaiting the add tree */
    int64_t *lo, *hi;   /* rc each: visible keys of each row (the same for every head) */
    const char **kr[2]; /* BK row pointers of kv head 0 in K: this block and the next */
    const char **vr[2]; /* the same for V */
} work;

static size_t scratch_size(const fa_fwd_params *p)
{
    const int64_t dp = DPAD(p->d), rc = rows_cap(p), hr = p->h * rc;
    return 2 * PIECE(hr * dp * 4) + 2 * PIECE(hr * 4) + PIECE(hr * BK * 4) +
           PIECE(SLOTS * 256 * 4) + 2 * PIECE(rc * 8) +
           4 * PIECE(BK * sizeof(char *));
}

static work carve(const fa_fwd_params *p, void *buf)
{
    const int64_t dp = DPAD(p->d), rc = rows_cap(p), hr = p->h * rc;
    char *b = buf;
    work w;
    w.rc = rc;
    w.Q = (float *)b, b += PIECE(hr * dp * 4);
    w.O = (float *)b, b += PIECE(hr * dp * 4);
    w.m = (float *)b, b += PIECE(hr * 4);
    w.l = (float *)b, b += PIECE(hr * 4);
    w.S = (float *)b, b += PIECE(hr * BK * 4);
    w.T = (float *)b, b += PIECE(SLOTS * 256 * 4);
    w.lo = (int64_t *)b, b += PIECE(rc * 8);
    w.hi = (int64_t *)b, b += PIECE(rc * 8);
    for (int i = 0; i < 2; i++) {
        w.kr[i] = (const char **)b, b += PIECE(BK * sizeof(char *));
        w.vr[i] = (const char **)b, b += PIECE(BK * sizeof(char *));
    }
    return w;
}

size_t fa_decode__avx512_scratch(const fa_fwd_params *p) { return scratch_size(p); }

#define INL static inline __attribute__((always_inline))

/* 16 columns of a K/V row from column c, widened to float32; lanes outside m read as 0. */
INL __m512 load16(const int dt, const char *row, int64_t c, __mmask16 m, int full)
{
    if (dt == FA_F32)
        return full ? _mm512_loadu_ps((const float *)row + c)
                    : _mm512_maskz_loadu_ps(m, (const float *)row + c);
    const __m256i x = full ? _mm256_loadu_si256((const __m256i *)((const uint16_t *)row + c))
                           : _mm256_maskz_loadu_epi16(m, (const uint16_t *)row + c);
    if (dt == FA_BF16) /* bf16 is the top half of a float32 */
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
    return _mm512_cvtph_ps(x);
}

/* Lane i of the result is the sum of the 16 lanes of row i of T (16 x 16): a transposing add
 * tree, 45 vector operations for 16 dot products instead of 16 horizontal sums. */
INL __m512 hsum16x16(const float *T)
{
    __m512 u[8], w[4];
    for (int i = 0; i < 8; i++) { /* per 128-bit lane: a0+a2, b0+b2, a1+a3, b1+b3 */
        __m512 a = _mm512_load_ps(T + 32 * i), b = _mm512_load_ps(T + 32 * i + 16);
        u[i] = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b));
    }
    for (int i = 0; i < 4; i++) { /* per 128-bit lane: the 4 rows' sums over that lane */
        __m512d a = _mm512_castps_pd(u[2 * i]), b = _mm512_castps_pd(u[2 * i + 1]);
        w[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                             _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    /* Add the four 128-bit lanes of each w[i]: two rounds of lane shuffles. */
    __m512 y0 = _mm512_add_ps(_mm512_shuffle_f32x4(w[0], w[1], 0x88),
                              _mm512_shuffle_f32x4(w[0], w[1], 0xdd));
    __m512 y1 = _mm512_add_ps(_mm512_shuffle_f32x4(w[2], w[3], 0x88),
                              _mm512_shuffle_f32x4(w[2], w[3], 0xdd));
    return _mm512_add_ps(_mm512_shuffle_f32x4(y0, y1, 0x88), _mm512_shuffle_f32x4(y0, y1, 0xdd));
}

/* Prefetch one key's K and V rows (rb bytes each) into L2. */
INL void prefetch_rows(const char *k, const char *v, int64_t rb)
{
    for (int64_t o = 0; o < rb; o += 64) {
        _mm_prefetch(k + o, _MM_HINT_T1);
        _mm_prefetch(v + o, _MM_HINT_T1);
    }
}

/* Raw dot products for query heads [ha, hb) (nr rows each, SLOTS at most in all) against the
 * block's nc keys, key by key so that K is read in memory order: each key's rows of those heads
 * are adjacent at BSHD strides. S of head h, row r: w->S + (h * rc + r) * BK, lanes up to the
 * next multiple of 16 are 0. With npf > 0, prefetches the next block's rows (nk, nv) of the same
 * kv heads meanwhile. kr[j] is key j's row of kv head 0; head g is ksh bytes further. */
INL void qk_block(const int dt, const int nr, const work *w, const fa_fwd_params *p, int64_t ha,
                  int64_t hb, const char *const *kr, int64_t nc, const char *const *nk,
                  const char *const *nv, int64_t npf)
{
    const int64_t d = p->d, dp = DPAD(d), dfull = d / 16 * 16, rc = w->rc, es = fa_dtype_size(p->dtype);
    const int64_t group = p->h / p->hk, ksh = p->k.sh * es, vsh = p->v.sh * es, rb = d * es;
    const int64_t ga = ha / group, gb = (hb - 1) / group + 1; /* kv heads of [ha, hb) */
    const __mmask16 tail = (__mmask16)((1u << (d - dfull)) - 1);
    for (int64_t g0 = 0; g0 < nc; g0 += 16) {
        const int64_t ng = nc - g0 < 16 ? nc - g0 : 16;
        for (int64_t jj = 0; jj < ng; jj++) {
            const int64_t j = g0 + jj;
            if (j < npf)
                for (int64_t g = ga; g < gb; g++)
                    prefetch_rows(nk[j] + g * ksh, nv[j] + g * vsh, rb);
            for (int64_t h = ha; h < hb; h++) {
                const char *row = kr[j] + h / group * ksh;
                const float *Q = w->Q + h * rc * dp;
                __m512 acc[NR_MAX];
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_setzero_ps();
                for (int64_t c = 0; c < dfull; c += 16) {
                    const __m512 k = load16(dt, row, c, 0xffff, 1);
                    for (int r = 0; r < nr; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_load_ps(Q + r * dp + c), k, acc[r]);
                }
                if (dfull < d) {
                    const __m512 k = load16(dt, row, dfull, tail, 0);
                    for (int r = 0; r < nr; r++)
                        acc[r] = _mm512_fmadd_ps(_mm512_load_ps(Q + r * dp + dfull), k, acc[r]);
                }
                float *T = w->T + (h - ha) * nr * 256 + jj * 16;
                for (int r = 0; r < nr; r++)
                    _mm512_store_ps(T + r * 256, acc[r]);
            }
        }
        for (int64_t t = 0; t < (hb - ha) * nr; t++) {
            for (int64_t jj = ng; jj < 16; jj++)
                _mm512_store_ps(w->T + t * 256 + jj * 16, _mm512_setzero_ps());
            const int64_t h = ha + t / nr, r = t % nr;
            _mm512_store_ps(w->S + (h * rc + r) * BK + g0, hsum16x16(w->T + t * 256));
        }
    }
}

/* O[r] += sum over the block's keys of P[r][j] V[j] (V row j at vr[j] + voff), nr rows of O
 * (stride dp): summed from zero per block. */
INL void pv_block(const int dt, const int nr, const float *P, float *O, int64_t d,
                  const char *const *vr, int64_t voff, int64_t nc)
{
    const int64_t dp = DPAD(d);
    for (int64_t c = 0; c < d; c += 16) {
        const int full = c + 16 <= d;
        const __mmask16 m = full ? 0xffff : (__mmask16)((1u << (d - c)) - 1);
        __m512 acc[NR_MAX];
        for (int r = 0; r < nr; r++)
            acc[r] = _mm512_setzero_ps();
        if (full) {
            for (int64_t j = 0; j < nc; j++) {
                const __m512 v = load16(dt, vr[j] + voff, c, m, 1);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(P[r * BK + j]), v, acc[r]);
            }
        } else {
            for (int64_t j = 0; j < nc; j++) {
                const __m512 v = load16(dt, vr[j] + voff, c, m, 0);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(P[r * BK + j]), v, acc[r]);
            }
        }
        for (int r = 0; r < nr; r++) {
            float *o = O + r * dp + c;
            _mm512_store_ps(o, _mm512_add_ps(_mm512_load_ps(o), acc[r]));
        }
    }
}

/* S[c] += pse of query i of head h and key kb0 + c, for c in [c0, c1) (NPU additive bias). */
static void add_pse(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i, int64_t kb0,
                    int64_t c0, int64_t c1, float *S)
{
    const int64_t base = s->q_batch * p->pse_sb + h * p->pse_sh + i * p->pse_sr;
    for (int64_t c = c0; c < c1; c++) {
        const int64_t at = base + (kb0 + c) * p->pse_sc;
        S[c] += p->pse_dtype == FA_F32    ? ((const float *)p->pse)[at]
                : p->pse_dtype == FA_F64  ? (float)((const double *)p->pse)[at]
                : p->pse_dtype == FA_BF16 ? fa_bf16_to_f32(((const uint16_t *)p->pse)[at])
                                          : (float)((const _Float16 *)p->pse)[at];
    }
}

/* Zeroes the dropped probabilities P[c], c in [c0, c1), of query i of head h (keys kb0 + c): the
 * Philox stream of fa_philox.h, four keys per draw, as every kernel draws it (64 keys per
 * vectorized call, fa_philox_avx512.h). */
static void drop_row(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i, int64_t kb0,
                     int64_t c0, int64_t c1, float *P)
{
    const uint64_t thr = fa_dropout_threshold(p->dropout_p), bh = (uint64_t)(s->bi * p->h + h);
    fa_drop_row_f32(p->seed, p->offset, bh, (uint64_t)i, kb0, c0, c1, thr, P);
}

/* Turns one row's raw dot products S of the block (keys kb0 .. kb0 + nc) into scores (pse,
 * scale, softcap, alibi, band, explicit mask: the order of fa_fwd_impl.h), then probabilities in
 * place (dropped ones zeroed), and updates the row's running max *m, sum *l and output O (dp floats): the online
 * softmax of fa_fwd_impl.h. Query i of head h sees keys [lo, hi); rows that see no key of the
 * block get P = 0. */
static void row_softmax(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i, int64_t lo,
                        int64_t hi, float *S, float *m, float *l, float *O, int64_t kb0,
                        int64_t nc)
{
    const int64_t dp = DPAD(p->d), ncp = (nc + 15) / 16 * 16;
    const int64_t c0 = (lo > kb0 ? lo : kb0) - kb0;
    const int64_t c1 = (hi < kb0 + nc ? hi : kb0 + nc) - kb0;
    if (c0 >= c1) {
        memset(S, 0, (size_t)ncp * 4);
        return;
    }
    const vec_t scale = vsplat((float)p->scale);
    const int softcap = p->softcap > 0;
    const float cap = (float)p->softcap, inv_cap = (float)(1.0 / p->softcap);
    const int alibi = p->alibi != NULL;
    float slope = 0, diag = 0;
    if (alibi) {
        slope = p->alibi[s->bi * p->alibi_sb + h];
        diag = (float)(i + s->sk - s->sq - kb0); /* alibi distance is bottom-right aligned */
    }
    if (p->pse && !p->pse_after_scale)
        add_pse(p, s, h, i, kb0, c0, c1, S);
    const vec_t iota = viota(), ninf = vsplat(-INFINITY);
    for (int64_t c = 0; c < ncp; c += 16) {
        vec_t x = vload(S + c) * scale;
        if (softcap)
            x = cap * vtanh(x * inv_cap);
        const vec_t col = iota + (float)c;
        if (alibi) {
            vec_t dist = vsplat(diag) - col;
            dist = vsel(dist < 0.0f, -dist, dist);
            x = x - slope * dist;
        }
        vstore(S + c, vsel((col >= (float)c0) & (col < (float)c1), x, ninf));
    }
    if (p->pse && p->pse_after_scale)
        add_pse(p, s, h, i, kb0, c0, c1, S);
    if (p->mask) {
        const float fill = (float)p->mask_fill;
        const uint8_t *mrow = p->mask + s->q_batch * p->mask_sb + h * p->mask_sh + i * p->mask_sr;
        for (int64_t c = c0; c < c1; c++)
            if (mrow[(kb0 + c) * p->mask_sc])
                S[c] = fill;
    }
    vec_t vm = ninf;
    for (int64_t c = 0; c < ncp; c += 16)
        vm = vmax(vm, vload(S + c));
    const float bm = vhmax(vm), m_old = *m;
    /* A NaN score (NaN input) must poison the row, not be skipped as "nothing visible". */
    const float m_new = (bm > m_old || bm != bm) ? bm : m_old;
    if (m_new == -INFINITY) { /* nothing visible yet */
        memset(S, 0, (size_t)ncp * 4);
        return;
    }
    vec_t vs = vsplat(0);
    const vec_t vmn = vsplat(m_new);
    for (int64_t c = 0; c < ncp; c += 16) {
        const vec_t e = vexp_nonpos(vload(S + c) - vmn);
        vstore(S + c, e);
        vs += e;
    }
    const float alpha = sexp_nonpos(m_old - m_new);
    *l = *l * alpha + vhsum(vs);
    *m = m_new;
    if (p->dropout_p > 0) /* after the sum: the statistics are those of the undropped P */
        drop_row(p, s, h, i, kb0, c0, c1, S);
    if (alpha != 1.0f) {
        const vec_t va = vsplat(alpha);
        for (int64_t k = 0; k < dp; k += 16)
            vstore(O + k, vload(O + k) * va);
    }
}

/* Writes query i of head h from its accumulator O (d floats), max m and sum l: out = O / l
 * (/ (1 - p_drop)) in the output dtype, lse and the NPU statistics. A row that saw no key gives 0 and lse +inf;
 * invalid-line rows (NPU) give 0. */
static void finish_row(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i,
                       const float *O, float m, float l)
{
    const int64_t d = p->d;
    const fa_dtype ot = fa_out_dtype(p);
    char *dst = (char *)p->o +
                (s->q_batch * p->o_sb + (s->q_row0 + i) * p->o_sr + h * p->o_sh) * fa_dtype_size(ot);
    const int empty = l == 0; /* a NaN sum (NaN input) propagates */
    const int invalid = p->invalid_line_zero && m == (float)p->mask_fill;
    const float drop_scale = p->dropout_p > 0 ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    const float mul = empty || invalid ? 0.0f : drop_scale / l;
    for (int64_t k = 0; k < d; k++) {
        const float x = empty || invalid ? 0.0f : O[k] * mul;
        if (ot == FA_F32)
            ((float *)dst)[k] = x;
        else if (ot == FA_BF16)
            ((uint16_t *)dst)[k] = fa_f32_to_bf16(x);
        else
            ((_Float16 *)dst)[k] = (_Float16)x;
    }
    const int64_t srow = p->cu_q ? s->q_row0 + i : i;
    const int64_t sbat = p->cu_q ? 0 : s->bi;
    if (p->lse) {
        const float v = empty ? INFINITY : m + (float)log((double)l);
        ((float *)p->lse)[sbat * p->lse_sb + h * p->lse_sh + srow * p->lse_sr] = v;
    }
    if (p->rowmax) {
        const int64_t off = sbat * p->stat_sb + h * p->stat_sh + srow * p->stat_sr;
        ((float *)p->rowmax)[off] = m;
        ((float *)p->rowsum)[off] = invalid ? FLT_MAX : l;
    }
}

/* Row pointers of kv head 0 in K and V for keys kb0 .. kb0 + n (head g adds g head strides). */
static void block_rows(const fa_fwd_params *p, const fa_seq *s, int64_t kb0, int64_t n,
                       const char **kr, const char **vr)
{
    const int64_t es = fa_dtype_size(p->dtype);
    if (!p->block_table) { /* rows a fixed stride apart */
        const char *k0 = fa_key_ptr(p, &p->k, s, kb0, 0, es);
        const char *v0 = fa_key_ptr(p, &p->v, s, kb0, 0, es);
        for (int64_t j = 0; j < n; j++) {
            kr[j] = k0 + j * p->k.sr * es;
            vr[j] = v0 + j * p->v.sr * es;
        }
        return;
    }
    for (int64_t j = 0; j < n; j++) {
        kr[j] = fa_key_ptr(p, &p->k, s, kb0 + j, 0, es);
        vr[j] = fa_key_ptr(p, &p->v, s, kb0 + j, 0, es);
    }
}

/* The item's key loop, nrows <= nr rows per head (nr a constant: one instance per row count). */
INL void item_loop(const int dt, const int nr, const fa_fwd_params *p, const fa_seq *s,
                   int64_t q0, int64_t nrows, work *w, int64_t kmin, int64_t kmax)
{
    const int64_t d = p->d, dp = DPAD(d), es = fa_dtype_size(p->dtype);
    const int64_t group = p->h / p->hk, rc = w->rc, vsh = p->v.sh * es;
    int cur = 0;
    int64_t nc = kmax - kmin < BK ? kmax - kmin : BK;
    block_rows(p, s, kmin, nc, w->kr[0], w->vr[0]);
    for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BK) {
        const int64_t kb1 = kb0 + BK;
        const int64_t nn = kb1 >= kmax ? 0 : kmax - kb1 < BK ? kmax - kb1 : BK;
        if (nn > 0)
            block_rows(p, s, kb1, nn, w->kr[cur ^ 1], w->vr[cur ^ 1]);
        /* Scores of SLOTS (head, row) pairs per pass over the block, then their softmax and
         * P V head by head (V rows from L2: the block was prefetched). */
        const int64_t hc = SLOTS / nr < p->h ? SLOTS / nr : p->h;
        for (int64_t ha = 0; ha < p->h; ha += hc) {
            const int64_t hb = ha + hc < p->h ? ha + hc : p->h;
            qk_block(dt, nr, w, p, ha, hb, w->kr[cur], nc, w->kr[cur ^ 1], w->vr[cur ^ 1], nn);
            for (int64_t h = ha; h < hb; h++) {
                float *O = w->O + h * rc * dp, *S = w->S + h * rc * BK;
                for (int r = 0; r < nr; r++) {
                    if (r < nrows)
                        row_softmax(p, s, h, q0 + r, w->lo[r], w->hi[r], S + r * BK,
                                    w->m + h * rc + r, w->l + h * rc + r, O + r * dp, kb0, nc);
                    else
                        memset(S + r * BK, 0, BK * 4);
                }
                pv_block(dt, nr, S, O, d, w->vr[cur], h / group * vsh, nc);
            }
        }
        cur ^= 1;
        nc = nn;
    }
}

#define DT_SWITCH(NR)                                                                              \
    switch (p->dtype) {                                                                            \
    case FA_F32: item_loop(FA_F32, NR, p, &s, q0, nrows, &w, kmin, kmax); break;                   \
    case FA_BF16: item_loop(FA_BF16, NR, p, &s, q0, nrows, &w, kmin, kmax); break;                 \
    default: item_loop(FA_F16, NR, p, &s, q0, nrows, &w, kmin, kmax); break;                       \
    }

/* One work item: query rows q0 .. q0 + FA_DECODE_ROWS of sequence bi, every head (the driver
 * passes h = 0: fa_fwd_kernel.all_heads). */
fa_status fa_decode__avx512_item(const fa_fwd_params *p, int64_t bi, int64_t h0, int64_t q0,
                                 const void *packed, void *buf)
{
    (void)packed;
    (void)h0;
    if (p->dtype != FA_F32 && p->dtype != FA_BF16 && p->dtype != FA_F16)
        return FA_ERR_ARG;
    const int64_t d = p->d, dp = DPAD(d), es = fa_dtype_size(p->dtype);
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t nrows = s.sq - q0 < NR_MAX ? s.sq - q0 : NR_MAX;
    work w = carve(p, buf);
    if (nrows > w.rc) /* p->sq is not the longest sequence: the binding guarantees it is */
        return FA_ERR_ARG;

    int64_t kmin = INT64_MAX, kmax = 0;
    for (int64_t r = 0; r < nrows; r++) {
        fa_row_band(p, &s, q0 + r, &w.lo[r], &w.hi[r]);
        if (w.lo[r] < w.hi[r]) {
            kmin = w.lo[r] < kmin ? w.lo[r] : kmin;
            kmax = w.hi[r] > kmax ? w.hi[r] : kmax;
        }
    }
    const int64_t hr = p->h * w.rc;
    memset(w.Q, 0, (size_t)(hr * dp * 4));
    memset(w.O, 0, (size_t)(hr * dp * 4));
    for (int64_t h = 0; h < p->h; h++) {
        for (int64_t r = 0; r < nrows; r++) {
            const char *src = (const char *)p->q.ptr +
                              (s.q_batch * p->q.sb + (s.q_row0 + q0 + r) * p->q.sr + h * p->q.sh) * es;
            float *q = w.Q + (h * w.rc + r) * dp;
            for (int64_t k = 0; k < d; k++)
                q[k] = p->dtype == FA_F32    ? ((const float *)src)[k]
                       : p->dtype == FA_BF16 ? fa_bf16_to_f32(((const uint16_t *)src)[k])
                                             : (float)((const _Float16 *)src)[k];
            /* The sink logit enters as one extra key with exp(0) = 1. */
            w.m[h * w.rc + r] = p->sink ? p->sink[h] : -INFINITY;
            w.l[h * w.rc + r] = p->sink ? 1.0f : 0.0f;
        }
    }
    if (kmin < kmax) {
        switch (pad_rows(nrows)) {
        case 1: DT_SWITCH(1) break;
        case 2: DT_SWITCH(2) break;
        case 4: DT_SWITCH(4) break;
        case 8: DT_SWITCH(8) break;
        default: DT_SWITCH(NR_MAX) break;
        }
    }
    for (int64_t h = 0; h < p->h; h++)
        for (int64_t r = 0; r < nrows; r++)
            finish_row(p, &s, h, q0 + r, w.O + (h * w.rc + r) * dp, w.m[h * w.rc + r],
                       w.l[h * w.rc + r]);
    return FA_OK;
}
