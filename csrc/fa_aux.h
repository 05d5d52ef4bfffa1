/* fa_aux.h: the small non-attention kernels: rotary embedding and the log-sum-exp combine of
 * partial attention results (split-KV, ring attention). Plain C, no Python. */
#ifndef FA_AUX_H
#define FA_AUX_H

#include <stdint.h>
#include "fa_params.h"

/* y[b, s, h, :] = rotary(x[b, s, h, :]) at position pos[b * s_len + s] for the first 2 * half
 * dims (the rest copied). cos/sin are (ro_len, half) tables of dtype t, row-contiguous. Rotation
 * in float32 (float64 for f64): pairs (x[2m], x[2m+1]) when interleaved (GPT-J), else (x[m],
 * x[m + half]) (GPT-NeoX): (a, b) -> (a cos - b sin, a sin + b cos). Positions are checked by the
 * caller to lie in [0, ro_len). x and y may alias element for element. */
void fa_rotary(fa_dtype t, const void *x, const int64_t xs[3], void *y, const int64_t ys[3],
               int64_t b, int64_t s_len, int64_t h, int64_t d, const void *cos, const void *sin,
               int64_t half, const int64_t *pos, int interleaved);

/* Merge n partial results over disjoint key sets into out/lse:
 *   lse = log sum_i exp(lse_i),  out = sum_i exp(lse_i - lse) * out_i
 * where a partial with lse_i = +inf (it saw no key) or -inf contributes nothing; when none
 * contributes, out = 0 and lse = +inf. outs[i] are (b, s, h, d) views with strides os[i][0..2]
 * (batch, row, head) of dtype tin (split-KV passes float32/float64 partials), the result dtype t; lses[i] are float32 (float64 for f64) (b, h, s) views with
 * strides ls[i][0..2]. The result has the same addressing (out: ostride, lse: lstride). */
void fa_combine(fa_dtype tin, fa_dtype t, int n, const void *const *outs, const int64_t (*os)[3],
                const void *const *lses, const int64_t (*ls)[3], void *out, const int64_t ostride[3],
                void *lse, const int64_t lstride[3], int64_t b, int64_t s_len, int64_t h, int64_t d);

#endif
