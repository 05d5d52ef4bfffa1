/* fa_exp2_bf16.h: the exponential of the AMX bf16 kernels (forward softmax in fa_fwd_bf16_rows.h,
 * backward P in fa_bwd_bf16__amx.c), where P enters its tile product rounded to bf16.
 * Included only by translation units compiled with AVX512F and AVX512DQ.
 */
#ifndef FA_EXP2_BF16_H
#define FA_EXP2_BF16_H

#include <immintrin.h>

/* 2^t for bfloat16 inputs, where P enters P V rounded to bf16 (relative 2^-9), so only the row
 * sum l (lse, checked to 2e-5 and used by the backward to recompute P) needs more than that:
 * 2^floor(t) p(r) with r = t - floor(t) in [0, 1) from one vreduceps (round down) and 2^floor(t)
 * applied by vscalefps straight from t (it takes the floor of its exponent operand), so no
 * n = t - r either: one uop besides the polynomial fewer than exp2_p6 (fa_exp2.h). -inf gives r = 0
 * and 2^-inf = 0 exactly, NaN stays NaN, t far below -150 gives 0. p: degree 5, relative-error
 * minimax for 2^r on [0, 1] (Lawson-weighted least squares on Chebyshev nodes) with p(0) = 1
 * and each coefficient rounded to float32 in turn, the rest refitted. Max relative error against
 * 2^t over every float32 t in [-1, 1), float32 Horner with FMA, checked exhaustively in double:
 * 1.7e-7 (8.2e-8 of it the approximation; vreduceps rounds r = t + 1 for t just below 0, up to
 * 2^-24 in r); sampled over [-125, 2]: 1.6e-7. vscalefps is exact in the normal range. */
static inline __attribute__((always_inline)) __m512 exp2_p5(__m512 t)
{
    const __m512 r = _mm512_reduce_ps(t, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 y = _mm512_set1_ps(1.8669525161385536e-03f);
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(9.0174805372953415e-03f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(5.5799514055252075e-02f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(2.4016459286212921e-01f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(6.9315129518508911e-01f));
    y = _mm512_fmadd_ps(y, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(y, t);
}

#endif
