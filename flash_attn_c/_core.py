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
    _C.fwd(q4, k4, v4, out4, lse3, scale=scale, softcap=softcap, left=left, right=right,
           anchor_br=anchor_br, alibi=alibi, dropout_p=dropout_p, seed=seed, offset=offset,
           s_dmask=s_dmask, **extra)
    return out, lse, s_dmask
