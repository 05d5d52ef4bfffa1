/* fa_params.h: the kernel ABI of flash_attn_c.
 *
 * Everything a forward attention call needs, as plain pointers, element strides and sizes. The
 * Python binding fills one of these; the driver splits it into work items; the per-ISA kernels
 * read it. Nothing here knows about Python or NumPy.
 *
 * Layout vocabulary: every tensor is addressed as (batch, row, head, col) with element strides.
 * Layouts such as BSND, BNSD, SBH or packed qkv are only different stride sets. Variable-length
 * batches (cu_seqlens) replace the batch stride by a row offset; paged K/V replace the row address
 * by a block-table lookup.
 */
#ifndef FA_PARAMS_H
#define FA_PARAMS_H

#include <stdint.h>

typedef enum { FA_F32 = 0, FA_F16 = 1, FA_BF16 = 2, FA_F64 = 3 } fa_dtype;

typedef enum {
    FA_OK = 0,
    FA_ERR_NOMEM = 1, /* scratch allocation failed */
    FA_ERR_ARG = 2,   /* inconsistent parameters (the binding should have caught it) */
    FA_ERR_ISA = 3,   /* no kernel for this dtype on the selected ISA */
} fa_status;

/* Sentinel for an unbounded side of a band. */
#define FA_UNBOUNDED INT64_MIN

/* One tensor view: base pointer plus element strides. */
typedef struct {
    const void *ptr;
    int64_t sb, sr, sh; /* batch, row (sequence position), head; the last dim is contiguous */
} fa_view;

typedef struct {
    fa_dtype dtype; /* of q, k, v and o */

    fa_view q, k, v;
    void *o;
    int64_t o_sb, o_sr, o_sh;

    int64_t b, h, hk, d; /* batch, query heads, kv heads, head dim */
    int64_t sq, sk;      /* fixed-length sizes; upper bounds when varlen */

    /* Variable length: sequence i has rows [cu_q[i], cu_q[i+1]) of the packed tensors. The batch
     * stride of q/k/v/o is then ignored. NULL for fixed length. */
    const int64_t *cu_q, *cu_k;
    /* Optional per-batch number of keys used (kvcache: cache_seqlens (+ new)); NULL = all. */
    const int64_t *seqlen_k;
    /* Optional per-batch first key (kvcache leftpad); keys before it do not exist. */
    const int64_t *k_start;
    /* Optional per-batch index into k/v's batch dim (kvcache cache_batch_idx). */
    const int64_t *k_batch_idx;

    /* Paged K/V: key j of batch i lives in block block_table[i * bt_stride + j / page] at row
     * j % page; k/v's batch stride then steps over blocks. NULL when not paged. */
    const int64_t *block_table;
    int64_t bt_stride, page;

    /* Outputs of the softmax statistics (optional, NULL to skip). Same dtype as the accumulator
     * (float32, float64 for f64 inputs). Addressed as (batch, head, row) with strides; for varlen
     * the row index is the packed row (cu_q[i] + r) and the batch stride is ignored. */
    void *lse;
    int64_t lse_sb, lse_sh, lse_sr;
    void *rowmax, *rowsum; /* NPU softmax_max / softmax_sum, same addressing as lse */
    int64_t stat_sb, stat_sh, stat_sr;

    double scale;   /* multiplies q.k (after pse is added) */
    double softcap; /* > 0: score = softcap * tanh(score / softcap) */

    /* Band of visible keys for query row i of a sequence with sq_i queries and sk_i keys:
     * diag = i + (anchor_br ? sk_i - sq_i : 0); visible j in [diag - left, diag + right]
     * (inclusive), FA_UNBOUNDED sides open, clipped to [0, sk_i). */
    int64_t left, right;
    int anchor_br;
    /* NPU prefix modes: keys j < prefix[i] are also visible (NULL = none). */
    const int64_t *prefix;

    /* ALiBi: bias = -slope * |i + sk_i - sq_i - j| added after softcap. Slopes float32 indexed
     * [batch * alibi_sb + head]. NULL = none. */
    const float *alibi;
    int64_t alibi_sb;

    /* Additive bias (NPU pse), added to q.k before scaling; dtype pse_dtype, element strides
     * (batch, head, row, col), 0 for broadcast dims. NULL = none. */
    const void *pse;
    fa_dtype pse_dtype;
    int64_t pse_sb, pse_sh, pse_sr, pse_sc;
    /* torch_npu's inference ops (PFA/IFA/FIA) add pse_shift to the already scaled score
     * (scale * q.k + pse) where the training op adds it first: nonzero selects the former. */
    int pse_after_scale;

    /* Explicit mask (NPU atten_mask): uint8, nonzero = masked; strides like pse. NULL = none. */
    const uint8_t *mask;
    int64_t mask_sb, mask_sh, mask_sr, mask_sc;
    /* Value that masked scores take inside the band: -inf (flash-attn) or -FLT_MAX (NPU). */
    double mask_fill;
    /* NPU invalid-line mode: rows whose max equals mask_fill give 0 (and rowsum +FLT_MAX). */
    int invalid_line_zero;
    /* NPU sink: one extra logit per query head in the softmax denominator. NULL = none. */
    const float *sink;

    /* Dropout: keep element (b, h, i, j) iff philox(seed, offset, b, h, i, j) >= threshold. */
    double dropout_p;
    uint64_t seed, offset;
    /* Optional S_dmask output (float32, (b, h, row, col) strides): normalized P, dropped
     * entries negated. For varlen the row index is within the sequence. */
    float *s_dmask;
    int64_t sd_sb, sd_sh, sd_sr;

    /* Split-KV. num_splits: 0 lets the driver choose, 1 disables, n > 1 asks for n key ranges.
     * The driver runs each split with kclip_lo < kclip_hi (keys outside [kclip_lo, kclip_hi) are
     * outside every row's band) and out_acc set (o receives the normalized partial output in the
     * accumulator type, float32 or float64, instead of the input dtype), then merges the
     * partials through their lse (fa_combine). Front-ends leave kclip and out_acc at 0. */
    int num_splits;
    int64_t kclip_lo, kclip_hi;
    int out_acc;
} fa_fwd_params;

#endif
