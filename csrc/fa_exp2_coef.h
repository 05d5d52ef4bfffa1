/* fa_exp2_coef.h: the degree-6 polynomial for 2^r on |r| <= 1/2 shared by the float32
 * exponentials (fa_exp2.h's exp2_poly6 for the AVX-512 kernels, fa_vec.h's AVX2 vexp_nonpos):
 * Chebyshev-node least squares, max relative error 9.7e-8 including the float32 Horner rounding.
 * Highest degree first. No intrinsics here, so every build may include it. */
#ifndef FA_EXP2_COEF_H
#define FA_EXP2_COEF_H

#define FA_EXP2_C6 1.5337577497120947e-04f
#define FA_EXP2_C5 1.3399859890341759e-03f
#define FA_EXP2_C4 9.6185198053717613e-03f
#define FA_EXP2_C3 5.5503290146589279e-02f
#define FA_EXP2_C2 2.4022646248340607e-01f
#define FA_EXP2_C1 6.9314718246459961e-01f
#define FA_EXP2_C0 1.0f

#endif
