/* fa_fwd_bf16_rows.h: the softmax half of the AMX bf16 forward kernel (fa_fwd_bf16__amx.c), on
 * a score block kept row-major: S[query r][key j], row stride FA_ROWS_SLD floats, as written by
 * AMX tile stores (one C tile = 16 queries x 16 keys).
 *
 * Every statistic of a query is a horizontal reduction over its row, done once per row per key
 * block (256 keys), so its cost is spread over the whole block; the exponentials go straight to
 * bf16 P in the A-tile layout of the P.V product (tile (query group g, key chunk c) = 16 rows of
 * 32 keys, a contiguous 1 KiB), so P is never stored as float32.
 *
 * exp of P (below, "exp for P"): float16 inputs (P kept to 16 bits) get exp2_p6 (fa_exp2.h, the
 * FMA kernel's exp) of t = (x sx - m) log2 e with the bracket in one FMA (one rounding, where the
 * lanes kernel rounds x sx first); bfloat16 inputs (P rounded to bf16) a degree-5 exp (1.7e-7)
 * and, for rows with a small shift, t in one FMA. The running max/sum updates (alpha) use
 * exp2_p6 as well.
 * Only the columns [c0, c1) of a row's band enter its max and sum (P = 0 elsewhere), so a band
 * edge needs no extra pass. Without softcap, alibi, pse or mask, sx is the
 * scale and x the raw score, so no pass rewrites S; the row max is then taken on raw scores
 * (scale > 0 keeps the order). Otherwise the block is first turned into final scores in place
 * (rows_scores) and sx = 1.
 * Included only by the AMX translation unit.
 */
#ifndef FA_FWD_BF16_ROWS_H
#define FA_FWD_BF16_ROWS_H

/* the lanes kernel's softmax helpers that this file does not use stay unused here */
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunused-function"
#include "fa_fwd_avx512_lanes.h"
#pragma GCC diagnostic pop
#include "fa_exp2_bf16.h"
#include "fa_amx.h" /* fa_amx_store_bf16 */

#define FA_ROWS_BN 256                 /* keys per block */
#define FA_ROWS_SLD (FA_ROWS_BN + 16)  /* S row stride in floats: rows 1 KiB apart would share sets */
#define FA_ROWS_NKC (FA_ROWS_BN / 32)  /* 32-key chunks (P tiles) per query group */

/* Per-block state of one 64-query sub-block (BR rows). */
typedef struct {
    float *S;               /* BR x FA_ROWS_SLD: scores of the block, then final scores x */
    uint16_t *P;            /* (BR / 16) x FA_ROWS_NKC bf16 A tiles of P */
    uint16_t *Pl;           /* NULL, or (f16 inputs) the same tiles of P - bf16(P): P to 16 bits */
    float *m, *l, *alpha;   /* running max, running sum, last rescale (per sub-block row) */
    float *mu;              /* the block's shift: m, or 0 for a row that saw only -inf */
    float *rmax, *rsum;     /* per-row block max and block sum */
    int32_t *c0, *c1;       /* visible columns [c0, c1) of each row within the block */
} fa_rows;

INL uint16_t *p_row(const fa_rows *w, int64_t r, int64_t kc)
{
    return w->P + ((r / 16) * FA_ROWS_NKC + kc) * 512 + (r % 16) * 32;
}

INL uint16_t *pl_row(const fa_rows *w, int64_t r, int64_t kc)
{
    return w->Pl + ((r / 16) * FA_ROWS_NKC + kc) * 512 + (r % 16) * 32;
}

/* 16 bf16 values (as bits) to float32, exactly. */
INL __m512 bf16_to_ps(__m256i h)
{
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* finish_row of fa_fwd_avx512_lanes.h (the same outputs) with the bf16 store vectorized; the NPU
 * statistics and other output dtypes go through finish_row itself. */
static void finish_row_rows(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t i,
                            const fa_lanes *w, int64_t r, float *row, float drop_scale)
{
    if (fa_out_dtype(p) != FA_BF16 || p->rowmax) {
        finish_row(p, s, h, i, w, r, row, drop_scale);
        return;
    }
    uint16_t *dst = (uint16_t *)p->o + (s->q_batch * p->o_sb + (s->q_row0 + i) * p->o_sr + h * p->o_sh);
    const int empty = w->l[r] == 0; /* a NaN sum (NaN input) propagates */
    const int invalid = p->invalid_line_zero && w->m[r] == (float)p->mask_fill;
    if (empty || invalid)
        memset(dst, 0, (size_t)p->d * 2);
    else
        fa_amx_store_bf16(row, drop_scale / w->l[r], p->d, dst);
    if (p->lse) {
        const int64_t srow = p->cu_q ? s->q_row0 + i : i, sbat = p->cu_q ? 0 : s->bi;
        ((float *)p->lse)[sbat * p->lse_sb + h * p->lse_sh + srow * p->lse_sr] =
            empty ? INFINITY : w->m[r] + (float)log((double)w->l[r]);
    }
}

/* Turns S[0..nr)[0..nc) into final scores in place: pse, scale, softcap, alibi, band (-inf
 * outside [c0, c1) of each row) and the explicit mask; q0 is the sequence row of row 0. */
static void rows_scores(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t q0,
                        int64_t nr, int64_t kb0, int64_t nc, fa_rows *w)
{
    const int softcap = p->softcap > 0, alibi = p->alibi != NULL;
    const __m512 scale = _mm512_set1_ps((float)p->scale);
    const __m512 cap = _mm512_set1_ps((float)p->softcap);
    const __m512 inv_cap = _mm512_set1_ps((float)(1.0 / p->softcap));
    const __m512 ninf = _mm512_set1_ps(-INFINITY);
    const __m512 slope = _mm512_set1_ps(alibi ? p->alibi[s->bi * p->alibi_sb + h] : 0.0f);
    const __m512 iota = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i iotai = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t r = 0; r < nr; r++) {
        float *x = w->S + r * FA_ROWS_SLD;
        const int64_t pse_base = s->q_batch * p->pse_sb + h * p->pse_sh + (q0 + r) * p->pse_sr;
        if (p->pse && !p->pse_after_scale)
            for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
                x[c] += load1(p->pse_dtype, p->pse, pse_base + (kb0 + c) * p->pse_sc);
        /* alibi distance |i + sk - sq - j|, bottom-right aligned: the diagonal's column */
        const __m512 diag = _mm512_set1_ps((float)(q0 + r + s->sk - s->sq - kb0));
        const __m512i c0 = _mm512_set1_epi32(w->c0[r]), c1 = _mm512_set1_epi32(w->c1[r]);
        for (int64_t j = 0; j < nc; j += 16) {
            const __mmask16 t = tail16(nc - j);
            __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(t, x + j), scale);
            if (softcap)
                v = _mm512_mul_ps(cap, tanh16(_mm512_mul_ps(v, inv_cap)));
            if (alibi) {
                __m512 col = _mm512_add_ps(iota, _mm512_set1_ps((float)j));
                v = _mm512_fnmadd_ps(slope, _mm512_abs_ps(_mm512_sub_ps(diag, col)), v);
            }
            const __m512i jj = _mm512_add_epi32(iotai, _mm512_set1_epi32((int)j));
            __mmask16 in = _mm512_cmple_epi32_mask(c0, jj) & _mm512_cmplt_epi32_mask(jj, c1);
            _mm512_mask_storeu_ps(x + j, t, _mm512_mask_blend_ps(in, ninf, v));
        }
        if (p->pse && p->pse_after_scale) /* torch_npu inference ops: scale * q.k + pse_shift */
            for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
                x[c] += load1(p->pse_dtype, p->pse, pse_base + (kb0 + c) * p->pse_sc);
        if (p->mask) {
            const float fill = (float)p->mask_fill;
            const uint8_t *mrow =
                p->mask + s->q_batch * p->mask_sb + h * p->mask_sh + (q0 + r) * p->mask_sr;
            for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
                if (mrow[(kb0 + c) * p->mask_sc])
                    x[c] = fill;
        }
    }
}

/* ---- exp for P ------------------------------------------------------------------------------ */

/* |mu| bound below which the exponent is taken in one FMA, t = x (sx log2 e) - mu log2 e. Its
 * error against (x sx - mu) log2 e: the two rounded constants and the FMA give
 * |dt| <= 2^-24 (log2 e (|x sx| + |mu|) + |t|), and |x sx| <= |mu| + |t| ln 2 for a score below
 * the row max, so |dt| <= 2^-24 (2.89 |mu| + 2 |t|): P = 2^t is off by at most
 * 2^-24 ln 2 (2.89 |mu| + 2 |t|) 2^t <= 2^-24 (2 |mu| + 0.74) absolute (2^t |t| <= 0.53), P's max
 * being 1: 1.0e-6 of the max at |mu| = 8. On the row sum l the relative error is at most
 * 2^-24 (2 |mu| + 1.39 T), T the P-weighted mean of |t| (below ~log2 of the key count; the
 * |t| part is there in the exact bracket too): 1.6e-6 at |mu| = 8 and 16K keys, so lse moves by
 * ~1e-6 against its 2e-5 check. Rows with a larger |mu| (large scores, the NPU mask fill -1e12
 * where mu log2 e rounds by 65536) keep the exact bracket (one more multiply). */
#define FA_ROWS_FUSED_MU 8.0f

enum { EXP_F16, EXP_BRACKET, EXP_FUSED };

/* P (and Pl) of the 32 keys of chunk kc of row r from their scores x; the band mask is applied
 * only where `masked` (edge chunks), interior chunks take no mask work at all. `mode` and
 * `masked` are constants at every call, so each variant compiles to its own loop body. */
INL void chunk_exp(fa_rows *w, int64_t r, const float *x, int64_t kc, int64_t c0, int64_t c1,
                   __m512 vsx, __m512 nmu, __m512 a, __m512 b, __m512 *s0, __m512 *s1, int mode,
                   int masked)
{
    const int64_t j = kc * 32;
    const __mmask16 t0 = masked ? band16(j, c0, c1) : 0xffff;
    const __mmask16 t1 = masked ? band16(j + 16, c0, c1) : 0xffff;
    const __m512 x0 = masked ? _mm512_maskz_loadu_ps(t0, x + j) : _mm512_loadu_ps(x + j);
    const __m512 x1 = masked ? _mm512_maskz_loadu_ps(t1, x + j + 16) : _mm512_loadu_ps(x + j + 16);
    __m512 e0, e1;
    if (mode == EXP_FUSED) {
        e0 = exp2_p5(_mm512_fmadd_ps(x0, a, b));
        e1 = exp2_p5(_mm512_fmadd_ps(x1, a, b));
    } else {
        /* (x sx - mu) with one rounding, then to base 2 */
        const __m512 l2e = _mm512_set1_ps(LOG2E);
        const __m512 u0 = _mm512_mul_ps(_mm512_fmadd_ps(x0, vsx, nmu), l2e);
        const __m512 u1 = _mm512_mul_ps(_mm512_fmadd_ps(x1, vsx, nmu), l2e);
        e0 = mode == EXP_F16 ? exp2_p6(u0) : exp2_p5(u0);
        e1 = mode == EXP_F16 ? exp2_p6(u1) : exp2_p5(u1);
    }
    if (masked) { /* columns outside the band or past the block: P = 0 */
        e0 = _mm512_maskz_mov_ps(t0, e0);
        e1 = _mm512_maskz_mov_ps(t1, e1);
    }
    *s0 = _mm512_add_ps(*s0, e0);
    *s1 = _mm512_add_ps(*s1, e1);
    const __m512i ph = (__m512i)_mm512_cvtne2ps_pbh(e1, e0);
    _mm512_storeu_si512(p_row(w, r, kc), ph);
    if (mode == EXP_F16) { /* the remainders, exact in fp32 (a flushed denormal lo is < 2^-126) */
        const __m512 h0 = bf16_to_ps(_mm512_castsi512_si256(ph));
        const __m512 h1 = bf16_to_ps(_mm512_extracti64x4_epi64(ph, 1));
        const __m512 l0 = _mm512_sub_ps(e0, h0), l1 = _mm512_sub_ps(e1, h1);
        const __m512i pl = (__m512i)_mm512_cvtne2ps_pbh(l1, l0);
        _mm512_storeu_si512(pl_row(w, r, kc), pl);
    }
}

/* P (and Pl) of row r, chunks [0, nkc), from its scores x and shift mu; returns the row sum of P.
 * Chunks wholly inside the band [c0, c1) run unmasked. */
INL float row_exp(fa_rows *w, int64_t r, const float *x, int64_t c0, int64_t c1, int64_t nkc,
                  float sx, float mu, int mode)
{
    const __m512 vsx = _mm512_set1_ps(sx), nmu = _mm512_set1_ps(-mu);
    const __m512 a = _mm512_set1_ps(sx * LOG2E), b = _mm512_set1_ps(-mu * LOG2E);
    __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();
    int64_t ka = (c0 + 31) / 32, kb = c1 / 32; /* interior chunks [ka, kb) */
    ka = ka < nkc ? ka : nkc;
    kb = kb > ka ? kb : ka;
    int64_t kc = 0;
    for (; kc < ka; kc++)
        chunk_exp(w, r, x, kc, c0, c1, vsx, nmu, a, b, &s0, &s1, mode, 1);
    for (; kc < kb; kc++)
        chunk_exp(w, r, x, kc, c0, c1, vsx, nmu, a, b, &s0, &s1, mode, 0);
    for (; kc < nkc; kc++)
        chunk_exp(w, r, x, kc, c0, c1, vsx, nmu, a, b, &s0, &s1, mode, 1);
    return _mm512_reduce_add_ps(_mm512_add_ps(s0, s1));
}

/* Maximum of row r's scores over its visible columns [c0, c1) (the band of a block that is
 * otherwise plain costs no extra pass); -inf for an empty band. */
INL float row_max(const fa_rows *w, int64_t r)
{
    const float *x = w->S + r * FA_ROWS_SLD;
    const int64_t c0 = w->c0[r], c1 = w->c1[r];
    __m512 a = _mm512_set1_ps(-INFINITY), b = a;
    int64_t j = c0 & ~(int64_t)15;
    if (j < c0) {
        a = _mm512_mask_max_ps(a, band16(j, c0, c1), _mm512_loadu_ps(x + j), a);
        j += 16;
    }
    for (; j + 32 <= c1; j += 32) {
        a = _mm512_max_ps(_mm512_loadu_ps(x + j), a);
        b = _mm512_max_ps(_mm512_loadu_ps(x + j + 16), b);
    }
    for (; j < c1; j += 16)
        a = _mm512_mask_max_ps(a, tail16(c1 - j), _mm512_loadu_ps(x + j), a);
    return _mm512_reduce_max_ps(_mm512_max_ps(a, b));
}

/* Online softmax of rows [0, nr) over their visible columns [c0, c1) of the block: updates m, l,
 * sets alpha and writes P (bf16 A tiles; columns outside the band up to round32(nc) and rows
 * nr..ngroups*16 zero). `sx` multiplies the stored values to give final scores: the scale on
 * raw scores (no features, scale > 0), else 1. Row by row, so the exp pass reads its row (1 KiB)
 * from L1 (the 70 KiB score block does not fit there), with the max pass one row ahead: row r's
 * exponentials never wait for the horizontal max reduction of their own row. */
static void rows_softmax(fa_rows *w, int64_t nr, int64_t ngroups, int64_t nc, float sx)
{
    const int64_t nkc = (nc + 31) / 32;
    float rmax_next = nr > 0 ? row_max(w, 0) : 0;
    for (int64_t r = 0; r < nr; r++) {
        const float *x = w->S + r * FA_ROWS_SLD;
        const int64_t c0 = w->c0[r], c1 = w->c1[r];
        const float rmax = rmax_next;
        if (r + 1 < nr)
            rmax_next = row_max(w, r + 1);
        /* maxss returns its second operand when either is NaN: a NaN running max stays NaN (a NaN
         * block max is caught through the row sum below). */
        const float m_old = w->m[r];
        const float mx = _mm_cvtss_f32(_mm_max_ss(_mm_set_ss(rmax * sx), _mm_set_ss(m_old)));
        /* A row that has seen nothing but -inf keeps m = -inf; shifting by 0 instead keeps its
         * exponentials at exactly 0 (and alpha = 0 on the all-zero accumulator). */
        const float mu = mx == -INFINITY ? 0.0f : mx;
        w->mu[r] = mu;
        w->alpha[r] = m_old; /* turned into exp(m_old - mu) per group below */
        w->m[r] = mx;
        if (w->Pl)
            w->rsum[r] = row_exp(w, r, x, c0, c1, nkc, sx, mu, EXP_F16);
        else if (fabsf(mu) <= FA_ROWS_FUSED_MU)
            w->rsum[r] = row_exp(w, r, x, c0, c1, nkc, sx, mu, EXP_FUSED);
        else
            w->rsum[r] = row_exp(w, r, x, c0, c1, nkc, sx, mu, EXP_BRACKET);
    }
    for (int64_t r = nr; r < ngroups * 16; r++) { /* padding rows: m stays -inf */
        w->mu[r] = 0;
        w->alpha[r] = w->m[r];
        w->rsum[r] = 0;
        for (int64_t kc = 0; kc < nkc; kc++) {
            _mm512_storeu_si512(p_row(w, r, kc), _mm512_setzero_si512());
            if (w->Pl)
                _mm512_storeu_si512(pl_row(w, r, kc), _mm512_setzero_si512());
        }
    }
    for (int64_t g = 0; g < ngroups; g++) {
        const __m512 m_old = _mm512_loadu_ps(w->alpha + g * 16);
        const __m512 alpha = exp_diff(m_old, _mm512_loadu_ps(w->mu + g * 16));
        _mm512_storeu_ps(w->alpha + g * 16, alpha);
        /* the block's sum joins the running sum once (two-level summation) */
        const __m512 l = _mm512_fmadd_ps(_mm512_loadu_ps(w->l + g * 16), alpha,
                                         _mm512_loadu_ps(w->rsum + g * 16));
        _mm512_storeu_ps(w->l + g * 16, l);
        /* a NaN score gives a NaN sum: the row's max becomes NaN too (NaN input poisons the row) */
        const __mmask16 nan = _mm512_cmp_ps_mask(l, l, _CMP_UNORD_Q);
        _mm512_mask_storeu_ps(w->m + g * 16, nan, _mm512_set1_ps(NAN));
    }
}

/* Zeroes the dropped entries of P for rows [0, nr) within their visible columns (the same draws
 * as every other kernel, 64 keys of a row per vectorized Philox call, fa_philox_avx512.h): each
 * 32-key P tile row is masked with its keep bits at once; outside the band P is 0 already. */
static void rows_dropout(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t q0,
                         int64_t nr, int64_t kb0, const fa_rows *w, uint64_t thr)
{
    const uint64_t bh = (uint64_t)(s->bi * p->h + h);
    for (int64_t r = 0; r < nr; r++) {
        const int64_t c0 = w->c0[r], c1 = w->c1[r];
        if (c0 >= c1)
            continue;
        uint64_t bits[FA_ROWS_BN / 64 + 2] = {0};
        fa_keep_row_bits(p->seed, p->offset, bh, (uint64_t)(q0 + r), kb0, c0, c1, thr, bits);
        for (int64_t kc = c0 / 32; kc * 32 < c1; kc++) {
            const __mmask32 keep = (__mmask32)(bits[kc / 2] >> (32 * (kc % 2)));
            uint16_t *ph = p_row(w, r, kc);
            _mm512_storeu_si512(ph, _mm512_maskz_mov_epi16(keep, _mm512_loadu_si512(ph)));
            if (w->Pl) {
                uint16_t *pl = pl_row(w, r, kc);
                _mm512_storeu_si512(pl, _mm512_maskz_mov_epi16(keep, _mm512_loadu_si512(pl)));
            }
        }
    }
}

/* Writes the normalized probabilities of rows [0, nr) of one block (final scores in S, final m
 * and l) into S_dmask, entries that dropout removes negated. */
static void rows_s_dmask(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t q0,
                         int64_t nr, int64_t kb0, int64_t nc, int has_drop, uint64_t thr,
                         const fa_rows *w)
{
    const uint64_t bh = (uint64_t)(s->bi * p->h + h);
    for (int64_t r = 0; r < nr; r++) {
        if (!(w->l[r] > 0))
            continue;
        float *x = w->S + r * FA_ROWS_SLD;
        const __m512 m = _mm512_set1_ps(w->m[r]), inv_l = _mm512_set1_ps(1.0f / w->l[r]);
        for (int64_t j = 0; j < nc; j += 16) {
            const __mmask16 t = tail16(nc - j);
            __m512 e = _mm512_mul_ps(exp_diff(_mm512_maskz_loadu_ps(t, x + j), m), inv_l);
            _mm512_mask_storeu_ps(x + j, t, e);
        }
        float *out = p->s_dmask + s->bi * p->sd_sb + h * p->sd_sh + (q0 + r) * p->sd_sr;
        const int64_t j0 = kb0 + w->c0[r], j1 = kb0 + w->c1[r];
        for (int64_t j = j0; j < j1; j++)
            out[j] = x[j - kb0];
        if (!has_drop)
            continue;
        for (int64_t j4 = j0 & ~(int64_t)3; j4 < j1; j4 += 4) {
            uint32_t rnd[4];
            fa_dropout_draw4(p->seed, p->offset, bh, (uint64_t)(q0 + r), (uint64_t)(j4 >> 2), rnd);
            for (int t = 0; t < 4; t++) {
                const int64_t j = j4 + t;
                if (j >= j0 && j < j1 && (uint64_t)rnd[t] < thr)
                    out[j] = -out[j];
            }
        }
    }
}

#endif
