/* fa_t16.h: a 16 x 16 float transpose in AVX-512 registers, shared by the packing code of the
 * float32 forward (fa_fwd_avx512_lanes.h), the AMX forward's K pack and the float32 backward's
 * K/V pack (fa_bwd_impl.h). Include only in translation units compiled with AVX-512F. */
#ifndef FA_T16_H
#define FA_T16_H

#include <immintrin.h>

/* col[j] lane i = row[i] lane j. Stages: unpack row pairs; shuffle within 128-bit lanes, so u[4g + c]
 * lane L holds column 4L + c of rows 4g..4g+3; then exchange 128-bit lanes: column 4L + c gathers
 * lane L of u[c], u[4 + c], u[8 + c], u[12 + c]. */
static inline void fa_t16(const __m512 row[16], __m512 col[16])
{
    __m512 u[16];
    for (int g = 0; g < 4; g++) {
        __m512 t0 = _mm512_unpacklo_ps(row[4 * g], row[4 * g + 1]);
        __m512 t1 = _mm512_unpackhi_ps(row[4 * g], row[4 * g + 1]);
        __m512 t2 = _mm512_unpacklo_ps(row[4 * g + 2], row[4 * g + 3]);
        __m512 t3 = _mm512_unpackhi_ps(row[4 * g + 2], row[4 * g + 3]);
        u[4 * g + 0] = _mm512_shuffle_ps(t0, t2, 0x44);
        u[4 * g + 1] = _mm512_shuffle_ps(t0, t2, 0xEE);
        u[4 * g + 2] = _mm512_shuffle_ps(t1, t3, 0x44);
        u[4 * g + 3] = _mm512_shuffle_ps(t1, t3, 0xEE);
    }
    for (int c = 0; c < 4; c++) {
        /* 0x88: 128-bit lanes 0, 2 of each source; 0xDD: lanes 1, 3 */
        __m512 v0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0x88);
        __m512 w0 = _mm512_shuffle_f32x4(u[c], u[4 + c], 0xDD);
        __m512 v1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0x88);
        __m512 w1 = _mm512_shuffle_f32x4(u[8 + c], u[12 + c], 0xDD);
        col[0 + c] = _mm512_shuffle_f32x4(v0, v1, 0x88);
        col[8 + c] = _mm512_shuffle_f32x4(v0, v1, 0xDD);
        col[4 + c] = _mm512_shuffle_f32x4(w0, w1, 0x88);
        col[12 + c] = _mm512_shuffle_f32x4(w0, w1, 0xDD);
    }
}

#endif
