"""flash-attn 2.8 compatible functions on NumPy arrays (API.md section 2 and 3).

Same names, signatures, defaults and results as flash_attn.flash_attn_interface; the differences
are documented in the README (S_dmask holds normalized probabilities; any head dim 1..512; float32
and float64 accepted). These functions only validate and lay out arguments: the math is in C.
"""
import numpy as np

from . import _rng
from . import _validate as V
from ._core import backward, flash_window, forward


def _check_qkv(q, k, v, *, varlen):
    """Validate q/k/v (fixed (b, s, h, d) or varlen (t, h, d)); returns them with contiguous last
    dims."""
    nd, dims = (3, "(total, nheads, headdim)") if varlen else (4, "(batch, seqlen, nheads, headdim)")
    q = V.as_array(q, "q")
    k = V.as_array(k, "k")
    v = V.as_array(v, "v")
    V.check_float_dtype(q, "q")
    V.check_same_dtype(k, "k", q)
    V.check_same_dtype(v, "v", q)
    V.check_ndim(q, "q", nd, dims.replace("seqlen", "seqlen_q"))
    return q, k, v


def _check_kv_shapes(q, k, v, *, varlen, paged=False):
    kd = 4 if (paged or not varlen) else 3
    kdims = ("(num_blocks, page_block_size, nheads_k, headdim)" if paged else
             "(total_k, nheads_k, headdim)" if varlen else "(batch, seqlen_k, nheads_k, headdim)")
    V.check_ndim(k, "k", kd, kdims)
    V.check_ndim(v, "v", kd, kdims)
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if not varlen and k.shape[0] != q.shape[0]:
        raise ValueError(f"k: expected batch {q.shape[0]} (the batch of q), got {k.shape[0]}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k: expected head dim {q.shape[-1]} (the head dim of q), got {k.shape[-1]}")
    V.head_dim(q.shape[-1])
    V.gqa(q.shape[-2], k.shape[-2])
    if not varlen and q.shape[0] < 1:
        raise ValueError(f"q: batch size must be positive, got {q.shape[0]}")


def _options(d, b, h, sk_bound, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
             deterministic, return_attn_probs, causal):
    """The validated options; left/right: the kernel's band for keys bounded by sk_bound (the key
    length or max_seqlen_k)."""
    V.to_bool(causal, "causal")
    V.to_bool(deterministic, "deterministic")
    V.to_bool(return_attn_probs, "return_attn_probs")
    o = dict(
        dropout_p=V.dropout(dropout_p),
        scale=V.softmax_scale(softmax_scale, d),
        window=V.int_pair(window_size, "window_size"),
        softcap=V.softcap_value(softcap),
        alibi=V.alibi(alibi_slopes, b, h),
    )
    o["left"], o["right"] = flash_window(o["window"], bool(causal), sk_bound)
    return o


def _kernel_options(o, seed, offset):
    """The keywords every forward/backward kernel call takes from the options."""
    return dict(scale=o["scale"], softcap=o["softcap"], left=o["left"], right=o["right"],
                alibi=o["alibi"], dropout_p=o["dropout_p"], seed=seed, offset=offset)


def _run_fixed(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
               deterministic, return_softmax, seed=None):
    q, k, v = _check_qkv(q, k, v, varlen=False)
    _check_kv_shapes(q, k, v, varlen=False)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    o = _options(d, b, h, sk, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                 deterministic, return_softmax, causal)
    seed, offset = _rng.resolve(seed) if (o["dropout_p"] > 0 or seed is not None) else (0, 0)
    q, k, v = (V.last_dim_contiguous(x) for x in (q, k, v))
    out, lse, s_dmask = forward(
        q, k, v, out_shape=q.shape, lse_shape=(b, h, sq),
        s_dmask_shape=(b, h, sq, sk) if return_softmax else None,
        **_kernel_options(o, seed, offset))
    return out, lse, s_dmask, _rng.as_rng_state(seed, offset)


def _unpack(packed, name, nd, count, dims):
    """The `count` tensors of a packed qkv/kv array (packing axis third from the end) as views."""
    a = V.as_array(packed, name)
    V.check_ndim(a, name, nd, dims)
    if a.shape[nd - 3] != count:
        raise ValueError(f"{name}: expected size {count} in dim {nd - 3}, got shape "
                         f"{tuple(a.shape)}")
    return tuple(a[..., i, :, :] for i in range(count))


def _result(out, lse, s_dmask, return_attn_probs):
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """Exact attention softmax(q k^T * scale) v on (batch, seqlen, nheads, headdim) arrays.

    k/v may have fewer heads than q (GQA/MQA: query head i uses kv head i // (h // hk)). causal and
    window_size are bottom-right aligned; softcap > 0 applies softcap * tanh(s / softcap); alibi
    slopes (h,) or (b, h) add -slope * |i + sk - sq - j|. dropout_p > 0 drops probabilities with a
    counter-based generator seeded by manual_seed. Returns out (b, sq, h, d), or with
    return_attn_probs=True (out, softmax_lse (b, h, sq), S_dmask (b, h, sq, sk) float32 holding the
    normalized probabilities with dropped entries negated).
    """
    out, lse, s_dmask, _ = _run_fixed(q, k, v, dropout_p, softmax_scale, causal, window_size,
                                      softcap, alibi_slopes, deterministic, return_attn_probs)
    return _result(out, lse, s_dmask, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func on qkv of shape (batch, seqlen, 3, nheads, headdim) (views, no copies)."""
    q, k, v = _unpack(qkv, "qkv", 5, 3, "(batch, seqlen, 3, nheads, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func on kv of shape (batch, seqlen_k, 2, nheads_k, headdim) (views, no copies)."""
    k, v = _unpack(kv, "kv", 5, 2, "(batch, seqlen_k, 2, nheads_k, headdim)")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                           alibi_slopes, deterministic, return_attn_probs)


def flash_attn_fwd(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                   softcap=0.0, alibi_slopes=None, seed=None):
    """Low-level forward: returns (out, softmax_lse, rng_state).

    rng_state is an int64 (2,) array (seed, offset) that flash_attn_bwd uses to replay the dropout
    mask. seed=None draws a fresh state from the global generator; an int seeds (seed, 0); a (2,)
    array reuses an earlier rng_state.
    """
    out, lse, _, rng_state = _run_fixed(q, k, v, dropout_p, softmax_scale, causal, window_size,
                                        softcap, alibi_slopes, False, False, seed=seed)
    return out, lse, rng_state


# ---- variable-length batches ---------------------------------------------------------------------

def _cu_seqlens(cu, name, rows):
    cu = V.index_vector(cu, name)
    if cu.shape[0] < 2:
        raise ValueError(f"{name}: expected (batch + 1,) entries with batch >= 1, got {cu.shape[0]}")
    if cu[0] != 0:
        raise ValueError(f"{name}: must start at 0, got {cu[0]}")
    if np.any(np.diff(cu) < 0):
        raise ValueError(f"{name}: must be non-decreasing, got {cu.tolist()}")
    if cu[-1] > rows:
        raise ValueError(f"{name}: last entry {cu[-1]} exceeds the {rows} rows of the packed tensor")
    return cu


def _cu_seqlens_k(cu_seqlens_k, rows, b):
    """cu_seqlens_k of a non-paged call: as cu_seqlens_q, with the same batch."""
    cu_k = _cu_seqlens(cu_seqlens_k, "cu_seqlens_k", rows)
    if cu_k.shape[0] != b + 1:
        raise ValueError(f"cu_seqlens_k: expected {b + 1} entries (as cu_seqlens_q), got {cu_k.shape[0]}")
    return cu_k


def _max_seqlen(m, name, cu):
    m = V.to_int(m, name)
    longest = int(np.diff(cu).max()) if cu.shape[0] > 1 else 0
    if m < longest:
        raise ValueError(f"{name}: {m} is smaller than the longest sequence ({longest}); it must be an upper bound")
    return m


def _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_softmax, block_table=None, seed=None):
    q, k, v = _check_qkv(q, k, v, varlen=True)
    paged = block_table is not None
    _check_kv_shapes(q, k, v, varlen=True, paged=paged)
    total_q, h, d = q.shape
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q)
    b = cu_q.shape[0] - 1
    extra = {}
    if paged:
        bt = V.index_vector(np.asarray(block_table).reshape(-1), "block_table", min_value=0)
        bt_arr = V.as_array(block_table, "block_table")
        V.check_ndim(bt_arr, "block_table", 2, "(batch, max_num_blocks_per_seq)")
        if bt_arr.shape[0] != b:
            raise ValueError(f"block_table: expected {b} rows (the batch of cu_seqlens_q), got {bt_arr.shape[0]}")
        if bt.size and bt.max() >= k.shape[0]:
            raise ValueError(f"block_table: entry {bt.max()} out of range for {k.shape[0]} blocks")
        cu_k = V.index_vector(cu_seqlens_k, "cu_seqlens_k", b + 1, min_value=0)
        if cu_k[0] != 0 or np.any(np.diff(cu_k) < 0):
            raise ValueError(f"cu_seqlens_k: must start at 0 and be non-decreasing, got {cu_k.tolist()}")
        capacity = bt_arr.shape[1] * k.shape[1]
        if np.diff(cu_k).max() > capacity:
            raise ValueError(f"cu_seqlens_k: a sequence of {np.diff(cu_k).max()} keys exceeds the paged capacity "
                             f"{capacity} (max_num_blocks_per_seq * page_block_size)")
        extra = dict(block_table=bt.reshape(bt_arr.shape), seqlen_k=np.ascontiguousarray(np.diff(cu_k)))
    else:
        cu_k = _cu_seqlens_k(cu_seqlens_k, k.shape[0], b)
        extra = dict(cu_k=cu_k)
    max_sq = _max_seqlen(max_seqlen_q, "max_seqlen_q", cu_q)
    max_sk = _max_seqlen(max_seqlen_k, "max_seqlen_k", cu_k)
    o = _options(d, b, h, max_sk, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                 deterministic, return_softmax, causal)
    seed, offset = _rng.resolve(seed) if (o["dropout_p"] > 0 or seed is not None) else (0, 0)
    q, k, v = (V.last_dim_contiguous(x) for x in (q, k, v))
    out, lse, s_dmask = forward(
        q, k, v, out_shape=q.shape, lse_shape=(h, total_q), varlen=True,
        s_dmask_shape=(b, h, max_sq, max_sk) if return_softmax else None, cu_q=cu_q, **extra,
        **_kernel_options(o, seed, offset))
    return out, lse, s_dmask, _rng.as_rng_state(seed, offset)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """flash_attn_func on packed sequences: q (total_q, h, d), k/v (total_k, hk, d), sequence i in
    rows cu_seqlens[i]:cu_seqlens[i+1]. max_seqlen_* are upper bounds (lengths come from
    cu_seqlens). With block_table (batch, max_blocks), k/v are paged (num_blocks, page_block_size,
    hk, d) and cu_seqlens_k gives each sequence's key count. Causal and windows align per sequence.
    softmax_lse is (h, total_q); S_dmask (b, h, max_seqlen_q, max_seqlen_k), each sequence top-left.
    """
    out, lse, s_dmask, _ = _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                       max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                       softcap, alibi_slopes, deterministic, return_attn_probs,
                                       block_table=block_table)
    return _result(out, lse, s_dmask, return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func on qkv of shape (total, 3, nheads, headdim) (views, no copies)."""
    q, k, v = _unpack(qkv, "qkv", 4, 3, "(total, 3, nheads, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func on kv of shape (total_k, 2, nheads_k, headdim) (views, no copies)."""
    k, v = _unpack(kv, "kv", 4, 2, "(total_k, 2, nheads_k, headdim)")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                  dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                          softcap=0.0, alibi_slopes=None, seed=None):
    """Low-level varlen forward: (out, softmax_lse (h, total_q), rng_state) as flash_attn_fwd."""
    out, lse, _, rng_state = _run_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                         max_seqlen_k, dropout_p, softmax_scale, causal,
                                         window_size, softcap, alibi_slopes, False, False,
                                         seed=seed)
    return out, lse, rng_state


# ---- backward -------------------------------------------------------------------------------

def _check_lse(lse, q, shape, dims="(batch, nheads, seqlen_q)"):
    """softmax_lse as the forward returned it: the accumulator dtype, the given shape."""
    lse = V.as_array(lse, "softmax_lse")
    want = np.float64 if q.dtype == np.float64 else np.float32
    if lse.dtype != want:
        raise TypeError(f"softmax_lse: expected dtype {np.dtype(want).name} (for {q.dtype} inputs), got {lse.dtype}")
    V.check_shape(lse, "softmax_lse", shape, dims)
    return lse


def _check_grad_inputs(dout, out, q):
    dout = V.as_array(dout, "dout")
    out = V.as_array(out, "out")
    V.check_same_dtype(dout, "dout", q)
    V.check_same_dtype(out, "out", q)
    V.check_shape(dout, "dout", q.shape, "(the shape of q)")
    V.check_shape(out, "out", q.shape, "(the shape of q)")
    return dout, out


def _replay_state(dropout_p, rng_state):
    if dropout_p > 0:
        if rng_state is None:
            raise ValueError("rng_state: required when dropout_p > 0 (pass the rng_state the forward returned)")
        return _rng.resolve(rng_state)
    return 0, 0


def flash_attn_bwd(dout, q, k, v, out, softmax_lse, dropout_p=0.0, softmax_scale=None, causal=False,
                   window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                   rng_state=None):
    """Low-level backward of flash_attn_fwd: returns (dq, dk, dv).

    dout, out: (batch, seqlen_q, nheads, headdim) like q; out and softmax_lse as flash_attn_fwd
    returned them, and the same options. P is rebuilt from softmax_lse (rows with lse +inf give no
    gradient) and, with dropout_p > 0, the dropout mask is replayed from rng_state (required then).
    dk/dv have k/v's shape (for GQA/MQA summed over each kv head's group of query heads); all three
    are in the input dtype, accumulated in float32 (float64 for float64 inputs) and rounded once.
    Deterministic for any thread count (the flag is accepted and has nothing to change).
    """
    q, k, v = _check_qkv(q, k, v, varlen=False)
    _check_kv_shapes(q, k, v, varlen=False)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    dout, out = _check_grad_inputs(dout, out, q)
    lse = _check_lse(softmax_lse, q, (b, h, sq))
    o = _options(d, b, h, sk, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                 deterministic, False, causal)
    seed, offset = _replay_state(o["dropout_p"], rng_state)
    dout, q, k, v, out = (V.last_dim_contiguous(x) for x in (dout, q, k, v, out))
    dq, dk, dv, _ = backward(dout, q, k, v, out, lse=lse, **_kernel_options(o, seed, offset))
    return dq, dk, dv


def flash_attn_varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                          max_seqlen_k, dropout_p=0.0, softmax_scale=None, causal=False,
                          window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                          deterministic=False, rng_state=None):
    """Low-level backward of flash_attn_varlen_fwd: returns (dq, dk, dv) in the packed layouts.

    dout, out: (total_q, nheads, headdim) like q; softmax_lse (nheads, total_q) as the forward
    returned it; the same cu_seqlens, bounds and options; rng_state replays dropout. Rows of the
    packed tensors that belong to no sequence get zero gradients. Paged K/V has no backward (as
    upstream).
    """
    q, k, v = _check_qkv(q, k, v, varlen=True)
    _check_kv_shapes(q, k, v, varlen=True)
    total_q, h, d = q.shape
    cu_q = _cu_seqlens(cu_seqlens_q, "cu_seqlens_q", total_q)
    b = cu_q.shape[0] - 1
    cu_k = _cu_seqlens_k(cu_seqlens_k, k.shape[0], b)
    _max_seqlen(max_seqlen_q, "max_seqlen_q", cu_q)
    max_sk = _max_seqlen(max_seqlen_k, "max_seqlen_k", cu_k)
    dout, out = _check_grad_inputs(dout, out, q)
    lse = _check_lse(softmax_lse, q, (h, total_q), "(nheads, total_q)")
    o = _options(d, b, h, max_sk, dropout_p, softmax_scale, window_size, softcap, alibi_slopes,
                 deterministic, False, causal)
    seed, offset = _replay_state(o["dropout_p"], rng_state)
    dout, q, k, v, out = (V.last_dim_contiguous(x) for x in (dout, q, k, v, out))
    dq, dk, dv, _ = backward(dout, q, k, v, out, lse=lse, varlen=True, cu_q=cu_q, cu_k=cu_k,
                             **_kernel_options(o, seed, offset))
    return dq, dk, dv
