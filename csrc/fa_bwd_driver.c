/* fa_bwd_driver.c: run the backward on threads.
 *
 * Three phases in one OpenMP region (per panel, below), separated by the barriers of its
 * work-sharing loops:
 *   1. prep over (batch, head, query block) and, for kernels that have one, packk over (batch,
 *      kv head, key block): D, the row statistics, and Q, dO (and K, V) converted once to the
 *      accumulator type in the kernels' layouts (the workspace: O(S d), the only extra memory
 *      besides one block scratch per thread). Kernels without packk (the FMA family) convert
 *      K/V inside their dkdv items, and the driver then allocates no K/V workspace;
 *   2. dkdv over (batch, kv head, chunk of key blocks): each item owns its dK/dV rows (GQA groups
 *      included) and its chunk's dQ partial sums;
 *   3. dq over (batch, head, query block): each item adds its rows' partial sums in chunk order.
 * No output element is touched by two items and every item sums in a fixed order, so the results
 * are bitwise identical for any thread count. Items are handed out dynamically, costliest first
 * (causal and varlen work is uneven), as the forward driver does.
 *
 * Panels (memory): Q, dO and the dQ partial sums grow as (2 + nch) * rows * heads * d. Past a byte
 * budget (48 MiB, fa_bwd_set_panel_budget) the three phases run once per panel of query positions
 * [p0, p0 + pn) of every sequence, on workspace for that panel's rows only, so the backward's extra
 * memory stays near the budget at any length (M1: 387 MiB at S = 32768 before, ~57 MiB with panels).
 * dK/dV cross panels through the outputs: the first panel's dkdv items start them at zero and store
 * them, each later one loads what the previous stored and continues the same sums (exact only when
 * the outputs are in the accumulator type: float32 and float64 on the FMA kernels; bf16/f16 and the
 * AMX kernel always run one panel). pn is a whole number of query blocks, so every dK/dV and dQ
 * block sums the same block products in the same order as with one panel: with one query head per
 * kv head the bits are the same; with GQA the group's heads enter each dK/dV block panel by panel.
 * The extra work is one K/V conversion per panel and a dK/dV round trip through the outputs.
 *
 * Chunks: pass 2 has batch * kv heads * nch items. nch grows as batch * kv heads shrinks, so that
 * one long sequence with few heads still yields at least FA_BWD_MIN_ITEMS items for the cores,
 * while many heads use one chunk (no extra partial sums). On a machine with many processors it
 * also offers two items per processor, with at most FA_BWD_PROC_CHUNKS chunks from that rule
 * (bwd_chunks). nch depends on the problem and on the processors the process may use (counted
 * once), never on the thread count, which keeps the dQ summation order, and so the bits, fixed for
 * every thread count on a machine (as the kernel family does already). Chunk c takes key blocks c,
 * c + nch, ..., which spreads a causal band's cost evenly over the chunks.
 *
 * The kernel family follows the forward's selection (fa_isa_selected). bf16 inputs on AMX take the
 * tile kernel (fa_bwd_bf16__amx.c, its own workspace layout); every other dtype on a family without
 * a backward build of its own (AMX) uses the best one below it.
 */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

#include "fa_bwd_params.h"
#include "fa_kernels.h"
#include "fa_seq.h"
#include "fa_workspace.h"

#ifndef FA_BWD_MIN_ITEMS /* overridable for experiments: -DFA_BWD_MIN_ITEMS=n */
#define FA_BWD_MIN_ITEMS 16
#endif
/* The most chunks the per-processor rule asks for: each chunk adds a full set of dQ partial sums
 * (memory, zeroing, one more term in the dq pass; for float32 past the budget, more panels). */
#define FA_BWD_PROC_CHUNKS 4

/* fa_bwd_impl.h's kernels pack K/V in their dkdv items: no packk. */
#define BWD_KERNEL_NOPACK(name)                                                                    \
    {name##_prep,    NULL,             name##_dkdv,                                               \
     name##_dq,      name##_scratch,   FA_BWD_BLOCK_ROWS,                                         \
     FA_BWD_BLOCK_KEYS, NULL}

static const fa_bwd_kernel bwd_tables[FA_ISA_COUNT][2] = {
    [FA_ISA_SCALAR] = {BWD_KERNEL_NOPACK(fa_bwd_f32__scalar), BWD_KERNEL_NOPACK(fa_bwd_f64__scalar)},
    [FA_ISA_AVX2] = {BWD_KERNEL_NOPACK(fa_bwd_f32__avx2), BWD_KERNEL_NOPACK(fa_bwd_f64__avx2)},
    [FA_ISA_AVX512] = {BWD_KERNEL_NOPACK(fa_bwd_f32__avx512), BWD_KERNEL_NOPACK(fa_bwd_f64__avx512)},
};

static const fa_bwd_kernel bwd_bf16_amx = {
    fa_bwd_bf16__amx_prep, fa_bwd_bf16__amx_packk,   fa_bwd_bf16__amx_dkdv,
    fa_bwd_bf16__amx_dq,   fa_bwd_bf16__amx_scratch, FA_BWD_AMX_ROWS,
    FA_BWD_AMX_KEYS,       fa_bwd_bf16__amx_ws_sizes};

static const fa_bwd_kernel *bwd_kernel(fa_dtype t)
{
    int isa = (int)fa_isa_selected(), f64 = t == FA_F64;
    if (isa == FA_ISA_AMX && t == FA_BF16)
        return &bwd_bf16_amx;
    while (isa > 0 && !bwd_tables[isa][f64].dkdv)
        isa--;
    return &bwd_tables[isa][f64];
}

typedef struct {
    int64_t cost;
    int64_t bi, h, x0; /* batch, head (kv head for dkdv), first row or key */
} bwd_item;

static int by_cost_desc(const void *a, const void *b)
{
    const bwd_item *x = a, *y = b;
    if (x->cost != y->cost)
        return x->cost > y->cost ? -1 : 1;
    if (x->bi != y->bi)
        return x->bi < y->bi ? -1 : 1;
    if (x->h != y->h)
        return x->h < y->h ? -1 : 1;
    return x->x0 < y->x0 ? -1 : x->x0 > y->x0;
}

/* Visible (row, key) pairs of rows [q0, q0 + n) within keys [k0, k1), estimated from the first and
 * last row of each 64-row block (bands are nearly monotone; only the schedule depends on this). */
static int64_t pairs(const fa_fwd_params *p, const fa_seq *s, int64_t q0, int64_t n, int64_t k0,
                     int64_t k1)
{
    int64_t total = 0;
    for (int64_t r0 = q0; r0 < q0 + n; r0 += 64) {
        int64_t m = q0 + n - r0 < 64 ? q0 + n - r0 : 64, lo0, hi0, lo1, hi1;
        fa_row_band(p, s, r0, &lo0, &hi0);
        fa_row_band(p, s, r0 + m - 1, &lo1, &hi1);
        int64_t lo = lo0 < lo1 ? lo0 : lo1, hi = hi0 > hi1 ? hi0 : hi1;
        lo = lo > k0 ? lo : k0;
        hi = hi < k1 ? hi : k1;
        total += hi > lo ? m * (hi - lo) : 0;
    }
    return total;
}

/* Bytes of Q, dO and dQ partial sums above which the backward goes in panels (see the header). */
static size_t panel_budget = (size_t)48 << 20;

/* What the last call did (fa_bwd_last_plan): written once per call, for tests and tuning. */
static int64_t last_panels, last_panel_rows, last_ws_bytes, last_chunks;

/* Processors for the chunk rule: 0 until counted (omp_get_num_procs, once per process), or what
 * fa_bwd_set_procs gave (tests and tuning). */
static int64_t bwd_procs;

int64_t fa_bwd_set_procs(int64_t n)
{
    return __atomic_exchange_n(&bwd_procs, n, __ATOMIC_RELAXED);
}

static int64_t procs(void)
{
    int64_t n = __atomic_load_n(&bwd_procs, __ATOMIC_RELAXED);
    if (n < 1) {
        n = omp_get_num_procs();
        n = n < 1 ? 1 : n;
        __atomic_store_n(&bwd_procs, n, __ATOMIC_RELAXED);
    }
    return n;
}

/* Chunks per (batch, kv head) for the dkdv pass (see the header). 16 equal items on 16 threads
 * leave nothing to balance: the lent 16-processor machine ran the T1 backward (b1, h16) 15-19%
 * faster with 2-4 chunks at 16 threads, while the extra partial sums cost 1-5% at 1-2 threads
 * (NOTES.md, eighth session); two items per processor takes the first only where there are
 * many processors. */
static int64_t bwd_chunks(const fa_fwd_params *f, int64_t max_kb)
{
    const int64_t bh = f->b * f->hk;
    int64_t nch = (FA_BWD_MIN_ITEMS + bh - 1) / bh, per = (2 * procs() + bh - 1) / bh;
    per = per < FA_BWD_PROC_CHUNKS ? per : FA_BWD_PROC_CHUNKS;
    nch = nch > per ? nch : per;
    return nch < max_kb ? nch : max_kb;
}

size_t fa_bwd_set_panel_budget(size_t bytes)
{
    return __atomic_exchange_n(&panel_budget, bytes, __ATOMIC_RELAXED);
}

size_t fa_bwd_panel_budget(void) { return __atomic_load_n(&panel_budget, __ATOMIC_RELAXED); }

void fa_bwd_last_plan(int64_t *panels, int64_t *panel_rows, int64_t *ws_bytes, int64_t *chunks)
{
    *chunks = __atomic_load_n(&last_chunks, __ATOMIC_RELAXED);
    *panels = __atomic_load_n(&last_panels, __ATOMIC_RELAXED);
    *panel_rows = __atomic_load_n(&last_panel_rows, __ATOMIC_RELAXED);
    *ws_bytes = __atomic_load_n(&last_ws_bytes, __ATOMIC_RELAXED);
}

/* Query positions per panel: every position (one panel) unless the FMA kernels' Q, dO and dQ
 * partial sums, per_row bytes per workspace row, would exceed the budget and the outputs can carry
 * dK/dV from one panel to the next (they are in the accumulator type). A whole number of query
 * blocks, so each panel's blocks are the single-panel ones. Depends on the problem only. */
static int64_t panel_rows(const fa_bwd_params *p, const fa_bwd_kernel *k, int64_t rows,
                          int64_t max_sq, size_t per_row)
{
    const fa_fwd_params *f = &p->f;
    const int64_t br = k->block_rows;
    if (max_sq < 1)
        return 1;
    const size_t budget = __atomic_load_n(&panel_budget, __ATOMIC_RELAXED);
    if (k->ws_sizes || (f->dtype != FA_F32 && f->dtype != FA_F64) ||
        per_row * (size_t)(rows + 8) <= budget)
        return max_sq;
    int64_t pn = (int64_t)(budget / (per_row * (size_t)f->b)) / br * br;
    pn = pn < br ? br : pn;
    return pn < max_sq ? pn : max_sq;
}

/* Workspace rows of the panel at p0: each sequence's rows among [p0, p0 + pn), sequence after
 * sequence (prow[bi]: where sequence bi's start). One panel keeps the statistics' row indices
 * (a varlen cu_q may not start at 0), so it spans all `rows`. */
static int64_t panel_layout(const fa_fwd_params *f, int64_t rows, int64_t max_sq, int64_t p0,
                            int64_t pn, int64_t *prow)
{
    int64_t n = 0;
    for (int64_t bi = 0; bi < f->b; bi++) {
        int64_t sq = fa_seq_of(f, bi).sq, m = sq - p0 < pn ? sq - p0 : pn;
        if (prow)
            prow[bi] = pn >= max_sq ? (f->cu_q ? f->cu_q[bi] : bi * f->sq) : n;
        n += m > 0 ? m : 0;
    }
    return pn >= max_sq ? rows : n;
}

fa_status fa_bwd(const fa_bwd_params *p)
{
    const fa_fwd_params *f = &p->f;
    const fa_bwd_kernel *k = bwd_kernel(f->dtype);
    const int64_t br = k->block_rows, bc = k->block_keys, G = f->h / f->hk;
    const size_t acc = f->dtype == FA_F64 ? 8 : 4;

    const int pack = k->packk != NULL;
    int64_t rows = f->cu_q ? f->cu_q[f->b] : f->b * f->sq;
    int64_t nq = 0, npk = 0, nkb = 0, max_kb = 1, max_sq = 0;
    for (int64_t bi = 0; bi < f->b; bi++) {
        fa_seq s = fa_seq_of(f, bi);
        int64_t kb = (s.sk + bc - 1) / bc;
        nq += (s.sq + br - 1) / br * f->h;
        nkb += kb * f->hk;
        npk += pack ? kb * f->hk : 0;
        max_kb = kb > max_kb ? kb : max_kb;
        max_sq = s.sq > max_sq ? s.sq : max_sq;
    }
    if (nq + nkb == 0)
        return FA_OK;
    const int64_t nch = bwd_chunks(f, max_kb);
    const int64_t nk = f->b * f->hk * nch;

    /* Workspace sizes, in accumulators: Q, dO and dQ partials for the first (largest) panel. */
    const int64_t dp = FA_BWD_DPAD(f->d);
    const int64_t pn = panel_rows(p, k, rows, max_sq, (size_t)((2 + nch) * f->h * dp) * acc);
    const int64_t qstride = panel_layout(f, rows, max_sq, 0, pn, NULL) + 8; /* >= rows + FA_MR - 1: the last block's padding rows */
    const int64_t krows = f->cu_k ? f->cu_k[f->b] : f->b * f->sk;
    int64_t *kblk = malloc((size_t)(3 * f->b + 1) * sizeof(int64_t)), *qblk = kblk + f->b;
    int64_t *prow = kblk + 2 * f->b + 1;
    int64_t blocks = 0, qblocks = 0;
    for (int64_t bi = 0; kblk && bi < f->b; bi++) {
        fa_seq s = fa_seq_of(f, bi);
        kblk[bi] = blocks;
        blocks += (s.sk + bc - 1) / bc;
        qblk[bi] = qblocks;
        qblocks += (s.sq + br - 1) / br;
    }
    fa_bwd_ws ws;
    ws.rows = rows, ws.qstride = qstride, ws.krows = krows, ws.blocks = blocks, ws.dpad = dp;
    ws.nch = nch, ws.qblocks = qblocks;
    ws.kblk = kblk, ws.qblk = qblk, ws.prow = prow, ws.pn = pn;
    const size_t n_stat = (size_t)(rows * f->h), n_q = (size_t)(f->h * qstride * dp),
                 n_kt = pack ? (size_t)(f->hk * blocks * f->d * bc) : 0,
                 n_kr = pack ? (size_t)(f->hk * krows * dp) : 0;
    size_t sz[6] = {n_q * acc, n_q * acc, n_kt * acc, n_kt * acc, n_kr * acc, nch * n_q * acc};
    if (k->ws_sizes)
        k->ws_sizes(p, &ws, sz);
    bwd_item *qi = malloc((size_t)(nq + nk + npk) * sizeof(bwd_item));
    /* The workspace (tens of MB) comes from the drivers' cache (fa_workspace.h): warm pages when
     * the previous call's fit. Every array starts on a cache line. */
    size_t ws_bytes = 3 * ((n_stat * acc + 63) / 64 * 64), ws_cap = 0;
    for (int i = 0; i < 6; i++)
        ws_bytes += (sz[i] + 63) / 64 * 64;
    char *wsbuf = fa_ws_take(ws_bytes, &ws_cap);
    if (!qi || !wsbuf || !kblk) {
        free(qi);
        fa_ws_give(wsbuf, ws_cap);
        free(kblk);
        return FA_ERR_NOMEM;
    }
    char *at = wsbuf;
    void **arrays[9] = {&ws.D, &ws.m, &ws.il, &ws.Q, &ws.dO, &ws.Kt, &ws.Vt, &ws.Kr, &ws.dQp};
    for (int i = 0; i < 9; i++) {
        *arrays[i] = at;
        at += ((i < 3 ? n_stat * acc : sz[i - 3]) + 63) / 64 * 64;
    }
    if (!pack)
        ws.Kt = ws.Vt = ws.Kr = NULL;

    const size_t bytes = (k->scratch_bytes(p) + 63) / 64 * 64;
    __atomic_store_n(&last_panels, (max_sq + pn - 1) / pn > 1 ? (max_sq + pn - 1) / pn : 1, __ATOMIC_RELAXED);
    __atomic_store_n(&last_panel_rows, pn, __ATOMIC_RELAXED);
    __atomic_store_n(&last_ws_bytes, (int64_t)ws_bytes, __ATOMIC_RELAXED);
    __atomic_store_n(&last_chunks, nch, __ATOMIC_RELAXED);
    volatile int failed = FA_OK;
    int64_t p0 = 0;
    do {
        const int64_t prows = panel_layout(f, rows, max_sq, p0, pn, prow);
        ws.p0 = p0;
        /* Rows past the panel's last query row are read as block padding: make them zeros, not
         * garbage (or the previous panel's rows). */
        const int64_t pad = qstride - prows < 8 ? qstride - prows : 8;
        for (int64_t h = 0; !k->ws_sizes && h < f->h; h++) {
            memset((char *)ws.Q + (size_t)((h * qstride + prows) * dp) * acc, 0, (size_t)(pad * dp) * acc);
            memset((char *)ws.dO + (size_t)((h * qstride + prows) * dp) * acc, 0, (size_t)(pad * dp) * acc);
        }

        int64_t a = 0, b = 0, c = 0;
        bwd_item *ki = qi + nq, *pk = ki + nk;
        for (int64_t bi = 0; bi < f->b; bi++) {
            fa_seq s = fa_seq_of(f, bi);
            const int64_t p1 = s.sq - p0 < pn ? s.sq : p0 + pn;
            for (int64_t q0 = p0; q0 < p1; q0 += br) {
                int64_t n = p1 - q0 < br ? p1 - q0 : br;
                int64_t cost = pairs(f, &s, q0, n, 0, s.sk) + n;
                for (int64_t h = 0; h < f->h; h++)
                    qi[a++] = (bwd_item){cost, bi, h, q0};
            }
            for (int64_t ch = 0; ch < nch; ch++) {
                int64_t cost = p1 > p0 ? p1 - p0 : 0;
                for (int64_t k0 = ch * bc; p1 > p0 && k0 < s.sk; k0 += nch * bc) {
                    int64_t k1 = s.sk - k0 < bc ? s.sk : k0 + bc;
                    cost += G * pairs(f, &s, p0, p1 - p0, k0, k1) + (k1 - k0);
                }
                for (int64_t hk = 0; hk < f->hk; hk++)
                    ki[b++] = (bwd_item){cost, bi, hk, ch};
            }
            for (int64_t k0 = 0; pack && k0 < s.sk; k0 += bc)
                for (int64_t hk = 0; hk < f->hk; hk++)
                    pk[c++] = (bwd_item){0, bi, hk, k0};
        }
        const int64_t nqp = a; /* query items of this panel */
        qsort(qi, (size_t)nqp, sizeof(bwd_item), by_cost_desc);
        qsort(ki, (size_t)nk, sizeof(bwd_item), by_cost_desc);

        int64_t most = nqp > nk ? nqp : nk;
        most = most > npk ? most : npk;
        int nt = fa_get_num_threads();
        if (nt > most)
            nt = (int)most;
#pragma omp parallel num_threads(nt)
        {
            void *buf = aligned_alloc(64, bytes);
            if (!buf)
                failed = FA_ERR_NOMEM;
            /* The loops below always run to their barriers, even after a failure, so no thread
             * waits forever; a failed allocation only skips work. */
#pragma omp for schedule(dynamic, 1) nowait
            for (int64_t it = 0; it < nqp; it++)
                k->prep(p, &ws, qi[it].bi, qi[it].h, qi[it].x0, br);
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < npk; it++)
                k->packk(p, &ws, pk[it].bi, pk[it].h, pk[it].x0);
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < nk; it++) {
                if (!buf || failed != FA_OK)
                    continue;
                fa_status st = k->dkdv(p, &ws, ki[it].bi, ki[it].h, ki[it].x0, buf);
                if (st != FA_OK)
                    failed = st;
            }
#pragma omp for schedule(dynamic, 1)
            for (int64_t it = 0; it < nqp; it++) {
                if (!buf || failed != FA_OK)
                    continue;
                fa_status st = k->dq(p, &ws, qi[it].bi, qi[it].h, qi[it].x0, buf);
                if (st != FA_OK)
                    failed = st;
            }
            free(buf);
        }
        p0 += pn;
    } while (p0 < max_sq && failed == FA_OK);
    free(qi);
    fa_ws_give(wsbuf, ws_cap);
    free(kblk);
    return (fa_status)failed;
}
