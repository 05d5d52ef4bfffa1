"""PFA / IFA / FIA (flash_attn_c.npu_infer) against the naive reference (reference_npu_infer).

Tolerance is flash-attn's rule through flash_attn_c.testing: the error against the float64
reference may be at most twice that of the reference computed in the input precision, plus a
small absolute term. Sizes are small and odd (rows that straddle nothing, Sq > Skv and Sq < Skv)
so the whole file runs in seconds.
"""
import itertools

import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import bfloat16
from flash_attn_c import reference as R
from flash_attn_c.testing import assert_attention_close, assert_lse_close

from conftest import using_threads

INT32_MAX = 2147483647
DTYPES = [np.float32, np.float16, bfloat16]
COMPRESSED = np.triu(np.ones((2048, 2048), bool), 1)


# ---- inputs --------------------------------------------------------------------------------------

def to_layout(x, layout):
    """(B, S, N, D) -> the layout's array (contiguous)."""
    if layout == "BSH":
        return np.ascontiguousarray(x.reshape(x.shape[0], x.shape[1], -1))
    if layout == "BSND":
        return np.ascontiguousarray(x)
    if layout == "BNSD":
        return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
    raise AssertionError(layout)


def randn(rng, shape, dtype):
    x = rng.standard_normal(shape).astype(dtype)
    x[x == 0] = 0.5
    return x


def qkv(rng, b, sq, sk, n, nkv, d, dtype, layout):
    q = randn(rng, (b, sq, n, d), dtype)
    k = randn(rng, (b, sk, nkv, d), dtype)
    v = randn(rng, (b, sk, nkv, d), dtype)
    lay = layout.split("_")[0]
    return to_layout(q, lay), to_layout(k, lay), to_layout(v, lay)


def check(fn, ref, args, kwargs, dtype, lse=False):
    """Run the library and the reference (float64 and input precision) and compare."""
    got = fn(*args, **kwargs)
    exact = ref(*args, **kwargs)
    low = ref(*args, compute_dtype=dtype, **kwargs)
    if lse:
        assert_attention_close(got[0], exact[0], reference_low_precision=low[0])
        assert got[1].dtype == np.float32
        assert_lse_close(got[1], exact[1].astype(np.float32), rtol=1e-4, atol=1e-4)
        return got
    assert got.dtype == np.dtype(dtype)
    assert_attention_close(got, exact, reference_low_precision=low)
    return got


def mode_args(mode, rng, b, sq, sk, mask_ndim=2):
    """atten_mask / sparse_mode / tokens for one sparse mode (None: no mask)."""
    if mode is None:
        return {}
    if mode in (2, 3, 4):
        kw = dict(atten_mask=COMPRESSED, sparse_mode=mode)
        if mode == 4:
            kw.update(pre_tokens=4, next_tokens=1)
        return kw
    shape = {2: (sq, sk), 3: (b, sq, sk), 4: (b, 1, sq, sk)}[mask_ndim]
    m = rng.random(shape) < 0.3
    kw = dict(atten_mask=m, sparse_mode=mode)
    if mode == 0:
        kw.update(pre_tokens=5, next_tokens=2)
    return kw


# ---- PFA ---------------------------------------------------------------------------------------

PFA_CASES = list(itertools.product(["BSH", "BSND", "BNSD", "BNSD_BSND"], [None, 0, 1, 2, 3, 4],
                                   range(3)))


@pytest.mark.parametrize("layout,mode,di", PFA_CASES)
def test_pfa_grid(layout, mode, di):
    dtype = DTYPES[di]
    i = PFA_CASES.index((layout, mode, di))
    rng = np.random.default_rng(i)
    n, nkv = [(4, 4), (4, 2), (6, 1)][i % 3]
    sq, sk = [(13, 21), (21, 13), (17, 17)][(i // 3) % 3]
    b, d = 2, 16
    q, k, v = qkv(rng, b, sq, sk, n, nkv, d, dtype, layout)
    kw = dict(num_heads=n, num_key_value_heads=0 if n == nkv else nkv, scale_value=0.25,
              input_layout=layout, **mode_args(mode, rng, b, sq, sk, mask_ndim=2 + i % 3))
    if i % 2:
        kw.update(actual_seq_lengths=[sq - 3, sq], actual_seq_lengths_kv=[sk, sk - 5])
    out = check(fa.npu_prompt_flash_attention, R.npu_prompt_flash_attention, (q, k, v), kw, dtype)
    assert out.shape == (q.shape if layout in ("BSH", "BSND", "BNSD") else
                         (b, sq, n, d))


@pytest.mark.parametrize("mode", [None, 0, 1, 2, 3, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_pfa_tnd(mode, dtype):
    rng = np.random.default_rng(7)
    lq, lk = [5, 0, 9, 4], [7, 3, 9, 2]
    n, nkv, d = 4, 2, 16
    tq, tk = sum(lq) + 2, sum(lk) + 1  # spare rows past the sequences
    q = randn(rng, (tq, n, d), dtype)
    k = randn(rng, (tk, nkv, d), dtype)
    v = randn(rng, (tk, nkv, d), dtype)
    kw = dict(num_heads=n, num_key_value_heads=nkv, scale_value=0.3, input_layout="TND",
              actual_seq_lengths=np.cumsum(lq).tolist(), actual_seq_lengths_kv=np.cumsum(lk).tolist())
    if mode is not None:
        kw.update(mode_args(mode, rng, 1, 9, 9))
        if mode == 3:  # right-down causal needs Sq <= Skv per batch to leave no empty row
            kw["actual_seq_lengths_kv"] = np.cumsum([7, 3, 9, 4]).tolist()
            k, v = randn(rng, (24, nkv, d), dtype), randn(rng, (24, nkv, d), dtype)
    out = check(fa.npu_prompt_flash_attention, R.npu_prompt_flash_attention, (q, k, v), kw, dtype)
    assert np.all(np.asarray(out[sum(lq):], np.float32) == 0)


def test_pfa_empty_kv_and_zero_lengths():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 3, 4, 6, 2, 2, 8, np.float32, "BSND")
    out = fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                        actual_seq_lengths=[4, 0, 2],
                                        actual_seq_lengths_kv=[0, 6, 6])
    assert np.all(out[0] == 0) and np.all(out[1] == 0) and np.all(out[2, 2:] == 0)
    ref = R.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                       actual_seq_lengths=[4, 0, 2], actual_seq_lengths_kv=[0, 6, 6])
    assert_attention_close(out, ref)
    k0, v0 = k[:, :0], v[:, :0]
    assert np.all(fa.npu_prompt_flash_attention(q, k0, v0, num_heads=2, input_layout="BSND") == 0)


def test_pfa_pse_shift_after_scale():
    rng = np.random.default_rng(4)
    for dtype in DTYPES:
        q, k, v = qkv(rng, 2, 5, 9, 4, 2, 16, dtype, "BNSD")
        pse = randn(rng, (1, 4, 5, 9), dtype)
        kw = dict(num_heads=4, num_key_value_heads=2, scale_value=0.5, input_layout="BNSD",
                  pse_shift=pse, atten_mask=np.tril(np.ones((5, 9), bool), -3), sparse_mode=1)
        check(fa.npu_prompt_flash_attention, R.npu_prompt_flash_attention, (q, k, v), kw, dtype)
    # pse enters after the scale: scale 0 leaves softmax(pse)
    q, k, v = qkv(rng, 1, 3, 4, 1, 1, 8, np.float64, "BSND")
    pse = rng.standard_normal((1, 1, 3, 4))
    out = fa.npu_prompt_flash_attention(q, k, v, num_heads=1, input_layout="BSND", scale_value=0.0,
                                        pse_shift=pse)
    p = np.exp(pse[0, 0]) / np.exp(pse[0, 0]).sum(-1, keepdims=True)
    np.testing.assert_allclose(out[0, :, 0], p @ v[0, :, 0], rtol=1e-12)


def test_pfa_next_tokens_default_is_causal_with_mask():
    rng = np.random.default_rng(5)
    q, k, v = qkv(rng, 1, 6, 6, 2, 2, 8, np.float32, "BSND")
    none = np.zeros((6, 6), bool)
    a = fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND", atten_mask=none)
    b = fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                      atten_mask=COMPRESSED, sparse_mode=2)
    np.testing.assert_array_equal(a, b)
    c = fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND")  # no mask: full
    assert np.abs(c - a).max() > 1e-3


# ---- IFA ---------------------------------------------------------------------------------------

def paged_cache(rng, k, v, layout, block_size, lengths):
    """Scatter contiguous (B, S, N, D) keys into a shuffled paged cache; returns cache tensors in
    the layout's cache form and the block table (int32, unused entries -1)."""
    b, s, nkv, d = k.shape
    nblk = -(-s // block_size)
    total = b * nblk + 3
    perm = rng.permutation(total)
    table = np.full((b, nblk), -1, np.int32)
    kc = np.zeros((total, block_size, nkv, d), k.dtype)
    vc = np.zeros_like(kc)
    for bi in range(b):
        for j in range(-(-lengths[bi] // block_size)):
            blk = perm[bi * nblk + j]
            table[bi, j] = blk
            rows = k[bi, j * block_size:(j + 1) * block_size]
            kc[blk, :rows.shape[0]] = rows
            vc[blk, :rows.shape[0]] = v[bi, j * block_size:(j + 1) * block_size]
    if layout == "BNSD":
        kc, vc = (np.ascontiguousarray(c.transpose(0, 2, 1, 3)) for c in (kc, vc))
    elif layout == "BSH":
        kc, vc = (c.reshape(total, block_size, nkv * d) for c in (kc, vc))
    return kc, vc, table


IFA_CASES = list(itertools.product(["BSH", "BSND", "BNSD"], ["plain", "lengths", "paged", "padded"],
                                   range(3)))


@pytest.mark.parametrize("layout,kvmode,di", IFA_CASES)
def test_ifa_grid(layout, kvmode, di):
    dtype = DTYPES[di]
    i = IFA_CASES.index((layout, kvmode, di))
    rng = np.random.default_rng(100 + i)
    b, sk, d = 3, 45, 32
    n, nkv = [(8, 2), (4, 4), (4, 1)][i % 3]
    q4 = randn(rng, (b, 1, n, d), dtype)
    k4 = randn(rng, (b, sk, nkv, d), dtype)
    v4 = randn(rng, (b, sk, nkv, d), dtype)
    lengths = [45, 17, 1]
    kw = dict(num_heads=n, num_key_value_heads=nkv, scale_value=0.2, input_layout=layout)
    q = to_layout(q4, layout)
    k, v = to_layout(k4, layout), to_layout(v4, layout)
    if kvmode != "plain":
        kw["actual_seq_lengths"] = lengths
    if kvmode == "paged":
        k, v, table = paged_cache(rng, k4, v4, layout, 16, lengths)
        kw.update(block_table=table, block_size=16)
    if kvmode == "padded":
        kw["actual_seq_lengths"] = [40, 17, 1]
        kw["kv_padding_size"] = np.array([3], np.int64)
    if i % 2:
        kw["atten_mask"] = rng.random((b, 1, 1, sk if kvmode != "paged" else 48)) < 0.2
    if i % 3 == 2:
        kw["pse_shift"] = randn(rng, (1, n, 1, sk if kvmode != "paged" else 48), dtype)
    out = check(fa.npu_incre_flash_attention, R.npu_incre_flash_attention, (q, k, v), kw, dtype)
    assert out.shape == q.shape


def test_ifa_paged_equals_contiguous():
    rng = np.random.default_rng(11)
    b, sk, n, nkv, d = 2, 70, 4, 2, 16
    q4 = randn(rng, (b, 1, n, d), np.float32)
    k4 = randn(rng, (b, sk, nkv, d), np.float32)
    v4 = randn(rng, (b, sk, nkv, d), np.float32)
    lengths = [70, 33]
    for layout in ("BSH", "BNSD"):
        q = to_layout(q4, layout)
        kc, vc, table = paged_cache(rng, k4, v4, layout, 32, lengths)
        a = fa.npu_incre_flash_attention(q, kc, vc, num_heads=n, num_key_value_heads=nkv,
                                         input_layout=layout, block_table=table, block_size=32,
                                         actual_seq_lengths=lengths)
        c = fa.npu_incre_flash_attention(q, to_layout(k4, layout), to_layout(v4, layout),
                                         num_heads=n, num_key_value_heads=nkv,
                                         input_layout=layout, actual_seq_lengths=lengths)
        np.testing.assert_allclose(a, c, rtol=1e-6, atol=1e-6)


def test_ifa_padding_out_of_range_gives_zero():
    rng = np.random.default_rng(12)
    q, k, v = qkv(rng, 2, 1, 10, 2, 2, 8, np.float32, "BSND")
    out = fa.npu_incre_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                       actual_seq_lengths=[9, 4], kv_padding_size=np.array([3]))
    assert np.all(out[0] == 0) and np.any(out[1] != 0)


# ---- FIA ---------------------------------------------------------------------------------------

FIA_LAYOUTS = ["BSH", "BSND", "BNSD", "BNSD_BSND", "BSH_NBSD", "BSND_NBSD", "BNSD_NBSD"]


@pytest.mark.parametrize("layout", FIA_LAYOUTS)
@pytest.mark.parametrize("sq", [1, 11])
def test_fia_layouts_and_lse(layout, sq):
    i = FIA_LAYOUTS.index(layout)
    dtype = DTYPES[i % 3]
    rng = np.random.default_rng(200 + i + sq)
    b, sk, n, nkv, d = 2, 19, 4, 2, 16
    q, k, v = qkv(rng, b, sq, sk, n, nkv, d, dtype, layout)
    kw = dict(num_heads=n, num_key_value_heads=nkv, scale=0.3, input_layout=layout,
              softmax_lse_flag=True, actual_seq_lengths_kv=[19, 12])
    if sq > 1:
        kw.update(mode_args([0, 3, 4, 1][i % 4], rng, b, sq, sk))
        kw["actual_seq_lengths"] = [11, 8]
    out, lse = check(fa.npu_fused_infer_attention_score, R.npu_fused_infer_attention_score,
                     (q, k, v), kw, dtype, lse=True)
    assert lse.shape == (b, n, sq, 1)
    out_lay = layout.split("_")[-1]
    want = {"BSH": (b, sq, n * d), "BSND": (b, sq, n, d), "BNSD": (b, n, sq, d),
            "NBSD": (n, b, sq, d)}[out_lay]
    assert out.shape == want


@pytest.mark.parametrize("layout", ["TND", "TND_NTD", "NTD_TND"])
def test_fia_tnd_layouts(layout):
    rng = np.random.default_rng(300)
    lq, lk = [3, 6, 1], [8, 6, 5]
    n, nkv, d = 4, 4, 16
    q = randn(rng, (sum(lq), n, d), np.float16)
    k = randn(rng, (sum(lk), nkv, d), np.float16)
    v = randn(rng, (sum(lk), nkv, d), np.float16)
    if layout.startswith("NTD"):
        q, k, v = (np.ascontiguousarray(x.transpose(1, 0, 2)) for x in (q, k, v))
    kw = dict(num_heads=n, scale=0.25, input_layout=layout, softmax_lse_flag=True,
              actual_seq_lengths=np.cumsum(lq).tolist(), actual_seq_lengths_kv=np.cumsum(lk).tolist(),
              atten_mask=COMPRESSED, sparse_mode=3)
    out, lse = check(fa.npu_fused_infer_attention_score, R.npu_fused_infer_attention_score,
                     (q, k, v), kw, np.float16, lse=True)
    assert lse.shape == (sum(lq), n, 1)
    assert out.shape == ((n, sum(lq), d) if layout.endswith("NTD") else (sum(lq), n, d))


def test_fia_lse_flag_off_and_paged():
    rng = np.random.default_rng(301)
    b, sk, n, d = 2, 40, 4, 16
    q4 = randn(rng, (b, 5, n, d), bfloat16)
    k4 = randn(rng, (b, sk, 2, d), bfloat16)
    v4 = randn(rng, (b, sk, 2, d), bfloat16)
    kc, vc, table = paged_cache(rng, k4, v4, "BSND", 16, [40, 23])
    kw = dict(num_heads=n, num_key_value_heads=2, input_layout="BSND", block_table=table,
              block_size=16, actual_seq_lengths_kv=[40, 23], atten_mask=COMPRESSED, sparse_mode=3)
    out, lse = check(fa.npu_fused_infer_attention_score, R.npu_fused_infer_attention_score,
                     (q4, kc, vc), kw, bfloat16, lse=True)
    assert lse.shape == (1,) and lse.dtype == np.float32 and lse[0] == 0
    contiguous, _ = fa.npu_fused_infer_attention_score(
        q4, k4, v4, num_heads=n, num_key_value_heads=2, input_layout="BSND",
        actual_seq_lengths_kv=[40, 23], atten_mask=COMPRESSED, sparse_mode=3)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(contiguous, np.float32),
                               rtol=1e-2, atol=1e-2)


def test_fia_invalid_line_correction():
    rng = np.random.default_rng(302)
    q, k, v = qkv(rng, 1, 4, 6, 2, 2, 8, np.float32, "BSND")
    m = np.zeros((4, 6), bool)
    m[1] = True  # row 1: every key masked
    kw = dict(num_heads=2, input_layout="BSND", atten_mask=m, sparse_mode=1, softmax_lse_flag=True)
    mean, _ = fa.npu_fused_infer_attention_score(q, k, v, **kw)
    np.testing.assert_allclose(mean[0, 1], v[0].mean(axis=0), rtol=1e-5, atol=1e-6)
    zero, _ = fa.npu_fused_infer_attention_score(q, k, v, inner_precise=2, **kw)
    assert np.all(zero[0, 1] == 0)
    np.testing.assert_array_equal(zero[0, [0, 2, 3]], mean[0, [0, 2, 3]])
    check(fa.npu_fused_infer_attention_score, R.npu_fused_infer_attention_score, (q, k, v),
          dict(inner_precise=3, **kw), np.float32, lse=True)


# ---- equivalences ------------------------------------------------------------------------------

def test_incre_equals_prompt_for_one_token():
    rng = np.random.default_rng(400)
    for layout in ("BSH", "BSND", "BNSD"):
        q, k, v = qkv(rng, 3, 1, 30, 8, 2, 16, np.float16, layout)
        common = dict(num_heads=8, num_key_value_heads=2, scale_value=0.2, input_layout=layout)
        a = fa.npu_incre_flash_attention(q, k, v, actual_seq_lengths=[30, 7, 19], **common)
        b = fa.npu_prompt_flash_attention(q, k, v, actual_seq_lengths_kv=[30, 7, 19], **common)
        np.testing.assert_array_equal(a, b)


def test_fia_dispatch():
    rng = np.random.default_rng(401)
    # Q_S == 1: the decode path, sparse_mode and tokens ignored, decode mask shape (B, Skv)
    q, k, v = qkv(rng, 2, 1, 25, 4, 4, 16, np.float32, "BNSD")
    mask = rng.random((2, 25)) < 0.3
    a, _ = fa.npu_fused_infer_attention_score(q, k, v, num_heads=4, scale=0.5, input_layout="BNSD",
                                              atten_mask=mask, actual_seq_lengths_kv=[25, 9],
                                              sparse_mode=0, pre_tokens=0, next_tokens=0)
    b = fa.npu_incre_flash_attention(q, k, v, num_heads=4, scale_value=0.5, input_layout="BNSD",
                                     atten_mask=mask, actual_seq_lengths=[25, 9])
    np.testing.assert_array_equal(a, b)
    # Q_S > 1: the prefill path
    q, k, v = qkv(rng, 2, 9, 25, 4, 4, 16, np.float32, "BSH")
    mask = rng.random((9, 25)) < 0.3
    common = dict(num_heads=4, input_layout="BSH", atten_mask=mask, pre_tokens=6, next_tokens=4,
                  actual_seq_lengths=[9, 5], actual_seq_lengths_kv=[20, 25])
    a, _ = fa.npu_fused_infer_attention_score(q, k, v, scale=0.4, **common)
    b = fa.npu_prompt_flash_attention(q, k, v, scale_value=0.4, **common)
    np.testing.assert_array_equal(a, b)


def test_bsh_equals_bsnd_and_bnsd():
    rng = np.random.default_rng(402)
    q4 = randn(rng, (2, 7, 4, 8), np.float32)
    k4 = randn(rng, (2, 11, 2, 8), np.float32)
    v4 = randn(rng, (2, 11, 2, 8), np.float32)
    outs = {}
    for layout in ("BSH", "BSND", "BNSD"):
        o = fa.npu_prompt_flash_attention(*(to_layout(x, layout) for x in (q4, k4, v4)),
                                          num_heads=4, num_key_value_heads=2, input_layout=layout,
                                          atten_mask=COMPRESSED, sparse_mode=3)
        outs[layout] = o.reshape(2, 7, 4, 8) if layout == "BSH" else (
            o.transpose(0, 2, 1, 3) if layout == "BNSD" else o)
    np.testing.assert_array_equal(outs["BSH"], outs["BSND"])
    np.testing.assert_array_equal(outs["BNSD"], outs["BSND"])


def test_strided_inputs():
    rng = np.random.default_rng(403)
    q, k, v = qkv(rng, 2, 6, 9, 2, 2, 8, np.float32, "BSND")
    qs = np.ascontiguousarray(np.repeat(q, 2, axis=1))[:, ::2]  # strided S, contiguous D
    a = fa.npu_prompt_flash_attention(qs, k, v, num_heads=2, input_layout="BSND")
    b = fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND")
    np.testing.assert_array_equal(a, b)


# ---- errors ------------------------------------------------------------------------------------

def _small():
    rng = np.random.default_rng(500)
    return qkv(rng, 2, 1, 8, 2, 2, 8, np.float16, "BSND")


@pytest.mark.parametrize("name", ["deq_scale1", "quant_scale1", "deq_scale2", "quant_scale2",
                                  "quant_offset2"])
def test_pfa_quant_rejected(name):
    q, k, v = _small()
    with pytest.raises(NotImplementedError, match=f"{name}: quantization is not supported"):
        fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                      **{name: np.ones(1, np.float32)})


@pytest.mark.parametrize("name", ["antiquant_scale", "antiquant_offset", "dequant_scale1",
                                  "quant_scale2"])
def test_ifa_quant_rejected(name):
    q, k, v = _small()
    with pytest.raises(NotImplementedError, match="quantization is not supported"):
        fa.npu_incre_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                     **{name: np.ones(1, np.float32)})


@pytest.mark.parametrize("kw,exc,match", [
    (dict(key_antiquant_scale=np.ones(1)), NotImplementedError, "quantization"),
    (dict(value_antiquant_offset=np.ones(1)), NotImplementedError, "quantization"),
    (dict(antiquant_mode=1), NotImplementedError, "antiquant_mode"),
    (dict(query_rope=np.ones(1)), NotImplementedError, "query_rope"),
    (dict(key_shared_prefix=np.ones(1)), NotImplementedError, "key_shared_prefix"),
    (dict(inner_precise=4), ValueError, "inner_precise"),
    (dict(softmax_lse_flag="yes"), TypeError, "softmax_lse_flag"),
    (dict(input_layout="SBH"), ValueError, "input_layout"),
    (dict(input_layout=3), TypeError, "input_layout"),
    (dict(num_heads=3), ValueError, "num_heads"),
    (dict(num_heads=2.0), TypeError, "num_heads"),
    (dict(num_key_value_heads=3), ValueError, "num_key_value_heads"),
    (dict(num_key_value_heads=1), ValueError, "num_key_value_heads"),
    (dict(sparse_mode=5), ValueError, "sparse_mode"),
    (dict(scale="x"), TypeError, "scale"),
    (dict(atten_mask=np.zeros((2, 8), np.float32)), TypeError, "atten_mask"),
    (dict(atten_mask=np.zeros((2, 7), bool)), ValueError, "atten_mask"),
    (dict(pse_shift=np.zeros((1, 2, 1, 8), np.float32)), TypeError, "pse_shift"),
    (dict(pse_shift=np.zeros((1, 3, 1, 8), np.float16)), ValueError, "pse_shift"),
    (dict(actual_seq_lengths_kv=[9, 1]), ValueError, "actual_seq_lengths_kv"),
    (dict(actual_seq_lengths_kv=[1.5]), TypeError, "actual_seq_lengths_kv"),
    (dict(actual_seq_lengths_kv=[3, 4, 5, 6][:0]), ValueError, "actual_seq_lengths_kv"),
    (dict(block_table=np.zeros((2, 1), np.int32), block_size=8), ValueError, "actual_seq_lengths"),
    (dict(block_table=np.zeros((2, 1), np.int32), block_size=4, actual_seq_lengths_kv=[2, 2]),
     ValueError, "block_size"),
    (dict(block_table=np.zeros((2, 1), np.float32), block_size=8, actual_seq_lengths_kv=[2, 2]),
     TypeError, "block_table"),
    (dict(kv_padding_size=np.array([9])), ValueError, "kv_padding_size"),
    (dict(kv_padding_size=np.array([1])), ValueError, "kv_padding_size"),
])
def test_fia_errors(kw, exc, match):
    q, k, v = _small()
    args = dict(num_heads=2, input_layout="BSND")
    args.update(kw)
    with pytest.raises(exc, match=match):
        fa.npu_fused_infer_attention_score(q, k, v, **args)


def test_other_errors():
    q, k, v = _small()
    with pytest.raises(ValueError, match="sequence length of 1"):
        fa.npu_incre_flash_attention(np.concatenate([q, q], 1), k, v, num_heads=2,
                                     input_layout="BSND")
    with pytest.raises(ValueError, match="input_layout"):
        fa.npu_incre_flash_attention(q, k, v, num_heads=2, input_layout="TND")
    with pytest.raises(ValueError, match="num_key_value_heads"):
        qh, kh = q.reshape(2, 1, 16), k.reshape(2, 8, 16)
        fa.npu_incre_flash_attention(qh, kh[..., :8], kh[..., :8], num_heads=2)
    with pytest.raises(ValueError, match="inner_precise"):
        fa.npu_incre_flash_attention(q, k, v, num_heads=2, input_layout="BSND", inner_precise=2)
    with pytest.raises(NotImplementedError, match="padding_mask"):
        fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                      padding_mask=np.zeros((1, 8), bool))
    with pytest.raises(TypeError, match="key"):
        fa.npu_prompt_flash_attention(q, k.astype(np.float32), v, num_heads=2, input_layout="BSND")
    with pytest.raises(TypeError, match="query"):
        fa.npu_prompt_flash_attention(q.astype(np.int32), k, v, num_heads=2, input_layout="BSND")
    with pytest.raises(ValueError, match="query"):
        fa.npu_prompt_flash_attention(q[0], k, v, num_heads=2, input_layout="BSND")
    with pytest.raises(ValueError, match="actual_seq_lengths"):
        fa.npu_prompt_flash_attention(q[:, 0], k[:, 0], v[:, 0], num_heads=2, input_layout="TND")
    with pytest.raises(ValueError, match="actual_seq_lengths"):
        fa.npu_prompt_flash_attention(q[:, 0], k[:, 0], v[:, 0], num_heads=2, input_layout="TND",
                                      actual_seq_lengths=[2, 1], actual_seq_lengths_kv=[1, 2])
    with pytest.raises(NotImplementedError, match="pse_shift"):
        fa.npu_prompt_flash_attention(q[:, 0], k[:, 0], v[:, 0], num_heads=2, input_layout="TND",
                                      actual_seq_lengths=[2], actual_seq_lengths_kv=[2],
                                      pse_shift=np.zeros((1, 2, 2, 2), np.float16))
    with pytest.raises(NotImplementedError, match="block_table"):
        fa.npu_fused_infer_attention_score(q[:, 0], k[:, 0], v[:, 0], num_heads=2,
                                           input_layout="TND", actual_seq_lengths=[2],
                                           actual_seq_lengths_kv=[2],
                                           block_table=np.zeros((1, 1), np.int32), block_size=2)
    with pytest.raises(ValueError, match="pre_tokens"):
        fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                      atten_mask=np.zeros((1, 8), bool), pre_tokens=-2,
                                      next_tokens=1)
    with pytest.raises(ValueError, match="atten_mask"):
        fa.npu_prompt_flash_attention(q, k, v, num_heads=2, input_layout="BSND",
                                      atten_mask=np.zeros((8, 8), bool), sparse_mode=2)
    with pytest.raises(ValueError, match="block_table"):
        kc = k.reshape(2, 8, 16)
        fa.npu_incre_flash_attention(q, kc, kc, num_heads=2, input_layout="BSND",
                                     block_table=np.array([[0], [5]], np.int32), block_size=8,
                                     actual_seq_lengths=[8, 8])


@pytest.mark.parametrize("mode", [None, 0, 1, 2, 3, 4])
def test_prompt_matches_fusion_attention_without_pse(mode):
    """With full lengths and no pse_shift, PFA is npu_fusion_attention (spec section 10: the same
    sparse modes): checks both references against each other and the library against both."""
    rng = np.random.default_rng(600 + (mode or 0))
    for layout, (sq, sk) in (("BSND", (9, 14)), ("BNSD", (14, 9))):
        q, k, v = qkv(rng, 2, sq, sk, 4, 2, 16, np.float64, layout)
        kw = mode_args(mode, rng, 2, sq, sk, mask_ndim=2)
        kw.setdefault("pre_tokens", INT32_MAX)
        kw.setdefault("next_tokens", INT32_MAX)
        fus = R.npu_fusion_attention(q, k, v, 4, layout, atten_mask=kw.get("atten_mask"),
                                     scale=0.3, pre_tockens=kw["pre_tokens"],
                                     next_tockens=kw["next_tokens"],
                                     sparse_mode=kw.get("sparse_mode", 0))[0]
        ref = R.npu_prompt_flash_attention(q, k, v, num_heads=4, num_key_value_heads=2,
                                           scale_value=0.3, input_layout=layout, **kw)
        got = fa.npu_prompt_flash_attention(q, k, v, num_heads=4, num_key_value_heads=2,
                                            scale_value=0.3, input_layout=layout, **kw)
        np.testing.assert_allclose(ref, fus, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(got, fus, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", DTYPES)
def test_every_isa_and_thread_count(isa, dtype):
    """The inference-only kernel path (pse after scale) with paging, masks and lengths on each
    kernel family, single- and multi-threaded."""
    rng = np.random.default_rng(700)
    b, sq, sk, n, nkv, d = 2, 37, 70, 4, 2, 40
    q4 = randn(rng, (b, sq, n, d), dtype)
    k4 = randn(rng, (b, sk, nkv, d), dtype)
    v4 = randn(rng, (b, sk, nkv, d), dtype)
    kc, vc, table = paged_cache(rng, k4, v4, "BNSD", 16, [70, 51])
    kw = dict(num_heads=n, num_key_value_heads=nkv, scale=0.2, input_layout="BNSD_BSND",
              block_table=table, block_size=16, actual_seq_lengths=[37, 20],
              actual_seq_lengths_kv=[70, 51], atten_mask=rng.random((sq, 80)) < 0.2,
              pre_tokens=30, next_tokens=40, pse_shift=randn(rng, (b, n, sq, 80), dtype),
              softmax_lse_flag=True)
    q = to_layout(q4, "BNSD")
    for threads in (1, 3):
        with using_threads(threads):
            check(fa.npu_fused_infer_attention_score, R.npu_fused_infer_attention_score,
                  (q, kc, vc), kw, dtype, lse=True)
