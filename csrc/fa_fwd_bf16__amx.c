/* fa_fwd_bf16__amx.c: FlashAttention-2 forward for bfloat16 inputs on AMX (tdpbf16ps), float32
 * scores, statistics and accumulators.
 *
 * Layout: the driver packs each (batch, kv head) once, tile by tile: K in A tiles of 16 keys x 32
 * dims and V^T in A tiles of 16 dims x 32 keys, each a contiguous 1 KiB (a tile load streams 16
 * consecutive lines; row-major K and V^T rows a stride apart measured ~10% slower overall); dims
 * padded to d32 = d rounded up to 32, keys to a multiple of 32 plus one block of zero keys so
 * tiles may run past the last key. Q is packed per item in the VNNI pair layout of a B tile, and
 * key blocks start on multiples of 32.
 * A work item is up to 256 queries in four 64-query sub-blocks; per 128-key block and sub-block:
 *   S^T (128 keys x 64 queries, fp32) = K Q^T: 2x2 C tiles per step, dims in chunks of 32
 *   softmax on S^T with queries in lanes (fa_fwd_avx512_lanes.h, shared with the FMA kernel)
 *   P^T rounded to bf16 and interleaved in key pairs (the B tile layout), keys past the block 0
 *   O^T (d x 64, fp32, in scratch) = alpha O^T + V^T P^T: 2x2 C tiles loaded from and stored
 *   back to O^T; the alpha rescale is skipped for query groups whose max did not move.
 * Numerics: Q.K products are exact in fp32 (bf16 x bf16), accumulation fp32; P enters the P V
 * product rounded to bf16 (as flash-attn does on GPUs), while the row sum l uses the fp32 P.
 * Without a packed copy (one-block calls, decode) the item runs the AVX-512 float32 kernel.
 */
#include "fa_kernels.h"
#include "fa_fwd_avx512_lanes.h"

#define QB FA_FWD_F32_AVX512_ROWS /* queries per item: QB / BR sub-blocks (as the FMA kernel) */
#define BC 128                    /* keys per block */
#define NQG (BR / 16)             /* 16-query groups per sub-block */

#define PIECE(bytes) ((((size_t)(bytes)) + 63) / 64 * 64)
#define D32(d) (((d) + 31) / 32 * 32)
#define SKP(sk) (((sk) + 31) / 32 * 32 + BC)

typedef struct {
    fa_lanes ln;
    uint16_t *Qv; /* per sub-block, per 16-query group, per 32-dim chunk: a 16 x 64-byte B tile */
    float *OT;    /* per sub-block d32 x BR: O^T */
    uint16_t *Pv; /* NQG x (BC / 32) B tiles of P^T */
} work;

static work sub_block(const work *w, int64_t sb, int64_t d)
{
    work v = *w;
    v.Qv += sb * NQG * (D32(d) / 32) * 512;
    v.OT += sb * D32(d) * BR;
    v.ln.m += sb * BR, v.ln.l += sb * BR, v.ln.alpha += sb * BR;
    v.ln.lo += sb * BR, v.ln.hi += sb * BR;
    return v;
}

static size_t own_scratch(int64_t d)
{
    const int64_t d32 = D32(d);
    return PIECE(QB * d32 * 2) + PIECE(QB * d32 * 4) + PIECE(NQG * (BC / 32) * 1024) +
           PIECE(BC * BR * 4) + 3 * PIECE(QB * 4) + 2 * PIECE(QB * 8) + 2 * PIECE(BR * 4);
}

static work carve(void *buf, int64_t d)
{
    const int64_t d32 = D32(d);
    char *p = (char *)buf;
    work w;
    w.Qv = (uint16_t *)p, p += PIECE(QB * d32 * 2);
    w.OT = (float *)p, p += PIECE(QB * d32 * 4);
    w.Pv = (uint16_t *)p, p += PIECE(NQG * (BC / 32) * 1024);
    w.ln.ST = (float *)p, p += PIECE(BC * BR * 4);
    w.ln.m = (float *)p, p += PIECE(QB * 4);
    w.ln.l = (float *)p, p += PIECE(QB * 4);
    w.ln.alpha = (float *)p, p += PIECE(QB * 4);
    w.ln.lo = (int64_t *)p, p += PIECE(QB * 8);
    w.ln.hi = (int64_t *)p, p += PIECE(QB * 8);
    w.ln.c0 = (int32_t *)p, p += PIECE(BR * 4);
    w.ln.c1 = (int32_t *)p;
    return w;
}

/* Also enough for the AVX-512 fallback, which runs in the same buffer. */
size_t fa_fwd_bf16__amx_scratch(const fa_fwd_params *p)
{
    size_t a = own_scratch(p->d), b = fa_fwd_f32__avx512_scratch(p);
    return a > b ? a : b;
}

/* ---- packing ----------------------------------------------------------------------------------- */

size_t fa_fwd_bf16__amx_pack_bytes(const fa_fwd_params *p, int64_t sk)
{
    return (size_t)(2 * SKP(sk) * D32(p->d)) * 2;
}

/* Both operands are stored tile by tile, each A tile a contiguous 1 KiB (16 rows x 64 bytes), so
 * a tile load streams 16 consecutive cache lines:
 *   K   tile (key group g of 16, dim chunk c of 32) at ((g * nd + c) * 16 + key % 16) * 32 + dim % 32
 *   V^T tile (key chunk t of 32, dim group e of 16) at ((t * nd16 + e) * 16 + dim % 16) * 32 + key % 32
 * with nd = d32 / 32, nd16 = d32 / 16. Keys and dims past the end are zero. */
void fa_fwd_bf16__amx_pack(const fa_fwd_params *p, int64_t bi, int64_t hk, void *dst)
{
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t d = p->d, d32 = D32(d), skp = SKP(s.sk), nd = d32 / 32, nd16 = d32 / 16;
    uint16_t *Kb = (uint16_t *)dst, *Vb = Kb + skp * d32;
    memset(dst, 0, fa_fwd_bf16__amx_pack_bytes(p, s.sk));
    for (int64_t j = 0; j < s.sk; j++) {
        const uint16_t *kr = (const uint16_t *)fa_key_ptr(p, &p->k, &s, j, hk, 2);
        const uint16_t *vr = (const uint16_t *)fa_key_ptr(p, &p->v, &s, j, hk, 2);
        uint16_t *kt = Kb + (j / 16) * nd * 512 + (j % 16) * 32;
        for (int64_t c = 0; c < nd; c++) {
            int64_t n = d - c * 32 < 32 ? d - c * 32 : 32;
            memcpy(kt + c * 512, kr + c * 32, (size_t)n * 2);
        }
        uint16_t *vt = Vb + (j / 32) * nd16 * 512 + j % 32;
        for (int64_t c = 0; c < d; c++)
            vt[(c / 16) * 512 + (c % 16) * 32] = vr[c];
    }
}

/* ---- AMX ------------------------------------------------------------------------------------- */

/* Palette 1, all eight tiles 16 rows x 64 bytes. */
typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tilecfg;

static void amx_configure(void)
{
    tilecfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* S^T[0..64)[0..64) of the sub-block for keys kb0..kb0+64 (rows past nc are finite garbage that
 * the softmax never reads). Tiles: C 0-3, A (K) 4-5, B (Q) 6-7. */
static void amx_qk(const uint16_t *Kb, int64_t d32, int64_t kb0, int64_t nc, const work *w)
{
    const int64_t nd = d32 / 32, kgroups = (nc + 15) / 16;
    float *ST = w->ln.ST;
    for (int64_t kg = 0; kg < kgroups; kg += 2) {
        const uint16_t *k0 = Kb + (kb0 / 16 + kg) * nd * 512, *k1 = k0 + nd * 512;
        for (int qg = 0; qg < NQG; qg += 2) {
            const uint16_t *q0 = w->Qv + qg * nd * 512, *q1 = q0 + nd * 512;
            _tile_zero(0);
            _tile_zero(1);
            _tile_zero(2);
            _tile_zero(3);
            for (int64_t dc = 0; dc < nd; dc++) {
                if (qg == NQG - 2 && kg + 2 < kgroups) {
                    /* the next key-group pair's tiles for this chunk, into L1 ahead of use */
                    const char *nx = (const char *)(k0 + 2 * nd * 512 + dc * 512);
                    for (int b = 0; b < 1024; b += 64) {
                        _mm_prefetch(nx + b, _MM_HINT_T0);
                        _mm_prefetch(nx + nd * 1024 + b, _MM_HINT_T0);
                    }
                }
                _tile_loadd(4, k0 + dc * 512, 64);
                _tile_loadd(5, k1 + dc * 512, 64);
                _tile_loadd(6, q0 + dc * 512, 64);
                _tile_loadd(7, q1 + dc * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            float *c = ST + kg * 16 * BR + qg * 16;
            _tile_stored(0, c, BR * 4);
            _tile_stored(1, c + 16, BR * 4);
            _tile_stored(2, c + 16 * BR, BR * 4);
            _tile_stored(3, c + 16 * BR + 16, BR * 4);
        }
    }
}

/* P^T (fp32, ST) -> bf16 B tiles: row k of tile (qg, kc) holds, for each query n of the group,
 * the pair (P^T[kc*32 + 2k][n], P^T[kc*32 + 2k + 1][n]); keys >= nc are 0. */
static void pack_p(const work *w, int64_t nc)
{
    const __m512i inter = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                           24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                           16, 0);
    const int64_t nkc = (nc + 31) / 32;
    for (int qg = 0; qg < NQG; qg++)
        for (int64_t kc = 0; kc < nkc; kc++) {
            uint16_t *tile = w->Pv + (qg * (BC / 32) + kc) * 512;
            for (int k = 0; k < 16; k++) {
                const int64_t j = kc * 32 + 2 * k;
                __m512 a = j < nc ? _mm512_load_ps(w->ln.ST + j * BR + qg * 16) : _mm512_setzero_ps();
                __m512 b = j + 1 < nc ? _mm512_load_ps(w->ln.ST + (j + 1) * BR + qg * 16)
                                      : _mm512_setzero_ps();
                __m512i ab = (__m512i)_mm512_cvtne2ps_pbh(b, a); /* a in the low half */
                _mm512_store_si512(tile + k * 32, _mm512_permutexvar_epi16(inter, ab));
            }
        }
}

/* O^T = alpha O^T + V^T P^T for keys kb0..kb0+nc. Tiles: C 0-3 (O^T), A (V^T) 4-5, B (P) 6-7. */
static void amx_pv(const uint16_t *Vb, int64_t d32, int64_t kb0, int64_t nc, const work *w)
{
    float *OT = w->OT;
    for (int qg = 0; qg < NQG; qg++) {
        const __m512 a = _mm512_load_ps(w->ln.alpha + qg * 16);
        if (_mm512_cmp_ps_mask(a, _mm512_set1_ps(1.0f), _CMP_NEQ_UQ) == 0)
            continue; /* the max of every query in the group stayed put */
        for (int64_t r = 0; r < d32; r++) {
            float *o = OT + r * BR + qg * 16;
            _mm512_store_ps(o, _mm512_mul_ps(_mm512_load_ps(o), a));
        }
    }
    const int64_t nkc = (nc + 31) / 32;
    for (int64_t dg = 0; dg < d32 / 16; dg += 2) {
        const uint16_t *v0 = Vb + ((kb0 / 32) * (d32 / 16) + dg) * 512, *v1 = v0 + 512;
        for (int qg = 0; qg < NQG; qg += 2) {
            float *c = OT + dg * 16 * BR + qg * 16;
            _tile_loadd(0, c, BR * 4);
            _tile_loadd(1, c + 16, BR * 4);
            _tile_loadd(2, c + 16 * BR, BR * 4);
            _tile_loadd(3, c + 16 * BR + 16, BR * 4);
            for (int64_t kc = 0; kc < nkc; kc++) {
                if (qg == NQG - 2 && dg + 2 < d32 / 16) {
                    /* the next dim-group pair's tiles for this key chunk */
                    const char *nx = (const char *)(v0 + 1024 + kc * (d32 / 16) * 512);
                    for (int b = 0; b < 2048; b += 64)
                        _mm_prefetch(nx + b, _MM_HINT_T0);
                }
                _tile_loadd(4, v0 + kc * (d32 / 16) * 512, 64);
                _tile_loadd(5, v1 + kc * (d32 / 16) * 512, 64);
                _tile_loadd(6, w->Pv + (qg * (BC / 32) + kc) * 512, 64);
                _tile_loadd(7, w->Pv + ((qg + 1) * (BC / 32) + kc) * 512, 64);
                _tile_dpbf16ps(0, 4, 6);
                _tile_dpbf16ps(1, 4, 7);
                _tile_dpbf16ps(2, 5, 6);
                _tile_dpbf16ps(3, 5, 7);
            }
            _tile_stored(0, c, BR * 4);
            _tile_stored(1, c + 16, BR * 4);
            _tile_stored(2, c + 16 * BR, BR * 4);
            _tile_stored(3, c + 16 * BR + 16, BR * 4);
        }
    }
}

/* ---- the work item ---------------------------------------------------------------------------- */

fa_status fa_fwd_bf16__amx_item(const fa_fwd_params *p, int64_t bi, int64_t h, int64_t q0,
                                const void *packed, void *buf)
{
    if (!packed || p->dtype != FA_BF16)
        return fa_fwd_f32__avx512_item(p, bi, h, q0, NULL, buf);
    const int64_t d = p->d, d32 = D32(d), nd = d32 / 32;
    const fa_seq s = fa_seq_of(p, bi);
    const int64_t skp = SKP(s.sk);
    const uint16_t *Kb = (const uint16_t *)packed, *Vb = Kb + skp * d32;
    const int64_t nrows = s.sq - q0 < QB ? s.sq - q0 : QB;
    const int64_t nsub = (nrows + BR - 1) / BR;
    work w = carve(buf, d);
    const int has_drop = p->dropout_p > 0;
    const uint64_t thr = fa_dropout_threshold(p->dropout_p);
    const int featured = p->pse || p->mask || p->softcap > 0 || p->alibi;

    /* Visible keys of every row, of every sub-block and of the whole item. */
    int64_t kmin, kmax, smin[QB / BR], smax[QB / BR];
    item_bands(p, &s, q0, nrows, &w.ln, smin, smax, &kmin, &kmax);

    /* Q in B-tile pair layout: the 32-bit pair p = (dims 2p, 2p+1) of query n of 16-query group
     * g goes to pair-row g * nd * 16 + p, column n; padding queries and dims stay zero. */
    memset(w.Qv, 0, (size_t)(nsub * BR * d32) * 2);
    uint32_t *pairs = (uint32_t *)w.ln.ST; /* scratch for one zero-padded row */
    for (int64_t r = 0; r < nrows; r++) {
        const uint16_t *src = (const uint16_t *)p->q.ptr +
                              (s.q_batch * p->q.sb + (s.q_row0 + q0 + r) * p->q.sr + h * p->q.sh);
        memset(pairs, 0, (size_t)d32 * 2);
        memcpy(pairs, src, (size_t)d * 2);
        uint32_t *dst = (uint32_t *)w.Qv + (r / 16) * nd * 16 * 16 + r % 16;
        for (int64_t pr = 0; pr < d32 / 2; pr++)
            dst[pr * 16] = pairs[pr];
    }
    for (int64_t r = 0; r < nsub * BR; r++) {
        w.ln.m[r] = -INFINITY;
        w.ln.l[r] = 0;
        if (p->sink && r < nrows) {
            w.ln.m[r] = p->sink[h];
            w.ln.l[r] = 1;
        }
    }
    memset(w.OT, 0, (size_t)(nsub * BR * d32) * 4);
    amx_configure();

    /* Blocks start on a multiple of 32 keys (the packed tiles' granularity); keys before kmin in
     * the first block are outside every row's band and get masked. */
    kmin &= ~(int64_t)31;
    for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BC) {
        const int64_t nc = kmax - kb0 < BC ? kmax - kb0 : BC;
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
            amx_qk(Kb, d32, kb0, ncs, &v);
            block_scores(p, &s, h, qs, nr, kb0, ncs, full && !featured, &v.ln);
            block_softmax(&v.ln, ncs);
            if (has_drop)
                block_dropout(p, &s, h, qs, nr, kb0, &v.ln, v.ln.ST, thr);
            pack_p(&v, ncs);
            amx_pv(Vb, d32, kb0, ncs, &v);
        }
    }

    const float drop_scale = has_drop ? (float)(1.0 / (1.0 - p->dropout_p)) : 1.0f;
    float *tmp = w.ln.ST; /* free now: 16 output rows (16 x d32 floats <= BC x BR) */
    for (int64_t r = 0; r < nrows; r++) {
        const int64_t i = q0 + r;
        if (r % 16 == 0) {
            /* O^T of this 16-query group back to rows, one 16 x 16 block at a time */
            const float *ot = w.OT + (r / BR) * d32 * BR + r % BR;
            for (int64_t dg = 0; dg < d32 / 16; dg++)
                transpose16(ot + dg * 16 * BR, BR, tmp + dg * 16, d32);
        }
        finish_row(p, &s, h, i, &w.ln, r, tmp + (r % 16) * d32, drop_scale);
    }

    if (p->s_dmask) {
        for (int64_t kb0 = kmin; kb0 < kmax; kb0 += BC) {
            const int64_t nc = kmax - kb0 < BC ? kmax - kb0 : BC;
            for (int64_t sb = 0; sb < nsub; sb++) {
                if (smin[sb] >= kb0 + nc || smax[sb] <= kb0)
                    continue;
                work v = sub_block(&w, sb, d);
                const int64_t qs = q0 + sb * BR;
                const int64_t nr = nrows - sb * BR < BR ? nrows - sb * BR : BR;
                block_band(&v.ln, nr, kb0, nc);
                amx_qk(Kb, d32, kb0, nc, &v);
                block_scores(p, &s, h, qs, nr, kb0, nc, 0, &v.ln);
                s_dmask_block(p, &s, h, qs, nr, kb0, nc, has_drop, thr, &v.ln);
            }
        }
    }
    _tile_release();
    return FA_OK;
}
