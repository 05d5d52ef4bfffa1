/* fa_exp2.h: 2^t in float32 for the AVX-512 kernels' softmax: the float32 forward (through
 * fa_fwd_avx512_lanes.h), the AMX forward's running-max updates and float16 P, and the float32
 * backward's recomputed P (fa_bwd_rows.h). Included only by translation units compiled with
 * AVX512F and AVX512DQ.
 *
 * 2^t = 2^n p(r), n = round(t) (nearest even), r = t - n in [-1/2, 1/2]; p a degree-6
 * polynomial fitted on [-1/2, 1/2] (Chebyshev-node least squares; max relative error 9.7e-8
 * including the float32 Horner rounding); 2^n applied by vscalefps, exact in the normal range and
 * flushing to 0 far below it.
 */
#ifndef FA_EXP2_H
#define FA_EXP2_H

#include <immintrin.h>

#include "fa_exp2_coef.h"

/* 2^r for |r| <= 1/2 (Horner, float32 FMA). */
static inline __attribute__((always_inline)) __m512 exp2_poly6(__m512 r)
{
    __m512 y = _mm512_set1_ps(FA_EXP2_C6);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP2_C5));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP2_C4));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP2_C3));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP2_C2));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP2_C1));
    return _mm512_fmadd_ps(y, r, _mm512_set1_ps(FA_EXP2_C0));
}

/* 2^t for t <= ~0. r = t - round(t) comes exact from one vreduceps and n = t - r is exact, so
 * the split takes two uops and no clamp (the former exp2_clamped clamped t at -200 and rounded
 * through +-1.5 * 2^23: four uops, the same n and r, the same bits; NOTES.md "A cheaper softmax
 * in the AMX bf16 forward"). t = -inf gives r = 0, n = -inf and vscalefps(p, -inf) = 0 exactly;
 * t far below -150 gives 0 as well; NaN stays NaN (a NaN score poisons its row's sum). */
static inline __attribute__((always_inline)) __m512 exp2_p6(__m512 t)
{
    const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    return _mm512_scalef_ps(exp2_poly6(r), _mm512_sub_ps(t, r));
}

#endif
