"""Verification helpers for attention kernels (public).

Use these to check any attention implementation -- flash_attn_c's own kernels, or your GPU/NPU
port -- against the float64 reference in ``flash_attn_c.reference``::

    import numpy as np, ml_dtypes
    from flash_attn_c import reference, testing

    q, k, v = testing.random_qkv(2, 113, 203, 8, 2, 64, np.float16, seed=0)
    out = my_kernel(q, k, v, causal=True)
    desired = reference.flash_attn_func(q, k, v, causal=True)                 # float64
    baseline = reference.flash_attn_func(q, k, v, causal=True,
                                         compute_dtype=np.float16)             # naive fp16
    testing.assert_attention_close(out, desired, reference_low_precision=baseline)

The rule is flash-attn's (specs/flash_attn_api.md §4.2): the error of the kernel against the
float64 reference may be at most ``multiplier`` times the error of a naive computation in the
same low precision, plus a small absolute term. This module never imports torch or the C
extension.
"""

import numpy as np
import ml_dtypes

__all__ = [
    "assert_attention_close",
    "assert_lse_close",
    "default_tolerance",
    "max_mean_error",
    "random_qkv",
    "cu_seqlens_from_lengths",
]

_BF16 = np.dtype(ml_dtypes.bfloat16)
_F32_EPS = float(np.finfo(np.float32).eps)

# Absolute term of the baseline rule, relative to max|desired| (see assert_attention_close).
_BASELINE_ATOL = {
    "float64": 1e-10,
    "float32": 8 * _F32_EPS,         # ~9.5e-7: a few float32 ulps of the largest value
    "float16": 1e-5,                 # flash-attn's "+ 1e-5" for O(1) outputs
    "bfloat16": 1e-5,
}

# (rtol, atol relative to max|desired|) when no low-precision baseline is given.
_DEFAULT_TOL = {
    "float64": (1e-10, 1e-10),
    "float32": (2e-5, 2e-5),
    "float16": (2e-3, 2e-3),         # ~2 fp16 ulps (eps = 9.8e-4)
    "bfloat16": (1.6e-2, 1.6e-2),    # ~2 bf16 ulps (eps = 7.8e-3)
}


def _dtype_key(dtype):
    dtype = np.dtype(dtype)
    if dtype == _BF16:
        return "bfloat16"
    if dtype in (np.float64, np.float32, np.float16):
        return dtype.name
    if dtype.kind == "f":        # longdouble and friends: treat as float64
        return "float64"
    raise TypeError(f"expected a floating point array, got dtype {dtype}")


def _as_f64(x):
    x = np.asarray(x)
    _dtype_key(x.dtype)
    return x.astype(np.float64)


def default_tolerance(dtype):
    """``(rtol, atol_rel)`` used by ``assert_attention_close`` without a baseline.

    The check is ``|actual - desired| <= atol_rel * max|desired| + rtol * |desired|``
    elementwise. Values: float64 (1e-10, 1e-10), float32 (2e-5, 2e-5), float16 (2e-3, 2e-3),
    bfloat16 (1.6e-2, 1.6e-2): about two ulps of the output dtype for fp16/bf16 (whose final
    rounding dominates), a generous bound on fp32 accumulation error for float32.
    """
    return _DEFAULT_TOL[_dtype_key(dtype)]


def max_mean_error(a, b):
    """``(max, mean)`` absolute difference of two arrays, computed in float64 over the
    positions where both are finite (``(0.0, 0.0)`` if there are none)."""
    a, b = _as_f64(a), _as_f64(b)
    finite = np.isfinite(a) & np.isfinite(b)
    if not finite.any():
        return 0.0, 0.0
    err = np.abs(a - b)[finite]
    return float(err.max()), float(err.mean())


def _fmt_index(flat_index, shape):
    return tuple(int(i) for i in np.unravel_index(flat_index, shape)) if shape else ()


def _nonfinite_report(a, d):
    """Count the positions whose non-finite pattern disagrees. Returns (lines, n_bad)."""
    nan_bad = np.isnan(a) & ~np.isnan(d)              # NaN where desired is a number or inf
    inf_d = np.isinf(d)
    inf_bad = inf_d & (a != d)                         # desired +-inf must match exactly
    inf_extra = np.isinf(a) & np.isfinite(d)           # inf where desired is finite
    nan_missing = np.isnan(d) & ~np.isnan(a)           # desired NaN must stay NaN
    lines = []
    if nan_bad.any():
        lines.append(f"  NaN in actual where desired is not NaN: {int(nan_bad.sum())} "
                     f"(first at {_fmt_index(np.flatnonzero(nan_bad)[0], a.shape)})")
    if inf_bad.any():
        idx = np.flatnonzero(inf_bad)[0]
        lines.append(f"  desired is +-inf but actual differs: {int(inf_bad.sum())} "
                     f"(first at {_fmt_index(idx, a.shape)}: actual={float(a.flat[idx])}, "
                     f"desired={float(d.flat[idx])})")
    if inf_extra.any():
        idx = np.flatnonzero(inf_extra)[0]
        lines.append(f"  inf in actual where desired is finite: {int(inf_extra.sum())} "
                     f"(first at {_fmt_index(idx, a.shape)})")
    if nan_missing.any():
        lines.append(f"  desired is NaN but actual is not: {int(nan_missing.sum())}")
    n_bad = int((nan_bad | inf_bad | inf_extra | nan_missing).sum())
    return lines, n_bad


def _report(name, actual, desired, a, d, err, finite, tol_text, extra_lines, nonfinite_lines,
            worst=None):
    lines = [f"{name}: actual and desired differ",
             f"  shape: actual {actual.shape} {actual.dtype}, desired {desired.shape} "
             f"{desired.dtype}"]
    if finite.any():
        e = np.where(finite, err, -1.0)
        idx = int(np.argmax(e)) if worst is None else worst
        lines.append(f"  max abs error: {err.flat[idx]:.6g} at index {_fmt_index(idx, a.shape)} "
                     f"(actual={a.flat[idx]:.8g}, desired={d.flat[idx]:.8g})")
        lines.append(f"  mean abs error: {float(err[finite].mean()):.6g} over "
                     f"{int(finite.sum())} finite positions; max|desired| = "
                     f"{float(np.abs(d[finite]).max()):.6g}")
    else:
        lines.append("  no position where both are finite")
    lines.append(f"  tolerance: {tol_text}")
    lines.extend(extra_lines)
    if nonfinite_lines:
        lines.append("  non-finite mismatches:")
        lines.extend(nonfinite_lines)
    else:
        lines.append("  non-finite mismatches: 0")
    return "\n".join(lines)


def assert_attention_close(actual, desired, *, reference_low_precision=None, multiplier=2.0,
                           atol=None, rtol=None, name="out"):
    """Assert that an attention result matches a float64 reference.

    Parameters
    ----------
    actual : array
        The result under test (any float dtype, incl. ``ml_dtypes.bfloat16``).
    desired : array
        The exact result, normally ``flash_attn_c.reference`` in float64. Same shape.
    reference_low_precision : array, optional
        The same quantity computed naively in the low precision of the inputs (the reference
        with ``compute_dtype=`` the input dtype). When given, flash-attn's rule applies::

            max|actual - desired| <= multiplier * max|reference_low_precision - desired| + atol

        over the positions where ``desired`` is finite. ``atol`` defaults to
        ``c * max|desired|`` with c depending on ``actual.dtype``: float64 1e-10, float32
        8 * eps(float32) (~9.5e-7, a few ulps: the float32 baseline itself can be tiny),
        float16 and bfloat16 1e-5 (flash-attn's absolute term for O(1) outputs). When
        ``max|desired|`` is 0 (or nothing is finite), 1.0 is used instead.
    multiplier : float
        flash-attn uses 2 for outputs, 3 for gradients of the output tests, 3-5 for kvcache.
    atol, rtol : float, optional
        Without a baseline the check is elementwise
        ``|actual - desired| <= atol + rtol * |desired|`` with the defaults of
        ``default_tolerance(actual.dtype)`` (atol scaled by max|desired|). With a baseline only
        ``atol`` is used (absolute, as given).
    name : str
        Shown in the report ("out", "dq", ...).

    Non-finite values: where ``desired`` is +-inf (e.g. the lse of a row that sees no key),
    ``actual`` must be the same infinity; where ``desired`` is NaN, ``actual`` must be NaN; any
    NaN or inf in ``actual`` where ``desired`` is finite fails. A non-finite baseline value where
    ``desired`` is finite raises ``ValueError`` (the baseline is then unusable).

    Raises ``AssertionError`` with a report: name, shapes and dtypes, max abs error and where,
    mean abs error, the tolerance and how it was derived, the baseline's error, and the count
    of NaN/inf mismatches.
    """
    _assert_close(actual, desired, reference_low_precision, multiplier, atol, rtol, name, None)


def _assert_close(actual, desired, reference_low_precision, multiplier, atol, rtol, name,
                  default_label):
    """Body of assert_attention_close; ``default_label`` names caller-supplied defaults."""
    actual_arr, desired_arr = np.asarray(actual), np.asarray(desired)
    a, d = _as_f64(actual_arr), _as_f64(desired_arr)
    if a.shape != d.shape:
        raise AssertionError(f"{name}: shape mismatch: actual {a.shape} {actual_arr.dtype}, "
                             f"desired {d.shape} {desired_arr.dtype}")
    key = _dtype_key(actual_arr.dtype)
    nonfinite_lines, n_bad = _nonfinite_report(a, d)
    finite = np.isfinite(a) & np.isfinite(d)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.where(finite, np.abs(a - d), 0.0)
    d_fin = np.isfinite(d)
    scale = float(np.abs(d[d_fin]).max()) if d_fin.any() else 0.0
    scale = scale if scale > 0 else 1.0
    max_err = float(err.max()) if err.size else 0.0
    extra = []
    worst = None
    if reference_low_precision is not None:
        base = _as_f64(reference_low_precision)
        if base.shape != d.shape:
            raise ValueError(f"{name}: reference_low_precision has shape {base.shape}, "
                             f"desired {d.shape}")
        if np.any(~np.isfinite(base) & d_fin):
            raise ValueError(f"{name}: reference_low_precision is not finite where desired is")
        with np.errstate(invalid="ignore", over="ignore"):
            base_err = float(np.abs(base - d)[d_fin].max()) if d_fin.any() else 0.0
        if atol is None:
            atol_val = _BASELINE_ATOL[key] * scale
            atol_text = f"default for {key}: {_BASELINE_ATOL[key]:.3g} x max|desired| {scale:.6g}"
        else:
            atol_val, atol_text = float(atol), "given"
        tol = multiplier * base_err + atol_val
        ok = max_err <= tol
        tol_text = (f"{tol:.6g} = {multiplier:g} x baseline error {base_err:.6g} + atol "
                    f"{atol_val:.3g} ({atol_text})")
        extra.append(f"  baseline (reference_low_precision, "
                     f"{np.asarray(reference_low_precision).dtype}) max abs error vs desired: "
                     f"{base_err:.6g}")
    else:
        rtol_def, atol_def = _DEFAULT_TOL[key]
        rtol_val = rtol_def if rtol is None else float(rtol)
        atol_val = atol_def * scale if atol is None else float(atol)
        bound = atol_val + rtol_val * np.abs(np.where(d_fin, d, 0.0))
        excess = np.where(finite, err - bound, -np.inf)
        ok = not finite.any() or float(excess.max()) <= 0
        if finite.any() and not ok:
            worst = int(np.argmax(excess))
            extra.append(f"  worst violation at {_fmt_index(worst, a.shape)}: error "
                         f"{err.flat[worst]:.6g} > bound {bound.flat[worst]:.6g}")
        given = default_label or "given"
        how = given if atol is not None else f"default {atol_def:.3g} x max|desired| {scale:.6g}"
        rhow = given if rtol is not None else f"default for {key}"
        tol_text = (f"|actual - desired| <= atol + rtol * |desired| elementwise, atol "
                    f"{atol_val:.3g} ({how}), rtol {rtol_val:.3g} ({rhow})")
    if ok and n_bad == 0:
        return
    raise AssertionError(_report(name, actual_arr, desired_arr, a, d, err, finite, tol_text,
                                 extra, nonfinite_lines, worst))


def assert_lse_close(actual, desired, *, rtol=None, atol=None, name="softmax_lse"):
    """Assert that a log-sum-exp (or NPU softmax_max / softmax_sum) matches the reference.

    Elementwise ``|actual - desired| <= atol + rtol * |desired|``; defaults by ``actual.dtype``:
    float64 ``rtol = atol = 1e-10``, otherwise (float32 lse of fp32/fp16/bf16 kernels)
    ``rtol = atol = 2e-5`` (the scores themselves carry float32 accumulation error). Rows whose
    desired value is +inf (no visible key) must be +inf exactly; any NaN fails. Raises
    ``AssertionError`` with the same report as ``assert_attention_close``.
    """
    key = _dtype_key(np.asarray(actual).dtype)
    default = 1e-10 if key == "float64" else 2e-5
    label = f"lse default for {key}" if rtol is None and atol is None else None
    rtol = default if rtol is None else rtol
    atol = default if atol is None else atol
    # atol is absolute here: assert_attention_close scales only its own default.
    _assert_close(actual, desired, None, 2.0, atol, rtol, name, label)


def random_qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, headdim, dtype, seed,
               layout="bshd", *, headdim_v=None, scale=1.0):
    """Random q, k, v (standard normal times ``scale``, rounded to ``dtype``, no zeros).

    ``layout``: "bshd" (flash-attn, (b, s, h, d)), "bhsd" or "bnsd" ((b, h, s, d)), "sbh" /
    "bsh" (NPU 3-D layouts with h*d merged), or "thd" (varlen: (batch * seqlen, h, d), every
    sequence of the same length; build cu_seqlens with ``cu_seqlens_from_lengths``).
    ``dtype``: float64, float32, float16 or ``ml_dtypes.bfloat16`` (or their names).
    ``headdim_v`` gives v a different head dim (NPU allows Dv <= D). Returns (q, k, v).
    """
    rng = np.random.default_rng(seed)
    dtype = np.dtype(dtype)
    _dtype_key(dtype)
    headdim_v = headdim if headdim_v is None else headdim_v

    def make(s, h, d):
        x = rng.standard_normal((batch, s, h, d)) * scale
        x = x.astype(dtype)
        x[x == 0] = dtype.type(0.5)          # "never test on zeros"
        layout_l = layout.lower()
        if layout_l == "bshd" or layout_l == "bsnd":
            return x
        if layout_l in ("bhsd", "bnsd"):
            return np.ascontiguousarray(x.transpose(0, 2, 1, 3))
        if layout_l == "bsh":
            return x.reshape(batch, s, h * d)
        if layout_l == "sbh":
            return np.ascontiguousarray(x.transpose(1, 0, 2, 3)).reshape(s, batch, h * d)
        if layout_l in ("thd", "tnd"):
            return x.reshape(batch * s, h, d)
        raise ValueError(f"layout: expected bshd, bhsd, bsh, sbh or thd, got {layout!r}")

    return (make(seqlen_q, nheads, headdim), make(seqlen_k, nheads_k, headdim),
            make(seqlen_k, nheads_k, headdim_v))


def cu_seqlens_from_lengths(lengths, dtype=np.int32):
    """Cumulative sequence starts with a leading 0, e.g. [3, 5] -> [0, 3, 8] (flash-attn varlen).
    For the NPU's ``actual_seq_qlen`` (no leading 0) use ``cu_seqlens_from_lengths(l)[1:]``."""
    lengths = np.asarray(lengths, np.int64)
    return np.concatenate([[0], np.cumsum(lengths)]).astype(dtype)
