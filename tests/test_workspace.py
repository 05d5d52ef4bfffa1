"""The drivers' workspace cache (csrc/fa_workspace.c): reuse between calls, bounds, release.

Correctness with reused (dirty) buffers is covered by the whole suite: conftest poisons every
taken buffer with 0xff bytes (NaN), fresh or reused, so a kernel that reads workspace it did not
write fails its reference checks.
"""
import threading

import numpy as np

import flash_attn_c as fa
from flash_attn_c import _C

from conftest import randn


def _train_step(rng, s=512, h=4, d=64, dtype=np.float32):
    q, k, v, do = (randn(rng, (1, s, h, d), dtype) for _ in range(4))
    out, lse, _ = fa.flash_attn_fwd(q, k, v, causal=True)
    return out, fa.flash_attn_bwd(do, q, k, v, out, lse, causal=True)


def test_kept_between_calls_and_released():
    fa.release_workspace()
    assert fa.workspace_cached() == 0
    first = _train_step(np.random.default_rng(1))
    held = fa.workspace_cached()
    assert held >= 2 << 20 and held % (2 << 20) == 0  # whole 2 MiB buffers
    again = _train_step(np.random.default_rng(1))  # reuses the cached (poisoned) buffers
    assert fa.workspace_cached() == held
    for a, b in zip([first[0], *first[1]], [again[0], *again[1]]):
        assert a.tobytes() == b.tobytes()
    assert fa.release_workspace() == held
    assert fa.workspace_cached() == 0


def test_cache_policy():
    """Smallest fitting buffer reused; buffers over 128 MiB never kept; at most 192 MiB in all,
    smaller buffers dropped first to make room."""
    MiB = 1 << 20
    fa.release_workspace()
    try:
        assert _C._workspace_cycle(10 * MiB) == 10 * MiB
        assert fa.workspace_cached() == 10 * MiB
        assert _C._workspace_cycle(5 * MiB) == 10 * MiB  # reused, not a new 6 MiB one
        assert fa.workspace_cached() == 10 * MiB
        assert _C._workspace_cycle(1) == 10 * MiB
        assert _C._workspace_cycle(130 * MiB) == 130 * MiB
        assert fa.workspace_cached() == 10 * MiB  # too big to keep
        assert _C._workspace_cycle(100 * MiB + 1) == 102 * MiB  # whole 2 MiB pages
        assert fa.workspace_cached() == 112 * MiB
        assert _C._workspace_cycle(120 * MiB) == 120 * MiB  # 112 + 120 > 192: both older go
        assert fa.workspace_cached() == 120 * MiB
        assert _C._workspace_cycle(60 * MiB) == 120 * MiB
        assert fa.workspace_cached() == 120 * MiB
    finally:
        fa.release_workspace()


def test_concurrent_calls():
    """Several Python threads (the GIL is released in the kernels) take and give buffers at once."""
    fa.release_workspace()
    want = _train_step(np.random.default_rng(3))
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                results.append(_train_step(np.random.default_rng(3)))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 12
    for got in results:
        for a, b in zip([want[0], *want[1]], [got[0], *got[1]]):
            assert a.tobytes() == b.tobytes()
    assert fa.workspace_cached() <= 192 << 20
