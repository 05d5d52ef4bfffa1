"""torch_npu inference attention on NumPy arrays: PFA, IFA and FIA (spec section 10).

``npu_prompt_flash_attention`` (prefill), ``npu_incre_flash_attention`` (decode) and
``npu_fused_infer_attention_score`` (both, dispatching on the query length) with torch_npu's names,
keyword-only options, defaults and return conventions. Like every front-end this module does no
attention math: it validates the arguments, turns layouts into (batch, row, head, dim) stride views,
per-batch lengths, left padding and paged caches into the kernel's seqlen_k / k_start / block_table,
sparse_mode and pre/next_tokens into the visible-key band, atten_mask and pse_shift into strided
views, and calls the one forward kernel.

Semantics shared by the three ops (docs/npu_infer.md lists every difference from the NPU):

- score = scale * q.k + pse_shift (pse added after scaling, unlike npu_fusion_attention), masked
  entries -1e12 (a row whose visible keys are all masked averages value, as on the NPU), keys
  outside the sparse band or the actual lengths are not visited (a row that sees no key gives 0).
- The band and the right-down anchor use each batch's actual lengths.
- Rows past a batch's actual query length are 0 (their softmax_lse +inf).
"""
from types import SimpleNamespace

import numpy as np

from . import _validate as V
from ._core import forward
from ._npu_args import (INT32_MAX, LAYOUT_DIMS, check_rank, int_list, kernel_view,
                        qkv_arrays)
from ._runtime import empty

# The inference kernels replace masked scores by -1e12 (BOOL_ATTEN_MASK_SCALAR_VALUE in CANN's
# FIA/IFA/PFA vector code), not -inf and not the training op's -FLT_MAX: a fully masked row then
# averages value over its visible keys, its lse is about -1e12, and the invalid-row correction
# recognises it by that max.
MASK_FILL = -1e12
_COMPRESSED = 2048  # sparse_mode 2/3/4 take the [2048, 2048] lower-triangular mask

_PFA_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "TND")
_IFA_LAYOUTS = ("BSH", "BSND", "BNSD")
_FIA_LAYOUTS = ("BSH", "BSND", "BNSD", "BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD", "TND",
                "TND_NTD", "NTD_TND")
_QUANT = "quantization is not supported yet (int8 inputs/outputs and their scales and offsets)"


# ---- argument helpers ----------------------------------------------------------------------------

def _reject(reason, **args):
    """NotImplementedError for the first option that is set: nothing is silently ignored."""
    for name, value in args.items():
        if value is not None:
            raise NotImplementedError(f"{name}: {reason}")


def _reject_modes(**modes):
    for name, value in modes.items():
        if V.to_int(value, name) != 0:
            raise NotImplementedError(f"{name}: {_QUANT}")


def _layouts(input_layout, allowed, op):
    """('BNSD_BSND' ->) (input layout, output layout)."""
    if not isinstance(input_layout, str):
        raise TypeError(f"input_layout: expected a str, got {type(input_layout).__name__}")
    if input_layout not in allowed:
        raise ValueError(f"input_layout: {op} accepts {', '.join(allowed)}, got {input_layout!r}")
    parts = input_layout.split("_")
    return parts[0], parts[-1]


def _heads(num_heads, num_key_value_heads):
    n = V.to_int(num_heads, "num_heads")
    if n <= 0:
        raise ValueError(f"num_heads: expected a positive integer, got {n}")
    nkv = V.to_int(num_key_value_heads, "num_key_value_heads")
    if nkv < 0:
        raise ValueError(f"num_key_value_heads: expected >= 0 (0 means num_heads), got {nkv}")
    nkv = nkv or n  # torch_npu: 0 means "as many kv heads as query heads"
    if n % nkv:
        raise ValueError(f"num_key_value_heads: {nkv} must divide num_heads {n}")
    return n, nkv


def _per_batch(x, name, b, limit):
    """Per-batch lengths (not cumulative): one entry is broadcast, extra entries are dropped (as
    torch_npu does), each must lie in [0, limit]."""
    a = int_list(x, name, scalar=True)
    if a.shape[0] == 1:
        a = np.repeat(a, b)
    elif a.shape[0] < b:
        raise ValueError(f"{name}: expected 1 or at least {b} (batch) entries, got {a.shape[0]}")
    a = np.ascontiguousarray(a[:b])
    if a.max() > limit:
        raise ValueError(f"{name}: entries must be <= {limit}, got {a.tolist()}")
    return a


def _cumulative(x, name, total):
    """TND lists are cumulative ends without a leading 0; returns the cu_seqlens with it."""
    a = int_list(x, name, scalar=True)
    if np.any(np.diff(a) < 0):
        raise ValueError(f"{name}: input_layout TND expects cumulative (non-decreasing) ends, got "
                         f"{a.tolist()}")
    if a[-1] > total:
        raise ValueError(f"{name}: the sequences end at {a[-1]} but the tensor has T = {total}")
    return np.concatenate([[0], a]).astype(np.int64)


# ---- q / k / v ---------------------------------------------------------------------------------

def _bsnd(a, name, layout, n):
    """A query/key/value tensor as its (b, s, n, d) (TND/NTD: (t, n, d)) view."""
    check_rank(a, name, layout)
    if layout == "BSH":
        if a.shape[-1] % n or a.shape[-1] == 0:
            raise ValueError(f"{name}: hidden size {a.shape[-1]} is not a positive multiple of its "
                             f"{n} heads")
    return kernel_view(a, layout, n)


def _cache(a, name, layout, nkv, d):
    """A paged cache as its (num_blocks, block_size, nkv, d) view: (blocks, block_size, H) in every
    layout, (blocks, nkv, block_size, D) with BNSD, (blocks, block_size, nkv, D) with BSND."""
    if a.ndim == 3:
        if a.shape[-1] != nkv * d:
            raise ValueError(f"{name}: paged cache (num_blocks, block_size, H) needs H = "
                             f"num_key_value_heads * D = {nkv * d}, got shape {tuple(a.shape)}")
        return np.reshape(a, a.shape[:2] + (nkv, d), copy=False)
    if a.ndim == 4 and layout in ("BNSD", "BSND"):
        c = a.transpose(0, 2, 1, 3) if layout == "BNSD" else a
        if c.shape[2:] != (nkv, d):
            raise ValueError(f"{name}: paged cache with input_layout {layout} expects "
                             f"{'(num_blocks, N, block_size, D)' if layout == 'BNSD' else '(num_blocks, block_size, N, D)'}"
                             f" with N = {nkv}, D = {d}, got shape {tuple(a.shape)}")
        return c
    raise ValueError(f"{name}: paged cache expects (num_blocks, block_size, H)"
                     + (" or the 4-D form of the layout" if layout in ("BNSD", "BSND") else "")
                     + f", got shape {tuple(a.shape)}")


def _geometry(query, key, value, layout, n, nkv, paged):
    q, k, v = qkv_arrays(query, key, value)
    # Only a strided last dim is copied (API.md section 1).
    q, k, v = (V.last_dim_contiguous(a) for a in (q, k, v))
    q4 = _bsnd(q, "query", layout, n)
    if q4.shape[-2] != n:
        raise ValueError(f"num_heads: is {n}, but query has {q4.shape[-2]} heads "
                         f"(input_layout {layout} {LAYOUT_DIMS[layout]})")
    d = q4.shape[-1]
    V.head_dim(d, "query")
    if paged:
        k4, v4 = _cache(k, "key", layout, nkv, d), _cache(v, "value", layout, nkv, d)
    else:
        if layout == "BSH" and k.ndim == 3 and k.shape[-1] != nkv * d:
            raise ValueError(f"key: hidden size {k.shape[-1]} must be num_key_value_heads ({nkv}; 0 "
                             f"means num_heads) * D ({d}, from query and num_heads)")
        k4, v4 = _bsnd(k, "key", layout, nkv), _bsnd(v, "value", layout, nkv)
        for a, name in ((k4, "key"), (v4, "value")):
            if a.shape[-2] != nkv:
                raise ValueError(f"num_key_value_heads: expects {nkv} kv heads (0 means num_heads), "
                                 f"but {name} has {a.shape[-2]}")
    if k4.shape[-1] != d:
        raise ValueError(f"key: head dim {k4.shape[-1]} differs from the query head dim {d}")
    if v4.shape != k4.shape:
        raise ValueError(f"value: shape {tuple(value.shape)} must match key {tuple(key.shape)} "
                         f"(a value head dim other than key's is not supported yet)")
    tnd = q4.ndim == 3
    if not tnd:
        if q4.shape[0] < 1 or q4.shape[1] < 1:
            raise ValueError(f"query: batch and sequence length must be >= 1, got shape "
                             f"{tuple(query.shape)}")
        if not paged and k4.shape[0] != q4.shape[0]:
            raise ValueError(f"key/value: batch {k4.shape[0]} differs from the query batch "
                             f"{q4.shape[0]}")
    return SimpleNamespace(layout=layout, tnd=tnd, h=n, hk=nkv, d=d, q=q4, k=k4, v=v4,
                           paged=paged, b=None if tnd else q4.shape[0], sq=q4.shape[-3],
                           dtype=q.dtype)


def _paging(g, block_table, block_size):
    """block_table (B, max_blocks) int32/int64 -> the kernel's int64 table. Entries past each
    sequence's last block are never read, so they may hold anything (torch_npu pads with garbage
    or -1); they are replaced by 0 to keep the kernel's range check meaningful."""
    bt = V.as_array(block_table, "block_table")
    if bt.dtype.kind not in "iu":
        raise TypeError(f"block_table: expected an int32 array, got dtype {bt.dtype}")
    if bt.ndim != 2 or bt.shape[0] != g.b or bt.shape[1] < 1:
        raise ValueError(f"block_table: expected shape ({g.b}, max_blocks_per_seq) (batch of query), "
                         f"got {tuple(bt.shape)}")
    bs = V.to_int(block_size, "block_size")
    if bs != g.k.shape[1]:
        raise ValueError(f"block_size: is {bs}, but the key cache holds blocks of {g.k.shape[1]} "
                         f"tokens (shape {tuple(g.k.shape)})")
    if bs < 1:
        raise ValueError(f"block_size: expected a positive integer, got {bs}")
    g.kv_cap = bt.shape[1] * bs
    if g.lk is None:
        raise ValueError("actual_seq_lengths (of the keys): required with block_table")
    if g.lk.max() > g.kv_cap:
        raise ValueError(f"actual_seq_lengths (of the keys): {g.lk.max()} exceeds the "
                         f"{bt.shape[1]} blocks x {bs} tokens that block_table addresses")
    used = (np.arange(bt.shape[1])[None, :] * bs) < g.lk[:, None]
    table = np.where(used, bt, 0).astype(np.int64)
    bad = table[used]
    if bad.size and (bad.min() < 0 or bad.max() >= g.k.shape[0]):
        raise ValueError(f"block_table: entries in use must be in [0, {g.k.shape[0]}) (num_blocks), "
                         f"got {bad.min()}..{bad.max()}")
    return np.ascontiguousarray(table)


def _kv_padding(g, kv_padding_size):
    """kv_padding_size: the valid keys of batch b are [S - pad - len_b, S - pad) (left padding).
    A batch whose range would start before 0 sees no key (0 output), as on the NPU."""
    p = V.as_array(kv_padding_size, "kv_padding_size")
    if p.dtype.kind not in "iu":
        raise TypeError(f"kv_padding_size: expected an int64 tensor, got dtype {p.dtype}")
    if p.size != 1:
        raise ValueError(f"kv_padding_size: expected one value (shape (1,)), got shape {p.shape}")
    pad = int(p.reshape(-1)[0])
    if not 0 <= pad <= g.kv_cap:
        raise ValueError(f"kv_padding_size: expected a value in [0, {g.kv_cap}] (key length), got {pad}")
    if g.paged:
        raise ValueError("kv_padding_size: cannot be combined with block_table")
    if g.lk is None:
        raise ValueError("kv_padding_size: requires the key lengths (actual_seq_lengths of the keys)")
    start = g.kv_cap - pad - g.lk
    g.lk = np.where(start < 0, 0, g.lk)
    return np.maximum(start, 0)


# ---- masks, bias and band ----------------------------------------------------------------------

def _mask_view(atten_mask, g, decode):
    """atten_mask (bool/uint8, 1 = masked) as a (B or 1, 1, rows, cols) view. Prefill shapes:
    (Sq, Skv), (B|1, Sq, Skv), (B|1, 1, Sq, Skv); decode shapes: (B|1, Skv), (B|1, 1, Skv),
    (B|1, 1, 1, Skv). Rows and cols may exceed Sq and Skv (the top-left block is used)."""
    m = V.as_array(atten_mask, "atten_mask")
    if m.dtype not in (np.bool_, np.uint8):
        raise TypeError(f"atten_mask: expected dtype bool or uint8, got {m.dtype}")
    if m.ndim == 2:
        m4 = m[:, None, None, :] if decode else m[None, None]
    elif m.ndim == 3:
        m4 = m[:, None]
    elif m.ndim == 4:
        m4 = m
    else:
        raise ValueError(f"atten_mask: expected 2, 3 or 4 dims, got shape {tuple(m.shape)}")
    if m4.shape[0] not in (1, g.b) or m4.shape[1] not in (1, g.h) or m4.shape[2] < g.sq \
            or m4.shape[3] < g.kv_cap:
        want = (f"(B or 1, Skv), (B or 1, 1, Skv) or (B or 1, 1, 1, Skv)" if decode else
                f"(Sq, Skv), (B or 1, Sq, Skv) or (B or 1, 1, Sq, Skv)")
        raise ValueError(f"atten_mask: expected {want} with B = {g.b}, Sq >= {g.sq}, Skv >= "
                         f"{g.kv_cap}, got shape {tuple(m.shape)}")
    return m4


def _tnd_mask_view(atten_mask, g):
    """TND: one (>= max Sq, >= max Skv) mask; every batch uses its top-left corner."""
    m = V.as_array(atten_mask, "atten_mask")
    if m.dtype not in (np.bool_, np.uint8):
        raise TypeError(f"atten_mask: expected dtype bool or uint8, got {m.dtype}")
    m2 = m.reshape(m.shape[-2:]) if m.ndim in (3, 4) and m.size == m.shape[-1] * m.shape[-2] else m
    if m2.ndim != 2 or m2.shape[0] < g.sq or m2.shape[1] < g.kv_cap:
        raise ValueError(f"atten_mask: input_layout TND expects (S1, S2) with S1 >= {g.sq} and S2 >= "
                         f"{g.kv_cap} (the longest sequences), got shape {tuple(m.shape)}")
    return m2[None, None]


def _check_compressed(atten_mask, mode):
    m = V.as_array(atten_mask, "atten_mask")
    if m.dtype not in (np.bool_, np.uint8):
        raise TypeError(f"atten_mask: expected dtype bool or uint8, got {m.dtype}")
    if m.shape[-2:] != (_COMPRESSED, _COMPRESSED) or m.ndim not in (2, 4) or \
            (m.ndim == 4 and m.shape[1] != 1):
        raise ValueError(f"atten_mask: sparse_mode {mode} expects the compressed lower-triangular "
                         f"mask of shape (2048, 2048) or (B or 1, 1, 2048, 2048) (its pattern comes "
                         f"from the mode), got {tuple(m.shape)}")


def _pse_view(pse_shift, g):
    """pse_shift (B or 1, N, Sq, Skv) of the query dtype, rows/cols at least Sq/Skv."""
    if g.tnd:
        raise NotImplementedError("pse_shift: not supported yet with input_layout TND")
    p = V.as_array(pse_shift, "pse_shift")
    if p.dtype != g.dtype:
        raise TypeError(f"pse_shift: expected dtype {g.dtype} (the dtype of query), got {p.dtype}")
    if p.ndim != 4 or p.shape[0] not in (1, g.b) or p.shape[1] != g.h or p.shape[2] < g.sq \
            or p.shape[3] < g.kv_cap:
        raise ValueError(f"pse_shift: expected shape (B or 1, N, Sq, Skv) = ({g.b} or 1, {g.h}, "
                         f">= {g.sq}, >= {g.kv_cap}), got {tuple(p.shape)}")
    return p


def _bound(x, limit):
    """A band side for the kernel: None (open) once it reaches past every key."""
    return None if x >= limit else int(x)


def _band(mode, pre, nxt, limit):
    """(left, right, anchor_br) of spec section 4: keys j of row i with -left <= j - diag <= right,
    diag = i (left-up) or i + Skv - Sq (right-down, per batch with the actual lengths)."""
    if mode == 0:
        return _bound(pre, limit), _bound(nxt, limit), False
    if mode == 1:
        return None, None, False
    if mode == 2:
        return None, 0, False
    if mode == 3:
        return None, 0, True
    return _bound(pre, limit), _bound(nxt, limit), True  # 4


def _check_tokens(mode, pre, nxt):
    if mode in (0, 4) and (pre < 0 and nxt < 0 or pre + nxt < 0):
        raise ValueError(f"pre_tokens/next_tokens: ({pre}, {nxt}) leave no key in the band of "
                         f"sparse_mode {mode} (both negative, or pre_tokens + next_tokens < 0)")


# ---- the call ----------------------------------------------------------------------------------

def _out_arrays(g, out_layout):
    """The output in its own layout (C-contiguous) and the kernel's (b, s, n, d) / (t, n, d)
    view of it, so the kernel writes every output layout in place."""
    if g.tnd:
        if out_layout == "NTD":
            out = empty((g.h, g.tq, g.d), g.dtype)
            return out, out.transpose(1, 0, 2)
        out = empty((g.tq, g.h, g.d), g.dtype)
        return out, out
    shape = {"BSH": (g.b, g.sq, g.h, g.d), "BSND": (g.b, g.sq, g.h, g.d),
             "BNSD": (g.b, g.h, g.sq, g.d), "NBSD": (g.h, g.b, g.sq, g.d)}[out_layout]
    out = empty(shape, g.dtype)
    view = {"BSH": (0, 1, 2, 3), "BSND": (0, 1, 2, 3), "BNSD": (0, 2, 1, 3),
            "NBSD": (1, 2, 0, 3)}[out_layout]
    return out, out.transpose(view)


def _runs(g, split_all):
    """Batches one kernel call can serve: consecutive batches with the same query length (the
    fixed-length kernel has one Sq), or single batches when split_all."""
    lq = g.lq
    runs = []
    for bi in range(g.b):
        if runs and not split_all and lq[runs[-1][0]] == lq[bi]:
            runs[-1][1] = bi + 1
        else:
            runs.append([bi, bi + 1])
    return runs


def _run_fixed(g, out_k, lse, common, mask, pse, kstart, table):
    acc = np.float64 if g.dtype == np.float64 else np.float32
    # Mask and pse columns are physical key positions: with left padding each batch's window
    # starts elsewhere, which one stride set cannot say, so those batches go one per call.
    split_all = kstart is not None and (mask is not None or pse is not None)
    for b0, b1 in _runs(g, split_all):
        lq = int(g.lq[b0])
        out_k[b0:b1, lq:] = 0  # rows past the actual query length (lse +inf below)
        if lse is not None:
            lse[b0:b1, :, lq:] = np.inf
        if lq == 0:
            continue
        extra = dict(seqlen_k=np.ascontiguousarray(g.lk[b0:b1]))
        k, v = g.k, g.v
        if table is not None:
            extra["block_table"] = np.ascontiguousarray(table[b0:b1])
        else:
            k, v = k[b0:b1], v[b0:b1]
        c0 = 0
        if kstart is not None:
            if split_all:
                c0 = int(kstart[b0])
                k, v = k[:, c0:], v[:, c0:]
            else:
                extra["k_start"] = np.ascontiguousarray(kstart[b0:b1])
        if mask is not None:
            m = mask[b0:b1] if mask.shape[0] > 1 else mask
            extra["mask"] = np.broadcast_to(m[:, :, :lq, c0:], (b1 - b0, g.h, lq, m.shape[3] - c0))
        if pse is not None:
            p = pse[b0:b1] if pse.shape[0] > 1 else pse
            extra["pse"] = np.broadcast_to(p[:, :, :lq, c0:], (b1 - b0, g.h, lq, p.shape[3] - c0))
        _, l, _ = forward(g.q[b0:b1, :lq], k, v, out=out_k[b0:b1, :lq],
                          lse_shape=(b1 - b0, g.h, lq) if lse is not None else None,
                          **common, **extra)
        if lse is not None:
            lse[b0:b1, :, :lq] = l.astype(acc, copy=False)


def _run_tnd(g, out_k, lse, common, mask):
    total = int(g.cu_q[-1])
    out_k[total:] = 0  # rows past the sequences
    extra = {} if mask is None else dict(mask=np.broadcast_to(mask, (1, g.h) + mask.shape[2:]))
    _, l, _ = forward(g.q[:total], g.k, g.v, varlen=True, out=out_k[:total], cu_q=g.cu_q,
                      cu_k=g.cu_k, lse_shape=(g.h, total) if lse is not None else None,
                      **common, **extra)
    if lse is not None:
        lse[:, :total] = l
        lse[:, total:] = np.inf


def _attention(query, key, value, *, op, layouts, decode_rule, pse_shift, atten_mask,
               q_lengths, kv_lengths, block_table, block_size, kv_padding_size, num_heads,
               num_key_value_heads, scale, pre_tokens, next_tokens, input_layout, sparse_mode,
               invalid_line_zero, want_lse):
    """The shared body. decode_rule: True (IFA), False (PFA) or None (FIA: decode iff the query
    has one token and the layout is not TND). Returns (out, lse (B, N, Sq) / (N, T) or None)."""
    lay_in, lay_out = _layouts(input_layout, layouts, op)
    n, nkv = _heads(num_heads, num_key_value_heads)
    scale = V.to_float(scale, "scale_value" if op != "npu_fused_infer_attention_score" else "scale")
    pre = V.to_int(pre_tokens, "pre_tokens")
    nxt = V.to_int(next_tokens, "next_tokens")
    mode = V.to_int(sparse_mode, "sparse_mode")
    if mode not in (0, 1, 2, 3, 4):
        raise ValueError(f"sparse_mode: expected 0, 1, 2, 3 or 4, got {mode}")
    paged = block_table is not None
    if lay_in in ("TND", "NTD") and (paged or kv_padding_size is not None):
        raise NotImplementedError("block_table/kv_padding_size: not supported yet with "
                                  "input_layout TND")
    g = _geometry(query, key, value, lay_in, n, nkv, paged)
    decode = (not g.tnd and g.sq == 1) if decode_rule is None else decode_rule
    if decode and g.sq != 1:
        raise ValueError(f"query: {op} is the decode step and expects a sequence length of 1, got "
                         f"{g.sq} (use npu_prompt_flash_attention or "
                         f"npu_fused_infer_attention_score)")

    if g.tnd:
        if q_lengths is None or kv_lengths is None:
            raise ValueError("actual_seq_lengths and actual_seq_lengths_kv: both are required with "
                             "input_layout TND (cumulative ends)")
        g.tq = g.q.shape[0]
        g.cu_q = _cumulative(q_lengths, "actual_seq_lengths", g.tq)
        g.cu_k = _cumulative(kv_lengths, "actual_seq_lengths_kv", g.k.shape[0])
        if g.cu_q.shape[0] != g.cu_k.shape[0]:
            raise ValueError(f"actual_seq_lengths_kv: expected {g.cu_q.shape[0] - 1} entries (as "
                             f"actual_seq_lengths), got {g.cu_k.shape[0] - 1}")
        g.b = g.cu_q.shape[0] - 1
        g.sq = int(np.diff(g.cu_q).max())
        g.kv_cap = int(np.diff(g.cu_k).max())
    else:
        g.lq = (np.full(g.b, g.sq, np.int64) if q_lengths is None else
                _per_batch(q_lengths, "actual_seq_lengths", g.b, g.sq))
        g.kv_cap = g.k.shape[1]
        # A paged call's key capacity comes from block_table; _paging checks the lengths there.
        g.lk = None if kv_lengths is None else _per_batch(
            kv_lengths, _kv_lengths_name(op), g.b, INT32_MAX if paged else g.kv_cap)
    table = kstart = None
    if paged:
        table = _paging(g, block_table, block_size)
    elif block_size is not None and V.to_int(block_size, "block_size") != 0:
        raise ValueError("block_size: only meaningful with block_table")
    if kv_padding_size is not None:
        kstart = _kv_padding(g, kv_padding_size)
    if not g.tnd and g.lk is None:
        g.lk = np.full(g.b, g.kv_cap, np.int64)

    mask = None
    left = right = None
    anchor_br = False
    if atten_mask is not None:  # without a mask torch_npu ignores sparse_mode and the tokens
        if mode in (0, 1):
            mask = _tnd_mask_view(atten_mask, g) if g.tnd else _mask_view(atten_mask, g, decode)
        else:
            _check_compressed(atten_mask, mode)
        if not decode:  # the decode step ignores sparse_mode (spec section 10, FIA)
            _check_tokens(mode, pre, nxt)
            left, right, anchor_br = _band(mode, pre, nxt, g.sq + g.kv_cap + 1)
    pse = None if pse_shift is None else _pse_view(pse_shift, g)

    out, out_k = _out_arrays(g, lay_out)
    acc = np.float64 if g.dtype == np.float64 else np.float32
    lse = None
    if want_lse:
        lse = empty((g.h, g.tq) if g.tnd else (g.b, g.h, g.sq), acc)
    common = dict(scale=scale, left=left, right=right, anchor_br=anchor_br, mask_fill=MASK_FILL,
                  invalid_line_zero=invalid_line_zero, pse_after_scale=True)
    if g.tnd:
        _run_tnd(g, out_k, lse, common, mask)
    else:
        _run_fixed(g, out_k, lse, common, mask, pse, kstart, table)
    if lay_out == "BSH":
        out = out.reshape(g.b, g.sq, g.h * g.d)
    return out, lse, g


def _kv_lengths_name(op):
    return "actual_seq_lengths" if op == "npu_incre_flash_attention" else "actual_seq_lengths_kv"


# ---- public functions --------------------------------------------------------------------------

def npu_prompt_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None,
                               pse_shift=None, actual_seq_lengths=None, deq_scale1=None,
                               quant_scale1=None, deq_scale2=None, quant_scale2=None,
                               quant_offset2=None, num_heads=1, scale_value=1.0,
                               pre_tokens=INT32_MAX, next_tokens=0, input_layout="BSH",
                               num_key_value_heads=0, actual_seq_lengths_kv=None, sparse_mode=0):
    """torch_npu.npu_prompt_flash_attention (PFA, prefill) on NumPy arrays.

    out = softmax(scale_value * query . key^T + pse_shift, masked) . value in the input layout
    (BSH (B, S, num_heads * D), BSND, BNSD, BNSD_BSND (BNSD in, BSND out), or TND with cumulative
    actual_seq_lengths / actual_seq_lengths_kv). key/value have num_key_value_heads heads (0: as
    many as num_heads; query head h uses kv head h // (num_heads // num_key_value_heads)).

    - actual_seq_lengths / actual_seq_lengths_kv: per-batch query / key lengths (one entry is
      broadcast, extra entries ignored); query rows past a batch's length are 0.
    - atten_mask bool/uint8, 1 = masked (score -1e12): (Sq, Skv), (B|1, Sq, Skv) or
      (B|1, 1, Sq, Skv). sparse_mode 0: mask plus the left-up band -pre_tokens <= j - i <=
      next_tokens (next_tokens defaults to 0: causal); 1: mask only; 2/3: left-up / right-down
      causal; 4: right-down band; 2-4 take the compressed (2048, 2048) mask. Without atten_mask
      sparse_mode and the tokens are ignored (full attention).
    - pse_shift (B|1, N, Sq, Skv) in the query dtype, added after scaling.
    Quantization arguments raise NotImplementedError; padding_mask is reserved (must be None).
    """
    _reject(_QUANT, deq_scale1=deq_scale1, quant_scale1=quant_scale1, deq_scale2=deq_scale2,
            quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    _reject("reserved by torch_npu and not supported; use atten_mask", padding_mask=padding_mask)
    out, _, _ = _attention(query, key, value, op="npu_prompt_flash_attention", layouts=_PFA_LAYOUTS,
                           decode_rule=False, pse_shift=pse_shift, atten_mask=atten_mask,
                           q_lengths=actual_seq_lengths, kv_lengths=actual_seq_lengths_kv,
                           block_table=None, block_size=None, kv_padding_size=None,
                           num_heads=num_heads, num_key_value_heads=num_key_value_heads,
                           scale=scale_value, pre_tokens=pre_tokens, next_tokens=next_tokens,
                           input_layout=input_layout, sparse_mode=sparse_mode,
                           invalid_line_zero=False, want_lse=False)
    return out


def npu_incre_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None,
                              pse_shift=None, actual_seq_lengths=None, antiquant_scale=None,
                              antiquant_offset=None, block_table=None, dequant_scale1=None,
                              quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                              quant_offset2=None, kv_padding_size=None, num_heads=1,
                              scale_value=1.0, input_layout="BSH", num_key_value_heads=0,
                              block_size=0, inner_precise=1):
    """torch_npu.npu_incre_flash_attention (IFA, decode: query length 1) on NumPy arrays.

    out = softmax(scale_value * query . key^T + pse_shift, masked) . value, shaped like query
    (BSH, BSND or BNSD). actual_seq_lengths: valid KEY lengths per batch ((B,) or (1,)).
    Paged KV: block_table (B, max_blocks) int32 and block_size; key/value are the caches
    (num_blocks, block_size, H) or, with BNSD, (num_blocks, num_key_value_heads, block_size, D);
    key t of batch b is cache[block_table[b, t // block_size], t % block_size]; actual_seq_lengths
    is then required. kv_padding_size: left padding, the valid keys are [S - pad - len, S - pad).
    atten_mask (B|1, Skv), (B|1, 1, Skv) or (B|1, 1, 1, Skv), 1 = masked; pse_shift
    (B|1, N, 1, Skv). inner_precise 0/1 select precision vs speed on the NPU: no effect here.
    """
    _reject(_QUANT, antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
            dequant_scale1=dequant_scale1, quant_scale1=quant_scale1,
            dequant_scale2=dequant_scale2, quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    _reject("reserved by torch_npu and not supported; use atten_mask", padding_mask=padding_mask)
    ip = V.to_int(inner_precise, "inner_precise")
    if ip not in (0, 1):
        raise ValueError(f"inner_precise: expected 0 (high precision) or 1 (high performance), got {ip}")
    out, _, _ = _attention(query, key, value, op="npu_incre_flash_attention", layouts=_IFA_LAYOUTS,
                           decode_rule=True, pse_shift=pse_shift, atten_mask=atten_mask,
                           q_lengths=None, kv_lengths=actual_seq_lengths, block_table=block_table,
                           block_size=block_size, kv_padding_size=kv_padding_size,
                           num_heads=num_heads, num_key_value_heads=num_key_value_heads,
                           scale=scale_value, pre_tokens=INT32_MAX, next_tokens=INT32_MAX,
                           input_layout=input_layout, sparse_mode=0, invalid_line_zero=False,
                           want_lse=False)
    return out


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                    actual_seq_lengths=None, actual_seq_lengths_kv=None,
                                    dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
                                    quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, key_antiquant_scale=None,
                                    key_antiquant_offset=None, value_antiquant_scale=None,
                                    value_antiquant_offset=None, key_rope_antiquant_scale=None,
                                    block_table=None, query_padding_size=None,
                                    kv_padding_size=None, key_shared_prefix=None,
                                    value_shared_prefix=None, actual_shared_prefix_len=None,
                                    query_rope=None, key_rope=None, num_heads=1, scale=1.0,
                                    pre_tokens=INT32_MAX, next_tokens=INT32_MAX,
                                    input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
                                    inner_precise=0, block_size=0, antiquant_mode=0,
                                    key_antiquant_mode=0, value_antiquant_mode=0,
                                    softmax_lse_flag=False):
    """torch_npu.npu_fused_infer_attention_score (FIA) on NumPy arrays.

    A query of one token (non-TND) takes the decode path (npu_incre_flash_attention's rules:
    sparse_mode and the tokens are ignored, decode mask shapes), any other query the prefill path
    (npu_prompt_flash_attention's rules, next_tokens defaulting to INT32_MAX here). Layouts: BSH,
    BSND, BNSD, TND and the in_out pairs BNSD_BSND, BSH_NBSD, BSND_NBSD, BNSD_NBSD, TND_NTD,
    NTD_TND. actual_seq_lengths / actual_seq_lengths_kv: per-batch query / key lengths (TND:
    cumulative ends). Paged KV (block_table, block_size) and kv_padding_size as in
    npu_incre_flash_attention. inner_precise: bit 0 precision/performance (no effect here), bit 1
    zeroes rows whose visible keys are all masked.

    Returns (attention_out, softmax_lse): out in the output layout; softmax_lse = max + log(sum) of
    the scaled scores, float32 (float64 for float64 inputs) (B, N, Sq, 1), TND layouts (T, N, 1),
    +inf for rows that see no key; without softmax_lse_flag a (1,) array holding 0.
    """
    _reject(_QUANT, dequant_scale1=dequant_scale1, quant_scale1=quant_scale1,
            dequant_scale2=dequant_scale2, quant_scale2=quant_scale2, quant_offset2=quant_offset2,
            antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
            key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
            value_antiquant_scale=value_antiquant_scale,
            value_antiquant_offset=value_antiquant_offset,
            key_rope_antiquant_scale=key_rope_antiquant_scale)
    _reject_modes(antiquant_mode=antiquant_mode, key_antiquant_mode=key_antiquant_mode,
                  value_antiquant_mode=value_antiquant_mode)
    _reject("not supported yet", query_padding_size=query_padding_size,
            key_shared_prefix=key_shared_prefix, value_shared_prefix=value_shared_prefix,
            actual_shared_prefix_len=actual_shared_prefix_len, query_rope=query_rope,
            key_rope=key_rope)
    ip = V.to_int(inner_precise, "inner_precise")
    if ip not in (0, 1, 2, 3):
        raise ValueError(f"inner_precise: expected 0-3 (bit 0 performance, bit 1 invalid-row "
                         f"correction), got {ip}")
    flag = V.to_bool(softmax_lse_flag, "softmax_lse_flag")
    out, lse, g = _attention(query, key, value, op="npu_fused_infer_attention_score",
                             layouts=_FIA_LAYOUTS, decode_rule=None, pse_shift=pse_shift,
                             atten_mask=atten_mask, q_lengths=actual_seq_lengths,
                             kv_lengths=actual_seq_lengths_kv, block_table=block_table,
                             block_size=block_size, kv_padding_size=kv_padding_size,
                             num_heads=num_heads, num_key_value_heads=num_key_value_heads,
                             scale=scale, pre_tokens=pre_tokens, next_tokens=next_tokens,
                             input_layout=input_layout, sparse_mode=sparse_mode,
                             invalid_line_zero=bool(ip & 2), want_lse=flag)
    if not flag:
        return out, np.zeros((1,), np.float32)
    if g.tnd:  # (N, T) from the kernel -> (T, N, 1)
        return out, np.ascontiguousarray(lse.T)[:, :, None]
    return out, lse[..., None]
