"""Forward benchmark: flash_attn_c vs torch SDPA, side by side in one process.

Usage: python benchmarks/bench_fwd.py [CASE[:dtype] ...] [--reps N] [--isa NAME]
Each case alternates ours and torch run by run and reports the median ratio torch/ours.
"""
import argparse
import statistics
import sys
import time

import ml_dtypes
import numpy as np
import torch

sys.path.insert(0, ".")
import flash_attn_c as fa  # noqa: E402

CASES = {  # b, hq, hkv, s, d, causal
    "F1": (1, 16, 16, 2048, 128, 0), "F1c": (1, 16, 16, 2048, 128, 1),
    "F2": (2, 16, 16, 4096, 64, 0), "F2c": (2, 16, 16, 4096, 64, 1),
    "F3": (1, 32, 8, 2048, 128, 1), "F4": (1, 2, 2, 16384, 128, 1),
}
DT = {"f32": (np.float32, torch.float32), "bf16": (ml_dtypes.bfloat16, torch.bfloat16),
      "f16": (np.float16, torch.float16)}


def run(case, dt, reps):
    b, hq, hk, s, d, causal = CASES[case]
    rng = np.random.default_rng(0)
    npdt, tdt = DT[dt]
    q = rng.standard_normal((b, s, hq, d), dtype=np.float32).astype(npdt)
    k = rng.standard_normal((b, s, hk, d), dtype=np.float32).astype(npdt)
    v = rng.standard_normal((b, s, hk, d), dtype=np.float32).astype(npdt)
    tq, tk, tv = (torch.from_numpy(x.astype(np.float32)).to(tdt).transpose(1, 2).contiguous() for x in (q, k, v))

    def ours():
        return fa.flash_attn_func(q, k, v, causal=bool(causal))

    def theirs():
        return torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=bool(causal),
                                                                enable_gqa=hq != hk)
    o1 = ours().astype(np.float32)
    o2 = theirs().float().transpose(1, 2).numpy()
    err = np.abs(o1 - o2).max()
    ratios, to, tt = [], [], []
    for _ in range(reps):
        t0 = time.perf_counter(); ours(); t1 = time.perf_counter(); theirs(); t2 = time.perf_counter()
        to.append(t1 - t0); tt.append(t2 - t1); ratios.append((t2 - t1) / (t1 - t0))
    flop = 4 * b * hq * s * s * d / (2 if causal else 1)
    mo, mt = statistics.median(to), statistics.median(tt)
    print(f"{case:4s} {dt:5s} ours {mo*1e3:8.1f} ms {flop/mo/1e9:6.1f} GF/s | torch {mt*1e3:8.1f} ms "
          f"{flop/mt/1e9:6.1f} GF/s | ratio {statistics.median(ratios):5.2f} | maxdiff {err:.2e}", flush=True)


def sgemm_peak(reps=7):
    """fp32 GEMM rate at the benchmark's thread count (torch/oneDNN sgemm, 1024^3), a practical
    stand-in for the FMA peak, measured in the same process as the cases."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    a @ b
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter(); a @ b; ts.append(time.perf_counter() - t0)
    return 2 * 1024 ** 3 / min(ts) / 1e9


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--isa", default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    fa.set_num_threads(2)
    if a.isa:
        fa.set_isa(a.isa)
    print(fa.cpu_info(), "torch", torch.__version__)
    print(f"sgemm peak probe (2 threads): {sgemm_peak():.1f} GFLOP/s")
    todo = a.cases or ["F1:f32", "F1c:f32", "F2:f32", "F2c:f32", "F3:f32", "F4:f32"]
    for c in todo:
        case, dt = (c.split(":") + ["f32"])[:2]
        run(case, dt, a.reps)


if __name__ == "__main__":
    main()
