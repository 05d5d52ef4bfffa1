/* fa_philox_avx512.h: the dropout generator of fa_philox.h, 16 counters at a time in AVX-512F.
 *
 * The same Philox-4x32-10 on the same counters as fa_dropout_draw4, so every draw is bit for bit
 * the scalar one (tests compare the masks across ISAs and against S_dmask, which stays scalar).
 * Scalar Philox costs ~25 integer ops per draw; dropout training spent ~40% of its time there
 * (perf, T2 f32 at 1 thread). Here one call makes 64 draws in ~160 vector ops.
 *
 * Two lane layouts, one per way the kernels hold a score block:
 *   fa_keep_rows16  lanes = 16 consecutive query rows, one 4-column group: four 16-bit masks, one
 *                   per column, lane l = row row0 + l (the transposed S^T blocks of the FMA kernel);
 *   fa_keep_cols64  lanes = 16 consecutive 4-column groups of one row: one 64-bit mask, bit c =
 *                   column 4 col4 + c (row-major blocks: the AMX forward, the backward's rows).
 * A set bit means kept (draw >= threshold). Included only by translation units compiled with
 * AVX-512F.
 */
#ifndef FA_PHILOX_AVX512_H
#define FA_PHILOX_AVX512_H

#include <immintrin.h>
#include <stdint.h>

#include "fa_philox.h"

/* The first n of 16 lanes (none for n <= 0, all for n >= 16). */
static inline __attribute__((always_inline)) __mmask16 tail16(int64_t n)
{
    return n >= 16 ? (__mmask16)0xffff : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

/* Lanes of columns j..j+15 inside [c0, c1): a row's band, which the keep masks apply within. */
static inline __attribute__((always_inline)) __mmask16 band16(int64_t j, int64_t c0, int64_t c1)
{
    return (__mmask16)(tail16(c1 - j) & ~tail16(c0 - j));
}

/* hi and lo 32 bits of the 64-bit products a * m, lane by lane: vpmuludq multiplies the even
 * lanes only, so the odd lanes are shifted down and multiplied separately. */
static inline __attribute__((always_inline)) void fa_mul32x16(__m512i a, __m512i m, __m512i *hi,
                                                              __m512i *lo)
{
    const __m512i pe = _mm512_mul_epu32(a, m);                        /* even lanes: 64-bit */
    const __m512i po = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m); /* odd lanes: 64-bit */
    *hi = _mm512_mask_blend_epi32((__mmask16)0xAAAA, _mm512_srli_epi64(pe, 32), po);
    *lo = _mm512_mask_blend_epi32((__mmask16)0xAAAA, pe, _mm512_slli_epi64(po, 32));
}

/* fa_philox4x32_10 on 16 counters: lane l of c[0..3] holds counter l's four words. */
static inline __attribute__((always_inline)) void fa_philox16(__m512i c[4], uint32_t k0, uint32_t k1)
{
    const __m512i m0 = _mm512_set1_epi32((int)0xD2511F53u), m1 = _mm512_set1_epi32((int)0xCD9E8D57u);
    for (int round = 0; round < 10; round++) {
        __m512i h0, l0, h1, l1;
        fa_mul32x16(c[0], m0, &h0, &l0);
        fa_mul32x16(c[2], m1, &h1, &l1);
        /* 0x96: a ^ b ^ c in one vpternlogd */
        const __m512i n0 = _mm512_ternarylogic_epi32(h1, c[1], _mm512_set1_epi32((int)k0), 0x96);
        const __m512i n2 = _mm512_ternarylogic_epi32(h0, c[3], _mm512_set1_epi32((int)k1), 0x96);
        c[0] = n0, c[1] = l1, c[2] = n2, c[3] = l0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

/* The 64-bit values base + l, l = 0..15, as their low and high 32-bit words (lane l): a wrap of
 * the low word carries into the high one. */
static inline __attribute__((always_inline)) void fa_iota64(uint64_t base, __m512i *lo, __m512i *hi)
{
    const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i h = _mm512_set1_epi32((int)(uint32_t)(base >> 32));
    *lo = _mm512_add_epi32(_mm512_set1_epi32((int)(uint32_t)base), iota);
    *hi = _mm512_mask_add_epi32(h, _mm512_cmplt_epu32_mask(*lo, iota), h, _mm512_set1_epi32(1));
}

/* Keep masks of columns 4 col4 + t (t = 0..3, mask t) for query rows row0 .. row0 + 15 (bit l =
 * row row0 + l), with fa_dropout_draw4's counter (col4, row, batch * heads + head, offset). */
static inline void fa_keep_rows16(uint64_t seed, uint64_t offset, uint64_t bh, uint64_t row0,
                                  uint64_t col4, uint64_t thr, __mmask16 keep[4])
{
    __m512i rlo, rhi, c[4]; /* the rows row0 + l */
    fa_iota64(row0, &rlo, &rhi);
    c[0] = _mm512_set1_epi32((int)(uint32_t)col4);
    c[1] = _mm512_xor_si512(rlo, _mm512_set1_epi32((int)(uint32_t)(col4 >> 32)));
    c[2] = _mm512_xor_si512(_mm512_set1_epi32((int)(uint32_t)bh), rhi);
    c[3] = _mm512_set1_epi32((int)((uint32_t)offset ^ (uint32_t)(bh >> 32)));
    fa_philox16(c, (uint32_t)seed, (uint32_t)(seed >> 32) ^ (uint32_t)(offset >> 32));
    const __m512i t = _mm512_set1_epi32((int)(uint32_t)thr);
    for (int i = 0; i < 4; i++)
        keep[i] = _mm512_cmpge_epu32_mask(c[i], t);
}

/* The 16 bits of m spread to every fourth bit of a 64-bit word (bit l -> bit 4 l). */
static inline uint64_t fa_spread4(uint64_t m)
{
    m &= 0xFFFFu;
    m = (m | (m << 24)) & 0x000000FF000000FFull;
    m = (m | (m << 12)) & 0x000F000F000F000Full;
    m = (m | (m << 6)) & 0x0303030303030303ull;
    m = (m | (m << 3)) & 0x1111111111111111ull;
    return m;
}

/* Keep mask of the 64 columns 4 col4 .. 4 col4 + 63 of one row (bit c = column 4 col4 + c). */
static inline uint64_t fa_keep_cols64(uint64_t seed, uint64_t offset, uint64_t bh, uint64_t row,
                                      uint64_t col4, uint64_t thr)
{
    __m512i glo, ghi, c[4]; /* the column groups col4 + l */
    fa_iota64(col4, &glo, &ghi);
    c[0] = glo;
    c[1] = _mm512_xor_si512(_mm512_set1_epi32((int)(uint32_t)row), ghi);
    c[2] = _mm512_set1_epi32((int)((uint32_t)bh ^ (uint32_t)(row >> 32)));
    c[3] = _mm512_set1_epi32((int)((uint32_t)offset ^ (uint32_t)(bh >> 32)));
    fa_philox16(c, (uint32_t)seed, (uint32_t)(seed >> 32) ^ (uint32_t)(offset >> 32));
    const __m512i t = _mm512_set1_epi32((int)(uint32_t)thr);
    uint64_t keep = 0;
    for (int i = 0; i < 4; i++)
        keep |= fa_spread4(_mm512_cmpge_epu32_mask(c[i], t)) << i;
    return keep;
}

/* Keep bits of the block columns [c0, c1) of one row, the block starting at key kb0: bit b of
 * bits[b / 64] for block column b (key kb0 + b). Bits outside [c0, c1) are left as they were or
 * set arbitrarily: callers look only inside the band, whose P is the only nonzero one. bits must
 * hold (c1 + 63) / 64 + 1 words. */
static inline void fa_keep_row_bits(uint64_t seed, uint64_t offset, uint64_t bh, uint64_t row,
                                    int64_t kb0, int64_t c0, int64_t c1, uint64_t thr, uint64_t *bits)
{
    /* windows of 64 columns from the 4-aligned key at or before the band's first */
    for (int64_t a = (kb0 + c0) & ~(int64_t)3; a < kb0 + c1; a += 64) {
        uint64_t k = fa_keep_cols64(seed, offset, bh, row, (uint64_t)a >> 2, thr);
        int64_t b = a - kb0;
        if (b < 0) { /* the first window may start up to 3 keys before the block */
            k >>= -b;
            b = 0;
        }
        const int64_t wd = b >> 6, off = b & 63;
        /* keep the bits below b (the previous window's), write from b up */
        bits[wd] = (off ? bits[wd] & ((1ull << off) - 1) : 0) | (k << off);
        if (off)
            bits[wd + 1] = k >> (64 - off);
    }
}

/* 16 keep bits of block columns b .. b + 15 (b a multiple of 16). */
static inline __mmask16 fa_keep_bits16(const uint64_t *bits, int64_t b)
{
    return (__mmask16)(bits[b >> 6] >> (b & 63));
}

/* Zeroes the dropped entries P[c] of one row, c in [c0, c1) (block columns; key kb0 + c). */
static inline void fa_drop_row_f32(uint64_t seed, uint64_t offset, uint64_t bh, uint64_t row,
                                   int64_t kb0, int64_t c0, int64_t c1, uint64_t thr, float *P)
{
    uint64_t bits[8] = {0};
    for (int64_t b0 = c0 & ~(int64_t)255; b0 < c1; b0 += 256) { /* 256 columns per bitmap */
        const int64_t e0 = c0 > b0 ? c0 : b0, e1 = c1 < b0 + 256 ? c1 : b0 + 256;
        fa_keep_row_bits(seed, offset, bh, row, kb0 + b0, e0 - b0, e1 - b0, thr, bits);
        for (int64_t b = (e0 - b0) & ~(int64_t)15; b < e1 - b0; b += 16) {
            /* lanes inside [e0, e1) whose draw says drop */
            const __mmask16 drop = band16(b, e0 - b0, e1 - b0) & (__mmask16)~fa_keep_bits16(bits, b);
            if (drop)
                _mm512_mask_storeu_ps(P + b0 + b, drop, _mm512_setzero_ps());
        }
    }
}

#endif
