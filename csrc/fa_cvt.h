/* fa_cvt.h: scalar bfloat16 <-> float32 conversions shared by the kernels.
 *
 * bfloat16 is the top half of an IEEE binary32, so widening is a shift; narrowing rounds to
 * nearest even and keeps NaN a quiet NaN (a plain rounding add could carry a NaN into inf).
 */
#ifndef FA_CVT_H
#define FA_CVT_H

#include <stdint.h>
#include <string.h>

static inline float fa_bf16_to_f32(uint16_t h)
{
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t fa_f32_to_bf16(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1);
    return (uint16_t)(u >> 16);
}

#endif
