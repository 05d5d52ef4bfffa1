/* fa_fwd_bf16__amx.c: FlashAttention-2 forward for bfloat16 inputs on AMX (tdpbf16ps), float32
 * scores, statistics and accumulators.
 *
 * Layout ("brgemm" order: queries are the rows of every product, so S, P and O are row-major):
 *   Q: per item, A tiles of 16 queries x 32 dims (1 KiB each, contiguous), dims padded to d32.
 *   K: packed once per (batch, kv head) by the driver as B tiles in VNNI pairs over dims:
 *      tile (16-key group g, 32-dim chunk c) holds row p = dim pair (2p, 2p+1), 16 keys x 2.
 *   V: packed as B tiles in VNNI pairs over keys: tile (32-key chunk t, 16-dim group e) holds
 *      row p = key pair (2p, 2p+1), 16 dims x 2.
 * A work item is up to 256 queries in four 64-query sub-blocks that share each 256-key block of
 * K/V (kept in L2); per key block and sub-block:
 *   S (64 x 256 fp32, row-major) = Q K^T: 2x2 C tiles per step, the K tile pair reused from L1
 *     by both query tile pairs (Q, 16 KiB, stays in L1);
 *   row-wise online softmax in AVX-512 (fa_fwd_bf16_rows.h): one horizontal max and sum per row
 *     per block, P written as bf16 A tiles;
 *   Ob (64 x d fp32) = P V from zeroed C tiles (16 x 16 fp32: 8 k-steps per tile store), the P
 *     tile pair reused from L1 by every dim tile pair; then O = alpha O + Ob in AVX-512, so each
 *     block's sum joins the accumulator once (two-level summation: error ~ (block + blocks) eps
 *     instead of S eps, see NOTES.md).
 * Numerics: Q.K products are exact in fp32 (bf16 x bf16), accumulation fp32; P enters the P V
 * product rounded to bf16 (as flash-attn does on GPUs), while the row sum l uses the fp32 P.
 * Without a packed copy (one-block calls, decode) the item runs the AVX-512 float32 kernel.
 *
 * float16 inputs (no AMX-FP16 here) run the same kernel on a split: every f16 x is exactly
 * hi + lo with hi = bf16(x), lo = bf16(x - hi) (11 significand bits fit in two bf16's 8, and
 * bf16's exponent range covers f16's subnormals). Q, K and V are split when loaded / packed (K
 * and V as a second set of tiles), P from its fp32 value the same way (16 of its 24 bits), and
 * Q K^T = Qh Kh + Qh Kl + Ql Kh + Ql Kl (exact products: the scores are as accurate as the FMA
 * kernel's, which the float32 lse and S_dmask need), P V = Ph Vh + Ph Vl + Pl Vh on tdpbf16ps with
 * fp32 accumulation: the dropped Pl Vl is ~2^-18 of each product, far below f16's output rounding
 * (2^-11).
 */
#include "fa_kernels.h"
#include "fa_amx.h"
#include "fa_fwd_bf16_rows.h"

#define QB FA_FWD_F32_AVX512_ROWS /* queries per item: QB / BR sub-blocks */
#define BN FA_ROWS_BN
#define NKC FA_ROWS_NKC
#define NQG (BR / 16) /* 16-query groups per sub-block */

#define PIECE(bytes) ((((size_t)(bytes)) + 63) / 64 * 64)
#define D32(d) (((d) + 31) / 32 * 32)
#define OLD(d) (D32(d) + 16) /* O / Ob row stride in floats (rows 512 B apart would share sets) */
#define SKP(sk) (((sk) + 31) / 32 * 32 + 32)

typedef struct {
    uint16_t *Q;       /* QB / 16 groups x nd A tiles */
    uint16_t *Ql;      /* the same for the lo half of f16 inputs */
    float *O;          /* QB x OLD: unnormalized output rows */
    float *Ob;         /* BR x OLD: P V of the current block and sub-block */
    float *m, *l;      /* per item row */
    int64_t *lo, *hi;  /* visible keys per item row */
    fa_rows rows;      /* block state; m, l point into the item's arrays per sub-block */
} work;

static size_t own_scratch(int64_t d)
{
    const int64_t d32 = D32(d);
    return 2 * PIECE(QB * d32 * 2) + PIECE(QB * OLD(d) * 4) + PIECE(BR * OLD(d) * 4) +
           PIECE(BR * FA_ROWS_SLD * 4) + 2 * PIECE(NQG * NKC * 1024) + 2 * PIECE(QB * 4) +
           2 * PIECE(QB * 8) + 5 * PIECE(BR * 4) + 2 * PIECE(BR * 4);
}

static work carve(void *buf, int64_t d)
{
    const int64_t d32 = D32(d);
    char *p = (char *)buf;
    work w;
    w.Q = (uint16_t *)p, p += PIECE(QB * d32 * 2);
    w.Ql = (uint16_t *)p, p += PIECE(QB * d32 * 2);
    w.O = (float *)p, p += PIECE(QB * OLD(d) * 4);
    w.Ob = (float *)p, p += PIECE(BR * OLD(d) * 4);
    w.rows.S = (float *)p, p += PIECE(BR * FA_ROWS_SLD * 4);
    w.rows.P = (uint16_t *)p, p += PIECE(NQG * NKC * 1024);
    w.rows.Pl = (uint16_t *)p, p += PIECE(NQG * NKC * 1024);
    w.m = (float *)p, p += PIECE(QB * 4);
    w.l = (float *)p, p += PIECE(QB * 4);
    w.lo = (int64_t *)p, p += PIECE(QB * 8);
    w.hi = (int64_t *)p, p += PIECE(QB * 8);
    w.rows.alpha = (float *)p, p += PIECE(BR * 4);
    w.rows.mu = (float *)p, p += PIECE(BR * 4);
    w.rows.rmax = (float *)p, p += PIECE(BR * 4);
    w.rows.rsum = (float *)p, p += PIECE(BR * 4);
    w.rows.c0 = (int32_t *)p, p += PIECE(BR * 4);
    w.rows.c1 = (int32_t *)p;
    w.rows.m = w.m, w.rows.l = w.l;
    return w;
}

/* Also enough for the AVX-512 fallback, which runs in the same buffer. */
size_t fa_fwd_bf16__amx_scratch(const fa_fwd_params *p)
{
    size_t a = own_scratch(p->d), b = fa_fwd_f32__avx512_scratch(p);
    return a > b ? a : b;
}

/* ---- packing ----------------------------------------------------------------------------------- */

/* f16 inputs: split into hi and lo tile sets, twice the bytes. */
size_t fa_fwd_bf16__amx_pack_bytes(const fa_fwd_params *p, int64_t sk)
{
    return (size_t)(2 * SKP(sk) * D32(p->d)) * 2 * (p->dtype == FA_F16 ? 2 : 1);
}

/* 16 f16 values (bits) to bf16 hi and lo with hi + lo = x exactly (see the header comment); lo
 * = 0 for inf and NaN, so those pass through hi alone. */
static inline void split_f16(__m256i x, __m256i *hi, __m256i *lo)
{
    const __m512 f = _mm512_cvtph_ps(x);
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(f);
    const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(f), _mm512_set1_ps(INFINITY), _CMP_LT_OQ);
    *hi = h;
    *lo = (__m256i)_mm512_cvtneps_pbh(_mm512_maskz_sub_ps(finite, f, bf16_to_ps(h)));
}

/* K tile (key group g, dim chunk c) at (g * nd + c) * 512, element (key n, dim t) at
 *   (t % 32 / 2) * 32 + n * 2 + t % 2;
 * V tile (key chunk t, dim group e) at (t * nd16 + e) * 512, element (key j, dim n) at
 *   (j % 32 / 2) * 32 + (n % 16) * 2 + j % 2;
 * with nd = d32 / 32, nd16 = d32 / 16. Keys and dims past the end are zero. */
void fa_fwd_bf16__amx_pack(const fa_fwd_params *p, int64_t bi, int64_t hk, void *dst)
{
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t d = p->d, d32 = D32(d), skp = SKP(s.sk), nd = d32 / 32, nd16 = d32 / 16;
    const int split = p->dtype == FA_F16;
    /* bf16: K, V; f16: K hi, K lo, V hi, V lo */
    uint16_t *Kb = (uint16_t *)dst, *Kl = Kb + skp * d32, *Vb = Kb + (split ? 2 : 1) * skp * d32,
             *Vl = Vb + skp * d32;
    /* two key pairs' halves interleaved: (a0, b0, a1, b1, ...) from a in the low, b in the high half */
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    uint16_t rows[16 * 128] __attribute__((aligned(64))); /* 16 keys x one 128-dim slice of K */
    uint16_t rowl[16 * 128] __attribute__((aligned(64))); /* f16: the lo halves of rows */
    /* Zero only what the loops below leave unwritten (keys past the last 16-key K group, the
     * last partial 32-key V chunk and the padding chunks after it): a memset of the whole copy
     * doubled the pack's stores. */
    const int64_t kfull = (s.sk + 15) / 16 * 16, v0 = s.sk / 32;
    for (int part = 0; part < (split ? 2 : 1); part++) {
        uint16_t *K = part ? Kl : Kb, *V = part ? Vl : Vb;
        memset(K + (kfull / 16) * nd * 512, 0, (size_t)((skp - kfull) / 16 * nd * 512) * 2);
        memset(V + v0 * nd16 * 512, 0, (size_t)((skp / 32 - v0) * nd16 * 512) * 2);
    }
    /* K: 16 keys at a time; within a 32-dim chunk a tile is the 16 x 16 transpose of the keys'
     * 32-bit dim pairs. */
    for (int64_t j0 = 0; j0 < s.sk; j0 += 16) {
        const int64_t nk = s.sk - j0 < 16 ? s.sk - j0 : 16;
        for (int64_t c0 = 0; c0 < d32; c0 += 128) {
            const int64_t w = d32 - c0 < 128 ? d32 - c0 : 128, nv = d - c0 < w ? d - c0 : w;
            memset(rows, 0, sizeof rows);
            for (int64_t n = 0; n < nk; n++) {
                const uint16_t *kr = (const uint16_t *)fa_key_ptr(p, &p->k, &s, j0 + n, hk, 2);
                memcpy(rows + n * 128, kr + c0, (size_t)nv * 2);
            }
            if (split)
                for (int64_t i = 0; i < 16 * 128; i += 16) {
                    __m256i hi, lo;
                    split_f16(_mm256_load_si256((const __m256i *)(rows + i)), &hi, &lo);
                    _mm256_store_si256((__m256i *)(rows + i), hi);
                    _mm256_store_si256((__m256i *)(rowl + i), lo);
                }
            for (int64_t c = 0; c < w; c += 32) {
                const int64_t at = ((j0 / 16) * nd + (c0 + c) / 32) * 512;
                transpose16((const float *)(rows + c), 64, (float *)(Kb + at), 16);
                if (split)
                    transpose16((const float *)(rowl + c), 64, (float *)(Kl + at), 16);
            }
        }
    }
    /* V: key pairs (j, j + 1) interleaved 16 dims at a time into one 64-byte tile row. */
    for (int64_t j = 0; j < s.sk; j += 2) {
        const uint16_t *va = (const uint16_t *)fa_key_ptr(p, &p->v, &s, j, hk, 2);
        const uint16_t *vb = j + 1 < s.sk ? (const uint16_t *)fa_key_ptr(p, &p->v, &s, j + 1, hk, 2) : NULL;
        const int64_t at = (j / 32) * nd16 * 512 + (j % 32 / 2) * 32;
        for (int64_t e = 0; e < nd16; e++) {
            const int64_t n = d - e * 16;
            const __mmask16 t = tail16(n);
            __m256i a = _mm256_maskz_loadu_epi16(t, va + e * 16);
            __m256i b = vb ? _mm256_maskz_loadu_epi16(t, vb + e * 16) : _mm256_setzero_si256();
            if (split) {
                __m256i al, bl;
                split_f16(a, &a, &al);
                split_f16(b, &b, &bl);
                const __m512i abl = _mm512_inserti64x4(_mm512_castsi256_si512(al), bl, 1);
                _mm512_storeu_si512(Vl + at + e * 512, _mm512_permutexvar_epi16(inter, abl));
            }
            const __m512i ab = _mm512_inserti64x4(_mm512_castsi256_si512(a), b, 1);
            _mm512_storeu_si512(Vb + at + e * 512, _mm512_permutexvar_epi16(inter, ab));
        }
    }
}

/* ---- AMX ------------------------------------------------------------------------------------- */

/* C tiles 0-3 (fa_amx.h's 2x2 step) to the 32 x 32 fp32 block at c, row stride ld floats. */
static inline __attribute__((always_inline)) void store2x2(float *c, int64_t ld)
{
    _tile_stored(0, c, ld * 4);
    _tile_stored(1, c + 16, ld * 4);
    _tile_stored(2, c + 16 * ld, ld * 4);
    _tile_stored(3, c + 16 * ld + 16, ld * 4);
}

/* S[0 .. 16 ngroups)[0 .. round32(nc)) = Q K^T for keys kb0.. of sub-block Qs. Tiles: C 0-3,
 * A (Q) 4-5, B (K) 6-7. Key tile pair outer, query pair inner: the K pair is read from L2 once
 * and again from L1 for the second query pair; Q stays in L1. */
static void amx_qk(const uint16_t *Kb, const uint16_t *Qs, int64_t nd, int64_t kb0, int64_t nc,
                   int64_t ngroups, float *S)
{
    const int64_t kgroups = (nc + 15) / 16;
    for (int64_t kg = 0; kg < kgroups; kg += 2) {
        const uint16_t *k0 = Kb + (kb0 / 16 + kg) * nd * 512, *k1 = k0 + nd * 512;
        for (int64_t qg = 0; qg < ngroups; qg += 2) {
            const uint16_t *q0 = Qs + qg * nd * 512, *q1 = q0 + nd * 512;
            fa_amx_zero2x2();
            for (int64_t dc = 0; dc < nd; dc++) {
                _tile_loadd(4, q0 + dc * 512, 64);
                _tile_loadd(5, q1 + dc * 512, 64);
                _tile_loadd(6, k0 + dc * 512, 64);
                _tile_loadd(7, k1 + dc * 512, 64);
                fa_amx_dp2x2();
            }
            float *c = S + qg * 16 * FA_ROWS_SLD + kg * 16;
            store2x2(c, FA_ROWS_SLD);
        }
    }
}

/* amx_qk for f16 inputs split into hi and lo: S = Qh Kh + Qh Kl + Ql Kh + Ql Kl, the four
 * products of each dim chunk into the same C tiles (twelve tile loads per sixteen products, from
 * L1/L2 as in amx_qk). All four: every q k product is then exact in fp32 as in the FMA kernel;
 * without Ql Kl a score is off by up to ~2^-18 |q||k|, which the float32 S_dmask and lse checks
 * see (d = 1, window: 2.2e-5 against S_dmask's 1e-5). */
static void amx_qk3(const uint16_t *Kb, const uint16_t *Kl, const uint16_t *Qs, const uint16_t *Qsl,
                    int64_t nd, int64_t kb0, int64_t nc, int64_t ngroups, float *S)
{
    const int64_t kgroups = (nc + 15) / 16;
    for (int64_t kg = 0; kg < kgroups; kg += 2) {
        const int64_t ko = (kb0 / 16 + kg) * nd * 512;
        const uint16_t *k0 = Kb + ko, *k1 = k0 + nd * 512, *l0 = Kl + ko, *l1 = l0 + nd * 512;
        for (int64_t qg = 0; qg < ngroups; qg += 2) {
            const uint16_t *q0 = Qs + qg * nd * 512, *q1 = q0 + nd * 512;
            const uint16_t *r0 = Qsl + qg * nd * 512, *r1 = r0 + nd * 512;
            fa_amx_zero2x2();
            for (int64_t dc = 0; dc < nd; dc++) {
                _tile_loadd(4, q0 + dc * 512, 64);
                _tile_loadd(5, q1 + dc * 512, 64);
                _tile_loadd(6, l0 + dc * 512, 64);
                _tile_loadd(7, l1 + dc * 512, 64);
                fa_amx_dp2x2(); /* Qh Kl */
                _tile_loadd(6, k0 + dc * 512, 64);
                _tile_loadd(7, k1 + dc * 512, 64);
                fa_amx_dp2x2(); /* Qh Kh */
                _tile_loadd(4, r0 + dc * 512, 64);
                _tile_loadd(5, r1 + dc * 512, 64);
                fa_amx_dp2x2(); /* Ql Kh */
                _tile_loadd(6, l0 + dc * 512, 64);
                _tile_loadd(7, l1 + dc * 512, 64);
                fa_amx_dp2x2(); /* Ql Kl */
            }
            float *c = S + qg * 16 * FA_ROWS_SLD + kg * 16;
            store2x2(c, FA_ROWS_SLD);
        }
    }
}

/* Ob[0 .. 16 ngroups)[0 .. d32) = P V for keys kb0 .. kb0 + nc (P zero past nc). Tiles: C 0-3,
 * A (P) 4-5, B (V) 6-7. Query pair outer, dim pair inner: the P rows of a query pair (8 KiB)
 * are reused from L1 by every dim pair. */
static void amx_pv(const uint16_t *Vb, int64_t d32, int64_t kb0, int64_t nc, int64_t ngroups,
                   const uint16_t *P, float *Ob, int64_t ldo)
{
    const int64_t nkc = (nc + 31) / 32, nd16 = d32 / 16;
    const uint16_t *vblk = Vb + (kb0 / 32) * nd16 * 512;
    for (int64_t qg = 0; qg < ngroups; qg += 2) {
        const uint16_t *p0 = P + qg * NKC * 512, *p1 = p0 + NKC * 512;
        for (int64_t dg = 0; dg < nd16; dg += 2) {
            const uint16_t *v0 = vblk + dg * 512, *v1 = v0 + 512;
            fa_amx_zero2x2();
            for (int64_t kc = 0; kc < nkc; kc++) {
                _tile_loadd(4, p0 + kc * 512, 64);
                _tile_loadd(5, p1 + kc * 512, 64);
                _tile_loadd(6, v0 + kc * nd16 * 512, 64);
                _tile_loadd(7, v1 + kc * nd16 * 512, 64);
                fa_amx_dp2x2();
            }
            float *c = Ob + qg * 16 * ldo + dg * 16;
            store2x2(c, ldo);
        }
    }
}

/* amx_pv for f16 inputs: Ob = Ph Vh + Ph Vl + Pl Vh (P's hi tiles at P, lo at Pl). */
static void amx_pv3(const uint16_t *Vb, const uint16_t *Vl, int64_t d32, int64_t kb0, int64_t nc,
                    int64_t ngroups, const uint16_t *P, const uint16_t *Pl, float *Ob, int64_t ldo)
{
    const int64_t nkc = (nc + 31) / 32, nd16 = d32 / 16;
    const int64_t vo = (kb0 / 32) * nd16 * 512;
    for (int64_t qg = 0; qg < ngroups; qg += 2) {
        const uint16_t *p0 = P + qg * NKC * 512, *p1 = p0 + NKC * 512;
        const uint16_t *r0 = Pl + qg * NKC * 512, *r1 = r0 + NKC * 512;
        for (int64_t dg = 0; dg < nd16; dg += 2) {
            const uint16_t *v0 = Vb + vo + dg * 512, *v1 = v0 + 512;
            const uint16_t *u0 = Vl + vo + dg * 512, *u1 = u0 + 512;
            fa_amx_zero2x2();
            for (int64_t kc = 0; kc < nkc; kc++) {
                _tile_loadd(4, p0 + kc * 512, 64);
                _tile_loadd(5, p1 + kc * 512, 64);
                _tile_loadd(6, u0 + kc * nd16 * 512, 64);
                _tile_loadd(7, u1 + kc * nd16 * 512, 64);
                fa_amx_dp2x2(); /* Ph Vl */
                _tile_loadd(6, v0 + kc * nd16 * 512, 64);
                _tile_loadd(7, v1 + kc * nd16 * 512, 64);
                fa_amx_dp2x2(); /* Ph Vh */
                _tile_loadd(4, r0 + kc * 512, 64);
                _tile_loadd(5, r1 + kc * 512, 64);
                fa_amx_dp2x2(); /* Pl Vh */
            }
            float *c = Ob + qg * 16 * ldo + dg * 16;
            store2x2(c, ldo);
        }
    }
}

/* O = alpha O + Ob for rows [0, nr); rows whose max stayed put (alpha = 1) skip the multiply. */
static void rescale_add(float *O, const float *Ob, const float *alpha, int64_t nr, int64_t d32,
                        int64_t ldo)
{
    for (int64_t r = 0; r < nr; r++) {
        float *o = O + r * ldo;
        const float *b = Ob + r * ldo;
        if (alpha[r] == 1.0f) {
            for (int64_t c = 0; c < d32; c += 16)
                _mm512_storeu_ps(o + c, _mm512_add_ps(_mm512_loadu_ps(o + c), _mm512_loadu_ps(b + c)));
        } else {
            const __m512 a = _mm512_set1_ps(alpha[r]);
            for (int64_t c = 0; c < d32; c += 16)
                _mm512_storeu_ps(o + c, _mm512_fmadd_ps(_mm512_loadu_ps(o + c), a, _mm512_loadu_ps(b + c)));
        }
    }
}

/* ---- the work item ---------------------------------------------------------------------------- */

fa_status fa_fwd_bf16__amx_item(const fa_fwd_params *p, int64_t bi, int64_t h, int64_t q0,
                                const void *packed, void *buf)
{
    if (!packed || (p->dtype != FA_BF16 && p->dtype != FA_F16))
        return fa_fwd_f32__avx512_item(p, bi, h, q0, NULL, buf);
    const int64_t d = p->d, d32 = D32(d), nd = d32 / 32, ldo = OLD(d);
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t skp = SKP(s.sk);
    const int split = p->dtype == FA_F16;
    /* the pack's layout: K, V (bf16) or K hi, K lo, V hi, V lo (f16) */
    const uint16_t *Kb = (const uint16_t *)packed, *Kl = Kb + skp * d32,
                   *Vb = Kb + (split ? 2 : 1) * skp * d32, *Vl = Vb + skp * d32;
    const int64_t nrows = s.sq - q0 < QB ? s.sq - q0 : QB;
    const int64_t nsub = (nrows + BR - 1) / BR;
    work w = carve(buf, d);
    if (!split)
        w.rows.Pl = NULL;
    const int has_drop = p->dropout_p > 0;
    const uint64_t thr = fa_dropout_threshold(p->dropout_p);
    const int featured = p->pse || p->mask || p->softcap > 0 || p->alibi || !(p->scale > 0);

    /* Visible keys of every row, of every sub-block and of the whole item. */
    fa_lanes ln;
    memset(&ln, 0, sizeof ln);
    ln.m = w.m, ln.l = w.l, ln.lo = w.lo, ln.hi = w.hi;
    int64_t kmin, kmax, smin[QB / BR], smax[QB / BR];
    item_bands(p, &s, q0, nrows, &ln, smin, smax, &kmin, &kmax);

    /* Q rows in A tiles; padding queries and dims stay zero. */
    memset(w.Q, 0, (size_t)(nsub * BR * d32) * 2);
    if (split)
        memset(w.Ql, 0, (size_t)(nsub * BR * d32) * 2);
    for (int64_t r = 0; r < nrows; r++) {
        const uint16_t *src = (const uint16_t *)p->q.ptr +
                              (s.q_batch * p->q.sb + (s.q_row0 + q0 + r) * p->q.sr + h * p->q.sh);
        const int64_t at = (r / 16) * nd * 512 + (r % 16) * 32;
        if (split) { /* 16 dims at a time, hi and lo into the same places of Q and Ql */
            for (int64_t c = 0; c < d32; c += 16) {
                __m256i hi, lo;
                split_f16(_mm256_maskz_loadu_epi16(tail16(d - c), src + c), &hi, &lo);
                _mm256_storeu_si256((__m256i *)(w.Q + at + (c / 32) * 512 + c % 32), hi);
                _mm256_storeu_si256((__m256i *)(w.Ql + at + (c / 32) * 512 + c % 32), lo);
            }
            continue;
        }
        uint16_t *dst = w.Q + at;
        for (int64_t c = 0; c < nd; c++)
            memcpy(dst + c * 512, src + c * 32, (size_t)(d - c * 32 < 32 ? d - c * 32 : 32) * 2);
    }
    for (int64_t r = 0; r < nsub * BR; r++) {
        w.m[r] = -INFINITY;
        w.l[r] = 0;
        if (p->sink && r < nrows) {
            w.m[r] = p->sink[h];
            w.l[r] = 1;
        }
    }
    memset(w.O, 0, (size_t)(nsub * BR * ldo) * 4);
    fa_amx_configure();

    /* Blocks start on a multiple of 32 keys (the packed tiles' granularity); keys before kmin in
     * the first block are outside every row's band and get masked. */
    kmin &= ~(int64_t)31;
    for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BN) {
        const int64_t nc = kmax - kb0 < BN ? kmax - kb0 : BN;
        for (int64_t sb = 0; sb < nsub; sb++) {
            if (smin[sb] >= kb0 + nc || smax[sb] <= kb0)
                continue;
            const int64_t qs = q0 + sb * BR;
            const int64_t nr = nrows - sb * BR < BR ? nrows - sb * BR : BR;
            const int64_t ngroups = ((nr + 31) / 32) * 2; /* whole query tile pairs */
            fa_rows v = w.rows;
            v.m += sb * BR, v.l += sb * BR;
            fa_lanes band = ln;
            band.lo += sb * BR, band.hi += sb * BR, band.c0 = v.c0, band.c1 = v.c1;
            /* Keys of the block past this sub-block's last visible key (causal diagonal) are
             * masked for all its rows: leave them out instead. */
            const int64_t ncs = smax[sb] - kb0 < nc ? smax[sb] - kb0 : nc;
            /* a band edge inside the block is masked by the softmax itself; only the features
             * (and a scale that is not positive) need the scores rewritten first */
            block_band(&band, nr, kb0, ncs);
            const int plain = !featured;
            if (split)
                amx_qk3(Kb, Kl, w.Q + sb * NQG * nd * 512, w.Ql + sb * NQG * nd * 512, nd, kb0, ncs,
                        ngroups, v.S);
            else
                amx_qk(Kb, w.Q + sb * NQG * nd * 512, nd, kb0, ncs, ngroups, v.S);
            if (!plain)
                rows_scores(p, &s, h, qs, nr, kb0, ncs, &v);
            rows_softmax(&v, nr, ngroups, ncs, plain ? (float)p->scale : 1.0f);
            if (has_drop)
                rows_dropout(p, &s, h, qs, nr, kb0, &v, thr);
            if (split)
                amx_pv3(Vb, Vl, d32, kb0, ncs, ngroups, v.P, v.Pl, w.Ob, ldo);
            else
                amx_pv(Vb, d32, kb0, ncs, ngroups, v.P, w.Ob, ldo);
            rescale_add(w.O + sb * BR * ldo, w.Ob, v.alpha, nr, d32, ldo);
        }
    }

    const float drop_scale = has_drop ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    for (int64_t r = 0; r < nrows; r++)
        finish_row_rows(p, &s, h, q0 + r, &ln, r, w.O + r * ldo, drop_scale);

    if (p->s_dmask) {
        for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BN) {
            const int64_t nc = kmax - kb0 < BN ? kmax - kb0 : BN;
            for (int64_t sb = 0; sb < nsub; sb++) {
                if (smin[sb] >= kb0 + nc || smax[sb] <= kb0)
                    continue;
                const int64_t qs = q0 + sb * BR;
                const int64_t nr = nrows - sb * BR < BR ? nrows - sb * BR : BR;
                const int64_t ngroups = ((nr + 31) / 32) * 2;
                fa_rows v = w.rows;
                v.m += sb * BR, v.l += sb * BR;
                fa_lanes band = ln;
                band.lo += sb * BR, band.hi += sb * BR, band.c0 = v.c0, band.c1 = v.c1;
                block_band(&band, nr, kb0, nc);
                if (split)
                    amx_qk3(Kb, Kl, w.Q + sb * NQG * nd * 512, w.Ql + sb * NQG * nd * 512, nd, kb0,
                            nc, ngroups, v.S);
                else
                    amx_qk(Kb, w.Q + sb * NQG * nd * 512, nd, kb0, nc, ngroups, v.S);
                rows_scores(p, &s, h, qs, nr, kb0, nc, &v);
                rows_s_dmask(p, &s, h, qs, nr, kb0, nc, has_drop, thr, &v);
            }
        }
    }
    _tile_release();
    return FA_OK;
}
