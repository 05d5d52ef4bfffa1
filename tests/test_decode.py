"""Decoding-shaped calls (few query rows per sequence) on every ISA family.

On AVX-512 and AMX these go to the decode kernel (csrc/fa_decode__avx512.c: at most 16 query rows
per work item, key blocks of 64, scores reduced 16 keys at a time), so the grid straddles those
sizes: sq = 1 and small sq, GQA groups of 1/3/4/8/16 folded query heads (and 24, past the kernel's
rows, which keeps the old path), sk around 16 and 64 multiples, odd head dims, paged and strided
caches, split-KV, each with causal/window/softcap/alibi. Checked against the float64 naive
computation with flash-attn's rule (test_forward_isa.check).
"""
import zlib

import numpy as np
import pytest

import flash_attn_c as fa
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
