"""torch_npu compatible attention gradient on NumPy arrays (API.md section 4).

``npu_fusion_attention_grad`` with torch_npu's names, defaults and (dq, dk, dv, dpse) result,
following specs/npu_fusion_attention.md section 9. Like the forward front-end (npu.py) this module
holds no attention math: it validates the arguments, translates layouts, sparse modes, masks and
pse with npu.py's own helpers (so the gradient sees exactly the forward's bands, masks, pse views
and invalid-line switch), turns the given softmax_max/softmax_sum/attention_in into the kernel's
statistics, and calls the one backward kernel (_core.backward). The only arithmetic here is the
reduction of the per-batch pse gradient to pse's shape, which _core.backward leaves to the caller.

Choices where torch_npu is silent or unhelpful (docs/npu_grad.md lists them):

- The given softmax_max, softmax_sum and attention_in are used as given (ring attention passes
  merged ones). When any of them is None they are recomputed with npu_fusion_attention on the
  same arguments (a convenience; torch_npu requires them). attention_in depends on the dropout
  mask, so it cannot be recomputed when keep_prob < 1: that is an error.
- dpse is the true gradient scale * dS summed into pse's shape and dtype (torch_npu leaves it
  unwritten). For the alibi-compressed form it flows to the entries the NPU kernel reads under
  the spec's reconstruction (NPU section 5), as flash_attn_c.reference does.
- Dropout replays the forward's keying (seed, offset, batch * head_num + head, row, col); numels
  must equal the forward's count when keep_prob < 1 (a mismatch means the statistics belong to
  a different call). softmax_in, gen_mask_parallel and sync do not change the numbers.
- sink gets no gradient (the 4-output signature has no dsink); it only enters through the given
  statistics, which include it.
"""
import numpy as np

from . import _validate as V
from ._core import backward
from ._runtime import empty
from .npu import (
    FLT_MAX,
    INT32_MAX,
    _ALIBI_ROWS,
    _FULL_MASK_MODES,
    _Band,
    _check_compressed,
    _fixed_band,
    _fixed_mask,
    _fixed_pse,
    _geometry,
    _mask_array,
    _options,
    _prefix,
    _sink,
    _split_heads,
    _tnd_bands,
    _tnd_groups,
    _tnd_mask,
    _tnd_pse,
    _tnd_sequences,
    _value_for_kernel,
    npu_fusion_attention,
)

__all__ = ["npu_fusion_attention_grad"]

_U64 = 1 << 64


class _Plan:
    """The forward's translation of mask, sparse mode, prefix and pse for one call."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def _plan(g, o, atten_mask, prefix, pse):
    """Mask view, band(s), prefix, pse view and invalid-line switch exactly as
    npu_fusion_attention derives them, so P is rebuilt over the forward's visible keys."""
    mode = o["mode"]
    invalid = o["inner_precise"] == 2
    prefix_arr = mask = band = bands = None
    if atten_mask is not None:  # without a mask torch_npu ignores sparse_mode and the tockens
        m = _mask_array(atten_mask)
        if mode in _FULL_MASK_MODES:
            mask = _tnd_mask(m, g) if g.tnd else _fixed_mask(m, g, mode)
        else:
            _check_compressed(m, mode)
        if mode in (5, 6):
            prefix_arr = _prefix(prefix, g, mode)
        if g.tnd:
            bands = _tnd_bands(o, g)
        else:
            band, auto_invalid = _fixed_band(o, g)
            invalid = invalid or auto_invalid
    elif g.tnd:
        bands = [_Band() for _ in range(g.b)]
    else:
        band = _Band()
    pse_view = None
    if pse is not None:
        pse_view = _tnd_pse(pse, g, g.q.dtype, mode if atten_mask is not None else 0) if g.tnd \
            else _fixed_pse(pse, g, g.q.dtype)
    return _Plan(mask=mask, band=band, bands=bands, prefix=prefix_arr, pse=pse_view,
                 invalid=invalid)


# ---- arrays in the call's layout ----------------------------------------------------------------

def _layout_shape(g, rows, n, d):
    """Shape of a (rows, n heads, head dim d) operand in the call's layout."""
    return {"BSH": (g.b, rows, n * d), "SBH": (rows, g.b, n * d), "BSND": (g.b, rows, n, d),
            "BNSD": (g.b, n, rows, d), "TND": (rows, n, d)}[g.layout]


def _kernel_view(a, g, n):
    """An operand in the call's layout as the kernel's (b, s, n, d) (TND: (t, n, d)) view."""
    if g.layout in ("BSH", "SBH"):
        a = _split_heads(a, n)
        return a.transpose(1, 0, 2, 3) if g.layout == "SBH" else a
    if g.layout == "BNSD":
        return a.transpose(0, 2, 1, 3)
    return a


def _query_like(x, name, g):
    """dy / attention_in: the forward output's shape and query's dtype, as a kernel view."""
    a = V.as_array(x, name)
    V.check_same_dtype(a, name, g.q, "query")
    rows = g.tq if g.tnd else g.sq
    want = _layout_shape(g, rows, g.h, g.dv)
    if tuple(a.shape) != want:
        raise ValueError(f"{name}: expected shape {list(want)} (the attention output of input_layout "
                         f"{g.layout}), got {list(a.shape)}")
    return _kernel_view(V.last_dim_contiguous(a), g, g.h)


def _pad_head_dim(a, d):
    """Dv < Dk: the kernel shares one head dim, so dy and attention_in are zero-padded to Dk
    like value (exact: padded columns add 0 to dO.V^T and to rowsum(dO * O))."""
    if a.shape[-1] == d:
        return a
    out = np.zeros(a.shape[:-1] + (d,), a.dtype)
    out[..., : a.shape[-1]] = a
    return out


def _grad_array(g, rows, n, dtype):
    """A gradient in the call's layout order (C-contiguous, N and D split for BSH/SBH, head dim
    Dk) and the kernel's view of it. TND starts zeroed: rows outside every sequence stay 0."""
    d = g.d
    if g.layout == "TND":
        a = np.zeros((rows, n, d), dtype)
        return a, a
    if g.layout == "BNSD":
        a = empty((g.b, n, rows, d), dtype)
        return a, a.transpose(0, 2, 1, 3)
    if g.layout == "SBH":
        a = empty((rows, g.b, n, d), dtype)
        return a, a.transpose(1, 0, 2, 3)
    a = empty((g.b, rows, n, d), dtype)
    return a, a


def _finish(a, g, n, d):
    """Drop the head-dim padding (dv when Dv < Dk) and merge N, D for BSH/SBH."""
    if a.shape[-1] != d:
        a = np.ascontiguousarray(a[..., :d])
    if g.layout in ("BSH", "SBH"):
        a = a.reshape(a.shape[:2] + (n * d,))
    return a


# ---- softmax statistics -------------------------------------------------------------------------

def _stat_array(x, name, g):
    a = V.as_array(x, name)
    if a.dtype not in (np.float32, np.float64):
        raise TypeError(f"{name}: expected dtype float32 (float64 for float64 inputs), got {a.dtype}")
    want = (g.tq, g.h, 8) if g.tnd else (g.b, g.h, g.sq, 8)
    if tuple(a.shape) != want:
        layout = "[T, N, 8]" if g.tnd else "[B, N, Sq, 8]"
        raise ValueError(f"{name}: expected shape {list(want)} ({layout}, as npu_fusion_attention "
                         f"returns it), got {list(a.shape)}")
    return a


def _stats(smax, ssum, g, o, acc):
    """Lane 0 of softmax_max/softmax_sum as the kernel's rowmax/rowsum: (b, h, sq) views, or
    (h, T) for TND. A compact copy (O(rows * heads), small next to q) is made only when the dtype
    is not the accumulator's, the two strides differ, or TND's "" order packs each batch's block
    with its own strides."""
    if g.tnd and o["softmax_layout"] == "":
        stats = np.zeros((2, g.h, g.tq), acc)
        for src, dst in ((smax, stats[0]), (ssum, stats[1])):
            flat = src.reshape(-1)  # per batch an [N, Sq_b, 8] block at offset 8 * N * cu_q[b]
            for bi in range(g.b):
                qa, qb = int(g.cu_q[bi]), int(g.cu_q[bi + 1])
                if qb > qa:
                    dst[:, qa:qb] = flat[8 * g.h * qa: 8 * g.h * qb].reshape(g.h, qb - qa, 8)[..., 0]
        return stats[0], stats[1]
    rmax, rsum = (a[..., 0].T if g.tnd else a[..., 0] for a in (smax, ssum))
    if rmax.dtype != acc or rsum.dtype != acc or rmax.strides != rsum.strides:
        stats = np.empty((2,) + rmax.shape, acc)
        stats[0], stats[1] = rmax, rsum
        rmax, rsum = stats[0], stats[1]
    return rmax, rsum


# ---- dropout keying -----------------------------------------------------------------------------

def _dropout_key(o, g, seed, offset, numels):
    seed = V.to_int(seed, "seed")
    offset = V.to_int(offset, "offset")
    numels = V.to_int(numels, "numels")
    if o["keep_prob"] == 1.0:
        return 0, 0  # no dropout: the forward returned (0, 0) and nothing is replayed
    for val, name in ((seed, "seed"), (offset, "offset")):
        if not 0 <= val < _U64:
            raise ValueError(f"{name}: expected an integer in [0, 2**64) as npu_fusion_attention "
                             f"returns it, got {val}")
    if numels != g.numels:
        raise ValueError(f"numels: expected {g.numels} (the dropout mask size npu_fusion_attention "
                         f"returns for these shapes), got {numels}")
    return seed, offset


# ---- dpse: the per-batch gradient reduced to pse's shape ---------------------------------------

def _alibi_grad(ds, cols, out):
    """Add the gradient ds (N, s, s) of one s x s Toeplitz block (the bottom-right corner of the
    cols x cols matrix the compressed pse encodes) into out (N, 1024, cols), following the spec's
    reconstruction (NPU section 5): rows of the last 1024 read their own compressed row, earlier
    rows read compressed row 1023 at column j - i + cols - 1; only j <= i carries pse."""
    n, s = ds.shape[0], ds.shape[1]
    lower = np.tri(s, dtype=bool)
    top = s - _ALIBI_ROWS  # local rows below this read compressed row 1023
    i0 = max(top, 0)
    r0 = i0 - top
    out[:, r0:r0 + s - i0, cols - s:] += np.where(lower[i0:], ds[:, i0:], 0)
    if i0 > 0:
        ii, jj = np.nonzero(lower[:i0])
        t = ii - jj  # 0 .. i0 - 1, column cols - 1 - t
        for h in range(n):
            sums = np.bincount(t, weights=ds[h, ii, jj], minlength=i0)
            out[h, _ALIBI_ROWS - 1, cols - i0:] += sums[::-1]


def _dpse_fixed(dpse, pse, g):
    """(b, h, rows, sk) per-batch gradient -> pse's shape: summed over a broadcast batch, over
    rows for the row-broadcast form (the kernel already did), scattered for alibi-compressed."""
    p0, _, rows, cols = pse.shape
    if p0 == 1:
        dpse = dpse.sum(axis=0, keepdims=True)
    if rows == _ALIBI_ROWS and rows != g.sq:
        out = np.zeros(pse.shape, dpse.dtype)
        for bi in range(p0):
            _alibi_grad(dpse[bi], cols, out[bi])
        dpse = out
    return dpse.astype(pse.dtype, copy=False)


# ---- the call -----------------------------------------------------------------------------------

def _run_fixed(g, plan, common, dy4, o4, rmax, rsum, want_dpse):
    vk = _value_for_kernel(g)
    dq, dq4 = _grad_array(g, g.sq, g.h, g.q.dtype)
    dk, dk4 = _grad_array(g, g.sk, g.hk, g.q.dtype)
    dv, dv4 = _grad_array(g, g.sk, g.hk, g.q.dtype)
    band = plan.band
    _, _, _, dpse = backward(
        _pad_head_dim(dy4, g.d), g.q, g.k, vk, _pad_head_dim(o4, g.d), rowmax=rmax,
        rowsum=rsum, left=band.left, right=band.right, anchor_br=band.anchor_br, mask=plan.mask,
        prefix=plan.prefix, pse=plan.pse, want_dpse=want_dpse, grads=(dq4, dk4, dv4), **common)
    return dq, dk, dv, dpse


def _run_tnd(g, plan, common, dy4, o4, rmax, rsum, want_dpse, pse):
    vk = _value_for_kernel(g)
    dy4, o4 = _pad_head_dim(dy4, g.d), _pad_head_dim(o4, g.d)
    dq, _ = _grad_array(g, g.tq, g.h, g.q.dtype)
    dk, _ = _grad_array(g, g.tk, g.hk, g.q.dtype)
    dv, _ = _grad_array(g, g.tk, g.hk, g.q.dtype)
    mask_kind, mask_arr = plan.mask if plan.mask is not None else (None, None)
    pse_per_batch, pse_buf = plan.pse if plan.pse is not None else (False, None)
    dpse = np.zeros(pse.shape, np.float64 if g.q.dtype == np.float64 else np.float32) \
        if want_dpse else None
    # The forward's grouping (npu._tnd_groups) and per-group arguments: one varlen call per run of
    # batches sharing a band; b0 leading empty sequences keep the kernel's batch index global, so
    # dropout is keyed as in the forward.
    for b0, b1, band in _tnd_groups(g, plan.bands, mask_kind == "block" or pse_per_batch):
        qa, qb = int(g.cu_q[b0]), int(g.cu_q[b1])
        ka, kb = int(g.cu_k[b0]), int(g.cu_k[b1])
        cu_q = np.concatenate([np.zeros(b0, np.int64), g.cu_q[b0:b1 + 1] - qa])
        cu_k = np.concatenate([np.zeros(b0, np.int64), g.cu_k[b0:b1 + 1] - ka])
        m = None
        if mask_kind == "window":
            m = mask_arr
        elif mask_kind == "block":
            m = np.broadcast_to(mask_arr[qa:qb, ka:kb][None, None], (1, g.h, qb - qa, kb - ka))
        p = None
        if pse_buf is not None:
            p = pse_buf[b0:b0 + 1] if pse_per_batch else pse_buf
        _, _, _, part = backward(
            dy4[qa:qb], g.q[qa:qb], g.k[ka:kb], vk[ka:kb], o4[qa:qb], varlen=True, cu_q=cu_q,
            cu_k=cu_k, rowmax=rmax[:, qa:qb], rowsum=rsum[:, qa:qb], left=band.left,
            right=band.right, anchor_br=band.anchor_br, mask=m,
            prefix=plan.prefix[:b1] if plan.prefix is not None else None, pse=p,
            want_dpse=want_dpse, grads=(dq[qa:qb], dk[ka:kb], dv[ka:kb]), **common)
        if want_dpse:
            # part: (b1, h, maxSq, maxSkv) of this group, batch bi in its top-left corner.
            for bi in range(b0, b1):
                s = int(g.lq[bi])  # Sq_b == Skv_b for pse (checked by npu._tnd_pse)
                if s:
                    _alibi_grad(part[bi, :, :s, :s], pse.shape[3], dpse[bi if pse_per_batch else 0])
    if want_dpse:
        dpse = dpse.astype(pse.dtype, copy=False)
    return dq, dk, dv, dpse


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None,
                              padding_mask=None, atten_mask=None, softmax_max=None,
                              softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value=1.0, keep_prob=1.0, pre_tockens=INT32_MAX,
                              next_tockens=INT32_MAX, inner_precise=0, seed=0, offset=0,
                              numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                              sparse_mode=0, gen_mask_parallel=True, sync=False,
                              softmax_layout="", sink=None):
    """torch_npu.npu_fusion_attention_grad on NumPy arrays -> (dq, dk, dv, dpse).

    Pass the arguments given to npu_fusion_attention (``scale`` as ``scale_value``), the output
    gradient ``dy`` (the attention output's shape and dtype) and the forward's results:
    ``attention_in`` = attention_out, ``softmax_max``/``softmax_sum`` ([B, N, Sq, 8]; TND [T, N, 8]
    in the order ``softmax_layout`` names; float32, float64 for float64 inputs; lane 0 is read)
    and ``seed``, ``offset``, ``numels`` (needed when keep_prob < 1).

    The kernel rebuilds P = exp(S - softmax_max) / softmax_sum from the GIVEN statistics and
    D = rowsum(dy * attention_in) from the GIVEN attention_in, so ring/context-parallel callers
    may pass merged (global) statistics and output for a block of keys. Dropout is replayed from
    (seed, offset) with keep_prob: the same mask as the forward that returned them. If any of
    softmax_max, softmax_sum, attention_in is None it is recomputed by npu_fusion_attention with
    the same arguments; attention_in cannot be when keep_prob < 1 (it depends on the dropped
    elements): that raises ValueError.

    Returns dq, dk, dv with the shapes, layout and dtype of query, key, value (GQA: dk/dv summed
    over the query heads of each kv head), and dpse: the true gradient scale * dS (masked and
    invisible positions 0) reduced to pse's shape and dtype -- summed over a broadcast batch or
    row dim; for the alibi-compressed [B or 1, N, 1024, Skv] form scattered to the entries the
    spec's reconstruction reads -- or an empty array when pse is None. torch_npu leaves dpse
    unwritten; this is a documented improvement. sink receives no gradient. softmax_in,
    gen_mask_parallel and sync are accepted and do not change the numbers; padding_mask is
    unsupported, as on the NPU.
    """
    g = _geometry(query, key, value, head_num, input_layout)
    if g.tnd:
        _tnd_sequences(g, actual_seq_qlen, actual_seq_kvlen)
    elif actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise ValueError(f"actual_seq_qlen/actual_seq_kvlen: only valid with input_layout TND, got "
                         f"{g.layout}")
    else:
        g.numels = g.b * g.h * g.sq * g.sk
    scale = V.to_float(scale_value, "scale_value")
    o = _options(g, scale, keep_prob, pre_tockens, next_tockens, inner_precise, sparse_mode,
                 gen_mask_parallel, sync, softmax_layout, padding_mask)
    sink_arr = _sink(sink, g.h)
    plan = _plan(g, o, atten_mask, prefix, pse)
    dy4 = _query_like(dy, "dy", g)
    seed, offset = _dropout_key(o, g, seed, offset, numels)
    if (softmax_max is None) != (softmax_sum is None):
        raise ValueError("softmax_max/softmax_sum: give both (from the same forward) or neither")
    if attention_in is None and o["keep_prob"] < 1.0:
        raise ValueError("attention_in: required when keep_prob < 1 (the output depends on the "
                         "dropout mask and cannot be recomputed)")
    if softmax_max is not None:
        smax, ssum = _stat_array(softmax_max, "softmax_max", g), _stat_array(softmax_sum, "softmax_sum", g)
    if attention_in is not None:
        o4 = _query_like(attention_in, "attention_in", g)

    if softmax_max is None or attention_in is None:
        # The statistics are taken before dropout, so a keep_prob=1 forward gives the same ones.
        fwd = npu_fusion_attention(query, key, value, head_num, input_layout, pse, None,
                                   atten_mask, scale, 1.0, pre_tockens, next_tockens,
                                   inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                                   sparse_mode, softmax_layout=softmax_layout, sink=sink)
        if softmax_max is None:
            smax, ssum = fwd[1], fwd[2]
        if attention_in is None:
            o4 = _kernel_view(fwd[0], g, g.h)

    acc = np.float64 if g.q.dtype == np.float64 else np.float32
    rmax, rsum = _stats(smax, ssum, g, o, acc)
    common = dict(scale=o["scale"], dropout_p=1.0 - o["keep_prob"], seed=seed, offset=offset,
                  mask_fill=-FLT_MAX, invalid_line_zero=plan.invalid, sink=sink_arr)
    want_dpse = plan.pse is not None
    pse_arr = V.as_array(pse, "pse") if want_dpse else None
    if g.tnd:
        dq, dk, dv, dpse = _run_tnd(g, plan, common, dy4, o4, rmax, rsum, want_dpse, pse_arr)
    else:
        dq, dk, dv, dpse = _run_fixed(g, plan, common, dy4, o4, rmax, rsum, want_dpse)
        if want_dpse:
            dpse = _dpse_fixed(dpse, pse_arr, g)
    if dpse is None:
        dpse = np.empty((0,), dtype=g.q.dtype)
    return (_finish(dq, g, g.h, g.d), _finish(dk, g, g.hk, g.d), _finish(dv, g, g.hk, g.dv),
            dpse)
