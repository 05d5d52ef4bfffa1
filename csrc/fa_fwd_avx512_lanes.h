/* fa_fwd_avx512_lanes.h: the softmax half of the AVX-512 forward kernels, shared by the float32
 * FMA kernel (fa_fwd_f32__avx512.c) and the AMX bf16 kernel (fa_fwd_bf16__amx.c).
 *
 * Both keep a score block transposed, S^T[key j][query q] with the 64 queries of a sub-block in
 * the 16 lanes of 4 vectors (row stride FA_LANES floats), so every softmax statistic of a query
 * lives in one lane: max and sum over keys are vertical vector operations. Included only by
 * translation units compiled with AVX-512F.
 *
 * exp: 2^t with t = (x - m') log2(e) by exp2_p6 (fa_exp2.h: degree 6, 9.7e-8 relative; -inf
 * gives exactly 0).
 */
#ifndef FA_FWD_AVX512_LANES_H
#define FA_FWD_AVX512_LANES_H

#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "fa_params.h"
#include "fa_seq.h"
#include "fa_philox.h"
#include "fa_philox_avx512.h"
#include "fa_cvt.h"
#include "fa_t16.h"
#include "fa_exp2.h"

#define BR 64         /* queries per sub-block: NQV vectors of 16 lanes (the S^T row stride) */
#define NQV (BR / 16)
#define LOG2E 1.44269504088896341f

#define INL static inline __attribute__((always_inline))

/* ---- exp ------------------------------------------------------------------------------------ */

/* e^(x - m) for x <= m (x = -inf gives 0). */
INL __m512 exp_diff(__m512 x, __m512 m)
{
    return exp2_p6(_mm512_mul_ps(_mm512_sub_ps(x, m), _mm512_set1_ps(LOG2E)));
}

/* expm1(x) for x <= 0, accurate relative to the result even for tiny |x|: x = n ln2 + r, q =
 * expm1(r) from its Taylor series without the leading 1 (nothing cancels), then
 * expm1(x) = 2^n q + (2^n - 1). Below -87 the result rounds to -1. */
INL __m512 expm1_nonpos16(__m512 x)
{
    x = _mm512_max_ps(_mm512_set1_ps(-87.0f), x);
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(LOG2E)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x); /* ln2 = hi + lo */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 q = one;
    for (int i = 9; i >= 2; i--)
        q = _mm512_fmadd_ps(q, _mm512_mul_ps(r, _mm512_set1_ps(1.0f / (float)i)), one);
    q = _mm512_mul_ps(q, r);
    __m512 s = _mm512_scalef_ps(one, n);
    return _mm512_fmadd_ps(s, q, _mm512_sub_ps(s, one));
}

/* tanh(y) = sign(y) * -e / (2 + e) with e = expm1(-2|y|) in (-1, 0]: no cancellation near 0 (the
 * 1 - e^(-2|y|) form loses the low bits there), no overflow for any y. */
INL __m512 tanh16(__m512 y)
{
    __m512 a = _mm512_abs_ps(y);
    __m512 e = expm1_nonpos16(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f)));
    __m512 r = _mm512_div_ps(_mm512_sub_ps(_mm512_setzero_ps(), e),
                             _mm512_add_ps(_mm512_set1_ps(2.0f), e));
    /* copy y's sign onto r (r >= 0) */
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
}

/* dst[j * ldd + i] = src[i * lds + j] for a 16 x 16 float block, in registers (fa_t16.h): each
 * source row is one 64-byte load, so a strided column walk (one cache line per element) is avoided. */
static inline void transpose16(const float *src, int64_t lds, float *dst, int64_t ldd)
{
    __m512 r[16], o[16];
    for (int i = 0; i < 16; i++)
        r[i] = _mm512_loadu_ps(src + i * lds);
    fa_t16(r, o);
    for (int j = 0; j < 16; j++)
        _mm512_storeu_ps(dst + j * ldd, o[j]);
}

/* The per-query state of one 64-query sub-block and the current score block. */
typedef struct {
    float *ST;            /* S^T, then x, then P^T of the current block: rows of BR floats */
    float *m, *l, *alpha; /* running max, running sum, last rescale factor */
    int64_t *lo, *hi;     /* visible keys [lo, hi) of each query */
    int32_t *c0, *c1;     /* the same within the current block (shared by all sub-blocks) */
} fa_lanes;

/* ---- conversions ---------------------------------------------------------------------------- */

static inline float load1(fa_dtype t, const void *base, int64_t idx)
{
    switch (t) {
    case FA_F32: return ((const float *)base)[idx];
    case FA_F64: return (float)((const double *)base)[idx];
    case FA_F16: return (float)((const _Float16 *)base)[idx];
    case FA_BF16: return fa_bf16_to_f32(((const uint16_t *)base)[idx]);
    }
    return 0;
}

/* n elements of f16/bf16/f32 at src widened to float32 at dst, zero-filled up to DPAD(n). */
static inline void widen_row(fa_dtype t, const void *src, int64_t n, float *dst)
{
    for (int64_t k = 0; k < n; k += 16) {
        __mmask16 mk = n - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - k)) - 1);
        __m512 v;
        if (t == FA_F16) {
            v = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)src + k));
        } else if (t == FA_BF16) {
            __m512i h = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mk, (const uint16_t *)src + k));
            v = _mm512_castsi512_ps(_mm512_slli_epi32(h, 16));
        } else {
            v = _mm512_maskz_loadu_ps(mk, (const float *)src + k);
        }
        _mm512_store_ps(dst + k, v);
    }
}

static inline void store_row(fa_dtype t, const float *src, float mul, int64_t n, void *dst)
{
    switch (t) {
    case FA_F32:
        for (int64_t i = 0; i < n; i++)
            ((float *)dst)[i] = src[i] * mul;
        break;
    case FA_F16:
        for (int64_t i = 0; i < n; i++)
            ((_Float16 *)dst)[i] = (_Float16)(src[i] * mul);
        break;
    case FA_BF16:
        for (int64_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = fa_f32_to_bf16(src[i] * mul);
        break;
    case FA_F64:
        break; /* f64 inputs never reach the float32 kernel */
    }
}

/* ---- per-item bookkeeping shared by the kernels ---------------------------------------------- */

/* Visible keys of every row [lo, hi) of the item's nrows queries from q0, of every BR-row
 * sub-block (smin/smax, empty sub-blocks INT64_MAX/0) and of the whole item (*kmin, *kmax). */
static void item_bands(const fa_fwd_params *p, const fa_seq *s, int64_t q0, int64_t nrows,
                       fa_lanes *w, int64_t *smin, int64_t *smax, int64_t *kmin, int64_t *kmax)
{
    const int64_t nsub = (nrows + BR - 1) / BR;
    *kmin = INT64_MAX, *kmax = 0;
    for (int64_t sb = 0; sb < nsub; sb++) {
        smin[sb] = INT64_MAX, smax[sb] = 0;
        for (int64_t r = sb * BR; r < nrows && r < (sb + 1) * BR; r++) {
            fa_row_band(p, s, q0 + r, &w->lo[r], &w->hi[r]);
            if (w->lo[r] < w->hi[r]) {
                smin[sb] = w->lo[r] < smin[sb] ? w->lo[r] : smin[sb];
                smax[sb] = w->hi[r] > smax[sb] ? w->hi[r] : smax[sb];
            }
        }
        *kmin = smin[sb] < *kmin ? smin[sb] : *kmin;
        *kmax = smax[sb] > *kmax ? smax[sb] : *kmax;
    }
}

/* Normalizes and writes query row i (item row r) of head h: out (row holds the unnormalized
 * accumulator, d floats), lse and the NPU statistics. A row that saw no key gives 0 and +inf;
 * invalid-line rows give 0. */
static void finish_row(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i,
                       const fa_lanes *w, int64_t r, float *row, float drop_scale)
{
    const int64_t d = p->d;
    const fa_dtype ot = fa_out_dtype(p);
    char *dst = (char *)p->o +
                (s->q_batch * p->o_sb + (s->q_row0 + i) * p->o_sr + h * p->o_sh) * fa_dtype_size(ot);
    const int empty = w->l[r] == 0; /* a NaN sum (NaN input) propagates */
    const int invalid = p->invalid_line_zero && w->m[r] == (float)p->mask_fill;
    if (empty || invalid)
        memset(row, 0, (size_t)d * 4);
    store_row(ot, row, empty || invalid ? 0.0f : drop_scale / w->l[r], d, dst);
    const int64_t srow = p->cu_q ? s->q_row0 + i : i;
    const int64_t sbat = p->cu_q ? 0 : s->bi;
    if (p->lse) {
        float v = empty ? INFINITY : w->m[r] + (float)log((double)w->l[r]);
        ((float *)p->lse)[sbat * p->lse_sb + h * p->lse_sh + srow * p->lse_sr] = v;
    }
    if (p->rowmax) {
        const int64_t o = sbat * p->stat_sb + h * p->stat_sh + srow * p->stat_sr;
        ((float *)p->rowmax)[o] = w->m[r];
        ((float *)p->rowsum)[o] = invalid ? FLT_MAX : w->l[r];
    }
}

/* ---- scores --------------------------------------------------------------------------------- */

/* Turns S^T[0..nc) of the block (keys kb0..) into final scores x in place: pse, scale, softcap,
 * alibi, band (-inf outside [c0, c1) of each query) and the explicit mask. (A plain block, where
 * only the scale applies, gets it as its tiles are stored: fa_fwd_f32__avx512.c.) */
static void block_scores(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t q0,
                         int64_t nrows, int64_t kb0, int64_t nc, fa_lanes *w)
{
    float *ST = w->ST;
    if (p->pse && !p->pse_after_scale) {
        for (int64_t r = 0; r < nrows; r++) {
            const int64_t base = s->q_batch * p->pse_sb + h * p->pse_sh + (q0 + r) * p->pse_sr;
            for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
                ST[c * BR + r] += load1(p->pse_dtype, p->pse, base + (kb0 + c) * p->pse_sc);
        }
    }
    const __m512 scale = _mm512_set1_ps((float)p->scale);
    const int softcap = p->softcap > 0, alibi = p->alibi != NULL;
    const __m512 cap = _mm512_set1_ps((float)p->softcap);
    const __m512 inv_cap = _mm512_set1_ps((float)(1.0 / p->softcap));
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    const __m512 slope = _mm512_set1_ps(alibi ? p->alibi[s->bi * p->alibi_sb + h] : 0.0f);
    for (int v = 0; v < NQV; v++) {
        const __m512i c0 = _mm512_load_si512(w->c0 + v * 16), c1 = _mm512_load_si512(w->c1 + v * 16);
        /* alibi distance |i + sk - sq - j|, bottom-right aligned; per lane the diagonal's column */
        float dg[16];
        for (int t = 0; t < 16; t++)
            dg[t] = (float)(q0 + v * 16 + t + s->sk - s->sq - kb0);
        const __m512 diag = _mm512_loadu_ps(dg);
        for (int64_t j = 0; j < nc; j++) {
            float *px = ST + j * BR + v * 16;
            __m512 x = _mm512_mul_ps(_mm512_load_ps(px), scale);
            if (softcap)
                x = _mm512_mul_ps(cap, tanh16(_mm512_mul_ps(x, inv_cap)));
            if (alibi) {
                __m512 dist = _mm512_abs_ps(_mm512_sub_ps(diag, _mm512_set1_ps((float)j)));
                x = _mm512_fnmadd_ps(slope, dist, x);
            }
            const __m512i jj = _mm512_set1_epi32((int)j);
            __mmask16 in = _mm512_cmple_epi32_mask(c0, jj) & _mm512_cmplt_epi32_mask(jj, c1);
            _mm512_store_ps(px, _mm512_mask_blend_ps(in, ninf, x));
        }
    }
    if (p->pse && p->pse_after_scale) { /* torch_npu inference ops: scale * q.k + pse_shift */
        for (int64_t r = 0; r < nrows; r++) {
            const int64_t base = s->q_batch * p->pse_sb + h * p->pse_sh + (q0 + r) * p->pse_sr;
            for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
                ST[c * BR + r] += load1(p->pse_dtype, p->pse, base + (kb0 + c) * p->pse_sc);
        }
    }
    if (p->mask) {
        const float fill = (float)p->mask_fill;
        for (int64_t r = 0; r < nrows; r++) {
            const uint8_t *mrow = p->mask + s->q_batch * p->mask_sb + h * p->mask_sh + (q0 + r) * p->mask_sr;
            for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
                if (mrow[(kb0 + c) * p->mask_sc])
                    ST[c * BR + r] = fill;
        }
    }
}

/* Online softmax over the block's nc key rows: updates m, l, sets alpha, turns x into P^T.
 * bmax/bnan: the block's per-lane max and NaN lanes when the caller took them already (else
 * NULL: a max pass over x here). */
static void block_softmax(fa_lanes *w, int64_t nc, const __m512 *bmax, const __mmask16 *bnan)
{
    float *ST = w->ST;
    for (int v = 0; v < NQV; v++) {
        const __m512 m_old = _mm512_load_ps(w->m + v * 16);
        __m512 mx = m_old;
        __mmask16 nan = 0;
        if (bmax) {
            mx = _mm512_max_ps(bmax[v], m_old); /* a NaN m_old stays NaN (second operand) */
            nan = bnan[v];
        }
        for (int64_t j = 0; !bmax && j < nc; j++) {
            const __m512 x = _mm512_load_ps(ST + j * BR + v * 16);
            mx = _mm512_max_ps(x, mx);
            nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
        }
        /* maxps drops NaN operands; a NaN score (NaN input) must poison its row instead. */
        mx = _mm512_mask_blend_ps(nan, mx, _mm512_set1_ps(NAN));
        /* A lane that has seen nothing but -inf keeps m = -inf; subtracting 0 instead keeps its
         * exponentials at exactly 0 (and alpha = 0 on the all-zero accumulators). */
        __mmask16 none = _mm512_cmpeq_ps_mask(mx, _mm512_set1_ps(-INFINITY));
        const __m512 mu = _mm512_mask_blend_ps(none, mx, _mm512_setzero_ps());
        __m512 sum0 = _mm512_setzero_ps(), sum1 = _mm512_setzero_ps();
        int64_t j = 0;
        for (; j + 1 < nc; j += 2) {
            __m512 e0 = exp_diff(_mm512_load_ps(ST + j * BR + v * 16), mu);
            __m512 e1 = exp_diff(_mm512_load_ps(ST + (j + 1) * BR + v * 16), mu);
            _mm512_store_ps(ST + j * BR + v * 16, e0);
            _mm512_store_ps(ST + (j + 1) * BR + v * 16, e1);
            sum0 = _mm512_add_ps(sum0, e0);
            sum1 = _mm512_add_ps(sum1, e1);
        }
        if (j < nc) {
            __m512 e0 = exp_diff(_mm512_load_ps(ST + j * BR + v * 16), mu);
            _mm512_store_ps(ST + j * BR + v * 16, e0);
            sum0 = _mm512_add_ps(sum0, e0);
        }
        const __m512 alpha = exp_diff(m_old, mu);
        const __m512 l = _mm512_load_ps(w->l + v * 16);
        _mm512_store_ps(w->l + v * 16, _mm512_fmadd_ps(l, alpha, _mm512_add_ps(sum0, sum1)));
        _mm512_store_ps(w->m + v * 16, mx);
        _mm512_store_ps(w->alpha + v * 16, alpha);
    }
}

/* Zero the dropped entries of P^T for query rows [0, nrows) within their visible columns: 16
 * query lanes x 4 keys per vectorized Philox call (fa_philox_avx512.h), the lanes being exactly
 * one vector of a P^T row. Entries outside a row's band are 0 already and padding lanes are
 * discarded, so the whole 16 x 4 group is masked alike. */
static void block_dropout(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t q0,
                          int64_t nrows, int64_t kb0, const fa_lanes *w, float *PT, uint64_t thr)
{
    const uint64_t bh = (uint64_t)(s->bi * p->h + h);
    for (int64_t v = 0; v * 16 < nrows; v++) {
        int64_t cmin = INT64_MAX, cmax = 0; /* the columns any row of the vector sees */
        for (int64_t r = v * 16; r < nrows && r < v * 16 + 16; r++) {
            if (w->c0[r] < w->c1[r]) {
                cmin = w->c0[r] < cmin ? w->c0[r] : cmin;
                cmax = w->c1[r] > cmax ? w->c1[r] : cmax;
            }
        }
        if (cmin >= cmax) /* no row of the vector sees the block */
            continue;
        for (int64_t j4 = (kb0 + cmin) & ~(int64_t)3; j4 < kb0 + cmax; j4 += 4) {
            __mmask16 keep[4];
            fa_keep_rows16(p->seed, p->offset, bh, (uint64_t)(q0 + v * 16), (uint64_t)(j4 >> 2), thr, keep);
            for (int t = 0; t < 4; t++) {
                const int64_t j = j4 + t - kb0;
                if (j < cmin || j >= cmax)
                    continue;
                float *x = PT + j * BR + v * 16;
                _mm512_store_ps(x, _mm512_maskz_mov_ps(keep[t], _mm512_load_ps(x)));
            }
        }
    }
}

/* Per-row visible columns of block [kb0, kb0 + nc); returns 1 if every real row sees it all.
 * Eight rows per step in 64-bit lanes (it runs once per sub-block and key block: scalar, it was
 * ~1% of the FMA kernel). Rows past nrows get the empty band [0, 0). */
static int block_band(fa_lanes *w, int64_t nrows, int64_t kb0, int64_t nc)
{
    const __m512i k0 = _mm512_set1_epi64(kb0), n = _mm512_set1_epi64(nc), zero = _mm512_setzero_si512();
    __mmask8 partial = 0;
    for (int64_t r = 0; r < BR; r += 8) {
        const __mmask8 real = r >= nrows ? (__mmask8)0
                              : nrows - r >= 8 ? (__mmask8)0xFF
                                               : (__mmask8)((1u << (nrows - r)) - 1);
        __m512i a = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(real, w->lo + r), k0);
        __m512i b = _mm512_sub_epi64(_mm512_maskz_loadu_epi64(real, w->hi + r), k0);
        a = _mm512_maskz_mov_epi64(real, _mm512_min_epi64(_mm512_max_epi64(a, zero), n));
        b = _mm512_maskz_mov_epi64(real, _mm512_min_epi64(_mm512_max_epi64(b, zero), n));
        b = _mm512_max_epi64(a, b);
        partial |= real & (_mm512_cmpneq_epi64_mask(a, zero) | _mm512_cmpneq_epi64_mask(b, n));
        _mm256_storeu_si256((__m256i *)(w->c0 + r), _mm512_cvtepi64_epi32(a));
        _mm256_storeu_si256((__m256i *)(w->c1 + r), _mm512_cvtepi64_epi32(b));
    }
    return partial == 0;
}

/* Writes the normalized probabilities of one sub-block x key block (scores already in ST) into
 * S_dmask, entries that dropout removes negated. */
static void s_dmask_block(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t qs,
                          int64_t nr, int64_t kb0, int64_t nc, int has_drop, uint64_t thr, fa_lanes *w)
{
    for (int v = 0; v < NQV; v++) {
        const __m512 m = _mm512_load_ps(w->m + v * 16);
        const __m512 inv_l = _mm512_div_ps(_mm512_set1_ps(1.0f), _mm512_load_ps(w->l + v * 16));
        for (int64_t j = 0; j < nc; j++) {
            float *px = w->ST + j * BR + v * 16;
            _mm512_store_ps(px, _mm512_mul_ps(exp_diff(_mm512_load_ps(px), m), inv_l));
        }
    }
    for (int64_t r = 0; r < nr; r++) {
        if (!(w->l[r] > 0))
            continue;
        float *out = p->s_dmask + s->bi * p->sd_sb + h * p->sd_sh + (qs + r) * p->sd_sr;
        for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
            out[kb0 + c] = w->ST[c * BR + r];
    }
    if (!has_drop)
        return;
    /* The sign marks dropped entries: run the dropout draw on a block of ones. */
    for (int64_t k = 0; k < nc * BR; k++)
        w->ST[k] = 1;
    block_dropout(p, s, h, qs, nr, kb0, w, w->ST, thr);
    for (int64_t r = 0; r < nr; r++) {
        if (!(w->l[r] > 0))
            continue;
        float *out = p->s_dmask + s->bi * p->sd_sb + h * p->sd_sh + (qs + r) * p->sd_sr;
        for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
            if (w->ST[c * BR + r] == 0)
                out[kb0 + c] = -out[kb0 + c];
    }
}

#endif
