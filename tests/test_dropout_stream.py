"""The dropout mask of every kernel against an independent NumPy Philox-4x32-10.

The kernels draw the keep mask in C (scalar fa_philox.h, 16 counters at a time in
fa_philox_avx512.h): element (b, h, i, j) is kept iff its 32-bit draw is >= floor(p * 2^32), the
draw being word j % 4 of Philox-4x32-10 (Salmon et al., SC'11) on the counter
(j // 4, i, b * H + h, offset) with the key (seed, seed_hi ^ offset_hi), each 64-bit value split
into 32-bit words as fa_dropout_draw4 documents. This file recomputes that mask here, so a kernel
whose stream drifted (a lane layout bug, a dropped carry, a high word folded wrongly) fails even
if every ISA drifted alike. Seeds and offsets include values with their high 32 bits set.
"""
import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import reference as ref
from flash_attn_c._rng import as_rng_state
from flash_attn_c.testing import assert_attention_close

from conftest import ISAS, randn, using_isa

M32 = np.uint64(0xFFFFFFFF)


def philox_keep(seed, offset, b, h, sq, sk, p):
    """Keep mask (b, h, sq, sk) of the library's dropout stream, in NumPy uint64 arithmetic."""
    bi, hi, i, j = np.meshgrid(np.arange(b, dtype=np.uint64), np.arange(h, dtype=np.uint64),
                               np.arange(sq, dtype=np.uint64), np.arange(sk, dtype=np.uint64),
                               indexing="ij")
    bh = bi * np.uint64(h) + hi
    col4 = j >> np.uint64(2)
    seed, offset = np.uint64(seed), np.uint64(offset)
    s32 = np.uint64(32)
    c = [col4 & M32, (i & M32) ^ (col4 >> s32), (bh & M32) ^ (i >> s32),
         (offset & M32) ^ (bh >> s32)]
    k0, k1 = seed & M32, (seed >> s32) ^ (offset >> s32)
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c[0]  # 32 x 32 bits: exact in uint64
        p1 = np.uint64(0xCD9E8D57) * c[2]
        c = [(p1 >> s32) ^ c[1] ^ k0, p1 & M32, (p0 >> s32) ^ c[3] ^ k1, p0 & M32]
        k0 = (k0 + np.uint64(0x9E3779B9)) & M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & M32
    word = (j & np.uint64(3)).astype(np.int64)
    draw = np.choose(word, c)
    thr = min(int(p * 2.0 ** 32), 2 ** 32 - 1)
    return draw >= np.uint64(thr)


STATES = [(1234, 0), (2 ** 64 - 98765, 2 ** 40 + 3), (0xDEADBEEF12345678, 7)]


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512", "amx"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("state", STATES, ids=["small", "high-words", "seed-hi"])
def test_mask_is_the_philox_stream(isa, causal, state):
    """Forward output and gradients under dropout equal the reference's with the mask computed
    here: one wrong keep bit moves an output row by ~1/sk, far beyond the tolerance. float32
    (the bf16 kernels' streams are checked against S_dmask, which draws with the scalar
    generator, in test_flash_attn.py and test_backward.py)."""
    if isa not in ISAS:
        pytest.skip(f"{isa}: not supported by this CPU or build ({fa.cpu_info()})")
    dtype = np.float32
    rng = np.random.default_rng(21)
    # sq spans two 256-row items and several 64-key blocks; sk is not a multiple of 4 or 64
    b, sq, sk, h, hk, d, p = 2, 300, 203, 2, 1, 24, 0.37
    q, k, v = (randn(rng, (b, n, hh, d), dtype) for n, hh in ((sq, h), (sk, hk), (sk, hk)))
    dout = randn(rng, (b, sq, h, d), dtype)
    keep = philox_keep(*state, b, h, sq, sk, p)
    with using_isa(isa):
        out, lse, st = fa.flash_attn_fwd(q, k, v, p, causal=causal, seed=as_rng_state(*state))
        grads = fa.flash_attn_bwd(dout, q, k, v, out, lse, dropout_p=p, causal=causal, rng_state=st)
    want = ref.flash_attn_fwd(q, k, v, p, causal=causal, dropout_mask=keep)[0]
    low = ref.flash_attn_fwd(q, k, v, p, causal=causal, dropout_mask=keep, compute_dtype=dtype)[0]
    assert_attention_close(out, want, reference_low_precision=low)
    rgrads = ref.flash_attn_bwd(dout, q, k, v, want, lse, p, causal=causal, dropout_mask=keep)
    lgrads = ref.flash_attn_bwd(dout, q, k, v, low, lse, p, causal=causal, dropout_mask=keep,
                                compute_dtype=dtype)
    for name, g, r, lo in zip(("dq", "dk", "dv"), grads, rgrads, lgrads):
        assert_attention_close(g, r, reference_low_precision=lo, name=name)


def test_keep_fraction_of_the_stream():
    """The NumPy stream itself keeps 1 - p of the elements (a sanity check of this file)."""
    keep = philox_keep(99, 5, 1, 2, 256, 256, 0.25)
    assert abs(keep.mean() - 0.75) < 0.01
