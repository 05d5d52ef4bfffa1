/* fa_fwd_f32__avx512.c: FlashAttention-2 forward with float32 arithmetic, AVX-512F intrinsics.
 *
 * Serves f32, f16 and bf16 inputs (f16/bf16 K/V rows are widened to float32 one key block at a
 * time; f32 K/V rows are read in place, through a table of row pointers, so strided, kvcache and
 * paged layouts need no copy).
 *
 * Layout choice: the score block is kept transposed, S^T[key j][query q], with the 64 queries of
 * a work item in the 16 lanes of 4 vectors. Then
 *   S^T = K Q^T   broadcasts one key element against 4 vectors of the packed Q^T (d x 64),
 *   the softmax statistics of a query are per lane, so max and sum over keys are vertical
 *     vector operations (no horizontal reductions, no per-row scalar work),
 *   O += P V      broadcasts one P^T element against vectors of a V row read in place.
 * Per key block of FA_BC keys:
 *   x = mask(softcap(scale * (S + pse)) + alibi), keys outside a row's [lo, hi) -> -inf
 *   m' = max(m, max_j x); alpha = exp(m - m'); p = exp(x - m'); l = l alpha + sum_j p
 *   O = O alpha + P V    (the rescale is folded into loading the O tile)
 * Blocks that every row sees whole and calls without pse/mask/softcap/alibi skip the masking.
 *
 * exp: 2^t with t = (x - m') log2(e), t clamped below at -200 (so -inf gives exactly 0), split
 * t = n + r with n = round(t), |r| <= 1/2; 2^r by a degree-6 polynomial fitted on [-1/2, 1/2]
 * (Chebyshev-node least squares; max relative error 9.7e-8 including float32 Horner rounding);
 * 2^n applied by vscalefps, which flushes exactly to 0 far below the normal range.
 */
#include <immintrin.h>
#include <float.h>
#include <math.h>
#include <string.h>

#include "fa_kernels.h"
#include "fa_seq.h"
#include "fa_philox.h"
#include "fa_cvt.h"

#define QB FA_FWD_F32_AVX512_ROWS /* queries per work item: QB / BR sub-blocks */
#define BR 64                /* queries per sub-block: NQV vectors of 16 lanes */
#define NQV (BR / 16)
#define BC 64                /* keys per block */
#define QK_MR 6              /* keys per S^T register tile (x NQV vectors) */
#define PV_MR 6              /* queries per O register tile */
#define PV_NR 4              /* vectors of d per O register tile */
#define LOG2E 1.44269504088896341f

#define INL static inline __attribute__((always_inline))

/* ---- exp ------------------------------------------------------------------------------------ */

INL __m512 exp2_clamped(__m512 t)
{
    /* max(c, t) returns t when t is NaN, so NaN scores still poison the row as they should. */
    t = _mm512_max_ps(_mm512_set1_ps(-200.0f), t);
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_sub_ps(t, n);
    __m512 y = _mm512_set1_ps(1.5337577497120947e-04f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.3399859890341759e-03f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.6185198053717613e-03f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.5503290146589279e-02f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.4022646248340607e-01f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.9314718246459961e-01f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, n);
}

/* e^(x - m) for x <= m (x = -inf gives 0). */
INL __m512 exp_diff(__m512 x, __m512 m)
{
    return exp2_clamped(_mm512_mul_ps(_mm512_sub_ps(x, m), _mm512_set1_ps(LOG2E)));
}

/* tanh(y) = sign(y) (1 - e) / (1 + e), e = e^(-2|y|) <= 1: no overflow for any y. */
INL __m512 tanh16(__m512 y)
{
    __m512 a = _mm512_abs_ps(y);
    __m512 e = exp2_clamped(_mm512_mul_ps(a, _mm512_set1_ps(-2.0f * LOG2E)));
    __m512 one = _mm512_set1_ps(1.0f);
    __m512 r = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
    /* copy y's sign onto r (r >= 0) */
    __m512i sign = _mm512_and_si512(_mm512_castps_si512(y), _mm512_set1_epi32((int)0x80000000u));
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(r), sign));
}

/* ---- scratch -------------------------------------------------------------------------------- */

#define PIECE(bytes) ((((size_t)(bytes)) + 63) / 64 * 64)
#define DPAD(d) (((d) + 15) / 16 * 16)

typedef struct {
    float *QT;           /* per sub-block d x BR: Q^T, padding queries zero */
    float *ST;           /* (BC + QK_MR) x BR: S^T, then x, then P^T of the current block */
    float *O;            /* QB x dpad: unnormalized output */
    float *Kc, *Vc;      /* BC x dpad: widened K/V rows for f16/bf16 inputs */
    float *zero;         /* dpad zeros: the K row of keys past the block end */
    const float **kp;    /* BC + QK_MR row pointers */
    const char **pf;     /* 2 BC: K and V rows of the next block, to prefetch */
    int64_t npf, pf_bytes;
    float *m, *l, *alpha; /* QB each: running max, sum, last rescale factor */
    int64_t *lo, *hi;    /* QB: visible keys of each row */
    int32_t *c0, *c1;    /* BR: visible keys of each sub-block row within the current block */
} work;

/* The view of sub-block sb: its Q^T, output rows and statistics. */
static work sub_block(const work *w, int64_t sb, int64_t d)
{
    work v = *w;
    v.QT += sb * d * BR;
    v.O += sb * BR * DPAD(d);
    v.m += sb * BR, v.l += sb * BR, v.alpha += sb * BR;
    v.lo += sb * BR, v.hi += sb * BR;
    return v;
}


static size_t scratch_size(int64_t d)
{
    int64_t dp = DPAD(d);
    return PIECE(d * QB * 4) + PIECE((BC + QK_MR) * BR * 4) + PIECE(QB * dp * 4) +
           2 * PIECE(BC * dp * 4) + PIECE(dp * 4) + PIECE((BC + QK_MR) * sizeof(float *)) +
           PIECE(2 * BC * sizeof(char *)) +
           3 * PIECE(QB * 4) + 2 * PIECE(QB * 8) + 2 * PIECE(BR * 4);
}

static work carve(void *buf, int64_t d)
{
    int64_t dp = DPAD(d);
    char *p = (char *)buf;
    work w;
    w.QT = (float *)p, p += PIECE(d * QB * 4);
    w.ST = (float *)p, p += PIECE((BC + QK_MR) * BR * 4);
    w.O = (float *)p, p += PIECE(QB * dp * 4);
    w.Kc = (float *)p, p += PIECE(BC * dp * 4);
    w.Vc = (float *)p, p += PIECE(BC * dp * 4);
    w.zero = (float *)p, p += PIECE(dp * 4);
    w.kp = (const float **)p, p += PIECE((BC + QK_MR) * sizeof(float *));
    w.pf = (const char **)p, p += PIECE(2 * BC * sizeof(char *));
    w.m = (float *)p, p += PIECE(QB * 4);
    w.l = (float *)p, p += PIECE(QB * 4);
    w.alpha = (float *)p, p += PIECE(QB * 4);
    w.lo = (int64_t *)p, p += PIECE(QB * 8);
    w.hi = (int64_t *)p, p += PIECE(QB * 8);
    w.c0 = (int32_t *)p, p += PIECE(BR * 4);
    w.c1 = (int32_t *)p;
    return w;
}

size_t fa_fwd_f32__avx512_scratch(const fa_fwd_params *p) { return scratch_size(p->d); }

/* ---- conversions ---------------------------------------------------------------------------- */

static float load1(fa_dtype t, const void *base, int64_t idx)
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
static void widen_row(fa_dtype t, const void *src, int64_t n, float *dst)
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

static void store_row(fa_dtype t, const float *src, float mul, int64_t n, void *dst)
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

/* ---- micro-kernels -------------------------------------------------------------------------- */

/* S^T[j0 + r][0..BR) = K[j0 + r] . Q^T for r < MR: MR x NQV accumulators (24 at MR = 6, which
 * leaves registers for the 4 Q^T vectors; 10 loads feed 24 FMAs). */
INL void qk_tile(const int MR, const float *restrict QT, const float *const *kp, int64_t d,
                 float *restrict ST)
{
    __m512 acc[QK_MR][NQV];
    const float *kr[QK_MR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) {
        kr[r] = kp[r];
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
            const __m512 b = _mm512_set1_ps(kr[r][k]);
#pragma GCC unroll 16
            for (int v = 0; v < NQV; v++)
                acc[r][v] = _mm512_fmadd_ps(b, q[v], acc[r][v]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 16
        for (int v = 0; v < NQV; v++)
            _mm512_store_ps(ST + r * BR + v * 16, acc[r][v]);
}

/* O[r][c-vectors] = alpha_r O[r][..] + sum_j P^T[j][r] V[j][..] for MR rows and NR vectors of
 * the packed V block (row stride ldv, zero padded, so no masks). */
INL void pv_tile(const int MR, const int NR, const float *restrict PT, const float *restrict V,
                 int64_t ldv, int64_t nc, const float *alpha, float *restrict O, int64_t ldo)
{
    __m512 acc[PV_MR][PV_NR];
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++) {
        __m512 a = _mm512_set1_ps(alpha[r]);
#pragma GCC unroll 16
        for (int c = 0; c < NR; c++)
            acc[r][c] = _mm512_mul_ps(a, _mm512_load_ps(O + r * ldo + c * 16));
    }
    for (int64_t j = 0; j < nc; j++) {
        __m512 v[PV_NR];
#pragma GCC unroll 16
        for (int c = 0; c < NR; c++)
            v[c] = _mm512_load_ps(V + j * ldv + c * 16);
#pragma GCC unroll 16
        for (int r = 0; r < MR; r++) {
            __m512 pb = _mm512_set1_ps(PT[j * BR + r]);
#pragma GCC unroll 16
            for (int c = 0; c < NR; c++)
                acc[r][c] = _mm512_fmadd_ps(pb, v[c], acc[r][c]);
        }
    }
#pragma GCC unroll 16
    for (int r = 0; r < MR; r++)
#pragma GCC unroll 16
        for (int c = 0; c < NR; c++)
            _mm512_store_ps(O + r * ldo + c * 16, acc[r][c]);
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
 * `pf` set, also prefetches the next block's rows. */
static void gemm_qk(const work *w, int64_t d, int64_t nc, int pf)
{
    int64_t j = 0;
    for (; j + QK_MR <= nc; j += QK_MR) {
        if (pf)
            prefetch_rows(w, j, j + QK_MR);
        qk_tile(QK_MR, w->QT, w->kp + j, d, w->ST + j * BR);
    }
    for (; j < nc; j += 4)
        qk_tile(4, w->QT, w->kp + j, d, w->ST + j * BR);
    if (pf)
        prefetch_rows(w, nc / QK_MR * QK_MR, BC);
}

#define PV_CASE(MR, NR) pv_tile(MR, NR, PT, V, dp, nc, w->alpha + r0, O, dp)
#define PV_NR_SWITCH(MR)                                                                           \
    switch (nr) {                                                                                  \
    case 1: PV_CASE(MR, 1); break;                                                                 \
    case 2: PV_CASE(MR, 2); break;                                                                 \
    case 3: PV_CASE(MR, 3); break;                                                                 \
    default: PV_CASE(MR, 4); break;                                                                \
    }

/* O[0..rows) = alpha O + P V over the block's nc keys. */
static void gemm_pv(const work *w, int64_t d, int64_t nc, int64_t rows)
{
    const int64_t dp = DPAD(d), nvec = dp / 16;
    for (int64_t c0 = 0; c0 < nvec; c0 += PV_NR) {
        const int nr = nvec - c0 < PV_NR ? (int)(nvec - c0) : PV_NR;
        const float *V = w->Vc + c0 * 16;
        int64_t r0 = 0;
        for (; r0 + PV_MR <= rows; r0 += PV_MR) {
            const float *PT = w->ST + r0;
            float *O = w->O + r0 * dp + c0 * 16;
            PV_NR_SWITCH(PV_MR)
        }
        for (; r0 < rows; r0 += 4) {
            const float *PT = w->ST + r0;
            float *O = w->O + r0 * dp + c0 * 16;
            PV_NR_SWITCH(4)
        }
    }
}

/* ---- K/V rows of a block ---------------------------------------------------------------------- */

/* Row pointers (f32 K), widened copies (f16/bf16 K) and the packed V block for keys
 * [kb0, kb0 + nc), plus the addresses of the next block's rows (up to kend) for gemm_qk to
 * prefetch: consecutive keys are a head stride apart (often a page or more), beyond the reach of
 * the hardware prefetchers. */
static void block_rows(const fa_fwd_params *p, const fa_seq *s, int64_t hk, int64_t kb0,
                       int64_t nc, int64_t kend, int want_v, work *w)
{
    const int64_t d = p->d, dp = DPAD(d), es = fa_dtype_size(p->dtype);
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
        if (!want_v)
            continue;
        /* V rows are always copied: PV reads the block once per query tile, and rows at a
         * large power-of-two stride would all land in the same few L1 sets. */
        widen_row(p->dtype, fa_key_ptr(p, &p->v, s, kb0 + j, hk, es), d, w->Vc + j * dp);
    }
    for (int64_t j = nc; j < nc + 4; j++) /* the tiles of gemm_qk overrun nc by at most 3 */
        w->kp[j] = w->zero;
}

/* ---- scores --------------------------------------------------------------------------------- */

/* Turns S^T[0..nc) of the block (keys kb0..) into final scores x in place: pse, scale, softcap,
 * alibi, band (-inf outside [c0, c1) of each query) and the explicit mask. `plain` means none of
 * these apply to any lane, leaving only the scale. */
static void block_scores(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t q0,
                         int64_t nrows, int64_t kb0, int64_t nc, int plain, work *w)
{
    float *ST = w->ST;
    if (p->pse) {
        for (int64_t r = 0; r < nrows; r++) {
            const int64_t base = s->q_batch * p->pse_sb + h * p->pse_sh + (q0 + r) * p->pse_sr;
            for (int64_t c = w->c0[r]; c < w->c1[r]; c++)
                ST[c * BR + r] += load1(p->pse_dtype, p->pse, base + (kb0 + c) * p->pse_sc);
        }
    }
    const __m512 scale = _mm512_set1_ps((float)p->scale);
    if (plain) {
        for (int64_t j = 0; j < nc; j++)
            for (int v = 0; v < NQV; v++)
                _mm512_store_ps(ST + j * BR + v * 16,
                                _mm512_mul_ps(_mm512_load_ps(ST + j * BR + v * 16), scale));
        return;
    }
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

/* Online softmax over the block's nc key rows: updates m, l, sets alpha, turns x into P^T. */
static void block_softmax(work *w, int64_t nc)
{
    float *ST = w->ST;
    for (int v = 0; v < NQV; v++) {
        const __m512 m_old = _mm512_load_ps(w->m + v * 16);
        __m512 mx = m_old;
        for (int64_t j = 0; j < nc; j++)
            mx = _mm512_max_ps(_mm512_load_ps(ST + j * BR + v * 16), mx);
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

/* Zero the dropped entries of P^T for query rows [0, nrows) within their visible columns. */
static void block_dropout(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t q0,
                          int64_t nrows, int64_t kb0, const work *w, float *PT, uint64_t thr)
{
    const uint64_t bh = (uint64_t)(s->bi * p->h + h);
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t j0 = kb0 + w->c0[r], j1 = kb0 + w->c1[r];
        for (int64_t j4 = j0 & ~(int64_t)3; j4 < j1; j4 += 4) {
            uint32_t rnd[4];
            fa_dropout_draw4(p->seed, p->offset, bh, (uint64_t)(q0 + r), (uint64_t)(j4 >> 2), rnd);
            for (int t = 0; t < 4; t++) {
                int64_t j = j4 + t;
                if (j >= j0 && j < j1 && (uint64_t)rnd[t] < thr)
                    PT[(j - kb0) * BR + r] = 0;
            }
        }
    }
}

/* Per-row visible columns of block [kb0, kb0 + nc); returns 1 if every real row sees it all. */
static int block_band(work *w, int64_t nrows, int64_t kb0, int64_t nc)
{
    int full = 1;
    for (int64_t r = 0; r < BR; r++) {
        int64_t a = 0, b = 0;
        if (r < nrows) {
            a = w->lo[r] - kb0, b = w->hi[r] - kb0;
            a = a < 0 ? 0 : a > nc ? nc : a;
            b = b < 0 ? 0 : b > nc ? nc : b;
            if (b < a)
                b = a;
            full &= a == 0 && b == nc;
        }
        w->c0[r] = (int32_t)a;
        w->c1[r] = (int32_t)b;
    }
    return full;
}

/* Writes the normalized probabilities of one sub-block x key block (scores already in ST) into
 * S_dmask, entries that dropout removes negated. */
static void s_dmask_block(const fa_fwd_params *p, const fa_seq *s, int64_t h, int64_t qs,
                          int64_t nr, int64_t kb0, int64_t nc, int has_drop, uint64_t thr, work *w)
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

/* ---- the work item ---------------------------------------------------------------------------- */

fa_status fa_fwd_f32__avx512_item(const fa_fwd_params *p, int64_t bi, int64_t h, int64_t q0,
                                  void *buf)
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
    int64_t kmin = INT64_MAX, kmax = 0, smin[QB / BR], smax[QB / BR];
    for (int64_t sb = 0; sb < nsub; sb++) {
        smin[sb] = INT64_MAX, smax[sb] = 0;
        for (int64_t r = sb * BR; r < nrows && r < (sb + 1) * BR; r++) {
            fa_row_band(p, &s, q0 + r, &w.lo[r], &w.hi[r]);
            if (w.lo[r] < w.hi[r]) {
                smin[sb] = w.lo[r] < smin[sb] ? w.lo[r] : smin[sb];
                smax[sb] = w.hi[r] > smax[sb] ? w.hi[r] : smax[sb];
            }
        }
        kmin = smin[sb] < kmin ? smin[sb] : kmin;
        kmax = smax[sb] > kmax ? smax[sb] : kmax;
    }

    /* Q^T per sub-block, padding queries zero; statistics start empty (or at the sink logit,
     * one extra key whose exp(sink - m) enters the denominator only). */
    memset(w.QT, 0, (size_t)(d * BR * nsub) * 4);
    for (int64_t r = 0; r < nrows; r++) {
        const char *src = (const char *)p->q.ptr +
                          (s.q_batch * p->q.sb + (s.q_row0 + q0 + r) * p->q.sr + h * p->q.sh) * es;
        float *qt = w.QT + (r / BR) * d * BR + r % BR;
        widen_row(p->dtype, src, d, w.Kc);
        for (int64_t k = 0; k < d; k++)
            qt[k * BR] = w.Kc[k];
    }
    for (int64_t r = 0; r < nsub * BR; r++) {
        w.m[r] = -INFINITY;
        w.l[r] = 0;
        if (p->sink && r < nrows) {
            w.m[r] = p->sink[h];
            w.l[r] = 1;
        }
    }
    memset(w.O, 0, (size_t)(nsub * BR * dp) * 4);
    memset(w.zero, 0, (size_t)dp * 4);

    /* Each key block is fetched once and used by every sub-block whose band meets it. */
    for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BC) {
        const int64_t nc = kmax - kb0 < BC ? kmax - kb0 : BC;
        block_rows(p, &s, hk, kb0, nc, kmax, 1, &w);
        int pf_done = 0;
        for (int64_t sb = 0; sb < nsub; sb++) {
            if (smin[sb] >= kb0 + nc || smax[sb] <= kb0)
                continue;
            work v = sub_block(&w, sb, d);
            const int64_t qs = q0 + sb * BR;
            const int64_t nr = nrows - sb * BR < BR ? nrows - sb * BR : BR;
            const int full = block_band(&v, nr, kb0, nc);
            gemm_qk(&v, d, nc, !pf_done);
            pf_done = 1;
            block_scores(p, &s, h, qs, nr, kb0, nc, full && !featured, &v);
            block_softmax(&v, nc);
            if (has_drop)
                block_dropout(p, &s, h, qs, nr, kb0, &v, v.ST, thr);
            gemm_pv(&v, d, nc, (nr + 3) / 4 * 4);
        }
    }

    const float drop_scale = has_drop ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t i = q0 + r;
        char *dst = (char *)p->o + (s.q_batch * p->o_sb + (s.q_row0 + i) * p->o_sr + h * p->o_sh) * es;
        const int empty = !(w.l[r] > 0);
        const int invalid = p->invalid_line_zero && w.m[r] == (float)p->mask_fill;
        float *Or = w.O + r * dp;
        if (empty || invalid)
            memset(Or, 0, (size_t)d * 4);
        store_row(p->dtype, Or, empty || invalid ? 0.0f : drop_scale / w.l[r], d, dst);
        const int64_t srow = p->cu_q ? s.q_row0 + i : i;
        const int64_t sbat = p->cu_q ? 0 : s.bi;
        if (p->lse) {
            float v = empty ? INFINITY : w.m[r] + (float)log((double)w.l[r]);
            ((float *)p->lse)[sbat * p->lse_sb + h * p->lse_sh + srow * p->lse_sr] = v;
        }
        if (p->rowmax) {
            const int64_t o = sbat * p->stat_sb + h * p->stat_sh + srow * p->stat_sr;
            ((float *)p->rowmax)[o] = w.m[r];
            ((float *)p->rowsum)[o] = invalid ? FLT_MAX : w.l[r];
        }
    }

    /* S_dmask (testing aid): recompute the scores block by block and write the normalized
     * probabilities of the visible columns, dropped entries negated. */
    if (p->s_dmask) {
        for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BC) {
            const int64_t nc = kmax - kb0 < BC ? kmax - kb0 : BC;
            block_rows(p, &s, hk, kb0, nc, kmax, 0, &w);
            for (int64_t sb = 0; sb < nsub; sb++) {
                if (smin[sb] >= kb0 + nc || smax[sb] <= kb0)
                    continue;
                work v = sub_block(&w, sb, d);
                const int64_t qs = q0 + sb * BR;
                const int64_t nr = nrows - sb * BR < BR ? nrows - sb * BR : BR;
                block_band(&v, nr, kb0, nc);
                gemm_qk(&v, d, nc, 0);
                block_scores(p, &s, h, qs, nr, kb0, nc, 0, &v);
                s_dmask_block(p, &s, h, qs, nr, kb0, nc, has_drop, thr, &v);
            }
        }
    }
    return FA_OK;
}
