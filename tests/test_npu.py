"""npu_fusion_attention against a naive float64 oracle written from specs/npu_fusion_attention.md.

The oracle (`naive_npu` below) builds every batch's full score matrix and its visible-key and
masked-key matrices straight from the spec's tables (sections 2-5), so it shares no code with the
front-end under test. Tolerance follows flash-attn's rule: the error against float64 may be at
most twice that of the same naive computation in the input precision (P rounded to the input
dtype before P.V, as the NPU does), plus a small absolute term.
"""
import numpy as np
import pytest

import flash_attn_c
from flash_attn_c import bfloat16, npu_flash_attention, npu_fusion_attention

FLT_MAX = float(np.finfo(np.float32).max)
INT32_MAX = 2147483647
DTYPES = [np.float32, np.float16, bfloat16]
LAYOUTS = ["BSH", "SBH", "BSND", "BNSD"]

try:  # the shared tolerance helper, once it lands on main
    from flash_attn_c.testing import assert_attention_close as _shared_close
except ImportError:
    _shared_close = None


# ---- the oracle ---------------------------------------------------------------------------------

def spec_band(mode, sq, sk, pre, nxt, prefix=0):
    """Kept-by-band matrix (sq, sk) of spec section 4 (before the explicit mask)."""
    i = np.arange(sq)[:, None]
    j = np.arange(sk)[None, :]
    lu = j - i
    rd = j - i - (sk - sq)
    if mode == 0:
        return (-pre <= lu) & (lu <= nxt)
    if mode == 1:
        return np.ones((sq, sk), bool)
    if mode == 2:
        return lu <= 0
    if mode == 3:
        return rd <= 0
    if mode == 4:
        return (-pre <= rd) & (rd <= nxt)
    if mode in (5, 6):
        return (rd <= 0) | (j < prefix)
    raise AssertionError(mode)


def naive_npu(qb, kb, vb, scale, band, masked, pse=None, sink=None, invalid=False,
              dtype=np.float64):
    """One batch: q (sq, n, d), k/v (sk, nkv, d). band (sq, sk): keys the kernel visits; masked
    (sq, sk) or (n, sq, sk): -FLT_MAX inside the band. pse (n, sq, sk) or None.

    dtype float64: the exact oracle. A low-precision dtype: scores and softmax in float32, P
    rounded to dtype before P.V (the NPU's order), output rounded to dtype."""
    wide = np.float64 if dtype == np.float64 else np.float32
    rnd = (lambda x: x.astype(dtype).astype(wide)) if dtype != np.float64 else (lambda x: x)
    n, nkv = qb.shape[1], kb.shape[1]
    q = qb.astype(wide).transpose(1, 0, 2)
    k = np.repeat(kb.astype(wide).transpose(1, 0, 2), n // nkv, axis=0)
    v = np.repeat(vb.astype(wide).transpose(1, 0, 2), n // nkv, axis=0)
    s = q @ k.transpose(0, 2, 1)
    if pse is not None:
        s = s + pse.astype(wide)
    s = s * wide(scale)
    s = np.where(masked, wide(-FLT_MAX), s)
    s = np.where(band, s, -np.inf)
    m = s.max(-1, initial=-np.inf)
    if sink is not None:
        m = np.maximum(m, sink.astype(wide)[:, None])
    m_safe = np.where(np.isfinite(m), m, 0)
    e = np.where(band, np.exp(s - m_safe[..., None]), 0)
    l = e.sum(-1)
    if sink is not None:
        l = l + np.exp(sink.astype(wide)[:, None] - m_safe)
    with np.errstate(invalid="ignore", divide="ignore"):
        o = rnd(e) @ v / l[..., None]
    empty = ~band.any(-1) & np.ones_like(l, bool)
    bad = empty | (invalid & (m == wide(-FLT_MAX)))
    o = np.where(bad[..., None], 0, o)
    mx = np.where(empty, -FLT_MAX, m)
    sm = np.where(bad, FLT_MAX, l)
    return rnd(o).transpose(1, 0, 2), mx, sm  # (sq, n, dv), (n, sq), (n, sq)


# ---- layouts ------------------------------------------------------------------------------------

def to_layout(x, layout):
    """Canonical (B, S, N, D) -> the layout, C-contiguous as a user would hold it."""
    b, s, n, d = x.shape
    if layout == "BSND":
        return x.copy()
    if layout == "BNSD":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    if layout == "BSH":
        return x.reshape(b, s, n * d).copy()
    if layout == "SBH":
        return np.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(s, b, n * d)
    raise AssertionError(layout)


def from_layout(o, layout, n):
    if layout == "BSND":
        return o
    if layout == "BNSD":
        return o.transpose(0, 2, 1, 3)
    if layout == "BSH":
        return o.reshape(o.shape[0], o.shape[1], n, -1)
    if layout == "SBH":
        return o.reshape(o.shape[0], o.shape[1], n, -1).transpose(1, 0, 2, 3)
    raise AssertionError(layout)


def rand(rng, shape, dtype, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(dtype)


def qkv(rng, q_shape, kv_shape, dtype):
    return rand(rng, q_shape, dtype), rand(rng, kv_shape, dtype), rand(rng, kv_shape, dtype)


def check_close(actual, exact, lowp, dtype, what="out"):
    actual = np.asarray(actual, np.float64)
    assert np.isfinite(actual).all(), f"{what}: non-finite values"
    if _shared_close is not None and dtype != np.float32:
        _shared_close(actual, exact, reference_low_precision=lowp)
        return
    eps = float(np.finfo(np.float32).eps if dtype == np.float32 else
                np.finfo(np.float16).eps if dtype == np.float16 else 2.0 ** -8)
    base = float(np.abs(np.asarray(lowp, np.float64) - exact).max(initial=0))
    err = float(np.abs(actual - exact).max(initial=0))
    tol = 2 * base + 2 * eps * max(1.0, float(np.abs(exact).max(initial=0)))
    assert err <= tol, f"{what}: max error {err:.3g} > tolerance {tol:.3g} ({dtype.__name__})"


def check_stats(smax, ssum, mx, sm):
    """Returned [.., 8] statistics against the oracle's (n, sq) per batch (all 8 lanes equal)."""
    assert (smax == smax[..., :1]).all() and (ssum == ssum[..., :1]).all()
    np.testing.assert_allclose(smax[..., 0], mx, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(ssum[..., 0], sm, rtol=2e-5, atol=2e-5)


# ---- fixed-length grid ------------------------------------------------------------------------

def _mask_for(rng, mode, b, n, sq, sk, shape_kind):
    """(argument, per-batch masked (b, n|1, sq, sk) bool)."""
    if mode in (2, 3, 4):
        return np.triu(np.ones((2048, 2048), bool), 1), np.zeros((b, 1, sq, sk), bool)
    if mode == 6:
        m = np.zeros((3072, 2048), bool)
        m[:2048] = np.triu(np.ones((2048, 2048), bool), 1)
        m[2048:, 1024:] = True
        return m, np.zeros((b, 1, sq, sk), bool)
    shape = {"BNSS": (b, n, sq, sk), "B1SS": (b, 1, sq, sk), "11SS": (1, 1, sq, sk),
             "SS": (sq, sk)}[shape_kind]
    m = rng.random(shape) < 0.3
    m4 = m if m.ndim == 4 else m[None, None]
    full = np.broadcast_to(m4, (b, m4.shape[1], sq, sk))
    return m, full


def _auto_invalid(mode, sq, sk, pre, nxt):
    if mode == 3:
        return sq > sk
    if mode == 0:
        return pre < sq - sk or nxt < 0
    if mode == 4:
        return pre < 0 or nxt < sq - sk
    return False


CASES = [  # (mode, sq, sk, pre, next, mask shape)
    (0, 37, 53, INT32_MAX, INT32_MAX, "BNSS"),
    (0, 37, 53, 5, 9, "SS"),
    (0, 40, 33, 3, -2, "B1SS"),
    (1, 37, 53, 1, 1, "11SS"),
    (2, 37, 53, 0, 0, None),
    (3, 53, 37, 0, 0, None),
    (3, 37, 53, 0, 0, None),
    (4, 37, 53, 7, 4, None),
    (4, 45, 40, 2, -1, None),
    (5, 30, 41, 0, 0, "BNSS"),
    (6, 41, 30, 0, 0, None),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fixed_layouts_modes(case, layout, dtype):
    mode, sq, sk, pre, nxt, mshape = CASES[case]
    rng = np.random.default_rng(case * 31 + LAYOUTS.index(layout))
    b, n, nkv, d = 2, 4, (4, 2, 1)[case % 3], 16
    scale = d ** -0.5
    q, k, v = qkv(rng, (b, sq, n, d), (b, sk, nkv, d), dtype)
    marg, mfull = _mask_for(rng, mode, b, n, sq, sk, mshape)
    prefix = [int(x) for x in rng.integers(max(sk - sq, 0), sk + 1, b)] if mode in (5, 6) else None
    res = npu_fusion_attention(to_layout(q, layout), to_layout(k, layout), to_layout(v, layout), n,
                               layout, atten_mask=marg, scale=scale, pre_tockens=pre,
                               next_tockens=nxt, sparse_mode=mode, prefix=prefix)
    out, smax, ssum, sout, seed, offset, numels = res
    assert out.dtype == dtype and out.flags.c_contiguous and out.shape == to_layout(q, layout).shape
    assert smax.shape == (b, n, sq, 8) and smax.dtype == np.float32 and sout.size == 0
    assert (seed, offset, numels) == (0, 0, b * n * sq * sk)
    got = from_layout(out, layout, n)
    invalid = _auto_invalid(mode, sq, sk, pre, nxt)
    for bi in range(b):
        band = spec_band(mode, sq, sk, pre, nxt, prefix[bi] if prefix else 0)
        masked = mfull[bi] & band if mode in (0, 1, 5) else np.zeros_like(band)
        ex = naive_npu(q[bi], k[bi], v[bi], scale, band, masked, invalid=invalid)
        lp = naive_npu(q[bi], k[bi], v[bi], scale, band, masked, invalid=invalid, dtype=dtype)
        check_close(got[bi], ex[0], lp[0], dtype)
        check_stats(smax[bi], ssum[bi], ex[1], ex[2])


# ---- TND ----------------------------------------------------------------------------------------

def _tnd_data(rng, lq, lk, n, nkv, d, dtype, extra_rows=0):
    q = rand(rng, (sum(lq) + extra_rows, n, d), dtype)
    k = rand(rng, (sum(lk) + extra_rows, nkv, d), dtype)
    v = rand(rng, (sum(lk) + extra_rows, nkv, d), dtype)
    return q, k, v, np.cumsum([0] + list(lq)), np.cumsum([0] + list(lk))


def _tnd_band(mode, b, lq, lk, pre, nxt, prefix):
    live = [i for i in range(len(lq)) if lq[i]]
    sq, sk = lq[b], lk[b]
    if mode == 7:
        m = spec_band(3, sq, sk, 0, 0)
        if b == live[-1]:  # RD: j - i - (Skv - Sq) <= next
            m = (np.arange(sk)[None] - np.arange(sq)[:, None] - (sk - sq)) <= nxt
        return m
    if mode == 8:
        if b == live[0]:  # LU: j - i <= Skv - max(Sq - next, 0)
            return (np.arange(sk)[None] - np.arange(sq)[:, None]) <= sk - max(sq - nxt, 0)
        return spec_band(2, sq, sk, 0, 0)
    return spec_band(mode, sq, sk, pre, nxt, prefix[b] if prefix else 0)


TND_CASES = [  # (mode, lq, lk, pre, next)
    (0, (5, 0, 9, 4), (7, 3, 9, 6), 3, 2),
    (1, (5, 8, 3), (7, 8, 6), INT32_MAX, INT32_MAX),
    (2, (6, 9, 3), (4, 9, 7), 0, 0),
    (3, (5, 8, 3), (7, 8, 6), 0, 0),
    (4, (5, 8, 3), (7, 8, 6), 4, 1),
    (6, (5, 8, 3), (7, 8, 6), 0, 0),
    (6, (5, 9, 3), (7, 6, 6), 0, 0),  # batch 1: Sq > Skv with prefix 0, rows without keys
    (7, (5, 8, 3, 0), (7, 8, 6, 0), 9, -2),
    (8, (0, 5, 8, 3), (0, 7, 8, 6), 9, 1),
]


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("case", range(len(TND_CASES)))
def test_tnd_modes(case, dtype, softmax_layout):
    mode, lq, lk, pre, nxt = TND_CASES[case]
    rng = np.random.default_rng(100 + case)
    n, nkv, d = 4, (2, 4)[case % 2], 8
    q, k, v, cq, ck = _tnd_data(rng, lq, lk, n, nkv, d, dtype, extra_rows=2)
    scale = 0.4
    if mode in (0, 1):
        marg = rng.random((max(lq), max(lk))) < 0.25
    elif mode == 6:
        marg = np.zeros((3072, 2048), np.uint8)
    else:
        marg = np.triu(np.ones((2048, 2048), np.uint8), 1)
    prefix = None
    if mode == 6:
        prefix = [max(lk[i] - lq[i], 0) + 1 if lq[i] <= lk[i] else 0 for i in range(len(lq))]
    out, smax, ssum, _, _, _, numels = npu_fusion_attention(
        q, k, v, n, "TND", atten_mask=marg, scale=scale, pre_tockens=pre, next_tockens=nxt,
        sparse_mode=mode, prefix=prefix, actual_seq_qlen=list(cq[1:]),
        actual_seq_kvlen=list(ck[1:]), softmax_layout=softmax_layout)
    assert out.shape == q.shape and smax.shape == (q.shape[0], n, 8)
    assert numels == n * sum(a * c for a, c in zip(lq, lk))
    assert (out[cq[-1]:] == 0).all() and (smax[cq[-1]:] == 0).all()
    flat = smax.reshape(-1), ssum.reshape(-1)
    for b in range(len(lq)):
        if lq[b] == 0:
            continue
        qa, qb, ka, kb = cq[b], cq[b + 1], ck[b], ck[b + 1]
        band = _tnd_band(mode, b, lq, lk, pre, nxt, prefix)
        masked = (marg[: lq[b], : lk[b]].astype(bool) & band) if mode in (0, 1) else np.zeros_like(band)
        args = (q[qa:qb], k[ka:kb], v[ka:kb], scale, band, masked)
        ex, lp = naive_npu(*args), naive_npu(*args, dtype=dtype)
        check_close(out[qa:qb], ex[0], lp[0], dtype)
        if softmax_layout == "TND":
            bm, bs = smax[qa:qb].transpose(1, 0, 2), ssum[qa:qb].transpose(1, 0, 2)
        else:
            bm, bs = (f[8 * n * qa: 8 * n * qb].reshape(n, qb - qa, 8) for f in flat)
        check_stats(bm, bs, ex[1], ex[2])


def test_tnd_block_diagonal_mask_and_per_batch_pse():
    rng = np.random.default_rng(7)
    lq = lk = (6, 9, 4)
    n, d = 2, 8
    q, k, v, cq, ck = _tnd_data(rng, lq, lk, n, n, d, np.float32)
    big = rng.random((cq[-1], ck[-1])) < 0.3
    slopes = rng.random((3, n)) + 0.1
    rows = np.arange(1024)[:, None] + (max(lk) - 1024)
    comp = -slopes[:, :, None, None] * np.abs(np.arange(max(lk))[None, :] - rows)  # Toeplitz rows
    comp = comp.astype(np.float32)
    out = npu_fusion_attention(q, k, v, n, "TND", pse=comp, atten_mask=big, scale=0.5,
                               actual_seq_qlen=list(cq[1:]), actual_seq_kvlen=list(ck[1:]))[0]
    for b in range(3):
        qa, qb, ka, kb = cq[b], cq[b + 1], ck[b], ck[b + 1]
        i, j = np.arange(lq[b])[:, None], np.arange(lk[b])[None]
        pse = np.where(j <= i, -slopes[b][:, None, None] * np.abs(j - i), 0.0)
        band = np.ones((lq[b], lk[b]), bool)
        ex = naive_npu(q[qa:qb], k[ka:kb], v[ka:kb], 0.5, band, big[qa:qb, ka:kb], pse=pse)
        lp = naive_npu(q[qa:qb], k[ka:kb], v[ka:kb], 0.5, band, big[qa:qb, ka:kb], pse=pse, dtype=np.float32)
        check_close(out[qa:qb], ex[0], lp[0], np.float32)


# ---- pse ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("kind", ["BNSS", "1NSS", "BN1S", "1N1S"])
def test_pse_shapes(kind, dtype):
    rng = np.random.default_rng(3)
    b, n, sq, sk, d = 2, 3, 19, 29, 16
    q, k, v = qkv(rng, (b, sq, n, d), (b, sk, n, d), dtype)
    shape = {"BNSS": (b, n, sq, sk), "1NSS": (1, n, sq, sk), "BN1S": (b, n, 1, sk),
             "1N1S": (1, n, 1, sk)}[kind]
    pse = rand(rng, shape, dtype, 2.0)
    out, smax, ssum = npu_fusion_attention(to_layout(q, "BNSD"), to_layout(k, "BNSD"),
                                           to_layout(v, "BNSD"), n, "BNSD", pse=pse, scale=0.25)[:3]
    full = np.broadcast_to(pse, (b, n, sq, sk))
    band = np.ones((sq, sk), bool)
    for bi in range(b):
        args = (q[bi], k[bi], v[bi], 0.25, band, np.zeros_like(band))
        ex = naive_npu(*args, pse=full[bi])
        lp = naive_npu(*args, pse=full[bi], dtype=dtype)
        check_close(out[bi].transpose(1, 0, 2), ex[0], lp[0], dtype)
        check_stats(smax[bi], ssum[bi], ex[1], ex[2])


@pytest.mark.parametrize("mode", [0, 2, 3])
def test_pse_alibi_compressed(mode):
    """[B, N, 1024, S] = the last 1024 rows of a Toeplitz pse; added only on/below the diagonal."""
    rng = np.random.default_rng(11)
    b, n, s, d = 1, 2, 1100, 8
    q, k, v = (rand(rng, (b, s, n, d), np.float32) for _ in range(3))
    slopes = np.array([0.5, 0.125])
    i, j = np.arange(s)[:, None], np.arange(s)[None]
    full = (-slopes[:, None, None] * np.abs(j - i)).astype(np.float32)  # (n, s, s) Toeplitz
    comp = np.ascontiguousarray(full[None, :, -1024:, :])
    mask = np.triu(np.ones((s, s), bool), 1) if mode == 0 else np.triu(np.ones((2048, 2048), bool), 1)
    out = npu_fusion_attention(q, k, v, n, "BSND", pse=comp, atten_mask=mask, scale=0.3,
                               sparse_mode=mode)[0]
    band = j <= i
    ex = naive_npu(q[0], k[0], v[0], 0.3, band, np.zeros_like(band), pse=full)
    lp = naive_npu(q[0], k[0], v[0], 0.3, band, np.zeros_like(band), pse=full, dtype=np.float32)
    check_close(out[0], ex[0], lp[0], np.float32)


# ---- equivalences -------------------------------------------------------------------------------

@pytest.mark.parametrize("sq,sk", [(37, 53), (53, 37), (3000, 3000)])
def test_mode3_is_flash_attn_causal(sq, sk):
    rng = np.random.default_rng(5)
    n, d = (4, 16) if sq < 1000 else (1, 8)
    q, k, v = qkv(rng, (2, sq, n, d), (2, sk, 2 if n > 1 else 1, d), np.float32)
    mask = np.triu(np.ones((2048, 2048), bool), 1)
    out = npu_fusion_attention(q, k, v, n, "BSND", atten_mask=mask, scale=0.2, sparse_mode=3)[0]
    ref = flash_attn_c.flash_attn_func(q, k, v, softmax_scale=0.2, causal=True)
    np.testing.assert_array_equal(out, ref)


def test_tnd_is_varlen():
    rng = np.random.default_rng(6)
    lq, lk = (5, 17, 9), (8, 17, 12)
    q, k, v, cq, ck = _tnd_data(rng, lq, lk, 4, 2, 16, np.float32)
    mask = np.triu(np.ones((2048, 2048), bool), 1)
    out = npu_fusion_attention(q, k, v, 4, "TND", atten_mask=mask, scale=0.25, sparse_mode=3,
                               actual_seq_qlen=cq[1:].tolist(), actual_seq_kvlen=ck[1:].tolist())[0]
    ref = flash_attn_c.flash_attn_varlen_func(q, k, v, cq.astype(np.int32), ck.astype(np.int32),
                                              max(lq), max(lk), softmax_scale=0.25, causal=True)
    np.testing.assert_array_equal(out, ref)


def test_bsh_sbh_bnsd_equal_bsnd():
    rng = np.random.default_rng(8)
    q, k, v = qkv(rng, (2, 21, 6, 8), (2, 30, 3, 8), np.float16)
    ref = npu_fusion_attention(q, k, v, 6, "BSND", scale=0.3)
    for layout in ("BSH", "SBH", "BNSD"):
        res = npu_fusion_attention(to_layout(q, layout), to_layout(k, layout), to_layout(v, layout),
                                   6, layout.lower(), scale=0.3)
        np.testing.assert_array_equal(from_layout(res[0], layout, 6), ref[0])
        np.testing.assert_array_equal(res[1], ref[1])


@pytest.mark.parametrize("sq,sk,pre,nxt", [(30, 30, 4, 2), (30, 41, 3, 5), (41, 30, 0, 6)])
def test_mode0_band_equals_mode4(sq, sk, pre, nxt):
    """Mode 4 (pre, next) right-down == mode 0 left-up with (pre + Sq - Skv, next + Skv - Sq)."""
    rng = np.random.default_rng(9)
    q, k, v = qkv(rng, (1, sq, 2, 8), (1, sk, 2, 8), np.float32)
    r4 = npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=np.ones((2048, 2048), bool),
                              pre_tockens=pre, next_tockens=nxt, sparse_mode=4)
    r0 = npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=np.zeros((sq, sk), bool),
                              pre_tockens=pre + sq - sk, next_tockens=nxt + sk - sq, sparse_mode=0)
    np.testing.assert_array_equal(r4[0], r0[0])
    np.testing.assert_array_equal(r4[1], r0[1])


def test_legacy_alias():
    rng = np.random.default_rng(10)
    q, k, v = (rand(rng, (1, 9, 2, 8), np.float32) for _ in range(3))
    for a, b in zip(npu_flash_attention(q, k, v, 2, "BSND", scale=0.5),
                    npu_fusion_attention(q, k, v, 2, "BSND", scale=0.5)):
        np.testing.assert_array_equal(a, b)


# ---- the spec's worked 4 x 6 example ---------------------------------------------------------

WORKED = {
    "mode 2": (2, 4, 6, 0, 0, "011111 001111 000111 000011"),
    "mode 3": (3, 4, 6, 0, 0, "000111 000011 000001 000000"),
    "mode 4 pre=1 next=0": (4, 4, 6, 1, 0, "100111 110011 111001 111100"),
    "mode 0 pre=1 next=0": (0, 4, 6, 1, 0, "011111 001111 100111 110011"),
    "mode 4 pre=2 next=-1": (4, 4, 6, 2, -1, "001111 100111 110011 111001"),
    "mode 5 prefix 4": (5, 4, 6, 0, 0, "000011 000011 000001 000000"),
    "mode 6 prefix 4": (6, 4, 6, 0, 0, "000011 000011 000001 000000"),
    "mode 3 Sq=6 Skv=4": (3, 6, 4, 0, 0, "1111 1111 0111 0011 0001 0000"),
}


@pytest.mark.parametrize("name", list(WORKED))
def test_worked_example(name):
    """Recover the visible keys: q = 0 makes every score equal, v = identity tags each key, so
    out[i, j] > 0 iff row i sees key j (and an invalid row is all 0)."""
    mode, sq, sk, pre, nxt, want = WORKED[name]
    q = np.zeros((1, sq, 1, sk), np.float32)
    k = np.random.default_rng(0).standard_normal((1, sk, 1, sk)).astype(np.float32)
    v = np.eye(sk, dtype=np.float32)[None, :, None, :]
    mask = {0: np.zeros((sq, sk), bool), 5: np.zeros((sq, sk), bool),
            6: np.zeros((3072, 2048), bool)}.get(mode, np.ones((2048, 2048), bool))
    out = npu_fusion_attention(q, k, v, 1, "BSND", atten_mask=mask, pre_tockens=pre,
                               next_tockens=nxt, sparse_mode=mode, prefix=[4])[0][0, :, 0]
    got = " ".join("".join("0" if x > 0 else "1" for x in row) for row in out)
    assert got == want


# ---- fully masked rows, invalid lines, sink, dropout, Dv < Dk --------------------------------------

def test_fully_masked_rows():
    rng = np.random.default_rng(12)
    q, k, v = (rand(rng, (1, 6, 2, 8), np.float32) for _ in range(3))
    mask = np.zeros((6, 6), bool)
    mask[2] = True
    out, smax, ssum = npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=mask, sparse_mode=1)[:3]
    np.testing.assert_allclose(out[0, 2], v[0].mean(0), rtol=1e-5, atol=1e-6)  # mean of V, no NaN
    assert (smax[0, :, 2] == -FLT_MAX).all() and (ssum[0, :, 2] == 6).all()
    out, smax, ssum = npu_fusion_attention(q, k, v, 2, "BSND", atten_mask=mask, sparse_mode=1,
                                           inner_precise=2)[:3]
    assert (out[0, 2] == 0).all() and (ssum[0, :, 2] == FLT_MAX).all() and (smax[0, :, 2] == -FLT_MAX).all()
    assert (out[0, 3] != 0).any()


def test_mode3_sq_gt_skv_invalid_rows():
    rng = np.random.default_rng(13)
    q, k, v = qkv(rng, (1, 9, 1, 8), (1, 5, 1, 8), np.float32)
    out, smax, ssum = npu_fusion_attention(q, k, v, 1, "BSND", atten_mask=np.ones((2048, 2048), bool),
                                           sparse_mode=3)[:3]
    assert (out[0, :4] == 0).all() and (out[0, 4:] != 0).all()
    assert (smax[0, 0, :4] == -FLT_MAX).all() and (ssum[0, 0, :4] == FLT_MAX).all()


def test_no_mask_means_full_attention():
    rng = np.random.default_rng(14)
    q, k, v = (rand(rng, (1, 7, 2, 8), np.float32) for _ in range(3))
    full = npu_fusion_attention(q, k, v, 2, "BSND")[0]
    for mode in (2, 3, 4):
        got = npu_fusion_attention(q, k, v, 2, "BSND", sparse_mode=mode, pre_tockens=-1,
                                   next_tockens=-1)[0]
        np.testing.assert_array_equal(got, full)


def test_sink():
    rng = np.random.default_rng(15)
    q, k, v = (rand(rng, (2, 11, 3, 8), np.float32) for _ in range(3))
    sink = np.array([0.5, -1.0, 2.0], np.float32)
    out, smax, ssum = npu_fusion_attention(q, k, v, 3, "BSND", scale=0.3, sink=sink)[:3]
    band = np.ones((11, 11), bool)
    for b in range(2):
        ex = naive_npu(q[b], k[b], v[b], 0.3, band, np.zeros_like(band), sink=sink)
        lp = naive_npu(q[b], k[b], v[b], 0.3, band, np.zeros_like(band), sink=sink, dtype=np.float32)
        check_close(out[b], ex[0], lp[0], np.float32)
        check_stats(smax[b], ssum[b], ex[1], ex[2])


def test_value_head_dim_smaller():
    rng = np.random.default_rng(16)
    q, k = rand(rng, (2, 10, 4, 16), np.float32), rand(rng, (2, 12, 2, 16), np.float32)
    v = rand(rng, (2, 12, 2, 8), np.float32)
    out = npu_fusion_attention(to_layout(q, "BSH"), to_layout(k, "BSH"), to_layout(v, "BSH"), 4,
                               "BSH", scale=0.25)[0]
    assert out.shape == (2, 10, 32) and out.flags.c_contiguous
    band = np.ones((10, 12), bool)
    for b in range(2):
        ex = naive_npu(q[b], k[b], v[b], 0.25, band, np.zeros_like(band))
        lp = naive_npu(q[b], k[b], v[b], 0.25, band, np.zeros_like(band), dtype=np.float32)
        check_close(from_layout(out, "BSH", 4)[b], ex[0], lp[0], np.float32)


def test_strided_inputs_are_not_copied_into_wrong_values():
    rng = np.random.default_rng(17)
    big = rand(rng, (2, 4, 20, 32), np.float32)  # BNSD views with strided seq and head dims
    q, k, v = big[:, :, ::2, :8], big[:, ::2, 1::2, 8:16], big[:, 1::2, 1::2, 16:24]
    out = npu_fusion_attention(q, k, v, 4, "BNSD", scale=0.4)[0]
    ref = npu_fusion_attention(*(np.ascontiguousarray(x) for x in (q, k, v)), 4, "BNSD", scale=0.4)[0]
    np.testing.assert_array_equal(out, ref)


def test_dropout_keying_and_replay():
    """keep_prob < 1 draws (seed, offset) from the global generator; the mask is Philox keyed by
    (seed, offset, b * N + h, i, j), the same stream flash_attn_fwd replays from rng_state."""
    rng = np.random.default_rng(18)
    q, k, v = (rand(rng, (2, 13, 3, 8), np.float32) for _ in range(3))
    flash_attn_c.manual_seed(1234)
    out, smax, ssum, _, seed, offset, numels = npu_fusion_attention(q, k, v, 3, "BSND", scale=0.3,
                                                                     keep_prob=0.7)
    assert (seed, offset, numels) == (1234, 0, 2 * 3 * 13 * 13)
    ref, _, _ = flash_attn_c.flash_attn_fwd(q, k, v, dropout_p=0.3, softmax_scale=0.3,
                                            seed=np.array([seed, offset], np.int64))
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6)
    nodrop = npu_fusion_attention(q, k, v, 3, "BSND", scale=0.3)
    np.testing.assert_array_equal(smax, nodrop[1])  # statistics are taken before dropout
    again = npu_fusion_attention(q, k, v, 3, "BSND", scale=0.3, keep_prob=0.7)
    assert again[5] == 1 and not np.array_equal(again[0], out)


def test_tnd_numels_and_trailing_zeros():
    rng = np.random.default_rng(19)
    q, k, v = (rand(rng, (12, 2, 8), np.float32) for _ in range(3))
    res = npu_fusion_attention(q, k, v, 2, "TND", actual_seq_qlen=[2, 5, 9, 0, 0],
                               actual_seq_kvlen=[2, 5, 9, 0, 0])
    assert res[6] == 2 * (2 * 2 + 3 * 3 + 4 * 4 + 81 + 0)  # torch_npu's unclamped formula
    assert (res[0][9:] == 0).all()


# ---- errors -------------------------------------------------------------------------------------

def _qkv(layout="BSND"):
    rng = np.random.default_rng(20)
    shape = {"BSND": (2, 8, 4, 16), "BNSD": (2, 4, 8, 16), "BSH": (2, 8, 64), "SBH": (8, 2, 64),
             "TND": (16, 4, 16)}[layout]
    return tuple(rand(rng, shape, np.float32) for _ in range(3))


ERRORS = [
    (ValueError, "input_layout", dict(input_layout="BSD")),
    (TypeError, "input_layout", dict(input_layout=3)),
    (ValueError, "head_num", dict(head_num=3)),
    (ValueError, "head_num", dict(head_num=0)),
    (ValueError, "keep_prob", dict(keep_prob=0.0)),
    (ValueError, "keep_prob", dict(keep_prob=1.5)),
    (ValueError, "sparse_mode", dict(sparse_mode=7)),
    (ValueError, "sparse_mode", dict(sparse_mode=9)),
    (ValueError, "inner_precise", dict(inner_precise=3)),
    (ValueError, "softmax_layout", dict(softmax_layout="TND")),
    (ValueError, "softmax_layout", dict(softmax_layout="BSH")),
    (NotImplementedError, "padding_mask", dict(padding_mask=np.zeros((2, 8), bool))),
    (TypeError, "atten_mask", dict(atten_mask=np.zeros((8, 8), np.float32))),
    (ValueError, "atten_mask", dict(atten_mask=np.zeros((8, 9), bool))),
    (ValueError, "atten_mask", dict(atten_mask=np.zeros((2, 2, 8, 8), bool))),
    (ValueError, "atten_mask", dict(atten_mask=np.zeros((8, 8), bool), sparse_mode=3)),
    (ValueError, "atten_mask", dict(atten_mask=np.zeros((2048, 2048), bool), sparse_mode=6, prefix=[8, 8])),
    (ValueError, "atten_mask", dict(atten_mask=np.zeros((1, 1, 8, 8), bool), sparse_mode=5, prefix=[8, 8])),
    (ValueError, "tockens", dict(atten_mask=np.zeros((8, 8), bool), pre_tockens=-1, next_tockens=-2)),
    (ValueError, "next_tockens", dict(atten_mask=np.zeros((8, 8), bool), pre_tockens=1, next_tockens=-3)),
    (ValueError, "no valid data block", dict(atten_mask=np.zeros((2048, 2048), bool), sparse_mode=4,
                                             pre_tockens=-9, next_tockens=20)),
    (ValueError, "prefix", dict(atten_mask=np.zeros((2048, 3072), bool).T, sparse_mode=6)),
    (ValueError, "prefix", dict(atten_mask=np.zeros((3072, 2048), bool), sparse_mode=6, prefix=[8])),
    (ValueError, "prefix", dict(atten_mask=np.zeros((3072, 2048), bool), sparse_mode=6, prefix=[8, 9])),
    (ValueError, "actual_seq", dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[8, 16])),
    (ValueError, "pse", dict(pse=np.zeros((2, 4, 8, 9), np.float32))),
    (TypeError, "pse", dict(pse=np.zeros((2, 4, 8, 8), np.float16))),
    (ValueError, "pse", dict(pse=np.zeros((2, 4, 1024, 8), np.float32))),
    (ValueError, "sink", dict(sink=np.zeros(3, np.float32))),
    (TypeError, "scale", dict(scale="1")),
]


@pytest.mark.parametrize("exc,words,kw", ERRORS, ids=[f"{e[1]}-{i}" for i, e in enumerate(ERRORS)])
def test_errors(exc, words, kw):
    q, k, v = _qkv()
    args = dict(head_num=4, input_layout="BSND")
    args.update(kw)
    with pytest.raises(exc, match=words):
        npu_fusion_attention(q, k, v, **args)


def test_errors_shapes():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="query: input_layout BSND expects 4 dims"):
        npu_fusion_attention(q[0], k, v, 4, "BSND")
    with pytest.raises(ValueError, match="multiple"):  # Nq % Nkv != 0
        npu_fusion_attention(q, k[:, :, :3], v[:, :, :3], 4, "BSND")
    with pytest.raises(ValueError, match="hidden size"):
        npu_fusion_attention(*_qkv("BSH"), 5, "BSH")
    with pytest.raises(TypeError, match="key"):
        npu_fusion_attention(q, k.astype(np.float16), v, 4, "BSND")
    with pytest.raises(ValueError, match="batch"):
        npu_fusion_attention(q, k[:1], v[:1], 4, "BSND")
    with pytest.raises(ValueError, match="head dim"):
        npu_fusion_attention(q, k, np.concatenate([v, v], -1), 4, "BSND")


def test_errors_tnd():
    q, k, v = _qkv("TND")
    mask = np.triu(np.ones((2048, 2048), bool), 1)
    cases = [
        (dict(), "required"),
        (dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[16]), "entries"),
        (dict(actual_seq_qlen=[8, 20], actual_seq_kvlen=[8, 16]), "T = 16"),
        (dict(actual_seq_qlen=[8, 4], actual_seq_kvlen=[8, 16]), "cumulative"),
        (dict(actual_seq_qlen=[], actual_seq_kvlen=[]), "non-empty"),
        (dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[8, 8]), "no keys"),
        (dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[4, 16], atten_mask=mask, sparse_mode=3),
         "Sq=8 > Skv=4"),
        (dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[8, 16], atten_mask=mask, sparse_mode=5),
         "sparse_mode"),
        (dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[8, 16], atten_mask=mask, sparse_mode=7,
              pre_tockens=8, next_tockens=1), "next_tockens"),
        (dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[8, 16], atten_mask=np.zeros((8, 8), bool),
              pre_tockens=5, next_tockens=-1), "next_tockens"),
        (dict(actual_seq_qlen=[8, 16], actual_seq_kvlen=[8, 16],
              pse=np.zeros((1, 4, 8, 8), np.float32)), "alibi"),
    ]
    for kw, words in cases:
        with pytest.raises(ValueError, match=words):
            npu_fusion_attention(q, k, v, 4, "TND", **kw)
    with pytest.raises(ValueError, match="only valid with input_layout TND"):
        npu_fusion_attention(*_qkv(), 4, "BSND", actual_seq_qlen=[8], actual_seq_kvlen=[8])


# ---- against flash_attn_c.reference (the shared naive oracle) -----------------------------------
#
# The cases include the spec's corners: rows whose band keys are all masked (V averaged over the
# band, spec section 2 "visited columns"), rows of prefix modes 5/6 whose band is empty (output
# 0), and TND masks read block-diagonally ([Tq, Tkv], [sum Sq, sum Skv]) or top-left.

from flash_attn_c import reference, testing  # noqa: E402


def _ref_pair(*args, **kw):
    exact = reference.npu_fusion_attention(*args, **kw)
    dtype = np.asarray(args[0]).dtype
    low = reference.npu_fusion_attention(*args, **kw, compute_dtype=dtype)
    return exact, low


def _check_against_reference(args, kw):
    """Output, softmax_max, softmax_sum and numels of ours against the reference's."""
    got = npu_fusion_attention(*args, **kw)
    exact, low = _ref_pair(*args, **kw)
    testing.assert_attention_close(got[0], exact[0], reference_low_precision=low[0])
    np.testing.assert_allclose(got[1], exact[1], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(got[2], exact[2], rtol=2e-5, atol=2e-5)
    assert got[6] == exact[6]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: np.dtype(t).name)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_fixed_against_reference(case, layout, dtype):
    mode, sq, sk, pre, nxt, mshape = CASES[case]
    rng = np.random.default_rng(500 + case)
    b, n, nkv, d = 2, 4, (1, 2, 4)[case % 3], 8
    q, k, v = qkv(rng, (b, sq, n, d), (b, sk, nkv, d), dtype)
    marg, _ = _mask_for(rng, mode, b, n, sq, sk, mshape)
    if mode in (0, 1, 5):
        marg = rng.random(marg.shape) < 0.1
        marg[..., 3, :] = True  # every band key of row 3 masked: V averaged over the band
    prefix = None
    if mode in (5, 6):  # prefix 0 with Sq > Skv: the top rows see no key (output 0)
        rest = rng.integers(max(sk - sq, 0), sk + 1, b - 1)
        prefix = [0 if sq > sk else sk - sq] + [int(x) for x in rest]
    pse = rand(rng, (1, n, 1, sk), dtype) if case % 2 else None
    args = tuple(to_layout(x, layout) for x in (q, k, v)) + (n, layout)
    kw = dict(atten_mask=marg, scale=d ** -0.5, pre_tockens=pre, next_tockens=nxt,
              sparse_mode=mode, prefix=prefix, pse=pse)
    _check_against_reference(args, kw)


@pytest.mark.parametrize("softmax_layout", ["", "TND"])
@pytest.mark.parametrize("case", range(len(TND_CASES)))
def test_tnd_against_reference(case, softmax_layout):
    mode, lq, lk, pre, nxt = TND_CASES[case]
    rng = np.random.default_rng(600 + case)
    dtype = DTYPES[case % 3]
    q, k, v, cq, ck = _tnd_data(rng, lq, lk, 4, 2, 8, dtype, extra_rows=3)
    if mode == 0:  # top-left window of a [maxSq, maxSkv] mask
        marg = rng.random((max(lq), max(lk))) < 0.1
    elif mode == 1:  # block-diagonal: [Tq, Tkv] or [sum Sq, sum Skv]
        shape = (q.shape[0], k.shape[0]) if softmax_layout else (sum(lq), sum(lk))
        marg = rng.random(shape) < 0.1
    else:
        marg = np.zeros((3072, 2048) if mode == 6 else (2048, 2048), bool)
    if mode in (0, 1):
        marg[1] = True  # every band key of a row masked: V averaged over the band
    prefix = [max(lk[i] - lq[i], 0) for i in range(len(lq))] if mode == 6 else None
    sink = rng.standard_normal(4).astype(np.float32) if case % 2 else None
    args = (q, k, v, 4, "TND")
    kw = dict(atten_mask=marg, scale=0.35, pre_tockens=pre, next_tockens=nxt, sparse_mode=mode,
              prefix=prefix, actual_seq_qlen=cq[1:].tolist(), actual_seq_kvlen=ck[1:].tolist(),
              softmax_layout=softmax_layout, sink=sink)
    _check_against_reference(args, kw)


ROWS_WITHOUT_KEYS = [  # (sparse_mode, sq, sk, extra arguments): rows with nothing to attend to
    (0, 9, 12, dict(pre_tockens=2, next_tockens=1)),   # row 4: band keys all masked
    (0, 12, 9, dict(pre_tockens=2, next_tockens=1)),   # pre < Sq - Skv: automatic invalid lines
    (3, 12, 9, dict()),                                # right-down causal, Sq > Skv: empty rows
    (5, 12, 9, dict(prefix=[0, 4])),                   # batch 0: empty rows, row 4 all masked
    (6, 12, 9, dict(prefix=[0, 4])),                   # batch 0: empty rows
]


@pytest.mark.parametrize("inner_precise", [0, 2])
@pytest.mark.parametrize("with_sink", [False, True])
@pytest.mark.parametrize("case", range(len(ROWS_WITHOUT_KEYS)))
def test_rows_without_keys_against_reference(case, with_sink, inner_precise):
    """Band keys all masked: V averaged over the band (0 in invalid-line mode); no band key: 0.
    Statistics -FLT_MAX / band size / FLT_MAX, or the sink's own (sink, 1)."""
    mode, sq, sk, extra = ROWS_WITHOUT_KEYS[case]
    rng = np.random.default_rng(650 + case)
    q, k, v = qkv(rng, (2, sq, 2, 8), (2, sk, 2, 8), np.float32)
    if mode in (0, 5):
        mask = rng.random((2, 1, sq, sk)) < 0.2
        mask[:, :, 4] = True
    else:
        mask = np.triu(np.ones((2048, 2048), bool), 1) if mode == 3 else \
            np.zeros((3072, 2048), bool)
    sink = rng.standard_normal(2).astype(np.float32) if with_sink else None
    _check_against_reference((q, k, v, 2, "BSND"), dict(
        atten_mask=mask, scale=0.4, sparse_mode=mode, sink=sink, inner_precise=inner_precise,
        **extra))


@pytest.mark.parametrize("nkv", [3, 1])
def test_dropout_against_reference(nkv):
    """The keep mask is recovered from flash_attn_func's S_dmask under the same (seed, offset):
    both front-ends key Philox by (seed, offset, b * H + h, i, j)."""
    rng = np.random.default_rng(700)
    q, k, v = qkv(rng, (2, 17, 3, 8), (2, 23, nkv, 8), np.float32)
    flash_attn_c.manual_seed(99)
    got = npu_fusion_attention(q, k, v, 3, "BSND", scale=0.3, keep_prob=0.75)
    flash_attn_c.manual_seed(99)
    _, _, s_dmask = flash_attn_c.flash_attn_func(q, k, v, dropout_p=0.25, softmax_scale=0.3,
                                                 return_attn_probs=True)
    keep = ~np.signbit(s_dmask)
    exact, low = _ref_pair(q, k, v, 3, "BSND", scale=0.3, keep_prob=0.75, dropout_mask=keep)
    testing.assert_attention_close(got[0], exact[0], reference_low_precision=low[0])
    np.testing.assert_allclose(got[1], exact[1], rtol=2e-5, atol=2e-5)


def test_alibi_compressed_against_reference():
    rng = np.random.default_rng(800)
    n, s = 2, 1030
    q, k, v = (rand(rng, (1, s, n, 8), np.float16) for _ in range(3))
    i = np.arange(s - 1024, s)[:, None]
    slopes = np.array([0.25, 0.0625])[:, None, None]
    comp = (-slopes * np.abs(np.arange(s)[None] - i))[None].astype(np.float16)
    kw = dict(pse=comp, atten_mask=np.triu(np.ones((2048, 2048), bool), 1), scale=0.3, sparse_mode=3)
    got = npu_fusion_attention(q, k, v, n, "BSND", **kw)
    exact, low = _ref_pair(q, k, v, n, "BSND", **kw)
    testing.assert_attention_close(got[0], exact[0], reference_low_precision=low[0])


@pytest.mark.parametrize("layout", LAYOUTS + ["TND"])
def test_layouts_are_views(layout):
    """Layouts become stride views of the caller's arrays: nothing is copied to normalize them."""
    from flash_attn_c.npu import _geometry
    rng = np.random.default_rng(900)
    if layout == "TND":
        q, k, v = qkv(rng, (10, 4, 8), (12, 2, 8), np.float32)
    else:
        q, k, v = (to_layout(rand(rng, (2, s, h, 8), np.float32), layout)
                   for s, h in ((5, 4), (6, 2), (6, 2)))
    g = _geometry(q, k, v, 4, layout)
    for view, arr in ((g.q, q), (g.k, k), (g.v, v)):
        assert np.shares_memory(view, arr)
