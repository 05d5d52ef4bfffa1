/* fa_bwd_rows.h: the per-element half of the backward, shared by every backward kernel.
 *
 * Included (after fa_vec.h's configuration macros FA_ACC, FA_ACC_IS_DOUBLE, FA_VBYTES) by the
 * FMA template fa_bwd_impl.h and by the AMX bf16 kernel fa_bwd_bf16__amx.c: element conversions,
 * the workspace's row addressing, the row statistics of the preprocess, and bw_row, which turns
 * one row of recomputed scores and dO.V products into P (z r) and dX with every score feature
 * (pse, softcap, alibi, explicit mask, dropout replay). The math is fa_bwd_params.h's.
 */
#ifndef FA_BWD_ROWS_H
#define FA_BWD_ROWS_H

#include <math.h>
#include <float.h>
#include <string.h>

#include "fa_bwd_params.h"
#include "fa_seq.h"
#include "fa_philox.h"
#include "fa_vec.h"
#if defined(__AVX512F__)
#include "fa_philox_avx512.h" /* the dropout replay draws 64 keys per call */
#endif

/* e^t for t <= 0 (-inf gives 0): P's exponential. The AVX-512 float32 builds take the forward's
 * exp2_p6 of t log2 e (fa_exp2.h: 9.7e-8 relative, plus 2^-24 |t| from the product, ~1e-6 of P
 * at t = -16 where P ~ 1e-7): 10 vector uops per 16 keys where vexp_nonpos (fa_vec.h, the
 * portable one) takes ~22 with its clamp, Cody-Waite split and degree-7 series. */
#if defined(__AVX512F__) && defined(__AVX512DQ__) && !FA_ACC_IS_DOUBLE && FA_VBYTES == 64
#include "fa_exp2.h"
FA_INLINE vec_t bw_exp(vec_t t)
{
    return (vec_t)exp2_p6((__m512)(t * (acc_t)1.4426950408889634));
}
#else
FA_INLINE vec_t bw_exp(vec_t t)
{
    return vexp_nonpos(t);
}
#endif

/* ---- element conversions --------------------------------------------------------------------- */

FA_INLINE float bw_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16; /* bfloat16 is the high half of a float32 */
    float f;
    memcpy(&f, &u, 4);
    return f;
}

FA_INLINE uint16_t bw_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN stays a (quiet) NaN instead of rounding to inf */
        return (uint16_t)((u >> 16) | 0x40);
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1)) >> 16); /* round half to even */
}

/* n elements of type t at src into acc_t at dst. */
FA_INLINE void bw_load(fa_dtype t, const void *src, int64_t n, acc_t *dst)
{
    if (t == FA_F32) {
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)((const float *)src)[i];
    } else if (t == FA_F64) {
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)((const double *)src)[i];
    } else if (t == FA_F16) {
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)(float)((const _Float16 *)src)[i];
    } else {
        for (int64_t i = 0; i < n; i++)
            dst[i] = (acc_t)bw_bf16_to_f32(((const uint16_t *)src)[i]);
    }
}

/* n acc_t values rounded once to type t. */
FA_INLINE void bw_store(fa_dtype t, const acc_t *src, int64_t n, void *dst)
{
    if (t == FA_F32) {
        for (int64_t i = 0; i < n; i++)
            ((float *)dst)[i] = (float)src[i];
    } else if (t == FA_F64) {
        for (int64_t i = 0; i < n; i++)
            ((double *)dst)[i] = (double)src[i];
    } else if (t == FA_F16) {
        for (int64_t i = 0; i < n; i++)
            ((_Float16 *)dst)[i] = (_Float16)(float)src[i];
    } else {
        for (int64_t i = 0; i < n; i++)
            ((uint16_t *)dst)[i] = bw_f32_to_bf16((float)src[i]);
    }
}

FA_INLINE acc_t bw_one(fa_dtype t, const void *base, int64_t idx)
{
    acc_t x;
    bw_load(t, (const char *)base + idx * fa_dtype_size(t), 1, &x);
    return x;
}

/* ---- workspace addressing ------------------------------------------------------------------------ */

/* Row index of row i of sequence s in the statistics D, m, il (fa_bwd_ws). */
FA_INLINE int64_t bw_qrow(const fa_bwd_params *p, const fa_seq *s, int64_t i)
{
    return p->f.cu_q ? s->q_row0 + i : s->bi * p->f.sq + i;
}

/* Workspace row of query row i of sequence s in the current panel's Q, dO, dQp (fa_bwd_ws). */
FA_INLINE int64_t bw_prow(const fa_bwd_ws *ws, const fa_seq *s, int64_t i)
{
    return ws->prow[s->bi] + i - ws->p0;
}

FA_INLINE int64_t bw_ws_at(const fa_bwd_params *p, const fa_bwd_ws *ws, const fa_seq *s, int64_t h,
                           int64_t i)
{
    return h * ws->rows + bw_qrow(p, s, i);
}

/* ---- row statistics --------------------------------------------------------------------------- */

/* D, m, il of row i of (sequence s, head h) into the workspace, given its dO row (d values in
 * acc_t): D_i = dO_i . O_i, and P = exp(s - m) * il from the lse or the NPU rowmax/rowsum form,
 * a dead row (fa_bwd_params.h) getting m = +inf, il = 0. */
static void bw_row_stats(const fa_bwd_params *p, const fa_bwd_ws *ws, const fa_seq *s, int64_t h,
                         int64_t i, const acc_t *dor)
{
    const fa_fwd_params *f = &p->f;
    const int64_t d = f->d, es = fa_dtype_size(f->dtype), pr = s->q_row0 + i;
    const acc_t fill = (acc_t)f->mask_fill;
    acc_t orow[512];
    bw_load(f->dtype, (const char *)p->out.ptr + (s->q_batch * p->out.sb + pr * p->out.sr + h * p->out.sh) * es, d, orow);
    acc_t dsum = 0;
    for (int64_t k = 0; k < d; k++)
        dsum += dor[k] * orow[k];
    /* Statistics are stored per packed row for varlen (batch stride ignored), as the forward
     * writes them. */
    const int64_t sr = f->cu_q ? pr : i, sb = f->cu_q ? 0 : s->bi;
    acc_t m, il;
    if (p->lse) {
        acc_t l = ((const acc_t *)p->lse)[sb * p->lse_sb + h * p->lse_sh + sr * p->lse_sr];
        int dead = !(l < (acc_t)INFINITY) || (f->invalid_line_zero && l == fill);
        m = dead ? (acc_t)INFINITY : l;
        il = dead ? 0 : 1;
    } else {
        const int64_t o = sb * p->stat_sb + h * p->stat_sh + sr * p->stat_sr;
        acc_t mx = ((const acc_t *)p->rowmax)[o], sm = ((const acc_t *)p->rowsum)[o];
        int dead = !(sm > 0) || !(mx > (acc_t)-INFINITY) || !(mx < (acc_t)INFINITY) ||
                   (f->invalid_line_zero && mx == fill);
        m = dead ? (acc_t)INFINITY : mx;
        il = dead ? 0 : (acc_t)1 / sm;
    }
    const int64_t at = bw_ws_at(p, ws, s, h, i);
    ((acc_t *)ws->D)[at] = dsum;
    ((acc_t *)ws->m)[at] = m;
    ((acc_t *)ws->il)[at] = il;
}


/* ---- one row of one block: scores -> P, dS ------------------------------------------------------ */

/* Whether scores need nothing per element besides the scale (no pse, softcap, alibi or explicit
 * mask): then bw_row takes one pass and no chain-factor array, and the FMA kernels can apply the
 * scale when they store the S = Q K^T tile. */
FA_INLINE int bw_plain(const fa_fwd_params *f)
{
    return !f->pse && !(f->softcap > 0) && !f->alibi && !f->mask;
}

/* The forward's dropout mask of row i over keys kb0 + [0, ncp), replayed: Z[c] = 1 / (1 - p) for
 * kept keys inside [c0, c1), 0 elsewhere. Same Philox keying as the forward (seed, offset,
 * batch*h + head, row, column / 4), keep iff draw >= threshold (fa_philox.h). */
static void bw_keep_row(const fa_bwd_params *p, const fa_seq *s, int64_t h, int64_t i, int64_t kb0,
                        int64_t ncp, int64_t c0, int64_t c1, uint64_t thr, acc_t *Z)
{
    const fa_fwd_params *f = &p->f;
    const acc_t r = (acc_t)(1.0 / (1.0 - f->dropout_p));
    const uint64_t bh = (uint64_t)(s->bi * f->h + h);
#if defined(__AVX512F__)
    /* 64 keys per vectorized Philox call (fa_philox_avx512.h), then Z 16 lanes at a time */
    uint64_t bits[FA_BWD_BLOCK_KEYS / 64 + 2] = {0};
    fa_keep_row_bits(f->seed, f->offset, bh, (uint64_t)i, kb0, c0, c1, thr, bits);
    for (int64_t c = 0; c < ncp; c += 16) {
        const __mmask16 k = band16(c, c0, c1) & fa_keep_bits16(bits, c);
        if (sizeof(acc_t) == 4) {
            _mm512_storeu_ps((float *)Z + c, _mm512_maskz_mov_ps(k, _mm512_set1_ps((float)r)));
        } else {
            _mm512_storeu_pd((double *)Z + c, _mm512_maskz_mov_pd((__mmask8)k, _mm512_set1_pd((double)r)));
            _mm512_storeu_pd((double *)Z + c + 8, _mm512_maskz_mov_pd((__mmask8)(k >> 8), _mm512_set1_pd((double)r)));
        }
    }
#else
    const int64_t j0 = kb0 + c0, j1 = kb0 + c1;
    for (int64_t c = 0; c < ncp; c++)
        Z[c] = 0;
    for (int64_t j4 = j0 & ~(int64_t)3; j4 < j1; j4 += 4) {
        uint32_t u[4];
        fa_dropout_draw4(f->seed, f->offset, bh, (uint64_t)i, (uint64_t)(j4 >> 2), u);
        for (int t = 0; t < 4; t++) {
            int64_t j = j4 + t;
            if (j >= j0 && j < j1 && (uint64_t)u[t] >= thr)
                Z[j - kb0] = r;
        }
    }
#endif
}

/* Row i (of sequence s, query head h) against keys kb0 + [0, ncp): on entry S holds q.k (scaled
 * = 0) or, only where bw_plain, q.k * scale rounded to acc_t (scaled = 1), and dP holds dO.v; on
 * return S holds P z r (what dV needs) and dP holds dX (what dQ, dK and dpse need). Keys outside
 * [c0, c1) are outside the band: P = 0 and dX = 0 there. */
static void bw_row_s(const fa_bwd_params *p, const fa_seq *s, int64_t h, int64_t i, int64_t kb0,
                     int64_t ncp, int64_t c0, int64_t c1, acc_t m, acc_t il, acc_t Di, acc_t *S,
                     acc_t *dP, acc_t *G, acc_t *Z, uint64_t thr, int scaled)
{
    const fa_fwd_params *f = &p->f;
    if (c0 >= c1 || il == 0) {
        memset(S, 0, (size_t)ncp * sizeof(acc_t));
        memset(dP, 0, (size_t)ncp * sizeof(acc_t));
        return;
    }
    const int drop = f->dropout_p > 0;
    if (drop)
        bw_keep_row(p, s, h, i, kb0, ncp, c0, c1, thr, Z);
    const acc_t scale = (acc_t)f->scale;
    const vec_t iota = viota(), ninf = vsplat(-INFINITY), zero = vsplat(0);
    const vec_t vm = vsplat(m), vil = vsplat(il), vD = vsplat(Di);
    if (bw_plain(f)) {
        /* One pass, with the general path's roundings in its order: x = q.k * scale rounded
         * once (by the GEMM's store, or here through memory, which no FMA contraction crosses),
         * P = exp(x - m) il (0 outside the band), dX = P (z r dP - D) scale. */
        if (!scaled)
            for (int64_t c = 0; c < ncp; c += VLEN)
                vstore(S + c, vload(S + c) * scale);
        const vec_t vs = vsplat(scale);
        const int edge = c0 > 0 || c1 < ncp;
        for (int64_t c = 0; c < ncp; c += VLEN) {
            vec_t t = vload(S + c) - vm;
            if (edge) {
                vec_t col = iota + (acc_t)c;
                t = vsel((col >= (acc_t)c0) & (col < (acc_t)c1), t, ninf);
            }
            vec_t P = bw_exp(t) * vil;
            if (drop) {
                vec_t zr = vload(Z + c);
                vstore(dP + c, P * (zr * vload(dP + c) - vD) * vs);
                vstore(S + c, P * zr);
            } else {
                vstore(dP + c, P * (vload(dP + c) - vD) * vs);
                vstore(S + c, P);
            }
        }
        return;
    }
    if (f->pse) {
        const int64_t base = s->q_batch * f->pse_sb + h * f->pse_sh + i * f->pse_sr;
        for (int64_t c = c0; c < c1; c++)
            S[c] += bw_one(f->pse_dtype, f->pse, base + (kb0 + c) * f->pse_sc);
    }
    /* Scores exactly as the forward forms them (so exp(s - lse) reproduces its P), and the chain
     * factor G = ds/dx = scale * g'(scale x). */
    const int softcap = f->softcap > 0;
    const acc_t cap = (acc_t)f->softcap, inv_cap = (acc_t)(1.0 / f->softcap);
    const int alibi = f->alibi != NULL;
    acc_t slope = 0, diag = 0;
    if (alibi) {
        slope = (acc_t)f->alibi[s->bi * f->alibi_sb + h];
        diag = (acc_t)(i + s->sk - s->sq - kb0); /* bottom-right aligned distance, as forward */
    }
    for (int64_t c = 0; c < ncp; c += VLEN) {
        vec_t x = vload(S + c) * scale;
        vec_t g = vsplat(scale);
        if (softcap) {
            vec_t t = vtanh(x * inv_cap);
            x = cap * t;
            g = g * ((acc_t)1 - t * t);
        }
        vec_t col = iota + (acc_t)c;
        if (alibi) {
            vec_t dist = vsplat(diag) - col;
            dist = vsel(dist < (acc_t)0, -dist, dist);
            x = x - slope * dist;
        }
        veci_t in = (col >= (acc_t)c0) & (col < (acc_t)c1);
        vstore(S + c, vsel(in, x, ninf));
        vstore(G + c, vsel(in, g, zero));
    }
    if (f->mask) {
        const acc_t fill = (acc_t)f->mask_fill;
        const uint8_t *mrow = f->mask + s->q_batch * f->mask_sb + h * f->mask_sh + i * f->mask_sr;
        for (int64_t c = c0; c < c1; c++) {
            if (mrow[(kb0 + c) * f->mask_sc]) {
                S[c] = fill; /* constant score: P may be > 0 but no gradient flows to q, k, pse */
                G[c] = 0;
            }
        }
    }
    if (drop) {
        for (int64_t c = 0; c < ncp; c += VLEN) {
            vec_t P = bw_exp(vload(S + c) - vm) * vil;
            vec_t zr = vload(Z + c);
            vstore(dP + c, P * (zr * vload(dP + c) - vD) * vload(G + c));
            vstore(S + c, P * zr);
        }
    } else {
        for (int64_t c = 0; c < ncp; c += VLEN) {
            vec_t P = bw_exp(vload(S + c) - vm) * vil;
            vstore(dP + c, P * (vload(dP + c) - vD) * vload(G + c));
            vstore(S + c, P);
        }
    }
}

/* bw_row_s for S holding q.k as computed (the AMX kernel's entry). */
static inline void bw_row(const fa_bwd_params *p, const fa_seq *s, int64_t h, int64_t i,
                          int64_t kb0, int64_t ncp, int64_t c0, int64_t c1, acc_t m, acc_t il,
                          acc_t Di, acc_t *S, acc_t *dP, acc_t *G, acc_t *Z, uint64_t thr)
{
    bw_row_s(p, s, h, i, kb0, ncp, c0, c1, m, il, Di, S, dP, G, Z, thr, 0);
}

/* Band of each row of [q0, q0 + nr) into lo/hi; returns whether any row reaches [k0, k1). */
static int bw_bands(const fa_bwd_params *p, const fa_seq *s, int64_t q0, int64_t nr, int64_t k0,
                    int64_t k1, int64_t *lo, int64_t *hi)
{
    int any = 0;
    for (int64_t r = 0; r < nr; r++) {
        fa_row_band(&p->f, s, q0 + r, &lo[r], &hi[r]);
        any |= lo[r] < hi[r] && lo[r] < k1 && hi[r] > k0;
    }
    return any;
}

/* Software prefetch into L2 of the next query block's operands (Q, dO and dQ partial rows, each a
 * contiguous region of the workspace) while the current one is computed: at long S they stream
 * from L3 or memory once per key group, and the hardware prefetchers stop at each 4 KiB page. The
 * dkdv loops issue a few lines after each row of bw_row work, since a burst of prefetches stalls
 * on fill buffers. */
typedef struct {
    const char *at[3];
    int64_t left[3]; /* cache lines still to prefetch in each region */
    int64_t per;     /* lines per call of bw_pf_some */
} bw_pf;

/* Regions r[i] of n[i] bytes, spread over `calls` calls of bw_pf_some. */
FA_INLINE bw_pf bw_pf_init(const void *r0, int64_t n0, const void *r1, int64_t n1, const void *r2,
                           int64_t n2, int64_t calls)
{
    bw_pf pf = {{(const char *)r0, (const char *)r1, (const char *)r2},
                {(n0 + 63) / 64, (n1 + 63) / 64, (n2 + 63) / 64}, 0};
    pf.per = (pf.left[0] + pf.left[1] + pf.left[2] + calls - 1) / calls;
    return pf;
}

FA_INLINE void bw_pf_some(bw_pf *pf)
{
    for (int64_t n = pf->per, i = 0; n > 0 && i < 3; i++)
        for (; n > 0 && pf->left[i] > 0; n--, pf->left[i]--, pf->at[i] += 64)
            __builtin_prefetch(pf->at[i], 0, 2);
}

#endif
