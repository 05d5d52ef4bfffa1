"""Naive reference for torch_npu's inference attention ops (spec section 10): PFA, IFA, FIA.

Same names, signatures and defaults as ``flash_attn_c.npu_infer`` plus the keyword-only
``compute_dtype`` of ``flash_attn_c.reference`` (float64: exact; the input dtype: flash-attn's
"naive computation in the same precision"). Deliberately slow and plain: every batch is cut out
of the layout with explicit indexing, a paged cache is gathered token by token through the block
table, GQA heads are repeated, and each batch builds its full score matrix, its band matrix (spec
section 4) and its mask matrix before a plain softmax. No code is shared with the front-end.

The semantics are the ones docs/npu_infer.md states:
  S = scale * Q K^T + pse_shift;  S[masked] = -1e12;  keys outside the band or the actual
  lengths are not part of the row;  P = softmax(S);  O = P V;  lse = max + log(sum).
A row without any key gives O = 0 and lse = +inf; with FIA inner_precise bit 1 a row whose keys
are all masked gives O = 0 too. Rows past a batch's actual query length are 0 (lse +inf).
"""
import numpy as np

from .reference import _Precision

MASK_FILL = -1e12  # what the NPU inference kernels write into masked scores
INT32_MAX = 2147483647


# ---- layouts -----------------------------------------------------------------------------------

def _split(layout):
    parts = layout.split("_")
    return parts[0], parts[-1]


def _batched_heads(x, layout, n):
    """A 4-D/3-D layout tensor as a list over batches of (N, S, D) float64 arrays."""
    x = np.asarray(x)
    if layout == "BSH":
        b, s, hid = x.shape
        x = x.reshape(b, s, n, hid // n)
        return [x[i].transpose(1, 0, 2) for i in range(b)]
    if layout == "BSND":
        return [x[i].transpose(1, 0, 2) for i in range(x.shape[0])]
    if layout == "BNSD":
        return [x[i] for i in range(x.shape[0])]
    raise ValueError(layout)


def _tokens(x, layout):
    """TND / NTD tensor as (T, N, D)."""
    x = np.asarray(x)
    return x.transpose(1, 0, 2) if layout == "NTD" else x


def _gather_paged(cache, layout, nkv, table, block_size, length):
    """Keys 0..length-1 of one sequence, token t read from block table[t // block_size] at row
    t % block_size. Returns (Nkv, length, D)."""
    cache = np.asarray(cache)
    rows = []
    for t in range(length):
        blk = int(table[t // block_size])
        if cache.ndim == 3:                       # (blocks, block_size, H)
            tok = cache[blk, t % block_size].reshape(nkv, -1)
        elif layout == "BNSD":                    # (blocks, N, block_size, D)
            tok = cache[blk, :, t % block_size, :]
        else:                                     # (blocks, block_size, N, D)
            tok = cache[blk, t % block_size]
        rows.append(tok)
    d = rows[0].shape[-1] if rows else (cache.shape[-1] // nkv if cache.ndim == 3 else cache.shape[-1])
    return np.stack(rows, axis=1) if rows else np.zeros((nkv, 0, d))


# ---- one batch ---------------------------------------------------------------------------------

def _band_matrix(mode, lq, lk, pre, nxt, use_band):
    """Which keys row i may see (spec section 4), per batch with its actual lengths."""
    i = np.arange(lq)[:, None]
    j = np.arange(lk)[None, :]
    if not use_band:
        return np.ones((lq, lk), bool)
    lu = j - i
    rd = j - i - (lk - lq)
    if mode == 0:
        return (lu >= -pre) & (lu <= nxt)
    if mode == 1:
        return np.ones((lq, lk), bool)
    if mode == 2:
        return lu <= 0
    if mode == 3:
        return rd <= 0
    return (rd >= -pre) & (rd <= nxt)


def _one_batch(qb, kb, vb, scale, pse_b, band, masked, invalid_line, prec):
    """qb (N, lq, D), kb/vb (Nkv, lk, D), pse_b (N, lq, lk) or None, band (lq, lk), masked
    (N|1, lq, lk). Returns out (N, lq, D) and lse (N, lq)."""
    n = qb.shape[0]
    g = n // kb.shape[0]
    q = prec(qb)
    k = np.repeat(prec(kb), g, axis=0)
    v = np.repeat(prec(vb), g, axis=0)
    s = prec(prec.mm(q, k.transpose(0, 2, 1)) * scale)
    if pse_b is not None:
        s = prec(s + prec(pse_b))
    s = np.where(masked, MASK_FILL, s)
    seen = np.broadcast_to(band, s.shape)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        m = np.where(seen, s, -np.inf).max(axis=-1, initial=-np.inf)
        e = np.where(seen, np.exp(s - np.where(np.isfinite(m), m, 0.0)[..., None]), 0.0)
        total = e.sum(axis=-1)
        p = np.where(total[..., None] > 0, e / np.where(total > 0, total, 1.0)[..., None], 0.0)
        lse = np.where(total > 0, m + np.log(np.where(total > 0, total, 1.0)), np.inf)
    if invalid_line:
        dead = m == MASK_FILL  # every visible key masked
        p = np.where(dead[..., None], 0.0, p)
    out = prec.mm(prec(p), v)
    return out, lse


# ---- the shared body ---------------------------------------------------------------------------

def _mask_full(atten_mask, b, lq_max, decode):
    """atten_mask as (B|1, N|1, rows, cols) bool."""
    m = np.asarray(atten_mask).astype(bool)
    if m.ndim == 2:
        m = m[:, None, None, :] if decode else m[None, None]
    elif m.ndim == 3:
        m = m[:, None]
    return m


def _reference(query, key, value, *, layout, decode, pse_shift, atten_mask, q_lengths,
               kv_lengths, block_table, block_size, kv_padding_size, num_heads,
               num_key_value_heads, scale, pre_tokens, next_tokens, sparse_mode, invalid_line,
               compute_dtype):
    prec = _Precision(compute_dtype)
    lay_in, lay_out = _split(layout)
    n = int(num_heads)
    nkv = int(num_key_value_heads) or n
    mode = int(sparse_mode)
    use_band = atten_mask is not None and not decode and mode != 1
    full_mask = atten_mask is not None and mode in (0, 1)

    if lay_in in ("TND", "NTD"):
        q = _tokens(query, lay_in)
        k = _tokens(key, lay_in)
        v = _tokens(value, lay_in)
        cq = [0] + [int(x) for x in q_lengths]
        ck = [0] + [int(x) for x in kv_lengths]
        t, _, d = q.shape
        out = np.zeros((t, n, d))
        lse = np.full((t, n), np.inf)
        m = np.asarray(atten_mask).astype(bool) if full_mask else None
        if m is not None:
            m = m.reshape(m.shape[-2:])
        for bi in range(len(cq) - 1):
            lq, lk = cq[bi + 1] - cq[bi], ck[bi + 1] - ck[bi]
            if lq == 0:
                continue
            qb = q[cq[bi]:cq[bi + 1]].transpose(1, 0, 2)
            kb = k[ck[bi]:ck[bi + 1]].transpose(1, 0, 2)
            vb = v[ck[bi]:ck[bi + 1]].transpose(1, 0, 2)
            masked = np.zeros((1, lq, lk), bool) if m is None else m[None, :lq, :lk]
            band = _band_matrix(mode, lq, lk, int(pre_tokens), int(next_tokens), use_band)
            ob, lb = _one_batch(qb, kb, vb, scale, None, band, masked, invalid_line, prec)
            out[cq[bi]:cq[bi + 1]] = ob.transpose(1, 0, 2)
            lse[cq[bi]:cq[bi + 1]] = lb.T
        res = out.transpose(1, 0, 2) if lay_out == "NTD" else out
        return prec.out(res), prec.stat(lse)

    qs = _batched_heads(query, lay_in, n)
    b = len(qs)
    sq, d = qs[0].shape[1], qs[0].shape[2]
    paged = block_table is not None
    if paged:
        table = np.asarray(block_table)
        cap = table.shape[1] * int(block_size)
    else:
        ks, vs = _batched_heads(key, lay_in, nkv), _batched_heads(value, lay_in, nkv)
        cap = ks[0].shape[1]

    def per_batch(x, default):
        if x is None:
            return [default] * b
        x = [int(y) for y in np.asarray(x).reshape(-1)]
        return x * b if len(x) == 1 else x[:b]

    lqs = per_batch(q_lengths, sq)
    lks = per_batch(kv_lengths, cap)
    starts = [0] * b
    if kv_padding_size is not None:
        pad = int(np.asarray(kv_padding_size).reshape(-1)[0])
        for bi in range(b):
            starts[bi] = cap - pad - lks[bi]
            if starts[bi] < 0:  # the valid range falls off the front: no key
                starts[bi], lks[bi] = 0, 0
    mask = _mask_full(atten_mask, b, sq, decode) if full_mask else None
    pse = None if pse_shift is None else np.asarray(pse_shift)

    out = np.zeros((b, n, sq, d))
    lse = np.full((b, n, sq), np.inf)
    for bi in range(b):
        lq, lk, c0 = lqs[bi], lks[bi], starts[bi]
        if lq == 0:
            continue
        if paged:
            kb = _gather_paged(key, lay_in, nkv, table[bi], int(block_size), lk)
            vb = _gather_paged(value, lay_in, nkv, table[bi], int(block_size), lk)
        else:
            kb, vb = ks[bi][:, c0:c0 + lk], vs[bi][:, c0:c0 + lk]
        if mask is not None:
            mb = mask[bi if mask.shape[0] > 1 else 0]
            masked = mb[:, :lq, c0:c0 + lk]
        else:
            masked = np.zeros((1, lq, lk), bool)
        pse_b = None
        if pse is not None:
            pse_b = pse[bi if pse.shape[0] > 1 else 0][:, :lq, c0:c0 + lk]
        band = _band_matrix(mode, lq, lk, int(pre_tokens), int(next_tokens), use_band)
        ob, lb = _one_batch(qs[bi][:, :lq], kb, vb, scale, pse_b, band, masked, invalid_line, prec)
        out[bi, :, :lq] = ob
        lse[bi, :, :lq] = lb
    if lay_out == "BSH":
        res = out.transpose(0, 2, 1, 3).reshape(b, sq, n * d)
    elif lay_out == "BSND":
        res = out.transpose(0, 2, 1, 3)
    elif lay_out == "NBSD":
        res = out.transpose(1, 0, 2, 3)
    else:
        res = out
    return prec.out(res), prec.stat(lse)


def _no_quant(**args):
    for name, value in args.items():
        if value is not None:
            raise NotImplementedError(f"{name}: quantization is not supported yet")


# ---- public mirrors ----------------------------------------------------------------------------

def npu_prompt_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None,
                               pse_shift=None, actual_seq_lengths=None, deq_scale1=None,
                               quant_scale1=None, deq_scale2=None, quant_scale2=None,
                               quant_offset2=None, num_heads=1, scale_value=1.0,
                               pre_tokens=INT32_MAX, next_tokens=0, input_layout="BSH",
                               num_key_value_heads=0, actual_seq_lengths_kv=None, sparse_mode=0,
                               compute_dtype=np.float64):
    """Reference PFA: returns attention_out in compute_dtype."""
    _no_quant(deq_scale1=deq_scale1, quant_scale1=quant_scale1, deq_scale2=deq_scale2,
              quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    out, _ = _reference(query, key, value, layout=input_layout, decode=False, pse_shift=pse_shift,
                        atten_mask=atten_mask, q_lengths=actual_seq_lengths,
                        kv_lengths=actual_seq_lengths_kv, block_table=None, block_size=None,
                        kv_padding_size=None, num_heads=num_heads,
                        num_key_value_heads=num_key_value_heads, scale=scale_value,
                        pre_tokens=pre_tokens, next_tokens=next_tokens, sparse_mode=sparse_mode,
                        invalid_line=False, compute_dtype=compute_dtype)
    return out


def npu_incre_flash_attention(query, key, value, *, padding_mask=None, atten_mask=None,
                              pse_shift=None, actual_seq_lengths=None, antiquant_scale=None,
                              antiquant_offset=None, block_table=None, dequant_scale1=None,
                              quant_scale1=None, dequant_scale2=None, quant_scale2=None,
                              quant_offset2=None, kv_padding_size=None, num_heads=1,
                              scale_value=1.0, input_layout="BSH", num_key_value_heads=0,
                              block_size=0, inner_precise=1, compute_dtype=np.float64):
    """Reference IFA (decode): returns attention_out in compute_dtype, shaped like query."""
    _no_quant(antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
              dequant_scale1=dequant_scale1, quant_scale1=quant_scale1,
              dequant_scale2=dequant_scale2, quant_scale2=quant_scale2, quant_offset2=quant_offset2)
    out, _ = _reference(query, key, value, layout=input_layout, decode=True, pse_shift=pse_shift,
                        atten_mask=atten_mask, q_lengths=None, kv_lengths=actual_seq_lengths,
                        block_table=block_table, block_size=block_size,
                        kv_padding_size=kv_padding_size, num_heads=num_heads,
                        num_key_value_heads=num_key_value_heads, scale=scale_value,
                        pre_tokens=INT32_MAX, next_tokens=INT32_MAX, sparse_mode=0,
                        invalid_line=False, compute_dtype=compute_dtype)
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
                                    softmax_lse_flag=False, compute_dtype=np.float64):
    """Reference FIA: (attention_out, softmax_lse). The decode rules (no band, decode mask
    shapes) apply when the query has one token and the layout is not TND."""
    _no_quant(dequant_scale1=dequant_scale1, quant_scale1=quant_scale1,
              dequant_scale2=dequant_scale2, quant_scale2=quant_scale2, quant_offset2=quant_offset2,
              antiquant_scale=antiquant_scale, antiquant_offset=antiquant_offset,
              key_antiquant_scale=key_antiquant_scale, key_antiquant_offset=key_antiquant_offset,
              value_antiquant_scale=value_antiquant_scale,
              value_antiquant_offset=value_antiquant_offset,
              key_rope_antiquant_scale=key_rope_antiquant_scale)
    lay_in = _split(input_layout)[0]
    tnd = lay_in in ("TND", "NTD")
    q = np.asarray(query)
    sq = None if tnd else (q.shape[2] if lay_in == "BNSD" else q.shape[1])
    out, lse = _reference(query, key, value, layout=input_layout, decode=(sq == 1),
                          pse_shift=pse_shift, atten_mask=atten_mask,
                          q_lengths=actual_seq_lengths, kv_lengths=actual_seq_lengths_kv,
                          block_table=block_table, block_size=block_size,
                          kv_padding_size=kv_padding_size, num_heads=num_heads,
                          num_key_value_heads=num_key_value_heads, scale=scale,
                          pre_tokens=pre_tokens, next_tokens=next_tokens, sparse_mode=sparse_mode,
                          invalid_line=bool(int(inner_precise) & 2), compute_dtype=compute_dtype)
    if not softmax_lse_flag:
        return out, np.zeros((1,), np.float32)
    return out, lse[..., None]
