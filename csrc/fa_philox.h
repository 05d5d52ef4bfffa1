/* fa_philox.h: the counter-based generator behind dropout.
 *
 * Philox-4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3",
 * SC'11): ten rounds of a keyed bijection on a 128-bit counter, constants from the paper.
 * Dropout keeps element (batch, head, row, col) iff its 32-bit draw is >= a threshold, so the mask
 * is a pure function of (seed, offset, batch, head, row, col): independent of threads, block sizes
 * and ISA, and replayable by the backward pass.
 */
#ifndef FA_PHILOX_H
#define FA_PHILOX_H

#include <stdint.h>

static inline void fa_philox4x32_10(uint32_t c[4], uint32_t k0, uint32_t k1)
{
    for (int round = 0; round < 10; round++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c[0];
        uint64_t p1 = (uint64_t)0xCD9E8D57u * c[2];
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c[1] ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c[3] ^ k1;
        c[0] = n0;
        c[1] = (uint32_t)p1;
        c[2] = n2;
        c[3] = (uint32_t)p0;
        k0 += 0x9E3779B9u;
        k1 += 0xBB67AE85u;
    }
}

/* Threshold for a drop probability p in [0, 1): keep iff draw >= threshold. */
static inline uint64_t fa_dropout_threshold(double p)
{
    double t = p * 4294967296.0;
    if (t <= 0.0)
        return 0;
    if (t >= 4294967295.0)
        return 4294967295u;
    return (uint64_t)t;
}

/* Four consecutive draws for columns [4*col4, 4*col4 + 4) of one (batch, head, row). The counter
 * holds (col4, row, batch*heads + head, offset); the key is the seed, with the offset's high word
 * folded in so every 64-bit (seed, offset) pair gives its own stream. */
static inline void fa_dropout_draw4(uint64_t seed, uint64_t offset, uint64_t bh, uint64_t row,
                                    uint64_t col4, uint32_t out[4])
{
    out[0] = (uint32_t)col4;
    out[1] = (uint32_t)row ^ (uint32_t)(col4 >> 32);
    out[2] = (uint32_t)bh ^ (uint32_t)(row >> 32);
    out[3] = (uint32_t)offset ^ (uint32_t)(bh >> 32);
    fa_philox4x32_10(out, (uint32_t)seed, (uint32_t)(seed >> 32) ^ (uint32_t)(offset >> 32));
}

#endif
