"""Cross-check flash_attn_c against GPU flash attention (torch SDPA's FlashAttention backend on
CUDA), forward and backward, on the same fp16/bf16 inputs, both measured against the float64
reference.

    python benchmarks/gpu_crosscheck.py [--out benchmarks/GPU_CROSSCHECK.md]

Needs a CUDA build of torch and a GPU (the lent device machine); prints a markdown table and
exits non-zero if our error exceeds twice the GPU kernel's error plus a small absolute term on
any case: the same rule flash-attn's own test suite applies between its kernel and a naive
low-precision computation.
"""
import argparse
import sys

import numpy as np

import flash_attn_c as fa
from flash_attn_c import reference as ref

CASES = [  # (batch, seqlen_q, seqlen_k, heads, kv heads, headdim, causal)
    (2, 128, 128, 8, 8, 64, False),
    (2, 113, 203, 6, 2, 128, False),
    (1, 1024, 1024, 8, 8, 128, True),
    (1, 511, 511, 4, 1, 96, True),
    (3, 1, 239, 8, 2, 64, False),
]


def gpu_flash(q, k, v, do, causal, torch, dtype):
    """torch SDPA with only the FlashAttention backend allowed, on CUDA; (b, s, h, d) arrays."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    tq, tk, tv = (torch.tensor(x.astype(np.float32), device="cuda", dtype=dtype)
                  .transpose(1, 2).requires_grad_() for x in (q, k, v))
    g = q.shape[2] // k.shape[2]
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
        o = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=causal,
                                                              enable_gqa=g > 1)
    o.backward(torch.tensor(do.astype(np.float32), device="cuda", dtype=dtype).transpose(1, 2))
    back = lambda t: t.detach().transpose(1, 2).float().cpu().numpy()  # noqa: E731
    return back(o), back(tq.grad), back(tk.grad), back(tv.grad)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to cross-check")
        return 0
    rows = [f"GPU: {torch.cuda.get_device_name()} (torch {torch.__version__}); CPU kernels: "
            f"{fa.cpu_info()['isa']}", "",
            "| case | dtype | tensor | max err ours | max err GPU flash | ratio | ok |",
            "|---|---|---|---|---|---|---|"]
    bad = 0
    rng = np.random.default_rng(0)
    for (b, sq, sk, h, hk, d, causal) in CASES:
        if causal and sq != sk:
            continue  # torch's is_causal is top-left; flash-attn's bottom-right
        for dname, tdt in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
            npdt = np.float16 if dname == "fp16" else fa.bfloat16
            q = rng.standard_normal((b, sq, h, d)).astype(npdt)
            k = rng.standard_normal((b, sk, hk, d)).astype(npdt)
            v = rng.standard_normal((b, sk, hk, d)).astype(npdt)
            do = rng.standard_normal((b, sq, h, d)).astype(npdt)
            out, lse, _ = fa.flash_attn_fwd(q, k, v, causal=causal)
            dq, dk, dv = fa.flash_attn_bwd(do, q, k, v, out, lse, causal=causal)
            o64, lse64, _ = ref.flash_attn_fwd(q, k, v, causal=causal)
            g64 = ref.flash_attn_bwd(do, q, k, v, o64, lse64, causal=causal)
            gpu = gpu_flash(q, k, v, do, causal, torch, tdt)
            for name, mine, theirs, want in zip(("out", "dq", "dk", "dv"), (out, dq, dk, dv), gpu,
                                                (o64,) + tuple(g64)):
                e_ours = float(np.abs(mine.astype(np.float64) - want).max())
                e_gpu = float(np.abs(theirs.astype(np.float64) - want).max())
                ok = e_ours <= 2 * e_gpu + 1e-5 * float(np.abs(want).max())
                bad += not ok
                rows.append(f"| b{b} sq{sq} sk{sk} h{h}/{hk} d{d}{' causal' if causal else ''} | {dname} "
                            f"| {name} | {e_ours:.3g} | {e_gpu:.3g} | {e_ours / max(e_gpu, 1e-30):.2f} "
                            f"| {'yes' if ok else 'NO'} |")
    text = "\n".join(rows)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write("# flash_attn_c vs GPU flash attention (float64 reference errors)\n\n" + text + "\n")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
