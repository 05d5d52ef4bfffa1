"""Shapes around the AMX bf16 forward kernel's blocking (fa_fwd_bf16__amx.c): 256-key blocks,
64-query sub-blocks and 256-query items, head dims that are not multiples of 32, GQA, bands whose
edges fall inside a block, and the output paths with and without S_dmask. Run on every ISA (the
isa fixture); on the others they are more coverage of the same contract. float16 runs the same
kernel on bf16 hi/lo splits of Q, K, V and P: every case runs in both dtypes."""
import zlib

import numpy as np
import pytest

import flash_attn_c as fa
from test_forward_isa import check, inputs

CASES = [
    # (sq, sk, d, h, hk, feature, return_attn_probs)
    (255, 257, 64, 4, 2, "plain", False),
    (256, 513, 80, 4, 4, "plain", False),
    (321, 770, 128, 2, 1, "causal", False),
    (513, 300, 40, 3, 1, "causal", False),
    (300, 600, 96, 4, 2, "window", False),
    (257, 520, 64, 2, 2, "softcap_causal", False),
    (200, 530, 128, 4, 2, "alibi", False),
    (290, 290, 64, 2, 1, "dropout", True),
    (130, 515, 33, 2, 2, "causal", True),
    (1, 600, 128, 4, 2, "plain", False),
]


@pytest.mark.parametrize("dt", ["bf16", "f16"])
@pytest.mark.parametrize("sq,sk,d,h,hk,feat,probs", CASES)
def test_amx_block_edges(isa, sq, sk, d, h, hk, feat, probs, dt):
    if isa == "scalar" and d * sq * sk > 64 * 300 * 300:
        pytest.skip("large case: covered by the SIMD families; scalar is the slow oracle")
    rng = np.random.default_rng(zlib.crc32(f"{sq}{sk}{d}{h}{hk}{feat}".encode()))
    q, k, v = inputs(rng, 2, sq, sk, h, hk, d, dt)
    scale = d ** -0.5 * (3.0 if "softcap" in feat else 1.0)
    kw = dict(scale=scale)
    args = dict(softmax_scale=scale, return_attn_probs=True)
    if "causal" in feat:
        kw["causal"] = args["causal"] = True
    if feat == "window":
        kw["window"] = args["window_size"] = (300, 5)
    if "softcap" in feat:
        kw["softcap"] = args["softcap"] = 2.5
    if feat == "alibi":
        sl = rng.uniform(0.01, 0.3, (2, h)).astype(np.float32)
        kw["alibi"] = args["alibi_slopes"] = sl
    if feat == "dropout":
        kw["dropout_p"] = args["dropout_p"] = 0.17
    if probs:
        out, lse, sd = fa.flash_attn_func(q, k, v, **args)
        check((out, lse, sd), q, k, v, dt, cache_key=("amxb", dt, sq, sk, d, h, hk, feat), **kw)
    else:
        args["return_attn_probs"] = False
        out = fa.flash_attn_func(q, k, v, **args)
        assert out.dtype == q.dtype and out.shape == q.shape
        # lse from a second call (with probabilities); out of the first one checked on its own
        args["return_attn_probs"] = True
        _, lse, _ = fa.flash_attn_func(q, k, v, **args)
        check((out, lse, None), q, k, v, dt, cache_key=("amxb", dt, sq, sk, d, h, hk, feat), **kw)


@pytest.mark.parametrize("dt", ["bf16", "f16"])
@pytest.mark.parametrize("feat", ["plain", "alibi"])
def test_amx_score_magnitudes(isa, feat, dt):
    """Row maxima from ~0.3 to ~35 and, with alibi far from the diagonal (sq > sk: the first
    sq - sk rows see only keys left of theirs), down to about -100: bfloat16 rows with a shift
    |mu| <= 8 take the exponent in one FMA, the others the exact bracket (fa_fwd_bf16_rows.h);
    the rows of one block straddle that bound, and so do the blocks of one row."""
    sq, sk, d, h = 400, 530, 64, 2
    if feat == "alibi":
        sk = 270
    rng = np.random.default_rng(zlib.crc32(f"mag{feat}{dt}".encode()))
    q, k, v = inputs(rng, 1, sq, sk, h, h, d, dt)
    rows = np.geomspace(0.1, 12.0, sq)[None, :, None, None]
    q = (q.astype(np.float32) * rows).astype(q.dtype)
    scale = d ** -0.5
    kw = dict(scale=scale)
    args = dict(softmax_scale=scale, return_attn_probs=True)
    if feat == "alibi":
        sl = rng.uniform(0.2, 1.0, (1, h)).astype(np.float32)
        kw["alibi"] = args["alibi_slopes"] = sl
    out, lse, sd = fa.flash_attn_func(q, k, v, **args)
    check((out, lse, sd), q, k, v, dt, cache_key=("amxmag", dt, feat), **kw)
