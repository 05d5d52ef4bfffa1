"""torch_npu compatible attention gradient on NumPy arrays (API.md section 4).

``npu_fusion_attention_grad`` with torch_npu's names, defaults and (dq, dk, dv, dpse) result,
following specs/npu_fusion_attention.md section 9. Like the forward front-end (npu.py) this module
holds no attention math: it validates and translates the arguments with npu.py's own plan and
replays the forward's kernel calls (so the gradient sees exactly the forward's bands, masks, pse
views and invalid-line switch), turns the given softmax_max/softmax_sum/attention_in into the kernel's
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
from ._npu_args import INT32_MAX, kernel_view
from .npu import (
    _ALIBI_ROWS,
    _finish,
    _layout_array,
    _ntd_block,
    _pad_head_dim,
    _plan,
    npu_fusion_attention,
)

__all__ = ["npu_fusion_attention_grad"]

_U64 = 1 << 64


# ---- arrays in the call's layout ----------------------------------------------------------------

def _layout_shape(g, rows, n, d):
    """Shape of a (rows, n heads, head dim d) operand in the call's layout."""
    return {"BSH": (g.b, rows, n * d), "SBH": (rows, g.b, n * d), "BSND": (g.b, rows, n, d),
            "BNSD": (g.b, n, rows, d), "TND": (rows, n, d)}[g.layout]


def _query_like(x, name, g):
    """dy / attention_in: the forward output's shape and query's dtype, as a kernel view."""
    a = V.as_array(x, name)
    V.check_same_dtype(a, name, g.q, "query")
    rows = g.tq if g.tnd else g.sq
    want = _layout_shape(g, rows, g.h, g.dv)
    if tuple(a.shape) != want:
        raise ValueError(f"{name}: expected shape {list(want)} (the attention output of input_layout "
                         f"{g.layout}), got {list(a.shape)}")
    return kernel_view(V.last_dim_contiguous(a), g.layout, g.h)


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
            for bi in range(g.b):
                qa, qb = int(g.cu_q[bi]), int(g.cu_q[bi + 1])
                if qb > qa:
                    dst[:, qa:qb] = _ntd_block(src.reshape(-1), g, bi)[..., 0]
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

def _run_fixed(plan, common, dy4, o4, rmax, rsum, want_dpse):
    g = plan.g
    dq, dq4 = _layout_array(g, g.sq, g.h, g.q.dtype)
    dk, dk4 = _layout_array(g, g.sk, g.hk, g.q.dtype)
    dv, dv4 = _layout_array(g, g.sk, g.hk, g.q.dtype)
    call, = plan.calls
    _, _, _, dpse = backward(
        _pad_head_dim(dy4, g.d), g.q, g.k, _pad_head_dim(g.v, g.d), _pad_head_dim(o4, g.d),
        rowmax=rmax, rowsum=rsum, want_dpse=want_dpse, grads=(dq4, dk4, dv4), **call.kw,
        **common)
    return dq, dk, dv, dpse


def _run_tnd(plan, common, dy4, o4, rmax, rsum, pse):
    """The forward's kernel calls (npu._tnd_calls) replayed on the same slices, so dropout is
    keyed as in the forward. Gradients start zeroed: rows outside every sequence stay 0."""
    g = plan.g
    vk = _pad_head_dim(g.v, g.d)
    dy4, o4 = _pad_head_dim(dy4, g.d), _pad_head_dim(o4, g.d)
    dq, _ = _layout_array(g, g.tq, g.h, g.q.dtype, zeroed=True)
    dk, _ = _layout_array(g, g.tk, g.hk, g.q.dtype, zeroed=True)
    dv, _ = _layout_array(g, g.tk, g.hk, g.q.dtype, zeroed=True)
    want_dpse = pse is not None
    dpse = np.zeros(pse.shape, np.float64 if g.q.dtype == np.float64 else np.float32) \
        if want_dpse else None
    for c in plan.calls:
        (qa, qb), (ka, kb), (b0, b1) = c.q_rows, c.k_rows, c.batches
        _, _, _, part = backward(
            dy4[qa:qb], g.q[qa:qb], g.k[ka:kb], vk[ka:kb], o4[qa:qb], rowmax=rmax[:, qa:qb],
            rowsum=rsum[:, qa:qb], want_dpse=want_dpse, grads=(dq[qa:qb], dk[ka:kb], dv[ka:kb]),
            **c.kw, **common)
        if want_dpse:
            # part: (b1, h, maxSq, maxSkv) of this group, batch bi in its top-left corner.
            for bi in range(b0, b1):
                s = int(g.lq[bi])  # Sq_b == Skv_b for pse (checked by npu._tnd_pse)
                if s:
                    _alibi_grad(part[bi, :, :s, :s], pse.shape[3],
                                dpse[bi if pse.shape[0] > 1 else 0])
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
    plan = _plan(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                 scale_value, keep_prob, pre_tockens, next_tockens, inner_precise, prefix,
                 actual_seq_qlen, actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync,
                 softmax_layout, sink, scale_name="scale_value")
    g, o = plan.g, plan.o
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
                                   atten_mask, o["scale"], 1.0, pre_tockens, next_tockens,
                                   inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                                   sparse_mode, softmax_layout=softmax_layout, sink=sink)
        if softmax_max is None:
            smax, ssum = fwd[1], fwd[2]
        if attention_in is None:
            o4 = kernel_view(fwd[0], g.layout, g.h)

    acc = np.float64 if g.q.dtype == np.float64 else np.float32
    rmax, rsum = _stats(smax, ssum, g, o, acc)
    common = plan.common(seed, offset)
    pse_arr = V.as_array(pse, "pse") if pse is not None else None
    if g.tnd:
        dq, dk, dv, dpse = _run_tnd(plan, common, dy4, o4, rmax, rsum, pse_arr)
    else:
        dq, dk, dv, dpse = _run_fixed(plan, common, dy4, o4, rmax, rsum, pse_arr is not None)
        if pse_arr is not None:
            dpse = _dpse_fixed(dpse, pse_arr, g)
    if dpse is None:
        dpse = np.empty((0,), dtype=g.q.dtype)
    return (_finish(dq, g, g.h, g.d), _finish(dk, g, g.hk, g.d), _finish(dv, g, g.hk, g.dv),
            dpse)
