"""Shared test fixtures: poisoned outputs, kernel-family (ISA) selection, random inputs."""
import contextlib

import ml_dtypes
import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import _C
from flash_attn_c import _runtime

BF16 = np.dtype(ml_dtypes.bfloat16)
DTYPES = {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": BF16,
          "f64": np.dtype(np.float64)}

_info = fa.cpu_info()
ISAS = [i for i in ("scalar", "avx2", "avx512", "amx")
        if i in _info["supported"] and i in _info["compiled"]]
ALL_ISAS = ("scalar", "avx2", "avx512", "amx")


@pytest.fixture(autouse=True, scope="session")
def poison_outputs():
    """Every output the library allocates starts as NaN, so an unwritten element fails."""
    old = _runtime.POISON_OUTPUTS
    _runtime.POISON_OUTPUTS = True
    yield
    _runtime.POISON_OUTPUTS = old


@pytest.fixture(autouse=True, scope="session")
def poison_workspace():
    """Every workspace buffer the kernels take (fresh or reused from the cache) starts as 0xff
    bytes (NaN): a kernel reading workspace it never wrote fails instead of seeing zeros."""
    _C._poison_workspace(True)
    yield
    _C._poison_workspace(False)


@contextlib.contextmanager
def using_isa(name):
    old = fa.cpu_info()["isa"]
    fa.set_isa(name)
    try:
        yield
    finally:
        fa.set_isa(old)


@contextlib.contextmanager
def using_threads(n):
    old = fa.get_num_threads()
    fa.set_num_threads(n)
    try:
        yield
    finally:
        fa.set_num_threads(old)


@pytest.fixture(params=ALL_ISAS)
def isa(request):
    """Run a test once per kernel family; families this CPU or build lacks are skipped."""
    if request.param not in ISAS:
        pytest.skip(f"ISA {request.param} not supported by this CPU/build ({_info})")
    with using_isa(request.param):
        yield request.param


def randn(rng, shape, dtype, scale=1.0):
    """Standard normal values (never zeros or constants) in dtype."""
    return (rng.standard_normal(shape) * scale).astype(dtype)


def noncontiguous(x, rng):
    """The same values as x in a strided view (last dim contiguous, nothing else): x sits in a
    larger noise-filled buffer whose head dim is doubled and whose rows are padded."""
    shape = list(x.shape)
    shape[-2] *= 2
    shape[-1] += 5
    big = rng.standard_normal(shape).astype(x.dtype)
    view = big[..., ::2, : x.shape[-1]]
    view[...] = x
    assert x.size == x.shape[-1] or not view.flags.c_contiguous
    return view
