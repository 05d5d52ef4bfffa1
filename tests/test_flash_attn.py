"""flash-attn compatible forward functions against the float64 reference, on every kernel family.

The grid covers every value of every axis (dtype, causal, window, softcap, alibi, MHA/GQA/MQA,
head dims, (sq, sk) pairs straddling the 64-row/64-key blocks, batch, non-contiguous inputs) in a
fixed pseudo-random selection of combinations; each case runs on every ISA this machine supports
and is compared with flash-attn's tolerance rule (error vs float64 at most twice the error of the
same naive computation done in the input precision, plus a small atol).
"""
import itertools
import zlib

import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import reference as ref
from flash_attn_c.testing import assert_attention_close

from conftest import DTYPES, ISAS, noncontiguous, randn, using_isa, using_threads

SEQS = [(113, 203), (203, 113), (1, 239), (239, 1), (64, 64), (65, 129), (128, 217), (3, 799),
        (1023, 1024), (1024, 1023), (1, 1), (17, 17)]
HEADDIMS = [1, 7, 40, 59, 64, 111, 128, 256, 512]
HEADS = {"mha": (4, 4), "gqa": (6, 2), "mqa": (3, 1)}
WINDOWS = [(-1, -1), (32, 8), (0, 0), (-1, 16), (50, -1)]
AXES = dict(dtype=list(DTYPES), causal=[False, True], window=WINDOWS, softcap=[0.0, 20.0],
            alibi=[None, "h", "bh"], heads=list(HEADS), d=HEADDIMS, seqs=SEQS, batch=[1, 3],
            layout=["contiguous", "strided"])


def _cost(c):
    sq, sk = c["seqs"]
    return c["batch"] * HEADS[c["heads"]][0] * sq * sk * c["d"]


def _grid(n, seed=2024, max_cost=6e7):
    """n cases covering every axis value (each value appears at least once), cheap enough."""
    rng = np.random.default_rng(seed)
    keys = list(AXES)
    cases = []
    # One case per axis value first, so coverage is guaranteed, then random fill.
    for key in keys:
        for val in AXES[key]:
            while True:
                c = {k: AXES[k][rng.integers(len(AXES[k]))] for k in keys}
                c[key] = val
                if _cost(c) <= max_cost:
                    break
                # Too expensive: shrink the other axes.
                if key != "seqs":
                    c["seqs"] = (113, 203)
                if key != "d":
                    c["d"] = 64
                if key != "batch":
                    c["batch"] = 1
                if _cost(c) <= max_cost:
                    break
            cases.append(c)
    while len(cases) < n:
        c = {k: AXES[k][rng.integers(len(AXES[k]))] for k in keys}
        if _cost(c) <= max_cost:
            cases.append(c)
    return cases


CASES = _grid(90)


def _case_id(c):
    return "-".join(f"{k}={v}" for k, v in c.items()).replace(" ", "")


def make_inputs(c, rng):
    dt = DTYPES[c["dtype"]]
    b, (sq, sk), (h, hk), d = c["batch"], c["seqs"], HEADS[c["heads"]], c["d"]
    # With softcap the scores are pushed into tanh's nonlinear range, as flash-attn's tests do.
    qscale = 3.0 if c["softcap"] else 1.0
    q = randn(rng, (b, sq, h, d), dt, qscale)
    k = randn(rng, (b, sk, hk, d), dt)
    v = randn(rng, (b, sk, hk, d), dt)
    alibi = None
    if c["alibi"] == "h":
        alibi = rng.uniform(0.01, 0.5, size=(h,)).astype(np.float32)
    elif c["alibi"] == "bh":
        alibi = rng.uniform(0.01, 0.5, size=(b, h)).astype(np.float32)
    if c["layout"] == "strided":
        q, k, v = (noncontiguous(x, rng) for x in (q, k, v))
    return q, k, v, alibi


@pytest.mark.parametrize("c", CASES, ids=[_case_id(c) for c in CASES])
def test_forward_grid(c):
    # crc32, not hash(): str hashes change per process, and inputs must be the same every run.
    rng = np.random.default_rng(zlib.crc32(_case_id(c).encode()))
    q, k, v, alibi = make_inputs(c, rng)
    kw = dict(causal=c["causal"], window_size=c["window"], softcap=c["softcap"], alibi_slopes=alibi)
    out64, lse64, _ = ref.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    low = None
    if q.dtype != np.float64:
        low = ref.flash_attn_func(q, k, v, compute_dtype=q.dtype, **kw)
    for isa in ISAS:
        with using_isa(isa):
            out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        assert out.dtype == q.dtype and out.shape == q.shape
        assert lse.dtype == (np.float64 if q.dtype == np.float64 else np.float32)
        assert_attention_close(out, out64, reference_low_precision=low, name=f"out[{isa}]")
        # lse is computed in the accumulator precision whatever the input dtype.
        fin = np.isfinite(lse64)
        assert np.array_equal(np.isposinf(lse), np.isposinf(lse64)), f"lse +inf rows differ [{isa}]"
        tol = 1e-12 if q.dtype == np.float64 else 2e-5
        np.testing.assert_allclose(lse[fin], lse64[fin], rtol=tol, atol=tol, err_msg=f"lse [{isa}]")


# The generic kernels' key blocks (fa_fwd_impl.h): 64 keys in the scalar and float64 builds, 96 in
# the AVX2 float32 one. With several query blocks or a GQA group the driver packs K/V once and an
# item's first block starts at a block edge, before the band of a causal or windowed row.
EDGE_SEQS = [(97, 95), (96, 96), (130, 97), (65, 192), (200, 193), (1, 129)]


@pytest.mark.parametrize("sq,sk", EDGE_SEQS)
@pytest.mark.parametrize("mask", ["plain", "causal", "window"])
@pytest.mark.parametrize("dtype", ["f32", "f64"])
def test_generic_kernel_block_edges(sq, sk, mask, dtype):
    rng = np.random.default_rng(sq * 1000 + sk)
    q = randn(rng, (2, sq, 4, 72), DTYPES[dtype])
    k, v = (randn(rng, (2, sk, 2, 72), DTYPES[dtype]) for _ in range(2))
    kw = dict(causal=mask == "causal", window_size=(70, 20) if mask == "window" else (-1, -1))
    out64, lse64, _ = ref.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    low = None if dtype == "f64" else ref.flash_attn_func(q, k, v, compute_dtype=q.dtype, **kw)
    for isa in ISAS:
        with using_isa(isa):
            out, lse, _ = fa.flash_attn_func(q, k, v, return_attn_probs=True, **kw)
        assert_attention_close(out, out64, reference_low_precision=low, name=f"out[{isa}]")
        fin = np.isfinite(lse64)
        assert np.array_equal(np.isposinf(lse), np.isposinf(lse64)), f"lse +inf rows differ [{isa}]"
        tol = 1e-12 if dtype == "f64" else 2e-5
        np.testing.assert_allclose(lse[fin], lse64[fin], rtol=tol, atol=tol, err_msg=f"lse [{isa}]")


def test_isa_paths_are_exercised():
    """The grid above loops over ISAS; make sure at least the scalar oracle is among them."""
    assert "scalar" in ISAS


@pytest.mark.parametrize("isa_name", ["scalar", "avx2", "avx512", "amx"])
def test_isa_selection(isa_name):
    info = fa.cpu_info()
    if isa_name in ISAS:
        with using_isa(isa_name):
            assert fa.cpu_info()["isa"] == isa_name
    else:
        with pytest.raises(ValueError, match="not available"):
            fa.set_isa(isa_name)
        assert fa.cpu_info()["isa"] == info["isa"]


def test_packed_variants_are_views_and_equal():
    rng = np.random.default_rng(0)
    qkv = randn(rng, (2, 77, 3, 4, 40), np.float32)
    a = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    b = fa.flash_attn_func(qkv[:, :, 0].copy(), qkv[:, :, 1].copy(), qkv[:, :, 2].copy(), causal=True)
    np.testing.assert_array_equal(a, b)
    q = randn(rng, (2, 50, 6, 40), np.float32)
    kv = randn(rng, (2, 90, 2, 3, 40), np.float32)
    a = fa.flash_attn_kvpacked_func(q, kv, window_size=(10, 3))
    b = fa.flash_attn_func(q, kv[:, :, 0].copy(), kv[:, :, 1].copy(), window_size=(10, 3))
    np.testing.assert_array_equal(a, b)


def test_positional_arguments_like_flash_attn_tests():
    """flash-attn's tests pass dropout_p by position and window_size as integer-like scalars."""
    rng = np.random.default_rng(1)
    q, k, v = (randn(rng, (1, 33, 2, 16), np.float32) for _ in range(3))
    w = (np.int64(5), np.array(2))
    a = fa.flash_attn_func(q, k, v, 0.0, None, False, w)
    b = ref.flash_attn_func(q, k, v, 0.0, None, False, (5, 2))
    assert_attention_close(a, b)


def test_last_dim_noncontiguous_copies_once():
    rng = np.random.default_rng(2)
    q = randn(rng, (1, 40, 2, 16), np.float32)
    k = randn(rng, (1, 40, 2, 16), np.float32)
    v = randn(rng, (1, 40, 2, 16), np.float32)
    qt = np.asfortranarray(q)  # last dim not contiguous
    assert qt.strides[-1] != qt.itemsize
    np.testing.assert_array_equal(fa.flash_attn_func(qt, k, v), fa.flash_attn_func(q, k, v))


def test_rows_without_keys_give_zero_and_inf_lse():
    rng = np.random.default_rng(3)
    q = randn(rng, (1, 10, 2, 8), np.float32)
    k = randn(rng, (1, 4, 2, 8), np.float32)
    out, lse, _ = fa.flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
    # sq > sk bottom-right causal: the first sq - sk rows see no key.
    assert np.all(out[:, :6] == 0) and np.all(np.isposinf(lse[:, :, :6]))
    assert np.all(np.isfinite(lse[:, :, 6:]))


def test_default_scale_and_explicit_scale():
    rng = np.random.default_rng(4)
    q, k, v = (randn(rng, (1, 20, 2, 24), np.float32) for _ in range(3))
    a = fa.flash_attn_func(q, k, v, softmax_scale=0.3)
    assert_attention_close(a, ref.flash_attn_func(q, k, v, softmax_scale=0.3))
    b = fa.flash_attn_func(q, k, v)
    assert_attention_close(b, ref.flash_attn_func(q, k, v, softmax_scale=24 ** -0.5))


def test_seqlen_one_and_batch_three_all_isas():
    rng = np.random.default_rng(5)
    q = randn(rng, (3, 1, 4, 64), np.float16)
    k = randn(rng, (3, 300, 2, 64), np.float16)
    v = randn(rng, (3, 300, 2, 64), np.float16)
    want = ref.flash_attn_func(q, k, v, causal=True)
    low = ref.flash_attn_func(q, k, v, causal=True, compute_dtype=np.float16)
    for isa in ISAS:
        with using_isa(isa):
            assert_attention_close(fa.flash_attn_func(q, k, v, causal=True), want,
                                   reference_low_precision=low, name=isa)


def test_thread_counts_give_identical_results():
    rng = np.random.default_rng(6)
    q, k, v = (randn(rng, (2, 300, 4, 64), np.float32) for _ in range(3))
    with using_threads(1):
        a = fa.flash_attn_func(q, k, v, causal=True)
    with using_threads(2):
        b = fa.flash_attn_func(q, k, v, causal=True)
    np.testing.assert_array_equal(a, b)


def test_nan_input_does_not_crash():
    rng = np.random.default_rng(7)
    q, k, v = (randn(rng, (1, 70, 2, 16), np.float32) for _ in range(3))
    q[0, 3, 1, 2] = np.nan
    k[0, 5, 0, 0] = np.inf
    out = fa.flash_attn_func(q, k, v)
    assert np.isnan(out[0, 3, 1]).all()  # the NaN query row is NaN, nothing crashed


# ---- dropout --------------------------------------------------------------------------------

def _dropout_inputs(rng, dtype=np.float32, b=2, sq=150, sk=170, h=4, hk=2, d=40):
    return (randn(rng, (b, sq, h, d), dtype), randn(rng, (b, sk, hk, d), dtype),
            randn(rng, (b, sk, hk, d), dtype))


def test_dropout_same_seed_same_result():
    q, k, v = _dropout_inputs(np.random.default_rng(8))
    fa.manual_seed(42)
    a = fa.flash_attn_func(q, k, v, 0.17, causal=True, return_attn_probs=True)
    fa.manual_seed(42)
    b = fa.flash_attn_func(q, k, v, 0.17, causal=True, return_attn_probs=True)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    c = fa.flash_attn_func(q, k, v, 0.17, causal=True)  # the generator advanced: a new mask
    assert not np.array_equal(a[0], c)


def test_dropout_independent_of_threads_and_isa():
    q, k, v = _dropout_inputs(np.random.default_rng(9))
    results = []
    for isa in ISAS:
        for n in (1, 2):
            with using_isa(isa), using_threads(n):
                out, lse, rng_state = fa.flash_attn_fwd(q, k, v, 0.3, seed=1234)
                results.append((isa, n, out))
    for isa, n, out in results[1:]:
        # Masks are identical; values agree to rounding across ISAs and bitwise across threads.
        if isa == results[0][0]:
            np.testing.assert_array_equal(out, results[0][2])
        else:
            np.testing.assert_allclose(out, results[0][2], rtol=1e-4, atol=1e-5)


def test_dropout_fraction():
    rng = np.random.default_rng(10)
    q, k, v = _dropout_inputs(rng, b=1, sq=512, sk=512, h=4, hk=4, d=16)
    for p in (0.1, 0.17, 0.5):
        _, _, s = fa.flash_attn_func(q, k, v, p, return_attn_probs=True)
        frac = np.signbit(s).mean()
        assert abs(frac - p) <= 0.01, (p, frac)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f16", "f64"])
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_output_matches_reported_mask(dtype, causal):
    rng = np.random.default_rng(11)
    q, k, v = _dropout_inputs(rng, DTYPES[dtype])
    p = 0.17
    out, lse, s = fa.flash_attn_func(q, k, v, p, causal=causal, return_attn_probs=True)
    keep = ~np.signbit(s)
    want, lse64, probs = ref.flash_attn_func(q, k, v, p, causal=causal, return_attn_probs=True,
                                             dropout_mask=keep)
    low = None
    if q.dtype != np.float64:
        low = ref.flash_attn_func(q, k, v, p, causal=causal, dropout_mask=keep,
                                  compute_dtype=q.dtype)
    assert_attention_close(out, want, reference_low_precision=low)
    # S_dmask holds the normalized probabilities (magnitude) of the reference.
    np.testing.assert_allclose(np.abs(s), np.abs(probs), rtol=1e-4, atol=1e-6)


def test_rng_state_round_trip():
    q, k, v = _dropout_inputs(np.random.default_rng(12))
    out, lse, st = fa.flash_attn_fwd(q, k, v, 0.2)
    assert st.dtype == np.int64 and st.shape == (2,)
    out2, _, st2 = fa.flash_attn_fwd(q, k, v, 0.2, seed=st)
    np.testing.assert_array_equal(out, out2)
    np.testing.assert_array_equal(st, st2)


# ---- varlen ---------------------------------------------------------------------------------

def _varlen(rng, lens_q, lens_k, h, hk, d, dtype):
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    q = randn(rng, (cq[-1], h, d), dtype)
    k = randn(rng, (ck[-1], hk, d), dtype)
    v = randn(rng, (ck[-1], hk, d), dtype)
    return q, k, v, cq, ck


VARLEN = list(itertools.product(["f32", "bf16"], [False, True], [(-1, -1), (20, 5)],
                                [None, "alibi"], [0.0, 15.0]))


@pytest.mark.parametrize("dtype,causal,window,alibi,softcap", VARLEN)
def test_varlen_grid(dtype, causal, window, alibi, softcap):
    rng = np.random.default_rng(13)
    lens_q, lens_k = [5, 70, 1, 130, 0, 64], [9, 70, 200, 3, 4, 65]
    q, k, v, cq, ck = _varlen(rng, lens_q, lens_k, 6, 2, 59, DTYPES[dtype])
    slopes = rng.uniform(0.01, 0.3, (6,)).astype(np.float32) if alibi else None
    kw = dict(causal=causal, window_size=window, alibi_slopes=slopes, softcap=softcap)
    args = (q, k, v, cq, ck, 140, 210)  # max_seqlen_* larger than needed: upper bounds
    want, lse64, _ = ref.flash_attn_varlen_func(*args, return_attn_probs=True, **kw)
    low = ref.flash_attn_varlen_func(*args, compute_dtype=q.dtype, **kw)
    for isa in ISAS:
        with using_isa(isa):
            out, lse, _ = fa.flash_attn_varlen_func(*args, return_attn_probs=True, **kw)
        assert lse.shape == (6, q.shape[0])
        assert_attention_close(out, want, reference_low_precision=low, name=f"out[{isa}]")
        fin = np.isfinite(lse64)
        np.testing.assert_allclose(lse[fin], lse64[fin], rtol=2e-5, atol=2e-5)


def test_varlen_packed_and_paged():
    rng = np.random.default_rng(14)
    lens = [33, 1, 100, 64]
    q, k, v, cq, _ = _varlen(rng, lens, lens, 4, 4, 32, np.float32)
    qkv = np.stack([q, k, v], axis=1)
    a = fa.flash_attn_varlen_qkvpacked_func(qkv, cq, 100, causal=True)
    assert_attention_close(a, ref.flash_attn_varlen_func(q, k, v, cq, cq, 100, 100, causal=True))
    kv = np.stack([k, v], axis=1)
    b = fa.flash_attn_varlen_kvpacked_func(q, kv, cq, cq, 100, 100)
    assert_attention_close(b, ref.flash_attn_varlen_func(q, k, v, cq, cq, 100, 100))
    # Paged: the same keys scattered over blocks of 16 rows.
    page, nblk = 16, 40
    kp = randn(rng, (nblk, page, 4, 32), np.float32)
    vp = randn(rng, (nblk, page, 4, 32), np.float32)
    bt = rng.permutation(nblk)[:4 * 7].reshape(4, 7).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum([20, 112, 5, 64])]).astype(np.int32)
    want = ref.flash_attn_varlen_func(q, kp, vp, cq, ck, 100, 112, causal=True, block_table=bt)
    for isa in ISAS:
        with using_isa(isa):
            got = fa.flash_attn_varlen_func(q, kp, vp, cq, ck, 100, 112, causal=True, block_table=bt)
        assert_attention_close(got, want, name=isa)


def test_varlen_dropout_mask_matches():
    rng = np.random.default_rng(15)
    q, k, v, cq, ck = _varlen(rng, [40, 90], [50, 80], 2, 2, 16, np.float32)
    out, lse, s = fa.flash_attn_varlen_func(q, k, v, cq, ck, 90, 80, 0.25, causal=True,
                                            return_attn_probs=True)
    assert s.shape == (2, 2, 90, 80)
    want = ref.flash_attn_varlen_func(q, k, v, cq, ck, 90, 80, 0.25, causal=True,
                                      dropout_mask=~np.signbit(s))
    assert_attention_close(out, want)
