"""Naive NumPy reference for every attention function of flash_attn_c.

This module is the oracle the test suite compares the C kernels against, and what users run to
verify their own kernels (a GPU or NPU port). It is slow on purpose: it builds the full score
matrix, expands GQA/MQA key/value heads with ``np.repeat``, applies explicit boolean masks and takes
a plain (not online) softmax. Nothing here is tiled, fused or clever, so that each rule can be
read off the code and checked against the specs:

* flash-attn functions: ``specs/flash_attn_api.md`` (cited as "FA §x.y").
* torch_npu functions: ``specs/npu_fusion_attention.md`` (cited as "NPU §x"), in
  ``reference_npu.py`` and re-exported here.

Every public function has the name, positional order and defaults of the library function it
mirrors (``API.md`` sections 2-4), plus keyword-only extras:

``compute_dtype`` (default ``np.float64``)
    The dtype in which the math is done. Inputs are cast to it and the result of each step
    (scores, softcap, bias add, softmax, probabilities, P @ V, gradients) is rounded to it. With
    ``np.float64`` this is the exact reference. With the low-precision dtype of the inputs
    (``np.float16``, ``ml_dtypes.bfloat16``, ``np.float32``) it is the "naive computation in the
    same precision" of flash-attn's tolerance rule (their ``attention_ref(upcast=False,
    reorder_ops=True)``, FA §4.1): the scale is folded into k, matrix products accumulate in
    float32 and are rounded once to the compute dtype (as a GPU fp16/bf16 GEMM does; NumPy cannot
    multiply bfloat16 matrices natively, so all fp16/bf16 products are emulated this way), and
    softmax statistics are formed in float32 and the probabilities rounded (as torch's fp16/bf16
    softmax does). Outputs come back in ``compute_dtype``; ``softmax_lse`` (and the NPU
    ``softmax_max``/``softmax_sum``) in float64, or float32 when ``compute_dtype`` is a lower
    precision.

``dropout_mask`` (only where the function has dropout)
    A boolean KEEP mask (True = kept). The reference cannot reproduce the library's random
    generator, so whenever ``dropout_p > 0`` (NPU: ``keep_prob < 1``) the mask must be given
    (typically recovered from the kernel's ``S_dmask`` as ``~np.signbit(S_dmask)``) and a
    ``ValueError`` is raised otherwise. With ``dropout_p == 0`` (``keep_prob == 1``) it is ignored.
    Shapes: fixed length ``(b, h, sq, sk)``; varlen ``(b, h, max_seqlen_q, max_seqlen_k)`` with
    each sequence's block in the top-left corner; NPU: see ``npu_fusion_attention``.

Conventions shared with the library: ``softmax_lse`` rows that see no key are ``+inf`` and their
output rows 0 (FA §2.7); GQA query head ``i`` uses kv head ``i // (h // hk)`` (FA §1.2).

The reference validates lightly (``ValueError`` for obviously inconsistent shapes); the library
is where argument checking lives. It never imports torch or the C extension.
"""

import numpy as np
import ml_dtypes

__all__ = [
    "flash_attn_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_kvpacked_func",
    "flash_attn_varlen_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_with_kvcache",
    "flash_attn_fwd",
    "flash_attn_bwd",
    "flash_attn_varlen_fwd",
    "flash_attn_varlen_bwd",
    "manual_seed",
    "combine_partials",
    "npu_fusion_attention",
    "npu_flash_attention",
    "npu_fusion_attention_grad",
]

_COMPUTE_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16),
                   np.dtype(ml_dtypes.bfloat16))


# --------------------------------------------------------------------------------------------
# Arithmetic in a chosen precision
# --------------------------------------------------------------------------------------------

class _Precision:
    """Rounds every intermediate result to ``dtype``.

    Values are carried in ``wide`` arrays (float64 for exact compute, float32 otherwise) that hold
    only numbers representable in ``dtype``; calling the object rounds to ``dtype``. For float64
    rounding is the identity, so the float64 path is plain float64 NumPy.
    """

    def __init__(self, compute_dtype):
        dtype = np.dtype(compute_dtype)
        if dtype not in _COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype: expected float64, float32, float16 or bfloat16, "
                             f"got {dtype}")
        self.dtype = dtype
        self.wide = np.dtype(np.float64) if dtype == np.float64 else np.dtype(np.float32)

    def __call__(self, x):
        x = np.asarray(x)
        if self.dtype == self.wide:
            return x.astype(self.wide, copy=False)
        with np.errstate(over="ignore"):
            return x.astype(self.dtype).astype(self.wide)

    def mm(self, a, b):
        """Matrix product accumulated in ``wide`` (float32 for fp16/bf16), rounded once."""
        return self(np.matmul(a.astype(self.wide, copy=False), b.astype(self.wide, copy=False)))

    def out(self, x):
        """Final cast of an output to ``compute_dtype``."""
        with np.errstate(over="ignore"):
            return np.ascontiguousarray(np.asarray(x).astype(self.dtype))

    def stat(self, x):
        """Final cast of a softmax statistic (lse, max, sum): float64 or float32."""
        return np.ascontiguousarray(np.asarray(x).astype(self.wide))


def _float_array(x, name):
    x = np.asarray(x)
    if x.dtype.kind not in "fc" and x.dtype != ml_dtypes.bfloat16:
        raise TypeError(f"{name}: expected a floating point array, got dtype {x.dtype}")
    return x


def _int_list(x, name):
    a = np.asarray(x)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected integers, got dtype {a.dtype}")
    return [int(v) for v in a.reshape(-1)]


def _keep_mask(mask, shape, name="dropout_mask"):
    m = np.asarray(mask)
    if m.dtype != np.bool_:
        if m.dtype.kind not in "iu":
            raise TypeError(f"{name}: expected a boolean keep mask, got dtype {m.dtype}")
        m = m != 0
    if m.shape != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)}, got {m.shape}")
    return m


def _softmax(s, visible, prec):
    """Row softmax over the visible entries, statistics in ``prec.wide``.

    Returns (P rounded to the compute dtype, lse). Rows with no visible entry give P = 0 and
    lse = +inf (FA §2.7).
    """
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        s_masked = np.where(visible, s, -np.inf)
        m = (s_masked.max(axis=-1, keepdims=True) if s.shape[-1]
             else np.full(s.shape[:-1] + (1,), -np.inf))
        m_safe = np.where(np.isfinite(m), m, 0.0)
        e = np.where(visible, np.exp(s_masked - m_safe), 0.0)
        total = e.sum(axis=-1, keepdims=True)
        # total == 0 only for rows without a visible key; NaN inputs propagate.
        p = np.where(total == 0, 0.0, e / total)
        lse = np.where(total == 0, np.inf, m_safe + np.log(total))
    return prec(p), lse[..., 0].astype(prec.wide)


def _heads(x, nheads, prec):
    """(s, hk, d) -> (h, s, d) in the compute precision, kv heads repeated in contiguous groups."""
    x = prec(x).transpose(1, 0, 2)
    groups = nheads // x.shape[0]
    return np.repeat(x, groups, axis=0)


def _group_sum(x, nheads_k):
    """Sum a per-query-head gradient (h, s, d) over each kv head's group -> (hk, s, d)."""
    h, s, d = x.shape
    return x.reshape(nheads_k, h // nheads_k, s, d).sum(axis=1)


# --------------------------------------------------------------------------------------------
# flash-attn semantics
# --------------------------------------------------------------------------------------------

def _fa_window(window_size, causal, seqlen_q, seqlen_k, has_alibi):
    """flash-attn's window normalisation (FA §2.2, §2.3), negative = unbounded.

    Step 1: a bound >= seqlen_k (tensor dim / max_seqlen_k / cache capacity) becomes -1.
    Step 2: seqlen_q == 1 without alibi turns causal off (row 0 sees every key either way).
    Step 3: causal forces right = 0 and keeps left.
    Step 4 of the C++ code (a one-sided infinite window stored as seqlen_k) is a kernel encoding
    that only differs from "unbounded" in the sq > 2*sk corner the spec flags as untested; the
    reference keeps negative = unbounded there.
    """
    left, right = int(window_size[0]), int(window_size[1])
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    if seqlen_q == 1 and not has_alibi:
        causal = False
    if causal:
        right = 0
    return left, right


def _fa_visible(sq, sk, window):
    """Bottom-right aligned visibility (FA §2.2/2.3): row i sees keys in
    [i + sk - sq - left, i + sk - sq + right], a negative bound meaning unbounded."""
    left, right = window
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    diag = i + sk - sq
    visible = np.ones((sq, sk), dtype=bool)
    if left >= 0:
        visible &= j >= diag - left
    if right >= 0:
        visible &= j <= diag + right
    return visible


def _fa_alibi(slopes, sq, sk):
    """Documented alibi bias -slope * |i + sk - sq - j| (FA §2.5), per query head: (h, sq, sk).

    The kernel's causal mode adds +slope*j instead, which differs by a row constant: out and P are
    the same, softmax_lse differs (FA §2.5). The reference uses the documented form throughout.
    """
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    dist = np.abs(i + sk - sq - j).astype(np.float64)
    return -np.asarray(slopes, np.float64)[:, None, None] * dist[None]


def _fa_scores(qh, kh, scale, softcap, window, slopes, prec):
    """Scores of one sequence in the order of FA §2.1: scale, softcap, (mask), alibi.

    Returns (scores (h, sq, sk), visible (sq, sk), tanh term or None for the softcap chain rule).
    """
    sq, sk = qh.shape[1], kh.shape[1]
    s = prec.mm(qh, prec(kh * scale).transpose(0, 2, 1))
    t = None
    if softcap > 0:
        t = prec(np.tanh(prec(s / softcap)))
        s = prec(t * softcap)
    if slopes is not None:
        s = prec(s + _fa_alibi(slopes, sq, sk))
    return s, _fa_visible(sq, sk, window), t


def _fa_forward(q, k, v, scale, softcap, window, slopes, dropout_p, keep, prec):
    """Attention of one sequence. q (sq, h, d), k (sk, hk, d), v (sk, hk, dv); keep (h, sq, sk).

    Returns out (sq, h, dv), lse (h, sq) and the S_dmask block (h, sq, sk): the normalised
    pre-dropout P with dropped entries negated (-0.0 where P is 0) and +0 outside the
    causal/window region (API.md §2).
    """
    h = q.shape[1]
    qh, kh, vh = prec(q).transpose(1, 0, 2), _heads(k, h, prec), _heads(v, h, prec)
    s, visible, _ = _fa_scores(qh, kh, scale, softcap, window, slopes, prec)
    p, lse = _softmax(s, visible[None], prec)
    pd = p if keep is None else p * keep          # FA §2.1 step 6: drop after softmax
    if dropout_p > 0:
        vh = prec(vh * (1.0 / (1.0 - dropout_p)))  # the reference scales v by 1/(1-p)
    out = prec.mm(pd, vh)
    smask = p if keep is None else np.where(keep | ~visible[None], p, -p)
    return out.transpose(1, 0, 2), lse, smask


def _fa_backward(dout, q, k, v, out, lse, scale, softcap, window, slopes, dropout_p, keep, prec):
    """Closed-form gradient of one sequence (FA §5), P rebuilt from the GIVEN lse and D from the
    GIVEN out. Returns dq (sq, h, d), dk (sk, hk, d), dv (sk, hk, dv)."""
    h, hk = q.shape[1], k.shape[1]
    qh, kh, vh = prec(q).transpose(1, 0, 2), _heads(k, h, prec), _heads(v, h, prec)
    do = prec(dout).transpose(1, 0, 2)
    o = prec(out).transpose(1, 0, 2)
    s, visible, t = _fa_scores(qh, kh, scale, softcap, window, slopes, prec)
    lse = np.asarray(lse, prec.wide)[..., None]
    # Rows with lse = +inf (no visible key) get P = 0 and contribute nothing (FA §2.7).
    with np.errstate(invalid="ignore"):
        p = prec(np.where(visible[None] & (lse != np.inf), np.exp(s - lse), 0.0))
    kept = np.ones_like(p) if keep is None else keep.astype(prec.wide)
    r = 1.0 / (1.0 - dropout_p)
    dv = prec.mm(prec(p * kept * r).transpose(0, 2, 1), do)          # dV = (P*keep/(1-p))^T dO
    dp = prec.mm(do, vh.transpose(0, 2, 1))                           # dP = dO V^T
    dsum = prec(np.sum(do * o, axis=-1, keepdims=True))               # D = rowsum(dO * O)
    ds = prec(p * prec(kept * dp * r - dsum))                         # dS = P (keep dP/(1-p) - D)
    if t is not None:
        ds = prec(ds * prec(1.0 - t * t))                             # softcap: d tanh = 1 - t^2
    dq = prec(scale * prec.mm(ds, kh))
    dk = prec(scale * prec.mm(ds.transpose(0, 2, 1), qh))
    dk = prec(_group_sum(dk, hk))                                     # GQA: sum over each group
    dv = prec(_group_sum(dv, hk))
    return dq.transpose(1, 0, 2), dk.transpose(1, 0, 2), dv.transpose(1, 0, 2)


def _slopes_per_batch(alibi_slopes, batch, nheads):
    """alibi_slopes (h,) or (b, h) -> (b, h) float64, or None (FA §2.5)."""
    if alibi_slopes is None:
        return None
    a = np.asarray(alibi_slopes, np.float64)
    if a.shape == (nheads,):
        return np.broadcast_to(a, (batch, nheads))
    if a.shape == (batch, nheads):
        return a
    raise ValueError(f"alibi_slopes: expected shape ({nheads},) or ({batch}, {nheads}), "
                     f"got {a.shape}")


def _scale(softmax_scale, d):
    return float(d) ** -0.5 if softmax_scale is None else float(softmax_scale)


def _dropout(dropout_p, dropout_mask, shape):
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p: expected 0 <= p < 1, got {dropout_p}")
    if dropout_p == 0.0:
        return dropout_p, None
    if dropout_mask is None:
        raise ValueError("dropout_p > 0 needs dropout_mask: the reference cannot reproduce the "
                         "library's random generator; pass the keep mask the kernel used "
                         "(e.g. ~np.signbit(S_dmask))")
    return dropout_p, _keep_mask(dropout_mask, shape)


def _check_qkv(q, k, v, qdims):
    q, k, v = _float_array(q, "q"), _float_array(k, "k"), _float_array(v, "v")
    if q.ndim != qdims or k.ndim != qdims or v.ndim != qdims:
        raise ValueError(f"q, k, v: expected {qdims} dims, got shapes {q.shape}, {k.shape}, "
                         f"{v.shape}")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk or v.shape[-2] != hk or k.shape[-1] != q.shape[-1] \
            or k.shape[:-1] != v.shape[:-1]:
        raise ValueError(f"q, k, v: inconsistent shapes {q.shape}, {k.shape}, {v.shape}")
    return q, k, v


# --- fixed length ---------------------------------------------------------------------------

def _fixed_forward(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                   dropout_mask, compute_dtype):
    prec = _Precision(compute_dtype)
    q, k, v = _check_qkv(q, k, v, 4)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if k.shape[0] != b:
        raise ValueError(f"k: batch {k.shape[0]} != q batch {b}")
    scale = _scale(softmax_scale, d)
    window = _fa_window(window_size, causal, sq, sk, alibi_slopes is not None)
    slopes = _slopes_per_batch(alibi_slopes, b, h)
    dropout_p, keep = _dropout(dropout_p, dropout_mask, (b, h, sq, sk))
    out = np.zeros((b, sq, h, v.shape[-1]), prec.wide)
    lse = np.zeros((b, h, sq), prec.wide)
    probs = np.zeros((b, h, sq, sk), prec.wide)
    for bi in range(b):
        out[bi], lse[bi], probs[bi] = _fa_forward(
            q[bi], k[bi], v[bi], scale, float(softcap), window,
            None if slopes is None else slopes[bi], dropout_p,
            None if keep is None else keep[bi], prec)
    return prec, out, lse, probs, keep


def _attn_result(prec, out, lse, probs, keep, return_attn_probs):
    if not return_attn_probs:
        return prec.out(out)
    return prec.out(out), prec.stat(lse), prec.out(probs)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False,
                    *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_func``: q (b, sq, h, d), k/v (b, sk, hk, d) -> out (b, sq, h, d).

    With ``return_attn_probs=True`` returns
    ``(out, softmax_lse (b, h, sq), S_dmask (b, h, sq, sk))`` where S_dmask is the normalised
    pre-dropout probability matrix with dropped entries negated (API.md §2); entries outside the
    causal/window region are +0.
    """
    prec, out, lse, probs, keep = _fixed_forward(q, k, v, dropout_p, softmax_scale, causal,
                                                 window_size, softcap, alibi_slopes, dropout_mask,
                                                 compute_dtype)
    return _attn_result(prec, out, lse, probs, keep, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False,
                              *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_qkvpacked_func``: qkv (b, s, 3, h, d) (FA §1.2)."""
    qkv = _float_array(qkv, "qkv")
    if qkv.ndim != 5 or qkv.shape[2] != 3:
        raise ValueError(f"qkv: expected shape (batch, seqlen, 3, nheads, headdim), "
                         f"got {qkv.shape}")
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale,
                           causal, window_size, softcap, alibi_slopes, deterministic,
                           return_attn_probs, dropout_mask=dropout_mask,
                           compute_dtype=compute_dtype)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False,
                             *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_kvpacked_func``: q (b, sq, h, d), kv (b, sk, 2, hk, d) (FA §1.2)."""
    kv = _float_array(kv, "kv")
    if kv.ndim != 5 or kv.shape[2] != 2:
        raise ValueError(f"kv: expected shape (batch, seqlen_k, 2, nheads_k, headdim), "
                         f"got {kv.shape}")
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                           dropout_mask=dropout_mask, compute_dtype=compute_dtype)


# --- variable length ------------------------------------------------------------------------

def _cu_seqlens(cu, name):
    cu = _int_list(cu, name)
    if len(cu) < 1 or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"{name}: expected a non-decreasing sequence starting at 0, got {cu}")
    return cu


def _paged_rows(cache, table_row, n):
    """Logical rows 0..n-1 of one sequence of a paged cache (FA §1.2): position j lives at
    cache[block_table[b, j // page_block_size], j % page_block_size]."""
    page = cache.shape[1]
    j = np.arange(n)
    blocks = np.asarray(table_row, np.int64)[j // page]
    return cache[blocks, j % page]


def _varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                    softmax_scale, causal, window_size, softcap, alibi_slopes, block_table,
                    dropout_mask, compute_dtype):
    prec = _Precision(compute_dtype)
    paged = block_table is not None
    q, k, v = _check_qkv(q, k, v, 3) if not paged else (_float_array(q, "q"), _float_array(k, "k"),
                                                         _float_array(v, "v"))
    if paged and (q.ndim != 3 or k.ndim != 4 or v.shape[:-1] != k.shape[:-1]):
        raise ValueError(f"paged varlen: expected q (total_q, h, d) and k, v (num_blocks, "
                         f"page_block_size, hk, d), got {q.shape}, {k.shape}, {v.shape}")
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q")
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    if len(cu_q) != len(cu_k):
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length")
    b = len(cu_q) - 1
    total_q, h, d = q.shape
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    if cu_q[-1] > total_q or (not paged and cu_k[-1] > k.shape[0]):
        raise ValueError("cu_seqlens point past the end of q/k")
    if any(cu_q[i + 1] - cu_q[i] > max_seqlen_q or cu_k[i + 1] - cu_k[i] > max_seqlen_k
           for i in range(b)):
        raise ValueError("a sequence is longer than max_seqlen_q/max_seqlen_k")
    if paged:
        table = np.asarray(block_table)
        if table.ndim != 2 or table.shape[0] != b:
            raise ValueError(f"block_table: expected shape ({b}, max_num_blocks), "
                             f"got {table.shape}")
        if table.min(initial=0) < 0 or table.max(initial=0) >= k.shape[0] or any(
                cu_k[i + 1] - cu_k[i] > table.shape[1] * k.shape[1] for i in range(b)):
            raise ValueError("block_table: entries out of range, or a sequence longer than its "
                             "blocks")
    scale = _scale(softmax_scale, d)
    # FA §2.3: the clamp uses max_seqlen_k, the sq == 1 shortcut max_seqlen_q.
    window = _fa_window(window_size, causal, max_seqlen_q, max_seqlen_k, alibi_slopes is not None)
    slopes = _slopes_per_batch(alibi_slopes, b, h)
    dropout_p, keep = _dropout(dropout_p, dropout_mask, (b, h, max_seqlen_q, max_seqlen_k))
    out = np.zeros((total_q, h, v.shape[-1]), prec.wide)
    lse = np.full((h, total_q), np.inf, prec.wide)    # rows no sequence covers: 0 / +inf
    probs = np.zeros((b, h, max_seqlen_q, max_seqlen_k), prec.wide)
    for bi in range(b):
        q0, q1, k0, k1 = cu_q[bi], cu_q[bi + 1], cu_k[bi], cu_k[bi + 1]
        sq, sk = q1 - q0, k1 - k0
        if paged:
            kb, vb = _paged_rows(k, table[bi], sk), _paged_rows(v, table[bi], sk)
        else:
            kb, vb = k[k0:k1], v[k0:k1]
        o, l, p = _fa_forward(q[q0:q1], kb, vb, scale, float(softcap), window,
                              None if slopes is None else slopes[bi], dropout_p,
                              None if keep is None else keep[bi, :, :sq, :sk], prec)
        out[q0:q1], lse[:, q0:q1], probs[bi, :, :sq, :sk] = o, l, p
    return prec, out, lse, probs, keep


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None,
                           *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_varlen_func``.

    q (total_q, h, d), k/v (total_k, hk, d), or with ``block_table`` (b, max_blocks) paged k/v
    (num_blocks, page_block_size, hk, d) where sequence b's key j is at
    ``k[block_table[b, j // page], j % page]`` and its length is
    ``cu_seqlens_k[b+1] - cu_seqlens_k[b]``.
    Per-sequence lengths come from cu_seqlens; max_seqlen_* are upper bounds used for the window
    clamp, the S_dmask shape and the dropout mask shape (FA §1.2, §2.3). softmax_lse is
    (h, total_q); q rows that no sequence covers get out 0 and lse +inf.
    """
    prec, out, lse, probs, keep = _varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, block_table, dropout_mask, compute_dtype)
    return _attn_result(prec, out, lse, probs, keep, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False,
                                     *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_varlen_qkvpacked_func``: qkv (total, 3, h, d)."""
    qkv = _float_array(qkv, "qkv")
    if qkv.ndim != 4 or qkv.shape[1] != 3:
        raise ValueError(f"qkv: expected shape (total, 3, nheads, headdim), got {qkv.shape}")
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens,
                                  max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                                  window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs, dropout_mask=dropout_mask,
                                  compute_dtype=compute_dtype)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False,
                                    *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_varlen_kvpacked_func``: q (total_q, h, d), kv (total_k, 2, hk, d)."""
    kv = _float_array(kv, "kv")
    if kv.ndim != 4 or kv.shape[1] != 2:
        raise ValueError(f"kv: expected shape (total_k, 2, nheads_k, headdim), got {kv.shape}")
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                  softcap, alibi_slopes, deterministic, return_attn_probs,
                                  dropout_mask=dropout_mask, compute_dtype=compute_dtype)


# --- KV cache -------------------------------------------------------------------------------

def _rotate(x, cos, sin, positions, interleaved, wide):
    """Rotary embedding of the first rotary_dim = 2*cos.shape[1] channels (FA §2.10).

    x (s, h, d); positions (s,) index rows of cos/sin. interleaved (GPT-J): pairs (2m, 2m+1);
    otherwise (GPT-NeoX): pairs (m, m + rotary_dim/2). Each pair becomes
    (x0*c - x1*s, x0*s + x1*c). Computed in ``wide`` (float64 or float32).
    """
    x = np.array(x, dtype=wide)
    half = cos.shape[1]
    c = np.asarray(cos, wide)[positions][:, None, :]
    s = np.asarray(sin, wide)[positions][:, None, :]
    if interleaved:
        x0, x1 = x[..., 0:2 * half:2].copy(), x[..., 1:2 * half:2].copy()
        x[..., 0:2 * half:2] = x0 * c - x1 * s
        x[..., 1:2 * half:2] = x0 * s + x1 * c
    else:
        x0, x1 = x[..., :half].copy(), x[..., half:2 * half].copy()
        x[..., :half] = x0 * c - x1 * s
        x[..., half:2 * half] = x0 * s + x1 * c
    return x


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False,
                            *, compute_dtype=np.float64):
    """Reference ``flash_attn_with_kvcache`` (FA §2.10).

    * ``k_cache``/``v_cache`` (b_cache, seqlen_cache, hk, d), or paged (num_blocks, page, hk, d)
      with ``block_table`` (b, max_blocks); capacity = seqlen_cache or max_blocks * page.
    * ``cache_seqlens`` (int or (b,)): absolute index where the current contents end (None: the
      full capacity). ``cache_batch_idx`` (b,): cache row used by batch b (not with paging).
      ``cache_leftpad`` (b,): valid keys start there (not with paging).
    * New ``k``/``v`` (b, seqlen_new, hk, d) are written IN PLACE into the caches at
      ``cache_seqlens[b] + t`` (k after rotary; values cast to the cache dtype), then attention
      runs over absolute keys [leftpad, cache_seqlens + seqlen_new). Pass copies if the caches are
      needed again: calling this twice appends twice (with the same values).
    * Rotary (``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2), only with new k): k token
      t rotates at position ``cache_seqlens[b] + t``; q row i at ``cache_seqlens[b] + i`` when
      causal or a window is active, else every q row at ``cache_seqlens[b]``. The rotation runs in
      float64 (float32 for a lower compute_dtype).
    * causal/window/alibi positions are relative to leftpad and bottom-right aligned with the
      actual key count ``cache_seqlens - leftpad + seqlen_new``; the window clamp uses the cache
      capacity. ``num_splits`` is accepted and ignored (the split result is the same math).
    Returns out (b, sq, h, d), and softmax_lse (b, h, sq) with ``return_softmax_lse=True``.
    """
    prec = _Precision(compute_dtype)
    q = _float_array(q, "q")
    if q.ndim != 4:
        raise ValueError(f"q: expected (batch, seqlen_q, nheads, headdim), got shape {q.shape}")
    b, sq, h, d = q.shape
    if not isinstance(k_cache, np.ndarray) or not isinstance(v_cache, np.ndarray):
        raise TypeError("k_cache, v_cache: expected writable numpy arrays")
    paged = block_table is not None
    if k_cache.ndim != 4 or v_cache.shape[:-1] != k_cache.shape[:-1] or k_cache.shape[-1] != d:
        raise ValueError(f"k_cache/v_cache: bad shapes {k_cache.shape}, {v_cache.shape}")
    hk = k_cache.shape[2]
    if h % hk:
        raise ValueError("nheads must be a multiple of nheads_k")
    if paged:
        if cache_batch_idx is not None or cache_leftpad is not None:
            raise ValueError("paged KV cache does not support cache_batch_idx or cache_leftpad")
        table = np.asarray(block_table, np.int64)
        if table.shape[0] != b:
            raise ValueError(f"block_table: expected {b} rows, got shape {table.shape}")
        capacity = table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    if (k is None) != (v is None):
        raise ValueError("k and v must be given together")
    if k is None and rotary_cos is not None:
        raise ValueError("rotary_cos/rotary_sin need new k/v to be appended")
    if cache_seqlens is None:
        if k is not None:
            raise ValueError("new k/v need cache_seqlens")
        seqlens = [capacity] * b
    elif np.ndim(cache_seqlens) == 0:
        seqlens = [int(cache_seqlens)] * b   # an int expands to (q.shape[0],) (FA §0, HEAD)
    else:
        seqlens = _int_list(cache_seqlens, "cache_seqlens")
    batch_idx = list(range(b)) if cache_batch_idx is None else _int_list(cache_batch_idx,
                                                                          "cache_batch_idx")
    leftpad = [0] * b if cache_leftpad is None else _int_list(cache_leftpad, "cache_leftpad")
    if len(seqlens) != b or len(batch_idx) != b or len(leftpad) != b:
        raise ValueError("cache_seqlens/cache_batch_idx/cache_leftpad: expected one entry per "
                         "batch")
    seqlen_new = 0
    if k is not None:
        k, v = _float_array(k, "k"), _float_array(v, "v")
        if k.shape != (b, k.shape[1], hk, d) or v.shape[:-1] != k.shape[:-1]:
            raise ValueError(f"k/v: expected (batch, seqlen_new, nheads_k, headdim), got "
                             f"{k.shape}, {v.shape}")
        seqlen_new = k.shape[1]
    if any(s + seqlen_new > capacity or s < 0 for s in seqlens) \
            or any(not 0 <= lp <= s for lp, s in zip(leftpad, seqlens)):
        raise ValueError("cache_seqlens/cache_leftpad out of range for the cache capacity")

    scale = _scale(softmax_scale, d)
    window = _fa_window(window_size, causal, sq, capacity, alibi_slopes is not None)
    slopes = _slopes_per_batch(alibi_slopes, b, h)
    rotary_per_row = window[0] >= 0 or window[1] >= 0   # kernel Is_causal || Is_local
    if rotary_cos is not None:
        cos, sin = np.asarray(rotary_cos), np.asarray(rotary_sin)
        if cos.ndim != 2 or sin.shape != cos.shape or 2 * cos.shape[1] > d:
            raise ValueError(f"rotary_cos/rotary_sin: bad shapes {cos.shape}, {sin.shape}")
        if max(seqlens) + max(seqlen_new, sq) > cos.shape[0]:
            raise ValueError(f"rotary_cos/rotary_sin: {cos.shape[0]} positions are too few for "
                             f"cache_seqlens + seqlen")
    if paged and (table.min(initial=0) < 0 or table.max(initial=0) >= k_cache.shape[0]):
        raise ValueError("block_table: entries out of range of the paged cache")

    def cache_rows(cache, bi, rows):
        if paged:
            page = cache.shape[1]
            return table[bi][rows // page], rows % page
        return np.full_like(rows, batch_idx[bi]), rows

    out = np.zeros((b, sq, h, v_cache.shape[-1]), prec.wide)
    lse = np.zeros((b, h, sq), prec.wide)
    for bi in range(b):
        qb = prec(q[bi])
        if k is not None:
            kb = k[bi]
            if rotary_cos is not None:
                pos_k = seqlens[bi] + np.arange(seqlen_new)
                kb = _rotate(kb, cos, sin, pos_k, rotary_interleaved, prec.wide)
                pos_q = seqlens[bi] + (np.arange(sq) if rotary_per_row else np.zeros(sq, int))
                qb = prec(_rotate(qb, cos, sin, pos_q, rotary_interleaved, prec.wide))
            rows = seqlens[bi] + np.arange(seqlen_new)
            with np.errstate(over="ignore"):
                k_cache[cache_rows(k_cache, bi, rows)] = np.asarray(kb).astype(k_cache.dtype)
                v_cache[cache_rows(v_cache, bi, rows)] = np.asarray(v[bi]).astype(v_cache.dtype)
        rows = np.arange(leftpad[bi], seqlens[bi] + seqlen_new)
        kb = k_cache[cache_rows(k_cache, bi, rows)]
        vb = v_cache[cache_rows(v_cache, bi, rows)]
        out[bi], lse[bi], _ = _fa_forward(qb, kb, vb, scale, float(softcap), window,
                                          None if slopes is None else slopes[bi], 0.0, None, prec)
    if return_softmax_lse:
        return prec.out(out), prec.stat(lse)
    return prec.out(out)


# --- low level forward / backward -----------------------------------------------------------

def _rng_state(seed):
    """(seed, offset) int64. The reference has no generator: it echoes ``seed`` (offset 0), or
    returns zeros when ``seed`` is None."""
    return np.array([0 if seed is None else int(seed), 0], dtype=np.int64)


def manual_seed(seed):
    """Accepted for signature parity with ``flash_attn_c.manual_seed``; the reference has no
    random generator (dropout comes from ``dropout_mask``), so this does nothing."""
    int(seed)


def flash_attn_fwd(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                   softcap=0.0, alibi_slopes=None, seed=None,
                   *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_fwd`` -> (out (b, sq, h, d), softmax_lse (b, h, sq), rng_state).

    rng_state is ``[seed, 0]`` (int64), or zeros when ``seed`` is None: the reference cannot
    reproduce the library's dropout stream, so it only echoes the seed.
    """
    prec, out, lse, _, _ = _fixed_forward(q, k, v, dropout_p, softmax_scale, causal, window_size,
                                          softcap, alibi_slopes, dropout_mask, compute_dtype)
    return prec.out(out), prec.stat(lse), _rng_state(seed)


def flash_attn_bwd(dout, q, k, v, out, softmax_lse, dropout_p=0.0, softmax_scale=None,
                   causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                   deterministic=False, rng_state=None,
                   *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_bwd`` -> (dq, dk, dv) with q's, k's, v's shapes (FA §5).

    Uses the GIVEN ``out`` and ``softmax_lse`` (so merged values from split/ring attention work):
    P = exp(score - lse), D = rowsum(dout * out), dV = (P*keep/(1-p))^T dO, dP = dO V^T,
    dS = P * (keep*dP/(1-p) - D), times (1 - tanh^2) with softcap, dQ = scale dS K,
    dK = scale dS^T Q, GQA gradients summed over each kv head's group. Rows with lse = +inf
    contribute nothing. ``rng_state`` is ignored: dropout comes from ``dropout_mask``.
    """
    prec = _Precision(compute_dtype)
    q, k, v = _check_qkv(q, k, v, 4)
    dout, out = _float_array(dout, "dout"), _float_array(out, "out")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    lse = np.asarray(softmax_lse, np.float64)
    if (dout.shape != q.shape[:3] + (v.shape[-1],) or out.shape != dout.shape
            or lse.shape != (b, h, sq)):
        raise ValueError(f"dout/out/softmax_lse: bad shapes {dout.shape}, {out.shape}, {lse.shape}")
    scale = _scale(softmax_scale, d)
    window = _fa_window(window_size, causal, sq, sk, alibi_slopes is not None)
    slopes = _slopes_per_batch(alibi_slopes, b, h)
    dropout_p, keep = _dropout(dropout_p, dropout_mask, (b, h, sq, sk))
    dq = np.zeros(q.shape, prec.wide)
    dk = np.zeros(k.shape, prec.wide)
    dv = np.zeros(v.shape, prec.wide)
    for bi in range(b):
        dq[bi], dk[bi], dv[bi] = _fa_backward(
            dout[bi], q[bi], k[bi], v[bi], out[bi], lse[bi], scale, float(softcap), window,
            None if slopes is None else slopes[bi], dropout_p,
            None if keep is None else keep[bi], prec)
    return prec.out(dq), prec.out(dk), prec.out(dv)


def flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                          softcap=0.0, alibi_slopes=None, seed=None,
                          *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_varlen_fwd`` -> (out (total_q, h, d), softmax_lse (h, total_q),
    rng_state); see ``flash_attn_varlen_func`` and ``flash_attn_fwd``."""
    prec, out, lse, _, _ = _varlen_forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, None, dropout_mask, compute_dtype)
    return prec.out(out), prec.stat(lse), _rng_state(seed)


def flash_attn_varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k,
                          max_seqlen_q, max_seqlen_k, dropout_p=0.0, softmax_scale=None,
                          causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          deterministic=False, rng_state=None,
                          *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``flash_attn_varlen_bwd`` -> (dq (total_q, h, d), dk, dv (total_k, hk, d)).

    Same math as ``flash_attn_bwd`` per sequence; softmax_lse is (h, total_q); the dropout mask
    is (b, h, max_seqlen_q, max_seqlen_k) with each sequence in the top-left corner. Rows and keys
    that no sequence covers get zero gradient.
    """
    prec = _Precision(compute_dtype)
    q, k, v = _check_qkv(q, k, v, 3)
    dout, out = _float_array(dout, "dout"), _float_array(out, "out")
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q")
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k")
    b = len(cu_q) - 1
    total_q, h, d = q.shape
    lse = np.asarray(softmax_lse, np.float64)
    if (lse.shape != (h, total_q) or dout.shape != (total_q, h, v.shape[-1])
            or out.shape != dout.shape):
        raise ValueError(f"dout/out/softmax_lse: bad shapes {dout.shape}, {out.shape}, {lse.shape}")
    max_seqlen_q, max_seqlen_k = int(max_seqlen_q), int(max_seqlen_k)
    scale = _scale(softmax_scale, d)
    window = _fa_window(window_size, causal, max_seqlen_q, max_seqlen_k, alibi_slopes is not None)
    slopes = _slopes_per_batch(alibi_slopes, b, h)
    dropout_p, keep = _dropout(dropout_p, dropout_mask, (b, h, max_seqlen_q, max_seqlen_k))
    dq = np.zeros(q.shape, prec.wide)
    dk = np.zeros(k.shape, prec.wide)
    dv = np.zeros(v.shape, prec.wide)
    for bi in range(b):
        q0, q1, k0, k1 = cu_q[bi], cu_q[bi + 1], cu_k[bi], cu_k[bi + 1]
        dq[q0:q1], dk[k0:k1], dv[k0:k1] = _fa_backward(
            dout[q0:q1], q[q0:q1], k[k0:k1], v[k0:k1], out[q0:q1], lse[:, q0:q1], scale,
            float(softcap), window, None if slopes is None else slopes[bi], dropout_p,
            None if keep is None else keep[bi, :, :q1 - q0, :k1 - k0], prec)
    return prec.out(dq), prec.out(dk), prec.out(dv)


def combine_partials(outs, lses, *, compute_dtype=np.float64):
    """Reference ``combine_partials`` (API.md §3): merge attention over disjoint key sets.

    ``outs[i]`` (b, sq, h, d) or varlen (t, h, d); ``lses[i]`` the matching softmax_lse
    (b, h, sq) or (h, t). lse = log(sum_i exp(lse_i)), out = sum_i exp(lse_i - lse) * out_i.
    Partials with lse = +inf (no visible key) contribute nothing; a row with no contributing
    partial gets out 0 and lse +inf. Returns (out, lse).
    """
    prec = _Precision(compute_dtype)
    if len(outs) == 0 or len(outs) != len(lses):
        raise ValueError("outs and lses: expected equally long, non-empty sequences")
    o = np.stack([np.asarray(x).astype(np.float64) for x in outs])       # (n, ..., h, d)
    l = np.stack([np.asarray(x, np.float64) for x in lses])              # (n, ..., h, s)
    if o.ndim == 5:      # (n, b, s, h, d), lse (n, b, h, s) -> move lse to (n, b, s, h)
        l = l.transpose(0, 1, 3, 2)
    elif o.ndim == 4:    # (n, t, h, d), lse (n, h, t) -> (n, t, h)
        l = l.transpose(0, 2, 1)
    else:
        raise ValueError(f"outs: expected (b, sq, h, d) or (t, h, d) arrays, got {o.shape[1:]}")
    if l.shape != o.shape[:-1]:
        raise ValueError(f"lses: shapes do not match outs {o.shape[1:]}")
    # An empty partial (lse +inf) gets weight 0 and its out is ignored entirely.
    l = np.where(l == np.inf, -np.inf, l)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        m = l.max(axis=0)
        m_safe = np.where(np.isfinite(m), m, 0.0)
        w = np.exp(l - m_safe)
        total = w.sum(axis=0)
        # total == 0: no partial saw a key; NaN inputs propagate.
        lse = np.where(total == 0, np.inf, m_safe + np.log(total))
        out = np.where(total[..., None] == 0, 0.0,
                       np.sum(np.where(w[..., None] == 0, 0.0, w[..., None] * o), axis=0)
                       / total[..., None])
    lse = lse.transpose(0, 2, 1) if lse.ndim == 3 else lse.T
    return prec.out(out), prec.stat(lse)


# The torch_npu half lives in its own file for readability.
from .reference_npu import (npu_fusion_attention, npu_flash_attention,  # noqa: E402
                            npu_fusion_attention_grad)
from .reference_npu_infer import (npu_prompt_flash_attention, npu_incre_flash_attention,  # noqa: E402,F401
                                  npu_fused_infer_attention_score)
