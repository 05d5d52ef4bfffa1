"""npu_fusion_attention_grad against flash_attn_c.reference.npu_fusion_attention_grad.

Each case runs our npu_fusion_attention forward, then hands its softmax_max, softmax_sum and
attention_out (the values a training step passes) to our grad and to the naive reference grad, in
float64 and in the input precision; the error against float64 may be at most 3x the naive
low-precision error (flash-attn's rule for gradients). Also: finite differences on a tiny float64
problem, dropout replay with the forward's (seed, offset, numels), merged ring-attention style
statistics, and argument errors.
"""
import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import reference as ref
from flash_attn_c.testing import assert_attention_close

from conftest import DTYPES, ISAS, noncontiguous, randn, using_isa

TRIU = np.triu(np.ones((2048, 2048), bool), 1)  # the compressed mask of modes 2, 3, 4, 7, 8
PREFIX_MASK = np.concatenate([TRIU, np.zeros((1024, 2048), bool)])  # mode 6: [3072, 2048]
PREFIX_MASK[2048:, 1024:] = True
LAYOUTS = ["BSH", "SBH", "BSND", "BNSD"]


def to_layout(x, layout):
    """(b, s, n, d) -> the layout's order (views where possible)."""
    b, s, n, d = x.shape
    if layout == "BSH":
        return x.reshape(b, s, n * d)
    if layout == "SBH":
        return x.transpose(1, 0, 2, 3).reshape(s, b, n * d)
    if layout == "BNSD":
        return x.transpose(0, 2, 1, 3)
    return x


def run_grad(q, k, v, head_num, layout, dy=None, rng=None, fwd_kw=None, grad_extra=None, **kw):
    """Forward (ours), then our grad and the reference grad (float64 and input precision) on the
    forward's statistics; asserts all four outputs. Returns (ours, exact)."""
    res = fa.npu_fusion_attention(q, k, v, head_num, layout, **kw, **(fwd_kw or {}))
    if dy is None:
        dy = randn(rng, res[0].shape, q.dtype)
    gkw = dict(kw)
    gkw["scale_value"] = gkw.pop("scale", 1.0)
    gkw.update(softmax_max=res[1], softmax_sum=res[2], attention_in=res[0], **(grad_extra or {}))
    got = fa.npu_fusion_attention_grad(q, k, v, dy, head_num, layout, **gkw)
    exact = ref.npu_fusion_attention_grad(q, k, v, dy, head_num, layout, **gkw)
    low = ref.npu_fusion_attention_grad(q, k, v, dy, head_num, layout, compute_dtype=q.dtype,
                                        **gkw) if q.dtype != np.float64 else exact
    check(got, exact, low, q, k, v, kw.get("pse"))
    return got, exact


def check(got, exact, low, q, k, v, pse):
    for name, g, e, lo, like in zip(("dq", "dk", "dv", "dpse"), got, exact, low, (q, k, v, pse)):
        if like is None:
            assert g.shape == (0,) and g.dtype == q.dtype
            continue
        assert g.shape == like.shape and g.dtype == like.dtype, (name, g.shape, g.dtype)
        assert g.flags.c_contiguous
        assert_attention_close(g, e, reference_low_precision=lo, multiplier=3.0, name=name)


# ---- fixed layouts: layout x sparse_mode x GQA x dtype -----------------------------------------

def mode_kwargs(mode, rng, b, h, sq, sk):
    """atten_mask / tockens / prefix for one sparse_mode (mask shapes vary by mode).

    Full masks mask every band key of row 1 (V averaged over the band); prefix modes may draw
    prefix 0 with Sq > Skv (the top rows see no key)."""
    if mode == 0:  # full mask [Sq, Skv] plus a left-up band
        m = rng.random((sq, sk)) < 0.2
        m[1] = True
        return dict(atten_mask=m, pre_tockens=4, next_tockens=2)
    if mode == 1:  # [B, 1, Sq, Skv] uint8
        return dict(atten_mask=(rng.random((b, 1, sq, sk)) < 0.3).astype(np.uint8))
    if mode in (2, 3):
        return dict(atten_mask=TRIU)
    if mode == 4:
        return dict(atten_mask=TRIU, pre_tockens=3, next_tockens=1)
    lo = 0 if sq > sk else sk - sq
    prefix = [lo] + rng.integers(lo, sk + 1, size=b - 1).tolist()
    if mode == 5:  # [B, N, Sq, Skv]
        m = rng.random((b, h, sq, sk)) < 0.1
        m[..., 1, :] = True
        return dict(atten_mask=m, prefix=prefix)
    return dict(atten_mask=PREFIX_MASK, prefix=prefix)


GRID = [(layout, mode, i) for i, (layout, mode) in
        enumerate((lay, m) for lay in LAYOUTS for m in range(7))]


@pytest.mark.parametrize("layout,mode,i", GRID)
def test_fixed_layout_modes(layout, mode, i):
    """Every layout x sparse_mode; GQA ratio, dtype, Sq vs Skv and scale rotate through the
    cases so each pairing appears without a full product."""
    rng = np.random.default_rng(100 + i)
    dtype = DTYPES[("f32", "bf16", "f16", "f64")[i % 4]]
    h, hk = ((4, 4), (4, 2), (4, 1))[i % 3]
    sq, sk = ((9, 13), (13, 9), (11, 11))[(i // 3) % 3]
    b, d = 2, 16
    q = to_layout(randn(rng, (b, sq, h, d), dtype), layout)
    k = to_layout(randn(rng, (b, sk, hk, d), dtype), layout)
    v = to_layout(randn(rng, (b, sk, hk, d), dtype), layout)
    run_grad(q, k, v, h, layout, rng=rng, scale=0.3, sparse_mode=mode,
             **mode_kwargs(mode, rng, b, h, sq, sk))


# ---- pse forms and dpse ------------------------------------------------------------------------

@pytest.mark.parametrize("pse_shape", ["BNSS", "1NSS", "BN1S", "1N1S"])
@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "f64"])
def test_pse_shapes(pse_shape, dtype):
    rng = np.random.default_rng(200)
    dt = DTYPES[dtype]
    b, h, hk, sq, sk, d = 2, 4, 2, 10, 14, 8
    q, k, v = (randn(rng, (b, s, n, d), dt) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    rows = sq if pse_shape.endswith("SS") else 1
    pse = randn(rng, (b if pse_shape[0] == "B" else 1, h, rows, sk), dt)
    mask = rng.random((b, h, sq, sk)) < 0.2
    run_grad(q, k, v, h, "BSND", rng=rng, pse=pse, atten_mask=mask, scale=0.25,
             pre_tockens=6, next_tockens=3)


@pytest.mark.parametrize("mask_shape", ["BNSS", "B1SS", "11SS", "SS"])
@pytest.mark.parametrize("mode,mask_dtype", [(0, bool), (1, np.uint8)])
def test_mask_shapes(mask_shape, mode, mask_dtype):
    rng = np.random.default_rng(250)
    b, h, hk, sq, sk, d = 2, 4, 2, 8, 12, 16
    q, k, v = (randn(rng, (b, s, n, d), np.float32) for s, n in ((sq, h), (sk, hk), (sk, hk)))
    shape = {"BNSS": (b, h, sq, sk), "B1SS": (b, 1, sq, sk), "11SS": (1, 1, sq, sk),
             "SS": (sq, sk)}[mask_shape]
    mask = rng.random(shape) < 0.25
    mask[..., 2, :] = True  # every band key of row 2 masked: V averaged over the band
    run_grad(q, k, v, h, "BSND", rng=rng, atten_mask=mask.astype(mask_dtype), sparse_mode=mode,
             pre_tockens=5, next_tockens=3, scale=0.3)


def alibi_compressed(rng, p0, n, s, cols, dtype):
    """The last 1024 rows of a cols x cols alibi (Toeplitz) matrix, [p0, n, 1024, cols]."""
    slopes = rng.uniform(0.05, 0.5, size=(p0, n, 1, 1))
    i = np.arange(cols - 1024, cols)[:, None]
    return (-slopes * np.abs(np.arange(cols)[None] - i)).astype(dtype)


def test_alibi_compressed_pse():
    """[1, N, 1024, S] with S > 1024 (Sq == Skv): the Toeplitz view in the forward, dpse
    scattered the way the spec's reconstruction reads the compressed rows."""
    rng = np.random.default_rng(300)
    n, s, d = 2, 1030, 8
    q, k, v = (randn(rng, (1, s, n, d), np.float32) for _ in range(3))
    pse = alibi_compressed(rng, 1, n, s, s, np.float32)
    run_grad(q, k, v, n, "BSND", rng=rng, pse=pse, atten_mask=TRIU, sparse_mode=3, scale=0.3)


# ---- TND ---------------------------------------------------------------------------------------

TND_CASES = [  # (sparse_mode, softmax_layout, extra forward kwargs)
    (0, "", dict(atten_mask="window", pre_tockens=5, next_tockens=1)),
    (1, "TND", dict(atten_mask="block")),
    (1, "", dict(atten_mask="blocksum")),
    (2, "", dict(atten_mask=TRIU)),
    (3, "TND", dict(atten_mask=TRIU)),
    (4, "", dict(atten_mask=TRIU, pre_tockens=3, next_tockens=2)),
    (6, "TND", dict(atten_mask=PREFIX_MASK, prefix="prefix")),
    (7, "", dict(atten_mask=TRIU, pre_tockens=100, next_tockens=-1)),
    (8, "TND", dict(atten_mask=TRIU, pre_tockens=100, next_tockens=2)),
    (0, "TND", dict()),  # no mask: full attention
]


@pytest.mark.parametrize("case", range(len(TND_CASES)))
def test_tnd(case):
    mode, slayout, extra = TND_CASES[case]
    rng = np.random.default_rng(400 + case)
    dtype = DTYPES[("f32", "bf16", "f16", "f64")[case % 4]]
    h, hk = ((4, 2), (4, 4), (4, 1))[case % 3]
    lq, lk = [3, 0, 6, 5, 0], [4, 3, 7, 6, 0]  # a batch without queries, a disabled trailing one
    cq, ck = np.cumsum(lq).tolist(), np.cumsum(lk).tolist()
    tq, tk = sum(lq) + 2, sum(lk) + 1  # rows past the sequences: gradient 0
    d, dv = 16, (16, 8)[case % 2]  # Dv < Dk on odd cases
    q, k = randn(rng, (tq, h, d), dtype), randn(rng, (tk, hk, d), dtype)
    v = randn(rng, (tk, hk, dv), dtype)
    kw = dict(extra)
    # "window": top-left [maxSq, maxSkv]; block-diagonal "block" [Tq, Tkv] (T past the
    # sequences) and "blocksum" [sum Sq, sum Skv]. Row 1 has every band key masked.
    shape = {"window": (max(lq), max(lk)), "block": (tq, tk), "blocksum": (sum(lq), sum(lk))}
    if isinstance(kw.get("atten_mask"), str):
        kw["atten_mask"] = rng.random(shape[kw["atten_mask"]]) < 0.2
        kw["atten_mask"][1] = True
    if kw.get("prefix") == "prefix":
        kw["prefix"] = [min(b, max(b - a, 0) + 1) for a, b in zip(lq, lk)]  # in [Skv-Sq, Skv]
    got, _ = run_grad(q, k, v, h, "TND", rng=rng, scale=0.3, sparse_mode=mode,
                      softmax_layout=slayout, actual_seq_qlen=cq, actual_seq_kvlen=ck, **kw)
    assert (got[0][sum(lq):] == 0).all() and (got[1][sum(lk):] == 0).all()


def test_tnd_alibi_compressed_pse():
    rng = np.random.default_rng(450)
    h, d, lens = 2, 8, [5, 9, 4]
    cu = np.cumsum(lens).tolist()
    q, k, v = (randn(rng, (cu[-1], h, d), np.float32) for _ in range(3))
    pse = alibi_compressed(rng, 3, h, 9, 12, np.float32)  # per batch, C = 12 >= max Skv
    run_grad(q, k, v, h, "TND", rng=rng, pse=pse, atten_mask=TRIU, sparse_mode=3, scale=0.4,
             actual_seq_qlen=cu, actual_seq_kvlen=cu)


# ---- fully masked rows, invalid lines, sink, non-contiguous inputs, every ISA -----------------

@pytest.mark.parametrize("inner_precise", [0, 2])
def test_fully_masked_rows(inner_precise):
    """Without invalid-line mode a fully masked row averages V (gradient to V only); with it the
    row is 0 and passes nothing."""
    rng = np.random.default_rng(500)
    q, k, v = (randn(rng, (1, 7, 2, 8), np.float32) for _ in range(3))
    mask = rng.random((7, 7)) < 0.2
    mask[3] = True
    got, _ = run_grad(q, k, v, 2, "BSND", rng=rng, atten_mask=mask, sparse_mode=1,
                      inner_precise=inner_precise)
    assert (got[0][0, 3] == 0).all()


def test_auto_invalid_lines():
    """sparse_mode 3 with Sq > Skv: the top rows see no key; their gradients are 0."""
    rng = np.random.default_rng(510)
    q = randn(rng, (2, 12, 2, 8), np.float16)
    k, v = (randn(rng, (2, 7, 2, 8), np.float16) for _ in range(2))
    got, _ = run_grad(q, k, v, 2, "BSND", rng=rng, atten_mask=TRIU, sparse_mode=3)
    assert (got[0][:, :5] == 0).all()


def test_sink():
    """sink enters only through the given statistics (which include it)."""
    rng = np.random.default_rng(520)
    q, k, v = (randn(rng, (2, 9, 4, 8), np.float32) for _ in range(3))
    sink = rng.standard_normal(4).astype(np.float32)
    run_grad(q, k, v, 4, "BSND", rng=rng, sink=sink, scale=0.5, atten_mask=TRIU, sparse_mode=2)


@pytest.mark.parametrize("inner_precise", [0, 2])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("mode", [0, 5, 6])
def test_rows_without_keys(mode, with_sink, inner_precise):
    """Rows whose band keys are all masked (mode 0/5: gradient to V only, or none in invalid-line
    mode) and rows whose band is empty (prefix 0 with Sq > Skv: no gradient), with and without a
    sink, against the reference grad."""
    rng = np.random.default_rng(540 + mode)
    q = randn(rng, (2, 12, 2, 8), np.float32)
    k, v = (randn(rng, (2, 9, 2, 8), np.float32) for _ in range(2))
    kw = dict(pre_tockens=3, next_tockens=2) if mode == 0 else dict(prefix=[0, 4])
    if mode == 6:
        mask = PREFIX_MASK
    else:
        mask = rng.random((2, 1, 12, 9)) < 0.2
        mask[:, :, 5] = True
    sink = rng.standard_normal(2).astype(np.float32) if with_sink else None
    run_grad(q, k, v, 2, "BSND", rng=rng, atten_mask=mask, sparse_mode=mode, sink=sink,
             inner_precise=inner_precise, scale=0.4, **kw)


@pytest.mark.parametrize("isa", ISAS)
def test_noncontiguous_every_isa(isa):
    rng = np.random.default_rng(530)
    q, k, v = (noncontiguous(randn(rng, (2, n, 11, 24), np.float32), rng) for n in (4, 2, 2))
    dy = noncontiguous(randn(rng, (2, 4, 11, 24), np.float32), rng)
    with using_isa(isa):
        run_grad(q, k, v, 4, "BNSD", dy=dy, scale=0.2, atten_mask=TRIU, sparse_mode=4,
                 pre_tockens=4, next_tockens=0)


# ---- statistics: recomputed when absent, merged across key blocks -----------------------------

def test_missing_statistics_are_recomputed():
    rng = np.random.default_rng(600)
    q, k, v = (randn(rng, (7, 2, 24), np.float32) for _ in range(3))
    kw = dict(atten_mask=TRIU, sparse_mode=3, scale=0.3)
    out, smax, ssum = fa.npu_fusion_attention(q, k, v, 3, "SBH", **kw)[:3]
    dy = randn(rng, out.shape, np.float32)
    kw["scale_value"] = kw.pop("scale")
    full = fa.npu_fusion_attention_grad(q, k, v, dy, 3, "SBH", softmax_max=smax, softmax_sum=ssum,
                                        attention_in=out, **kw)
    for given in ({}, dict(attention_in=out), dict(softmax_max=smax, softmax_sum=ssum)):
        got = fa.npu_fusion_attention_grad(q, k, v, dy, 3, "SBH", **given, **kw)
        for a, b in zip(got[:3], full[:3]):
            np.testing.assert_array_equal(a, b)


def merge(parts):
    """Ring attention's merge of partial (out, softmax_max, softmax_sum) over disjoint key sets,
    in float64 (combine_partials' math in the NPU's max/sum form)."""
    m = np.max([p[1] for p in parts], axis=0)
    w = [p[2] * np.exp(p[1] - m) for p in parts]
    total = np.sum(w, axis=0)
    out = sum(p[0].astype(np.float64) * wi[..., 0].transpose(2, 0, 1)[..., None]
              for p, wi in zip(parts, w))
    return out / total[..., 0].transpose(2, 0, 1)[..., None], m, total


@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_merged_statistics(dtype):
    """Grad of two key blocks fed the merged (global) statistics and output sums to the grad of
    the whole: dq adds up, dk/dv are the blocks' rows (SBH, as MindSpeed's ring attention)."""
    rng = np.random.default_rng(610)
    dt = DTYPES[dtype]
    sq, sk, b, h, hk, d = 10, 16, 2, 4, 2, 8
    q = randn(rng, (sq, b, h * d), dt)
    k, v = randn(rng, (sk, b, hk * d), dt), randn(rng, (sk, b, hk * d), dt)
    dy = randn(rng, (sq, b, h * d), dt)
    pse = randn(rng, (b, h, sq, sk), dt)
    halves = (slice(0, 7), slice(7, sk))
    parts = [fa.npu_fusion_attention(q, k[s], v[s], h, "SBH", pse=pse[..., s], scale=0.3)[:3]
             for s in halves]
    parts = [(o.reshape(sq, b, h, d), m.astype(np.float64), t.astype(np.float64)) for o, m, t in parts]
    out, smax, ssum = merge(parts)
    out = out.reshape(sq, b, h * d).astype(dt)
    acc = np.float64 if dt == np.float64 else np.float32
    grads = [fa.npu_fusion_attention_grad(q, k[s], v[s], dy, h, "SBH", pse=pse[..., s],
                                          softmax_max=smax.astype(acc), softmax_sum=ssum.astype(acc),
                                          attention_in=out, scale_value=0.3) for s in halves]
    full = fa.npu_fusion_attention_grad(q, k, v, dy, h, "SBH", pse=pse, scale_value=0.3)
    tol = dict(rtol=1e-9, atol=1e-9) if dt == np.float64 else dict(rtol=2e-4, atol=2e-4)
    np.testing.assert_allclose(grads[0][0].astype(np.float64) + grads[1][0], full[0], **tol)
    for i in (1, 2):
        np.testing.assert_allclose(np.concatenate([g[i] for g in grads]), full[i], **tol)
    np.testing.assert_allclose(np.concatenate([g[3] for g in grads], axis=-1), full[3], **tol)


# ---- dropout replay ----------------------------------------------------------------------------

def _keep_mask_fixed(q, k, v, seed_state, keep_prob, scale):
    """The forward's keep mask, read back from flash_attn_func's S_dmask under the same global
    generator state: both front-ends key Philox by (seed, offset, b * H + h, i, j)."""
    fa.manual_seed(seed_state)
    _, _, s = fa.flash_attn_func(q, k, v, dropout_p=1 - keep_prob, softmax_scale=scale,
                                 return_attn_probs=True)
    return ~np.signbit(s)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_dropout_replay(dtype):
    rng = np.random.default_rng(700)
    dt = DTYPES[dtype]
    q = randn(rng, (2, 11, 4, 8), dt)
    k, v = randn(rng, (2, 15, 2, 8), dt), randn(rng, (2, 15, 2, 8), dt)
    fa.manual_seed(31)
    res = fa.npu_fusion_attention(q, k, v, 4, "BSND", scale=0.3, keep_prob=0.8)
    seed, offset, numels = res[4:]
    assert numels == 2 * 4 * 11 * 15
    keep = _keep_mask_fixed(q, k, v, 31, 0.8, 0.3)
    dy = randn(rng, res[0].shape, dt)
    kw = dict(softmax_max=res[1], softmax_sum=res[2], attention_in=res[0], scale_value=0.3,
              keep_prob=0.8)
    got = fa.npu_fusion_attention_grad(q, k, v, dy, 4, "BSND", seed=seed, offset=offset,
                                       numels=numels, **kw)
    exact = ref.npu_fusion_attention_grad(q, k, v, dy, 4, "BSND", dropout_mask=keep, **kw)
    low = ref.npu_fusion_attention_grad(q, k, v, dy, 4, "BSND", dropout_mask=keep,
                                        compute_dtype=dt, **kw)
    check(got, exact, low, q, k, v, None)
    again = fa.npu_fusion_attention_grad(q, k, v, dy, 4, "BSND", seed=seed, offset=offset,
                                         numels=numels, **kw)
    for a, b in zip(got[:3], again[:3]):
        np.testing.assert_array_equal(a, b)  # deterministic
    other = fa.npu_fusion_attention_grad(q, k, v, dy, 4, "BSND", seed=seed + 1, offset=offset,
                                         numels=numels, **kw)
    assert not np.array_equal(other[2], got[2])


@pytest.mark.parametrize("mode", [2, 8])
def test_dropout_replay_tnd(mode):
    """Mode 8 splits the batches into several kernel calls (the first batch has its own band):
    the replayed mask must still be keyed by the global batch index."""
    rng = np.random.default_rng(710)
    h, hk, d = 4, 2, 8
    lq, lk = [4, 0, 7, 3], [5, 2, 9, 3]
    cq, ck = np.cumsum(lq).tolist(), np.cumsum(lk).tolist()
    q = randn(rng, (sum(lq), h, d), np.float32)
    k, v = (randn(rng, (sum(lk), hk, d), np.float32) for _ in range(2))
    kw = dict(scale=0.3, keep_prob=0.7, actual_seq_qlen=cq, actual_seq_kvlen=ck,
              atten_mask=TRIU, sparse_mode=mode, pre_tockens=100, next_tockens=2,
              softmax_layout="TND")
    fa.manual_seed(5)
    res = fa.npu_fusion_attention(q, k, v, h, "TND", **kw)
    fa.manual_seed(5)
    cu_q, cu_k = np.array([0] + cq, np.int32), np.array([0] + ck, np.int32)
    _, _, s = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lq), max(lk), dropout_p=0.3,
                                        softmax_scale=0.3, return_attn_probs=True)
    keep = ~np.signbit(s)  # [B, N, maxSq, maxSkv], each sequence top-left
    dy = randn(rng, res[0].shape, np.float32)
    kw["scale_value"] = kw.pop("scale")
    kw.update(softmax_max=res[1], softmax_sum=res[2], attention_in=res[0])
    got = fa.npu_fusion_attention_grad(q, k, v, dy, h, "TND", seed=res[4], offset=res[5],
                                       numels=res[6], **kw)
    exact = ref.npu_fusion_attention_grad(q, k, v, dy, h, "TND", dropout_mask=keep, **kw)
    low = ref.npu_fusion_attention_grad(q, k, v, dy, h, "TND", dropout_mask=keep,
                                        compute_dtype=np.float32, **kw)
    check(got, exact, low, q, k, v, None)


# ---- finite differences --------------------------------------------------------------------------

def test_finite_differences():
    """The gradient of sum(out * dy) with respect to q, k, v and pse, by central differences of
    our own forward in float64 (GQA, masked entries, band, row-broadcast pse would hide rows, so
    the full pse)."""
    rng = np.random.default_rng(800)
    q = rng.standard_normal((1, 3, 2, 3))
    k, v = rng.standard_normal((1, 4, 1, 3)), rng.standard_normal((1, 4, 1, 3))
    pse = rng.standard_normal((1, 2, 3, 4))
    mask = np.zeros((3, 4), bool)
    mask[1, 2] = True
    kw = dict(atten_mask=mask, pre_tockens=3, next_tockens=1, scale=0.7)
    out = fa.npu_fusion_attention(q, k, v, 2, "BSND", pse=pse, **kw)
    dy = rng.standard_normal(out[0].shape)
    got = fa.npu_fusion_attention_grad(q, k, v, dy, 2, "BSND", pse=pse, softmax_max=out[1],
                                       softmax_sum=out[2], attention_in=out[0], scale_value=0.7,
                                       atten_mask=mask, pre_tockens=3, next_tockens=1)
    args = [q, k, v, pse]
    eps = 1e-6
    for which, grad in zip(range(4), got):
        num = np.zeros_like(args[which])
        for idx in np.ndindex(args[which].shape):
            vals = []
            for sign in (1, -1):
                a = [x.copy() for x in args]
                a[which][idx] += sign * eps
                o = fa.npu_fusion_attention(a[0], a[1], a[2], 2, "BSND", pse=a[3], **kw)[0]
                vals.append(np.sum(o * dy))
            num[idx] = (vals[0] - vals[1]) / (2 * eps)
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)


# ---- errors ------------------------------------------------------------------------------------

def _problem():
    rng = np.random.default_rng(900)
    q, k, v = (randn(rng, (2, 6, 2, 8), np.float32) for _ in range(3))
    out, smax, ssum = fa.npu_fusion_attention(q, k, v, 2, "BSND")[:3]
    return q, k, v, out, smax, ssum


ERRORS = [
    (ValueError, r"dy: expected shape \[2, 6, 2, 8\]", dict(dy=lambda p: p[3][:, :5])),
    (TypeError, r"dy: expected dtype float32", dict(dy=lambda p: p[3].astype(np.float16))),
    (ValueError, r"attention_in: expected shape", dict(attention_in=lambda p: p[3][..., :4])),
    (TypeError, r"attention_in: expected dtype", dict(attention_in=lambda p: p[3].astype(np.float64))),
    (ValueError, r"softmax_max: expected shape \[2, 2, 6, 8\]", dict(softmax_max=lambda p: p[4][..., :1])),
    (ValueError, r"softmax_sum: expected shape", dict(softmax_sum=lambda p: p[5][:1])),
    (TypeError, r"softmax_max: expected dtype float32", dict(softmax_max=lambda p: p[4].astype(np.float16))),
    (ValueError, r"softmax_max/softmax_sum: give both", dict(softmax_sum=None)),
    (ValueError, r"attention_in: required when keep_prob < 1",
     dict(attention_in=None, keep_prob=0.9, numels=144)),
    (ValueError, r"numels: expected 144", dict(keep_prob=0.9, numels=5)),
    (ValueError, r"seed: expected an integer in \[0, 2\*\*64\)", dict(keep_prob=0.9, numels=144, seed=-1)),
    (TypeError, r"offset: expected an integer", dict(keep_prob=0.9, numels=144, offset=1.5)),
    (TypeError, r"scale_value: expected a real number", dict(scale_value="x")),
    (ValueError, r"keep_prob", dict(keep_prob=0.0)),
    (ValueError, r"softmax_layout: 'TND' requires input_layout TND", dict(softmax_layout="TND")),
    (ValueError, r"sparse_mode", dict(sparse_mode=9, atten_mask=TRIU)),
    (ValueError, r"head_num", dict(head_num=3)),
    (ValueError, r"input_layout", dict(input_layout="BSD")),
    (ValueError, r"pse: expected dims", dict(pse=np.zeros((2, 3, 6, 6), np.float32))),
    (TypeError, r"pse: expected dtype float32", dict(pse=np.zeros((2, 2, 6, 6), np.float64))),
    (ValueError, r"atten_mask: sparse_mode 2 expects the compressed mask",
     dict(atten_mask=np.zeros((6, 6), bool), sparse_mode=2)),
    (ValueError, r"actual_seq_qlen/actual_seq_kvlen: only valid with input_layout TND",
     dict(actual_seq_qlen=[6, 12], actual_seq_kvlen=[6, 12])),
    (NotImplementedError, r"padding_mask", dict(padding_mask=np.zeros((2, 6), bool))),
]


@pytest.mark.parametrize("exc,match,change", ERRORS)
def test_errors(exc, match, change):
    p = _problem()
    q, k, v, out, smax, ssum = p
    args = dict(dy=out, head_num=2, input_layout="BSND", softmax_max=smax, softmax_sum=ssum,
                attention_in=out)
    for name, val in change.items():
        args[name] = val(p) if callable(val) else val
    dy, head_num, layout = args.pop("dy"), args.pop("head_num"), args.pop("input_layout")
    with pytest.raises(exc, match=match):
        fa.npu_fusion_attention_grad(q, k, v, dy, head_num, layout, **args)


def test_tnd_statistics_shape_error():
    rng = np.random.default_rng(910)
    q, k, v = (randn(rng, (10, 2, 8), np.float32) for _ in range(3))
    res = fa.npu_fusion_attention(q, k, v, 2, "TND", actual_seq_qlen=[4, 10], actual_seq_kvlen=[4, 10])
    with pytest.raises(ValueError, match=r"softmax_max: expected shape \[10, 2, 8\] \(\[T, N, 8\]"):
        fa.npu_fusion_attention_grad(q, k, v, res[0], 2, "TND", softmax_max=res[1][:, :1],
                                     softmax_sum=res[2], attention_in=res[0],
                                     actual_seq_qlen=[4, 10], actual_seq_kvlen=[4, 10])
