"""The FMA backward converts each key block in its dkdv item (csrc/fa_bwd_impl.h, bw_pack); float32
K/V rows are read in place, 16 keys at a time, and transposed in registers on AVX-512. Rows at any
stride, key counts and head dims that are not multiples of 16 (a partial last group of 16 keys,
masked row loads) must give gradients bit for bit equal to those of contiguous copies, on every
ISA (the grid in test_backward.py checks contiguous layouts of these shapes against the float64
reference)."""
import numpy as np
import pytest

import flash_attn_c as fa

from conftest import randn

# (b, sq, sk, h, hk, d, causal)
SHAPES = [
    (1, 70, 203, 4, 2, 59, True),     # last key block 11 keys, d not a multiple of 16
    (2, 33, 17, 2, 2, 24, False),     # one partial block: 16 keys + 1
    (1, 64, 130, 2, 1, 128, False),   # whole vectors, 2 keys in the last block
    (1, 20, 80, 2, 2, 1, True),       # d = 1: one masked lane per row
]


def _strided_kv(rng, b, sk, hk, d):
    """K and V as views into one (b, sk, 2, hk, d + 5) array: row stride 2 hk (d + 5), not h d."""
    kv = randn(rng, (b, sk, 2, hk, d + 5), np.float32)
    return kv[:, :, 0, :, :d], kv[:, :, 1, :, :d]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "b{}-{}x{}-h{}k{}-d{}{}".format(
    *s[:6], "-causal" if s[6] else ""))
def test_strided_kv_rows_bitwise(shape, isa):
    b, sq, sk, h, hk, d, causal = shape
    rng = np.random.default_rng(11)
    q, dout = randn(rng, (b, sq, h, d), np.float32), randn(rng, (b, sq, h, d), np.float32)
    k, v = _strided_kv(rng, b, sk, hk, d)
    assert not k.flags.c_contiguous
    out, lse, _ = fa.flash_attn_fwd(q, k, v, causal=causal)
    strided = fa.flash_attn_bwd(dout, q, k, v, out, lse, causal=causal)
    dense = fa.flash_attn_bwd(dout, q, np.ascontiguousarray(k), np.ascontiguousarray(v), out, lse,
                              causal=causal)
    for name, a, e in zip(("dq", "dk", "dv"), strided, dense):
        assert np.array_equal(a, e), f"{name}: strided K/V rows differ from contiguous ones"
