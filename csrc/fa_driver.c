/* fa_driver.c: split an attention call into work items and run them on threads.
 *
 * A work item is (batch, head, block of query rows). Items are ordered by their visible key count,
 * largest first, and handed out dynamically, which balances causal (triangular) and varlen
 * (ragged) work without knowing the thread count in advance. Each thread owns one scratch buffer.
 * Kernels are single-threaded; all threading lives here.
 *
 * Kernels that offer a K/V packing get it once per (batch, kv head) before the items run, when
 * every packed row will be read by at least two items (several query blocks, or a GQA group):
 * the items then stream contiguous, already converted rows instead of re-gathering rows a head
 * stride apart (one page walk per row at BSHD strides) for every query block.
 */
#define _GNU_SOURCE /* madvise */
#include <stdlib.h>
#include <string.h>
#ifdef __linux__
#include <sys/mman.h>
#endif
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_kernels.h"
#include "fa_seq.h"

static int num_threads = 0; /* 0: OpenMP default */

/* Largest packed K/V copy alive at once (bytes): the groups are packed in waves below it. */
#define FA_PACK_BUDGET ((int64_t)48 << 20)

void fa_set_num_threads(int n) { num_threads = n > 0 ? n : 0; }

int fa_get_num_threads(void)
{
    if (num_threads > 0)
        return num_threads;
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

typedef struct {
    int64_t cost;
    int64_t bi, h, q0;
    int64_t wave; /* K/V packing wave (0 when nothing is packed) */
} fa_item;

static int by_wave_then_cost(const void *a, const void *b)
{
    const fa_item *x = a, *y = b;
    if (x->wave != y->wave)
        return x->wave < y->wave ? -1 : 1;
    if (x->cost != y->cost)
        return x->cost > y->cost ? -1 : 1;
    /* Tie-break on position so the order (not the results, which never depend on it) is stable. */
    if (x->bi != y->bi)
        return x->bi < y->bi ? -1 : 1;
    if (x->h != y->h)
        return x->h < y->h ? -1 : 1;
    return x->q0 < y->q0 ? -1 : x->q0 > y->q0;
}

/* Keys visible to rows [q0, q0 + n): the item's cost estimate. */
static int64_t item_cost(const fa_fwd_params *p, const fa_seq *s, int64_t q0, int64_t n)
{
    int64_t lo0, hi0, lo1, hi1;
    fa_row_band(p, s, q0, &lo0, &hi0);
    fa_row_band(p, s, q0 + n - 1, &lo1, &hi1);
    int64_t lo = lo0 < lo1 ? lo0 : lo1, hi = hi0 > hi1 ? hi0 : hi1;
    return n * (hi > lo ? hi - lo : 0) + 1;
}

fa_status fa_fwd(const fa_fwd_params *p)
{
    const fa_isa_table *t = fa_isa_current();
    const fa_fwd_kernel *k = p->dtype == FA_F64                         ? &t->fwd_f64
                             : p->dtype == FA_BF16 && t->fwd_bf16.item ? &t->fwd_bf16
                                                                       : &t->fwd_f32;
    if (!k->item)
        return FA_ERR_ISA;
    const int64_t br = k->block_rows;

    int64_t n = 0;
    for (int64_t bi = 0; bi < p->b; bi++) {
        fa_seq s = fa_seq_of(p, bi);
        n += (s.sq + br - 1) / br * p->h;
    }
    if (n == 0)
        return FA_OK;
    fa_item *items = malloc((size_t)n * sizeof(fa_item));
    if (!items)
        return FA_ERR_NOMEM;
    int64_t at = 0;
    for (int64_t bi = 0; bi < p->b; bi++) {
        fa_seq s = fa_seq_of(p, bi);
        for (int64_t q0 = 0; q0 < s.sq; q0 += br) {
            int64_t rows = s.sq - q0 < br ? s.sq - q0 : br;
            int64_t cost = item_cost(p, &s, q0, rows);
            for (int64_t h = 0; h < p->h; h++)
                items[at++] = (fa_item){cost, bi, h, q0, 0};
        }
    }
    /* Pack K/V when rows are reused: query blocks per sequence times query heads per kv head.
     * The (batch, kv head) groups are packed in waves whose copies fit FA_PACK_BUDGET, one wave
     * after the other, so the extra memory stays bounded (a long sequence's K/V copy alone can
     * be tens of MiB) while every wave still has many items to balance. */
    char *packed = NULL;
    const int64_t groups = p->b * p->hk;
    int64_t *pack_off = NULL, *wave_of = NULL, nwaves = 1;
    if (k->pack) {
        int64_t reuse = p->h / p->hk, maxq = 0;
        for (int64_t bi = 0; bi < p->b; bi++) {
            fa_seq s = fa_seq_of(p, bi);
            maxq = s.sq > maxq ? s.sq : maxq;
        }
        reuse *= (maxq + br - 1) / br;
        if (reuse >= 2) {
            pack_off = malloc((size_t)groups * sizeof(int64_t));
            wave_of = malloc((size_t)groups * sizeof(int64_t));
        }
        if (pack_off && wave_of) {
            int64_t used = 0, widest = 0;
            for (int64_t g = 0; g < groups; g++) {
                fa_seq s = fa_seq_of(p, g / p->hk);
                int64_t one = (int64_t)((k->pack_bytes(p, s.sk) + 63) / 64 * 64);
                if (used > 0 && used + one > FA_PACK_BUDGET) {
                    nwaves++;
                    used = 0;
                }
                pack_off[g] = used;
                wave_of[g] = nwaves - 1;
                used += one;
                widest = used > widest ? used : widest;
            }
            /* 2 MiB alignment lets transparent huge pages back the buffer (fewer TLB misses). */
            const size_t huge = (size_t)2 << 20, size = ((size_t)widest + huge - 1) / huge * huge;
            packed = widest > 0 ? aligned_alloc(huge, size) : NULL;
#ifdef MADV_HUGEPAGE
            if (packed)
                madvise(packed, size, MADV_HUGEPAGE);
#endif
        }
        if (!packed) { /* nothing to share, or no memory for the copy: read K/V in place */
            free(pack_off);
            free(wave_of);
            pack_off = wave_of = NULL;
            nwaves = 1;
        }
    }
    for (int64_t it = 0; it < n; it++)
        items[it].wave = packed ? wave_of[items[it].bi * p->hk + items[it].h / (p->h / p->hk)] : 0;
    qsort(items, (size_t)n, sizeof(fa_item), by_wave_then_cost);

    const size_t bytes = (k->scratch_bytes(p) + 63) / 64 * 64;
    int nt = fa_get_num_threads();
    if (nt > n)
        nt = (int)n;
    volatile int failed = FA_OK;
#pragma omp parallel num_threads(nt)
    {
        void *buf = aligned_alloc(64, bytes);
        if (!buf)
            failed = FA_ERR_NOMEM;
        int64_t g0 = 0, i0 = 0;
        for (int64_t wv = 0; wv < nwaves; wv++) {
            /* This wave's groups and items are consecutive ranges (both sorted by wave). */
            int64_t g1 = g0, i1 = i0;
            while (packed && g1 < groups && wave_of[g1] == wv)
                g1++;
            while (i1 < n && items[i1].wave == wv)
                i1++;
            if (packed) {
#pragma omp for schedule(dynamic, 1)
                for (int64_t g = g0; g < g1; g++)
                    k->pack(p, g / p->hk, g % p->hk, packed + pack_off[g]);
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = i0; it < i1; it++) {
                if (!buf)
                    continue;
                const fa_item *w = &items[it];
                const void *kv =
                    packed ? packed + pack_off[w->bi * p->hk + w->h / (p->h / p->hk)] : NULL;
                fa_status st = k->item(p, w->bi, w->h, w->q0, kv, buf);
                if (st != FA_OK)
                    failed = st;
            }
            g0 = g1;
            i0 = i1;
        }
        free(buf);
    }
    free(packed);
    free(pack_off);
    free(wave_of);
    free(items);
    return (fa_status)failed;
}
