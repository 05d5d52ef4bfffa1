"""Decoding with a KV cache (flash-attn 2.8's flash_attn_with_kvcache) and the partial-result
combine used by split-KV and ring attention.

Everything is validated before the cache is touched: a rejected call leaves k_cache/v_cache
unchanged. Appending is a copy into the caller's arrays (rotated k through the C rotary kernel);
attention then runs on the updated cache through the common forward kernel, which reads the cache
in place (batch index, leftpad, paging are index arguments, never gathers).
"""
import numpy as np

from . import _C
from . import _validate as V
from ._core import flash_window, forward
from ._runtime import empty


def _cache_seqlens(cache_seqlens, b, capacity):
    if cache_seqlens is None:
        return None
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, bool):
        arr = np.full((b,), int(cache_seqlens), np.int64)
    else:
        arr = V.index_vector(cache_seqlens, "cache_seqlens", b)
    if arr.size and (arr.min() < 0 or arr.max() > capacity):
        raise ValueError(f"cache_seqlens: entries must be in [0, {capacity}] (the cache capacity), "
                         f"got {arr.tolist()}")
    return arr


def _companions(x, y, names, q, nd, dims):
    """Two arrays given together (rotary cos/sin, new k/v) with q's dtype and nd dims."""
    pair = tuple(V.as_array(a, name) for a, name in zip((x, y), names))
    for a, name in zip(pair, names):
        V.check_same_dtype(a, name, q)
        V.check_ndim(a, name, nd, dims)
    return pair


def _rotary_tables(rotary_cos, rotary_sin, q, capacity, d):
    if rotary_cos is None and rotary_sin is None:
        return None, None
    if rotary_cos is None or rotary_sin is None:
        raise ValueError("rotary_cos/rotary_sin: give both or neither")
    cos, sin = _companions(rotary_cos, rotary_sin, ("rotary_cos", "rotary_sin"), q, 2,
                           "(seqlen_ro, rotary_dim / 2)")
    if sin.shape != cos.shape:
        raise ValueError(f"rotary_sin: expected the shape of rotary_cos {cos.shape}, got {sin.shape}")
    rot = 2 * cos.shape[1]
    if rot > d:
        raise ValueError(f"rotary_cos: rotary_dim {rot} must be <= headdim {d}")
    if cos.shape[0] < capacity:
        raise ValueError(f"rotary_cos: {cos.shape[0]} rows; cos/sin seqlen must be at least the "
                         f"seqlen of the KV cache ({capacity})")
    return np.ascontiguousarray(cos), np.ascontiguousarray(sin)


def _rotate(x, cos, sin, positions, interleaved):
    y = np.empty(x.shape, x.dtype)
    _C.rotary(x, y, cos, sin, np.ascontiguousarray(positions, np.int64), bool(interleaved))
    return y


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """Attention of q (b, sq, h, d) against a KV cache, appending new keys/values first.

    k_cache/v_cache: (b_cache, seqlen_cache, hk, d), or paged (num_blocks, page_block_size, hk, d)
    with block_table (b, max_blocks_per_seq). When k/v (b, seqlen_new, hk, d) are given they are
    written in place at cache_seqlens[b] (the caches must be writable), k rotated first when
    rotary_cos/rotary_sin (seqlen_ro, rotary_dim / 2) are given (q too: at cache_seqlens + i when
    causal or windowed, else at cache_seqlens). Keys [cache_leftpad, cache_seqlens + seqlen_new)
    are attended; causal/window/alibi positions count from the leftpad. cache_batch_idx picks
    cache rows. num_splits (0 = automatic) splits the keys across threads with an exact
    log-sum-exp combine. Returns out, or (out, softmax_lse (b, h, sq)) with return_softmax_lse.
    No backward, as upstream.
    """
    q = V.as_array(q, "q")
    k_cache = V.as_array(k_cache, "k_cache")
    v_cache = V.as_array(v_cache, "v_cache")
    V.check_float_dtype(q, "q")
    V.check_ndim(q, "q", 4, "(batch, seqlen_q, nheads, headdim)")
    paged = block_table is not None
    cdims = ("(num_blocks, page_block_size, nheads_k, headdim)" if paged
             else "(batch_cache, seqlen_cache, nheads_k, headdim)")
    for a, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
        V.check_same_dtype(a, name, q)
        V.check_ndim(a, name, 4, cdims)
        if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
            raise ValueError(f"{name}: must have contiguous last dimension")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"v_cache: expected the shape of k_cache {k_cache.shape}, got {v_cache.shape}")
    b, sq, h, d = q.shape
    hk = k_cache.shape[2]
    if b < 1:
        raise ValueError(f"q: batch size must be positive, got {b}")
    if k_cache.shape[3] != d:
        raise ValueError(f"k_cache: expected head dim {d} (the head dim of q), got {k_cache.shape[3]}")
    V.head_dim(d)
    V.gqa(h, hk, "k_cache")

    bt = None
    if paged:
        bt_arr = V.as_array(block_table, "block_table")
        if bt_arr.dtype.kind not in "iu":
            raise TypeError(f"block_table: expected an int32 array, got dtype {bt_arr.dtype}")
        V.check_ndim(bt_arr, "block_table", 2, "(batch, max_num_blocks_per_seq)")
        if bt_arr.shape[0] != b:
            raise ValueError(f"block_table: expected {b} rows (the batch of q), got {bt_arr.shape[0]}")
        bt = np.ascontiguousarray(bt_arr, np.int64)
        if bt.size and (bt.min() < 0 or bt.max() >= k_cache.shape[0]):
            raise ValueError(f"block_table: entries must be in [0, {k_cache.shape[0]}) (num_blocks), "
                             f"got [{bt.min()}, {bt.max()}]")
        if cache_batch_idx is not None:
            raise ValueError("cache_batch_idx: Paged KVcache does not support cache_batch_idx")
        if cache_leftpad is not None:
            raise ValueError("cache_leftpad: Paged KV and leftpad are not supported together")
        capacity = bt.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]

    batch_idx = None
    if cache_batch_idx is not None:
        batch_idx = V.index_vector(cache_batch_idx, "cache_batch_idx", b)
        if batch_idx.size and (batch_idx.min() < 0 or batch_idx.max() >= k_cache.shape[0]):
            raise ValueError(f"cache_batch_idx: entries must be in [0, {k_cache.shape[0]}), got {batch_idx.tolist()}")
    elif not paged and k_cache.shape[0] < b:
        raise ValueError(f"k_cache: batch {k_cache.shape[0]} is smaller than q's batch {b}; pass cache_batch_idx")
    seqlens = _cache_seqlens(cache_seqlens, b, capacity)

    s_new = 0
    if k is not None or v is not None:
        if k is None or v is None:
            raise ValueError("k/v: If key is supplied, value must also be passed in (give both)")
        if seqlens is None:
            raise ValueError("cache_seqlens: If key is supplied, seqlens_k must also be passed in")
        k, v = _companions(k, v, ("k", "v"), q, 4, "(batch, seqlen_new, nheads_k, headdim)")
        if k.shape != v.shape or k.shape[0] != b or k.shape[2] != hk or k.shape[3] != d:
            raise ValueError(f"k/v: expected shape ({b}, seqlen_new, {hk}, {d}), got {k.shape} and {v.shape}")
        s_new = k.shape[1]
        if seqlens.size and seqlens.max() + s_new > capacity:
            raise ValueError(f"cache_seqlens: max(cache_seqlens) + seqlen_new = {seqlens.max() + s_new} exceeds "
                             f"the cache capacity {capacity}")
        for a, name in ((k_cache, "k_cache"), (v_cache, "v_cache")):
            if not a.flags.writeable:
                raise ValueError(f"{name}: must be writable to append k/v")
    leftpad = None
    if cache_leftpad is not None:
        leftpad = V.index_vector(cache_leftpad, "cache_leftpad", b, min_value=0)
        ends = seqlens if seqlens is not None else np.full(b, capacity)
        if np.any(leftpad > ends):
            raise ValueError(f"cache_leftpad: entries must be <= cache_seqlens, got {leftpad.tolist()}")
    cos, sin = _rotary_tables(rotary_cos, rotary_sin, q, capacity, d)
    if cos is not None and s_new == 0:
        raise ValueError("rotary_cos: If rotary cos/sin are provided, new key / value to be appended "
                         "to KV cache must also be provided")
    ns = V.to_int(num_splits, "num_splits")
    if not 0 <= ns <= 128:
        raise ValueError(f"num_splits: expected 0 (automatic) to 128, got {ns}")
    V.to_bool(rotary_interleaved, "rotary_interleaved")
    V.to_bool(return_softmax_lse, "return_softmax_lse")
    V.to_bool(causal, "causal")
    scale = V.softmax_scale(softmax_scale, d)
    softcap = V.softcap_value(softcap)
    slopes = V.alibi(alibi_slopes, b, h)
    window = V.int_pair(window_size, "window_size")
    left, right = flash_window(window, bool(causal), capacity)
    q = V.last_dim_contiguous(q)

    qpos = None
    if cos is not None:
        # q rows sit at their own positions when a band (causal/window) relates them to keys,
        # else all at the first new position (flash-attn 2.8).
        banded = left is not None or right is not None
        qoff = np.arange(sq) if banded else np.zeros(sq, np.int64)
        qpos = seqlens[:, None] + qoff[None, :]
        if qpos.max() >= cos.shape[0]:
            raise ValueError(f"rotary_cos: q position {qpos.max()} is outside the {cos.shape[0]} rows "
                             f"of the cos/sin tables")

    # ---- everything checked: from here on the call cannot be rejected ----
    if cos is not None:
        kpos = seqlens[:, None] + np.arange(s_new)[None, :]
        k = _rotate(k, cos, sin, kpos, rotary_interleaved)
        q = _rotate(q, cos, sin, qpos, rotary_interleaved)
    if s_new:
        rows = seqlens[:, None] + np.arange(s_new)[None, :]  # (b, s_new) cache positions
        if paged:
            page = k_cache.shape[1]
            blk = np.take_along_axis(bt, rows // page, axis=1)
            k_cache[blk, rows % page] = k
            v_cache[blk, rows % page] = v
        else:
            cb = (batch_idx if batch_idx is not None else np.arange(b))[:, None]
            k_cache[cb, rows] = k
            v_cache[cb, rows] = v
    ends = (seqlens + s_new) if seqlens is not None else np.full(b, capacity, np.int64)
    start = leftpad if leftpad is not None else np.zeros(b, np.int64)
    extra = dict(seqlen_k=np.ascontiguousarray(ends - start, np.int64))
    if leftpad is not None:
        extra["k_start"] = leftpad
    if batch_idx is not None:
        extra["k_batch_idx"] = batch_idx
    if paged:
        extra["block_table"] = bt
    out, lse, _ = forward(q, k_cache, v_cache, scale=scale, out_shape=q.shape, lse_shape=(b, h, sq),
                          softcap=softcap, left=left, right=right, alibi=slopes, num_splits=ns,
                          **extra)
    return (out, lse) if return_softmax_lse else out


def combine_partials(outs, lses):
    """Merge attention results computed over disjoint key sets (split-KV, ring attention).

    outs: sequence of partial outputs (b, sq, h, d) (or varlen (t, h, d)), lses: the matching
    softmax_lse arrays (b, h, sq) (or (h, t)). Returns (out, lse) equal to attention over the union
    of the keys: lse = log(sum exp(lse_i)), out = sum exp(lse_i - lse) out_i. A partial whose lse is
    +inf (its rows saw no key) contributes nothing; rows no partial saw give 0 and +inf.
    """
    if isinstance(outs, np.ndarray) or isinstance(lses, np.ndarray):
        raise TypeError("outs/lses: expected sequences (lists or tuples) of arrays")
    outs = [V.as_array(o, f"outs[{i}]") for i, o in enumerate(outs)]
    lses = [V.as_array(x, f"lses[{i}]") for i, x in enumerate(lses)]
    if not outs or len(outs) != len(lses):
        raise ValueError(f"outs/lses: expected two non-empty sequences of equal length, got {len(outs)} and {len(lses)}")
    o0 = outs[0]
    V.check_float_dtype(o0, "outs[0]")
    varlen = o0.ndim == 3
    if o0.ndim not in (3, 4):
        raise ValueError(f"outs[0]: expected (b, sq, h, d) or (total, h, d), got shape {o0.shape}")
    lse_dtype = np.float64 if o0.dtype == np.float64 else np.float32
    lse_shape = (o0.shape[1], o0.shape[0]) if varlen else (o0.shape[0], o0.shape[2], o0.shape[1])
    for i, (o, x) in enumerate(zip(outs, lses)):
        V.check_same_dtype(o, f"outs[{i}]", o0, "outs[0]")
        if o.shape != o0.shape:
            raise ValueError(f"outs[{i}]: expected shape {o0.shape}, got {o.shape}")
        if x.shape != lse_shape:
            raise ValueError(f"lses[{i}]: expected shape {lse_shape}, got {x.shape}")
        if x.dtype != lse_dtype:
            raise TypeError(f"lses[{i}]: expected dtype {np.dtype(lse_dtype)}, got {x.dtype}")
    outs = [V.last_dim_contiguous(o) for o in outs]
    out = empty(o0.shape, o0.dtype)
    lse = empty(lse_shape, lse_dtype)
    if varlen:
        _C.combine(tuple(o[None] for o in outs), tuple(x[None] for x in lses), out[None], lse[None])
    else:
        _C.combine(tuple(outs), tuple(lses), out, lse)
    return out, lse
