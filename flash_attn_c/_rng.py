"""The global dropout generator.

Dropout masks are a pure function of (seed, offset, batch, head, row, col) computed in C
(Philox-4x32-10), so a call only needs a fresh (seed, offset) pair: the seed comes from
manual_seed (or the OS at import) and the offset advances by one per call that uses dropout.
"""
import threading

import numpy as np

_lock = threading.Lock()
_state = {"seed": int(np.random.SeedSequence().entropy % (1 << 63)), "offset": 0}


def manual_seed(seed):
    """Seed the global dropout generator (and restart its offset at 0)."""
    import operator
    try:
        seed = operator.index(seed)
    except TypeError:
        raise TypeError(f"seed: expected an integer, got {type(seed).__name__}") from None
    with _lock:
        _state["seed"] = seed % (1 << 64)
        _state["offset"] = 0


def next_state():
    """A fresh (seed, offset) for one call, advancing the global offset."""
    with _lock:
        s = (_state["seed"], _state["offset"])
        _state["offset"] += 1
    return s


def resolve(seed):
    """(seed, offset) from an explicit seed argument: None draws from the global generator, an int
    is (seed, 0), an int64 array of 2 is an rng_state returned earlier."""
    if seed is None:
        return next_state()
    if isinstance(seed, (int, np.integer)):
        return int(seed) % (1 << 64), 0
    arr = np.asarray(seed)
    if arr.shape != (2,) or arr.dtype.kind not in "iu":
        raise ValueError(f"seed: expected None, an int or an integer rng_state of shape (2,), got {arr.dtype} {arr.shape}")
    return int(arr[0]) % (1 << 64), int(arr[1]) % (1 << 64)


def as_rng_state(seed, offset):
    """The int64 (2,) rng_state array for (seed, offset)."""
    return np.array([seed, offset], dtype=np.uint64).view(np.int64)
