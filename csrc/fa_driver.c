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

/* Largest packed K/V copy the driver makes (bytes). */
#define FA_PACK_MAX_BYTES ((uint64_t)1 << 30)

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
} fa_item;

static int by_cost_desc(const void *a, const void *b)
{
    const fa_item *x = a, *y = b;
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
                items[at++] = (fa_item){cost, bi, h, q0};
        }
    }
    qsort(items, (size_t)n, sizeof(fa_item), by_cost_desc);

    /* Pack K/V when rows are reused: query blocks per sequence times query heads per kv head. */
    char *packed = NULL;
    int64_t *pack_off = NULL;
    if (k->pack) {
        int64_t reuse = p->h / p->hk, maxq = 0, total = 0;
        for (int64_t bi = 0; bi < p->b; bi++) {
            fa_seq s = fa_seq_of(p, bi);
            maxq = s.sq > maxq ? s.sq : maxq;
        }
        reuse *= (maxq + br - 1) / br;
        if (reuse >= 2)
            pack_off = malloc((size_t)(p->b * p->hk + 1) * sizeof(int64_t));
        if (pack_off) {
            for (int64_t bi = 0; bi < p->b; bi++) {
                fa_seq s = fa_seq_of(p, bi);
                size_t one = (k->pack_bytes(p, s.sk) + 63) / 64 * 64;
                for (int64_t g = 0; g < p->hk; g++, total += (int64_t)one)
                    pack_off[bi * p->hk + g] = total;
            }
            pack_off[p->b * p->hk] = total;
            /* 2 MiB alignment lets transparent huge pages back the buffer (fewer TLB misses).
             * Above FA_PACK_MAX_BYTES the copy would cost more memory than it is worth: read in
             * place. */
            const size_t huge = (size_t)2 << 20;
            packed = total > 0 && (uint64_t)total <= FA_PACK_MAX_BYTES
                         ? aligned_alloc(huge, ((size_t)total + huge - 1) / huge * huge)
                         : NULL;
            if (packed) {
#ifdef MADV_HUGEPAGE
                madvise(packed, ((size_t)total + huge - 1) / huge * huge, MADV_HUGEPAGE);
#endif
            } else {
                free(pack_off); /* no memory for the copy: read K/V in place */
                pack_off = NULL;
            }
        }
    }

    const size_t bytes = (k->scratch_bytes(p) + 63) / 64 * 64;
    int nt = fa_get_num_threads();
    if (nt > n)
        nt = (int)n;
    volatile int failed = FA_OK;
#pragma omp parallel num_threads(nt)
    {
        if (packed) {
#pragma omp for schedule(dynamic, 1)
            for (int64_t g = 0; g < p->b * p->hk; g++)
                k->pack(p, g / p->hk, g % p->hk, packed + pack_off[g]);
        }
        void *buf = aligned_alloc(64, bytes);
        if (!buf) {
            failed = FA_ERR_NOMEM;
        }
#pragma omp for schedule(dynamic, 1)
        for (int64_t it = 0; it < n; it++) {
            if (!buf)
                continue;
            const fa_item *w = &items[it];
            const void *kv = packed ? packed + pack_off[w->bi * p->hk + w->h / (p->h / p->hk)] : NULL;
            fa_status st = k->item(p, w->bi, w->h, w->q0, kv, buf);
            if (st != FA_OK)
                failed = st;
        }
        free(buf);
    }
    free(packed);
    free(pack_off);
    free(items);
    return (fa_status)failed;
}
