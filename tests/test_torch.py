"""flash_attn_c.torch: the autograd adapters against torch's own SDPA and flash_attn_c.reference.

Forward results and gradients are compared with torch.nn.functional.scaled_dot_product_attention
in float64 (the exact answer), using flash-attn's rule: the error may be at most a few times the
error of the same computation done by torch in the input's low precision. gradcheck runs in
float64. Sizes are small on purpose: the kernels themselves are covered by test_flash_attn.py and
test_backward.py; this file checks the glue (layouts, views, gradients' shapes, dropout replay,
masks, install()).
"""
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402

import flash_attn_c  # noqa: E402
import flash_attn_c.torch as fat  # noqa: E402
from flash_attn_c import reference  # noqa: E402
from flash_attn_c.testing import assert_attention_close, cu_seqlens_from_lengths  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16, "f64": torch.float64}


def as_np(t):
    """A tensor as a NumPy array in its own precision (bfloat16 as ml_dtypes.bfloat16)."""
    t = t.detach()
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(flash_attn_c.bfloat16)
    return t.numpy()


def rand(*shape, dtype=torch.float32, gen, grad=True):
    return torch.randn(*shape, generator=gen).to(dtype).requires_grad_(grad)


def sdpa_bshd(q, k, v, mask=None, causal=False):
    """torch SDPA on flash-attn's (b, s, h, d) layout; mask True = attend."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=mask, is_causal=causal,
                                       enable_gqa=q.shape[2] != k.shape[2])
    return o.transpose(1, 2)


def window_mask(sq, sk, left, right):
    """flash-attn's bottom-right aligned window as an SDPA bool mask (True = visible)."""
    i = torch.arange(sq)[:, None] + sk - sq
    j = torch.arange(sk)[None, :]
    return (j >= i - left) & (j <= i + right)


def check_against_sdpa(fn, inputs, ref_fn, dtype, *, mult=3.0):
    """fn(*inputs) vs ref_fn on float64 copies (desired) and on the low-precision inputs
    (baseline); the same for the gradients of (out * g).sum()."""
    out = fn(*inputs)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    grads = torch.autograd.grad(out, inputs, g)
    exact = [x.detach().double().requires_grad_() for x in inputs]
    want = ref_fn(*exact)
    want_grads = torch.autograd.grad(want, exact, g.double())
    base = None
    if dtype != torch.float64:
        low = [x.detach().clone().requires_grad_() for x in inputs]
        base_out = ref_fn(*low)
        base = (base_out, *torch.autograd.grad(base_out, low, g))
    names = ["out"] + [f"grad{i}" for i in range(len(inputs))]
    for i, (a, d) in enumerate(zip((out, *grads), (want, *want_grads))):
        assert a.shape == d.shape and a.dtype == dtype, (names[i], a.shape, d.shape, a.dtype)
        assert_attention_close(as_np(a), d.detach().numpy(), name=names[i], multiplier=mult,
                               reference_low_precision=None if base is None else as_np(base[i]))


# ---- flash-attn functions vs SDPA ----------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: f"dtype={d}")
@pytest.mark.parametrize("heads", [(4, 4), (4, 2), (4, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("mode", ["plain", "causal", "window"])
def test_flash_attn_func_vs_sdpa(dtype, heads, mode):
    gen = torch.Generator().manual_seed(0)
    h, hk = heads
    sq = sk = 37 if mode != "plain" else 29
    if mode == "plain":
        sk = 45
    dt = DTYPES[dtype]
    q = rand(2, sq, h, 24, dtype=dt, gen=gen)
    k = rand(2, sk, hk, 24, dtype=dt, gen=gen)
    v = rand(2, sk, hk, 24, dtype=dt, gen=gen)
    window = (7, 3) if mode == "window" else (-1, -1)
    mask = window_mask(sq, sk, *window) if mode == "window" else None
    check_against_sdpa(
        lambda q, k, v: fat.flash_attn_func(q, k, v, causal=mode == "causal", window_size=window),
        (q, k, v), lambda q, k, v: sdpa_bshd(q, k, v, mask, causal=mode == "causal"), dt)


@pytest.mark.parametrize("dtype", ["f32", "bf16"])
def test_packed_gradients(dtype):
    """dqkv / dkv are the unpacked gradients stacked, with the packed shapes."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(1)
    qkv = rand(2, 19, 3, 4, 16, dtype=dt, gen=gen)
    g = torch.randn(2, 19, 4, 16, generator=gen).to(dt)
    out = fat.flash_attn_qkvpacked_func(qkv, causal=True)
    (dqkv,) = torch.autograd.grad(out, qkv, g)
    q, k, v = (qkv[:, :, i].detach().clone().requires_grad_() for i in range(3))
    out2 = fat.flash_attn_func(q, k, v, causal=True)
    dq, dk, dv = torch.autograd.grad(out2, (q, k, v), g)
    assert dqkv.shape == qkv.shape and dqkv.dtype == dt
    assert torch.equal(out, out2) and torch.equal(dqkv, torch.stack((dq, dk, dv), 2))

    q = rand(2, 11, 4, 16, dtype=dt, gen=gen)
    kv = rand(2, 23, 2, 2, 16, dtype=dt, gen=gen)  # GQA: 2 kv heads
    out = fat.flash_attn_kvpacked_func(q, kv)
    dq, dkv = torch.autograd.grad(out, (q, kv), g[:, :11])
    k, v = (kv[:, :, i].detach().clone().requires_grad_() for i in range(2))
    dq2, dk, dv = torch.autograd.grad(fat.flash_attn_func(q, k, v), (q, k, v), g[:, :11])
    assert dkv.shape == kv.shape and torch.equal(dkv, torch.stack((dk, dv), 2))
    assert torch.equal(dq, dq2)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)], ids=["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_varlen_vs_sdpa(dtype, heads, causal):
    """Each sequence of a varlen batch against SDPA on that sequence alone (sq == sk per sequence
    so top-left and bottom-right causal agree)."""
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(2)
    h, hk = heads
    lens = [5, 17, 1, 30]
    cu = torch.from_numpy(cu_seqlens_from_lengths(lens))
    total = sum(lens)
    q = rand(total, h, 16, dtype=dt, gen=gen)
    k = rand(total, hk, 16, dtype=dt, gen=gen)
    v = rand(total, hk, 16, dtype=dt, gen=gen)

    def ref(q, k, v):
        outs = [sdpa_bshd(q[None, a:b], k[None, a:b], v[None, a:b], causal=causal)[0]
                for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())]
        return torch.cat(outs)

    check_against_sdpa(
        lambda q, k, v: fat.flash_attn_varlen_func(q, k, v, cu, cu, max(lens), max(lens),
                                                   causal=causal),
        (q, k, v), ref, dt)


def test_varlen_packed_shapes():
    gen = torch.Generator().manual_seed(3)
    lens = [3, 8, 6]
    cu = torch.from_numpy(cu_seqlens_from_lengths(lens))
    qkv = rand(sum(lens), 3, 2, 8, gen=gen)
    out = fat.flash_attn_varlen_qkvpacked_func(qkv, cu, 8, causal=True)
    (dqkv,) = torch.autograd.grad(out.sum(), qkv)
    q, k, v = (qkv[:, i].detach().clone().requires_grad_() for i in range(3))
    out2 = fat.flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, causal=True)
    assert dqkv.shape == qkv.shape
    assert torch.equal(dqkv, torch.stack(torch.autograd.grad(out2.sum(), (q, k, v)), 1))
    q = rand(sum(lens), 4, 8, gen=gen)
    kv = rand(sum(lens), 2, 2, 8, gen=gen)
    out, lse, probs = fat.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 8, 8,
                                                          return_attn_probs=True)
    dq, dkv = torch.autograd.grad(out.sum(), (q, kv))
    assert dq.shape == q.shape and dkv.shape == kv.shape
    assert lse.shape == (4, sum(lens)) and probs.shape == (3, 4, 8, 8)
    assert not lse.requires_grad and not probs.requires_grad


def test_features_vs_reference():
    """softcap, alibi and windows (which SDPA cannot express) against flash_attn_c.reference."""
    gen = torch.Generator().manual_seed(4)
    q = rand(2, 13, 4, 16, gen=gen)
    k = rand(2, 21, 2, 16, gen=gen)
    v = rand(2, 21, 2, 16, gen=gen)
    slopes = torch.rand(4, generator=gen) * 0.3
    opts = dict(causal=True, window_size=(9, -1), softcap=5.0, softmax_scale=0.3)
    out, lse, _ = fat.flash_attn_func(q, k, v, alibi_slopes=slopes, return_attn_probs=True, **opts)
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), g)
    npq, npk, npv = (x.detach().numpy() for x in (q, k, v))
    r_out, r_lse, _ = reference.flash_attn_func(npq, npk, npv, alibi_slopes=slopes.numpy(),
                                                return_attn_probs=True, **opts)
    r_grads = reference.flash_attn_bwd(g.numpy(), npq, npk, npv, r_out, r_lse,
                                       alibi_slopes=slopes.numpy(), **opts)
    assert_attention_close(out.detach().numpy(), r_out)
    for name, a, d in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_attention_close(a.numpy(), d, name=name)


# ---- gradcheck -----------------------------------------------------------------------------------

def f64(*shape, gen):
    return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)


def test_gradcheck_flash_attn():
    gen = torch.Generator().manual_seed(5)
    q, k, v = f64(1, 4, 4, 3, gen=gen), f64(1, 6, 2, 3, gen=gen), f64(1, 6, 2, 3, gen=gen)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fat.flash_attn_func(q, k, v, causal=True, softcap=2.0), (q, k, v))
    qkv = f64(2, 5, 3, 2, 4, gen=gen)
    assert torch.autograd.gradcheck(
        lambda x: fat.flash_attn_qkvpacked_func(x, window_size=(2, 1)), (qkv,))
    cu = torch.tensor([0, 2, 7], dtype=torch.int32)
    q, k, v = f64(7, 2, 3, gen=gen), f64(7, 1, 3, gen=gen), f64(7, 1, 3, gen=gen)
    assert torch.autograd.gradcheck(
        lambda q, k, v: fat.flash_attn_varlen_func(q, k, v, cu, cu, 5, 5, causal=True), (q, k, v))


def test_gradcheck_sdpa_masks():
    gen = torch.Generator().manual_seed(6)
    q, k, v = f64(2, 2, 3, 4, gen=gen), f64(2, 1, 5, 4, gen=gen), f64(2, 1, 5, 4, gen=gen)
    keep = torch.rand(3, 5, generator=gen) > 0.4
    keep[:, 0] = True
    assert torch.autograd.gradcheck(
        lambda q, k, v: fat.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=True),
        (q, k, v))
    bias = f64(2, 1, 3, 5, gen=gen)
    assert torch.autograd.gradcheck(
        lambda q, k, v, m: fat.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True,
                                                            enable_gqa=True), (q, k, v, bias))
    row_bias = f64(5, gen=gen)  # one row for every query: the kernel sums its gradient over rows
    assert torch.autograd.gradcheck(
        lambda m: fat.scaled_dot_product_attention(q, k, v, attn_mask=m, scale=0.7,
                                                   enable_gqa=True), (row_bias,))


# ---- SDPA semantics ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "bf16"])
@pytest.mark.parametrize("case", ["bool", "float", "causal_rect", "bool_causal", "gqa", "5d", "3d",
                                  "bcast_batch", "bcast_head", "masked_rows"])
def test_sdpa_matches_torch(dtype, case):
    dt = DTYPES[dtype]
    gen = torch.Generator().manual_seed(8)
    shape_q, shape_k, kw = (2, 4, 9, 16), (2, 4, 13, 16), {}
    if case in ("bool", "bool_causal", "masked_rows"):
        m = torch.rand(9, 13, generator=gen) > 0.5
        m[:, 0] = True
        if case == "masked_rows":
            m[3] = False  # a row that sees nothing: 0 output and 0 gradient, as torch 2.13
        kw = dict(attn_mask=m, is_causal=case == "bool_causal")
    elif case == "float":
        kw = dict(attn_mask=(torch.randn(2, 1, 9, 13, generator=gen)).to(dt))
    elif case == "causal_rect":
        kw = dict(is_causal=True)  # top-left: query i sees keys 0..i
    elif case == "gqa":
        shape_k, kw = (2, 2, 13, 16), dict(enable_gqa=True)
    elif case == "5d":
        shape_q, shape_k = (2, 3, 2, 9, 16), (2, 3, 2, 13, 16)
    elif case == "3d":
        shape_q, shape_k = (4, 9, 16), (4, 13, 16)
    elif case == "bcast_batch":
        shape_k = (1, 4, 13, 16)
    elif case == "bcast_head":
        shape_k = (2, 1, 13, 16)  # one kv head broadcasts even without enable_gqa
    q, k, v = rand(*shape_q, dtype=dt, gen=gen), rand(*shape_k, dtype=dt, gen=gen), rand(
        *shape_k, dtype=dt, gen=gen)
    def ref(q, k, v):  # a float mask follows the inputs' dtype (float64 for the exact answer)
        m = kw.get("attn_mask")
        cast = dict(attn_mask=m.to(q.dtype)) if m is not None and m.is_floating_point() else {}
        return F.scaled_dot_product_attention(q, k, v, **{**kw, **cast})

    check_against_sdpa(lambda q, k, v: fat.scaled_dot_product_attention(q, k, v, **kw), (q, k, v),
                       ref, dt)
    if case == "masked_rows":
        out = fat.scaled_dot_product_attention(q, k, v, **kw)
        assert torch.all(out[:, :, 3] == 0)


def test_sdpa_float_mask_gradient():
    gen = torch.Generator().manual_seed(9)
    q, k, v = (rand(2, 3, 6, 8, gen=gen) for _ in range(3))
    for shape in [(6, 6), (2, 1, 6, 6), (1, 6), (2, 3, 6, 6)]:
        m1 = rand(*shape, gen=gen)
        m2 = m1.detach().clone().requires_grad_()
        a, b = fat.scaled_dot_product_attention(q, k, v, attn_mask=m1), \
            F.scaled_dot_product_attention(q, k, v, attn_mask=m2)
        (ga,), (gb,) = torch.autograd.grad(a.sum(), m1), torch.autograd.grad(b.sum(), m2)
        assert ga.shape == m1.shape
        torch.testing.assert_close(ga, gb, atol=2e-6, rtol=1e-5)


def test_sdpa_errors():
    x = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="value: head dim"):
        fat.scaled_dot_product_attention(x, x, torch.randn(1, 2, 4, 6))
    with pytest.raises(ValueError, match="enable_gqa"):
        fat.scaled_dot_product_attention(torch.randn(1, 4, 4, 8), x, x)
    with pytest.raises(TypeError, match="attn_mask"):
        fat.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(4, 4, dtype=torch.int32))


def test_deterministic_across_threads():
    """Bitwise identical outputs and gradients for 1 and 2 kernel threads (dropout included)."""
    gen = torch.Generator().manual_seed(15)
    qkv = rand(2, 70, 3, 4, 32, gen=gen)
    results = []
    old = flash_attn_c.get_num_threads()
    try:
        for n in (1, 2):
            flash_attn_c.set_num_threads(n)
            torch.manual_seed(3)
            out = fat.flash_attn_qkvpacked_func(qkv, 0.1, causal=True)
            results.append((out, *torch.autograd.grad(out.square().sum(), qkv)))
    finally:
        flash_attn_c.set_num_threads(old)
    assert all(torch.equal(a, b) for a, b in zip(*results))


# ---- dropout -------------------------------------------------------------------------------------

def test_dropout_replay_matches_reported_mask():
    """The backward replays the forward's mask: its gradients equal the reference gradients
    computed with the keep mask read from S_dmask (dropped entries are stored negated)."""
    gen = torch.Generator().manual_seed(10)
    q, k, v = rand(2, 24, 4, 16, gen=gen), rand(2, 31, 2, 16, gen=gen), rand(2, 31, 2, 16, gen=gen)
    p = 0.3
    torch.manual_seed(0)
    out, lse, s_dmask = fat.flash_attn_func(q, k, v, p, causal=True, return_attn_probs=True)
    keep = ~np.signbit(s_dmask.numpy())
    assert 0.55 < keep.mean() < 0.85
    g = torch.randn(out.shape, generator=gen)
    grads = torch.autograd.grad(out, (q, k, v), g)
    npq, npk, npv = (x.detach().numpy() for x in (q, k, v))
    r_out = reference.flash_attn_func(npq, npk, npv, p, causal=True, dropout_mask=keep)
    assert_attention_close(out.detach().numpy(), r_out)
    r_grads = reference.flash_attn_bwd(g.numpy(), npq, npk, npv, out.detach().numpy(),
                                       lse.numpy(), p, causal=True, dropout_mask=keep)
    for name, a, d in zip(("dq", "dk", "dv"), grads, r_grads):
        assert_attention_close(a.numpy(), d, name=name)
    # torch.manual_seed governs the masks: the same seed gives the same output, another differs.
    torch.manual_seed(0)
    again = fat.flash_attn_func(q, k, v, p, causal=True)
    other = fat.flash_attn_func(q, k, v, p, causal=True)
    assert torch.equal(again, out) and not torch.equal(other, out)


def test_sdpa_dropout_replays_like_flash_attn():
    """SDPA and flash_attn_func draw the same seed from torch's generator and address the mask by
    (batch, head, row, col), so with sq == sk (top-left = bottom-right causal) they drop the same
    entries: outputs and gradients agree, and SDPA's gradients match the reference's for the mask
    that S_dmask reports."""
    gen = torch.Generator().manual_seed(16)
    q, k, v = (rand(2, 4, 20, 16, gen=gen) for _ in range(3))  # BNSD
    g = torch.randn(2, 4, 20, 16, generator=gen)
    torch.manual_seed(5)
    a = fat.scaled_dot_product_attention(q, k, v, dropout_p=0.25, is_causal=True)
    ga = torch.autograd.grad(a, (q, k, v), g)
    torch.manual_seed(5)
    b, lse, s_dmask = fat.flash_attn_func(*(x.transpose(1, 2) for x in (q, k, v)), 0.25,
                                          causal=True, return_attn_probs=True)
    gb = torch.autograd.grad(b, (q, k, v), g.transpose(1, 2))
    torch.testing.assert_close(a, b.transpose(1, 2), rtol=0, atol=0)
    for x, y in zip(ga, gb):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    keep = ~np.signbit(s_dmask.numpy())
    bshd = [x.detach().transpose(1, 2).numpy() for x in (q, k, v)]
    want = reference.flash_attn_bwd(g.transpose(1, 2).numpy(), *bshd,
                                    b.detach().numpy(), lse.numpy(), 0.25, causal=True,
                                    dropout_mask=keep)
    for name, x, d in zip(("dq", "dk", "dv"), ga, want):
        assert_attention_close(x.transpose(1, 2).numpy(), d, name=name)


def test_sdpa_dropout_statistics():
    """With dropout the outputs differ from torch's (different generators) but agree on average:
    dropout is unbiased, so the mean over many draws approaches the dropout-free output."""
    gen = torch.Generator().manual_seed(11)
    q, k, v = (rand(1, 2, 16, 8, gen=gen, grad=False) for _ in range(3))
    torch.manual_seed(1)
    mean = torch.stack([fat.scaled_dot_product_attention(q, k, v, dropout_p=0.2)
                        for _ in range(400)]).mean(0)
    exact = F.scaled_dot_product_attention(q, k, v)
    assert (mean - exact).abs().max() < 0.15
    assert (mean - exact).abs().mean() < 0.03


# ---- zero-copy, kvcache, errors ------------------------------------------------------------------

def test_zero_copy_views():
    base = torch.randn(2, 16, 3, 8).to(torch.bfloat16)
    view = base.transpose(1, 2)  # BNSD view of BSND memory: strided, last dim contiguous
    arr = fat._array(view, "q")
    assert arr.dtype == flash_attn_c.bfloat16
    assert arr.__array_interface__["data"][0] == view.data_ptr()
    assert arr.strides == tuple(s * 2 for s in view.stride())
    for dt in (torch.float32, torch.float16, torch.float64):
        t = torch.randn(4, 5, 6)[:, ::2].to(dt)  # .to(float32) keeps the strided view itself
        assert fat._array(t, "q").__array_interface__["data"][0] == t.data_ptr()
    # The kernel reads the strided memory itself: results equal those of contiguous copies.
    gen = torch.Generator().manual_seed(12)
    big = torch.randn(2, 20, 4, 2, 16, generator=gen)
    q, k, v = big[:, :10, :, 0], big[:, 10:, :2, 1], big[:, 10:, 2:, 1]
    assert not q.is_contiguous()
    torch.testing.assert_close(fat.flash_attn_func(q, k, v),
                               fat.flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous()),
                               rtol=0, atol=0)
    out = fat.flash_attn_func(q, k, v)
    assert out.is_contiguous() and out.numpy().flags.writeable


def test_kvcache_updates_caller_tensors():
    gen = torch.Generator().manual_seed(13)
    k_cache = torch.randn(2, 32, 2, 16, generator=gen).to(torch.bfloat16)
    v_cache = torch.randn(2, 32, 2, 16, generator=gen).to(torch.bfloat16)
    q = torch.randn(2, 1, 4, 16, generator=gen).to(torch.bfloat16)
    k = torch.randn(2, 1, 2, 16, generator=gen).to(torch.bfloat16)
    v = torch.randn(2, 1, 2, 16, generator=gen).to(torch.bfloat16)
    seqlens = torch.tensor([5, 9], dtype=torch.int32)
    np_caches = [as_np(k_cache).copy(), as_np(v_cache).copy()]
    version = k_cache._version
    out, lse = fat.flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens,
                                           causal=True, return_softmax_lse=True)
    want = flash_attn_c.flash_attn_with_kvcache(as_np(q), *np_caches, as_np(k), as_np(v),
                                                cache_seqlens=seqlens.numpy(), causal=True)
    assert torch.equal(k_cache[0, 5], k[0, 0]) and torch.equal(v_cache[1, 9], v[1, 0])
    assert np.array_equal(as_np(k_cache), np_caches[0])
    assert np.array_equal(as_np(out), want) and lse.shape == (2, 4, 1)
    assert k_cache._version > version  # autograd sees the in-place write


def test_errors():
    x = torch.randn(1, 4, 2, 8)
    with pytest.raises(TypeError, match="q: expected a CPU tensor"):
        fat.flash_attn_func(x.to("meta"), x, x)
    with pytest.raises(TypeError, match="k: expected dtype"):
        fat.flash_attn_func(x, x.to(torch.int32), x)
    with pytest.raises(TypeError, match="expected a torch.Tensor"):
        fat.flash_attn_func(x.numpy(), x, x)
    with pytest.raises(TypeError, match="dtype"):
        fat.flash_attn_func(x, x.double(), x)
    with pytest.raises(TypeError, match="query: expected a CPU tensor"):
        fat.scaled_dot_product_attention(x.to("meta"), x, x)
    qd = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(fat.flash_attn_func(qd, qd, qd).sum(), qd, create_graph=True)
    with pytest.raises(RuntimeError):  # no silent zero second derivatives
        g.sum().backward()
    cu = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(TypeError, match="cu_seqlens_q"):
        fat.flash_attn_varlen_func(x[0], x[0], x[0], cu.float(), cu, 4, 4)
    with pytest.raises(RuntimeError, match="block_table"):
        k_paged = torch.randn(2, 256, 2, 8)
        q = torch.randn(4, 2, 8, requires_grad=True)
        out = fat.flash_attn_varlen_func(q, k_paged, k_paged, cu, cu, 4, 4,
                                         block_table=torch.tensor([[1]], dtype=torch.int32))
        out.sum().backward()


# ---- install() -----------------------------------------------------------------------------------

def test_install_in_subprocess():
    script = (
        "import flash_attn_c.torch as t; t.install(); t.install()\n"
        "import flash_attn\n"
        "from flash_attn import flash_attn_func, flash_attn_with_kvcache\n"
        "import flash_attn.flash_attn_interface as fi\n"
        "from flash_attn.flash_attn_interface import flash_attn_func as f2, FlashAttnFunc\n"
        "import importlib, torch\n"
        "assert f2 is flash_attn_func is t.flash_attn_func\n"
        "assert fi.FlashAttnFunc is t.FlashAttnFunc\n"
        "assert importlib.import_module('flash_attn') is flash_attn\n"
        "q = torch.randn(1, 5, 2, 8, requires_grad=True)\n"
        "flash_attn_func(q, q, q, causal=True).sum().backward()\n"
        "print(flash_attn.__version__, tuple(q.grad.shape))\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split() == ["2.8.3", "(1,", "5,", "2,", "8)"]


def test_no_torch_import_elsewhere():
    """The rest of the package never imports torch."""
    script = ("import sys, flash_attn_c, flash_attn_c.reference, flash_attn_c.testing\n"
              "assert 'torch' not in sys.modules, 'torch imported'\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr


# ---- npu_fusion_attention -----------------

def test_npu_fusion_attention_forward():
    """BNSD and BSH layouts, the NPU mask convention (True = masked), the 7-tuple result."""
    gen = torch.Generator().manual_seed(14)
    q, k, v = (rand(2, 4, 12, 16, gen=gen, grad=False) for _ in range(3))  # BNSD
    masked = torch.ones(12, 12, dtype=torch.bool).triu(1)
    want = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.25)
    res = fat.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=masked, scale=0.25)
    assert len(res) == 7 and res[1].shape == (2, 4, 12, 8)
    torch.testing.assert_close(res[0], want, atol=2e-6, rtol=1e-5)
    bsh = [x.transpose(1, 2).reshape(2, 12, 64) for x in (q, k, v)]
    out = fat.npu_fusion_attention(*bsh, 4, "BSH", atten_mask=masked, scale=0.25)[0]
    torch.testing.assert_close(out, want.transpose(1, 2).reshape(2, 12, 64), atol=2e-6, rtol=1e-5)


def test_npu_fusion_attention_grad_matches_sdpa():
    gen = torch.Generator().manual_seed(14)
    q, k, v = (rand(2, 4, 12, 16, gen=gen) for _ in range(3))  # BNSD
    masked = torch.ones(12, 12, dtype=torch.bool).triu(1)  # NPU: True = masked
    check_against_sdpa(
        lambda q, k, v: fat.npu_fusion_attention(q, k, v, 4, "BNSD", atten_mask=masked,
                                                 scale=0.25)[0],
        (q, k, v), lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                                  scale=0.25), torch.float32)
    # pse is differentiable (torch_npu leaves dpse unwritten; flash_attn_c computes it).
    qs, ks, vs, pse = (f64(*shape, gen=gen) for shape in
                       ((1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4), (1, 2, 3, 5)))
    assert torch.autograd.gradcheck(
        lambda q, k, v, p: fat.npu_fusion_attention(q, k, v, 2, "BNSD", pse=p, scale=0.5)[0],
        (qs, ks, vs, pse))


# ---- training ------------------------------------------------------------------------------------

def test_tiny_gpt_training_matches_sdpa():
    """~20 steps of examples/train_tiny_gpt.py without dropout: the loss goes down, and the
    flash_attn_c SDPA swap and the flash-attn install() path follow torch SDPA's curve."""
    sys.path.insert(0, os.path.join(ROOT, "examples"))
    try:
        import train_tiny_gpt as tg
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        curves = {a: tg.train(a, 20, attn_dropout=0.0, batch=8, block_size=32, quiet=True)[0]
                  for a in tg.ATTNS}
    finally:
        torch.set_num_threads(threads)
    ref = np.array(curves["sdpa"])
    assert ref[-5:].mean() < ref[0] - 0.5
    for name in ("flash_attn_c", "flash_attn"):
        np.testing.assert_allclose(curves[name], ref, atol=1e-3, err_msg=name)


def test_torch_compile_graph_breaks_around_the_adapter():
    """Under torch.compile the adapters run eagerly between graphs (they call NumPy): results and
    gradients equal the uncompiled ones."""
    def loss(q):
        return fat.scaled_dot_product_attention(q * 2, q, q, is_causal=True).square().sum()

    q = torch.randn(1, 2, 8, 16, dtype=torch.float64, requires_grad=True)
    compiled = torch.compile(loss, backend="eager")
    (g1,) = torch.autograd.grad(compiled(q), q)
    (g2,) = torch.autograd.grad(loss(q), q)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
