"""Process-wide runtime state: the C extension, kernel-family selection, threads, allocation.

The kernel family is chosen once at import: FLASH_ATTN_C_ISA if set (an error if this CPU or
build lacks it), else the fastest one the CPU supports. FLASH_ATTN_C_NUM_THREADS sets the default
thread count (else OpenMP's default).
"""
import operator
import os

import ml_dtypes
import numpy as np

from . import _C

bfloat16 = np.dtype(ml_dtypes.bfloat16)
_C.register_bfloat16(bfloat16)

SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float16), bfloat16, np.dtype(np.float64))


def _init():
    isa = os.environ.get("FLASH_ATTN_C_ISA", "").strip().lower()
    _C.select_isa(isa if isa else _C.best_isa())
    threads = os.environ.get("FLASH_ATTN_C_NUM_THREADS", "").strip()
    if threads:
        try:
            n = int(threads)
        except ValueError:
            raise ValueError(f"FLASH_ATTN_C_NUM_THREADS: expected a positive integer, got {threads!r}") from None
        set_num_threads(n)


def cpu_info():
    """Kernel selection and threading: {'isa', 'supported', 'compiled', 'num_threads'}.

    'isa' is the kernel family in use, 'supported' those this CPU and OS can run, 'compiled' those
    this build contains.
    """
    return dict(_C.isa_state())


def set_isa(name):
    """Switch the kernel family for this process (as FLASH_ATTN_C_ISA does at import)."""
    _C.select_isa(str(name).lower())


def set_num_threads(n):
    """Number of threads the kernels use (a positive integer)."""
    try:
        n = operator.index(n)
    except TypeError:
        raise TypeError(f"num_threads: expected an integer, got {type(n).__name__}") from None
    _C.set_num_threads(n)


def get_num_threads():
    """Number of threads the kernels use."""
    return _C.get_num_threads()


def release_workspace():
    """Free the large buffers the kernels keep between calls; returns the bytes freed.

    The forward's packed K/V and the backward's workspace (tens of MiB) are handed back to a small
    cache after each call (at most 192 MiB in all, no buffer above 128 MiB), so the next call
    reuses pages that are already mapped instead of having the OS clear fresh ones (2-5% of a
    training step). Call this to return that memory, e.g. after the last step; nothing else
    changes, the next call allocates again."""
    return _C.release_workspace()


def set_backward_workspace_budget(nbytes):
    """Bytes of workspace the float32/float64 backward may use before it splits the query positions
    into panels; returns the previous budget (default 48 MiB).

    The backward keeps Q, dO and partial sums of dQ in a workspace of O(S d) bytes. Above the
    budget its passes run once per panel of query positions on workspace for that panel only, so
    the extra memory stays near the budget however long the sequence (55 MiB at S = 32768 with 4
    heads). Each further panel repacks K/V and carries dK/dV through the gradients: T3's backward
    in two panels took 1.07-1.09x the time of one at 2 threads, the same at 1 and 16 threads
    (benchmarks/NOTES.md). Raise the budget to trade memory for that time, lower it for tighter
    memory (0: panels of one query block). Process-wide. With one query head per kv head the
    gradients are bitwise the same for any budget; with GQA groups dK/dV sum the group's heads
    panel by panel (float32 rounding differences). bfloat16 and float16 inputs are never split:
    dK/dV would have to pass between panels through gradients rounded to 16 bits."""
    from ._validate import to_int  # _validate imports this module: import on use

    n = to_int(nbytes, "set_backward_workspace_budget")
    if not 0 <= n < 1 << 63:
        raise ValueError(f"set_backward_workspace_budget: nbytes must be in [0, 2**63), got {n}")
    return _C._set_bwd_panel_budget(n)


def get_backward_workspace_budget():
    """The current backward workspace budget in bytes (see set_backward_workspace_budget)."""
    return _C._bwd_panel_budget()


def workspace_cached():
    """Bytes of workspace the kernels keep between calls (see release_workspace)."""
    return _C.workspace_cached()


# Tests set this so that every output the library allocates starts as NaN: an element a kernel
# forgot to write then fails the comparison instead of passing by luck.
POISON_OUTPUTS = os.environ.get("FLASH_ATTN_C_POISON", "") == "1"


def empty(shape, dtype):
    """Allocate an output array (C-contiguous); NaN-filled when POISON_OUTPUTS is set."""
    if POISON_OUTPUTS:
        return np.full(shape, np.nan, dtype=dtype)
    return np.empty(shape, dtype=dtype)


_init()
