"""Tests of flash_attn_c.testing: the tolerance rule, its report, and the helpers."""

import ml_dtypes
import numpy as np
import pytest

from flash_attn_c import reference as ref
from flash_attn_c import testing

BF16 = ml_dtypes.bfloat16


def desired_out(seed=0, shape=(2, 5, 3, 4)):
    return np.random.default_rng(seed).standard_normal(shape)


def test_passes_on_close_arrays_with_baseline():
    d = desired_out()
    base = d.astype(np.float16)                          # low-precision error ~ 1e-3
    actual = (d + 1e-4).astype(np.float16)
    testing.assert_attention_close(actual, d, reference_low_precision=base)


def test_real_kernel_style_check_passes():
    q, k, v = testing.random_qkv(2, 7, 11, 4, 2, 8, np.float16, seed=1)
    desired = ref.flash_attn_func(q, k, v, causal=True)
    baseline = ref.flash_attn_func(q, k, v, causal=True, compute_dtype=np.float16)
    # a "kernel" that computes in float32 and rounds once is far better than the baseline
    actual = ref.flash_attn_func(q, k, v, causal=True, compute_dtype=np.float32).astype(np.float16)
    testing.assert_attention_close(actual, desired, reference_low_precision=baseline)
    testing.assert_attention_close(actual, desired)      # default fp16 tolerance too


def test_fails_on_far_arrays_with_readable_report():
    d = desired_out()
    base = d.astype(np.float16)
    actual = d.astype(np.float16).copy()
    actual[1, 2, 0, 3] += 0.5
    with pytest.raises(AssertionError) as exc:
        testing.assert_attention_close(actual, d, reference_low_precision=base, name="dq")
    msg = str(exc.value)
    assert msg.startswith("dq:")
    assert "(2, 5, 3, 4) float16" in msg
    assert "max abs error" in msg and "(1, 2, 0, 3)" in msg
    assert "mean abs error" in msg
    assert "2 x baseline error" in msg and "atol" in msg and "default for float16" in msg
    assert "baseline (reference_low_precision, float16)" in msg
    assert "non-finite mismatches: 0" in msg


def test_multiplier_and_atol_are_honoured():
    d = desired_out()
    base = d + 1e-3
    actual = d + 2.5e-3
    with pytest.raises(AssertionError):
        testing.assert_attention_close(actual, d, reference_low_precision=base)
    testing.assert_attention_close(actual, d, reference_low_precision=base, multiplier=3.0)
    testing.assert_attention_close(actual, d, reference_low_precision=base, atol=1e-3)


def test_zero_baseline_float32_uses_small_relative_atol():
    d = desired_out().astype(np.float32).astype(np.float64)
    # baseline identical to desired: only atol = 8 eps32 * max|d| is left
    scale = np.abs(d).max()
    ok = (d + 2 * np.finfo(np.float32).eps * scale).astype(np.float32)
    testing.assert_attention_close(ok, d, reference_low_precision=d)
    bad = (d + 1e-4 * scale).astype(np.float32)
    with pytest.raises(AssertionError, match="default for float32"):
        testing.assert_attention_close(bad, d, reference_low_precision=d)


def test_nan_in_actual_fails():
    d = desired_out()
    actual = d.copy()
    actual[0, 0, 0, 0] = np.nan
    actual[1, 1, 1, 1] = np.nan
    with pytest.raises(AssertionError) as exc:
        testing.assert_attention_close(actual, d)
    assert "NaN in actual where desired is not NaN: 2" in str(exc.value)
    assert "(0, 0, 0, 0)" in str(exc.value)
    with pytest.raises(AssertionError, match="NaN in actual"):
        testing.assert_attention_close(actual, d, reference_low_precision=d)


def test_inf_must_match_exactly():
    d = desired_out(shape=(2, 3, 4))
    d[0, 1, 2] = np.inf                                   # lse of a row that sees no key
    ok = d.astype(np.float32)
    testing.assert_lse_close(ok, d)
    testing.assert_attention_close(ok, d)
    finite_instead = ok.copy()
    finite_instead[0, 1, 2] = 1e30
    with pytest.raises(AssertionError, match="desired is \\+-inf but actual differs: 1"):
        testing.assert_lse_close(finite_instead, d)
    wrong_sign = ok.copy()
    wrong_sign[0, 1, 2] = -np.inf
    with pytest.raises(AssertionError, match="desired is \\+-inf"):
        testing.assert_attention_close(wrong_sign, d)
    extra_inf = ok.copy()
    extra_inf[1, 0, 0] = np.inf
    with pytest.raises(AssertionError, match="inf in actual where desired is finite: 1"):
        testing.assert_lse_close(extra_inf, d)


def test_shape_mismatch_fails():
    with pytest.raises(AssertionError, match="shape mismatch"):
        testing.assert_attention_close(np.ones((2, 3)) * 0.5, np.ones((3, 2)) * 0.5)


def test_bad_baseline_raises_value_error():
    d = desired_out()
    base = d.copy()
    base[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="not finite"):
        testing.assert_attention_close(d, d, reference_low_precision=base)


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16, BF16])
def test_default_tolerance_per_dtype(dtype):
    d = desired_out(3)
    rtol, atol_rel = testing.default_tolerance(dtype)
    scale = np.abs(d).max()
    testing.assert_attention_close(d.astype(dtype), d)    # plain rounding always passes
    bad = d + 4 * (atol_rel * scale + rtol * np.abs(d))
    with pytest.raises(AssertionError, match="worst violation"):
        testing.assert_attention_close(bad.astype(np.float64), d, atol=atol_rel * scale,
                                       rtol=rtol)
    with pytest.raises(AssertionError, match=f"default for {np.dtype(dtype).name}"):
        testing.assert_attention_close((bad * 1.5).astype(dtype), d)


def test_bfloat16_actual_accepted():
    d = desired_out()
    testing.assert_attention_close(d.astype(BF16), d, reference_low_precision=d.astype(BF16))


def test_lse_defaults():
    d = np.random.default_rng(0).standard_normal((2, 3, 5)) * 4 + 2
    testing.assert_lse_close(d.astype(np.float32), d)
    with pytest.raises(AssertionError, match="softmax_lse"):
        testing.assert_lse_close((d + 1e-3).astype(np.float32), d)
    testing.assert_lse_close(d + 1e-12, d)
    with pytest.raises(AssertionError):
        testing.assert_lse_close(d + 1e-7, d)


def test_max_mean_error():
    a = np.array([1.0, 2.0, np.nan, 4.0])
    b = np.array([1.5, 2.0, 3.0, 3.0])
    assert testing.max_mean_error(a, b) == (1.0, 0.5)
    assert testing.max_mean_error(np.array([np.nan]), np.array([1.0])) == (0.0, 0.0)


@pytest.mark.parametrize("layout,shapes", [
    ("bshd", [(2, 3, 4, 8), (2, 5, 2, 8), (2, 5, 2, 8)]),
    ("bhsd", [(2, 4, 3, 8), (2, 2, 5, 8), (2, 2, 5, 8)]),
    ("bsh", [(2, 3, 32), (2, 5, 16), (2, 5, 16)]),
    ("sbh", [(3, 2, 32), (5, 2, 16), (5, 2, 16)]),
    ("thd", [(6, 4, 8), (10, 2, 8), (10, 2, 8)]),
])
def test_random_qkv_layouts(layout, shapes):
    q, k, v = testing.random_qkv(2, 3, 5, 4, 2, 8, BF16, seed=3, layout=layout)
    assert [x.shape for x in (q, k, v)] == shapes
    assert all(x.dtype == BF16 for x in (q, k, v))
    assert all(np.all(x.astype(np.float32) != 0) for x in (q, k, v))
    assert np.std(q.astype(np.float32)) > 0.5
    q2 = testing.random_qkv(2, 3, 5, 4, 2, 8, BF16, seed=3, layout=layout)[0]
    np.testing.assert_array_equal(q.astype(np.float32), q2.astype(np.float32))


def test_random_qkv_consistent_across_layouts():
    a = testing.random_qkv(2, 3, 5, 4, 2, 8, np.float32, seed=9)
    b = testing.random_qkv(2, 3, 5, 4, 2, 8, np.float32, seed=9, layout="bhsd")
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x.transpose(0, 2, 1, 3), y)


def test_cu_seqlens_from_lengths():
    cu = testing.cu_seqlens_from_lengths([3, 0, 5])
    assert cu.dtype == np.int32 and list(cu) == [0, 3, 3, 8]
