/* fa_aux.c: rotary embedding and the partial-result combine (see fa_aux.h for the contracts).
 * Both are memory-bound and small next to attention, so they are plain C loops. */
#include <math.h>
#include <string.h>

#include "fa_aux.h"

static double load_elem(fa_dtype t, const void *p, int64_t i)
{
    switch (t) {
    case FA_F32:
        return ((const float *)p)[i];
    case FA_F64:
        return ((const double *)p)[i];
    case FA_F16:
        return (double)(float)((const _Float16 *)p)[i];
    case FA_BF16: {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    }
    return 0;
}

static void store_elem(fa_dtype t, void *p, int64_t i, double v)
{
    switch (t) {
    case FA_F32:
        ((float *)p)[i] = (float)v;
        break;
    case FA_F64:
        ((double *)p)[i] = v;
        break;
    case FA_F16:
        ((_Float16 *)p)[i] = (_Float16)(float)v;
        break;
    case FA_BF16: {
        float f = (float)v;
        uint32_t u;
        memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u)
            u = (u >> 16 | 0x40) << 16;
        else
            u += 0x7fffu + ((u >> 16) & 1); /* round to nearest even */
        ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        break;
    }
    }
}

/* Rounds to the accumulator precision: float32 for every input type except float64. */
static double acc_round(fa_dtype t, double v) { return t == FA_F64 ? v : (double)(float)v; }

void fa_rotary(fa_dtype t, const void *x, const int64_t xs[3], void *y, const int64_t ys[3],
               int64_t b, int64_t s_len, int64_t h, int64_t d, const void *cos, const void *sin,
               int64_t half, const int64_t *pos, int interleaved)
{
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t si = 0; si < s_len; si++) {
            const int64_t p = pos[bi * s_len + si];
            for (int64_t hi = 0; hi < h; hi++) {
                const int64_t xo = bi * xs[0] + si * xs[1] + hi * xs[2];
                const int64_t yo = bi * ys[0] + si * ys[1] + hi * ys[2];
                for (int64_t m = 0; m < half; m++) {
                    const int64_t ia = interleaved ? 2 * m : m;
                    const int64_t ib = interleaved ? 2 * m + 1 : m + half;
                    const double c = load_elem(t, cos, p * half + m);
                    const double s = load_elem(t, sin, p * half + m);
                    const double a = load_elem(t, x, xo + ia), bb = load_elem(t, x, xo + ib);
                    store_elem(t, y, yo + ia, acc_round(t, acc_round(t, a * c) - acc_round(t, bb * s)));
                    store_elem(t, y, yo + ib, acc_round(t, acc_round(t, a * s) + acc_round(t, bb * c)));
                }
                for (int64_t k = 2 * half; k < d; k++)
                    store_elem(t, y, yo + k, load_elem(t, x, xo + k));
            }
        }
}

void fa_combine(fa_dtype tin, fa_dtype t, int n, const void *const *outs, const int64_t (*os)[3],
                const void *const *lses, const int64_t (*ls)[3], void *out, const int64_t ostride[3],
                void *lse, const int64_t lstride[3], int64_t b, int64_t s_len, int64_t h, int64_t d)
{
    const int wide = t == FA_F64;
    for (int64_t bi = 0; bi < b; bi++)
        for (int64_t hi = 0; hi < h; hi++)
            for (int64_t si = 0; si < s_len; si++) {
                double m = -INFINITY;
                for (int i = 0; i < n; i++) {
                    const int64_t o = bi * ls[i][0] + hi * ls[i][1] + si * ls[i][2];
                    double l = wide ? ((const double *)lses[i])[o] : ((const float *)lses[i])[o];
                    if (l < INFINITY && l > m) /* +inf: no visible key, skip */
                        m = l;
                }
                const int64_t oo = bi * ostride[0] + si * ostride[1] + hi * ostride[2];
                const int64_t lo = bi * lstride[0] + hi * lstride[1] + si * lstride[2];
                if (m == -INFINITY) {
                    for (int64_t k = 0; k < d; k++)
                        store_elem(t, out, oo + k, 0.0);
                    if (wide)
                        ((double *)lse)[lo] = INFINITY;
                    else
                        ((float *)lse)[lo] = INFINITY;
                    continue;
                }
                double sum = 0;
                for (int i = 0; i < n; i++) {
                    const int64_t o = bi * ls[i][0] + hi * ls[i][1] + si * ls[i][2];
                    double l = wide ? ((const double *)lses[i])[o] : ((const float *)lses[i])[o];
                    if (l < INFINITY)
                        sum += exp(l - m);
                }
                const double total = m + log(sum);
                for (int64_t k = 0; k < d; k++) {
                    double acc = 0;
                    for (int i = 0; i < n; i++) {
                        const int64_t o = bi * ls[i][0] + hi * ls[i][1] + si * ls[i][2];
                        double l = wide ? ((const double *)lses[i])[o] : ((const float *)lses[i])[o];
                        if (l < INFINITY && l > -INFINITY) {
                            const int64_t po = bi * os[i][0] + si * os[i][1] + hi * os[i][2];
                            acc += exp(l - total) * load_elem(tin, outs[i], po + k);
                        }
                    }
                    store_elem(t, out, oo + k, acc);
                }
                if (wide)
                    ((double *)lse)[lo] = total;
                else
                    ((float *)lse)[lo] = (float)total;
            }
}
