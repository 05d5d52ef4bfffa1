/* fa_bwd_params.h: the backward kernel ABI of flash_attn_c.
 *
 * The backward reuses the forward's description of the problem (fa_fwd_params: geometry, band,
 * scale, softcap, alibi, pse, mask, sink, dropout seed/offset) and adds the tensors only the
 * gradient needs. Fields of the embedded forward params that the backward ignores: o (see `out`),
 * lse/rowmax/rowsum (see below), s_dmask, block_table, k_batch_idx (no backward through a paged
 * or indexed cache, as in flash-attn).
 *
 * Math (Dao, "FlashAttention-2", 2023, Algorithm 2; dropout and softcap as flash-attn 2.8 does
 * them, specs/flash_attn_api.md section 5). With x = q.k (+ pse), score s = g(scale * x) + alibi
 * where g is softcap's c * tanh(./c) or the identity, and P the softmax of s (plus the sink's
 * extra logit):
 *   P_ij  = exp(s_ij - lse_i)                  lse form
 *         = exp(s_ij - rowmax_i) / rowsum_i     NPU form (statistics given by the caller)
 *   D_i   = sum_d dO_id O_id                   (O = `out`, the forward output or NPU attention_in)
 *   dV_j  = sum_i P_ij z_ij r dO_i             z = dropout keep (0/1), r = 1 / (1 - p)
 *   dP_ij = dO_i . V_j
 *   dS_ij = P_ij (z_ij r dP_ij - D_i)          gradient w.r.t. s_ij
 *   dX_ij = dS_ij * scale * g'(scale x_ij)     gradient w.r.t. x_ij (and w.r.t. pse_ij)
 *   dQ_i  = sum_j dX_ij K_j,  dK_j = sum_i dX_ij Q_i   (dK/dV summed over each GQA group)
 * with g' = 1 - tanh^2 under softcap. Entries outside the band or under the explicit mask do not
 * depend on q or k (their score is a constant), so dX is 0 there, though P (and so dV) need not be:
 * a row masked entirely by a finite mask_fill averages V in the forward.
 *
 * A row is dead (P = 0, no gradient anywhere) when its lse is +inf or NaN, when invalid_line_zero
 * is set and its lse (or rowmax) equals mask_fill, or, in the NPU form, when rowsum is not > 0.
 */
#ifndef FA_BWD_PARAMS_H
#define FA_BWD_PARAMS_H

#include <stddef.h>
#include "fa_params.h"

typedef struct {
    fa_fwd_params f; /* geometry and score definition, exactly as the forward saw them */

    /* dO and O (the forward output, or NPU attention_in): q's geometry, dtype f.dtype. */
    fa_view dout, out;

    /* Softmax statistics in the accumulator type (float32; float64 for f64 inputs), addressed
     * like the forward's lse: (batch, head, row) strides, and for varlen the packed row with the
     * batch stride ignored. Exactly one form is given: lse, or rowmax together with rowsum. */
    const void *lse;
    int64_t lse_sb, lse_sh, lse_sr;
    const void *rowmax, *rowsum;
    int64_t stat_sb, stat_sh, stat_sr;

    /* Gradients in f.dtype: dq has q's geometry, dk/dv k's (hk heads). Every element of every
     * sequence's rows is written; rows of a packed tensor outside all sequences are not. */
    void *dq, *dk, *dv;
    int64_t dq_sb, dq_sr, dq_sh;
    int64_t dk_sb, dk_sr, dk_sh;
    int64_t dv_sb, dv_sr, dv_sh;

    /* Optional gradient of the score bias pse (NULL = none): accumulator type, indexed
     * (batch, head, row, col) with element strides; batch is the sequence index even for varlen,
     * row is the row within the sequence, and dpse_sr == 0 asks for the sum over rows (pse
     * broadcast over rows). The caller zero-fills it; the kernel writes the entries in each
     * row's band and reducing over pse's other broadcast dims is the caller's job. */
    void *dpse;
    int64_t dpse_sb, dpse_sh, dpse_sr, dpse_sc;
} fa_bwd_params;

/* Runs the backward (fa_bwd_driver.c): a preprocess that computes D and the row statistics and
 * converts Q, dO, K, V once into the accumulator type and the kernels' layouts; a pass over
 * (batch, kv head, chunk of key blocks) that computes dK/dV and adds dQ contributions into the
 * chunk's own dQ partial sums; and a pass over (batch, head, query block) that adds the chunks'
 * partial sums in a fixed order. Extra memory: the converted copies and the partial sums
 * ((2 + chunks) * rows * heads * d accumulators, plus 3 * keys * kv heads * d for kernels with a
 * packk; O(S d), never S x S; for float32/float64 capped near a budget by running the passes per
 * panel of query rows) plus one block scratch per thread; results do not depend on the thread
 * count. */
fa_status fa_bwd(const fa_bwd_params *p);

/* Bytes the backward may give Q, dO and the dQ partial sums before it splits the query positions
 * into panels (fa_bwd_driver.c): the setter returns the previous value, the getter the current.
 * Process-wide (flash_attn_c.set_backward_workspace_budget). */
size_t fa_bwd_set_panel_budget(size_t bytes);
size_t fa_bwd_panel_budget(void);
/* The last call's plan: query panels, positions per panel, workspace bytes asked for, chunks of
 * key blocks per (batch, kv head) (tests and tuning). */
void fa_bwd_last_plan(int64_t *panels, int64_t *panel_rows, int64_t *ws_bytes, int64_t *chunks);
/* The processor count the chunk rule assumes (fa_bwd_driver.c): n >= 1 sets it, 0 returns to the
 * machine's; returns the previous setting (0: not yet counted). For tests and tuning. */
int64_t fa_bwd_set_procs(int64_t n);

/* ---- per-ISA entry points (fa_bwd_impl.h) ---- */

/* The driver's workspace, filled by the preprocess (prep, packk) and read by dkdv and dq. All
 * arrays are in the accumulator type; dpad is FA_BWD_DPAD(d).
 *   D, m, il  [h][rows]: D_i, and P = exp(s - m) * il (a dead row has m = +inf, il = 0)
 *   Q, dO     [h][qstride][dpad]: rows zero-padded past d; qstride >= rows + 8, the tail zero
 *   Kt, Vt    [hk][blocks][d][block_keys]: key blocks transposed, columns past the keys zero
 *   Kr        [hk][krows][dpad]: keys row-major
 *   dQp       [nch][h][qstride][dpad]: dQ partial sums, chunk c holding the contributions of key
 *             blocks c, c + nch, c + 2 nch, ... (zeroed and filled by the chunk's dkdv items)
 * D, m, il index a query row by its packed row (varlen) or batch * sq + row (rows in all); a key's
 * index is cu_k[batch] + key or batch * sk + key; sequence bi's key blocks start at kblk[bi], its
 * query blocks (of the kernel's block_rows) at qblk[bi], qblocks in all.
 * Panels (memory-bounded backward, fa_bwd_driver.c): the driver may run the three passes once per
 * panel of query positions [p0, p0 + pn) of every sequence, Q, dO and dQp then holding only the
 * panel's rows: row i of sequence bi at prow[bi] + i - p0 (bw_prow). dkdv items of a panel after
 * the first continue dK/dV from the values the previous panel stored in the outputs, so panels are
 * used only where the outputs are in the accumulator type. With one panel (p0 = 0, pn >= every
 * sequence), prow[bi] is the row index above.
 * A kernel with its own layout for Q, dO, Kt, Vt, Kr, dQp (ws_sizes set: the AMX bf16 kernel)
 * gets those six arrays with the sizes it asks for and defines their contents itself; D, m, il
 * are common. */
typedef struct {
    void *D, *m, *il;
    void *Q, *dO, *Kt, *Vt, *Kr, *dQp;
    int64_t rows, qstride, krows, blocks, dpad, nch, qblocks;
    const int64_t *kblk, *qblk;
    int64_t p0, pn;      /* the panel: query positions [p0, p0 + pn) of every sequence */
    const int64_t *prow; /* [b]: workspace row of position p0 of sequence bi (Q, dO, dQp) */
} fa_bwd_ws;

typedef void (*fa_bwd_prep_fn)(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi,
                               int64_t h, int64_t q0, int64_t n);
typedef void (*fa_bwd_packk_fn)(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi,
                                int64_t hk, int64_t k0);
typedef fa_status (*fa_bwd_dkdv_fn)(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi,
                                    int64_t hk, int64_t chunk, void *buf);
typedef fa_status (*fa_bwd_dq_fn)(const fa_bwd_params *p, const fa_bwd_ws *ws, int64_t bi,
                                  int64_t h, int64_t q0, void *buf);

typedef struct {
    fa_bwd_prep_fn prep;   /* rows [q0, q0 + n) of (bi, h): statistics, Q and dO */
    fa_bwd_packk_fn packk; /* keys [k0, k0 + block_keys) of (bi, hk): Kt, Vt, Kr; NULL: the
                            * kernel packs K/V itself and Kt, Vt, Kr are NULL */
    fa_bwd_dkdv_fn dkdv;   /* key blocks chunk, chunk + nch, ... of (bi, kv head hk) */
    fa_bwd_dq_fn dq;       /* rows [q0, q0 + block_rows) of (bi, h): sum of the dQ partials */
    size_t (*scratch_bytes)(const fa_bwd_params *p);
    int block_rows, block_keys;
    /* NULL: the layout above; else the bytes of Q, dO, Kt, Vt, Kr, dQp (in that order) for ws's
     * geometry, in the kernel's own layout. */
    void (*ws_sizes)(const fa_bwd_params *p, const fa_bwd_ws *ws, size_t bytes[6]);
} fa_bwd_kernel;

#define FA_BWD_DECLARE(name)                                                                       \
    void name##_prep(const fa_bwd_params *, const fa_bwd_ws *, int64_t, int64_t, int64_t,         \
                     int64_t);                                                                     \
    void name##_packk(const fa_bwd_params *, const fa_bwd_ws *, int64_t, int64_t, int64_t);       \
    fa_status name##_dkdv(const fa_bwd_params *, const fa_bwd_ws *, int64_t, int64_t, int64_t,    \
                          void *);                                                                 \
    fa_status name##_dq(const fa_bwd_params *, const fa_bwd_ws *, int64_t, int64_t, int64_t,      \
                        void *);                                                                   \
    size_t name##_scratch(const fa_bwd_params *);

FA_BWD_DECLARE(fa_bwd_f32__scalar)
FA_BWD_DECLARE(fa_bwd_f64__scalar)
FA_BWD_DECLARE(fa_bwd_f32__avx2)
FA_BWD_DECLARE(fa_bwd_f64__avx2)
FA_BWD_DECLARE(fa_bwd_f32__avx512)
FA_BWD_DECLARE(fa_bwd_f64__avx512)
FA_BWD_DECLARE(fa_bwd_bf16__amx)
void fa_bwd_bf16__amx_ws_sizes(const fa_bwd_params *, const fa_bwd_ws *, size_t[6]);
/* Query rows and keys per block of the AMX bf16 kernel (128 rows: dK^T/dV^T C tiles reused over 4
 * k steps instead of 2; bitwise the same sums as 64-row blocks). */
#define FA_BWD_AMX_ROWS 128
#define FA_BWD_AMX_KEYS 64

/* Query rows and keys per block, shared by every build so the driver can split work. */
#define FA_BWD_BLOCK_ROWS 64
#define FA_BWD_BLOCK_KEYS 64
/* Row length of packed rows: d rounded up to 16, a whole number of vectors for every build. */
#define FA_BWD_DPAD(d) (((d) + 15) / 16 * 16)

#endif
