"""Migrating attention calls to (and from) torch_npu's npu_fusion_attention, checked on the CPU.

Code written for an Ascend NPU calls torch_npu.npu_fusion_attention; code written for a GPU calls
torch's scaled_dot_product_attention, flash-attn or xformers. Each section below puts one such call
next to its npu_fusion_attention equivalent, runs both on the same data and prints the largest and
mean absolute difference. The argument translations are the point:

  - npu_fusion_attention's scale defaults to 1.0: pass 1/sqrt(D) explicitly.
  - Causal masks: torch's is_causal and xformers' LowerTriangularMask are top-left aligned
    (sparse_mode=2); flash-attn's causal is bottom-right aligned (sparse_mode=3). Both take the
    compressed [2048, 2048] mask; its contents are not read, the pattern comes from the mode.
  - flash-attn windows (left, right) are sparse_mode=4 bands with pre_tockens=left,
    next_tockens=right.
  - cu_seqlens [0, a, a+b, ...] becomes actual_seq_qlen [a, a+b, ...] (no leading 0), layout TND.
  - An additive bias applied after scaling (xformers attn_bias, torch float attn_mask) becomes
    pse = bias / scale, because the NPU adds pse before scaling.

Run from the repository root after building in place: PYTHONPATH=. python examples/npu_migration.py
(torch is optional; its sections are skipped without it.)
"""
import numpy as np

import flash_attn_c
from flash_attn_c import npu_fusion_attention

rng = np.random.default_rng(0)
CAUSAL_2048 = np.triu(np.ones((2048, 2048), dtype=bool), k=1)  # what NPU code passes for 2/3/4


def report(name, a, b):
    err = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    print(f"{name:<60s} max {err.max():.2e}  mean {err.mean():.2e}")
    assert err.max() < 1e-5, name


def randn(*shape):
    return rng.standard_normal(shape).astype(np.float32)


# ---- torch.nn.functional.scaled_dot_product_attention -> BNSD -----------------------------------

def sdpa_sections():
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        print("torch is not installed: skipping the scaled_dot_product_attention sections")
        return
    b, n, sq, sk, d = 2, 4, 48, 80, 64
    q, k, v = randn(b, n, sq, d), randn(b, n, sk, d), randn(b, n, sk, d)
    tq, tk, tv = (torch.from_numpy(x) for x in (q, k, v))
    scale = d ** -0.5

    ref = F.scaled_dot_product_attention(tq, tk, tv).numpy()
    out = npu_fusion_attention(q, k, v, n, "BNSD", scale=scale)[0]
    report("SDPA -> BNSD", out, ref)

    ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True).numpy()
    out = npu_fusion_attention(q, k, v, n, "BNSD", scale=scale, atten_mask=CAUSAL_2048,
                               sparse_mode=2)[0]
    report("SDPA is_causal (top-left) -> BNSD sparse_mode=2", out, ref)

    # A boolean SDPA attn_mask says True = attend; torch_npu's atten_mask says True = masked out.
    keep = rng.random((sq, sk)) < 0.8
    keep[:, 0] = True  # SDPA gives NaN for rows with nothing to attend; the NPU does not
    ref = F.scaled_dot_product_attention(tq, tk, tv, attn_mask=torch.from_numpy(keep)).numpy()
    out = npu_fusion_attention(q, k, v, n, "BNSD", scale=scale, atten_mask=~keep)[0]
    report("SDPA boolean attn_mask -> BNSD atten_mask=~mask", out, ref)

    # GQA: SDPA's enable_gqa and the NPU both map query head h to kv head h // (Nq // Nkv).
    k2, v2 = k[:, :2], v[:, :2]
    ref = F.scaled_dot_product_attention(tq, torch.from_numpy(k2), torch.from_numpy(v2),
                                         enable_gqa=True).numpy()
    out = npu_fusion_attention(q, k2, v2, n, "BNSD", scale=scale)[0]
    report("SDPA enable_gqa -> BNSD with fewer kv heads", out, ref)


# ---- flash-attn -> BSND ---------------------------------------------------------------------------

def flash_attn_sections():
    b, sq, sk, n, nk, d = 2, 40, 72, 8, 2, 64
    q, k, v = randn(b, sq, n, d), randn(b, sk, nk, d), randn(b, sk, nk, d)
    scale = d ** -0.5

    ref = flash_attn_c.flash_attn_func(q, k, v, causal=True)
    out = npu_fusion_attention(q, k, v, n, "BSND", scale=scale, atten_mask=CAUSAL_2048,
                               sparse_mode=3)[0]
    report("flash_attn_func causal (bottom-right) -> BSND sparse_mode=3", out, ref)

    ref = flash_attn_c.flash_attn_func(q, k, v, window_size=(16, 4))
    out = npu_fusion_attention(q, k, v, n, "BSND", scale=scale, atten_mask=CAUSAL_2048,
                               sparse_mode=4, pre_tockens=16, next_tockens=4)[0]
    report("flash_attn_func window (16, 4) -> BSND sparse_mode=4", out, ref)

    # BSH is BSND with the heads folded into the hidden size: same numbers, no copies.
    out_bsh = npu_fusion_attention(q.reshape(b, sq, n * d), k.reshape(b, sk, nk * d),
                                   v.reshape(b, sk, nk * d), n, "BSH", scale=scale)[0]
    ref = flash_attn_c.flash_attn_func(q, k, v)
    report("flash_attn_func -> BSH", out_bsh.reshape(b, sq, n, d), ref)


def varlen_section():
    if not hasattr(flash_attn_c, "flash_attn_varlen_func"):
        print("flash_attn_varlen_func is not available in this build: skipping the TND section")
        return
    n, d = 4, 32
    lens_q, lens_k = [17, 5, 30], [20, 5, 41]
    cu_q = np.cumsum([0] + lens_q).astype(np.int32)
    cu_k = np.cumsum([0] + lens_k).astype(np.int32)
    q, k, v = randn(cu_q[-1], n, d), randn(cu_k[-1], n, d), randn(cu_k[-1], n, d)
    ref = flash_attn_c.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                              causal=True)
    out = npu_fusion_attention(q, k, v, n, "TND", scale=d ** -0.5, atten_mask=CAUSAL_2048,
                               sparse_mode=3, actual_seq_qlen=cu_q[1:].tolist(),
                               actual_seq_kvlen=cu_k[1:].tolist())[0]
    report("flash_attn_varlen_func causal -> TND actual_seq_qlen", out, ref)


# ---- xformers memory_efficient_attention -> BNSD ------------------------------------------------

def xformers_mea(query, key, value, attn_bias=None, scale=None, causal=False):
    """xformers.ops.memory_efficient_attention on 3-D (B*N, S, D) inputs, written out in NumPy:
    softmax(q k^T * scale + attn_bias) v with scale = 1/sqrt(D) by default; causal stands for
    xformers' LowerTriangularMask (top-left aligned)."""
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    s = np.einsum("bqd,bkd->bqk", query.astype(np.float64), key.astype(np.float64)) * scale
    if attn_bias is not None:
        s = s + attn_bias
    if causal:
        s = np.where(np.triu(np.ones(s.shape[-2:], bool), 1), -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("bqk,bkd->bqd", p / p.sum(-1, keepdims=True), value.astype(np.float64))


def xformers_sections():
    b, n, sq, sk, d = 2, 4, 33, 50, 32
    q, k, v = randn(b * n, sq, d), randn(b * n, sk, d), randn(b * n, sk, d)
    view = lambda x: x.reshape(b, n, x.shape[1], d)  # (B*N, S, D) is BNSD with B and N merged
    scale = d ** -0.5

    ref = xformers_mea(q, k, v, causal=True)
    out = npu_fusion_attention(view(q), view(k), view(v), n, "BNSD", scale=scale,
                               atten_mask=CAUSAL_2048, sparse_mode=2)[0]
    report("xformers LowerTriangularMask -> BNSD sparse_mode=2", out.reshape(b * n, sq, d), ref)

    bias = randn(b * n, sq, sk)
    ref = xformers_mea(q, k, v, attn_bias=bias)
    out = npu_fusion_attention(view(q), view(k), view(v), n, "BNSD", scale=scale,
                               pse=(bias / scale).reshape(b, n, sq, sk))[0]
    report("xformers tensor attn_bias -> BNSD pse = bias / scale", out.reshape(b * n, sq, d), ref)


if __name__ == "__main__":
    sdpa_sections()
    flash_attn_sections()
    varlen_section()
    xformers_sections()
    print("all migrations agree")
