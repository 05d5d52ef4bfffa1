"""Decoding-shaped calls (few query rows per sequence) on every ISA family.

On AVX-512 and AMX these go to the decode kernel (csrc/fa_decode__avx512.c: at most 16 query rows
per work item, key blocks of 64, scores reduced 16 keys at a time), so the grid straddles those
sizes: sq = 1 and small sq, GQA groups of 1/3/4/8/16 folded query heads (and 24, past the kernel's
rows, which keeps the old path), sk around 16 and 64 multiples, odd head dims, paged and strided
caches, split-KV, each with causal/window/softcap/alibi; pse, explicit masks, sink and dropout
through the low-level funnel. Checked against the float64 naive computation with flash-attn's
rule (test_forward_isa.check).
"""
import zlib

import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import _core
from test_forward_isa import DTYPES, check, naive

SHAPES = [(1, 1), (1, 15), (1, 64), (1, 65), (1, 239), (2, 130), (3, 17), (5, 1000), (16, 200),
          (12, 64), (1, 2049)]
HEADS = [(8, 2), (8, 1), (4, 4), (6, 2), (16, 1), (24, 1)]
HDIMS = [128, 59, 64, 7, 256, 1, 112]
FEATS = ["plain", "causal", "window", "softcap", "alibi", "paged", "splits", "strided",
         "seqlens"]


def _grid():
    """Every value of each axis, combined pseudo-randomly (the full product takes too long)."""
    cases, n = [], 0
    for dt in ["f32", "bf16", "f16"]:
        for f in FEATS:
            for _ in range(2):
                sq, sk = SHAPES[(n * 7 + 1) % len(SHAPES)]
                h, hk = HEADS[n % len(HEADS)]
                d = HDIMS[(n * 3) % len(HDIMS)]
                cases.append(pytest.param(dt, f, sq, sk, h, hk, d,
                                          id=f"{dt}-{f}-{sq}x{sk}-h{h}/{hk}-d{d}"))
                n += 1
    return cases


def _paged(x, table, nblk, page, rng):
    """x (b, s, hk, d) as a page pool (nblk, page, hk, d) through block table (b, per); pool
    rows no table entry covers hold random values."""
    b, s, hk, d = x.shape
    pool = rng.standard_normal((nblk, page, hk, d)).astype(x.dtype)
    for i in range(b):
        for j in range(table.shape[1]):
            rows = x[i, j * page:(j + 1) * page]
            pool[table[i, j], : rows.shape[0]] = rows
    return pool


@pytest.mark.parametrize("dt,feat,sq,sk,h,hk,d", _grid())
def test_decode_grid(isa, dt, feat, sq, sk, h, hk, d):
    rng = np.random.default_rng(zlib.crc32(f"{dt}{feat}{sq}{sk}{h}{hk}{d}".encode()))
    b = 2
    q = rng.standard_normal((b, sq, h, d)).astype(DTYPES[dt])
    if feat == "strided":  # every other kv head of a wider cache: rows two head strides apart
        kc = rng.standard_normal((b, sk, 2 * hk, d)).astype(DTYPES[dt])[:, :, ::2]
        vc = rng.standard_normal((b, sk, 2 * hk, d)).astype(DTYPES[dt])[:, :, ::2]
    else:
        kc = rng.standard_normal((b, sk, hk, d)).astype(DTYPES[dt])
        vc = rng.standard_normal((b, sk, hk, d)).astype(DTYPES[dt])
    k, v = kc, vc  # what the reference sees
    scale = d ** -0.5 * (3.0 if feat == "softcap" else 1.0)
    kw = dict(scale=scale)
    args = dict(softmax_scale=scale, return_softmax_lse=True)
    if feat == "causal":
        kw["causal"] = args["causal"] = True
    if feat == "window":
        kw["window"] = args["window_size"] = (37, 0)
    if feat == "softcap":
        kw["softcap"] = args["softcap"] = 2.5
    if feat == "alibi":
        sl = rng.uniform(0.01, 0.3, (b, h)).astype(np.float32)
        kw["alibi"] = args["alibi_slopes"] = sl
    if feat == "paged":
        per = -(-sk // 16)
        table = rng.permutation(b * per + 3)[: b * per].reshape(b, per).astype(np.int32)
        kc, vc = (_paged(x, table, b * per + 3, 16, rng) for x in (k, v))
        args["block_table"] = table
        args["cache_seqlens"] = np.full(b, sk, np.int32)  # the last page's tail is not a key
    if feat == "splits":
        args["num_splits"] = 3
    if feat == "seqlens":  # a longer cache whose tail (random values) must not be read
        pad = rng.standard_normal((b, 37, hk, d)).astype(DTYPES[dt])
        kc = np.concatenate([k, pad], axis=1)
        vc = np.concatenate([v, pad[:, ::-1]], axis=1)
        args["cache_seqlens"] = np.full(b, sk, np.int32)
        args["causal"] = kw["causal"] = True
    out, lse = fa.flash_attn_with_kvcache(q, kc, vc, **args)
    check((out, lse, None), q, k, v, dt, **kw)


@pytest.mark.parametrize("dt", ["f32", "bf16"])
def test_decode_varlen(isa, dt):
    """Packed sequences of 1..16 queries against 1..300 keys (one empty key range)."""
    rng = np.random.default_rng(7)
    lq = [1, 16, 3, 5]
    lk = [300, 64, 1, 0]
    h, hk, d = 6, 2, 64
    q = rng.standard_normal((sum(lq), h, d)).astype(DTYPES[dt])
    k = rng.standard_normal((sum(lk), hk, d)).astype(DTYPES[dt])
    v = rng.standard_normal((sum(lk), hk, d)).astype(DTYPES[dt])
    cq = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(lq), max(lk), causal=True,
                                            return_attn_probs=True)
    for i in range(len(lq)):
        if lk[i] == 0:
            assert np.all(np.asarray(out[cq[i]:cq[i + 1]], np.float64) == 0)
            assert np.all(np.isinf(lse[:, cq[i]:cq[i + 1]]))
            continue
        qi, ki, vi = (x[None, c[i]:c[i + 1]] for x, c in ((q, cq), (k, ck), (v, ck)))
        check((out[None, cq[i]:cq[i + 1]], lse[None, :, cq[i]:cq[i + 1]], None), qi, ki, vi, dt,
              scale=d ** -0.5, causal=True)


def test_decode_matches_across_threads_and_splits(isa):
    """Results do not depend on the thread count; split-KV partials merge to the unsplit result."""
    rng = np.random.default_rng(9)
    q = rng.standard_normal((1, 1, 8, 128)).astype(np.float32)
    kc = rng.standard_normal((1, 3000, 2, 128)).astype(np.float32)
    vc = rng.standard_normal((1, 3000, 2, 128)).astype(np.float32)
    old = fa.get_num_threads()
    try:
        fa.set_num_threads(1)
        one = fa.flash_attn_with_kvcache(q, kc, vc, num_splits=1)
        fa.set_num_threads(2)
        two = fa.flash_attn_with_kvcache(q, kc, vc, num_splits=1)
        auto = fa.flash_attn_with_kvcache(q, kc, vc)
    finally:
        fa.set_num_threads(old)
    np.testing.assert_array_equal(one, two)
    np.testing.assert_allclose(auto, one, rtol=1e-5, atol=1e-6)
    ref, _, _ = naive(q, kc, vc, scale=128 ** -0.5)
    assert np.max(np.abs(one - ref)) < 1e-5


@pytest.mark.parametrize("dt", ["f32", "bf16", "f16"])
@pytest.mark.parametrize("feat", ["pse_mask", "mask_flt", "sink", "dropout"])
def test_decode_npu_features_and_dropout(isa, dt, feat):
    """pse, explicit masks (-inf and -FLT_MAX fills, invalid-line mode, a fully masked row), sink
    and dropout on decode-shaped calls, through the low-level funnel of the NPU front-ends."""
    rng = np.random.default_rng(11)
    b, sq, sk, h, hk, d = 2, 5, 150, 4, 2, 40
    q = rng.standard_normal((b, sq, h, d)).astype(DTYPES[dt])
    k = rng.standard_normal((b, sk, hk, d)).astype(DTYPES[dt])
    v = rng.standard_normal((b, sk, hk, d)).astype(DTYPES[dt])
    scale = d ** -0.5
    extra, kw = {}, dict(scale=scale)
    if feat == "pse_mask":
        pse = rng.standard_normal((b, h, sq, sk)).astype(np.float32)
        mask = (rng.random((b, 1, sq, sk)) < 0.3).astype(np.uint8)
        mask[:, :, 2] = 1  # a fully masked row: output 0, lse +inf
        extra = dict(pse=pse, mask=np.broadcast_to(mask, (b, h, sq, sk)))
        kw.update(extra)
    elif feat == "mask_flt":
        mask = (rng.random((b, h, sq, sk)) < 0.5).astype(np.uint8)
        mask[:, :, 3] = 1
        fill = -np.finfo(np.float32).max
        rmax, rsum = np.full((b, h, sq), np.nan, np.float32), np.full((b, h, sq), np.nan, np.float32)
        extra = dict(mask=mask, mask_fill=fill, invalid_line_zero=True, rowmax=rmax, rowsum=rsum)
        kw.update(mask=mask, mask_fill=fill)
    elif feat == "sink":
        extra = dict(sink=rng.standard_normal(h).astype(np.float32))
        kw.update(extra)
    elif feat == "dropout":
        extra = dict(dropout_p=0.25, seed=77, offset=5)
    out, lse, _ = _core.forward(q, k, v, scale=scale, out_shape=q.shape, lse_shape=(b, h, sq),
                                **extra)
    sd = None
    if feat == "dropout":  # the keep mask, from the S_dmask path (which the prefill kernels run)
        _, _, sd = _core.forward(q, k, v, scale=scale, out_shape=q.shape, lse_shape=(b, h, sq),
                                 s_dmask_shape=(b, h, sq, sk), **extra)
        kw["dropout_p"] = 0.25
    if feat == "mask_flt":
        assert np.all(np.asarray(out[:, 3], np.float64) == 0)
        assert np.all(extra["rowsum"][:, :, 3] == np.finfo(np.float32).max)
        assert np.all(np.isfinite(extra["rowmax"]))
        ok = np.arange(sq) != 3
        ref_o, _, _ = naive(q, k, v, **kw)
        tol = 2 * np.max(np.abs(naive(q, k, v, work=np.float32, **kw)[0].astype(DTYPES[dt])
                                - ref_o)) + {"f32": 3e-6, "f16": 2e-3, "bf16": 1.6e-2}[dt]
        assert np.max(np.abs(np.asarray(out[:, ok], np.float64) - ref_o[:, ok])) <= tol
        return
    check((out, lse, sd), q, k, v, dt, **kw)
