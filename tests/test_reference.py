"""Tests of the naive reference itself (flash_attn_c.reference), on hand-computed tiny cases,
an independent loop-based implementation, and central finite differences for the gradients.

Nothing here imports the C extension: the reference is what the kernel tests trust.
"""

import math

import ml_dtypes
import numpy as np
import pytest

from flash_attn_c import reference as ref

FLT_MAX = float(np.finfo(np.float32).max)
TRIU_2048 = np.triu(np.ones((2048, 2048), dtype=bool), k=1)


def rnd(seed, *shape, scale=1.0):
    x = np.random.default_rng(seed).standard_normal(shape) * scale
    x[x == 0] = 0.5
    return x


# --------------------------------------------------------------------------------------------
# An independent, loop-based flash-attn reference (spec formulas written out per element)
# --------------------------------------------------------------------------------------------

def loop_flash(q, k, v, scale, causal=False, window=(-1, -1), softcap=0.0, slopes=None,
               keep=None, p=0.0):
    """FA §2.1-2.5 element by element. window bounds must be < sk (no normalisation here)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    out = np.zeros((b, sq, h, v.shape[-1]))
    lse = np.zeros((b, h, sq))
    for bi in range(b):
        for hi in range(h):
            kvh = hi // g
            for i in range(sq):
                diag = i + sk - sq
                lo = diag - window[0] if window[0] >= 0 else -math.inf
                right = 0 if causal else window[1]
                hi_bound = diag + right if right >= 0 else math.inf
                cols = []
                for j in range(sk):
                    if not lo <= j <= hi_bound:
                        continue
                    x = scale * float(np.dot(q[bi, i, hi], k[bi, j, kvh]))
                    if softcap > 0:
                        x = softcap * math.tanh(x / softcap)
                    if slopes is not None:
                        x += -slopes[hi] * abs(i + sk - sq - j)
                    cols.append((j, x))
                if not cols:
                    lse[bi, hi, i] = math.inf
                    continue
                m = max(x for _, x in cols)
                lse[bi, hi, i] = m + math.log(sum(math.exp(x - m) for _, x in cols))
                for j, x in cols:
                    kp = 1.0 if keep is None else float(keep[bi, hi, i, j])
                    out[bi, i, hi] += math.exp(x - lse[bi, hi, i]) * kp / (1 - p) * v[bi, j, kvh]
    return out, lse


def loop_npu(q, k, v, scale, keep, pse=None, sink=None):
    """NPU §2 element by element on BNSD arrays: S = scale*(qk + pse), masked -> -FLT_MAX."""
    b, n, sq, _ = q.shape
    nkv, skv = k.shape[1], k.shape[2]
    out = np.zeros((b, n, sq, v.shape[-1]))
    mx = np.zeros((b, n, sq))
    sm = np.zeros((b, n, sq))
    for bi in range(b):
        for hi in range(n):
            kvh = hi // (n // nkv)
            for i in range(sq):
                s = []
                for j in range(skv):
                    x = float(np.dot(q[bi, hi, i], k[bi, kvh, j]))
                    if pse is not None:
                        x += pse[bi, hi, i, j]
                    s.append(scale * x if keep[bi, hi, i, j] else -FLT_MAX)
                m = max(s) if sink is None else max(max(s), sink[hi])
                e = [math.exp(x - m) for x in s]
                tot = sum(e) + (0.0 if sink is None else math.exp(sink[hi] - m))
                mx[bi, hi, i], sm[bi, hi, i] = m, tot
                out[bi, hi, i] = sum(e[j] / tot * v[bi, kvh, j] for j in range(skv))
    return out, mx, sm


def numgrad(f, x, eps=1e-6):
    """Central finite differences of the scalar f() w.r.t. every entry of x (mutated in place)."""
    g = np.zeros(x.shape)
    for idx in np.ndindex(*x.shape):
        old = x[idx]
        x[idx] = old + eps
        fp = f()
        x[idx] = old - eps
        fm = f()
        x[idx] = old
        g[idx] = (fp - fm) / (2 * eps)
    return g


def assert_grad(analytic, numeric, name):
    scale = max(1.0, float(np.abs(numeric).max()))
    err = float(np.abs(analytic - numeric).max())
    assert err <= 1e-7 * scale, f"{name}: max error {err} (scale {scale})"


# --------------------------------------------------------------------------------------------
# flash-attn forward: hand-computed cases
# --------------------------------------------------------------------------------------------

def test_softmax_of_known_scores():
    # scores 0 and ln 3 -> P = [1/4, 3/4]; out = 4/4 + 3*8/4 = 7; lse = ln 4.
    q = np.array([1.0]).reshape(1, 1, 1, 1)
    k = np.array([0.0, math.log(3)]).reshape(1, 2, 1, 1)
    v = np.array([4.0, 8.0]).reshape(1, 2, 1, 1)
    out, lse, s = ref.flash_attn_func(q, k, v, softmax_scale=1.0, return_attn_probs=True)
    assert out.dtype == np.float64 and lse.dtype == np.float64
    np.testing.assert_allclose(out.ravel(), [7.0], rtol=1e-14)
    np.testing.assert_allclose(lse.ravel(), [math.log(4)], rtol=1e-14)
    np.testing.assert_allclose(s.ravel(), [0.25, 0.75], rtol=1e-14)


def test_default_scale_is_inverse_sqrt_d():
    q, k, v = rnd(0, 1, 2, 1, 4), rnd(1, 1, 3, 1, 4), rnd(2, 1, 3, 1, 4)
    a = ref.flash_attn_func(q, k, v)
    b = ref.flash_attn_func(q, k, v, softmax_scale=0.5)
    np.testing.assert_allclose(a, b, rtol=1e-14)


def test_causal_sq_greater_than_sk_gives_zero_rows_and_inf_lse():
    q, k, v = rnd(0, 1, 3, 1, 2), rnd(1, 1, 1, 1, 2), rnd(2, 1, 1, 1, 2)
    out, lse, s = ref.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    # row i sees j <= i + sk - sq = i - 2: rows 0, 1 see nothing, row 2 sees key 0 only.
    assert np.all(out[0, :2] == 0) and np.all(lse[0, 0, :2] == np.inf)
    np.testing.assert_allclose(out[0, 2, 0], v[0, 0, 0], rtol=1e-14)
    np.testing.assert_allclose(lse[0, 0, 2], np.dot(q[0, 2, 0], k[0, 0, 0]) / math.sqrt(2),
                               rtol=1e-14)
    assert np.all(s[0, 0, :2] == 0) and s[0, 0, 2, 0] == 1.0


def test_causal_is_bottom_right_aligned():
    q, k, v = rnd(0, 1, 2, 1, 3), rnd(1, 1, 5, 1, 3), rnd(2, 1, 5, 1, 3)
    _, _, s = ref.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    np.testing.assert_array_equal(s[0, 0] > 0, [[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])  # FA §2.2
    # causal == window (-1, 0)
    a = ref.flash_attn_func(q, k, v, causal=True)
    b = ref.flash_attn_func(q, k, v, window_size=(-1, 0))
    np.testing.assert_array_equal(a, b)


def test_window_pattern():
    q, k, v = rnd(0, 1, 3, 1, 2), rnd(1, 1, 6, 1, 2), rnd(2, 1, 6, 1, 2)
    _, _, s = ref.flash_attn_func(q, k, v, window_size=(1, 0), return_attn_probs=True)
    # row i sees [i + 3 - 1, i + 3]
    np.testing.assert_array_equal(s[0, 0] > 0, [[0, 0, 1, 1, 0, 0],
                                                [0, 0, 0, 1, 1, 0],
                                                [0, 0, 0, 0, 1, 1]])
    _, _, s = ref.flash_attn_func(q, k, v, window_size=(0, 1), causal=True, return_attn_probs=True)
    np.testing.assert_array_equal(s[0, 0] > 0, np.eye(3, 6, k=3))   # causal overrides right


def test_window_normalisation():
    q, k, v = rnd(0, 1, 10, 1, 2), rnd(1, 1, 2, 1, 2), rnd(2, 1, 2, 1, 2)
    # FA §2.3 step 1: right >= sk becomes -1 (unbounded), so every row sees both keys even
    # though i + sk - sq + 2 < 0 for the first rows.
    out, lse, _ = ref.flash_attn_func(q, k, v, window_size=(-1, 2), return_attn_probs=True)
    np.testing.assert_array_equal(out, ref.flash_attn_func(q, k, v))
    assert np.all(np.isfinite(lse))
    # left >= sk also becomes -1
    q2, k2, v2 = rnd(3, 1, 3, 1, 2), rnd(4, 1, 4, 1, 2), rnd(5, 1, 4, 1, 2)
    np.testing.assert_array_equal(ref.flash_attn_func(q2, k2, v2, window_size=(4, 0)),
                                  ref.flash_attn_func(q2, k2, v2, causal=True))


def test_gqa_mapping_uses_contiguous_groups():
    q, k, v = rnd(0, 1, 2, 4, 3), rnd(1, 1, 5, 2, 3), rnd(2, 1, 5, 2, 3)
    out = ref.flash_attn_func(q, k, v)
    for hi in range(4):
        single = ref.flash_attn_func(q[:, :, hi:hi + 1], k[:, :, hi // 2:hi // 2 + 1],
                                     v[:, :, hi // 2:hi // 2 + 1])
        np.testing.assert_allclose(out[:, :, hi:hi + 1], single, rtol=1e-14)


def test_alibi_sign_penalises_distance():
    # equal raw scores; bias -slope*|i + sk - sq - j| with sq=1, sk=2: j=0 -> -1, j=1 -> 0.
    q = np.array([0.3]).reshape(1, 1, 1, 1)
    k = np.array([1.0, 1.0]).reshape(1, 2, 1, 1)
    v = np.array([10.0, 20.0]).reshape(1, 2, 1, 1)
    out, lse, s = ref.flash_attn_func(q, k, v, softmax_scale=1.0, alibi_slopes=np.array([1.0]),
                                      return_attn_probs=True)
    p1 = 1 / (1 + math.exp(-1))
    np.testing.assert_allclose(s.ravel(), [1 - p1, p1], rtol=1e-14)
    np.testing.assert_allclose(out.ravel(), [10 * (1 - p1) + 20 * p1], rtol=1e-14)
    np.testing.assert_allclose(lse.ravel(), [0.3 + math.log(1 + math.exp(-1))], rtol=1e-14)
    # (b, h) slopes select per batch
    q2 = np.concatenate([q, q])
    k2, v2 = np.concatenate([k, k]), np.concatenate([v, v])
    out2 = ref.flash_attn_func(q2, k2, v2, softmax_scale=1.0, alibi_slopes=np.array([[1.0], [0.0]]))
    np.testing.assert_allclose(out2.ravel(), [out.item(), 15.0], rtol=1e-14)


def test_softcap_applied_after_scale_before_alibi():
    q = np.array([2.0]).reshape(1, 1, 1, 1)
    k = np.array([3.0, 0.5]).reshape(1, 2, 1, 1)
    v = np.array([1.0, -1.0]).reshape(1, 2, 1, 1)
    _, lse, s = ref.flash_attn_func(q, k, v, softmax_scale=0.5, softcap=2.0,
                                    alibi_slopes=np.array([0.25]), return_attn_probs=True)
    x0 = 2 * math.tanh(0.5 * 6 / 2) - 0.25 * 1
    x1 = 2 * math.tanh(0.5 * 1 / 2)
    np.testing.assert_allclose(lse.ravel(), [math.log(math.exp(x0) + math.exp(x1))], rtol=1e-14)
    np.testing.assert_allclose(s.ravel(), np.exp([x0, x1]) / (math.exp(x0) + math.exp(x1)),
                               rtol=1e-14)


@pytest.mark.parametrize("causal,window,softcap,alibi,hk", [
    (False, (-1, -1), 0.0, False, 2),
    (True, (-1, -1), 0.0, True, 1),
    (False, (2, 1), 1.5, False, 2),
    (True, (1, -1), 0.0, True, 4),
    (False, (0, 0), 0.0, True, 2),
])
@pytest.mark.parametrize("sq,sk", [(3, 5), (5, 3), (4, 4)])
def test_matches_loop_implementation(causal, window, softcap, alibi, hk, sq, sk):
    q, k, v = rnd(0, 2, sq, 4, 3), rnd(1, 2, sk, hk, 3), rnd(2, 2, sk, hk, 3)
    slopes = np.array([0.5, 0.25, 0.125, 1.0]) if alibi else None
    out, lse, _ = ref.flash_attn_func(q, k, v, 0.0, 0.7, causal, window, softcap, slopes,
                                      return_attn_probs=True)
    want_out, want_lse = loop_flash(q, k, v, 0.7, causal, window, softcap, slopes)
    np.testing.assert_allclose(out, want_out, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-12)


def test_dropout_scaling_and_s_dmask_sign():
    q = np.array([1.0]).reshape(1, 1, 1, 1)
    k = np.array([0.0, math.log(3), -1000.0]).reshape(1, 3, 1, 1)
    v = np.array([4.0, 8.0, 100.0]).reshape(1, 3, 1, 1)
    keep = np.array([True, False, False]).reshape(1, 1, 1, 3)
    out, lse, s = ref.flash_attn_func(q, k, v, 0.2, 1.0, return_attn_probs=True, dropout_mask=keep)
    # P = [1/4, 3/4, 0]: only key 0 kept, scaled by 1/(1 - 0.2).
    np.testing.assert_allclose(out.ravel(), [0.25 * 4 / 0.8], rtol=1e-14)
    np.testing.assert_allclose(lse.ravel(), [math.log(4)], rtol=1e-14)   # lse is pre-dropout
    np.testing.assert_allclose(np.abs(s).ravel(), [0.25, 0.75, 0.0], rtol=1e-14)
    np.testing.assert_array_equal(np.signbit(s).ravel(), [False, True, True])  # -0.0 for P = 0
    np.testing.assert_array_equal(~np.signbit(s), keep)
    with pytest.raises(ValueError, match="dropout_mask"):
        ref.flash_attn_func(q, k, v, 0.2)


def test_s_dmask_masked_entries_are_positive_zero():
    q, k, v = rnd(0, 1, 2, 1, 2), rnd(1, 1, 3, 1, 2), rnd(2, 1, 3, 1, 2)
    keep = np.zeros((1, 1, 2, 3), bool)
    _, _, s = ref.flash_attn_func(q, k, v, 0.5, causal=True, return_attn_probs=True,
                                  dropout_mask=keep)
    # row 0 sees keys 0, 1: dropped -> negative; key 2 is masked -> +0
    assert np.all(np.signbit(s[0, 0, 0, :2]))
    assert s[0, 0, 0, 2] == 0 and not np.signbit(s[0, 0, 0, 2])


def test_dropout_matches_loop_with_gqa():
    q, k, v = rnd(0, 1, 3, 4, 2), rnd(1, 1, 4, 2, 2), rnd(2, 1, 4, 2, 2)
    keep = np.random.default_rng(3).random((1, 4, 3, 4)) > 0.3
    out = ref.flash_attn_func(q, k, v, 0.3, 0.8, causal=True, dropout_mask=keep)
    want, _ = loop_flash(q, k, v, 0.8, causal=True, keep=keep, p=0.3)
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)


def test_packed_variants_match_unpacked():
    qkv = rnd(0, 2, 4, 3, 2, 3)
    a = ref.flash_attn_qkvpacked_func(qkv, causal=True)
    b = ref.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    np.testing.assert_array_equal(a, b)
    q, kv = rnd(1, 2, 3, 4, 3), rnd(2, 2, 5, 2, 2, 3)
    a = ref.flash_attn_kvpacked_func(q, kv, window_size=(1, 1))
    b = ref.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], window_size=(1, 1))
    np.testing.assert_array_equal(a, b)


# --------------------------------------------------------------------------------------------
# varlen, paged KV, kvcache
# --------------------------------------------------------------------------------------------

def test_varlen_equals_per_sequence_fixed_calls():
    lq, lk = [2, 5, 1], [4, 3, 6]
    cu_q = np.array([0, 2, 7, 8], np.int32)
    cu_k = np.array([0, 4, 7, 13], np.int64)
    q, k, v = rnd(0, 8, 4, 3), rnd(1, 13, 2, 3), rnd(2, 13, 2, 3)
    slopes = np.array([[0.5, 0.1, 0.2, 0.3], [0.4, 0.3, 0.2, 0.1], [1.0, 0.0, 0.5, 0.25]])
    keep = np.random.default_rng(4).random((3, 4, 6, 7)) > 0.25
    out, lse, s = ref.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 6, 7, 0.1, None, True,
                                             (-1, -1), 0.0, slopes, return_attn_probs=True,
                                             dropout_mask=keep)
    assert out.shape == (8, 4, 3) and lse.shape == (4, 8) and s.shape == (3, 4, 6, 7)
    for b in range(3):
        qb, kb, vb = q[cu_q[b]:cu_q[b + 1]], k[cu_k[b]:cu_k[b + 1]], v[cu_k[b]:cu_k[b + 1]]
        o, l, sb = ref.flash_attn_func(qb[None], kb[None], vb[None], 0.1, None, True,
                                       alibi_slopes=slopes[b], return_attn_probs=True,
                                       dropout_mask=keep[b:b + 1, :, :lq[b], :lk[b]])
        np.testing.assert_allclose(out[cu_q[b]:cu_q[b + 1]], o[0], rtol=1e-14)
        np.testing.assert_allclose(lse[:, cu_q[b]:cu_q[b + 1]], l[0], rtol=1e-14)
        np.testing.assert_array_equal(s[b, :, :lq[b], :lk[b]], sb[0])
        assert np.all(s[b, :, lq[b]:] == 0) and np.all(s[b, :, :, lk[b]:] == 0)


def test_varlen_packed_variants():
    cu = np.array([0, 3, 5], np.int32)
    qkv = rnd(0, 5, 3, 2, 4)
    a = ref.flash_attn_varlen_qkvpacked_func(qkv, cu, 3, causal=True)
    b = ref.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 3, 3, causal=True)
    np.testing.assert_array_equal(a, b)
    q, kv = rnd(1, 5, 2, 4), rnd(2, 5, 2, 1, 4)
    a = ref.flash_attn_varlen_kvpacked_func(q, kv, cu, cu, 3, 3)
    b = ref.flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu, cu, 3, 3)
    np.testing.assert_array_equal(a, b)


def test_paged_kv_equals_unpaged():
    cu_q = np.array([0, 2, 5], np.int32)
    cu_k = np.array([0, 5, 12], np.int32)
    q, k, v = rnd(0, 5, 2, 3), rnd(1, 12, 1, 3), rnd(2, 12, 1, 3)
    page = 4
    table = np.array([[5, 1, 0], [2, 4, 3]], np.int32)   # 3 blocks per sequence (capacity 12)
    kc = rnd(3, 6, page, 1, 3)
    vc = rnd(4, 6, page, 1, 3)
    for b, (k0, k1) in enumerate([(0, 5), (5, 12)]):
        for j in range(k1 - k0):
            kc[table[b, j // page], j % page] = k[k0 + j]
            vc[table[b, j // page], j % page] = v[k0 + j]
    want = ref.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 7, causal=True)
    got = ref.flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, 3, 7, causal=True, block_table=table)
    np.testing.assert_array_equal(got, want)


def test_kvcache_append_in_place_and_attention():
    b, hk, d = 2, 1, 2
    k_cache, v_cache = rnd(0, b, 6, hk, d), rnd(1, b, 6, hk, d)
    orig_k, orig_v = k_cache.copy(), v_cache.copy()
    q, k_new, v_new = rnd(2, b, 2, 2, d), rnd(3, b, 2, hk, d), rnd(4, b, 2, hk, d)
    seqlens = np.array([1, 3], np.int32)
    out, lse = ref.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                           cache_seqlens=seqlens, causal=True,
                                           return_softmax_lse=True)
    for bi, s in enumerate(seqlens):
        np.testing.assert_array_equal(k_cache[bi, s:s + 2], k_new[bi])
        np.testing.assert_array_equal(v_cache[bi, s:s + 2], v_new[bi])
        np.testing.assert_array_equal(k_cache[bi, :s], orig_k[bi, :s])        # untouched
        np.testing.assert_array_equal(k_cache[bi, s + 2:], orig_k[bi, s + 2:])
        o, l, _ = ref.flash_attn_func(q[bi:bi + 1], k_cache[bi:bi + 1, :s + 2],
                                      v_cache[bi:bi + 1, :s + 2], causal=True,
                                      return_attn_probs=True)
        np.testing.assert_allclose(out[bi], o[0], rtol=1e-14)
        np.testing.assert_allclose(lse[bi], l[0], rtol=1e-14)
    # int cache_seqlens, no new keys: attention over the first 4 entries of each cache
    out2 = ref.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=4)
    np.testing.assert_allclose(out2, ref.flash_attn_func(q, k_cache[:, :4], v_cache[:, :4]),
                               rtol=1e-14)
    # None: the whole cache
    np.testing.assert_allclose(ref.flash_attn_with_kvcache(q, k_cache, v_cache),
                               ref.flash_attn_func(q, k_cache, v_cache), rtol=1e-14)
    assert not np.array_equal(orig_v, v_cache)


def test_kvcache_leftpad_batch_idx_and_alibi():
    k_cache, v_cache = rnd(0, 3, 7, 1, 2), rnd(1, 3, 7, 1, 2)
    q = rnd(2, 2, 2, 2, 2)
    seqlens, leftpad, bidx = np.array([5, 6]), np.array([2, 0]), np.array([2, 0])
    slopes = np.array([0.3, 0.7])
    out = ref.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                      cache_batch_idx=bidx, cache_leftpad=leftpad,
                                      causal=True, alibi_slopes=slopes)
    for bi in range(2):
        kb = k_cache[bidx[bi], leftpad[bi]:seqlens[bi]][None]
        vb = v_cache[bidx[bi], leftpad[bi]:seqlens[bi]][None]
        want = ref.flash_attn_func(q[bi:bi + 1], kb, vb, causal=True, alibi_slopes=slopes)
        np.testing.assert_allclose(out[bi], want[0], rtol=1e-14)


def test_kvcache_paged_equals_unpaged_with_append():
    page = 3
    q, k_new, v_new = rnd(0, 2, 1, 2, 2), rnd(1, 2, 2, 1, 2), rnd(2, 2, 2, 1, 2)
    k_flat, v_flat = rnd(3, 2, 6, 1, 2), rnd(4, 2, 6, 1, 2)
    table = np.array([[3, 0], [1, 2]], np.int32)
    k_paged, v_paged = np.zeros((4, page, 1, 2)), np.zeros((4, page, 1, 2))
    for bi in range(2):
        for j in range(6):
            k_paged[table[bi, j // page], j % page] = k_flat[bi, j]
            v_paged[table[bi, j // page], j % page] = v_flat[bi, j]
    seqlens = np.array([2, 4], np.int32)
    want = ref.flash_attn_with_kvcache(q, k_flat, v_flat, k_new, v_new, cache_seqlens=seqlens)
    got = ref.flash_attn_with_kvcache(q, k_paged, v_paged, k_new, v_new, cache_seqlens=seqlens,
                                      block_table=table)
    np.testing.assert_allclose(got, want, rtol=1e-14)
    for bi in range(2):
        for j in range(6):
            np.testing.assert_array_equal(k_paged[table[bi, j // page], j % page], k_flat[bi, j])


def test_kvcache_rotary_interleaved_and_half():
    theta = 0.3
    cos = np.cos(np.array([[0.0], [theta], [2 * theta], [3 * theta]]))
    sin = np.sin(np.array([[0.0], [theta], [2 * theta], [3 * theta]]))
    # rotary_dim = 2: interleaved rotates channels (0, 1); channel 2 untouched.
    k_cache, v_cache = np.zeros((1, 4, 1, 3)), np.zeros((1, 4, 1, 3))
    k_new = np.array([1.0, 0.0, 5.0]).reshape(1, 1, 1, 3)
    v_new = np.array([1.0, 2.0, 3.0]).reshape(1, 1, 1, 3)
    q = np.array([0.0, 1.0, 1.0]).reshape(1, 1, 1, 3)
    ref.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin, cache_seqlens=2)
    a = 2 * theta   # position cache_seqlens + 0
    np.testing.assert_allclose(k_cache[0, 2, 0], [math.cos(a), math.sin(a), 5.0], rtol=1e-14)
    np.testing.assert_array_equal(v_cache[0, 2, 0], [1, 2, 3])
    # half-split (GPT-NeoX), rotary_dim = 4 of d = 4: pairs (0, 2) and (1, 3).
    cos2 = np.cos(np.array([[0.0, 0.0], [theta, 2 * theta]]))
    sin2 = np.sin(np.array([[0.0, 0.0], [theta, 2 * theta]]))
    k_cache, v_cache = np.zeros((1, 2, 1, 4)), np.zeros((1, 2, 1, 4))
    k_new = np.array([1.0, 2.0, 3.0, 4.0]).reshape(1, 1, 1, 4)
    ref.flash_attn_with_kvcache(rnd(0, 1, 1, 1, 4), k_cache, v_cache, k_new, rnd(1, 1, 1, 1, 4),
                                cos2, sin2, cache_seqlens=1, rotary_interleaved=False)
    c1, s1, c2, s2 = math.cos(theta), math.sin(theta), math.cos(2 * theta), math.sin(2 * theta)
    np.testing.assert_allclose(k_cache[0, 1, 0], [1 * c1 - 3 * s1, 2 * c2 - 4 * s2,
                                                  1 * s1 + 3 * c1, 2 * s2 + 4 * c2], rtol=1e-14)


@pytest.mark.parametrize("causal", [False, True])
def test_kvcache_rotary_query_positions(causal):
    # q row i rotates at cache_seqlens + i with causal/local, else all rows at cache_seqlens.
    rng = np.random.default_rng(7)
    ang = rng.random((8, 1)) * 6.28
    cos, sin = np.cos(ang), np.sin(ang)
    q, k_new, v_new = rnd(0, 1, 2, 1, 2), rnd(1, 1, 2, 1, 2), rnd(2, 1, 2, 1, 2)
    k_cache, v_cache = rnd(3, 1, 8, 1, 2), rnd(4, 1, 8, 1, 2)
    out = ref.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, cos, sin,
                                      cache_seqlens=3, causal=causal)

    def rot(x, pos):
        c, s = cos[pos, 0], sin[pos, 0]
        return np.array([x[0] * c - x[1] * s, x[0] * s + x[1] * c])

    q_rot = q.copy()
    for i in range(2):
        q_rot[0, i, 0] = rot(q[0, i, 0], 3 + (i if causal else 0))
    want = ref.flash_attn_func(q_rot, k_cache[:, :5], v_cache[:, :5], causal=causal)
    np.testing.assert_allclose(out, want, rtol=1e-13)
    np.testing.assert_allclose(k_cache[0, 3, 0], rot(k_new[0, 0, 0], 3), rtol=1e-14)
    np.testing.assert_allclose(k_cache[0, 4, 0], rot(k_new[0, 1, 0], 4), rtol=1e-14)


# --------------------------------------------------------------------------------------------
# low level API, combine_partials, compute_dtype
# --------------------------------------------------------------------------------------------

def test_fwd_returns_lse_and_rng_state():
    q, k, v = rnd(0, 1, 3, 2, 2), rnd(1, 1, 4, 2, 2), rnd(2, 1, 4, 2, 2)
    out, lse, rng = ref.flash_attn_fwd(q, k, v, causal=True, seed=42)
    o2, l2, _ = ref.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    np.testing.assert_array_equal(out, o2)
    np.testing.assert_array_equal(lse, l2)
    assert rng.dtype == np.int64 and list(rng) == [42, 0]
    assert list(ref.flash_attn_fwd(q, k, v)[2]) == [0, 0]


def test_combine_partials_equals_full_attention():
    q, k, v = rnd(0, 2, 3, 2, 4), rnd(1, 2, 7, 2, 4), rnd(2, 2, 7, 2, 4)
    o_full, l_full, _ = ref.flash_attn_fwd(q, k, v)
    parts = [ref.flash_attn_fwd(q, k[:, a:b], v[:, a:b]) for a, b in [(0, 2), (2, 3), (3, 7)]]
    o, l = ref.combine_partials([p[0] for p in parts], [p[1] for p in parts])
    np.testing.assert_allclose(o, o_full, rtol=1e-13)
    np.testing.assert_allclose(l, l_full, rtol=1e-14)
    # an empty partial (lse +inf) is ignored, even with garbage in its out
    garbage = np.full_like(o, np.nan)
    o2, l2 = ref.combine_partials([parts[0][0], garbage, parts[1][0], parts[2][0]],
                                  [parts[0][1], np.full_like(l, np.inf), parts[1][1], parts[2][1]])
    np.testing.assert_allclose(o2, o_full, rtol=1e-13)
    # all partials empty -> out 0, lse +inf
    o3, l3 = ref.combine_partials([garbage], [np.full_like(l, np.inf)])
    assert np.all(o3 == 0) and np.all(l3 == np.inf)


def test_combine_partials_varlen_layout():
    q, k, v = rnd(0, 4, 2, 3), rnd(1, 6, 2, 3), rnd(2, 6, 2, 3)
    cu_q, cu_k = np.array([0, 4]), np.array([0, 6])
    o_full, l_full, _ = ref.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 4, 6)
    a = ref.flash_attn_varlen_fwd(q, k[:2], v[:2], cu_q, np.array([0, 2]), 4, 2)
    b = ref.flash_attn_varlen_fwd(q, k[2:], v[2:], cu_q, np.array([0, 4]), 4, 4)
    o, l = ref.combine_partials([a[0], b[0]], [a[1], b[1]])
    np.testing.assert_allclose(o, o_full, rtol=1e-13)
    np.testing.assert_allclose(l, l_full, rtol=1e-14)


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float16, 3e-2),
                                       (ml_dtypes.bfloat16, 2e-1)])
def test_compute_dtype_low_precision(dtype, tol):
    q, k, v = (x.astype(dtype)
               for x in (rnd(0, 1, 5, 2, 8), rnd(1, 1, 9, 1, 8), rnd(2, 1, 9, 1, 8)))
    exact, lse, _ = ref.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    low, lse_low, s_low = ref.flash_attn_func(q, k, v, causal=True, return_attn_probs=True,
                                              compute_dtype=dtype)
    assert low.dtype == np.dtype(dtype) and s_low.dtype == np.dtype(dtype)
    assert lse_low.dtype == np.float32 and lse.dtype == np.float64
    err = np.abs(low.astype(np.float64) - exact).max()
    assert 0 < err < tol          # rounding happened, and only rounding
    np.testing.assert_allclose(lse_low, lse, rtol=1e-2)
    # every value of the low-precision result is representable in the compute dtype
    np.testing.assert_array_equal(low.astype(np.float64).astype(dtype), low)
    dq, dk, dv = ref.flash_attn_bwd(rnd(3, 1, 5, 2, 8).astype(dtype), q, k, v, low, lse_low,
                                    causal=True, compute_dtype=dtype)
    assert dq.dtype == np.dtype(dtype) and dk.shape == k.shape


def test_compute_dtype_rejects_others():
    q = rnd(0, 1, 2, 1, 2)
    with pytest.raises(ValueError, match="compute_dtype"):
        ref.flash_attn_func(q, q, q, compute_dtype=np.int32)


# --------------------------------------------------------------------------------------------
# flash-attn backward vs finite differences
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(),
    dict(causal=True),
    dict(causal=True, sq=5, sk=3),          # rows without keys
    dict(window_size=(1, 1), softcap=1.3),
    dict(alibi=True, causal=True, hk=1),
    dict(softcap=0.8, alibi=True, hk=2),
    dict(dropout=0.25, hk=1, window_size=(2, 0)),
])
def test_flash_bwd_matches_finite_differences(cfg):
    sq, sk, h, hk, d = cfg.get("sq", 3), cfg.get("sk", 4), 2, cfg.get("hk", 2), 3
    q, k, v = rnd(0, 1, sq, h, d), rnd(1, 1, sk, hk, d), rnd(2, 1, sk, hk, d)
    dout = rnd(3, 1, sq, h, d)
    p = cfg.get("dropout", 0.0)
    keep = (np.random.default_rng(5).random((1, h, sq, sk)) > 0.3) if p else None
    kw = dict(softmax_scale=0.6, causal=cfg.get("causal", False),
              window_size=cfg.get("window_size", (-1, -1)), softcap=cfg.get("softcap", 0.0),
              alibi_slopes=np.array([0.4, 0.9]) if cfg.get("alibi") else None)

    def loss():
        return float(np.sum(ref.flash_attn_func(q, k, v, p, dropout_mask=keep, **kw) * dout))

    out, lse, _ = ref.flash_attn_fwd(q, k, v, p, dropout_mask=keep, **kw)
    dq, dk, dv = ref.flash_attn_bwd(dout, q, k, v, out, lse, p, dropout_mask=keep, **kw)
    assert_grad(dq, numgrad(loss, q), "dq")
    assert_grad(dk, numgrad(loss, k), "dk")
    assert_grad(dv, numgrad(loss, v), "dv")
    if sq > sk and kw["causal"]:
        assert np.all(dq[:, :sq - sk] == 0)


def test_flash_bwd_uses_given_lse():
    q, k, v = rnd(0, 1, 3, 1, 2), rnd(1, 1, 4, 1, 2), rnd(2, 1, 4, 1, 2)
    dout = rnd(3, 1, 3, 1, 2)
    out, lse, _ = ref.flash_attn_fwd(q, k, v)
    _, _, dv = ref.flash_attn_bwd(dout, q, k, v, out, lse)
    _, _, dv2 = ref.flash_attn_bwd(dout, q, k, v, out, lse + math.log(2))
    np.testing.assert_allclose(dv2, dv / 2, rtol=1e-14)
    # a row given lse = +inf contributes nothing
    lse_inf = lse.copy()
    lse_inf[0, 0, 1] = np.inf
    dq, _, _ = ref.flash_attn_bwd(dout, q, k, v, out, lse_inf)
    assert np.all(dq[0, 1] == 0) and np.all(dq[0, 0] != 0)


def test_varlen_bwd_matches_finite_differences():
    cu_q, cu_k = np.array([0, 2, 5], np.int32), np.array([0, 3, 5], np.int32)
    q, k, v = rnd(0, 5, 2, 2), rnd(1, 5, 1, 2), rnd(2, 5, 1, 2)
    dout = rnd(3, 5, 2, 2)
    keep = np.random.default_rng(6).random((2, 2, 3, 3)) > 0.3
    kw = dict(dropout_p=0.2, causal=True, alibi_slopes=np.array([0.3, 0.6]), dropout_mask=keep)

    def loss():
        return float(np.sum(ref.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 3, 3, **kw) * dout))

    out, lse, _ = ref.flash_attn_varlen_fwd(q, k, v, cu_q, cu_k, 3, 3, **kw)
    dq, dk, dv = ref.flash_attn_varlen_bwd(dout, q, k, v, out, lse, cu_q, cu_k, 3, 3, **kw)
    assert_grad(dq, numgrad(loss, q), "dq")
    assert_grad(dk, numgrad(loss, k), "dk")
    assert_grad(dv, numgrad(loss, v), "dv")


# --------------------------------------------------------------------------------------------
# NPU: sparse modes, masks, pse, invalid lines, layouts
# --------------------------------------------------------------------------------------------

def npu_pattern(sq, skv, **kw):
    """Visibility pattern (1 = masked, the spec's notation) via V = identity: out row = P row."""
    q, k = rnd(0, 1, 1, sq, 2), rnd(1, 1, 1, skv, 2)
    v = np.eye(skv).reshape(1, 1, skv, skv)
    out = ref.npu_fusion_attention(q, k, v, 1, "BNSD", **kw)[0]
    return (out[0, 0] == 0).astype(int)


def M(text):
    return np.array([[int(c) for c in row.split()] for row in text.strip().split("/")])


def test_sparse_modes_worked_4x6_example():
    # NPU §4, "Worked 4x6 example" (1 = masked).
    assert np.array_equal(npu_pattern(4, 6, atten_mask=TRIU_2048, sparse_mode=2),
                          M("0 1 1 1 1 1/0 0 1 1 1 1/0 0 0 1 1 1/0 0 0 0 1 1"))
    assert np.array_equal(npu_pattern(4, 6, atten_mask=TRIU_2048, sparse_mode=3),
                          M("0 0 0 1 1 1/0 0 0 0 1 1/0 0 0 0 0 1/0 0 0 0 0 0"))
    assert np.array_equal(npu_pattern(4, 6, atten_mask=TRIU_2048, sparse_mode=4, pre_tockens=1,
                                      next_tockens=0),
                          M("1 0 0 1 1 1/1 1 0 0 1 1/1 1 1 0 0 1/1 1 1 1 0 0"))
    band = np.zeros((4, 6), bool)           # mode 0: the band comes from pre/next on top of mask
    assert np.array_equal(npu_pattern(4, 6, atten_mask=band, sparse_mode=0, pre_tockens=1,
                                      next_tockens=0),
                          M("0 1 1 1 1 1/0 0 1 1 1 1/1 0 0 1 1 1/1 1 0 0 1 1"))
    assert np.array_equal(npu_pattern(4, 6, atten_mask=TRIU_2048, sparse_mode=4, pre_tockens=2,
                                      next_tockens=-1),
                          M("0 0 1 1 1 1/1 0 0 1 1 1/1 1 0 0 1 1/1 1 1 0 0 1"))
    prefix_mask = np.zeros((4, 6), bool)
    want_prefix = M("0 0 0 0 1 1/0 0 0 0 1 1/0 0 0 0 0 1/0 0 0 0 0 0")
    assert np.array_equal(npu_pattern(4, 6, atten_mask=prefix_mask, sparse_mode=5, prefix=[4]),
                          want_prefix)
    mode6_mask = np.zeros((3072, 2048), bool)
    assert np.array_equal(npu_pattern(4, 6, atten_mask=mode6_mask, sparse_mode=6, prefix=[4]),
                          want_prefix)
    # mode 3 with Sq=6, Skv=4: rows 0-1 see nothing -> invalid-line mode is automatic -> 0.
    assert np.array_equal(npu_pattern(6, 4, atten_mask=TRIU_2048, sparse_mode=3),
                          M("1 1 1 1/1 1 1 1/0 1 1 1/0 0 1 1/0 0 0 1/0 0 0 0"))


def test_mode0_mask_is_anded_and_mode1_ignores_tockens():
    mask = np.zeros((4, 6), bool)
    mask[1, 0] = True
    got = npu_pattern(4, 6, atten_mask=mask, sparse_mode=0, pre_tockens=1, next_tockens=0)
    assert np.array_equal(got, M("0 1 1 1 1 1/1 0 1 1 1 1/1 0 0 1 1 1/1 1 0 0 1 1"))
    got = npu_pattern(4, 6, atten_mask=mask, sparse_mode=1, pre_tockens=1, next_tockens=0)
    assert np.array_equal(got, mask.astype(int))
    # no atten_mask: sparse_mode and tockens are ignored (NPU §3)
    assert not npu_pattern(4, 6, sparse_mode=3).any()
    assert not npu_pattern(4, 6, sparse_mode=0, pre_tockens=0, next_tockens=0).any()


def tnd_pattern(lens_q, lens_kv, **kw):
    n_q, n_kv = sum(lens_q), sum(lens_kv)
    q, k = rnd(0, n_q, 1, 2), rnd(1, n_kv, 1, 2)
    v = np.zeros((n_kv, 1, max(lens_kv)))
    off = 0
    for l in lens_kv:
        v[off:off + l, 0, :l] = np.eye(l)
        off += l
    cum_q, cum_kv = np.cumsum(lens_q).tolist(), np.cumsum(lens_kv).tolist()
    out = ref.npu_fusion_attention(q, k, v, 1, "TND", actual_seq_qlen=cum_q,
                                   actual_seq_kvlen=cum_kv, **kw)[0]
    res, off = [], 0
    for lq, lk in zip(lens_q, lens_kv):
        res.append((out[off:off + lq, 0, :lk] == 0).astype(int))
        off += lq
    return res


def test_modes_7_and_8_doc_examples():
    # Mode 7 card 1: last batch Sq=2, Skv=6, pre=6, next=-2 -> rows 0-1 of a 4x6 RD-causal mask.
    pats = tnd_pattern([3, 2], [3, 6], atten_mask=TRIU_2048, sparse_mode=7, pre_tockens=6,
                       next_tockens=-2)
    assert np.array_equal(pats[1], M("0 0 0 1 1 1/0 0 0 0 1 1"))
    assert np.array_equal(pats[0], M("0 1 1/0 0 1/0 0 0"))          # other batches: mode 3
    # Mode 8 card 2: first batch Sq=3, Skv=4, pre=4, next=1 -> rows 2-4 of a 5x4 LU-causal mask.
    pats = tnd_pattern([3, 2], [4, 3], atten_mask=TRIU_2048, sparse_mode=8, pre_tockens=4,
                       next_tockens=1)
    assert np.array_equal(pats[0], M("0 0 0 1/0 0 0 0/0 0 0 0"))
    assert np.array_equal(pats[1], M("0 1 1/0 0 1"))                # other batches: mode 2


def test_tnd_mask_top_left_window():
    mask = np.zeros((3, 4), bool)
    mask[0, 1] = mask[1, 0] = True
    pats = tnd_pattern([2, 3], [2, 4], atten_mask=mask, sparse_mode=1)
    assert np.array_equal(pats[0], M("0 1/1 0"))
    assert np.array_equal(pats[1], mask.astype(int))


def test_pse_added_before_scale_and_stats():
    q = np.array([1.0]).reshape(1, 1, 1, 1)
    k = np.array([2.0, 0.0]).reshape(1, 1, 2, 1)
    v = np.array([3.0, -1.0]).reshape(1, 1, 2, 1)
    pse = np.array([1.0, -2.0]).reshape(1, 1, 1, 2)
    out, mx, sm, sout, seed, offset, numels = ref.npu_fusion_attention(q, k, v, 1, "BNSD", pse=pse,
                                                                      scale=0.5)
    s = np.array([0.5 * (2 + 1), 0.5 * (0 - 2)])       # scale * (qk + pse)
    p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
    np.testing.assert_allclose(out.ravel(), [p @ [3.0, -1.0]], rtol=1e-14)
    assert mx.shape == (1, 1, 1, 8) and np.all(mx == 1.5)
    np.testing.assert_allclose(sm, np.exp(s - 1.5).sum(), rtol=1e-14)
    assert sout.shape == (0,) and (seed, offset, numels) == (0, 0, 2)


@pytest.mark.parametrize("pse_shape", [(2, 4, 3, 5), (1, 4, 3, 5), (2, 4, 1, 5), (1, 4, 1, 5)])
def test_npu_matches_loop_with_pse_gqa_and_mask(pse_shape):
    q, k, v = rnd(0, 2, 4, 3, 2), rnd(1, 2, 2, 5, 2), rnd(2, 2, 2, 5, 3)   # Dv = 3 != D
    pse = rnd(3, *pse_shape)
    mask = np.random.default_rng(4).random((2, 1, 3, 5)) > 0.6
    mask[1, 0, 2] = True                               # a fully masked row: mean of V
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 4, "BNSD", pse=pse, atten_mask=mask,
                                           scale=0.7)[:3]
    keep = np.broadcast_to(~mask, (2, 4, 3, 5))
    want, wmx, wsm = loop_npu(q, k, v, 0.7, keep, np.broadcast_to(pse, (2, 4, 3, 5)))
    np.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(mx[..., 0], wmx, rtol=1e-14)
    np.testing.assert_allclose(sm[..., 0], wsm, rtol=1e-13)
    np.testing.assert_allclose(out[1, :, 2], np.repeat(v[1].mean(axis=1), 2, axis=0), rtol=1e-13)
    assert np.all(mx[1, :, 2] == -FLT_MAX) and np.all(sm[1, :, 2] == 5)


def test_fully_masked_row_mean_of_v_and_inner_precise_2():
    q, k, v = rnd(0, 1, 1, 3, 2), rnd(1, 1, 1, 4, 2), rnd(2, 1, 1, 4, 2)
    mask = np.zeros((3, 4), bool)
    mask[1] = True
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=1)[:3]
    np.testing.assert_allclose(out[0, 0, 1], v[0, 0].mean(axis=0), rtol=1e-14)
    assert mx[0, 0, 1, 0] == -FLT_MAX and sm[0, 0, 1, 0] == 4
    out2, mx2, sm2 = ref.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=1,
                                              inner_precise=2)[:3]
    assert np.all(out2[0, 0, 1] == 0)
    assert mx2[0, 0, 1, 0] == -FLT_MAX and sm2[0, 0, 1, 0] == FLT_MAX
    np.testing.assert_array_equal(out2[0, 0, [0, 2]], out[0, 0, [0, 2]])
    # the legacy alias defaults to inner_precise=1, which behaves like 0
    np.testing.assert_array_equal(
        ref.npu_flash_attention(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=1)[0], out)


def test_auto_invalid_line_for_empty_band_rows():
    # mode 4 with next < Sq - Skv leaves the first rows empty -> automatic invalid-line mode:
    # those rows are 0 and a fully user-masked row is 0 too (the switch is per call).
    q, k, v = rnd(0, 1, 1, 4, 2), rnd(1, 1, 1, 4, 2), rnd(2, 1, 1, 4, 2)
    out = ref.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=TRIU_2048, sparse_mode=4,
                                   pre_tockens=3, next_tockens=-1)[0]
    assert np.all(out[0, 0, 0] == 0) and np.all(out[0, 0, 1:] != 0)
    mask = np.zeros((4, 4), bool)
    mask[3] = True
    out = ref.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=0,
                                   pre_tockens=4, next_tockens=-1)[0]
    assert np.all(out[0, 0, 0] == 0) and np.all(out[0, 0, 3] == 0)


def test_band_keys_all_masked_average_v_over_the_band():
    # NPU §2 "visited columns": the softmax runs over the row's band; a row whose band keys are
    # all masked averages V over the band, not over all Skv keys.
    q, k, v = rnd(0, 1, 1, 4, 2), rnd(1, 1, 1, 6, 2), rnd(2, 1, 1, 6, 2)
    mask = np.zeros((4, 6), bool)
    mask[2] = True
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask, sparse_mode=0,
                                           pre_tockens=1, next_tockens=1)[:3]
    np.testing.assert_allclose(out[0, 0, 2], v[0, 0, 1:4].mean(axis=0), rtol=1e-14)
    assert mx[0, 0, 2, 0] == -FLT_MAX and sm[0, 0, 2, 0] == 3
    # mode 5, prefix 1: row 0 of a 4 x 6 matrix sees keys [0, 3) (right-down causal)
    mask5 = np.zeros((1, 1, 4, 6), bool)
    mask5[..., 0, :] = True
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 1, "BNSD", atten_mask=mask5, sparse_mode=5,
                                           prefix=[1])[:3]
    np.testing.assert_allclose(out[0, 0, 0], v[0, 0, :3].mean(axis=0), rtol=1e-14)
    assert mx[0, 0, 0, 0] == -FLT_MAX and sm[0, 0, 0, 0] == 3
    # the gradient: P is 1/3 on the band, so only dV receives dy / 3 from that row
    dy = rnd(3, 1, 1, 4, 2)
    dq, dk, dv, _ = ref.npu_fusion_attention_grad(q, k, v, dy, 1, "BNSD", atten_mask=mask5,
                                                  sparse_mode=5, prefix=[1])
    dy0 = dy.copy()
    dy0[0, 0, 0] = 0
    dq0, dk0, dv0, _ = ref.npu_fusion_attention_grad(q, k, v, dy0, 1, "BNSD", atten_mask=mask5,
                                                     sparse_mode=5, prefix=[1])
    assert np.all(dq[0, 0, 0] == 0)
    np.testing.assert_allclose(dk, dk0, rtol=1e-14)
    np.testing.assert_allclose(dv - dv0, np.where(np.arange(6)[:, None] < 3, dy[0, 0, 0] / 3, 0)
                               [None, None], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("mode", [5, 6])
def test_prefix_rows_without_keys_give_zero(mode):
    # Sq > Skv with prefix 0: the band of rows i < Sq - Skv is empty -> output 0 and the NPU's
    # invalid-line statistics; with a sink, the sink's own (max = sink, sum = 1).
    q, k, v = rnd(0, 1, 2, 6, 2), rnd(1, 1, 2, 4, 2), rnd(2, 1, 2, 4, 2)
    mask = np.zeros((1, 1, 6, 4), bool) if mode == 5 else np.zeros((3072, 2048), bool)
    kw = dict(atten_mask=mask, sparse_mode=mode, prefix=[0])
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 2, "BNSD", **kw)[:3]
    assert np.all(out[0, :, :2] == 0) and np.all(out[0, :, 2:] != 0)
    assert np.all(mx[0, :, :2] == -FLT_MAX) and np.all(sm[0, :, :2] == FLT_MAX)
    sink = np.array([0.5, -1.0])
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 2, "BNSD", sink=sink, **kw)[:3]
    assert np.all(out[0, :, :2] == 0)
    np.testing.assert_array_equal(mx[0, :, :2, 0], np.repeat(sink[:, None], 2, axis=1))
    assert np.all(sm[0, :, :2] == 1)
    dq = ref.npu_fusion_attention_grad(q, k, v, rnd(3, 1, 2, 6, 2), 2, "BNSD", **kw)[0]
    assert np.all(dq[0, :, :2] == 0)


def test_tnd_mask_block_diagonal_or_top_left():
    # [Tq, Tkv] (T past the sequences) and [sum Sq, sum Skv] with B > 1 are block-diagonal;
    # any other mask of at least [max Sq, max Skv] gives every batch its top-left corner.
    lq, lk = [2, 3], [3, 4]
    q, k, v = rnd(0, 6, 1, 2), rnd(1, 8, 1, 2), rnd(2, 8, 1, 2)
    kw = dict(actual_seq_qlen=[2, 5], actual_seq_kvlen=[3, 7], sparse_mode=1)
    rng = np.random.default_rng(4)
    for shape in ((6, 8), (5, 7), (3, 4), (4, 6)):
        mask = rng.random(shape) < 0.4
        out = ref.npu_fusion_attention(q, k, v, 1, "TND", atten_mask=mask, **kw)[0]
        block = shape in ((6, 8), (5, 7))
        for b, (q0, k0) in enumerate([(0, 0), (2, 3)]):
            mb = mask[q0:q0 + lq[b], k0:k0 + lk[b]] if block else mask[:lq[b], :lk[b]]
            qb, kb, vb = (x[o:o + n].transpose(1, 0, 2)[None]
                          for x, o, n in ((q, q0, lq[b]), (k, k0, lk[b]), (v, k0, lk[b])))
            want = ref.npu_fusion_attention(qb, kb, vb, 1, "BNSD", atten_mask=mb,
                                            sparse_mode=1)[0]
            np.testing.assert_allclose(out[q0:q0 + lq[b]], want[0].transpose(1, 0, 2),
                                       rtol=1e-14, err_msg=str(shape))


def test_sink_is_an_extra_logit():
    q = np.array([1.0]).reshape(1, 1, 1, 1)
    k = np.array([0.0, math.log(3)]).reshape(1, 1, 2, 1)
    v = np.array([4.0, 8.0]).reshape(1, 1, 2, 1)
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 1, "BNSD", sink=np.array([math.log(4.0)]))[:3]
    np.testing.assert_allclose(out.ravel(), [(1 * 4 + 3 * 8) / (1 + 3 + 4)], rtol=1e-14)
    np.testing.assert_allclose(mx.ravel()[0], math.log(4), rtol=1e-14)
    np.testing.assert_allclose(sm.ravel()[0], 2.0, rtol=1e-14)     # (1 + 3 + 4) / 4


def test_layouts_agree_and_head_num_rules():
    b, sq, skv, n, nkv, d, dv = 2, 3, 4, 4, 2, 3, 2
    q, k, v = rnd(0, b, n, sq, d), rnd(1, b, nkv, skv, d), rnd(2, b, nkv, skv, dv)
    mask = np.random.default_rng(3).random((sq, skv)) > 0.7
    base = ref.npu_fusion_attention(q, k, v, n, "BNSD", atten_mask=mask, scale=0.4)
    bsnd = ref.npu_fusion_attention(*(x.transpose(0, 2, 1, 3) for x in (q, k, v)), n, "BSND",
                                    atten_mask=mask, scale=0.4)
    np.testing.assert_array_equal(bsnd[0], base[0].transpose(0, 2, 1, 3))
    np.testing.assert_array_equal(bsnd[1], base[1])                 # stats always [B, N, Sq, 8]

    def bsh(x):
        return x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1)

    def sbh(x):
        return x.transpose(2, 0, 1, 3).reshape(x.shape[2], x.shape[0], -1)

    got = ref.npu_fusion_attention(bsh(q), bsh(k), bsh(v), n, "bsh", atten_mask=mask, scale=0.4)
    np.testing.assert_array_equal(got[0], bsh(base[0]))
    got = ref.npu_fusion_attention(sbh(q), sbh(k), sbh(v), n, "SBH", atten_mask=mask, scale=0.4)
    np.testing.assert_array_equal(got[0], sbh(base[0]))
    # TND with equal lengths
    def tnd(x):
        return x.transpose(0, 2, 1, 3).reshape(-1, x.shape[1], x.shape[3])

    got = ref.npu_fusion_attention(tnd(q), tnd(k), tnd(v), n, "TND", atten_mask=mask, scale=0.4,
                                   actual_seq_qlen=[3, 6], actual_seq_kvlen=[4, 8])
    np.testing.assert_allclose(got[0], tnd(base[0]), rtol=1e-14)
    with pytest.raises(ValueError, match="head_num"):
        ref.npu_fusion_attention(q, k, v, 3, "BNSD")
    with pytest.raises(ValueError):
        ref.npu_fusion_attention(bsh(q), bsh(k), bsh(v), 5, "BSH")


def test_tnd_softmax_layouts_and_numels():
    lens_q, lens_kv = [2, 3], [3, 2]
    q, k, v = rnd(0, 6, 2, 2), rnd(1, 5, 2, 2), rnd(2, 5, 2, 2)   # T = 6 > 5: one spare row
    kw = dict(actual_seq_qlen=[2, 5], actual_seq_kvlen=[3, 5], scale=0.5)
    out, mx, sm, _, _, _, numels = ref.npu_fusion_attention(q, k, v, 2, "TND",
                                                            softmax_layout="TND", **kw)
    _, mx_n, sm_n = ref.npu_fusion_attention(q, k, v, 2, "TND", **kw)[:3]
    assert mx.shape == mx_n.shape == (6, 2, 8) and numels == 2 * (2 * 3 + 3 * 2)
    assert np.all(out[5] == 0) and np.all(mx[5] == 0)
    # per-batch reference statistics (N, Sq_b)
    stats = []
    for b, (q0, k0) in enumerate([(0, 0), (2, 3)]):
        qb = q[q0:q0 + lens_q[b]].transpose(1, 0, 2)[None]
        kb = k[k0:k0 + lens_kv[b]].transpose(1, 0, 2)[None]
        vb = v[k0:k0 + lens_kv[b]].transpose(1, 0, 2)[None]
        o, m, s = ref.npu_fusion_attention(qb, kb, vb, 2, "BNSD", scale=0.5)[:3]
        np.testing.assert_allclose(out[q0:q0 + lens_q[b]], o[0].transpose(1, 0, 2), rtol=1e-14)
        stats.append(m[0, :, :, 0])
    # "TND": rows in T order
    np.testing.assert_allclose(mx[:2, :, 0], stats[0].T, rtol=1e-14)
    np.testing.assert_allclose(mx[2:5, :, 0], stats[1].T, rtol=1e-14)
    # "": per-batch [N, Sq_b, 8] blocks back to back in the flat buffer
    flat = mx_n.reshape(-1)
    np.testing.assert_allclose(flat[:2 * 2 * 8].reshape(2, 2, 8)[..., 0], stats[0], rtol=1e-14)
    np.testing.assert_allclose(flat[32:32 + 2 * 3 * 8].reshape(2, 3, 8)[..., 0], stats[1],
                               rtol=1e-14)
    # numels uses the raw cumulative lists (trailing zeros give odd values, NPU §1.2)
    q2, k2, v2 = rnd(3, 9, 1, 2), rnd(4, 9, 1, 2), rnd(5, 9, 1, 2)
    res = ref.npu_fusion_attention(q2, k2, v2, 1, "TND", actual_seq_qlen=[2, 5, 9, 0, 0],
                                   actual_seq_kvlen=[2, 5, 9, 0, 0])
    assert res[6] == 4 + 9 + 16 + 81


def toeplitz_alibi(slope, size):
    i = np.arange(size)[:, None]
    j = np.arange(size)[None, :]
    return -slope * np.abs(j - i).astype(float)


def test_alibi_compressed_pse_non_tnd():
    s = 1030
    q, k, v = rnd(0, 1, 1, s, 2, scale=0.5), rnd(1, 1, 1, s, 2, scale=0.5), rnd(2, 1, 1, s, 2)
    full = toeplitz_alibi(0.01, s)[None, None]
    comp = full[:, :, -1024:, :]
    a = ref.npu_fusion_attention(q, k, v, 1, "BNSD", pse=comp, atten_mask=TRIU_2048,
                                 sparse_mode=3, scale=0.3)[0]
    b = ref.npu_fusion_attention(q, k, v, 1, "BNSD", pse=full, atten_mask=TRIU_2048,
                                 sparse_mode=3, scale=0.3)[0]
    np.testing.assert_allclose(a, b, rtol=1e-13, atol=1e-15)


def test_alibi_compressed_pse_tnd():
    cols = 8
    lens = [3, 5]
    slopes = np.array([0.5, 0.2])
    # The last 1024 rows of a cols x cols Toeplitz alibi matrix: comp[r, c] = f(c - (cols - 1024
    # + r)) with f(x) = -slope |x|.
    i = np.arange(1024)[:, None]
    c = np.arange(cols)[None, :]
    comp = -slopes[None, :, None, None] * np.abs(c - (cols - 1024 + i))[None, None]
    q, k, v = rnd(0, 8, 2, 2), rnd(1, 8, 2, 2), rnd(2, 8, 2, 2)
    out = ref.npu_fusion_attention(q, k, v, 2, "TND", pse=comp, atten_mask=TRIU_2048,
                                   sparse_mode=3, scale=0.6, actual_seq_qlen=[3, 8],
                                   actual_seq_kvlen=[3, 8])[0]
    for s0, l in [(0, 3), (3, 5)]:
        qb, kb, vb = (x[s0:s0 + l].transpose(1, 0, 2)[None] for x in (q, k, v))
        pse = np.stack([toeplitz_alibi(sl, l) for sl in slopes])[None]
        want = ref.npu_fusion_attention(qb, kb, vb, 2, "BNSD", pse=pse, atten_mask=TRIU_2048,
                                        sparse_mode=3, scale=0.6)[0]
        np.testing.assert_allclose(out[s0:s0 + l], want[0].transpose(1, 0, 2), rtol=1e-13)


def test_npu_dropout_mask_forms():
    q, k, v = rnd(0, 2, 2, 3, 2), rnd(1, 2, 1, 4, 2), rnd(2, 2, 1, 4, 2)
    keep = np.random.default_rng(1).random((2, 2, 3, 4)) > 0.4
    out = ref.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.6, dropout_mask=keep)[0]
    flat = ref.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.6,
                                    dropout_mask=keep.reshape(-1))[0]
    np.testing.assert_array_equal(out, flat)
    p = loop_npu(q, k, v, 1.0, np.ones((2, 2, 3, 4), bool))[0]
    assert not np.allclose(out, p)
    # by hand: out = sum_j P_j keep_j / keep_prob v_j
    s = np.einsum("bnid,bjd->bnij", q, k[:, 0])
    P = np.exp(s - s.max(-1, keepdims=True))
    P /= P.sum(-1, keepdims=True)
    want = np.einsum("bnij,bjd->bnid", P * keep / 0.6, v[:, 0])
    np.testing.assert_allclose(out, want, rtol=1e-13)
    with pytest.raises(ValueError, match="dropout_mask"):
        ref.npu_fusion_attention(q, k, v, 2, "BNSD", keep_prob=0.6)
    # TND: list of per-batch blocks == flat concatenation
    qt, kt, vt = rnd(3, 5, 1, 2), rnd(4, 6, 1, 2), rnd(5, 6, 1, 2)
    blocks = [np.random.default_rng(6).random((1, 2, 4)) > 0.5,
              np.random.default_rng(7).random((1, 3, 2)) > 0.5]
    kw = dict(actual_seq_qlen=[2, 5], actual_seq_kvlen=[4, 6], keep_prob=0.5)
    a = ref.npu_fusion_attention(qt, kt, vt, 1, "TND", dropout_mask=blocks, **kw)[0]
    b = ref.npu_fusion_attention(qt, kt, vt, 1, "TND",
                                 dropout_mask=np.concatenate([x.ravel() for x in blocks]), **kw)[0]
    np.testing.assert_array_equal(a, b)


def test_npu_low_precision_dtypes():
    q, k, v = (x.astype(np.float16) for x in (rnd(0, 1, 2, 5, 4), rnd(1, 1, 2, 6, 4),
                                              rnd(2, 1, 2, 6, 4)))
    exact = ref.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.5)
    low = ref.npu_fusion_attention(q, k, v, 2, "BNSD", scale=0.5, compute_dtype=np.float16)
    assert low[0].dtype == np.float16 and low[1].dtype == np.float32
    assert 0 < np.abs(low[0].astype(float) - exact[0]).max() < 1e-2


# --------------------------------------------------------------------------------------------
# NPU backward vs finite differences
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(layout="BNSD", pse_shape=(1, 2, 1, 4)),
    dict(layout="BSND", pse_shape=(2, 2, 3, 4), mode=3),
    dict(layout="BSH", pse_shape=(2, 2, 1, 4), keep_prob=0.7),
    dict(layout="SBH", pse_shape=(1, 2, 3, 4), mode=1, full_row=True),
    dict(layout="BNSD", mode=4, pre=1, nxt=1, sink=True),
    dict(layout="BNSD", mode=1, full_row=True, inner_precise=2, pse_shape=(1, 2, 3, 4)),
])
def test_npu_grad_matches_finite_differences(cfg):
    b, n, nkv, sq, skv, d = 2, 2, 1, 3, 4, 2
    q, k, v = rnd(0, b, n, sq, d), rnd(1, b, nkv, skv, d), rnd(2, b, nkv, skv, d)
    dy = rnd(3, b, n, sq, d)
    layout = cfg["layout"]

    def to_layout(x):
        if layout == "BNSD":
            return np.ascontiguousarray(x)
        if layout == "BSND":
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
        if layout == "BSH":
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3).reshape(x.shape[0], x.shape[2], -1))
        return np.ascontiguousarray(x.transpose(2, 0, 1, 3).reshape(x.shape[2], x.shape[0], -1))

    q, k, v, dy = (to_layout(x) for x in (q, k, v, dy))
    pse = rnd(4, *cfg["pse_shape"]) if "pse_shape" in cfg else None
    mode = cfg.get("mode", 0)
    mask = None
    if mode in (2, 3, 4):
        mask = TRIU_2048
    elif mode in (0, 1):
        mask = np.random.default_rng(5).random((b, 1, sq, skv)) > 0.7
        if cfg.get("full_row"):
            mask[1, 0, 1] = True
    keep_prob = cfg.get("keep_prob", 1.0)
    keep = (np.random.default_rng(6).random((b, n, sq, skv)) > 0.3) if keep_prob < 1 else None
    kw = dict(atten_mask=mask, keep_prob=keep_prob, sparse_mode=mode,
              pre_tockens=cfg.get("pre", 2147483647), next_tockens=cfg.get("nxt", 2147483647),
              inner_precise=cfg.get("inner_precise", 0),
              sink=np.array([0.3, -0.2]) if cfg.get("sink") else None, dropout_mask=keep)

    def loss():
        out = ref.npu_fusion_attention(q, k, v, n, layout, pse, scale=0.8, **kw)[0]
        return float(np.sum(out * dy))

    out, mx, sm = ref.npu_fusion_attention(q, k, v, n, layout, pse, scale=0.8, **kw)[:3]
    dq, dk, dv, dpse = ref.npu_fusion_attention_grad(
        q, k, v, dy, n, layout, pse=pse, softmax_max=mx, softmax_sum=sm, attention_in=out,
        scale_value=0.8, **kw)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    assert_grad(dq, numgrad(loss, q), "dq")
    assert_grad(dk, numgrad(loss, k), "dk")
    assert_grad(dv, numgrad(loss, v), "dv")
    if pse is None:
        assert dpse.shape == (0,)
    else:
        assert dpse.shape == pse.shape
        assert_grad(dpse, numgrad(loss, pse), "dpse")


def test_npu_grad_tnd_with_compressed_pse():
    cols = 4
    slopes = np.array([0.5, 0.2])
    i = np.arange(1024)[:, None]
    c = np.arange(cols)[None, :]
    comp = -slopes[None, :, None, None] * np.abs(c - (cols - 1024 + i))[None, None] \
        + rnd(9, 1, 2, 1024, cols, scale=0.1)          # arbitrary values: any map is testable
    q, k, v, dy = rnd(0, 7, 2, 2), rnd(1, 7, 1, 2), rnd(2, 7, 1, 2), rnd(3, 7, 2, 2)
    kw = dict(atten_mask=TRIU_2048, sparse_mode=2, actual_seq_qlen=[3, 7],
              actual_seq_kvlen=[3, 7], softmax_layout="TND", scale_value=0.9)
    fwd_kw = {key: val for key, val in kw.items() if key != "scale_value"}

    def loss():
        return float(np.sum(ref.npu_fusion_attention(q, k, v, 2, "TND", comp, scale=0.9,
                                                     **fwd_kw)[0] * dy))

    dq, dk, dv, dpse = ref.npu_fusion_attention_grad(q, k, v, dy, 2, "TND", pse=comp, **kw)
    assert_grad(dq, numgrad(loss, q), "dq")
    assert_grad(dk, numgrad(loss, k), "dk")
    assert_grad(dv, numgrad(loss, v), "dv")
    # dpse: only the last rows of the compressed tensor are read for these short sequences
    assert np.all(dpse[:, :, :1024 - 4] == 0)
    sub = comp[:, :, -4:].copy()

    def loss_sub():
        c2 = comp.copy()
        c2[:, :, -4:] = sub
        return float(np.sum(ref.npu_fusion_attention(q, k, v, 2, "TND", c2, scale=0.9,
                                                     **fwd_kw)[0] * dy))

    assert_grad(dpse[:, :, -4:], numgrad(loss_sub, sub), "dpse")


def test_npu_grad_uses_given_statistics():
    q, k, v, dy = rnd(0, 1, 1, 3, 2), rnd(1, 1, 1, 4, 2), rnd(2, 1, 1, 4, 2), rnd(3, 1, 1, 3, 2)
    out, mx, sm = ref.npu_fusion_attention(q, k, v, 1, "BNSD")[:3]
    _, _, dv, _ = ref.npu_fusion_attention_grad(q, k, v, dy, 1, "BNSD", softmax_max=mx,
                                                softmax_sum=sm, attention_in=out)
    _, _, dv2, _ = ref.npu_fusion_attention_grad(q, k, v, dy, 1, "BNSD", softmax_max=mx,
                                                 softmax_sum=2 * sm, attention_in=out)
    np.testing.assert_allclose(dv2, dv / 2, rtol=1e-14)
    # missing statistics are computed by the reference forward
    _, _, dv3, _ = ref.npu_fusion_attention_grad(q, k, v, dy, 1, "BNSD")
    np.testing.assert_allclose(dv3, dv, rtol=1e-14)
