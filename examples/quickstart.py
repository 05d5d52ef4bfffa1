"""Compute attention on random data with flash_attn_c, check it against the float64 reference and
print the error and the time.

    python examples/quickstart.py [--seqlen 2048] [--heads 16] [--headdim 128] [--causal]
"""
import argparse
import time

import numpy as np

import flash_attn_c
from flash_attn_c import reference
from flash_attn_c.testing import assert_attention_close, max_mean_error


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--kv-heads", type=int, default=None, help="fewer kv heads = GQA")
    ap.add_argument("--headdim", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--causal", action="store_true")
    args = ap.parse_args()

    dtype = flash_attn_c.bfloat16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
    hk = args.kv_heads or args.heads
    rng = np.random.default_rng(0)
    q = rng.standard_normal((args.batch, args.seqlen, args.heads, args.headdim)).astype(dtype)
    k = rng.standard_normal((args.batch, args.seqlen, hk, args.headdim)).astype(dtype)
    v = rng.standard_normal((args.batch, args.seqlen, hk, args.headdim)).astype(dtype)

    info = flash_attn_c.cpu_info()
    print(f"flash_attn_c {flash_attn_c.__version__}: kernels={info['isa']} threads={info['num_threads']}")
    flash_attn_c.flash_attn_func(q, k, v, causal=args.causal)  # warm-up
    t0 = time.perf_counter()
    out = flash_attn_c.flash_attn_func(q, k, v, causal=args.causal)
    dt = time.perf_counter() - t0
    flops = 4 * args.batch * args.heads * args.seqlen * args.seqlen * args.headdim
    flops /= 2 if args.causal else 1
    print(f"out {out.shape} {out.dtype}: {dt * 1e3:.1f} ms, {flops / dt / 1e9:.1f} GFLOP/s")

    want = reference.flash_attn_func(q, k, v, causal=args.causal)  # naive float64
    low = reference.flash_attn_func(q, k, v, causal=args.causal, compute_dtype=dtype)
    mx, mean = max_mean_error(out, want)
    mx_low, _ = max_mean_error(low, want)
    print(f"error vs float64 reference: max {mx:.3g}, mean {mean:.3g} "
          f"(naive {args.dtype} computation: max {mx_low:.3g})")
    assert_attention_close(out, want, reference_low_precision=low)
    print("OK: within flash-attn's tolerance rule")


if __name__ == "__main__":
    main()
