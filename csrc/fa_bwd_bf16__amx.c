/* fa_bwd_bf16__amx.c: the FlashAttention-2 backward (fa_bwd_params.h, Dao 2023 Alg. 2) for
 * bfloat16 inputs on AMX: the five block GEMMs on tdpbf16ps tiles with float32 accumulation, the
 * per-element work (P, dS, masks, dropout replay, softcap, alibi) in AVX-512 float32 through the
 * shared bw_row (fa_bwd_rows.h). Same phases, items and dQ partial-sum scheme as the FMA kernels
 * (fa_bwd_impl.h), so results are bitwise identical for any thread count.
 *
 * Per (query block of AR rows, key block of AK keys), tiles 16 rows x 64 bytes, 2x2 C tiles per
 * step (4 C + 2 A + 2 B tile registers):
 *   S   [AR x AK]  = Q . K^T             A = Q rows (bf16, row-major), B = K in VNNI pairs over d
 *   dP  [AR x AK]  = dO . V^T            A = dO rows, B = V in VNNI pairs over d
 *   bw_row: S -> P z r, dP -> dX (fp32), then P and dX rounded to bf16 in VNNI pairs over query
 *        rows (the B layout: two rows interleaved, no transpose) and dX also row-major
 *   dV^T [d x AK] += dO^T . P            A = dO^T (d x 32-query tiles), B = P pairs
 *   dK^T [d x AK] += Q^T . dX            A = Q^T, B = dX pairs
 *   dQ  [AR x d]  += dX . K              A = dX rows (bf16), B = K in VNNI pairs over keys
 * Computing dV^T and dK^T (rather than dV, dK) puts P and dX in the B slot, where the VNNI pair
 * layout is two consecutive rows interleaved; dK/dV are transposed once per key block when stored.
 * Blocks are AR = 128 query rows by AK = 64 keys, and key blocks go in groups of KG (dkdv): every
 * fp32 C tile of dK^T/dV^T is loaded and stored once per AR/32 = 4 k steps, every dQ C tile once
 * per group (up to KG * AK/32 = 8 k steps), and a query block's operands (Q, dO, their transposes
 * and its dQ partial block, which stream from L3 or memory at long S) are fetched once per group.
 *
 * Workspace (own layout, fa_bwd_bf16__amx_ws_sizes; d32 = d rounded up to 32, padding zero):
 *   Q, dO  [h][qblocks] blocks of AR rows: rows [AR][d32], then transposed [AR/32][d32][32]
 *          (each 16-dim x 32-query A tile a contiguous 1 KiB)
 *   Kt, Vt [hk][blocks] K, V in VNNI pairs over d: [d32/2][AK][2]
 *   Kr     [hk][blocks] K in VNNI pairs over keys: [AK/2][d32][2]
 *   dQp    float [nch][h][qblocks][AR][d32]: dQ partial sums per chunk (as fa_bwd_impl.h)
 * The two bf16 layouts of Q (and of dO) take the bytes of the float32 kernels' one copy; K and V
 * take half of theirs (T1: 75 MB of workspace instead of 101 MB).
 * Numerics: Q.K and dO.V products are exact in fp32; P and dS enter their GEMMs rounded to bf16 (as
 * flash-attn does on GPUs); accumulation is fp32 (dK/dV in the item's scratch across the query
 * blocks, dQ in the partial sums across the chunk's key blocks); each gradient is rounded to bf16
 * once. The bf16 rounding of P, dS and of the result dominates the fp32 summation error.
 */
#include <immintrin.h>

#define FA_ACC float
#define FA_ACC_IS_DOUBLE 0
#define FA_VBYTES 64
#include "fa_amx.h"
#include "fa_bwd_rows.h"
#include "fa_exp2_bf16.h"

#define AR FA_BWD_AMX_ROWS
#define AK FA_BWD_AMX_KEYS
#define D32(d) (((d) + 31) / 32 * 32)
#define PIECE(bytes) ((((size_t)(bytes)) + 63) / 64 * 64)
#define INL static inline __attribute__((always_inline))

/* Key blocks per group (see dkdv): T3 bf16 backward 1 thread KG 1/2/4/8 = 1.00/1.24/1.37/1.36x
 * the speed of KG 1 (NOTES.md "bfloat16/float32 backward at long S"). */
#define KG 4

_Static_assert(AR % 32 == 0 && AK % 32 == 0, "blocks are whole 2x2 tile steps");

/* ---- workspace ---------------------------------------------------------------------------------- */

void fa_bwd_bf16__amx_ws_sizes(const fa_bwd_params *p, const fa_bwd_ws *ws, size_t bytes[6])
{
    const size_t d32 = (size_t)D32(p->f.d);
    const size_t qb = (size_t)(p->f.h * ws->qblocks), kb = (size_t)(p->f.hk * ws->blocks);
    bytes[0] = bytes[1] = qb * 2 * AR * d32 * 2;
    bytes[2] = bytes[3] = bytes[4] = kb * AK * d32 * 2;
    bytes[5] = (size_t)ws->nch * qb * AR * d32 * 4;
}

/* Query block q0 / AR of sequence bi, head h, in the Q or dO array: rows, then the transpose. */
INL uint16_t *qblock(const fa_bwd_params *p, const fa_bwd_ws *ws, void *base, int64_t bi, int64_t h,
                     int64_t q0)
{
    const int64_t d32 = D32(p->f.d);
    return (uint16_t *)base + (h * ws->qblocks + ws->qblk[bi] + q0 / AR) * 2 * AR * d32;
}

/* Key block k0 / AK of sequence bi, kv head hk, in the Kt, Vt or Kr array. */
INL uint16_t *kblock(const fa_bwd_params *p, const fa_bwd_ws *ws, void *base, int64_t bi, int64_t hk,
                     int64_t k0)
{
    return (uint16_t *)base + (hk * ws->blocks + ws->kblk[bi] + k0 / AK) * AK * D32(p->f.d);
}

/* dQ partial sums of chunk c for query block q0 / AR of (bi, h). */
INL float *dq_block(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t c, int64_t bi, int64_t h,
                    int64_t q0)
{
    return (float *)ws->dQp +
           ((c * p->f.h + h) * ws->qblocks + ws->qblk[bi] + q0 / AR) * AR * D32(p->f.d);
}

/* ---- scratch ------------------------------------------------------------------------------------ */

typedef struct {
    float *dKT, *dVT;         /* KG x d32 x AK: dK^T, dV^T of the group's key blocks */
    float *S, *dP;            /* AR x AK: scores -> P z r; dO V^T -> dX */
    uint16_t *Pv, *dSv, *dSr; /* bf16: P and dX in query pairs [AR/2][AK][2]; KG x dX rows [AR][AK] */
    float *G, *Z, *stat;      /* AK, AK, 3 x AR (m, il, D) */
    int64_t *lo, *hi;         /* AR: each row's band */
} scratch;

size_t fa_bwd_bf16__amx_scratch(const fa_bwd_params *p)
{
    const int64_t d32 = D32(p->f.d);
    return 2 * PIECE(KG * d32 * AK * 4) + 2 * PIECE(AR * AK * 4) + 2 * PIECE(AR * AK * 2) + PIECE(KG * AR * AK * 2) +
           2 * PIECE(AK * 4) + PIECE(3 * AR * 4) + 2 * PIECE(AR * 8);
}

static scratch carve(void *buf, int64_t d)
{
    const int64_t d32 = D32(d);
    char *q = (char *)buf;
    scratch w;
    w.dKT = (float *)q, q += PIECE(KG * d32 * AK * 4);
    w.dVT = (float *)q, q += PIECE(KG * d32 * AK * 4);
    w.S = (float *)q, q += PIECE(AR * AK * 4);
    w.dP = (float *)q, q += PIECE(AR * AK * 4);
    w.Pv = (uint16_t *)q, q += PIECE(AR * AK * 2);
    w.dSv = (uint16_t *)q, q += PIECE(AR * AK * 2);
    w.dSr = (uint16_t *)q, q += PIECE(KG * AR * AK * 2);
    w.G = (float *)q, q += PIECE(AK * 4);
    w.Z = (float *)q, q += PIECE(AK * 4);
    w.stat = (float *)q, q += PIECE(3 * AR * 4);
    w.lo = (int64_t *)q, q += PIECE(AR * 8);
    w.hi = (int64_t *)q;
    return w;
}

/* ---- packing ------------------------------------------------------------------------------------ */

/* Rows [q0, q0 + AR) of (bi, h): statistics (bw_row_stats), and Q, dO as bf16 rows and transposed
 * tiles; rows past the sequence's end are zero. */
void fa_bwd_bf16__amx_prep(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi, int64_t h,
                           int64_t q0, int64_t n)
{
    const fa_fwd_params *f = &p->f;
    const fa_seq s = fa_seq_of(f, bi);
    const int64_t d = f->d, d32 = D32(d), nr = s.sq - q0 < AR ? s.sq - q0 : AR;
    uint16_t *Q = qblock(p, ws, ws->Q, bi, h, q0), *dO = qblock(p, ws, ws->dO, bi, h, q0);
    enum { PF = 6 }; /* rows of prefetch distance */
    float dor[512];
    for (int64_t r = 0; r < AR; r++) {
        const int64_t pr = s.q_row0 + q0 + (r < nr ? r : 0);
        const uint16_t *qs = (const uint16_t *)f->q.ptr + s.q_batch * f->q.sb + pr * f->q.sr + h * f->q.sh;
        const uint16_t *ds = (const uint16_t *)p->dout.ptr + s.q_batch * p->dout.sb +
                             pr * p->dout.sr + h * p->dout.sh;
        /* rows past the end: zero (they point at row 0, never read: the loads are masked off) */
        const int64_t nd = r < nr ? d : 0;
        /* Rows of one head are h d elements apart in the usual (b, s, h, d) layouts, a stride the
         * hardware prefetchers do not follow across pages: fetch the Q, dO and O rows PF ahead. */
        if (r + PF < nr) {
            const int64_t pa = pr + PF, es = fa_dtype_size(f->dtype);
            const char *nq = (const char *)(qs + PF * f->q.sr), *nd_ = (const char *)(ds + PF * p->dout.sr);
            const char *no = (const char *)p->out.ptr +
                             (s.q_batch * p->out.sb + pa * p->out.sr + h * p->out.sh) * es;
            for (int64_t b = 0; b < d * 2; b += 64) {
                _mm_prefetch(nq + b, _MM_HINT_T0);
                _mm_prefetch(nd_ + b, _MM_HINT_T0);
                _mm_prefetch(no + b, _MM_HINT_T0);
            }
        }
        for (int64_t k = 0; k < d32; k += 32) {
            _mm512_store_si512(Q + r * d32 + k, fa_amx_load32(qs + k, nd - k));
            _mm512_store_si512(dO + r * d32 + k, fa_amx_load32(ds + k, nd - k));
        }
        if (r < nr) {
            bw_load(FA_BF16, ds, d, dor);
            bw_row_stats(p, ws, &s, h, q0 + r, dor);
        }
    }
    /* The transposes [AR/32][d32][32] from the rows: element (r, k) at (r/32) d32 32 + k 32 + r%32.
     * Rows r, r + 1 interleaved are 32-bit units (query pair, dim); a 16 x 16 transpose of those
     * gives 16 dims' rows of 32 queries. */
    for (int u = 0; u < 2; u++) {
        uint16_t *X = u ? dO : Q, *T = X + AR * d32;
        for (int64_t g = 0; g < AR / 32; g++)
            for (int64_t k = 0; k < d32; k += 32) {
                __m512i lo[16], hi[16];
                for (int64_t i = 0; i < 16; i++)
                    fa_amx_pairs(_mm512_load_si512(X + (32 * g + 2 * i) * d32 + k),
                                 _mm512_load_si512(X + (32 * g + 2 * i + 1) * d32 + k), &lo[i], &hi[i]);
                uint16_t *t = T + g * d32 * 32 + k * 32;
                fa_amx_tr16(lo, t, 64);
                fa_amx_tr16(hi, t + 16 * 32, 64);
            }
    }
}

/* Keys [k0, k0 + AK) of (bi, hk): K and V in VNNI pairs over d, K in VNNI pairs over keys. */
void fa_bwd_bf16__amx_packk(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi, int64_t hk,
                            int64_t k0)
{
    const fa_fwd_params *f = &p->f;
    const fa_seq s = fa_seq_of(f, bi);
    const int64_t d = f->d, d32 = D32(d), nc = s.sk - k0 < AK ? s.sk - k0 : AK;
    uint16_t *Kd = kblock(p, ws, ws->Kt, bi, hk, k0), *Vd = kblock(p, ws, ws->Vt, bi, hk, k0);
    uint16_t *Kk = kblock(p, ws, ws->Kr, bi, hk, k0);
    const uint16_t *kr[AK], *vr[AK];
    for (int64_t c = 0; c < AK; c++) { /* keys past nc: never read (their loads are masked off) */
        const int64_t cc = c < nc ? c : 0;
        kr[c] = (const uint16_t *)fa_key_ptr(f, &f->k, &s, k0 + cc, hk, 2);
        vr[c] = (const uint16_t *)fa_key_ptr(f, &f->v, &s, k0 + cc, hk, 2);
    }
    for (int64_t k = 0; k < d32; k += 32) {
        /* Kd, Vd: element (dim k, key c) at ((k/2) AK + c) 2 + k%2, i.e. the transpose of the key
         * rows' 32-bit dim pairs, 16 keys x 16 dim pairs at a time. */
        for (int u = 0; u < 2; u++) {
            const uint16_t *const *src = u ? vr : kr;
            uint16_t *dst = u ? Vd : Kd;
            for (int64_t c = 0; c < AK; c += 16) {
                __m512i r[16];
                for (int64_t i = 0; i < 16; i++)
                    r[i] = fa_amx_load32(src[c + i] + k, c + i < nc ? d - k : 0);
                fa_amx_tr16(r, dst + ((k / 2) * AK + c) * 2, AK * 4);
            }
        }
        /* Kk: element (key c, dim k) at ((c/2) d32 + k) 2 + c%2: key rows c, c + 1 interleaved. */
        for (int64_t c = 0; c < AK; c += 2) {
            __m512i lo, hi;
            fa_amx_pairs(fa_amx_load32(kr[c] + k, c < nc ? d - k : 0),
                         fa_amx_load32(kr[c + 1] + k, c + 1 < nc ? d - k : 0), &lo, &hi);
            _mm512_store_si512(Kk + ((c / 2) * d32 + k) * 2, lo);
            _mm512_store_si512(Kk + ((c / 2) * d32 + k + 16) * 2, hi);
        }
    }
}

/* ---- tiles -------------------------------------------------------------------------------------- */

/* C (+)= sum over nb products A[j] . B[j] over mt x nt C tiles (both even), each product ks k steps
 * of 32 bf16 products: A tile (m, k) of product j at A[j] + m*am + k*ak (stride ald bytes), B tile
 * (k, n) at B[j] + k*bk + n*bn (stride bld), C tile (m, n) at C + m*cm + n*cn (stride cld). 2x2 C
 * tiles per step: tiles 0-3 C, 4-5 A, 6-7 B. With acc the C tiles start from C, else from zero.
 * The products enter each C tile in order j, then k: the same sums, in the same order, as nb calls
 * with one product each, with the C tiles loaded and stored once instead of nb times. */
INL void tile_gemm_n(int acc, int64_t mt, int64_t nt, int64_t ks, int64_t nb,
                     const uint16_t *const *A, int64_t am, int64_t ak, int64_t ald,
                     const uint16_t *const *B, int64_t bk, int64_t bn, int64_t bld, float *C,
                     int64_t cm, int64_t cn, int64_t cld)
{
    for (int64_t m = 0; m < mt; m += 2)
        for (int64_t n = 0; n < nt; n += 2) {
            float *c = C + m * cm + n * cn;
            if (acc) {
                _tile_loadd(0, c, cld);
                _tile_loadd(1, c + cn, cld);
                _tile_loadd(2, c + cm, cld);
                _tile_loadd(3, c + cm + cn, cld);
            } else {
                fa_amx_zero2x2();
            }
            for (int64_t j = 0; j < nb; j++)
                for (int64_t k = 0; k < ks; k++) {
                    _tile_loadd(4, A[j] + m * am + k * ak, ald);
                    _tile_loadd(5, A[j] + (m + 1) * am + k * ak, ald);
                    _tile_loadd(6, B[j] + k * bk + n * bn, bld);
                    _tile_loadd(7, B[j] + k * bk + (n + 1) * bn, bld);
                    fa_amx_dp2x2();
                }
            _tile_stored(0, c, cld);
            _tile_stored(1, c + cn, cld);
            _tile_stored(2, c + cm, cld);
            _tile_stored(3, c + cm + cn, cld);
        }
}

/* C (+)= A . B: one product. */
INL void tile_gemm(int acc, int64_t mt, int64_t nt, int64_t ks, const uint16_t *A, int64_t am,
                   int64_t ak, int64_t ald, const uint16_t *B, int64_t bk, int64_t bn, int64_t bld,
                   float *C, int64_t cm, int64_t cn, int64_t cld)
{
    tile_gemm_n(acc, mt, nt, ks, 1, &A, am, ak, ald, &B, bk, bn, bld, C, cm, cn, cld);
}

/* fp32 rows [AR][AK] -> bf16 B tiles in query pairs [AR/2][AK][2]: rows 2i and 2i + 1
 * interleaved element by element. */
static void pack_pairs(const float *X, uint16_t *dst)
{
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    for (int64_t i = 0; i < AR / 2; i++)
        for (int64_t c = 0; c < AK; c += 16) {
            __m512 a = _mm512_load_ps(X + 2 * i * AK + c), b = _mm512_load_ps(X + (2 * i + 1) * AK + c);
            __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a in the low half */
            _mm512_store_si512(dst + (i * AK + c) * 2, _mm512_permutexvar_epi16(inter, ab));
        }
}

static void pack_rows(const float *X, uint16_t *dst)
{
    for (int64_t x = 0; x < AR * AK; x += 16)
        _mm256_store_si256((__m256i *)(dst + x), (__m256i)_mm512_cvtneps_pbh(_mm512_load_ps(X + x)));
}

/* How a row meets the key block: no visible key (or il = 0), a band edge inside, or every key. */
enum { ROW_DEAD, ROW_EDGE, ROW_FULL };

/* One row of bw_row's plain case (no pse, softcap, alibi, mask, dropout): P and dX of the 16
 * keys at column c, from the row's scores S and dO.V products dP, as bw_row forms them except for
 * the exponential: P = 2^((x - m) log2 e) il with exp2_p5 (fa_exp2_bf16.h, 1.7e-7 relative, and
 * the rounding of the product by log2 e, 2^-24 |t|: ~2e-6 of P at t = -20, P ~ 1e-6, below P's
 * bf16 rounding in its products and dX's in its own) instead of vexp_nonpos, 8 vector uops
 * fewer per 16 keys. x = -inf outside the band gives P = 0 and, with G = 0 there, dX = 0; a row
 * bw_row zeroes (no visible key, or il = 0) is passed as dead, and a row that sees every key of
 * the block skips the band masks (the same values: every lane is inside). */
INL void plain16(const float *S, const float *dP, int64_t c, int kind, vec_t c0, vec_t c1, vec_t vm,
                 vec_t vil, vec_t vD, acc_t scale, vec_t *P, vec_t *dX)
{
    if (kind == ROW_DEAD) {
        *P = *dX = vsplat(0);
        return;
    }
    vec_t x = vload(S + c) * scale, g = vsplat(scale);
    if (kind == ROW_EDGE) { /* a band edge inside the block */
        const vec_t col = viota() + (acc_t)c;
        const veci_t in = (col >= c0) & (col < c1);
        x = vsel(in, x, vsplat(-INFINITY));
        g = vsel(in, g, vsplat(0));
    }
    *P = (vec_t)exp2_p5((__m512)((x - vm) * (acc_t)1.4426950408889634)) * vil;
    *dX = *P * (vload(dP + c) - vD) * g;
}

/* bw_row's plain case for every row of the step, fused with the bf16 packing (pack_pairs of P
 * and dX, pack_rows of dX): each row pair's P and dX go from registers straight to their B-tile
 * pairs and dX rows, instead of through the fp32 rows and three more passes over them. Rows past
 * nr are zero, as bw_row's callers leave them. */
static void rows_plain(const fa_bwd_params *p, int64_t k0, int64_t nc, int64_t nr, const scratch *w,
                       uint16_t *dSr, bw_pf *pf)
{
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    const acc_t scale = (acc_t)p->f.scale;
    for (int64_t i = 0; i < AR / 2; i++) {
        int kind[2];
        vec_t c0[2], c1[2], vm[2], vil[2], vD[2];
        for (int u = 0; u < 2; u++) {
            const int64_t r = 2 * i + u;
            const int64_t a = r < nr ? (w->lo[r] > k0 ? w->lo[r] : k0) - k0 : 0;
            const int64_t b = r < nr ? (w->hi[r] < k0 + nc ? w->hi[r] : k0 + nc) - k0 : 0;
            kind[u] = a >= b || w->stat[AR + r] == 0 ? ROW_DEAD : a == 0 && b == AK ? ROW_FULL : ROW_EDGE;
            c0[u] = vsplat((acc_t)a), c1[u] = vsplat((acc_t)b);
            vm[u] = vsplat(w->stat[r]), vil[u] = vsplat(w->stat[AR + r]), vD[u] = vsplat(w->stat[2 * AR + r]);
        }
        const float *S0 = w->S + 2 * i * AK, *dP0 = w->dP + 2 * i * AK;
        for (int64_t c = 0; c < AK; c += 16) {
            vec_t P[2], dX[2];
            for (int u = 0; u < 2; u++)
                plain16(S0 + u * AK, dP0 + u * AK, c, kind[u], c0[u], c1[u], vm[u], vil[u], vD[u],
                        scale, &P[u], &dX[u]);
            const __m512i pp = (__m512i)_mm512_cvtne2ps_pbh((__m512)P[1], (__m512)P[0]);
            const __m512i xx = (__m512i)_mm512_cvtne2ps_pbh((__m512)dX[1], (__m512)dX[0]);
            _mm512_store_si512(w->Pv + (i * AK + c) * 2, _mm512_permutexvar_epi16(inter, pp));
            _mm512_store_si512(w->dSv + (i * AK + c) * 2, _mm512_permutexvar_epi16(inter, xx));
            _mm256_store_si256((__m256i *)(dSr + 2 * i * AK + c), _mm512_castsi512_si256(xx));
            _mm256_store_si256((__m256i *)(dSr + (2 * i + 1) * AK + c), _mm512_extracti64x4_epi64(xx, 1));
        }
        for (int64_t r = 2 * i; r < 2 * i + 2 && r < nr; r++)
            bw_pf_some(pf); /* one call per row, as bw_rows */
    }
}

/* ---- dK/dV (and dQ partials): one chunk of key blocks of one (batch, kv head) ------------------- */

/* The general case: bw_row on each row (every feature), then the bf16 packing of P and dX. */
static void bw_rows(const fa_bwd_params *p, const fa_seq *s, int64_t h, int64_t q0, int64_t nr,
                    int64_t k0, int64_t nc, scratch *w, uint16_t *dSr, uint64_t thr, bw_pf *pf)
{
    /* Rows past nr and keys past nc (zero padding) come out as P = 0, dX = 0. */
    for (int64_t r = 0; r < nr; r++) {
        const int64_t c0 = (w->lo[r] > k0 ? w->lo[r] : k0) - k0;
        const int64_t c1 = (w->hi[r] < k0 + nc ? w->hi[r] : k0 + nc) - k0;
        bw_row(p, s, h, q0 + r, k0, AK, c0, c1, w->stat[r], w->stat[AR + r], w->stat[2 * AR + r],
               w->S + r * AK, w->dP + r * AK, w->G, w->Z, thr);
        bw_pf_some(pf);
    }
    memset(w->S + nr * AK, 0, (size_t)((AR - nr) * AK) * 4);
    memset(w->dP + nr * AK, 0, (size_t)((AR - nr) * AK) * 4);
    pack_pairs(w->S, w->Pv);
    pack_pairs(w->dP, w->dSv);
    pack_rows(w->dP, dSr);
}

/* One (query block, key block) step: S, dP, bw_row, then dV^T, dK^T (the key block's scratch
 * accumulators dKT, dVT); dX in bf16 rows goes to dSr for the group's dQ product (dkdv).
 * w->stat, w->lo, w->hi hold the query block's rows. */
static void amx_step(const fa_bwd_params *p, const fa_seq *s, int64_t bi, int64_t h, int64_t q0,
                     int64_t nr, const uint16_t *Q, const uint16_t *dO, int64_t k0, int64_t nc,
                     const uint16_t *Kd, const uint16_t *Vd, float *dKT, float *dVT, uint16_t *dSr,
                     scratch *w, uint64_t thr, int plain, bw_pf *pf)
{
    const int64_t d32 = D32(p->f.d), nd = d32 / 16;
    const uint16_t *QT = Q + AR * d32, *dOT = dO + AR * d32;
    /* S = Q K^T, dP = dO V^T */
    tile_gemm(0, AR / 16, AK / 16, d32 / 32, Q, 16 * d32, 32, d32 * 2, Kd, 32 * AK, 32, AK * 4, w->S,
              16 * AK, 16, AK * 4);
    tile_gemm(0, AR / 16, AK / 16, d32 / 32, dO, 16 * d32, 32, d32 * 2, Vd, 32 * AK, 32, AK * 4,
              w->dP, 16 * AK, 16, AK * 4);
    if (plain)
        rows_plain(p, k0, nc, nr, w, dSr, pf);
    else
        bw_rows(p, s, h, q0, nr, k0, nc, w, dSr, thr, pf);
    /* dV^T += dO^T P, dK^T += Q^T dX */
    tile_gemm(1, nd, AK / 16, AR / 32, dOT, 16 * 32, 32 * d32, 64, w->Pv, 32 * AK, 32, AK * 4, dVT,
              16 * AK, 16, AK * 4);
    tile_gemm(1, nd, AK / 16, AR / 32, QT, 16 * 32, 32 * d32, 64, w->dSv, 32 * AK, 32, AK * 4, dKT,
              16 * AK, 16, AK * 4);
    if (p->dpse) {
        float *dpse = (float *)p->dpse;
        for (int64_t r = 0; r < nr; r++) {
            float *row = dpse + bi * p->dpse_sb + h * p->dpse_sh + (q0 + r) * p->dpse_sr;
            const float *x = w->dP + r * AK;
            for (int64_t c = 0; c < nc; c++)
                row[(k0 + c) * p->dpse_sc] += x[c];
        }
    }
}

/* Whether any of the nr rows' bands reaches keys [k0, k1). */
static int amx_reach(const int64_t *lo, const int64_t *hi, int64_t nr, int64_t k0, int64_t k1)
{
    int any = 0;
    for (int64_t r = 0; r < nr; r++)
        any |= lo[r] < hi[r] && lo[r] < k1 && hi[r] > k0;
    return any;
}

fa_status fa_bwd_bf16__amx_dkdv(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi,
                                int64_t hk, int64_t chunk, void *buf)
{
    const fa_fwd_params *f = &p->f;
    const fa_seq s = fa_seq_of(f, bi);
    const int64_t d = f->d, d32 = D32(d), G = f->h / f->hk;
    const uint64_t thr = fa_dropout_threshold(f->dropout_p);
    /* no score feature and no dpse: P and dX go from registers to their bf16 layouts */
    const int plain = !f->pse && !(f->softcap > 0) && !f->alibi && !f->mask && !(f->dropout_p > 0) &&
                      !p->dpse;
    scratch w = carve(buf, d);

    /* This item alone owns its chunk's partial sums of the group's rows: start them at zero. */
    const int64_t nqb = (s.sq + AR - 1) / AR;
    for (int64_t g = 0; g < G && nqb > 0; g++)
        memset(dq_block(p, ws, chunk, bi, hk * G + g, 0), 0, (size_t)(nqb * AR * d32) * 4);

    /* The chunk's key blocks k0 = (chunk + t nch) AK go in groups of KG consecutive ones (in t), and
     * each query block meets the group's blocks back to back: its Q, dO (rows and transposes) and
     * dQ partial block, which stream from L3 or memory when a head's rows exceed L2, are fetched
     * once per group instead of once per key block, while the group's K/V blocks and dK^T/dV^T
     * accumulators stay in L2. The summation order is the per-block one (each dK/dV block over
     * (g, q0) in order, each dQ partial over the chunk's key blocks in order): results do not
     * change with KG. */
    const int64_t step = ws->nch * AK, kslab = AK * d32;
    fa_amx_configure();
    for (int64_t kg = chunk * AK; kg < s.sk; kg += KG * step) {
        int64_t nb = 0;
        while (nb < KG && kg + nb * step < s.sk)
            nb++;
        memset(w.dKT, 0, (size_t)(nb * kslab) * 4);
        memset(w.dVT, 0, (size_t)(nb * kslab) * 4);
        const int64_t klast = kg + (nb - 1) * step;
        const int64_t kend = klast + (s.sk - klast < AK ? s.sk - klast : AK);

        for (int64_t g = 0; g < G; g++) {
            const int64_t h = hk * G + g;
            for (int64_t q0 = 0; q0 < s.sq; q0 += AR) {
                const int64_t nr = s.sq - q0 < AR ? s.sq - q0 : AR;
                /* A superset test over the group's span (other chunks' blocks included); each
                 * block is tested below. */
                if (!bw_bands(p, &s, q0, nr, kg, kend, w.lo, w.hi))
                    continue;
                const uint16_t *Q = qblock(p, ws, ws->Q, bi, h, q0), *dO = qblock(p, ws, ws->dO, bi, h, q0);
                float *dQb = dq_block(p, ws, chunk, bi, h, q0);
                for (int64_t r = 0; r < nr; r++) {
                    const int64_t at = bw_ws_at(p, ws, &s, h, q0 + r);
                    w.stat[r] = ((const float *)ws->m)[at];
                    w.stat[AR + r] = ((const float *)ws->il)[at];
                    w.stat[2 * AR + r] = ((const float *)ws->D)[at];
                }
                /* The next query block (Q, dO with their transposes, dQ partials: each right after
                 * this block's) into L2. */
                const int64_t qbytes = q0 + AR < s.sq ? 2 * AR * d32 * 2 : 0;
                bw_pf pf = bw_pf_init(Q + 2 * AR * d32, qbytes, dO + 2 * AR * d32, qbytes,
                                      dQb + AR * d32, qbytes, nb * AR);
                const uint16_t *dX[KG], *Kk[KG];
                int64_t nx = 0;
                for (int64_t t = 0; t < nb; t++) {
                    const int64_t k0 = kg + t * step, nc = s.sk - k0 < AK ? s.sk - k0 : AK;
                    if (!amx_reach(w.lo, w.hi, nr, k0, k0 + nc))
                        continue;
                    uint16_t *dSr = w.dSr + nx * AR * AK;
                    amx_step(p, &s, bi, h, q0, nr, Q, dO, k0, nc, kblock(p, ws, ws->Kt, bi, hk, k0),
                             kblock(p, ws, ws->Vt, bi, hk, k0), w.dKT + t * kslab, w.dVT + t * kslab,
                             dSr, &w, thr, plain, &pf);
                    dX[nx] = dSr;
                    Kk[nx++] = kblock(p, ws, ws->Kr, bi, hk, k0);
                }
                /* dQ += dX K for the group's blocks in one pass over the partial block's C tiles
                 * (loaded and stored once per group rather than once per key block). */
                if (nx)
                    tile_gemm_n(1, AR / 16, d32 / 16, AK / 32, nx, dX, 16 * AK, 32, AK * 2, Kk, 32 * d32,
                                32, d32 * 4, dQb, 16 * d32, 16, d32 * 4);
            }
        }

        /* dK, dV rows from the transposed accumulators [d32][AK]: 16 keys x 16 dims at a time
         * (16 x 16 transposes of the fp32 units) into 16 rows of d32 floats, then each row
         * rounded to bf16 once. */
        float *rows = w.S; /* free now: 16 gradient rows */
        for (int64_t t = 0; t < nb; t++) {
            const int64_t k0 = kg + t * step, nc = s.sk - k0 < AK ? s.sk - k0 : AK;
            for (int u = 0; u < 2; u++) {
                const float *XT = (u ? w.dVT : w.dKT) + t * kslab;
                uint16_t *out = u ? (uint16_t *)p->dv : (uint16_t *)p->dk;
                const int64_t sb = u ? p->dv_sb : p->dk_sb, sr = u ? p->dv_sr : p->dk_sr,
                              sh = u ? p->dv_sh : p->dk_sh;
                for (int64_t c = 0; c < nc; c += 16) {
                    for (int64_t k = 0; k < d32; k += 16) {
                        __m512i r[16];
                        for (int64_t i = 0; i < 16; i++)
                            r[i] = _mm512_load_si512(XT + (k + i) * AK + c);
                        fa_amx_tr16(r, rows + k, d32 * 4);
                    }
                    for (int64_t i = 0; i < 16 && c + i < nc; i++) {
                        const int64_t phys = s.k_row0 + k0 + c + i;
                        fa_amx_store_bf16(rows + i * d32, 1.0f, d, out + s.k_batch * sb + phys * sr + hk * sh);
                    }
                }
            }
        }
    }
    _tile_release();
    return FA_OK;
}

/* ---- dQ: the chunks' partial sums of one query block of one (batch, head), in chunk order ------ */

fa_status fa_bwd_bf16__amx_dq(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi, int64_t h,
                              int64_t q0, void *buf)
{
    const fa_fwd_params *f = &p->f;
    const fa_seq s = fa_seq_of(f, bi);
    const int64_t d = f->d, d32 = D32(d), nr = s.sq - q0 < AR ? s.sq - q0 : AR;
    const int64_t part = f->h * ws->qblocks * AR * d32; /* floats per chunk */
    const float *src = dq_block(p, ws, 0, bi, h, q0);
    float *row = carve(buf, d).S;
    for (int64_t r = 0; r < nr; r++) {
        for (int64_t x = 0; x < d32; x += 16) {
            __m512 a = _mm512_load_ps(src + r * d32 + x);
            for (int64_t c = 1; c < ws->nch; c++)
                a = _mm512_add_ps(a, _mm512_load_ps(src + c * part + r * d32 + x));
            _mm512_store_ps(row + x, a);
        }
        const int64_t pr = s.q_row0 + q0 + r;
        bw_store(FA_BF16, row, d, (uint16_t *)p->dq + s.q_batch * p->dq_sb + pr * p->dq_sr + h * p->dq_sh);
    }
    return FA_OK;
}
