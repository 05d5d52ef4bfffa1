"""Forward kernels of every ISA family against a naive float64 reference.

Each case runs once per kernel family the machine supports (scalar, avx2, avx512, amx). The
tolerance follows flash-attn's test suite: the error against float64 may be at most twice the
error of the same naive computation carried out in the input's precision, plus a small atol.
Outputs start as NaN (FLASH_ATTN_C_POISON) so an element a kernel forgot to write fails.
"""
import os
import zlib

os.environ.setdefault("FLASH_ATTN_C_POISON", "1")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import flash_attn_c as fa  # noqa: E402
from flash_attn_c import _core  # noqa: E402

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": BF16,
          "f64": np.dtype(np.float64)}
ATOL = {"f32": 3e-6, "f16": 2e-3, "bf16": 1.6e-2, "f64": 1e-12}
ISAS = ["scalar", "avx2", "avx512", "amx"]


def _isa_param(name):
    ok = name in fa.cpu_info()["supported"] and name in fa.cpu_info()["compiled"]
    return pytest.param(name, marks=pytest.mark.skipif(not ok, reason=f"{name}: not supported by this CPU/build"))


@pytest.fixture(params=[_isa_param(n) for n in ISAS])
def isa(request):
    before = fa.cpu_info()["isa"]
    fa.set_isa(request.param)
    yield request.param
    fa.set_isa(before)


# ---- naive reference ----------------------------------------------------------------------------

def naive(q, k, v, *, scale, causal=False, window=(-1, -1), softcap=0.0, alibi=None, keep=None,
          dropout_p=0.0, pse=None, mask=None, mask_fill=-np.inf, sink=None, work=np.float64,
          rnd=lambda x: x):
    """Attention with the full score matrix, computed in `work` precision; rnd rounds the
    intermediate scores/probabilities to a storage precision (identity for float64).
    Returns out (b, sq, h, d), lse (b, h, sq) and the normalized probabilities (b, h, sq, sk)."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    rep = h // hk
    qf = q.astype(work).transpose(0, 2, 1, 3)
    kf = np.repeat(k.astype(work).transpose(0, 2, 1, 3), rep, axis=1)
    vf = np.repeat(v.astype(work).transpose(0, 2, 1, 3), rep, axis=1)
    s = rnd(qf @ kf.transpose(0, 1, 3, 2))
    if pse is not None:
        s = s + pse.astype(work)
    s = s * work(scale)
    if softcap > 0:
        s = work(softcap) * np.tanh(s / work(softcap))
    i = np.arange(sq)[:, None] + (sk - sq)
    j = np.arange(sk)[None, :]
    if alibi is not None:
        s = s - alibi.astype(work)[..., None, None] * np.abs(i - j).astype(work)
    left, right = window
    if causal:
        right = 0
    vis = np.ones((sq, sk), bool)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    s = np.where(vis, s, -np.inf)
    if mask is not None:
        s = np.where(vis & (mask != 0), work(mask_fill), s)
    m = s.max(-1, keepdims=True)
    if sink is not None:
        m = np.maximum(m, sink.astype(work)[None, :, None, None])
    msafe = np.where(np.isfinite(m), m, 0)
    e = np.exp(s - msafe)
    den = e.sum(-1, keepdims=True)
    if sink is not None:
        den = den + np.exp(sink.astype(work)[None, :, None, None] - msafe)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.where(den > 0, e / den, 0)
        lse = np.where(den[..., 0] > 0, msafe[..., 0] + np.log(den[..., 0]), np.inf)
    pd = p if keep is None else p * keep / (1 - dropout_p)
    out = rnd(rnd(pd) @ vf)
    return out.transpose(0, 2, 1, 3), lse, p


def err_of(x, ref):
    x = np.asarray(x, np.float64)
    return np.max(np.abs(x - ref)) if x.size else 0.0


_REFS = {}  # the references of a case, shared by the ISA runs of that case


def references(q, k, v, dt, keep, cache_key, **kw):
    key = None if cache_key is None else (cache_key, None if keep is None else zlib.crc32(np.packbits(keep)))
    if key in _REFS:
        return _REFS[key]
    ref = naive(q, k, v, keep=keep, **kw)
    if dt == "f64":
        tol = ATOL[dt]
    else:
        store = DTYPES[dt]
        rnd = (lambda x: x.astype(store).astype(np.float32)) if dt != "f32" else (lambda x: x)
        low, _, _ = naive(q, k, v, keep=keep, work=np.float32, rnd=rnd, **kw)
        tol = 2 * err_of(low.astype(store), ref[0]) + ATOL[dt]
    ref = (ref[0], ref[1], ref[2].astype(np.float32), tol)  # p is compared at float32 precision
    if key is not None:
        _REFS[key] = ref
    return ref


def check(got, q, k, v, dt, cache_key=None, **kw):
    """got: (out, lse, s_dmask or None). Compares against float64 and the low-precision naive."""
    out, lse, sd = got
    keep = None
    if sd is not None and kw.get("dropout_p", 0) > 0:
        keep = ~np.signbit(sd)
    ref_o, ref_lse, ref_p, tol = references(q, k, v, dt, keep, cache_key, **kw)
    assert np.all(np.isfinite(np.asarray(out, np.float64))), "non-finite output"
    e = err_of(out, ref_o)
    assert e <= tol, f"out: max err {e:.3g} > tol {tol:.3g}"
    fin = np.isfinite(ref_lse)
    assert np.array_equal(fin, np.isfinite(lse)), "lse: +inf rows differ"
    lse_tol = 1e-10 if dt == "f64" else 2e-5 * (1 + np.abs(ref_lse[fin]).max(initial=0))
    assert err_of(lse[fin], ref_lse[fin]) <= lse_tol, "lse"
    if sd is not None:
        p_tol = 2e-7 if dt == "f64" else 1e-5  # S_dmask is float32 for every input dtype
        assert err_of(np.abs(sd), ref_p) <= p_tol, "S_dmask"


def inputs(rng, b, sq, sk, h, hk, d, dt, layout="bshd", scale=1.0):
    def make(s, hh):
        if layout == "bhsd":  # non-contiguous (b, s, h, d) view of a (b, h, s, d) array
            x = rng.standard_normal((b, hh, s, d)).transpose(0, 2, 1, 3)
        elif layout == "strided":  # every other head of a wider array
            x = rng.standard_normal((b, s, 2 * hh, d))[:, :, ::2]
        else:
            x = rng.standard_normal((b, s, hh, d))
        return (x * scale).astype(DTYPES[dt])
    return make(sq, h), make(sk, hk), make(sk, hk)


# ---- the grid -----------------------------------------------------------------------------------

SEQS = [(113, 203), (1, 239), (1023, 1024), (203, 113), (64, 64), (65, 130), (300, 300),
        (257, 520)]
HDIMS = [1, 7, 40, 59, 64, 111, 128, 256, 512]


def _grid():
    """A deterministic cover of dtype x causal x window x softcap x alibi x heads x d x lengths x
    layout: every value of each axis appears, combined pseudo-randomly, without the full product
    (which would take hours on two cores)."""
    rng = np.random.default_rng(1234)
    cases = []
    feats = ["plain", "causal", "window", "softcap", "alibi", "dropout", "causal_alibi",
             "window_softcap"]
    heads = [(4, 4), (4, 2), (3, 1)]
    layouts = ["bshd", "bhsd", "strided"]
    n = 0
    for dt in ["f32", "bf16", "f16", "f64"]:
        for f in feats:
            for _ in range(2):
                d = HDIMS[n % len(HDIMS)]
                sq, sk = SEQS[(n * 5 + 3) % len(SEQS)]
                if d >= 256 and sq * sk > 300 * 300:
                    sq, sk = SEQS[0]
                h, hk = heads[n % 3]
                lay = layouts[(n // 3) % 3]
                cases.append(pytest.param(dt, f, d, sq, sk, h, hk, lay, id=f"{dt}-{f}-d{d}-{sq}x{sk}-h{h}/{hk}-{lay}"))
                n += 1
    rng.shuffle(cases)
    return cases


@pytest.mark.parametrize("dt,feat,d,sq,sk,h,hk,layout", _grid())
def test_grid(isa, dt, feat, d, sq, sk, h, hk, layout):
    if isa == "scalar" and d * sq * sk > 64 * 300 * 300:
        pytest.skip("large case: covered by the SIMD families; scalar is the slow oracle")
    rng = np.random.default_rng(zlib.crc32(f"{dt}{feat}{d}{sq}{sk}{h}{hk}{layout}".encode()))
    q, k, v = inputs(rng, 2, sq, sk, h, hk, d, dt, layout)
    scale = d ** -0.5 * (3.0 if feat in ("softcap", "window_softcap") else 1.0)
    kw = dict(scale=scale)
    args = dict(softmax_scale=scale, return_attn_probs=True)
    if "causal" in feat:
        kw["causal"] = args["causal"] = True
    if "window" in feat:
        kw["window"] = args["window_size"] = (37, 11)
    if "softcap" in feat:
        kw["softcap"] = args["softcap"] = 2.5
    if "alibi" in feat:
        sl = rng.uniform(0.01, 0.3, (2, h)).astype(np.float32)
        kw["alibi"] = sl
        args["alibi_slopes"] = sl
    if feat == "dropout":
        kw["dropout_p"] = args["dropout_p"] = 0.17
    out, lse, sd = fa.flash_attn_func(q, k, v, **args)
    check((out, lse, sd), q, k, v, dt, cache_key=(dt, feat, d, sq, sk, h, hk, layout), **kw)
    if feat == "dropout":
        frac = np.mean(np.signbit(sd)[np.abs(sd) > 0])
        assert 0.1 < frac < 0.25, f"dropped fraction {frac}"


@pytest.mark.parametrize("dt", ["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("feat", ["pse_mask", "mask_flt", "sink", "paged"])
def test_npu_features(isa, dt, feat):
    """pse, explicit mask (-inf and -FLT_MAX fills, invalid-line mode), sink, paged K/V: reached
    through the low-level funnel the NPU and kvcache front-ends use."""
    rng = np.random.default_rng(7)
    b, sq, sk, h, hk, d = 2, 77, 150, 4, 2, 40
    q, k, v = inputs(rng, b, sq, sk, h, hk, d, dt)
    scale = d ** -0.5
    extra, kw = {}, dict(scale=scale)
    acc = np.float64 if dt == "f64" else np.float32
    if feat == "pse_mask":
        pse = rng.standard_normal((b, h, sq, sk)).astype(np.float32)
        mask = (rng.random((b, 1, sq, sk)) < 0.3).astype(np.uint8)
        mask[:, :, 5] = 1  # a fully masked row: output 0, lse +inf
        extra = dict(pse=pse, mask=np.broadcast_to(mask, (b, h, sq, sk)))
        kw.update(pse=pse, mask=np.broadcast_to(mask, (b, h, sq, sk)))
    elif feat == "mask_flt":
        mask = (rng.random((b, h, sq, sk)) < 0.5).astype(np.uint8)
        mask[:, :, 3] = 1
        fill = -np.finfo(np.float32).max
        rmax, rsum = np.full((b, h, sq), np.nan, acc), np.full((b, h, sq), np.nan, acc)
        extra = dict(mask=mask, mask_fill=fill, invalid_line_zero=True, rowmax=rmax, rowsum=rsum)
        kw.update(mask=mask, mask_fill=fill)
    elif feat == "sink":
        sink = rng.standard_normal(h).astype(np.float32)
        extra = dict(sink=sink)
        kw.update(sink=sink)
    if feat == "paged":
        page = 16
        nblk = (sk + page - 1) // page
        perm = rng.permutation(b * nblk)
        kp = np.zeros((b * nblk, page, hk, d), q.dtype)
        vp = np.zeros_like(kp)
        for bi in range(b):
            for blk in range(nblk):
                n = min(page, sk - blk * page)
                kp[perm[bi * nblk + blk], :n] = k[bi, blk * page:blk * page + n]
                vp[perm[bi * nblk + blk], :n] = v[bi, blk * page:blk * page + n]
        bt = perm.reshape(b, nblk).astype(np.int64)
        out, lse, _ = _core.forward(q, kp, vp, scale=scale, out_shape=q.shape, lse_shape=(b, h, sq),
                                    left=None, right=0, block_table=bt,
                                    seqlen_k=np.full(b, sk, np.int64))
        kw["causal"] = True
    else:
        out, lse, _ = _core.forward(q, k, v, scale=scale, out_shape=q.shape, lse_shape=(b, h, sq),
                                    **extra)
    if feat == "mask_flt":
        ref_o, _, _ = naive(q, k, v, **kw)
        # invalid-line mode: a row whose max is the fill value gives 0 and rowsum FLT_MAX
        assert np.all(out[:, 3] == 0) and np.all(extra["rowsum"][:, :, 3] == np.finfo(np.float32).max)
        ok = np.ones(sq, bool)
        ok[3] = False
        tol = 1e-10 if dt == "f64" else 2 * err_of(
            naive(q, k, v, work=np.float32, **kw)[0].astype(DTYPES[dt]), ref_o) + ATOL[dt]
        assert err_of(out[:, ok], ref_o[:, ok]) <= tol
        assert np.all(np.isfinite(extra["rowmax"]))
        return
    check((out, lse, None), q, k, v, dt, **kw)


def test_isas_agree_on_dropout_mask(isa):
    """The dropout mask is a pure function of (seed, offset, b, h, i, j): identical in every ISA."""
    rng = np.random.default_rng(3)
    q, k, v = inputs(rng, 1, 70, 90, 2, 2, 16, "f32")
    fa.set_isa("scalar")
    _, _, sd0 = _core.forward(q, k, v, scale=0.25, out_shape=q.shape, lse_shape=(1, 2, 70),
                              dropout_p=0.3, seed=5, offset=9, s_dmask_shape=(1, 2, 70, 90))
    fa.set_isa(isa)
    _, _, sd1 = _core.forward(q, k, v, scale=0.25, out_shape=q.shape, lse_shape=(1, 2, 70),
                              dropout_p=0.3, seed=5, offset=9, s_dmask_shape=(1, 2, 70, 90))
    assert np.array_equal(np.signbit(sd0), np.signbit(sd1))
