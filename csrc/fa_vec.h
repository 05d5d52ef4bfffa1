/* fa_vec.h: the small vector vocabulary the kernel templates are written in.
 *
 * Included by one translation unit per ISA after defining
 *   FA_ACC     float or double: the accumulator type
 *   FA_VBYTES  vector width in bytes (sizeof(FA_ACC) for the scalar build, 32 AVX2, 64 AVX-512)
 * GCC vector extensions lower these types to the registers the TU's -m flags allow, so one
 * kernel source serves every ISA and the scalar build stays the plain-C oracle.
 *
 * exp: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, then a Taylor polynomial of degree
 * 7 (float; truncation error < 6e-9 relative, total error within 2 ulp) or 13 (double; < 5e-18)
 * and scaling by 2^n through the exponent bits. The kernels only ever call it with x <= 0 (scores
 * minus their running max), so the argument is clamped to [EXP_LO, 0] and anything below EXP_LO
 * (including -inf) returns exactly 0.
 */
#ifndef FA_VEC_H
#define FA_VEC_H

#include <stdint.h>
#include <string.h>
#include "fa_exp2_coef.h" /* the AVX2 float32 exp's polynomial */
#if defined(__AVX__)
#include <immintrin.h> /* vmax */
#endif

typedef FA_ACC acc_t;
#define VLEN ((int)(FA_VBYTES / sizeof(acc_t)))

#if FA_ACC_IS_DOUBLE
typedef int64_t acci_t;
#else
typedef int32_t acci_t;
#endif

typedef acc_t vec_t __attribute__((vector_size(FA_VBYTES), aligned(sizeof(acc_t))));
typedef acci_t veci_t __attribute__((vector_size(FA_VBYTES), aligned(sizeof(acc_t))));

#define FA_INLINE static inline __attribute__((always_inline))

FA_INLINE vec_t vload(const acc_t *p) { return *(const vec_t *)p; }
FA_INLINE void vstore(acc_t *p, vec_t v) { *(vec_t *)p = v; }
/* x in every lane: a shuffle of {x}, one broadcast (from memory, a plain load) where GCC's
 * (vec_t){0} + x must keep the add, which turns -0 into +0: in the micro-kernels that add sat
 * on the FMA ports in front of every broadcast (NOTES.md, seventh session). */
FA_INLINE vec_t vsplat(acc_t x)
{
    vec_t v = {x};
    return __builtin_shuffle(v, (veci_t){0});
}

FA_INLINE vec_t viota(void)
{
    vec_t v;
    for (int i = 0; i < VLEN; i++)
        v[i] = (acc_t)i;
    return v;
}

/* Lane-wise select: m is all-ones or all-zeros per lane (the result of a vector comparison). */
FA_INLINE vec_t vsel(veci_t m, vec_t a, vec_t b)
{
    return (vec_t)((m & (veci_t)a) | (~m & (veci_t)b));
}

/* a > b ? a : b per lane (b where either is NaN): exactly maxps/maxpd, one instruction where the
 * ISA has it (GCC does not turn the bitwise select into it). */
FA_INLINE vec_t vmax(vec_t a, vec_t b)
{
#if defined(__AVX512F__) && FA_VBYTES == 64 && !FA_ACC_IS_DOUBLE
    return (vec_t)_mm512_max_ps((__m512)a, (__m512)b);
#elif defined(__AVX__) && FA_VBYTES == 32 && !FA_ACC_IS_DOUBLE
    return (vec_t)_mm256_max_ps((__m256)a, (__m256)b);
#else
    return vsel(a > b, a, b);
#endif
}

FA_INLINE acc_t vhmax(vec_t v)
{
    acc_t m = v[0];
    for (int i = 1; i < VLEN; i++)
        m = v[i] > m ? v[i] : m;
    return m;
}

FA_INLINE acc_t vhsum(vec_t v)
{
    acc_t s = 0;
    for (int i = 0; i < VLEN; i++)
        s += v[i];
    return s;
}

#if FA_ACC_IS_DOUBLE
#define EXP_LO (-708.0)
FA_INLINE vec_t vexp_nonpos(vec_t x)
{
    const acc_t magic = 6755399441055744.0; /* 1.5 * 2^52: adding it rounds to an integer */
    veci_t under = x < (acc_t)EXP_LO;
    x = vsel(under, vsplat(EXP_LO), x);
    vec_t t = x * 1.4426950408889634 + magic;
    vec_t n = t - magic;
    vec_t r = x - n * 6.93147180369123816490e-01; /* ln2 split in two (Cody-Waite) */
    r = r - n * 1.90821492927058770002e-10;
    vec_t y = vsplat(1.0 / 6227020800.0);
    static const double c[13] = {1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0,
                                 1.0 / 362880.0,    1.0 / 40320.0,    1.0 / 5040.0,
                                 1.0 / 720.0,       1.0 / 120.0,      1.0 / 24.0,
                                 1.0 / 6.0,         0.5,              1.0,
                                 1.0};
    for (int i = 0; i < 13; i++)
        y = y * r + c[i];
    veci_t bits = ((veci_t)t - (veci_t)vsplat(magic) + 1023) << 52;
    y = y * (vec_t)bits;
    return vsel(under, vsplat(0), y);
}
#elif FA_VBYTES == 32 && defined(__AVX2__)
#define EXP_LO (-87.0f)
/* The AVX2 float32 build (where the softmax rows are a fifth of the forward at d = 64): e^x as
 * 2^t, t = x log2 e, split t = n + r by adding 1.5 * 2^23 + 127, which rounds t to an integer n
 * and leaves n + 127 in the low mantissa bits, so one shift makes 2^n; 2^r from the degree-6
 * polynomial of the AVX-512 kernels (fa_exp2.h's exp2_poly6: 9.7e-8 relative on [-1/2, 1/2]),
 * plus 2^-24 |t| relative from rounding t (as in the AVX-512 softmax): measured against exp in
 * double over every 7th float, 3.5e-7 relative on [-20, 0], 1.2e-6 on [-87, 0] (where the
 * portable form below stays within 2 ulp). Below EXP_LO (-inf included) the result is exactly 0,
 * as in the other builds; NaN stays NaN. 14 vector ops where the portable form takes ~20: the
 * AVX2 forward 1.04-1.07x (NOTES.md, seventh session). */
FA_INLINE vec_t vexp_nonpos(vec_t x)
{
    const acc_t magic = 12583039.0f; /* 1.5 * 2^23 + 127 */
    const veci_t under = x < EXP_LO;
    const vec_t t = x * 1.44269504088896341f;
    const vec_t u = t + magic;
    const vec_t r = t - (u - magic); /* u - magic = n exactly */
    vec_t y = vsplat(FA_EXP2_C6);
    y = y * r + FA_EXP2_C5;
    y = y * r + FA_EXP2_C4;
    y = y * r + FA_EXP2_C3;
    y = y * r + FA_EXP2_C2;
    y = y * r + FA_EXP2_C1;
    y = y * r + FA_EXP2_C0;
    y = y * (vec_t)((veci_t)u << 23); /* 2^n: n + 127 in the exponent field */
    return (vec_t)((veci_t)y & ~under);
}
#else
#define EXP_LO (-87.0f)
FA_INLINE vec_t vexp_nonpos(vec_t x)
{
    const acc_t magic = 12582912.0f; /* 1.5 * 2^23 */
    veci_t under = x < EXP_LO;
    x = vsel(under, vsplat(EXP_LO), x);
    vec_t t = x * 1.44269504f + magic;
    vec_t n = t - magic;
    vec_t r = x - n * 0.693359375f; /* ln2 = 0.693359375 - 2.12194440e-4 (Cody-Waite) */
    r = r + n * 2.12194440e-4f;
    vec_t y = vsplat(1.0f / 5040.0f);
    y = y * r + 1.0f / 720.0f;
    y = y * r + 1.0f / 120.0f;
    y = y * r + 1.0f / 24.0f;
    y = y * r + 1.0f / 6.0f;
    y = y * r + 0.5f;
    y = y * r + 1.0f;
    y = y * r + 1.0f;
    veci_t bits = ((veci_t)t - (veci_t)vsplat(magic) + 127) << 23;
    y = y * (vec_t)bits;
    return vsel(under, vsplat(0), y);
}
#endif

/* Scalar exp for x <= 0 through the vector one, so scalar and vector paths round alike. */
FA_INLINE acc_t sexp_nonpos(acc_t x)
{
    vec_t v = vexp_nonpos(vsplat(x));
    return v[0];
}

/* expm1(x) for x <= 0, accurate to a few ulp relative even for tiny |x| (where exp(x) - 1 would
 * cancel): with x = n ln2 + r as in vexp_nonpos and q = expm1(r) from its Taylor series (no
 * leading 1, so nothing cancels), expm1(x) = 2^n q + (2^n - 1), exact scaling plus one rounding.
 * Below EXP_LO the result is -1. */
FA_INLINE vec_t vexpm1_nonpos(vec_t x)
{
#if FA_ACC_IS_DOUBLE
    const acc_t magic = 6755399441055744.0, log2e = 1.4426950408889634;
    const acc_t ln2_hi = 6.93147180369123816490e-01, ln2_lo = 1.90821492927058770002e-10; /* ln2 = hi + lo */
    const int terms = 14, bias = 1023, shift = 52;
#else
    const acc_t magic = 12582912.0f, log2e = 1.44269504f;
    const acc_t ln2_hi = 0.693359375f, ln2_lo = -2.12194440e-4f; /* ln2 = hi + lo */
    const int terms = 9, bias = 127, shift = 23;
#endif
    veci_t under = x < (acc_t)EXP_LO;
    x = vsel(under, vsplat(EXP_LO), x);
    vec_t t = x * log2e + magic;
    vec_t n = t - magic;
    vec_t r = x - n * ln2_hi;
    r = r - n * ln2_lo;
    /* q = r (1 + r/2 (1 + r/3 (1 + ... (1 + r/terms)))): the Taylor series of expm1, Horner form. */
    vec_t q = vsplat(1);
    for (int i = terms; i >= 2; i--)
        q = q * (r * (acc_t)(1.0 / i)) + (acc_t)1;
    q = q * r;
    vec_t s = (vec_t)(((veci_t)t - (veci_t)vsplat(magic) + bias) << shift); /* 2^n */
    vec_t y = s * q + (s - (acc_t)1);
    return vsel(under, vsplat(-1), y);
}

/* tanh(|y|) = -e / (2 + e) with e = expm1(-2|y|) in (-1, 0]: accurate relative to tanh itself near
 * 0 (no 1 - t cancellation), no overflow for any y. */
FA_INLINE vec_t vtanh(vec_t y)
{
    veci_t neg = y < (acc_t)0;
    vec_t a = vsel(neg, -y, y);
    vec_t e = vexpm1_nonpos(a * (acc_t)-2);
    vec_t r = -e / ((acc_t)2 + e);
    return vsel(neg, -r, r);
}

#endif
