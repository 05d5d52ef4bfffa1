/* fa_driver.c: split an attention call into work items and run them on threads.
 *
 * A work item is (batch, head, block of query rows). Items are ordered by their visible key count,
 * largest first, and handed out dynamically, which balances causal (triangular) and varlen
 * (ragged) work without knowing the thread count in advance. Each thread owns one scratch buffer.
 * Kernels are single-threaded; all threading lives here. A kernel marked all_heads (the decode
 * kernel) takes one item per (batch, query block) covering every head instead.
 *
 * Kernels that offer a K/V packing get it once per (batch, kv head) before the items run, when
 * every packed row will be read by at least two items (several query blocks, or a GQA group):
 * the items then stream contiguous, already converted rows instead of re-gathering rows a head
 * stride apart (one page walk per row at BSHD strides) for every query block.
 */
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "fa_aux.h"
#include "fa_kernels.h"
#include "fa_seq.h"
#include "fa_workspace.h"

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
    int64_t wave;  /* K/V packing wave (0 when nothing is packed) */
    int64_t split; /* index into the params array (split-KV), else 0 */
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

/* Decoding-shaped calls (at most FA_DECODE_ROWS queries per sequence) go to the ISA's decode
 * kernel when it has one and the call uses nothing it leaves out (S_dmask, f64 inputs): it
 * streams K/V once, in memory order, instead of the prefill kernels' block machinery. Sequences
 * of a varlen call are bounded by p->sq, which the binding sets to the longest. */
static int decode_fits(const fa_fwd_params *p)
{
    return p->sq <= FA_DECODE_ROWS && p->dtype != FA_F64 && !p->s_dmask;
}

static const fa_fwd_kernel *kernel_for(const fa_fwd_params *p)
{
    const fa_isa_table *t = fa_isa_current();
    if (t->fwd_decode.item && decode_fits(p))
        return &t->fwd_decode;
    return p->dtype == FA_F64                         ? &t->fwd_f64
           : (p->dtype == FA_BF16 || p->dtype == FA_F16) && t->fwd_bf16.item ? &t->fwd_bf16
                                                                             : &t->fwd_f32;
}

/* Heads per work item's head loop: all of them in one item, or one item per head. */
static int64_t item_heads(const fa_fwd_params *p, const fa_fwd_kernel *k)
{
    return k->all_heads ? 1 : p->h;
}

static int64_t count_items(const fa_fwd_params *p, const fa_fwd_kernel *k)
{
    const int64_t br = k->block_rows;
    int64_t n = 0;
    for (int64_t bi = 0; bi < p->b; bi++) {
        fa_seq s = fa_seq_of(p, bi);
        n += (s.sq + br - 1) / br * item_heads(p, k);
    }
    return n;
}

/* Runs the work items of nsplit parameter sets (one, or the key ranges of a split-KV call) in
 * one parallel region. */
static fa_status run_items(const fa_fwd_params *ps, int64_t nsplit)
{
    const fa_fwd_params *p = &ps[0];
    const fa_fwd_kernel *k = kernel_for(p);
    if (!k->item)
        return FA_ERR_ISA;
    const int64_t br = k->block_rows;

    const int64_t n = count_items(p, k) * nsplit;
    if (n == 0)
        return FA_OK;
    fa_item *items = malloc((size_t)n * sizeof(fa_item));
    if (!items)
        return FA_ERR_NOMEM;
    int64_t at = 0;
    for (int64_t sp = 0; sp < nsplit; sp++) {
        for (int64_t bi = 0; bi < p->b; bi++) {
            fa_seq s = fa_seq_of(&ps[sp], bi);
            for (int64_t q0 = 0; q0 < s.sq; q0 += br) {
                int64_t rows = s.sq - q0 < br ? s.sq - q0 : br;
                int64_t cost = item_cost(&ps[sp], &s, q0, rows);
                for (int64_t h = 0; h < item_heads(p, k); h++)
                    items[at++] = (fa_item){cost, bi, h, q0, 0, sp};
            }
        }
    }
    /* Pack K/V when rows are reused: query blocks per sequence times query heads per kv head.
     * The (batch, kv head) groups are packed in waves whose copies fit FA_PACK_BUDGET, one wave
     * after the other, so the extra memory stays bounded (a long sequence's K/V copy alone can
     * be tens of MiB) while every wave still has many items to balance. */
    char *packed = NULL;
    size_t packed_cap = 0;
    const int64_t groups = p->b * p->hk;
    int64_t *pack_off = NULL, *wave_of = NULL, nwaves = 1;
    if (k->pack && nsplit == 1) {
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
            packed = widest > 0 ? fa_ws_take((size_t)widest, &packed_cap) : NULL;
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
                fa_status st = k->item(&ps[w->split], w->bi, w->h, w->q0, kv, buf);
                if (st != FA_OK)
                    failed = st;
            }
            g0 = g1;
            i0 = i1;
        }
        free(buf);
    }
    fa_ws_give(packed, packed_cap);
    free(pack_off);
    free(wave_of);
    free(items);
    return (fa_status)failed;
}

/* Split-KV: how many key ranges a call runs as. Few work items (decoding: a handful of heads and
 * one query block each) cannot fill the cores, so the keys are split and the partial results
 * merged exactly through their log-sum-exp. The automatic choice depends on the problem only,
 * never on the thread count, so results are the same for any thread count. Calls whose rows need
 * more than (out, lse) to merge (statistics outputs, S_dmask, sink, explicit masks and biases with
 * finite fills) and varlen calls are not split. */
#define FA_SPLIT_TARGET_ITEMS 32
#define FA_SPLIT_MIN_KEYS 256

static int64_t split_count(const fa_fwd_params *p)
{
    if (p->num_splits == 1 || p->cu_q || p->s_dmask || p->rowmax || p->sink || p->mask ||
        p->pse || p->invalid_line_zero || p->kclip_hi > p->kclip_lo || p->sk < 2)
        return 1;
    const fa_fwd_kernel *k = kernel_for(p);
    int64_t ns = p->num_splits;
    if (ns <= 0) {
        /* Automatic splits are for decoding-sized queries (one query block per sequence), where
         * the key range is the only parallelism left. */
        const int64_t n = k->item ? count_items(p, k) : 0;
        if (n == 0 || n >= FA_SPLIT_TARGET_ITEMS || p->sq > k->block_rows)
            return 1;
        ns = (FA_SPLIT_TARGET_ITEMS + n - 1) / n;
        if (ns > p->sk / FA_SPLIT_MIN_KEYS)
            ns = p->sk / FA_SPLIT_MIN_KEYS;
    }
    if (ns > 128)
        ns = 128;
    if (ns > p->sk)
        ns = p->sk;
    return ns < 1 ? 1 : ns;
}

static fa_status run_split(const fa_fwd_params *p, int64_t ns)
{
    const fa_dtype at = p->dtype == FA_F64 ? FA_F64 : FA_F32;
    const int64_t es = fa_dtype_size(at), rows = p->sq, b = p->b, h = p->h, d = p->d;
    const int64_t per_out = b * rows * h * d, per_lse = b * h * rows;
    fa_fwd_params *ps = malloc((size_t)ns * sizeof(fa_fwd_params));
    char *part = malloc((size_t)(ns * per_out * es));
    char *plse = malloc((size_t)((ns + 1) * per_lse * es));
    const void **outs = malloc((size_t)ns * sizeof(void *));
    const void **lses = malloc((size_t)ns * sizeof(void *));
    int64_t(*os)[3] = malloc((size_t)ns * sizeof(*os));
    int64_t(*ls)[3] = malloc((size_t)ns * sizeof(*ls));
    fa_status st = FA_ERR_NOMEM;
    if (ps && part && plse && outs && lses && os && ls) {
        const int64_t chunk = (p->sk + ns - 1) / ns;
        for (int64_t i = 0; i < ns; i++) {
            ps[i] = *p;
            ps[i].num_splits = 1;
            ps[i].kclip_lo = i * chunk;
            ps[i].kclip_hi = (i + 1) * chunk < p->sk ? (i + 1) * chunk : p->sk;
            if (ps[i].kclip_hi <= ps[i].kclip_lo) /* an empty tail split: sees no key */
                ps[i].kclip_lo = ps[i].kclip_hi = p->sk, ps[i].kclip_hi++;
            ps[i].out_acc = 1;
            ps[i].o = part + i * per_out * es;
            ps[i].o_sb = rows * h * d, ps[i].o_sr = h * d, ps[i].o_sh = d;
            ps[i].lse = plse + i * per_lse * es;
            ps[i].lse_sb = h * rows, ps[i].lse_sh = rows, ps[i].lse_sr = 1;
            outs[i] = ps[i].o, lses[i] = ps[i].lse;
            os[i][0] = ps[i].o_sb, os[i][1] = ps[i].o_sr, os[i][2] = ps[i].o_sh;
            ls[i][0] = ps[i].lse_sb, ls[i][1] = ps[i].lse_sh, ls[i][2] = ps[i].lse_sr;
        }
        st = run_items(ps, ns);
        if (st == FA_OK) {
            /* The merged lse goes to the caller's array, or to scratch when none was asked for. */
            const int64_t ost[3] = {p->o_sb, p->o_sr, p->o_sh};
            int64_t lst[3] = {p->lse_sb, p->lse_sh, p->lse_sr};
            void *lse = p->lse;
            if (!lse) {
                lse = plse + ns * per_lse * es;
                lst[0] = h * rows, lst[1] = rows, lst[2] = 1;
            }
            fa_combine(at, p->dtype, (int)ns, outs, (const int64_t(*)[3])os, lses,
                       (const int64_t(*)[3])ls, p->o, ost, lse, lst, b, rows, h, d);
        }
    }
    free(ps);
    free(part);
    free(plse);
    free(outs);
    free(lses);
    free(os);
    free(ls);
    return st;
}

fa_status fa_fwd(const fa_fwd_params *p)
{
    const int64_t ns = split_count(p);
    return ns > 1 ? run_split(p, ns) : run_items(p, 1);
}
