"""Backward kernels: gradients against a naive float64 reference written here.

The reference is the textbook chain rule on the full score matrix (no tiling, no online softmax):
forward s = g(scale * q.k) + alibi, masked to the band, P = softmax(s), O = (P * keep / (1 - p)) V;
backward as FlashAttention-2 (Dao 2023, section 3 and Algorithm 2) writes it:
dV = (P keep r)^T dO, dP = dO V^T, D = rowsum(dO * O), dS = P (keep r dP - D), dS *= g', and
dQ = scale dS K, dK = scale dS^T Q, dK/dV summed over each GQA group. It is checked against
central finite differences once (test_reference_matches_finite_differences).

Tolerance (flash-attn's rule, specs/flash_attn_api.md 4.2): the error of the kernel against the
float64 reference is at most 3x the error of the same naive computation carried out in the input's
precision (every intermediate rounded to it), plus a small absolute term.
"""
import math

import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import _core

from conftest import DTYPES, ISAS, randn, using_isa, using_threads

ATOL = {"f32": 1e-6, "bf16": 1e-4, "f16": 1e-5, "f64": 1e-12}


# ---- the naive reference ------------------------------------------------------------------------

def visible(sq, sk, window, causal):
    """Bottom-right aligned band (flash-attn semantics, specs/flash_attn_api.md 2.2-2.3)."""
    left, right = window
    if causal:
        right = 0
    i = np.arange(sq)[:, None] + sk - sq
    j = np.arange(sk)[None]
    vis = np.ones((sq, sk), bool)
    if left >= 0:
        vis &= j >= i - left
    if right >= 0:
        vis &= j <= i + right
    return vis


def naive(q, k, v, dout, *, scale, causal=False, window=(-1, -1), softcap=0.0, slopes=None,
          keep=None, p_drop=0.0, rd=None, pse=None, mask=None, mask_fill=-np.inf):
    """Forward and closed-form backward of one fixed-length batch, q (b, sq, h, d).

    rd rounds every intermediate (None: float64, exact). Returns (out, dq, dk, dv, dpse) with dpse
    the gradient of an additive score bias (b, h, sq, sk), added before scale.
    """
    wide = np.float64 if rd is None else np.float32
    rd = rd or (lambda x: x)
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    q, k, v, dout = (rd(np.asarray(x, wide)) for x in (q, k, v, dout))
    kk, vv = np.repeat(k, g, axis=2), np.repeat(v, g, axis=2)
    x = rd(np.einsum("bihd,bjhd->bhij", q, kk))
    if pse is not None:
        x = rd(x + pse)
    z = rd(x * scale)
    t = None
    if softcap > 0:
        t = rd(np.tanh(z / softcap))
        z = rd(softcap * t)
    vis = np.broadcast_to(visible(sq, sk, window, causal), (b, h, sq, sk))
    if slopes is not None:
        dist = np.abs(np.arange(sq)[:, None] + sk - sq - np.arange(sk)[None])
        z = rd(z - slopes[:, :, None, None] * dist)
    s = np.where(vis, z, -np.inf)
    grad_ok = vis
    if mask is not None:
        s = np.where(vis & mask, mask_fill, s)
        grad_ok = vis & ~mask
    with np.errstate(invalid="ignore"):
        m = np.max(s, -1, keepdims=True)
        m = np.where(np.isfinite(m), m, 0)
        e = rd(np.exp(s - m))
        l = np.sum(e, -1, keepdims=True)
        p = rd(np.where(l > 0, e / np.where(l > 0, l, 1), 0))
    kp = np.ones_like(p) if keep is None else keep.astype(wide)
    r = 1.0 / (1.0 - p_drop)
    pd = rd(p * kp * r)
    out = rd(np.einsum("bhij,bjhd->bihd", pd, vv))
    dv = rd(np.einsum("bhij,bihd->bjhd", pd, dout))
    dp = rd(np.einsum("bihd,bjhd->bhij", dout, vv))
    dsum = rd(np.einsum("bihd,bihd->bhi", dout, out))[..., None]
    ds = rd(p * rd(kp * dp * r - dsum))
    if t is not None:
        ds = rd(ds * rd(1 - t * t))
    ds = rd(np.where(grad_ok, ds * scale, 0))
    dq = rd(np.einsum("bhij,bjhd->bihd", ds, kk))
    dk = rd(np.einsum("bhij,bihd->bjhd", ds, q))
    dk = rd(dk.reshape(b, sk, hk, g, d).sum(3))
    dv = rd(dv.reshape(b, sk, hk, g, d).sum(3))
    return out, dq, dk, dv, ds


def rounder(dtype):
    if dtype == np.float64:
        return None
    return lambda x: np.asarray(x, np.float32).astype(dtype).astype(np.float32)


def assert_grad_close(name, got, ref, low, atol):
    got = np.asarray(got, np.float64)
    assert np.isfinite(got).all(), f"{name}: {np.count_nonzero(~np.isfinite(got))} non-finite values"
    err = np.max(np.abs(got - ref)) if got.size else 0.0
    base = np.max(np.abs(np.asarray(low, np.float64) - ref)) if got.size else 0.0
    scale = max(1.0, float(np.max(np.abs(ref)))) if got.size else 1.0
    assert err <= 3 * base + atol * scale, (
        f"{name}: max error {err:.3g} vs 3 x naive low-precision error {base:.3g} + {atol * scale:.3g}")


# ---- the grid -----------------------------------------------------------------------------------

# (b, sq, sk, h, hk, d, causal, window, softcap, alibi, dropout)
CASES = [
    (2, 113, 203, 4, 4, 64, False, (-1, -1), 0.0, False, 0.0),
    (1, 113, 203, 4, 2, 59, True, (-1, -1), 0.0, False, 0.0),
    (1, 1, 239, 4, 1, 128, False, (-1, -1), 0.0, False, 0.0),
    (1, 1, 239, 2, 2, 7, True, (-1, -1), 0.0, True, 0.0),
    (2, 200, 65, 6, 3, 1, True, (-1, -1), 0.0, False, 0.0),  # sq > sk: top rows see nothing
    (1, 128, 128, 2, 1, 256, True, (-1, -1), 0.0, False, 0.0),
    (1, 129, 127, 4, 2, 64, False, (17, 5), 0.0, False, 0.0),
    (1, 65, 300, 2, 2, 32, True, (40, -1), 0.0, True, 0.0),
    (2, 97, 97, 4, 4, 40, False, (-1, -1), 30.0, False, 0.0),
    (1, 130, 70, 4, 1, 96, True, (-1, -1), 5.0, True, 0.0),
    (1, 150, 150, 3, 3, 64, False, (-1, -1), 0.0, False, 0.17),
    (2, 77, 190, 4, 2, 24, True, (-1, -1), 0.0, True, 0.3),
    (1, 64, 256, 2, 1, 48, False, (30, 30), 0.0, False, 0.1),
    (2, 70, 150, 16, 8, 16, True, (-1, -1), 0.0, False, 0.0),  # batch * kv heads >= 16: one chunk
    # Groups of key blocks in the dkdv pass (4 blocks of 64 keys of one chunk per group): one chunk
    # with a full and a partial group, and 2 chunks whose groups hold every other block.
    (2, 90, 333, 16, 8, 8, True, (-1, -1), 0.0, False, 0.0),
    (1, 100, 700, 16, 8, 24, False, (200, 30), 0.0, True, 0.0),
]


def case_id(c):
    b, sq, sk, h, hk, d, causal, window, softcap, alibi, drop = c
    s = f"b{b}-{sq}x{sk}-h{h}k{hk}-d{d}"
    s += "-causal" if causal else ""
    s += f"-w{window[0]}_{window[1]}" if window != (-1, -1) else ""
    s += f"-cap{softcap:g}" if softcap else ""
    s += "-alibi" if alibi else ""
    s += f"-drop{drop:g}" if drop else ""
    return s


def run_case(c, dtype, seed=0, dout_noncontig=False):
    """Our forward + backward for case c, and the inputs for the reference."""
    b, sq, sk, h, hk, d, causal, window, softcap, alibi, drop = c
    rng = np.random.default_rng(seed)
    q, k, v = randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hk, d), dtype), randn(rng, (b, sk, hk, d), dtype)
    if dout_noncontig:
        dout = randn(rng, (b, h, sq, 2 * d), dtype).transpose(0, 2, 1, 3)[..., ::2]
    else:
        dout = randn(rng, (b, sq, h, d), dtype)
    slopes = rng.uniform(0.05, 0.5, (b, h)).astype(np.float32) if alibi else None
    kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes, dropout_p=drop)
    keep = None
    if drop:
        fa.manual_seed(1234 + seed)
        _, _, s_dmask = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        keep = ~np.signbit(s_dmask)  # dropped entries are stored negated
    out, lse, rng_state = fa.flash_attn_fwd(q, k, v, seed=1234 + seed if drop else None, **kw)
    grads = fa.flash_attn_bwd(dout, q, k, v, out, lse, rng_state=rng_state, **kw)
    ref_kw = dict(scale=d ** -0.5, causal=causal, window=window, softcap=softcap,
                  slopes=None if slopes is None else slopes.astype(np.float64), keep=keep, p_drop=drop)
    return (q, k, v, dout), out, grads, ref_kw


def check_case(c, dname, **kw):
    dtype = DTYPES[dname]
    inputs, out, grads, ref_kw = run_case(c, dtype, **kw)
    ref = naive(*inputs, **ref_kw)
    low = naive(*inputs, rd=rounder(dtype), **ref_kw) if dtype != np.float64 else ref
    assert_grad_close("out", out, ref[0], low[0], ATOL[dname])
    for name, g, x, r, lo in zip(("dq", "dk", "dv"), grads, inputs, ref[1:4], low[1:4]):
        assert g.dtype == dtype and g.shape == x.shape, f"{name}: {g.dtype} {g.shape}"
        assert_grad_close(name, g, r, lo, ATOL[dname])


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_grads(c, dname):
    check_case(c, dname)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "amx"])
@pytest.mark.parametrize("dname", ["f32", "f64", "bf16", "f16"])
@pytest.mark.parametrize("c", [CASES[1], CASES[4], CASES[9], CASES[11], CASES[14], CASES[15]], ids=case_id)
def test_grads_every_isa(c, dname, isa):
    if isa not in ISAS:
        pytest.skip(f"{isa}: not supported by this CPU or build ({fa.cpu_info()})")
    with using_isa(isa):
        check_case(c, dname)


def test_noncontiguous_dout():
    check_case(CASES[1], "f32", dout_noncontig=True)
    check_case(CASES[11], "bf16", dout_noncontig=True)


@pytest.mark.parametrize("c", [CASES[1], CASES[7], CASES[11], CASES[13], CASES[14], CASES[15]], ids=case_id)
def test_threads_bitwise_identical(c):
    """Every output element has one owner and a fixed summation order, so 1 and 2 threads agree
    bit for bit (and so does every ISA with itself)."""
    results = []
    for threads in (1, 2):
        with using_threads(threads):
            _, out, grads, _ = run_case(c, np.float32, seed=5)
        results.append([out, *grads])
    for a, b in zip(*results):
        assert a.tobytes() == b.tobytes()


@pytest.mark.parametrize("dname", ["f32", "bf16"])
def test_chunks_follow_the_processor_count(dname):
    """The dkdv pass offers two items per processor, up to 4 chunks of key blocks per (batch, kv
    head), on top of its 16-item floor (fa_bwd_driver.c, bwd_chunks). With the count pinned, the
    plan reports the chunks, the gradients pass the reference and 1, 2 and 3 threads agree bit for
    bit. b * hk = 8 here: 16 items need 2 chunks, 2 x 24 processors 6 (capped at 4)."""
    c = (2, 150, 333, 4, 4, 48, True, (-1, -1), 0.0, False, 0.0)
    expect = {1: 2, 8: 2, 12: 3, 24: 4}
    try:
        for procs, chunks in expect.items():
            _core._C._bwd_set_procs(procs)
            check_case(c, dname)
            assert _core._C._bwd_last_plan()["chunks"] == chunks, procs
        results = []
        for threads in (1, 2, 3):
            with using_threads(threads):
                _, out, grads, _ = run_case(c, DTYPES[dname], seed=3)
            assert _core._C._bwd_last_plan()["chunks"] == 4
            results.append([g.tobytes() for g in grads])
        assert results[0] == results[1] == results[2]
    finally:
        _core._C._bwd_set_procs(0)


# Shapes around the AMX bf16 kernel's 128 x 64 blocks and 32-wide tiles (fa_bwd_bf16__amx.c):
# ragged last blocks on both sides, d not a multiple of 32 or of 16, several dQ chunks (few kv
# heads), GQA groups, and every score feature.
AMX_CASES = [
    (1, 63, 65, 2, 1, 128, False, (-1, -1), 0.0, False, 0.0),
    (1, 129, 191, 4, 2, 33, True, (-1, -1), 0.0, False, 0.0),
    (2, 64, 64, 2, 2, 96, False, (-1, -1), 0.0, False, 0.1),
    (1, 300, 97, 6, 2, 80, True, (20, 7), 12.0, True, 0.0),
    (1, 97, 300, 3, 1, 17, False, (-1, 40), 0.0, True, 0.25),
    (1, 70, 90, 2, 1, 512, True, (-1, -1), 0.0, False, 0.0),  # the largest head dim
    # The plain-row path (no score feature: P and dX straight to their bf16 tiles): a window band
    # with sq != sk and d = 40, and causal with sq > sk, whose first rows see no key (dead rows).
    (1, 200, 333, 4, 2, 40, False, (30, 10), 0.0, False, 0.0),
    (2, 190, 70, 2, 1, 24, True, (-1, -1), 0.0, False, 0.0),
    # Groups of 4 key blocks in the dkdv pass: 2 chunks of 6 blocks (a full and a partial group),
    # GQA and dropout; 4 chunks of 4-5 blocks under a causal band with alibi.
    (2, 130, 700, 8, 4, 48, False, (-1, -1), 0.0, False, 0.1),
    (2, 257, 1100, 4, 2, 64, True, (-1, -1), 0.0, True, 0.0),
]


@pytest.mark.parametrize("c", AMX_CASES, ids=case_id)
def test_amx_bf16_blocks(c):
    if "amx" not in ISAS:
        pytest.skip(f"amx: not supported by this CPU or build ({fa.cpu_info()})")
    with using_isa("amx"):
        check_case(c, "bf16")


@pytest.mark.parametrize("c", [(1, 150, 260, 4, 1, 64, True, (-1, -1), 0.0, False, 0.0),
                               AMX_CASES[-1]], ids=case_id)
def test_amx_bf16_runs_on_tiles_and_is_thread_independent(c):
    """bf16 on amx takes the tile kernel (P and dS rounded to bf16, so it differs from the float32
    FMA path's result) and, like every backward, gives the same bits for 1 and 2 threads (the
    second case has groups of key blocks in its chunks)."""
    if "amx" not in ISAS:
        pytest.skip(f"amx: not supported by this CPU or build ({fa.cpu_info()})")
    results = []
    for isa, threads in (("amx", 1), ("amx", 2), ("avx512", 2)):
        with using_isa(isa), using_threads(threads):
            _, out, grads, _ = run_case(c, DTYPES["bf16"], seed=3)
        results.append([np.asarray(g).tobytes() for g in grads])
    assert results[0] == results[1]
    assert results[1] != results[2]


def test_reference_matches_finite_differences():
    """The closed-form reference against central differences of its own float64 forward."""
    rng = np.random.default_rng(3)
    b, sq, sk, h, hk, d = 1, 5, 7, 2, 1, 3
    q, k, v = rng.standard_normal((b, sq, h, d)), rng.standard_normal((b, sk, hk, d)), rng.standard_normal((b, sk, hk, d))
    dout = rng.standard_normal((b, sq, h, d))
    slopes = np.array([[0.3, 0.1]])
    kw = dict(scale=0.7, causal=True, window=(3, -1), softcap=2.0, slopes=slopes)
    _, dq, dk, dv, _ = naive(q, k, v, dout, **kw)
    for x, g in ((q, dq), (k, dk), (v, dv)):
        num = np.zeros_like(x)
        for idx in np.ndindex(x.shape):
            old = x[idx]
            x[idx] = old + 1e-6
            fp = np.sum(naive(q, k, v, dout, **kw)[0] * dout)
            x[idx] = old - 1e-6
            fm = np.sum(naive(q, k, v, dout, **kw)[0] * dout)
            x[idx] = old
            num[idx] = (fp - fm) / 2e-6
        np.testing.assert_allclose(g, num, rtol=1e-6, atol=1e-8)


def test_sq_zero_and_dead_rows():
    """sq > sk causal: rows that see no key get lse +inf and contribute nothing; their dq is 0."""
    c = (1, 40, 10, 2, 1, 16, True, (-1, -1), 0.0, False, 0.0)
    _, _, (dq, dk, dv), _ = run_case(c, np.float32)
    assert np.all(dq[:, :30] == 0)
    assert np.isfinite(dk).all() and np.isfinite(dv).all()


# ---- the funnel: varlen, NPU statistics, pse gradient, explicit mask, sink ----------------------

def varlen_problem(rng, lens_q, lens_k, dt, h=4, hk=2, d=24):
    """Packed causal varlen inputs with 3 trailing query rows that belong to no sequence, the
    forward's out and lse, and the _core keyword arguments."""
    cu_q = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int64)
    cu_k = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int64)
    q = randn(rng, (cu_q[-1] + 3, h, d), dt)
    k, v = randn(rng, (cu_k[-1], hk, d), dt), randn(rng, (cu_k[-1], hk, d), dt)
    dout = randn(rng, q.shape, dt)
    kw = dict(scale=d ** -0.5, varlen=True, cu_q=cu_q, cu_k=cu_k, left=None, right=0)
    out, lse, _ = _core.forward(q, k, v, out_shape=q.shape, lse_shape=(h, q.shape[0]), **kw)
    return q, k, v, dout, out, lse, kw


def check_varlen_grads(q, k, v, dout, kw, lens_q, lens_k, grads, tol):
    """Each sequence's gradients against the float64 reference; the trailing rows and sequences
    without keys get dq = 0, sequences without queries dk = dv = 0."""
    dq, dk, dv = grads
    cu_q, cu_k = kw["cu_q"], kw["cu_k"]
    assert np.all(dq[cu_q[-1]:] == 0)
    for i in range(len(lens_q)):
        qs, ks = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        if lens_k[i] == 0:
            assert np.all(dq[qs] == 0)
            continue
        ref = naive(q[None, qs], k[None, ks], v[None, ks], dout[None, qs], scale=kw["scale"],
                    causal=True)
        for g, r in zip((dq[qs], dk[ks], dv[ks]), ref[1:4]):
            np.testing.assert_allclose(g, r[0], **tol)
        if lens_q[i] == 0:
            assert np.all(dk[ks] == 0) and np.all(dv[ks] == 0)


def test_funnel_varlen():
    lens_q, lens_k = [37, 1, 80, 0, 6], [50, 9, 70, 5, 0]
    q, k, v, dout, out, lse, kw = varlen_problem(np.random.default_rng(11), lens_q, lens_k,
                                                 np.float32)
    dq, dk, dv, _ = _core.backward(dout, q, k, v, out, lse=lse, **kw)
    check_varlen_grads(q, k, v, dout, kw, lens_q, lens_k, (dq, dk, dv),
                       dict(atol=2e-5, rtol=1e-4))


@pytest.mark.parametrize("with_sink", [False, True])
def test_funnel_npu_form_pse_mask_sink(with_sink):
    """The NPU grad's inputs: given rowmax/rowsum, a pse (broadcast over batch), an explicit mask
    with -FLT_MAX fill (one row fully masked: without a sink its output averages V, so dv gets a
    share), optionally a sink; and the pse gradient."""
    rng = np.random.default_rng(12)
    b, sq, sk, h, d = 2, 33, 47, 2, 16
    q, k, v = (randn(rng, (b, s, h, d), np.float64) for s in (sq, sk, sk))
    dout = randn(rng, (b, sq, h, d), np.float64)
    pse = np.broadcast_to(randn(rng, (1, h, sq, sk), np.float64), (b, h, sq, sk))
    mask = rng.random((b, h, sq, sk)) < 0.3
    mask[0, 1, 5] = True
    sink = rng.standard_normal(h).astype(np.float32) if with_sink else None
    fill = -float(np.finfo(np.float32).max)
    kw = dict(scale=0.3, pse=pse, mask=mask.view(np.uint8), mask_fill=fill, sink=sink)
    rowmax, rowsum = np.empty((b, h, sq)), np.empty((b, h, sq))
    out, lse, _ = _core.forward(q, k, v, out_shape=q.shape, lse_shape=(b, h, sq), rowmax=rowmax,
                                rowsum=rowsum, **kw)
    dq, dk, dv, dpse = _core.backward(dout, q, k, v, out, rowmax=rowmax, rowsum=rowsum,
                                      want_dpse=True, **kw)
    if not with_sink:
        ref = naive(q, k, v, dout, scale=0.3, pse=pse, mask=mask, mask_fill=fill)
        for g, r in zip((out, dq, dk, dv, dpse), ref):
            np.testing.assert_allclose(g, r, atol=1e-12)
        return
    # Reference: sink as one extra key whose score is the sink logit and whose value is 0.
    s_ext = np.concatenate([np.zeros((b, 1, h, d)), k], axis=1)
    v_ext = np.concatenate([np.zeros((b, 1, h, d)), v], axis=1)
    pse_ext = np.concatenate([np.broadcast_to((sink.astype(np.float64) / 0.3)[None, :, None, None], (b, h, sq, 1)), pse], axis=3)
    mask_ext = np.concatenate([np.zeros((b, h, sq, 1), bool), mask], axis=3)
    ref = naive(q, s_ext, v_ext, dout, scale=0.3, pse=pse_ext, mask=mask_ext, mask_fill=fill)
    np.testing.assert_allclose(out, ref[0], atol=1e-12)
    np.testing.assert_allclose(dq, ref[1], atol=1e-12)
    np.testing.assert_allclose(dk, ref[2][:, 1:], atol=1e-12)
    np.testing.assert_allclose(dv, ref[3][:, 1:], atol=1e-12)
    assert np.abs(dv).max() > 0
    np.testing.assert_allclose(dpse, ref[4][..., 1:], atol=1e-12)


def test_funnel_dpse_row_broadcast():
    rng = np.random.default_rng(13)
    b, sq, sk, h, d = 1, 70, 90, 2, 8
    q, k, v = (randn(rng, (b, s, h, d), np.float64) for s in (sq, sk, sk))
    dout = randn(rng, (b, sq, h, d), np.float64)
    pse = np.broadcast_to(randn(rng, (b, h, 1, sk), np.float64), (b, h, sq, sk))
    kw = dict(scale=0.5, pse=pse, left=None, right=0)
    out, lse, _ = _core.forward(q, k, v, out_shape=q.shape, lse_shape=(b, h, sq), **kw)
    _, _, _, dpse = _core.backward(dout, q, k, v, out, lse=lse, want_dpse=True, **kw)
    ref = naive(q, k, v, dout, scale=0.5, causal=True, pse=pse)
    assert dpse.shape == (b, h, 1, sk)
    np.testing.assert_allclose(dpse[:, :, 0], ref[4].sum(2), atol=1e-12)


# ---- argument checking --------------------------------------------------------------------------

def test_errors():
    rng = np.random.default_rng(0)
    q, k, v = randn(rng, (1, 8, 2, 4), np.float32), randn(rng, (1, 9, 2, 4), np.float32), randn(rng, (1, 9, 2, 4), np.float32)
    out, lse, st = fa.flash_attn_fwd(q, k, v, dropout_p=0.1)
    do = randn(rng, q.shape, np.float32)
    with pytest.raises(TypeError, match="dout"):
        fa.flash_attn_bwd(do.astype(np.float16), q, k, v, out, lse)
    with pytest.raises(ValueError, match="dout"):
        fa.flash_attn_bwd(do[:, :5], q, k, v, out, lse)
    with pytest.raises(ValueError, match="out"):
        fa.flash_attn_bwd(do, q, k, v, out[:, :, :1], lse)
    with pytest.raises(TypeError, match="softmax_lse"):
        fa.flash_attn_bwd(do, q, k, v, out, lse.astype(np.float64))
    with pytest.raises(ValueError, match="softmax_lse"):
        fa.flash_attn_bwd(do, q, k, v, out, lse[:, :1])
    with pytest.raises(ValueError, match="rng_state"):
        fa.flash_attn_bwd(do, q, k, v, out, lse, dropout_p=0.1)
    with pytest.raises(ValueError, match="dropout_p"):
        fa.flash_attn_bwd(do, q, k, v, out, lse, dropout_p=1.0, rng_state=st)
    with pytest.raises(ValueError, match="k"):
        fa.flash_attn_bwd(do, q, k[:, :, :1].repeat(3, 2), v, out, lse)
    with pytest.raises(TypeError, match="causal"):
        fa.flash_attn_bwd(do, q, k, v, out, lse, causal="yes")
    # The binding re-checks what the C code relies on.
    with pytest.raises(ValueError, match="dk"):
        fa._C.bwd(do, q, k, v, out, np.empty_like(q), np.empty((1, 8, 2, 4), np.float32),
                  np.empty_like(v), scale=0.5, lse=lse)
    with pytest.raises(ValueError, match="statistics"):
        fa._C.bwd(do, q, k, v, out, np.empty_like(q), np.empty_like(k), np.empty_like(v), scale=0.5)
    ro = np.empty_like(q)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        fa._C.bwd(do, q, k, v, out, ro, np.empty_like(k), np.empty_like(v), scale=0.5, lse=lse)


def test_dropout_replay_matters():
    """A different rng_state gives different gradients (the mask really is replayed)."""
    c = CASES[10]
    inputs, out, grads, _ = run_case(c, np.float32)
    q, k, v, dout = inputs
    _, lse, _ = fa.flash_attn_fwd(q, k, v, dropout_p=c[-1], seed=1234)
    other = fa.flash_attn_bwd(dout, q, k, v, out, lse, dropout_p=c[-1], rng_state=np.array([99, 0]))
    assert not np.allclose(other[2], grads[2])
    assert math.isfinite(float(np.abs(other[0]).max()))


@pytest.mark.parametrize("form", ["lse", "rowmax"])
def test_funnel_invalid_line_zero(form):
    """NPU invalid-line mode: a row masked entirely gives output 0, so it must give no gradient
    (in either statistics form), unlike the averaging of test_funnel_npu_form_pse_mask_sink."""
    rng = np.random.default_rng(14)
    b, sq, sk, h, d = 1, 20, 30, 2, 8
    q, k, v = (randn(rng, (b, s, h, d), np.float64) for s in (sq, sk, sk))
    dout = randn(rng, (b, sq, h, d), np.float64)
    mask = rng.random((b, h, sq, sk)) < 0.3
    mask[0, :, 3] = True
    fill = -float(np.finfo(np.float32).max)
    kw = dict(scale=0.4, mask=mask.view(np.uint8), mask_fill=fill, invalid_line_zero=True)
    rowmax, rowsum = np.empty((b, h, sq)), np.empty((b, h, sq))
    out, lse, _ = _core.forward(q, k, v, out_shape=q.shape, lse_shape=(b, h, sq), rowmax=rowmax,
                                rowsum=rowsum, **kw)
    stats = dict(lse=lse) if form == "lse" else dict(rowmax=rowmax, rowsum=rowsum)
    dq, dk, dv, _ = _core.backward(dout, q, k, v, out, **stats, **kw)
    ref = naive(q, k, v, dout, scale=0.4, mask=mask, mask_fill=-np.inf)  # -inf: the row is empty
    assert np.all(out[0, 3] == 0) and np.all(dq[0, 3] == 0)
    for g, r in zip((out, dq, dk, dv), ref):
        np.testing.assert_allclose(g, r, atol=1e-12)
