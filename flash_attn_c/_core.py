"""The single funnel from every front-end to the forward kernel.

Front-ends (flash-attn, varlen, kvcache, torch_npu) turn their arguments into (batch, row, head,
dim) views and kernel options; this module allocates the outputs and calls the C binding. It does
no layout copies: views in, views out.
"""
import numpy as np

from . import _C
from ._runtime import empty

UNBOUNDED = None  # an open side of the visible-key band


def flash_window(window_size, causal, sk_bound):
    """flash-attn 2.8's window normalization (specs/flash_attn_api.md 2.3) as the kernel's band
    (left, right), None for an unbounded side.

    A bound >= sk_bound (the key length, max_seqlen_k or cache capacity) is unbounded; causal
    forces right = 0; any negative value is unbounded. (flash-attn's CUDA kernel stores a one-sided
    window's open side as seqlen_k, which differs only when sq > 2 * sk; we keep it unbounded, as
    its documentation and reference do.)"""
    left, right = window_size
    if left >= sk_bound:
        left = -1
    if right >= sk_bound:
        right = -1
    if causal:
        right = 0
    return (left if left >= 0 else UNBOUNDED), (right if right >= 0 else UNBOUNDED)


def forward(q, k, v, *, scale, out_shape=None, lse_shape=None, varlen=False, softcap=0.0,
            left=None, right=None, anchor_br=True, alibi=None, dropout_p=0.0, seed=0, offset=0,
            s_dmask_shape=None, out=None, **extra):
    """Run the forward kernel.

    q: (b, sq, h, d) view, or (total_q, h, d) when varlen; k, v: (b, sk, hk, d) (or packed/paged as
    the extra index arguments say). Returns (out, lse, s_dmask or None) with out of out_shape
    (C-contiguous, viewed as q's shape for the kernel) and lse of lse_shape (None: no lse).

    out, when given, is a view of q's shape that the kernel writes instead (returned as given):
    front-ends whose output order is not q's (torch_npu's BNSD/SBH layouts) or that fill one
    output from several calls pass their own view, so no output is ever copied into place.
    """
    acc = np.float64 if q.dtype == np.float64 else np.float32
    if out is None:
        out = empty(out_shape, q.dtype)
        out4 = out.reshape(q.shape)
    else:
        out4 = out
    lse = empty(lse_shape, acc) if lse_shape is not None else None
    s_dmask = np.zeros(s_dmask_shape, np.float32) if s_dmask_shape is not None else None
    if varlen:
        q4, out4, lse3 = q[None], out4[None], (lse[None] if lse is not None else None)
        k4, v4 = (k, v) if k.ndim == 4 else (k[None], v[None])
    else:
        q4, lse3, k4, v4 = q, lse, k, v
        if _can_fold_groups(q, k, left, right, anchor_br, alibi, dropout_p, s_dmask, extra):
            q4, out4, lse3 = _fold_groups(q4, out4, lse3, k.shape[2])
            left = right = UNBOUNDED
    _C.fwd(q4, k4, v4, out4, lse3, scale=scale, softcap=softcap, left=left, right=right,
           anchor_br=anchor_br, alibi=alibi, dropout_p=dropout_p, seed=seed, offset=offset,
           s_dmask=s_dmask, **extra)
    return out, lse, s_dmask


def _can_fold_groups(q, k, left, right, anchor_br, alibi, dropout_p, s_dmask, extra):
    """Decoding with GQA (one query row, several query heads per kv head) can run each kv head's
    group of query heads as the rows of one work item, so every K/V row is read once per group
    instead of once per query head (flash-attn's "ngroups swap"). Exact only where nothing depends
    on the row index: no window beyond the bottom-right causal one (which a single last row
    always satisfies), no alibi, dropout, S_dmask or NPU extras."""
    if q.shape[1] != 1 or q.shape[2] == k.shape[2] or alibi is not None or dropout_p > 0:
        return False
    if s_dmask is not None or not anchor_br or left is not None or (right is not None and right < 0):
        return False
    return not (set(extra) - {"seqlen_k", "k_start", "k_batch_idx", "block_table", "num_splits"})


def _fold_groups(q, out, lse, hk):
    """Views (b, G, hk, d) of q/out and (b, hk, G) of lse for a (b, 1, h = hk * G, d) problem:
    query head hk_i * G + g becomes row g of kv head hk_i."""
    b, _, h, d = q.shape
    g = h // hk

    def fold(x):
        return x.reshape(b, hk, g, d).transpose(0, 2, 1, 3)

    return fold(q), fold(out), (lse.reshape(b, hk, g) if lse is not None else None)


def backward(dout, q, k, v, out, *, scale, lse=None, rowmax=None, rowsum=None, varlen=False,
             softcap=0.0, left=None, right=None, anchor_br=True, alibi=None, dropout_p=0.0, seed=0,
             offset=0, pse=None, mask=None, mask_fill=-np.inf, invalid_line_zero=False, sink=None,
             prefix=None, cu_q=None, cu_k=None, want_dpse=False, grads=None):
    """Run the backward kernel; the one funnel for every front-end's gradient.

    Arguments (all already validated and laid out by the front-end; nothing is copied here):

    dout, q, out
        (b, sq, h, d) views, or (total_q, h, d) when ``varlen``; one float dtype, last dim
        contiguous. ``out`` is the forward output O used for D = rowsum(dO * O) (the NPU grad's
        ``attention_in``, which ring attention passes merged).
    k, v
        (b, sk, hk, d), or (total_k, hk, d) when ``varlen``; hk divides h (GQA/MQA).
    scale, softcap, left, right, anchor_br, alibi, dropout_p, seed, offset, pse, mask, mask_fill,
    invalid_line_zero, sink, prefix, cu_q, cu_k
        Exactly what the forward was given (see ``forward`` and csrc/fa_params.h): the backward
        recomputes the scores with them, and replays dropout from (seed, offset). ``left``/``right``
        None = unbounded; ``alibi`` a (b, h) float32 view; ``pse`` a (b or 1, h, sq, sk) view with
        0 strides for broadcast dims, added before ``scale``; ``mask`` bool/uint8 of the same
        addressing (nonzero = masked, score = ``mask_fill``); ``cu_q``/``cu_k`` int64 cumulative
        lengths with a leading 0 (both required when ``varlen``); ``prefix`` int64 (b,).
    lse | (rowmax, rowsum)
        The softmax statistics, in the accumulator dtype (float32; float64 for float64 inputs):
        either ``lse`` (b, h, sq) (varlen (h, total_q)) with P = exp(s - lse), or the NPU form
        ``rowmax`` and ``rowsum`` of that shape with P = exp(s - rowmax) / rowsum, used as given
        (pass ``softmax_max[..., 0]`` views). Rows with lse +inf (no visible key), with
        ``invalid_line_zero`` and lse/rowmax equal to ``mask_fill``, or with rowsum <= 0 have
        P = 0. (A row masked entirely by a finite ``mask_fill`` needs the NPU form: its lse
        rounds to ``mask_fill`` and no longer says how many keys it averaged.)
    want_dpse
        Also return dL/dpse per batch element (per sequence when varlen) and head, in the
        accumulator dtype: (b, h, sq, sk), or (b, h, 1, sk) summed over rows when ``pse`` is
        broadcast over rows (stride 0). The caller sums it over pse's other broadcast dims and
        casts it to pse's dtype. Entries outside each row's band are 0.
    grads
        Optional (dq, dk, dv) views of q's, k's and k's shape (writable, last dim contiguous) that
        the kernel writes instead of fresh arrays: front-ends whose gradient order is not the
        kernel's (torch_npu's BNSD/SBH layouts) pass views of arrays in their own order, so no
        gradient is copied into place. For varlen the caller zero-fills them (rows outside every
        sequence are not written).

    Returns (dq, dk, dv, dpse or None): dq with q's shape, dk/dv with k's shape, C-contiguous (or
    the given ``grads``), in the input dtype (accumulated in float32/float64 and rounded once).
    For varlen, rows of the packed tensors that belong to no sequence are 0.
    """
    acc = np.float64 if q.dtype == np.float64 else np.float32
    if grads is None:
        alloc = np.zeros if varlen else empty
        dq, dk, dv = alloc(q.shape, q.dtype), alloc(k.shape, k.dtype), alloc(v.shape, v.dtype)
    else:
        dq, dk, dv = grads
    if varlen:
        args = [x[None] for x in (dout, q, k, v, out, dq, dk, dv)]
        lse, rowmax, rowsum = (None if x is None else x[None] for x in (lse, rowmax, rowsum))
    else:
        args = [dout, q, k, v, out, dq, dk, dv]
    dpse = None
    if want_dpse:
        b = len(cu_q) - 1 if varlen else q.shape[0]
        sq = int(np.max(np.diff(cu_q))) if varlen and b else (0 if varlen else q.shape[1])
        sk = int(np.max(np.diff(cu_k))) if varlen and b else (0 if varlen else k.shape[1])
        rows = 1 if (pse is not None and pse.strides[2] == 0 and pse.shape[2] > 1) else max(sq, 1)
        dpse = np.zeros((b, q.shape[-2], rows, sk), acc)
    _C.bwd(*args, scale=scale, lse=lse, rowmax=rowmax, rowsum=rowsum, softcap=softcap, left=left,
           right=right, anchor_br=anchor_br, alibi=alibi, cu_q=cu_q, cu_k=cu_k,
           dropout_p=dropout_p, seed=seed, offset=offset, pse=pse, mask=mask, mask_fill=mask_fill,
           invalid_line_zero=invalid_line_zero, sink=sink, prefix=prefix, dpse=dpse)
    return dq, dk, dv, dpse
