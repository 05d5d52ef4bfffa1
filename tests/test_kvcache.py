"""flash_attn_with_kvcache and combine_partials against the reference."""
import itertools
import zlib

import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import reference as ref
from flash_attn_c.testing import assert_attention_close

from conftest import DTYPES, ISAS, randn, using_isa


def _setup(rng, dtype, b=2, sq=3, s_new=3, h=6, hk=2, d=64, cache_len=300, paged=None,
           rotary=0.0, leftpad=False, batch_idx=False):
    dt = DTYPES[dtype]
    q = randn(rng, (b, sq, h, d), dt)
    k = randn(rng, (b, s_new, hk, d), dt) if s_new else None
    v = randn(rng, (b, s_new, hk, d), dt) if s_new else None
    kw = {}
    if paged:
        nblk = -(-cache_len // paged) * b * 2
        kc = randn(rng, (nblk, paged, hk, d), dt)
        vc = randn(rng, (nblk, paged, hk, d), dt)
        kw["block_table"] = rng.permutation(nblk)[: b * (-(-cache_len // paged))].reshape(b, -1).astype(np.int32)
        capacity = kw["block_table"].shape[1] * paged
    else:
        bc = b + 2 if batch_idx else b
        kc = randn(rng, (bc, cache_len, hk, d), dt)
        vc = randn(rng, (bc, cache_len, hk, d), dt)
        capacity = cache_len
        if batch_idx:
            kw["cache_batch_idx"] = rng.permutation(bc)[:b].astype(np.int32)
    seqlens = rng.integers(1, capacity - max(s_new, sq), size=b).astype(np.int32)
    kw["cache_seqlens"] = seqlens
    if leftpad:
        kw["cache_leftpad"] = np.array([rng.integers(0, s) for s in seqlens], np.int32)
    if rotary:
        rot = int(rotary * d) // 16 * 16
        angles = rng.uniform(0, 2 * np.pi, size=(capacity, rot // 2))
        kw["rotary_cos"] = np.cos(angles).astype(dt)
        kw["rotary_sin"] = np.sin(angles).astype(dt)
    return q, k, v, kc, vc, kw


def _both(q, k, v, kc, vc, kw, **opts):
    """(ours, reference, reference in low precision, our caches, reference caches)."""
    kc1, vc1, kc2, vc2 = kc.copy(), vc.copy(), kc.copy(), vc.copy()
    ours = fa.flash_attn_with_kvcache(q, kc1, vc1, k, v, **kw, **opts)
    want = ref.flash_attn_with_kvcache(q, kc2, vc2, k, v, **kw, **opts)
    low = ref.flash_attn_with_kvcache(q, kc.copy(), vc.copy(), k, v, compute_dtype=q.dtype, **kw, **opts)
    return ours, want, low, (kc1, vc1), (kc2, vc2)


GRID = list(itertools.product(
    ["f32", "bf16", "f16"],          # dtype
    [None, 16],                      # paged block size (any size works here, no 256 rule)
    [0.0, 1.0],                      # rotary fraction
    [False, True],                   # causal
    [(-1, -1), (40, 0)],             # window
    [(1, 1), (4, 4), (5, 0)],        # (sq, s_new)
))


@pytest.mark.parametrize("dtype,paged,rotary,causal,window,sizes", GRID)
def test_kvcache_grid(dtype, paged, rotary, causal, window, sizes):
    sq, s_new = sizes
    if rotary and not s_new:
        pytest.skip("rotary needs new keys")
    rng = np.random.default_rng(zlib.crc32(repr((dtype, paged, rotary, causal, window, sizes)).encode()))
    q, k, v, kc, vc, kw = _setup(rng, dtype, sq=sq, s_new=s_new, d=59 if not rotary else 64,
                                 paged=paged, rotary=rotary)
    ours, want, low, (kc1, vc1), (kc2, vc2) = _both(q, k, v, kc, vc, kw, causal=causal,
                                                    window_size=window)
    assert_attention_close(ours, want, reference_low_precision=low, multiplier=3.0)
    # The append really happened, in place, with the rotated k.
    np.testing.assert_array_equal(vc1, vc2.astype(vc1.dtype))
    np.testing.assert_allclose(kc1.astype(np.float64), kc2.astype(np.float64), rtol=1e-2, atol=1e-2)
    changed = np.any(kc1 != kc, axis=(1, 2, 3)) if s_new else None
    if s_new:
        assert changed.any()


@pytest.mark.parametrize("isa", ISAS)
def test_kvcache_leftpad_window_batch_idx_alibi_softcap(isa):
    rng = np.random.default_rng(1)
    q, k, v, kc, vc, kw = _setup(rng, "f32", sq=2, s_new=2, leftpad=True, batch_idx=True)
    slopes = rng.uniform(0.05, 0.3, size=(6,)).astype(np.float32)
    with using_isa(isa):
        ours, want, low, caches, ref_caches = _both(
            q, k, v, kc, vc, kw, causal=True, window_size=(30, -1), alibi_slopes=slopes,
            softcap=10.0, return_softmax_lse=True)
    assert_attention_close(ours[0], want[0], reference_low_precision=low[0], multiplier=3.0)
    fin = np.isfinite(want[1])
    np.testing.assert_allclose(ours[1][fin], want[1][fin], rtol=2e-5, atol=2e-5)
    np.testing.assert_array_equal(caches[1], ref_caches[1])


def test_kvcache_without_append_and_full_cache():
    rng = np.random.default_rng(2)
    q, _, _, kc, vc, kw = _setup(rng, "f32", sq=1, s_new=0)
    a = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=kw["cache_seqlens"])
    b = ref.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=kw["cache_seqlens"])
    assert_attention_close(a, b)
    a = fa.flash_attn_with_kvcache(q, kc, vc)  # no cache_seqlens: the whole cache
    b = ref.flash_attn_with_kvcache(q, kc, vc)
    assert_attention_close(a, b)
    a = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=37)  # an int broadcasts over batch
    b = ref.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=37)
    assert_attention_close(a, b)


@pytest.mark.parametrize("interleaved", [True, False])
def test_rotary_styles(interleaved):
    rng = np.random.default_rng(3)
    q, k, v, kc, vc, kw = _setup(rng, "f32", sq=4, s_new=4, rotary=0.5, d=64)
    ours, want, low, caches, ref_caches = _both(q, k, v, kc, vc, kw, causal=True,
                                                rotary_interleaved=interleaved)
    assert_attention_close(ours, want, reference_low_precision=low)
    np.testing.assert_allclose(caches[0], ref_caches[0], rtol=1e-5, atol=1e-5)


def test_num_splits_give_the_same_result():
    rng = np.random.default_rng(4)
    q, k, v, kc, vc, kw = _setup(rng, "f32", b=1, sq=1, s_new=1, h=4, hk=1, cache_len=2000)
    outs = []
    for ns in (1, 3, 0):
        outs.append(fa.flash_attn_with_kvcache(q, kc.copy(), vc.copy(), k, v, num_splits=ns, **kw))
    want = ref.flash_attn_with_kvcache(q, kc.copy(), vc.copy(), k, v, **kw)
    for o in outs:
        assert_attention_close(o, want)
        np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-6)


def test_kvcache_errors_leave_cache_untouched():
    rng = np.random.default_rng(5)
    q, k, v, kc, vc, kw = _setup(rng, "f32", sq=2, s_new=2, paged=16)
    kc0, vc0 = kc.copy(), vc.copy()
    bad_bt = kw["block_table"].copy()
    bad_bt[0, 0] = kc.shape[0]
    with pytest.raises(ValueError, match=r"block_table: entries must be in \[0, "):
        fa.flash_attn_with_kvcache(q, kc, vc, k, v, **{**kw, "block_table": bad_bt})
    cap = kw["block_table"].shape[1] * 16
    with pytest.raises(ValueError, match=r"exceeds the cache capacity"):
        fa.flash_attn_with_kvcache(q, kc, vc, k, v, **{**kw, "cache_seqlens": np.array([cap - 1, 3], np.int32)})
    with pytest.raises(ValueError, match=r"cache_seqlens: entries must be in \[0, "):
        fa.flash_attn_with_kvcache(q, kc, vc, **{**kw, "cache_seqlens": np.array([cap + 1, 3], np.int32)})
    ro = kc.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match=r"k_cache: must be writable"):
        fa.flash_attn_with_kvcache(q, ro, vc, k, v, **kw)
    with pytest.raises(ValueError, match=r"value must also be passed"):
        fa.flash_attn_with_kvcache(q, kc, vc, k, None, **kw)
    with pytest.raises(ValueError, match=r"seqlens_k must also be passed"):
        fa.flash_attn_with_kvcache(q, kc, vc, k, v, block_table=kw["block_table"])
    with pytest.raises(ValueError, match=r"num_splits"):
        fa.flash_attn_with_kvcache(q, kc, vc, k, v, num_splits=129, **kw)
    with pytest.raises(ValueError, match=r"cache_batch_idx"):
        fa.flash_attn_with_kvcache(q, kc, vc, k, v, cache_batch_idx=np.array([0, 1], np.int32), **kw)
    with pytest.raises(ValueError, match=r"rotary_cos: rotary_dim 128 must be <= headdim 64"):
        cos = np.ones((cap, 64), np.float32)
        fa.flash_attn_with_kvcache(q, kc, vc, k, v, rotary_cos=cos, rotary_sin=cos, **kw)
    with pytest.raises(ValueError, match=r"new key / value to be appended"):
        cos = np.ones((cap, 8), np.float32)
        fa.flash_attn_with_kvcache(q, kc, vc, rotary_cos=cos, rotary_sin=cos, **kw)
    np.testing.assert_array_equal(kc, kc0)
    np.testing.assert_array_equal(vc, vc0)


# ---- combine_partials ----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["f32", "bf16", "f64"])
def test_combine_partials_equals_attention_over_union(dtype):
    rng = np.random.default_rng(6)
    dt = DTYPES[dtype]
    q = randn(rng, (2, 5, 4, 32), dt)
    k = randn(rng, (2, 300, 2, 32), dt)
    v = randn(rng, (2, 300, 2, 32), dt)
    parts = [(0, 70), (70, 71), (71, 300)]
    outs, lses = [], []
    for a, b in parts:
        o, l, _ = fa.flash_attn_func(q, k[:, a:b], v[:, a:b], return_attn_probs=True)
        outs.append(o)
        lses.append(l)
    out, lse = fa.combine_partials(outs, lses)
    want, want_lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True)
    low = None if dt == np.float64 else ref.flash_attn_func(q, k, v, compute_dtype=dt)
    assert_attention_close(out, ref.flash_attn_func(q, k, v), reference_low_precision=low,
                           multiplier=3.0)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    rout, rlse = ref.combine_partials(outs, lses)
    np.testing.assert_allclose(lse, rlse, rtol=1e-5, atol=1e-5)


def test_combine_partials_with_empty_partials_and_varlen_shape():
    rng = np.random.default_rng(7)
    o1 = randn(rng, (10, 3, 8), np.float32)
    l1 = randn(rng, (3, 10), np.float32)
    o2 = randn(rng, (10, 3, 8), np.float32)
    l2 = np.full((3, 10), np.inf, np.float32)  # saw no key: contributes nothing
    out, lse = fa.combine_partials([o1, o2], [l1, l2])
    np.testing.assert_allclose(out, o1, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(lse, l1, rtol=1e-6)
    out, lse = fa.combine_partials([o2], [l2])
    assert np.all(out == 0) and np.all(np.isposinf(lse))


def test_combine_partials_errors():
    o = np.zeros((1, 2, 3, 4), np.float32)
    l = np.zeros((1, 3, 2), np.float32)
    with pytest.raises(ValueError, match=r"non-empty sequences of equal length"):
        fa.combine_partials([o], [])
    with pytest.raises(ValueError, match=r"lses\[0\]: expected shape \(1, 3, 2\)"):
        fa.combine_partials([o], [l[:, :1]])
    with pytest.raises(TypeError, match=r"lses\[0\]: expected dtype float32"):
        fa.combine_partials([o], [l.astype(np.float64)])
    with pytest.raises(TypeError, match=r"expected sequences"):
        fa.combine_partials(o, l)
