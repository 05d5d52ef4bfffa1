/* fa_amx.h: the tile configuration shared by the AMX kernels (fa_fwd_bf16__amx.c,
 * fa_bwd_bf16__amx.c). Included only by translation units compiled with -mamx-tile.
 *
 * Both kernels use palette 1 with all eight tiles at their largest shape, 16 rows x 64 bytes
 * (16 x 16 fp32 C tiles, 16 x 32 bf16 A tiles, 16 VNNI pair rows of B), and configure once per
 * work item: the configuration is per thread and another kernel may have changed it since. The
 * permission to use the tile state (arch_prctl) is requested once per process in fa_dispatch.c.
 */
#ifndef FA_AMX_H
#define FA_AMX_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

static inline void fa_amx_configure(void)
{
    struct {
        uint8_t palette, start_row, reserved[14];
        uint16_t colsb[16];
        uint8_t rows[16];
    } c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 8; t++) {
        c.colsb[t] = 64;
        c.rows[t] = 16;
    }
    _tile_loadconfig(&c);
}

/* The 2x2 C-tile step both kernels use: C tiles 0-3 (+)= A tiles 4-5 x B tiles 6-7 (each A tile
 * feeds two products, each B tile two). Tile numbers must be compile-time constants, hence fixed
 * registers and always-inline helpers. */
static inline __attribute__((always_inline)) void fa_amx_zero2x2(void)
{
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
}

static inline __attribute__((always_inline)) void fa_amx_dp2x2(void)
{
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(2, 5, 6);
    _tile_dpbf16ps(3, 5, 7);
}

/* ---- packing helpers ------------------------------------------------------------------------- */

/* The 16 x 16 transpose of 32-bit units: r[i] holds row i; row j of the result (unit i = r[i]'s
 * unit j) goes to dst + j * ld bytes. The AMX layouts are made of 32-bit units (VNNI pairs of
 * bf16), so a pair-row layout is this transpose away from rows of pairs. */
static inline void fa_amx_tr16(const __m512i r[16], void *dst, int64_t ld)
{
    __m512i u[16];
    for (int g = 0; g < 4; g++) {
        /* rows 4g..4g+3: u[4g + c], 128-bit lane L = unit 4L + c of those four rows */
        const __m512i t0 = _mm512_unpacklo_epi32(r[4 * g], r[4 * g + 1]);
        const __m512i t1 = _mm512_unpackhi_epi32(r[4 * g], r[4 * g + 1]);
        const __m512i t2 = _mm512_unpacklo_epi32(r[4 * g + 2], r[4 * g + 3]);
        const __m512i t3 = _mm512_unpackhi_epi32(r[4 * g + 2], r[4 * g + 3]);
        u[4 * g + 0] = _mm512_unpacklo_epi64(t0, t2);
        u[4 * g + 1] = _mm512_unpackhi_epi64(t0, t2);
        u[4 * g + 2] = _mm512_unpacklo_epi64(t1, t3);
        u[4 * g + 3] = _mm512_unpackhi_epi64(t1, t3);
    }
    char *d = (char *)dst;
    for (int c = 0; c < 4; c++) {
        /* lanes: u[c] = (unit c, 4 + c, 8 + c, 12 + c) of rows 0-3, u[4 + c] of rows 4-7, ... */
        const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88);
        const __m512i w0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xDD);
        const __m512i v1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
        const __m512i w1 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xDD);
        _mm512_storeu_si512(d + (0 + c) * ld, _mm512_shuffle_i32x4(v0, v1, 0x88));
        _mm512_storeu_si512(d + (8 + c) * ld, _mm512_shuffle_i32x4(v0, v1, 0xDD));
        _mm512_storeu_si512(d + (4 + c) * ld, _mm512_shuffle_i32x4(w0, w1, 0x88));
        _mm512_storeu_si512(d + (12 + c) * ld, _mm512_shuffle_i32x4(w0, w1, 0xDD));
    }
}

/* Two rows of 32 bf16 interleaved into VNNI pairs: *lo = (a0, b0, ..., a15, b15), *hi = the same
 * of elements 16-31. */
static inline void fa_amx_pairs(__m512i a, __m512i b, __m512i *lo, __m512i *hi)
{
    const __m512i il = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8,
                                        39, 7, 38, 6, 37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
    const __m512i ih = _mm512_add_epi16(il, _mm512_set1_epi16(16));
    *lo = _mm512_permutex2var_epi16(a, il, b);
    *hi = _mm512_permutex2var_epi16(a, ih, b);
}

/* Elements [0, n) of a row of 32 bf16 (n clipped to [0, 32]), zero past them. */
static inline __m512i fa_amx_load32(const uint16_t *src, int64_t n)
{
    const __mmask32 m = n >= 32 ? 0xffffffffu : n <= 0 ? 0 : (__mmask32)((1u << n) - 1);
    return _mm512_maskz_loadu_epi16(m, src);
}

/* n floats times mul to bfloat16 at dst, rounded to nearest even with NaN kept quiet, as
 * fa_f32_to_bf16 of fa_cvt.h (and bw_f32_to_bf16), 16 lanes at a time; vcvtneps2bf16 would
 * flush denormals. */
static inline void fa_amx_store_bf16(const float *src, float mul, int64_t n, uint16_t *dst)
{
    const __m512 m = _mm512_set1_ps(mul);
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 t = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512i u = _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_loadu_ps(t, src + i), m));
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                       _mm512_set1_epi32(0x7f800000));
        __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i rnd = _mm512_add_epi32(u, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff)));
        rnd = _mm512_mask_or_epi32(rnd, nan, u, _mm512_set1_epi32(0x400000));
        _mm256_mask_storeu_epi16(dst + i, t, _mm512_cvtepi32_epi16(_mm512_srli_epi32(rnd, 16)));
    }
}

#endif
