/* fa_seq.h: per-sequence geometry shared by the driver and every kernel.
 *
 * Turns the params' fixed/varlen/paged/kvcache variants into one description of batch element
 * `bi`: its query and key lengths, where its rows live, and the visible key range [lo, hi) of
 * each query row (the one masking vocabulary of DESIGN.md).
 */
#ifndef FA_SEQ_H
#define FA_SEQ_H

#include "fa_params.h"

typedef struct {
    int64_t bi;        /* batch element */
    int64_t sq, sk;    /* its query and key counts */
    int64_t q_row0;    /* packed row of its first query (varlen), else 0 */
    int64_t q_batch;   /* batch index into q/o (0 when varlen) */
    int64_t k_row0;    /* physical row of logical key 0 (varlen offset + leftpad) */
    int64_t k_batch;   /* batch index into k/v (cache_batch_idx), 0 when varlen */
} fa_seq;

static inline fa_seq fa_seq_of(const fa_fwd_params *p, int64_t bi)
{
    fa_seq s;
    s.bi = bi;
    if (p->cu_q) {
        s.sq = p->cu_q[bi + 1] - p->cu_q[bi];
        s.q_row0 = p->cu_q[bi];
        s.q_batch = 0;
    } else {
        s.sq = p->sq;
        s.q_row0 = 0;
        s.q_batch = bi;
    }
    if (p->cu_k) {
        s.sk = p->cu_k[bi + 1] - p->cu_k[bi];
        s.k_row0 = p->cu_k[bi];
        s.k_batch = 0;
    } else {
        s.sk = p->sk;
        s.k_row0 = 0;
        s.k_batch = p->k_batch_idx ? p->k_batch_idx[bi] : bi;
    }
    if (p->seqlen_k)
        s.sk = p->seqlen_k[bi];
    if (p->k_start)
        s.k_row0 += p->k_start[bi];
    return s;
}

/* Visible keys [*lo, *hi) of query row i (0-based within the sequence). Empty when lo >= hi. */
static inline void fa_row_band(const fa_fwd_params *p, const fa_seq *s, int64_t i, int64_t *lo,
                               int64_t *hi)
{
    int64_t diag = i + (p->anchor_br ? s->sk - s->sq : 0);
    int64_t l = p->left == FA_UNBOUNDED ? 0 : diag - p->left;
    int64_t h = p->right == FA_UNBOUNDED ? s->sk : diag + p->right + 1;
    if (l < 0)
        l = 0;
    if (h > s->sk)
        h = s->sk;
    if (p->prefix && l <= 0) {
        /* Prefix modes pair a causal band (lo = 0) with keys [0, prefix): a union that stays an
         * interval. */
        int64_t pre = p->prefix[s->bi] < s->sk ? p->prefix[s->bi] : s->sk;
        if (pre > h)
            h = pre;
    }
    if (p->kclip_hi > p->kclip_lo) { /* one split of a split-KV call */
        l = l > p->kclip_lo ? l : p->kclip_lo;
        h = h < p->kclip_hi ? h : p->kclip_hi;
    }
    if (h < l)
        h = l;
    *lo = l;
    *hi = h;
}

/* Element pointer of logical key j (0 <= j < sk) of head hk in view v (k or v). */
static inline const char *fa_key_ptr(const fa_fwd_params *p, const fa_view *v, const fa_seq *s,
                                     int64_t j, int64_t hk, int64_t esize)
{
    int64_t phys = s->k_row0 + j;
    int64_t off;
    if (p->block_table) {
        int64_t blk = p->block_table[s->bi * p->bt_stride + phys / p->page];
        off = blk * v->sb + (phys % p->page) * v->sr;
    } else {
        off = s->k_batch * v->sb + phys * v->sr;
    }
    return (const char *)v->ptr + (off + hk * v->sh) * esize;
}

static inline int64_t fa_dtype_size(fa_dtype t)
{
    return t == FA_F64 ? 8 : t == FA_F32 ? 4 : 2;
}

/* The dtype a kernel writes o in: the input dtype, or the accumulator's for split-KV partials. */
static inline fa_dtype fa_out_dtype(const fa_fwd_params *p)
{
    return p->out_acc ? (p->dtype == FA_F64 ? FA_F64 : FA_F32) : p->dtype;
}

#endif
