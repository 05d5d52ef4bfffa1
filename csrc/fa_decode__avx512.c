/* fa_decode__avx512.c: forward attention for work items of few query rows (decoding), AVX-512.
 *
 * A decode step (one new token per sequence; with GQA folding the G query heads of a kv head are
 * the G rows of one item) reads each K/V row once and does ~4 flops per element read and query
 * row: it is bound by memory bandwidth, not arithmetic. So this kernel streams K and V rows in
 * place (no packed copy: each row is used by one item only), widens them to float32 in registers
 * as they are loaded, prefetches one key block ahead (rows a head stride apart defeat the hardware
 * prefetcher) and keeps every query row of the item (at most FA_DECODE_ROWS) against each key:
 *   scores   per key, each 16-column chunk of K is loaded once and FMA'd into one accumulator per
 *            row; the 16-lane partial sums of 16 keys are then reduced by a transposing add tree
 *            into one vector of 16 scores per row (no horizontal sum per key)
 *   softmax  online, per row, over blocks of BK keys, as in fa_fwd_impl.h
 *   P V      per 16-column chunk of V, each chunk is loaded once and FMA'd into one accumulator
 *            per row; the block's sum starts from zero and is added to O once (two-level
 *            summation: the error grows with BK plus the number of blocks, not with sk)
 * Float32 arithmetic throughout; bf16 and f16 widen exactly. Row counts are padded to 1, 2, 4, 8
 * or 16 so each count compiles to its own register allocation.
 * fa_driver.c routes here only calls this kernel supports (fa_decode_fits): no pse, explicit
 * mask, dropout or S_dmask. Everything else of fa_fwd_params is honoured: bands (causal/window,
 * bottom-right anchored, prefix), softcap, alibi, sink, kvcache addressing (paged, seqlen_k,
 * leftpad, cache_batch_idx), varlen, split-KV partials (kclip, out_acc), lse and the NPU
 * statistics.
 */
#include <float.h>
#include <immintrin.h>
#include <math.h>
#include <string.h>

#include "fa_cvt.h"
#include "fa_kernels.h"
#include "fa_seq.h"

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 64
#include "fa_vec.h" /* vexp_nonpos, vtanh: the same float32 exp/tanh as the other kernels */

#define NR_MAX FA_DECODE_ROWS /* query rows per item */
#define BK 64                 /* keys per block */
#define DPAD(d) (((d) + 15) / 16 * 16)
#define PIECE(bytes) ((((size_t)(bytes)) + 63) / 64 * 64)

typedef struct {
    float *Q;           /* NR_MAX x dp, padding rows and columns zero */
    float *O;           /* NR_MAX x dp: unnormalized output */
    float *S;           /* NR_MAX x BK: scores, then probabilities */
    float *T;           /* NR_MAX x 16 x 16: per-key partial sums awaiting the add tree */
    float *m, *l;       /* NR_MAX each */
    int64_t *lo, *hi;   /* NR_MAX each: visible keys of each row */
    const char **kr[2]; /* BK row pointers of K: this block and the next */
    const char **vr[2]; /* the same for V */
} work;

static size_t scratch_size(int64_t d)
{
    const int64_t dp = DPAD(d);
    return 2 * PIECE(NR_MAX * dp * 4) + PIECE(NR_MAX * BK * 4) + PIECE(NR_MAX * 256 * 4) +
           2 * PIECE(NR_MAX * 4) + 2 * PIECE(NR_MAX * 8) + 4 * PIECE(BK * sizeof(char *));
}

static work carve(void *buf, int64_t d)
{
    const int64_t dp = DPAD(d);
    char *p = buf;
    work w;
    w.Q = (float *)p, p += PIECE(NR_MAX * dp * 4);
    w.O = (float *)p, p += PIECE(NR_MAX * dp * 4);
    w.S = (float *)p, p += PIECE(NR_MAX * BK * 4);
    w.T = (float *)p, p += PIECE(NR_MAX * 256 * 4);
    w.m = (float *)p, p += PIECE(NR_MAX * 4);
    w.l = (float *)p, p += PIECE(NR_MAX * 4);
    w.lo = (int64_t *)p, p += PIECE(NR_MAX * 8);
    w.hi = (int64_t *)p, p += PIECE(NR_MAX * 8);
    for (int i = 0; i < 2; i++) {
        w.kr[i] = (const char **)p, p += PIECE(BK * sizeof(char *));
        w.vr[i] = (const char **)p, p += PIECE(BK * sizeof(char *));
    }
    return w;
}

size_t fa_decode__avx512_scratch(const fa_fwd_params *p) { return scratch_size(p->d); }

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

/* Lane i of the result is the sum of the 16 lanes of v[i]: a transposing add tree, 45 vector
 * operations for 16 dot products instead of 16 horizontal sums. */
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

/* Prefetch the K and V rows (rb bytes each) of one key of the next block into L2. */
INL void prefetch_rows(const char *k, const char *v, int64_t rb)
{
    for (int64_t o = 0; o < rb; o += 64) {
        _mm_prefetch(k + o, _MM_HINT_T1);
        _mm_prefetch(v + o, _MM_HINT_T1);
    }
}

/* Raw dot products S[r][0..nc) = Q[r] . K[key] for the block's nc keys (row pointers kr); lanes
 * up to the next multiple of 16 are 0. Prefetches the next block's npf rows (nk, nv) meanwhile. */
INL void qk_block(const int dt, const int nr, const work *w, int64_t d, const char *const *kr,
                  int64_t nc, const char *const *nk, const char *const *nv, int64_t npf, int64_t rb)
{
    const int64_t dp = DPAD(d), dfull = d / 16 * 16;
    const __mmask16 tail = (__mmask16)((1u << (d - dfull)) - 1);
    for (int64_t g0 = 0; g0 < nc; g0 += 16) {
        const int64_t ng = nc - g0 < 16 ? nc - g0 : 16;
        for (int64_t jj = 0; jj < ng; jj++) {
            const int64_t j = g0 + jj;
            if (j < npf)
                prefetch_rows(nk[j], nv[j], rb);
            const char *row = kr[j];
            __m512 acc[NR_MAX];
            for (int r = 0; r < nr; r++)
                acc[r] = _mm512_setzero_ps();
            for (int64_t c = 0; c < dfull; c += 16) {
                const __m512 k = load16(dt, row, c, 0xffff, 1);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_load_ps(w->Q + r * dp + c), k, acc[r]);
            }
            if (dfull < d) {
                const __m512 k = load16(dt, row, dfull, tail, 0);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_load_ps(w->Q + r * dp + dfull), k, acc[r]);
            }
            for (int r = 0; r < nr; r++)
                _mm512_store_ps(w->T + (r * 16 + jj) * 16, acc[r]);
        }
        for (int64_t jj = ng; jj < 16; jj++)
            for (int r = 0; r < nr; r++)
                _mm512_store_ps(w->T + (r * 16 + jj) * 16, _mm512_setzero_ps());
        for (int r = 0; r < nr; r++)
            _mm512_store_ps(w->S + r * BK + g0, hsum16x16(w->T + r * 256));
    }
}

/* O[r] += sum over the block's keys of P[r][j] V[j]: summed from zero per block. */
INL void pv_block(const int dt, const int nr, const work *w, int64_t d, const char *const *vr,
                  int64_t nc)
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
                const __m512 v = load16(dt, vr[j], c, m, 1);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(w->S[r * BK + j]), v, acc[r]);
            }
        } else {
            for (int64_t j = 0; j < nc; j++) {
                const __m512 v = load16(dt, vr[j], c, m, 0);
                for (int r = 0; r < nr; r++)
                    acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(w->S[r * BK + j]), v, acc[r]);
            }
        }
        for (int r = 0; r < nr; r++) {
            float *o = w->O + r * dp + c;
            _mm512_store_ps(o, _mm512_add_ps(_mm512_load_ps(o), acc[r]));
        }
    }
}

/* Turns row r's raw dot products of the block (keys kb0 .. kb0 + nc) into probabilities in place
 * and updates its running max, sum and output scale (the online softmax of fa_fwd_impl.h). Rows
 * that see no key of the block get P = 0. */
static void row_softmax(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i,
                        const work *w, int r, int64_t kb0, int64_t nc)
{
    const int64_t dp = DPAD(p->d), ncp = (nc + 15) / 16 * 16;
    float *S = w->S + r * BK;
    const int64_t c0 = (w->lo[r] > kb0 ? w->lo[r] : kb0) - kb0;
    const int64_t c1 = (w->hi[r] < kb0 + nc ? w->hi[r] : kb0 + nc) - kb0;
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
    const vec_t iota = viota(), ninf = vsplat(-INFINITY);
    vec_t vm = ninf;
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
        x = vsel((col >= (float)c0) & (col < (float)c1), x, ninf);
        vstore(S + c, x);
        vm = vmax(vm, x);
    }
    const float bm = vhmax(vm), m_old = w->m[r];
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
    w->l[r] = w->l[r] * alpha + vhsum(vs);
    w->m[r] = m_new;
    if (alpha != 1.0f) {
        float *o = w->O + r * dp;
        const vec_t va = vsplat(alpha);
        for (int64_t k = 0; k < dp; k += 16)
            vstore(o + k, vload(o + k) * va);
    }
}

/* Writes row r (query i): out = O / l in the output dtype, lse and the NPU statistics. A row that
 * saw no key gives 0 and lse +inf; invalid-line rows (NPU) give 0. */
static void finish_row(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i,
                       const work *w, int r)
{
    const int64_t d = p->d;
    const fa_dtype ot = fa_out_dtype(p);
    char *dst = (char *)p->o +
                (s->q_batch * p->o_sb + (s->q_row0 + i) * p->o_sr + h * p->o_sh) * fa_dtype_size(ot);
    const float *o = w->O + r * DPAD(d);
    const int empty = w->l[r] == 0; /* a NaN sum (NaN input) propagates */
    const int invalid = p->invalid_line_zero && w->m[r] == (float)p->mask_fill;
    const float mul = empty || invalid ? 0.0f : 1.0f / w->l[r];
    for (int64_t k = 0; k < d; k++) {
        const float x = empty || invalid ? 0.0f : o[k] * mul;
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
        const float v = empty ? INFINITY : w->m[r] + (float)log((double)w->l[r]);
        ((float *)p->lse)[sbat * p->lse_sb + h * p->lse_sh + srow * p->lse_sr] = v;
    }
    if (p->rowmax) {
        const int64_t off = sbat * p->stat_sb + h * p->stat_sh + srow * p->stat_sr;
        ((float *)p->rowmax)[off] = w->m[r];
        ((float *)p->rowsum)[off] = invalid ? FLT_MAX : w->l[r];
    }
}

/* Row pointers of K and V for keys kb0 .. kb0 + n. */
static void block_rows(const fa_fwd_params *p, const fa_seq *s, int64_t hk, int64_t kb0, int64_t n,
                       const char **kr, const char **vr)
{
    const int64_t es = fa_dtype_size(p->dtype);
    if (!p->block_table) { /* rows a fixed stride apart */
        const char *k0 = fa_key_ptr(p, &p->k, s, kb0, hk, es);
        const char *v0 = fa_key_ptr(p, &p->v, s, kb0, hk, es);
        for (int64_t j = 0; j < n; j++) {
            kr[j] = k0 + j * p->k.sr * es;
            vr[j] = v0 + j * p->v.sr * es;
        }
        return;
    }
    for (int64_t j = 0; j < n; j++) {
        kr[j] = fa_key_ptr(p, &p->k, s, kb0 + j, hk, es);
        vr[j] = fa_key_ptr(p, &p->v, s, kb0 + j, hk, es);
    }
}

/* The item's key loop for nrows <= nr rows (nr a constant: one instance per row count). */
INL void item_loop(const int dt, const int nr, const fa_fwd_params *p, const fa_seq *s, int64_t h,
                   int64_t hk, int64_t q0, int64_t nrows, work *w, int64_t kmin, int64_t kmax)
{
    const int64_t d = p->d, rb = d * fa_dtype_size(p->dtype);
    int cur = 0;
    int64_t nc = kmax - kmin < BK ? kmax - kmin : BK;
    block_rows(p, s, hk, kmin, nc, w->kr[0], w->vr[0]);
    for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BK) {
        const int64_t kb1 = kb0 + BK;
        const int64_t nn = kb1 >= kmax ? 0 : kmax - kb1 < BK ? kmax - kb1 : BK;
        if (nn > 0)
            block_rows(p, s, hk, kb1, nn, w->kr[cur ^ 1], w->vr[cur ^ 1]);
        qk_block(dt, nr, w, d, w->kr[cur], nc, w->kr[cur ^ 1], w->vr[cur ^ 1], nn, rb);
        for (int r = 0; r < nr; r++) {
            if (r < nrows)
                row_softmax(p, s, h, q0 + r, w, r, kb0, nc);
            else
                memset(w->S + r * BK, 0, BK * 4);
        }
        pv_block(dt, nr, w, d, w->vr[cur], nc);
        cur ^= 1;
        nc = nn;
    }
}

#define DT_SWITCH(NR)                                                                              \
    switch (p->dtype) {                                                                            \
    case FA_F32: item_loop(FA_F32, NR, p, &s, h, hk, q0, nrows, &w, kmin, kmax); break;            \
    case FA_BF16: item_loop(FA_BF16, NR, p, &s, h, hk, q0, nrows, &w, kmin, kmax); break;          \
    default: item_loop(FA_F16, NR, p, &s, h, hk, q0, nrows, &w, kmin, kmax); break;                \
    }

fa_status fa_decode__avx512_item(const fa_fwd_params *p, int64_t bi, int64_t h, int64_t q0,
                                 const void *packed, void *buf)
{
    (void)packed;
    if (p->dtype != FA_F32 && p->dtype != FA_BF16 && p->dtype != FA_F16)
        return FA_ERR_ARG;
    const int64_t d = p->d, dp = DPAD(d), es = fa_dtype_size(p->dtype);
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t hk = h / (p->h / p->hk);
    const int64_t nrows = s.sq - q0 < NR_MAX ? s.sq - q0 : NR_MAX;
    work w = carve(buf, d);

    int64_t kmin = INT64_MAX, kmax = 0;
    for (int64_t r = 0; r < nrows; r++) {
        fa_row_band(p, &s, q0 + r, &w.lo[r], &w.hi[r]);
        if (w.lo[r] < w.hi[r]) {
            kmin = w.lo[r] < kmin ? w.lo[r] : kmin;
            kmax = w.hi[r] > kmax ? w.hi[r] : kmax;
        }
    }
    memset(w.Q, 0, (size_t)(NR_MAX * dp * 4));
    memset(w.O, 0, (size_t)(NR_MAX * dp * 4));
    for (int64_t r = 0; r < nrows; r++) {
        const char *src = (const char *)p->q.ptr +
                          (s.q_batch * p->q.sb + (s.q_row0 + q0 + r) * p->q.sr + h * p->q.sh) * es;
        for (int64_t k = 0; k < d; k++) {
            w.Q[r * dp + k] = p->dtype == FA_F32    ? ((const float *)src)[k]
                              : p->dtype == FA_BF16 ? fa_bf16_to_f32(((const uint16_t *)src)[k])
                                                    : (float)((const _Float16 *)src)[k];
        }
        w.m[r] = -INFINITY;
        w.l[r] = 0;
        if (p->sink) {
            w.m[r] = p->sink[h]; /* the sink logit enters as one extra key, exp(0) = 1 */
            w.l[r] = 1;
        }
    }
    if (kmin < kmax) {
        if (nrows <= 1) {
            DT_SWITCH(1)
        } else if (nrows <= 2) {
            DT_SWITCH(2)
        } else if (nrows <= 4) {
            DT_SWITCH(4)
        } else if (nrows <= 8) {
            DT_SWITCH(8)
        } else {
            DT_SWITCH(16)
        }
    }
    for (int64_t r = 0; r < nrows; r++)
        finish_row(p, &s, h, q0 + r, &w, (int)r);
    return FA_OK;
}
