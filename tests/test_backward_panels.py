"""The memory-bounded backward: query panels (csrc/fa_bwd_driver.c).

When the float32/float64 backward's Q, dO and dQ partial sums would exceed a byte budget (48 MiB by
default), the driver runs its passes once per panel of query positions and carries dK/dV from
panel to panel through the outputs. Real problems reach that only at long sequences (M1: S = 32768),
so these tests shrink the budget (to one 64-row block per panel) and check that:
- every panel plan gives the reference's gradients (flash-attn's tolerance rule), on every ISA;
- with one query head per kv head, panels give exactly the single-panel bits (same block sums, in
  the same order); with GQA only the order of the group's heads inside dK/dV changes;
- panel results do not depend on the thread count;
- varlen (empty and one-row sequences, rows outside every sequence), the NPU form with dpse, and
  dtypes that never use panels (their outputs cannot carry dK/dV exactly) behave;
- the workspace stays within the budget.
"""
import contextlib

import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import _C, _core

from conftest import ISAS, randn, using_isa, using_threads
from test_backward import (CASES, case_id, check_case, check_varlen_grads, naive, run_case,
                           varlen_problem)

FMA_ISAS = [i for i in ISAS if i != "amx"]  # amx runs float32/float64 on the avx512 kernel


@contextlib.contextmanager
def panel_budget(nbytes):
    old = fa.set_backward_workspace_budget(nbytes)
    try:
        yield
    finally:
        fa.set_backward_workspace_budget(old)


def panels_of_last_call():
    return _C._bwd_last_plan()["panels"]


def test_default_budget_is_48_mib():
    assert fa.get_backward_workspace_budget() == 48 << 20


def test_budget_api_checks_its_argument():
    old = fa.set_backward_workspace_budget(12345)
    try:
        assert old == 48 << 20 and fa.get_backward_workspace_budget() == 12345
    finally:
        fa.set_backward_workspace_budget(old)
    for bad, err in ((-1, ValueError), (1 << 63, ValueError), (1.5, TypeError), (True, TypeError),
                     ("64", TypeError), (None, TypeError)):
        with pytest.raises(err, match="set_backward_workspace_budget"):
            fa.set_backward_workspace_budget(bad)
    assert fa.get_backward_workspace_budget() == 48 << 20


def test_budget_through_the_public_backward():
    """flash_attn_bwd under a budget of a few query blocks: several panels, the default budget's
    bits (one query head per kv head)."""
    rng = np.random.default_rng(23)
    b, s, h, d = 2, 300, 3, 40
    q, k, v, dout = (randn(rng, (b, s, h, d), np.float32) for _ in range(4))
    out, lse, *_ = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal=True)
    assert panels_of_last_call() == 1
    nch = _C._bwd_last_plan()["chunks"]  # dQ chunks: the shape's and the machine's (fa_bwd_driver.c)
    per_row = (2 + nch) * h * 48 * 4  # Q, dO and the dQ partials of one row, d padded to 48
    with panel_budget(128 * b * per_row):  # 128-row panels
        got = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal=True)
        assert panels_of_last_call() == 3
    for a, g in zip(ref, got):
        assert a.tobytes() == g.tobytes()


@pytest.mark.parametrize("dname", ["f32", "f64"])
@pytest.mark.parametrize("c", CASES, ids=case_id)
def test_panels_grads(c, dname):
    with panel_budget(1):
        check_case(c, dname)
        sq = c[1]
        assert panels_of_last_call() == (sq + 63) // 64


@pytest.mark.parametrize("isa", FMA_ISAS)
@pytest.mark.parametrize("c", [c for c in CASES if c[1] > 64], ids=case_id)
def test_panels_against_one_panel(c, isa):
    """Same bits as one panel when G == 1; within rounding of it with GQA (the group's heads then
    enter each dK/dV block panel by panel). Either way, nonzero work happened in several panels."""
    with using_isa(isa):
        with panel_budget(1 << 62):
            _, out0, g0, _ = run_case(c, np.float32, seed=4)
            assert panels_of_last_call() == 1
        with panel_budget(1):
            _, out1, g1, _ = run_case(c, np.float32, seed=4)
            assert panels_of_last_call() > 1
    for a, b in zip(g0, g1):
        if c[3] == c[4]:
            assert a.tobytes() == b.tobytes()
        else:
            np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * max(1.0, float(np.abs(a).max())))


@pytest.mark.parametrize("budget_rows", [64, 128])
@pytest.mark.parametrize("c", [CASES[4], CASES[11], CASES[14], CASES[15]], ids=case_id)
def test_panels_threads_bitwise_identical(c, budget_rows):
    b, sq, sk, h, hk, d = c[:6]
    run_case(c, np.float32, seed=6)
    nch = _C._bwd_last_plan()["chunks"]  # dQ chunks: the shape's and the machine's (fa_bwd_driver.c)
    per_row = (2 + nch) * h * ((d + 15) // 16 * 16) * 4
    results = []
    with panel_budget(budget_rows * b * per_row):
        for threads in (1, 2):
            with using_threads(threads):
                _, out, grads, _ = run_case(c, np.float32, seed=6)
            assert panels_of_last_call() == -(-sq // budget_rows)
            results.append([g.tobytes() for g in grads])
    assert results[0] == results[1]


@pytest.mark.parametrize("dname", ["f32", "f64"])
def test_panels_varlen(dname):
    """Sequences shorter than a panel, empty ones, a long one spanning 3 panels; 3 trailing rows
    outside every sequence keep zero gradients."""
    dt = np.float32 if dname == "f32" else np.float64
    lens_q, lens_k = [37, 1, 150, 0, 6], [50, 9, 170, 5, 0]
    q, k, v, dout, out, lse, kw = varlen_problem(np.random.default_rng(21), lens_q, lens_k, dt)
    tol = dict(atol=2e-5, rtol=1e-4) if dt == np.float32 else dict(atol=1e-12)
    for isa in FMA_ISAS:
        with using_isa(isa), panel_budget(1):
            dq, dk, dv, _ = _core.backward(dout, q, k, v, out, lse=lse, **kw)
            assert panels_of_last_call() == 3
        check_varlen_grads(q, k, v, dout, kw, lens_q, lens_k, (dq, dk, dv), tol)


@pytest.mark.parametrize("row_broadcast", [False, True])
def test_panels_npu_form_with_dpse(row_broadcast):
    """NPU statistics, an explicit mask and the pse gradient (accumulated over rows when pse is
    broadcast over them) across panels."""
    rng = np.random.default_rng(22)
    b, sq, sk, h, d = 2, 150, 90, 2, 16
    q, k, v = (randn(rng, (b, s, h, d), np.float64) for s in (sq, sk, sk))
    dout = randn(rng, (b, sq, h, d), np.float64)
    pse = np.broadcast_to(randn(rng, (b, h, 1 if row_broadcast else sq, sk), np.float64), (b, h, sq, sk))
    mask = rng.random((b, h, sq, sk)) < 0.3
    fill = -float(np.finfo(np.float32).max)
    kw = dict(scale=0.3, pse=pse, mask=mask.view(np.uint8), mask_fill=fill)
    rowmax, rowsum = np.empty((b, h, sq)), np.empty((b, h, sq))
    out, _, _ = _core.forward(q, k, v, out_shape=q.shape, lse_shape=(b, h, sq), rowmax=rowmax,
                              rowsum=rowsum, **kw)
    with panel_budget(1):
        dq, dk, dv, dpse = _core.backward(dout, q, k, v, out, rowmax=rowmax, rowsum=rowsum,
                                          want_dpse=True, **kw)
        assert panels_of_last_call() == 3
    ref = naive(q, k, v, dout, scale=0.3, pse=pse, mask=mask, mask_fill=fill)
    for g, r in zip((dq, dk, dv), ref[1:4]):
        np.testing.assert_allclose(g, r, atol=1e-12)
    want_dpse = ref[4].sum(2, keepdims=True) if row_broadcast else ref[4]
    np.testing.assert_allclose(dpse, want_dpse, atol=1e-12)


@pytest.mark.parametrize("dname", ["bf16", "f16"])
def test_no_panels_for_narrow_outputs(dname):
    """bf16/f16 gradients are rounded once at the end; carrying dK/dV through them between panels
    would round more often, so these dtypes always run in one panel (and stay correct)."""
    with panel_budget(1):
        check_case(CASES[4], dname)
        assert panels_of_last_call() == 1


def test_workspace_within_budget():
    """A problem whose single-panel workspace is ~3 MiB, under a 1 MiB budget: the workspace it
    asks for (Q, dO and dQ partials for one panel, plus the row statistics) shrinks to it. (The
    buffer it gets may be a bigger cached one: the plan reports the bytes asked for.)"""
    rng = np.random.default_rng(23)
    b, s, h, d = 1, 1024, 4, 32
    q, k, v, do = (randn(rng, (b, s, h, d), np.float32) for _ in range(4))
    out, lse, _ = fa.flash_attn_fwd(q, k, v, causal=True)
    with panel_budget(1 << 62):
        fa.flash_attn_bwd(do, q, k, v, out, lse, causal=True)
    whole = _C._bwd_last_plan()
    with panel_budget(1 << 20):
        g = fa.flash_attn_bwd(do, q, k, v, out, lse, causal=True)
    plan = _C._bwd_last_plan()
    assert whole["panels"] == 1 and whole["workspace_bytes"] >= 3 << 20
    assert plan["panels"] > 1 and plan["panel_rows"] % 64 == 0
    assert plan["workspace_bytes"] <= (1 << 20) + (64 << 10)  # panel rows + 48 KiB of statistics
    with panel_budget(1 << 62):
        one = fa.flash_attn_bwd(do, q, k, v, out, lse, causal=True)
    for a, b_ in zip(g, one):
        assert a.tobytes() == b_.tobytes()
