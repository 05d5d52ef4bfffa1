"""Argument helpers shared by the torch_npu front-ends (npu, npu_grad, npu_infer).

Only validation and views: q/k/v as arrays of one float dtype, a layout's rank check, the
hidden-dim head split, layouts as the kernel's stride views, and host integer lists. Each
front-end keeps its own rules on top.
"""
import numpy as np

from . import _validate as V

INT32_MAX = 2147483647  # torch_npu's "unbounded" default for the band sides

LAYOUT_DIMS = {"BSH": "(B, S, H)", "SBH": "(S, B, H)", "BSND": "(B, S, N, D)",
               "BNSD": "(B, N, S, D)", "TND": "(T, N, D)", "NTD": "(N, T, D)"}


def qkv_arrays(query, key, value):
    """query/key/value as arrays of one float dtype (query's)."""
    q = V.as_array(query, "query")
    k = V.as_array(key, "key")
    v = V.as_array(value, "value")
    V.check_float_dtype(q, "query")
    V.check_same_dtype(k, "key", q, "query")
    V.check_same_dtype(v, "value", q, "query")
    return q, k, v


def check_rank(a, name, layout):
    """a has the rank of the layout: 3 for BSH/SBH/TND/NTD, 4 for BSND/BNSD."""
    nd = 3 if layout in ("BSH", "SBH", "TND", "NTD") else 4
    if a.ndim != nd:
        raise ValueError(f"{name}: input_layout {layout} expects {nd} dims "
                         f"{LAYOUT_DIMS[layout]}, got shape {tuple(a.shape)}")


def split_heads(a, n):
    """(..., H) -> (..., n, H // n) as a view: splitting one axis never needs a copy."""
    return np.reshape(a, a.shape[:-1] + (n, a.shape[-1] // n), copy=False)


def kernel_view(a, layout, n=None):
    """An operand in a layout's order as the kernel's (b, s, n, d) view (TND as is, NTD
    transposed to (t, n, d)); n splits the hidden dim of BSH/SBH (already split 4-D arrays pass
    n=None). Views only: no layout is copied."""
    if layout in ("BSH", "SBH"):
        a = a if n is None else split_heads(a, n)
        return a.transpose(1, 0, 2, 3) if layout == "SBH" else a
    if layout == "BNSD":
        return a.transpose(0, 2, 1, 3)
    if layout == "NTD":
        return a.transpose(1, 0, 2)
    return a  # BSND, TND


def int_list(x, name, scalar=False):
    """A host list (or 1-D integer array) of non-negative integers as int64; scalar: a single
    integer is accepted as a list of one."""
    if scalar and isinstance(x, (int, np.integer)) and not isinstance(x, bool):
        x = [x]
    a = V.as_array(x, name)
    if a.ndim != 1 or a.shape[0] == 0:  # checked first: [] reads as float64
        raise ValueError(f"{name}: expected a non-empty 1-D list, got shape {tuple(a.shape)}")
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected a list of integers, got dtype {a.dtype}")
    a = a.astype(np.int64)
    if a.min() < 0:
        raise ValueError(f"{name}: entries must be >= 0, got {a.tolist()}")
    return a
