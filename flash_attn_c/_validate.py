"""Argument checking shared by every front-end.

Errors follow API.md section 8: TypeError for wrong types or dtypes, ValueError for wrong shapes,
ranges and combinations, each message naming the argument, what was expected and what was given.
All checks run before any allocation or kernel work.
"""
import math
import numbers
import operator

import numpy as np

from ._runtime import SUPPORTED_DTYPES, bfloat16

_DTYPE_NAMES = "float32, float16, bfloat16 (ml_dtypes) or float64"


def as_array(x, name):
    """x as a NumPy array without copying when it already is one."""
    if isinstance(x, np.ndarray):
        a = x
    else:
        if x is None:
            raise TypeError(f"{name}: expected an array, got None")
        try:
            a = np.asarray(x)
        except Exception as e:  # noqa: BLE001 - any conversion failure is a type error here
            raise TypeError(f"{name}: cannot be converted to an array ({e})") from None
    if a.dtype == object:
        raise TypeError(f"{name}: expected a numeric array, got dtype object")
    return a


def check_float_dtype(a, name):
    if a.dtype not in SUPPORTED_DTYPES:
        hint = " (bfloat16 must be ml_dtypes.bfloat16, not uint16)" if a.dtype == np.uint16 else ""
        raise TypeError(f"{name}: expected dtype {_DTYPE_NAMES}, got {a.dtype}{hint}")


def check_same_dtype(a, name, ref, ref_name="q"):
    if a.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {a.dtype}")


def check_ndim(a, name, ndim, dims):
    if a.ndim != ndim:
        raise ValueError(f"{name}: expected {ndim} dims {dims}, got shape {tuple(a.shape)}")


def check_shape(a, name, shape, dims):
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{name}: expected shape {tuple(shape)} {dims}, got {tuple(a.shape)}")


def last_dim_contiguous(a):
    """a itself when its last dim is contiguous, else one contiguous copy (the only copy made)."""
    if a.ndim and a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        return np.ascontiguousarray(a)
    return a


def to_int(x, name):
    if isinstance(x, bool):
        raise TypeError(f"{name}: expected an integer, got bool")
    try:
        return operator.index(x)
    except TypeError:
        pass
    if isinstance(x, np.ndarray) and x.shape == () and x.dtype.kind in "iu":
        return int(x)
    raise TypeError(f"{name}: expected an integer, got {type(x).__name__}")


def to_float(x, name, *, finite=True):
    if isinstance(x, bool) or not isinstance(x, (numbers.Real, np.floating, np.integer)):
        if isinstance(x, np.ndarray) and x.shape == () and x.dtype.kind in "fiu":
            x = x.item()
        else:
            raise TypeError(f"{name}: expected a real number, got {type(x).__name__}")
    x = float(x)
    if finite and not math.isfinite(x):
        raise ValueError(f"{name}: expected a finite number, got {x}")
    return x


def to_bool(x, name):
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)) and x in (0, 1):
        return bool(x)
    raise TypeError(f"{name}: expected a bool, got {type(x).__name__}")


def int_pair(x, name):
    try:
        items = list(x)
    except TypeError:
        raise TypeError(f"{name}: expected a pair of integers, got {type(x).__name__}") from None
    if len(items) != 2:
        raise ValueError(f"{name}: expected 2 entries (left, right), got {len(items)}")
    return to_int(items[0], f"{name}[0]"), to_int(items[1], f"{name}[1]")


def index_vector(x, name, length=None, *, min_value=None):
    """A 1-D integer array (int32 or int64) as contiguous int64, checked."""
    a = as_array(x, name)
    if a.dtype.kind not in "iu":
        raise TypeError(f"{name}: expected an int32 or int64 array, got dtype {a.dtype}")
    if a.ndim != 1:
        raise ValueError(f"{name}: expected 1 dim, got shape {tuple(a.shape)}")
    if length is not None and a.shape[0] != length:
        raise ValueError(f"{name}: expected length {length}, got {a.shape[0]}")
    a = np.ascontiguousarray(a, dtype=np.int64)
    if min_value is not None and a.size and a.min() < min_value:
        raise ValueError(f"{name}: entries must be >= {min_value}, got {a.min()}")
    return a


def head_dim(d, name="q"):
    if not 1 <= d <= 512:
        raise ValueError(f"{name}: head dim must be in [1, 512], got {d}")


def softmax_scale(scale, d):
    if scale is None:
        return d ** -0.5
    return to_float(scale, "softmax_scale")


def dropout(p, name="dropout_p"):
    p = to_float(p, name)
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{name}: expected a probability in [0, 1), got {p}")
    return p


def softcap_value(c):
    c = to_float(c, "softcap")
    if c < 0:
        raise ValueError(f"softcap: expected >= 0 (0 disables it), got {c}")
    return c


def alibi(slopes, b, h):
    """(b, h) float32 view of alibi_slopes given as (h,) or (b, h), or None."""
    if slopes is None:
        return None
    a = as_array(slopes, "alibi_slopes")
    if a.dtype.kind != "f":
        raise TypeError(f"alibi_slopes: expected a float32 array, got dtype {a.dtype}")
    a = np.ascontiguousarray(a, dtype=np.float32)
    if a.shape == (h,):
        return np.broadcast_to(a, (b, h))
    if a.shape == (b, h):
        return a
    raise ValueError(f"alibi_slopes: expected shape ({h},) or ({b}, {h}), got {tuple(a.shape)}")


def gqa(h, hk, name="k"):
    if hk < 1 or h % hk != 0:
        raise ValueError(f"{name}: the number of kv heads ({hk}) must divide the number of query heads ({h})")


__all__ = [n for n in dir() if not n.startswith("_")] + ["bfloat16"]
