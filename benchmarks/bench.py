#!/usr/bin/env python3
"""flash_attn_c benchmark: the protocol of BENCHMARKS.md.

Peers measured in the same process, run by run (A B A B ...): PyTorch's CPU
scaled_dot_product_attention and a naive NumPy computation; and the machine itself (fp32 FMA
peak, AMX bf16 peak, DRAM read bandwidth, measured by the C probes in probes.c in this run).
Every output is checked against a float64 reference before it is timed, with flash-attn's
tolerance rule (our error at most twice torch's, plus a small atol), so a fast wrong answer fails
the case instead of being reported.

    python benchmarks/bench.py [--quick | --full] [--cases F1,F2] [--threads 2]
                               [--dtypes f32,bf16] [--out benchmarks/RESULTS.md]
                               [--plot benchmarks/gflops.png] [--scaling]

See benchmarks/README.md for the cases, what each column means and how to read the results.
"""
import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import traceback
import zlib
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# numpy, ml_dtypes, flash_attn_c and torch are imported by load_libraries() after the command line
# is parsed: the BLAS thread count has to be in the environment before numpy loads OpenBLAS.
np = fa = torch = F = BF16 = testing = None


# ----------------------------------------------------------------------------------------------
# Cases (BENCHMARKS.md table)

@dataclass(frozen=True)
class Case:
    id: str
    kind: str          # fwd | train | varlen | decode | memory | sweep
    title: str
    b: int
    hq: int
    hkv: int
    sq: int
    sk: int
    d: int
    causal: tuple
    dtypes: tuple
    dropout: float = 0.0

    def shape_text(self):
        if self.kind in ("varlen", "npu_tnd"):
            return (f"{self.b} sequences of random length, {self.sq} tokens, Hq={self.hq} "
                    f"Hkv={self.hkv} D={self.d}")
        if self.kind == "sweep":
            return f"B={self.b} Hq={self.hq} Hkv={self.hkv} Sq=Sk=S D={self.d}"
        return (f"B={self.b} Hq={self.hq} Hkv={self.hkv} Sq={self.sq} Sk={self.sk} D={self.d}"
                + (f" dropout={self.dropout}" if self.dropout else ""))


CASES = {c.id: c for c in [
    Case("F1", "fwd", "prefill forward", 1, 16, 16, 2048, 2048, 128, (False, True),
         ("f32", "bf16", "f16")),
    Case("F2", "fwd", "prefill forward, d=64", 2, 16, 16, 4096, 4096, 64, (False, True),
         ("f32", "bf16", "f16")),
    Case("F3", "fwd", "GQA forward", 1, 32, 8, 2048, 2048, 128, (True,), ("f32", "bf16")),
    Case("F4", "fwd", "long context, few heads", 1, 2, 2, 16384, 16384, 128, (True,),
         ("f32", "bf16")),
    Case("T1", "train", "training step (fwd+bwd)", 1, 16, 16, 2048, 2048, 128, (False, True),
         ("f32", "bf16")),
    Case("T2", "train", "training step with dropout 0.1", 4, 8, 8, 1024, 1024, 64, (True,),
         ("f32", "bf16"), dropout=0.1),
    Case("T3", "train", "long-context training, few heads", 1, 2, 2, 8192, 8192, 128, (True,),
         ("f32", "bf16")),
    Case("V1", "varlen", "varlen", 8, 16, 16, 8192,
         8192, 128, (True,), ("f32", "bf16")),
    Case("N1", "npu_bnsd", "npu_fusion_attention BNSD (sparse_mode 3 when causal)", 1, 16, 16,
         2048, 2048, 128, (False, True), ("f32", "bf16")),
    Case("N2", "npu_tnd", "npu_fusion_attention TND, 8 sequences, 8192 tokens (sparse_mode 3)", 8,
         16, 16, 8192, 8192, 128, (True,), ("f32", "bf16")),
    Case("D1", "decode", "decode, one new token", 8, 32, 8, 1, 8192, 128, (False,),
         ("f32", "bf16")),
    Case("D2", "decode", "decode, long cache", 1, 32, 8, 1, 65536, 128, (False,), ("bf16",)),
    Case("M1", "memory", "memory: peak extra bytes", 1, 4, 4, 32768, 32768, 128, (True,),
         ("f32",)),
    Case("S", "sweep", "GFLOP/s against sequence length", 1, 16, 16, 0, 0, 128,
         (False, True), ("f32", "bf16")),
]}

# Per mode: cases, dtypes, timed runs (ours and torch), naive runs, plot sweep lengths, M1
# lengths, probe seconds.
MODES = {
    "quick": dict(cases=["F1", "F3", "T1", "V1", "N2", "D1", "M1", "S"], dtypes=["f32", "bf16"],
                  runs=3, naive_runs=1, sweep=[512, 1024, 2048], mem=[4096, 32768], probe_s=0.1),
    "default": dict(cases=list(CASES), dtypes=["f32", "bf16", "f16"], runs=5, naive_runs=3,
                    sweep=[512, 1024, 2048, 4096], mem=[4096, 8192, 16384, 32768], probe_s=0.2),
    "full": dict(cases=list(CASES), dtypes=["f32", "bf16", "f16"], runs=7, naive_runs=5,
                 sweep=[512, 1024, 2048, 3072, 4096, 6144, 8192],
                 mem=[4096, 8192, 16384, 32768], probe_s=0.3),
}
SCALING_THREADS = [1, 2, 4, 8, 16]
GIB = 1 << 30


def fwd_flop(b, hq, sq, sk, d, causal):
    """BENCHMARKS.md: 4*B*Hq*Sq*Sk*D, halved for causal (sq == sk)."""
    f = 4.0 * b * hq * sq * sk * d
    return f / 2 if causal else f


# ----------------------------------------------------------------------------------------------
# Libraries, machine line

# --isa avx2: what a machine without AVX-512 runs. ATen's own kernels follow ATEN_CPU_CAPABILITY,
# but torch's GEMMs go through oneDNN and MKL, which pick their ISA themselves: all three are
# capped, before torch is imported, so that torch's flash attention is AVX2 through and through.
TORCH_ISA_ENV = {"avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2",
                          "MKL_ENABLE_INSTRUCTIONS": "AVX2"}}


def load_libraries(threads, isa=None):
    """Import numpy and friends (after setting the BLAS thread count for the naive peer); with
    isa, run ours on that kernel family and cap torch's ISA alike (TORCH_ISA_ENV)."""
    global np, fa, torch, F, BF16, testing
    if threads:
        os.environ["OPENBLAS_NUM_THREADS"] = str(threads)
    os.environ.update(TORCH_ISA_ENV.get(isa, {}))
    # OpenBLAS's idle worker threads busy-wait 2^28 cycles (~0.13 s of CPU here, measured) after
    # every BLAS call: after each naive run they would spin through the next timed call (ours,
    # in the round order ours, torch, naive) and take one of the two CPUs from it. The shortest
    # timeout (2^4 cycles) parks them at once; the OpenMP pools of torch and of flash_attn_c spin
    # ~10 ms each after a call, alike for both.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    import numpy
    import ml_dtypes
    np = numpy
    BF16 = np.dtype(ml_dtypes.bfloat16)
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    last = None
    for attempt in range(3):  # a colleague may be rebuilding the extension in place
        try:
            import flash_attn_c
            fa = flash_attn_c
            break
        except ImportError as e:
            last = e
            print(f"import flash_attn_c failed ({e}); retrying in 60 s", file=sys.stderr)
            time.sleep(60)
    else:
        raise SystemExit(f"cannot import flash_attn_c: {last}")
    if isa:
        fa.set_isa(isa)
    try:
        from flash_attn_c import testing as t
        testing = t
    except ImportError:
        testing = None
    try:
        import torch as t
        import torch.nn.functional as f
        torch, F = t, f
    except ImportError:
        torch = F = None


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def git_revision():
    try:
        rev = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return (rev + ("+dirty" if dirty else "")) if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sanitizer_build():
    """True when the loaded extension pulled in a sanitizer runtime (timings would mislead)."""
    try:
        with open("/proc/self/maps") as f:
            return any(("libasan" in line or "libtsan" in line) for line in f)
    except OSError:
        return False


def machine_line(threads_text):
    info = fa.cpu_info()
    parts = [
        f"{cpu_model()} ({os.cpu_count()} CPUs)",
        f"flash_attn_c {getattr(fa, '__version__', '?')} @ {git_revision()}, ISA {info['isa']} "
        f"(supported {'/'.join(info['supported'])}, compiled {'/'.join(info['compiled'])}), "
        f"{threads_text} threads",
        f"numpy {np.__version__}",
        f"torch {torch.__version__ if torch is not None else 'not installed'}"
        + (f" (ATen {torch.backends.cpu.get_cpu_capability()})" if torch is not None else ""),
        f"python {platform.python_version()}",
        datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
    ]
    if sanitizer_build():
        parts.append("WARNING: extension built with a sanitizer")
    return " | ".join(parts)


def set_threads(n):
    fa.set_num_threads(n)
    if torch is not None:
        torch.set_num_threads(n)


# ----------------------------------------------------------------------------------------------
# Progress bar: tqdm if installed, else a small one of our own on stderr.

class Progress:
    def __init__(self, total):
        self.total, self.done, self.desc, self.t0 = total, 0, "", time.time()
        self.tty = sys.stderr.isatty()
        self.bar = None
        if self.tty:  # into a log file, one line per step reads better than a redrawn bar
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, file=sys.stderr, dynamic_ncols=True, unit="step")
            except ImportError:
                pass

    def _draw(self):
        if self.tty:
            n = 30 * self.done // max(self.total, 1)
            sys.stderr.write(f"\r[{'#' * n}{'.' * (30 - n)}] {self.done}/{self.total} "
                             f"{time.time() - self.t0:5.0f}s {self.desc[:40]:<40}")
            sys.stderr.flush()
        else:
            sys.stderr.write(f"[{self.done}/{self.total}] {self.desc}\n")

    def describe(self, desc):
        self.desc = desc
        if self.bar is not None:
            self.bar.set_description_str(desc)
        else:
            self._draw()

    def step(self):
        self.done += 1
        if self.bar is not None:
            self.bar.update(1)
        elif self.tty:
            self._draw()

    def write(self, line):
        if self.bar is not None:
            self.bar.write(line)
        else:
            if self.tty:
                sys.stderr.write("\r" + " " * 100 + "\r")
            print(line, flush=True)
            if self.tty:
                self._draw()

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif self.tty:
            sys.stderr.write("\n")


# ----------------------------------------------------------------------------------------------
# Arrays

def np_dtype(name):
    return {"f32": np.dtype(np.float32), "f16": np.dtype(np.float16), "bf16": BF16}[name]


def torch_dtype(name):
    return {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[name]


def randn(rng, shape, dt):
    """Fresh standard-normal values (never zeros), rounded to the benchmark dtype."""
    return rng.standard_normal(shape, dtype=np.float32).astype(np_dtype(dt))


def to_torch(x):
    """A CPU tensor sharing x's memory (bfloat16 via an int16 view)."""
    if x.dtype == BF16:
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def to_numpy(t):
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(BF16)
    return t.numpy()


def seed_of(*parts):
    """A seed that is the same in every process (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def sample_rows(n, rng, count=48):
    """Query rows checked against the float64 reference: first, last, evenly spaced, random."""
    rows = set(np.linspace(0, n - 1, min(n, count)).astype(int).tolist())
    rows.update(rng.integers(0, n, min(n, count // 3)).tolist())
    return np.array(sorted(rows))


def ref_forward_rows(q, k, v, rows, causal, scale):
    """float64 attention for the query rows `rows` of q (b, sq, h, d); causal bottom-right.
    One kv head at a time, so memory stays at a few times one head's K/V in float64."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    g = h // hk
    out = np.empty((b, len(rows), h, d))
    qr = q[:, rows].astype(np.float64)
    hidden = np.arange(sk)[None, :] > (rows[:, None] + sk - sq) if causal else None
    for kh in range(hk):
        kk = k[:, :, kh].astype(np.float64)                       # (b, sk, d)
        vv = v[:, :, kh].astype(np.float64)
        qs = qr[:, :, kh * g:(kh + 1) * g].transpose(0, 2, 1, 3)  # (b, g, r, d)
        s = np.matmul(qs, kk.transpose(0, 2, 1)[:, None]) * scale  # (b, g, r, sk)
        if causal:
            s[:, :, hidden] = -np.inf
        s -= s.max(-1, keepdims=True)
        p = np.exp(s)
        p /= p.sum(-1, keepdims=True)
        out[:, :, kh * g:(kh + 1) * g] = np.matmul(p, vv[:, None]).transpose(0, 2, 1, 3)
    return out


class CheckFailed(Exception):
    pass


def check_close(name, actual, desired, baseline=None, multiplier=2.0):
    """flash-attn's rule via flash_attn_c.testing (our error <= multiplier x the low-precision
    peer's error + a small atol), or a dtype tolerance without a peer. Raises CheckFailed."""
    try:
        if testing is not None:
            testing.assert_attention_close(actual, desired, reference_low_precision=baseline,
                                           multiplier=multiplier, name=name)
            return
        a = np.asarray(actual, dtype=np.float64)
        err = float(np.abs(a - desired).max())
        scale = float(np.abs(desired).max()) or 1.0
        if baseline is not None:
            base = float(np.abs(np.asarray(baseline, dtype=np.float64) - desired).max())
            tol = multiplier * base + 1e-5 * scale
        else:
            tol = {"float32": 2e-5, "float16": 2e-3}.get(np.asarray(actual).dtype.name,
                                                          1.6e-2) * 2 * scale
        if not err <= tol:
            raise AssertionError(f"{name}: max abs error {err:.3g} > tolerance {tol:.3g}")
    except AssertionError as e:
        raise CheckFailed(str(e)) from None


# ----------------------------------------------------------------------------------------------
# Naive NumPy peer: the full score matrix, float32 arithmetic (inputs are upcast beforehand).

def naive_forward(q, k, v, causal, scale, keep_probs=False):
    """(b, sq, h, d) float32 in, out (b, sq, h, d); with keep_probs also the probabilities."""
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    qt = q.transpose(0, 2, 1, 3)
    kt = k.transpose(0, 2, 3, 1)
    vt = v.transpose(0, 2, 1, 3)
    if hk != h:
        kt = np.repeat(kt, h // hk, axis=1)
        vt = np.repeat(vt, h // hk, axis=1)
    s = np.matmul(qt, kt)
    s *= np.float32(scale)
    if causal:
        np.copyto(s, -np.inf, where=np.triu(np.ones((sq, sk), dtype=bool), k=sk - sq + 1))
    s -= s.max(-1, keepdims=True)
    np.exp(s, out=s)
    s /= s.sum(-1, keepdims=True)
    o = np.matmul(s, vt).transpose(0, 2, 1, 3)
    return (o, s, vt) if keep_probs else o


def naive_train(q, k, v, dout, causal, scale, dropout_p, rng):
    """Forward and backward through the full matrices; returns out, dq, dk, dv."""
    b, sq, h, d = q.shape
    hk = k.shape[2]
    o, p, vt = naive_forward(q, k, v, causal, scale, keep_probs=True)
    keep = None
    if dropout_p > 0:
        keep = (rng.random(p.shape, dtype=np.float32) >= dropout_p) / np.float32(1 - dropout_p)
        pd = p * keep
        o = np.matmul(pd, vt).transpose(0, 2, 1, 3)
    else:
        pd = p
    do = dout.transpose(0, 2, 1, 3)                                   # (b, h, sq, d)
    dv = np.matmul(pd.transpose(0, 1, 3, 2), do)                       # (b, h, sk, d)
    del pd
    dp = np.matmul(do, vt.transpose(0, 1, 3, 2))                       # (b, h, sq, sk)
    if keep is not None:
        dp *= keep
        del keep
    delta = np.sum(do * o.transpose(0, 2, 1, 3), axis=-1, keepdims=True)
    dp -= delta
    dp *= p                                                            # dS
    kt = k.transpose(0, 2, 1, 3)
    qt = q.transpose(0, 2, 1, 3)
    if hk != h:
        kt = np.repeat(kt, h // hk, axis=1)
    dq = np.matmul(dp, kt) * np.float32(scale)
    dk = np.matmul(dp.transpose(0, 1, 3, 2), qt) * np.float32(scale)
    if hk != h:
        dk = dk.reshape(b, hk, h // hk, *dk.shape[2:]).sum(2)
        dv = dv.reshape(b, hk, h // hk, *dv.shape[2:]).sum(2)
    return (o, dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3))


def naive_bytes(kind, b, hq, sq, sk, d):
    """Memory the naive peer needs (the full score matrices dominate)."""
    scores = 4.0 * b * hq * sq * sk
    mult = 4 if kind == "train" else 1
    return mult * scores + 1.0 * sq * sk + 8.0 * b * hq * sk * d


# ----------------------------------------------------------------------------------------------
# Timing

def time_alternating(fns, runs, naive_runs, warmup):
    """Warm-up calls, then `runs` rounds of ours, torch, naive (naive only in its first
    naive_runs rounds). Returns {name: [seconds]}."""
    for name, fn in fns.items():
        for _ in range(warmup if name != "naive" else 0):
            fn()
    times = {name: [] for name in fns}
    for i in range(runs):
        for name, fn in fns.items():
            if name == "naive" and i >= naive_runs:
                continue
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


@dataclass
class Result:
    case: str
    dtype: str
    causal: object              # True/False, or None where it does not apply
    status: str = "ok"          # ok | failed | skipped
    note: str = ""
    flop: float = 0.0
    bytes: float = 0.0          # K/V bytes read (decode)
    times: dict = field(default_factory=dict)
    naive_note: str = ""
    torch_note: str = ""
    extra: dict = field(default_factory=dict)

    def median(self, name):
        ts = self.times.get(name)
        return statistics.median(ts) if ts else None

    def ratio(self, peer):
        """Median, min and max over run pairs of t_peer / t_ours (> 1: ours is faster)."""
        a, b = self.times.get("ours"), self.times.get(peer)
        if not a or not b:
            return None
        r = [tp / to for to, tp in zip(a, b)]
        return statistics.median(r), min(r), max(r)


# ----------------------------------------------------------------------------------------------
# Case runners: each builds inputs, checks ours (and naive) against float64 with torch as the
# low-precision baseline, then times. They return a Result.

def run_forward(case, dt, causal, cfg, s=None, naive=None):
    naive = cfg.naive if naive is None else naive
    b, hq, hkv, d = case.b, case.hq, case.hkv, case.d
    sq = sk = s or case.sq
    res = Result(case.id, dt, causal, flop=fwd_flop(b, hq, sq, sk, d, causal))
    rng = np.random.default_rng(seed_of(case.id, dt, causal, sq))
    q = randn(rng, (b, sq, hq, d), dt)
    k = randn(rng, (b, sk, hkv, d), dt)
    v = randn(rng, (b, sk, hkv, d), dt)
    scale = d ** -0.5
    npu = case.kind == "npu_bnsd"
    if npu:
        # An NPU script's tensors are BNSD-contiguous; ours reads them as they are.
        qb, kb, vb = (np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v))
        mask = np.triu(np.ones((2048, 2048), bool), 1) if causal else None

        def ours_npu():
            out = fa.npu_fusion_attention(qb, kb, vb, hq, "BNSD", atten_mask=mask, scale=scale,
                                          sparse_mode=3 if causal else 0)[0]
            return out.transpose(0, 2, 1, 3)
        fns = {"ours": ours_npu}
    else:
        fns = {"ours": lambda: fa.flash_attn_func(q, k, v, causal=causal)}
    if torch is not None:
        tq, tk, tv = ((to_torch(x) for x in (qb, kb, vb)) if npu else
                      (to_torch(x).transpose(1, 2) for x in (q, k, v)))
        gqa = hq != hkv

        def torch_fn():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal,
                                                      enable_gqa=gqa)
        fns["torch"] = torch_fn
    else:
        res.torch_note = "torch not installed"
    if naive:
        need = naive_bytes("fwd", b, hq, sq, sk, d)
        if need > cfg.naive_limit:
            res.naive_note = f"skipped (memory): needs {need / GIB:.1f} GiB"
        else:
            q32, k32, v32 = (np.asarray(x, dtype=np.float32) for x in (q, k, v))
            fns["naive"] = lambda: naive_forward(q32, k32, v32, causal, scale)
    rows = sample_rows(sq, rng)
    desired = ref_forward_rows(q, k, v, rows, causal, scale)
    out = fns["ours"]()
    base = to_numpy(fns["torch"]().transpose(1, 2))[:, rows] if "torch" in fns else None
    check_close("out", out[:, rows], desired, base)
    if "naive" in fns:
        check_close("naive out", fns["naive"]()[:, rows], desired)
    del out, base
    res.times = time_alternating(fns, cfg.runs, cfg.naive_runs, cfg.warmup)
    return res


def training_api():
    """flash_attn_c.torch.flash_attn_func, or (None, reason)."""
    if torch is None:
        return None, "torch not installed"
    try:
        import flash_attn_c.torch as fat
    except Exception as e:  # ImportError today; anything the module raises while incomplete
        return None, f"flash_attn_c.torch not available ({type(e).__name__}: {e})"
    if not hasattr(fat, "flash_attn_func"):
        return None, "flash_attn_c.torch has no flash_attn_func"
    return fat.flash_attn_func, ""


def run_train(case, dt, causal, cfg):
    fn, why = training_api()
    res = Result(case.id, dt, causal, flop=3.5 * fwd_flop(case.b, case.hq, case.sq, case.sk,
                                                          case.d, causal))
    if fn is None:
        res.status, res.note = "skipped", why
        return res
    b, hq, hkv, s, d, p = case.b, case.hq, case.hkv, case.sq, case.d, case.dropout
    rng = np.random.default_rng(seed_of(case.id, dt, causal))
    arrays = [randn(rng, (b, s, hq, d), dt), randn(rng, (b, s, hkv, d), dt),
              randn(rng, (b, s, hkv, d), dt)]
    dout_np = randn(rng, (b, s, hq, d), dt)
    dout = to_torch(dout_np)
    scale = d ** -0.5
    gqa = hq != hkv

    def leaves():
        return [to_torch(x).clone().requires_grad_(True) for x in arrays]

    ours_leaves, torch_leaves = leaves(), leaves()

    def step(leaves_, forward, dropout):
        for t in leaves_:
            t.grad = None
        o = forward(*leaves_, dropout)
        o.backward(dout)
        return o, *(t.grad for t in leaves_)

    def ours_fwd(q, k, v, dropout):
        return fn(q, k, v, dropout_p=dropout, causal=causal)

    def torch_fwd(q, k, v, dropout):
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), dropout_p=dropout,
                                              is_causal=causal, enable_gqa=gqa).transpose(1, 2)

    # Check with dropout off (masks differ between implementations), on the heads that share
    # kv head 0, against torch in float64.
    g = hq // hkv
    ref_leaves = [torch.from_numpy(x[:, :, :g if i == 0 else 1].astype(np.float64))
                  .requires_grad_(True) for i, x in enumerate(arrays)]
    ref_dout = torch.from_numpy(dout_np[:, :, :g].astype(np.float64))
    for t in ref_leaves:
        t.grad = None
    o64 = torch_fwd(*ref_leaves, 0.0)
    o64.backward(ref_dout)
    desired = [o64, *(t.grad for t in ref_leaves)]
    got = step(ours_leaves, ours_fwd, 0.0)
    base = step(torch_leaves, torch_fwd, 0.0)
    for i, name in enumerate(["out", "dq", "dk", "dv"]):
        hs = slice(0, g) if name in ("out", "dq") else slice(0, 1)
        check_close(name, to_numpy(got[i])[:, :, hs], desired[i].detach().numpy(),
                    to_numpy(base[i])[:, :, hs], multiplier=2.0 if name == "out" else 3.0)
    del got, base, desired, o64, ref_leaves
    if p > 0:
        res.extra["check"] = "outputs and gradients checked with dropout_p=0; timed with " \
                             f"dropout_p={p}"

    fns = {"ours": lambda: step(ours_leaves, ours_fwd, p),
           "torch": lambda: step(torch_leaves, torch_fwd, p)}
    need = naive_bytes("train", b, hq, s, s, d)
    if not cfg.naive:
        pass
    elif need > cfg.naive_limit:
        res.naive_note = f"skipped (memory): needs {need / GIB:.1f} GiB"
    else:
        q32, k32, v32, do32 = (np.asarray(x, dtype=np.float32) for x in (*arrays, dout_np))
        nrng = np.random.default_rng(0)
        fns["naive"] = lambda: naive_train(q32, k32, v32, do32, causal, scale, p, nrng)
        if p == 0:
            rows = sample_rows(s, rng)
            check_close("naive out", fns["naive"]()[0][:, rows],
                        ref_forward_rows(*arrays, rows, causal, scale))
    res.times = time_alternating(fns, cfg.runs, cfg.naive_runs, cfg.warmup)
    return res


def random_lengths(rng, n, total, minimum=16):
    while True:
        cuts = np.sort(rng.choice(np.arange(1, total), n - 1, replace=False))
        lengths = np.diff(np.concatenate([[0], cuts, [total]]))
        if lengths.min() >= minimum:
            return lengths


def run_varlen(case, dt, causal, cfg):
    res = Result(case.id, dt, causal)
    if not hasattr(fa, "flash_attn_varlen_func"):
        res.status, res.note = "skipped", "flash_attn_c.flash_attn_varlen_func not available"
        return res
    lengths = random_lengths(np.random.default_rng(seed_of(case.id)), case.b, case.sq)
    rng = np.random.default_rng(seed_of(case.id, dt))
    total, hq, hkv, d = case.sq, case.hq, case.hkv, case.d
    res.flop = sum(fwd_flop(1, hq, int(n), int(n), d, causal) for n in lengths)
    res.extra["lengths"] = lengths.tolist()
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    maxlen = int(lengths.max())
    q = randn(rng, (total, hq, d), dt)
    k = randn(rng, (total, hkv, d), dt)
    v = randn(rng, (total, hkv, d), dt)
    scale = d ** -0.5
    if case.kind == "npu_tnd":
        mask = np.triu(np.ones((2048, 2048), bool), 1)
        ends = cu[1:].tolist()
        fns = {"ours": lambda: fa.npu_fusion_attention(
            q, k, v, hq, "TND", atten_mask=mask, scale=scale, sparse_mode=3,
            actual_seq_qlen=ends, actual_seq_kvlen=ends)[0]}
    else:
        fns = {"ours": lambda: fa.flash_attn_varlen_func(q, k, v, cu, cu, maxlen, maxlen,
                                                         causal=causal)}
    if torch is not None:
        # torch runs the padded batch; with top-left causal the padding (at the end of each
        # sequence) is never seen by a real row, so real rows are exact.
        pads = []
        for x in (q, k, v):
            padded = np.zeros((case.b, maxlen) + x.shape[1:], dtype=x.dtype)
            for i, n in enumerate(lengths):
                padded[i, :n] = x[cu[i]:cu[i + 1]]
            pads.append(to_torch(padded).transpose(1, 2))
        gqa = hq != hkv

        def torch_fn():
            with torch.no_grad():
                return F.scaled_dot_product_attention(*pads, is_causal=causal, enable_gqa=gqa)
        fns["torch"] = torch_fn
        res.torch_note = f"padded batch {case.b} x {maxlen}"
    else:
        res.torch_note = "torch not installed"
    q32, k32, v32 = (np.asarray(x, dtype=np.float32) for x in (q, k, v))

    def naive_fn():
        return [naive_forward(q32[None, cu[i]:cu[i + 1]], k32[None, cu[i]:cu[i + 1]],
                              v32[None, cu[i]:cu[i + 1]], causal, scale)
                for i in range(case.b)]
    fns["naive"] = naive_fn
    out = fns["ours"]()
    tout = to_numpy(fns["torch"]().transpose(1, 2)) if "torch" in fns else None
    nout = naive_fn()
    for i, n in enumerate(lengths):
        seq = slice(cu[i], cu[i + 1])
        rows = sample_rows(int(n), rng, 16)
        desired = ref_forward_rows(q[None, seq], k[None, seq], v[None, seq], rows, causal, scale)
        base = tout[i:i + 1, rows] if tout is not None else None
        check_close(f"out (sequence {i})", out[seq][rows][None], desired, base)
        check_close(f"naive out (sequence {i})", nout[i][:, rows], desired)
    del out, tout, nout
    res.times = time_alternating(fns, cfg.runs, cfg.naive_runs, cfg.warmup)
    return res


def run_decode(case, dt, causal, cfg):
    b, hq, hkv, sk, d = case.b, case.hq, case.hkv, case.sk, case.d
    res = Result(case.id, dt, None, flop=fwd_flop(b, hq, 1, sk, d, False))
    res.bytes = 2.0 * b * sk * hkv * d * np_dtype(dt).itemsize
    if not hasattr(fa, "flash_attn_with_kvcache"):
        res.status, res.note = "skipped", "flash_attn_c.flash_attn_with_kvcache not available"
        return res
    rng = np.random.default_rng(seed_of(case.id, dt))
    q = randn(rng, (b, 1, hq, d), dt)
    kc = randn(rng, (b, sk, hkv, d), dt)
    vc = randn(rng, (b, sk, hkv, d), dt)
    seqlens = np.full(b, sk, dtype=np.int32)
    scale = d ** -0.5
    fns = {"ours": lambda: fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens)}
    if torch is not None:
        tq, tk, tv = (to_torch(x).transpose(1, 2) for x in (q, kc, vc))

        def torch_fn():
            with torch.no_grad():
                return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=hq != hkv)
        fns["torch"] = torch_fn
    else:
        res.torch_note = "torch not installed"
    q32, k32, v32 = (np.asarray(x, dtype=np.float32) for x in (q, kc, vc))
    fns["naive"] = lambda: naive_forward(q32, k32, v32, False, scale)
    rows = np.array([0])
    desired = ref_forward_rows(q, kc, vc, rows, False, scale)
    base = to_numpy(fns["torch"]().transpose(1, 2)) if "torch" in fns else None
    check_close("out", fns["ours"](), desired, base)
    check_close("naive out", fns["naive"](), desired)
    del base
    res.times = time_alternating(fns, cfg.runs, cfg.naive_runs, cfg.warmup)
    return res


def run_memory(case, cfg, progress, which="fwd"):
    """M1: peak extra bytes, each (implementation, S) in a fresh process (memory_probe.py), of the
    forward (which="fwd") or of the backward (which="bwd")."""
    rows = []
    impls = ["ours"] + (["torch"] if torch is not None else [])
    for s in cfg.mem_lengths:
        row = {"S": s, "naive_bytes": 4.0 * case.b * case.hq * s * s}
        for impl in impls:
            progress.describe(f"M1 {which} {impl} S={s}")
            cmd = [sys.executable, os.path.join(HERE, "memory_probe.py"), "--impl", impl,
                   "--seqlen", str(s), "--heads", str(case.hq), "--dim", str(case.d),
                   "--threads", str(cfg.threads), "--pass", which]
            env = dict(os.environ, PYTHONPATH=os.pathsep.join(
                [ROOT] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            last = proc.stdout.strip().splitlines()[-1:] if proc.stdout.strip() else []
            if proc.returncode != 0 or not last:
                err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                row[impl] = dict(error=f"exit {proc.returncode}: {err}")
            else:
                row[impl] = json.loads(last[0])
            progress.step()
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------------
# Formatting

def fmt_ms(t):
    return "-" if t is None else (f"{t * 1e3:.1f}" if t >= 0.01 else f"{t * 1e3:.3f}")


def fmt_rate(x):
    return "-" if x is None else (f"{x:.0f}" if x >= 100 else f"{x:.1f}")


def fmt_ratio(r):
    if r is None:
        return "-"
    med, lo, hi = r
    return f"{med:.2f}x ({lo:.2f}-{hi:.2f})"


def fmt_bytes(n):
    if n is None:
        return "-"
    for unit, div in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


class Peaks:
    """Peaks per thread count: fma, amx (GFLOP/s), dram (GB/s); None where unmeasured.

    The peak is the probe's rate per CPU-second of its busiest thread (the hardware's rate even
    while other processes share the CPUs); the wall-clock rate the probe got in this run is kept
    under "wall" to show how busy the machine was."""

    def __init__(self, probes, seconds):
        self.probes, self.seconds, self.by_threads = probes, seconds, {}

    def measure(self, threads, dram=True):
        if threads not in self.by_threads:
            p, s = self.probes, self.seconds
            got = dict(fma=p.fma_gflops(threads, s, reps=5) if p else None,
                       amx=p.amx_gflops(threads, s, reps=5) if p else None,
                       dram=p.dram_gbs(threads, min_seconds=s) if (p and dram) else None)
            pk = {k: (v[0] if v else None) for k, v in got.items()}
            pk["wall"] = {k: (v[1] if v else None) for k, v in got.items()}
            self.by_threads[threads] = pk
        return self.by_threads[threads]

    def for_dtype(self, threads, dt):
        """(peak GFLOP/s, label) the dtype's GEMM rate is measured against."""
        pk = self.by_threads.get(threads, {})
        if dt == "bf16" and pk.get("amx"):
            return pk["amx"], "AMX bf16"
        if pk.get("fma"):
            return pk["fma"], "fp32 FMA"
        return None, "-"


def result_columns(r, peaks, threads):
    """Row cells for one timed result."""
    to, tt, tn = r.median("ours"), r.median("torch"), r.median("naive")
    decode = r.bytes > 0
    if decode:
        rate = lambda t: None if t is None else r.bytes / t / 1e9
        peak = peaks.by_threads.get(threads, {}).get("dram")
    else:
        rate = lambda t: None if t is None else r.flop / t / 1e9
        peak, _ = peaks.for_dtype(threads, r.dtype)
    pct = f"{100 * rate(to) / peak:.0f}%" if (peak and to) else "-"
    torch_cells = ([fmt_ms(tt), fmt_rate(rate(tt)), fmt_ratio(r.ratio("torch"))] if tt else
                   [r.torch_note or "-", "-", "-"])
    naive_cells = ([fmt_ms(tn), fmt_ratio(r.ratio("naive"))] if tn else [r.naive_note or "-", "-"])
    return [fmt_ms(to), fmt_rate(rate(to)), pct, *torch_cells[:2], *naive_cells[:1],
            torch_cells[2], naive_cells[1]]


def causal_text(c):
    return "-" if c is None else ("1" if c else "0")


def table_head(decode, first=()):
    unit = "GB/s" if decode else "GFLOP/s"
    head = [*first, "dtype", "causal", "ours ms", f"ours {unit}",
            "% of DRAM" if decode else "% of peak", "torch ms", f"torch {unit}", "naive ms",
            "vs torch", "vs naive"]
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]


def case_table(case, results, peaks, threads):
    reasons = {(r.status, r.note) for r in results}
    if len(reasons) == 1 and next(iter(reasons))[0] == "skipped":
        return [f"**skipped** ({', '.join(sorted({r.dtype for r in results}))}): "
                f"{next(iter(reasons))[1]}"], []
    lines = table_head(case.kind == "decode")
    notes = []
    for r in results:
        if r.status != "ok":
            cells = [r.dtype, causal_text(r.causal), f"**{r.status}**: {r.note}"] + [""] * 7
        else:
            cells = [r.dtype, causal_text(r.causal)] + result_columns(r, peaks, threads)
        lines.append("| " + " | ".join(cells) + " |")
        for key, val in r.extra.items():
            text = f"{key}: {val}"
            if text not in notes:
                notes.append(text)
        if r.torch_note and r.median("torch"):
            text = f"torch: {r.torch_note}"
            if text not in notes:
                notes.append(text)
    return lines, notes


def console_line(name, r, peaks, threads):
    label = f"{name} {r.dtype}" + ("" if r.causal is None else f" causal={int(r.causal)}")
    if r.status != "ok":
        return f"{label}: {r.status.upper()}: {r.note}"
    cells = result_columns(r, peaks, threads)
    unit = "GB/s" if r.bytes > 0 else "GFLOP/s"
    return (f"{label}: ours {cells[0]} ms {cells[1]} {unit} "
            f"({cells[2]} of {'DRAM' if r.bytes > 0 else 'peak'}) | "
            f"torch {cells[3]}{' ms' if r.median('torch') else ''} {cells[4]} {unit} | "
            f"naive {cells[5]}{' ms' if r.median('naive') else ''} | "
            f"vs torch {cells[6]} | vs naive {cells[7]}")


def peaks_lines(peaks, threads, probes_notes):
    pk = peaks.by_threads.get(threads, {})
    fma_isa = peaks.probes.fma_isa() if peaks.probes else None
    wall = pk.get("wall", {})
    rows = [("fp32 FMA" + (f" ({fma_isa})" if fma_isa else ""), "fma", "GFLOP/s"),
            ("AMX bf16 (tdpbf16ps)", "amx", "GFLOP/s"),
            ("DRAM read (1 GiB or 8x LLC, streamed)", "dram", "GB/s")]
    lines = ["| probe | threads | peak (per CPU-second) | wall-clock rate in this run |",
             "|---|---|---|---|"]
    for name, key, unit in rows:
        val, w = pk.get(key), wall.get(key)
        lines.append(f"| {name} | {threads} | {'skipped' if val is None else f'{val:.1f} {unit}'}"
                     f" | {'-' if w is None else f'{w:.1f} {unit}'} |")
    if probes_notes:
        lines.append("")
        lines.extend(f"- {n}" for n in probes_notes)
    return lines


def memory_section(case, rows, naive_limit, which="fwd"):
    title = "forward" if which == "fwd" else "backward (gradients dq, dk, dv count as outputs)"
    lines = [f"## M1 {title}: {case.title} ({case.shape_text()}, causal, f32)", "",
             "Each value is measured in a fresh process: VmHWM after one call minus VmRSS "
             "before it, minus the output (bytes beyond inputs and outputs). "
             "Growth column: extra bytes relative to the smallest S (linear growth doubles "
             "with S).", "",
             "| S | inputs+output | ours extra | ours growth | ours s | torch extra | "
             "torch growth | torch s | naive (score matrix) |",
             "|---|---|---|---|---|---|---|---|---|"]
    first = {}
    methods = set()
    for row in rows:
        cells = [str(row["S"])]
        io = next((row[i]["io_bytes"] for i in ("ours", "torch")
                   if i in row and "io_bytes" in row[i]), None)
        cells.append(fmt_bytes(io))
        for impl in ("ours", "torch"):
            m = row.get(impl)
            if m is None:
                cells += ["torch not installed", "-", "-"]
            elif "error" in m:
                cells += [f"error: {m['error']}", "-", "-"]
            else:
                methods.add(m["method"])
                first.setdefault(impl, m["extra_bytes"])
                growth = (f"{m['extra_bytes'] / first[impl]:.1f}x" if first[impl] > 0 else "-")
                cells += [fmt_bytes(m["extra_bytes"]), growth, f"{m['seconds']:.2f}"]
        nb = row["naive_bytes"]
        cells.append(f"skipped (memory): {fmt_bytes(nb)}" if nb > naive_limit else
                     f"{fmt_bytes(nb)} (not run)")
        lines.append("| " + " | ".join(cells) + " |")
    if methods:
        lines += ["", f"Method: {', '.join(sorted(methods))}; times are one cold call."]
    return lines


def merge_scaling(path, body_lines, scaling_lines):
    """Write path: body_lines (None: keep the existing body) and a Scaling section
    (None: keep the existing one)."""
    old = ""
    if os.path.exists(path):
        with open(path) as f:
            old = f.read()
    m = re.search(r"^## Scaling\b.*?(?=^## |\Z)", old, flags=re.S | re.M)
    old_scaling = m.group(0).rstrip("\n").splitlines() if m else []
    old_body = (old[:m.start()] + old[m.end():]) if m else old
    body = "\n".join(body_lines) if body_lines is not None else old_body.rstrip("\n")
    scaling = scaling_lines if scaling_lines is not None else old_scaling
    if not body.strip():
        body = "# flash_attn_c benchmark results"
    text = body.rstrip("\n") + "\n" + ("\n" + "\n".join(scaling) + "\n" if scaling else "")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def make_plot(path, sweep, title):
    """GFLOP/s against S, ours solid and torch dashed, one panel per dtype."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return "plot skipped: matplotlib not installed (pip install matplotlib)"
    dtypes = sorted({r.dtype for r in sweep}, key=["f32", "bf16", "f16"].index)
    fig, axes = plt.subplots(1, len(dtypes), figsize=(6 * len(dtypes), 4.5), squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        for causal, color in ((False, "tab:blue"), (True, "tab:orange")):
            pts = sorted((r.extra["S"], r) for r in sweep
                         if r.dtype == dt and r.causal == causal and r.status == "ok")
            if not pts:
                continue
            xs = [s for s, _ in pts]
            for impl, style in (("ours", "-o"), ("torch", "--s")):
                ys = [r.flop / r.median(impl) / 1e9 if r.median(impl) else float("nan")
                      for _, r in pts]
                ax.plot(xs, ys, style, color=color,
                        label=f"{'flash_attn_c' if impl == 'ours' else 'torch SDPA'}, "
                              f"{'causal' if causal else 'non-causal'}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r.extra["S"] for r in sweep}))
        ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_ylim(bottom=0)
        ax.set_xlabel("sequence length S (Sq = Sk)")
        ax.set_ylabel("GFLOP/s")
        ax.set_title(f"forward {dt}, B=1 H=16 D=128")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"plot written to {path}"


# ----------------------------------------------------------------------------------------------
# Main modes

@dataclass
class Config:
    threads: int
    runs: int
    naive_runs: int
    warmup: int
    naive_limit: float
    naive: bool
    mem_lengths: list
    sweep: list


def variants(case, dtypes):
    return [(dt, c) for dt in case.dtypes if dt in dtypes for c in case.causal]


RUNNERS = {"fwd": run_forward, "train": run_train, "varlen": run_varlen, "decode": run_decode,
           "npu_bnsd": run_forward, "npu_tnd": run_varlen}


def run_variant(case, dt, causal, cfg, **kw):
    """A runner with errors turned into a failed Result (the run goes on)."""
    try:
        return RUNNERS[case.kind if case.kind != "sweep" else "fwd"](case, dt, causal, cfg, **kw)
    except CheckFailed as e:
        return Result(case.id, dt, causal, status="failed", note="WRONG RESULT: " +
                      str(e).replace("\n", "; "))
    except MemoryError:
        return Result(case.id, dt, causal, status="failed", note="out of memory")
    except Exception as e:
        traceback.print_exc()
        return Result(case.id, dt, causal, status="failed", note=f"{type(e).__name__}: {e}")


def run_benchmarks(args, mode, cfg, machine, peaks, probes_notes):
    cases = [CASES[c] for c in args.cases]
    dtypes = args.dtypes
    work = []
    for case in cases:
        if case.kind == "memory":
            work.append((case, None, None, 2 * len(cfg.mem_lengths) * (2 if torch else 1)))
        elif case.kind == "sweep":
            for s in cfg.sweep:
                for dt, c in variants(case, dtypes):
                    work.append((case, dt, (c, s), 1))
        else:
            for dt, c in variants(case, dtypes):
                work.append((case, dt, c, 1))
    progress = Progress(sum(w[3] for w in work))
    results, memory_rows, memory_bwd_rows, sweep = {}, None, None, []
    failed = False
    for case, dt, causal, _ in work:
        if case.kind == "memory":
            memory_rows = run_memory(case, cfg, progress)
            memory_bwd_rows = run_memory(case, cfg, progress, "bwd")
            for line in memory_section(case, memory_rows, cfg.naive_limit)[4:]:
                progress.write(line)
            for line in memory_section(case, memory_bwd_rows, cfg.naive_limit, "bwd")[4:]:
                progress.write(line)
            continue
        if case.kind == "sweep":
            c, s = causal
            progress.describe(f"S={s} {dt} causal={int(c)}")
            r = run_variant(case, dt, c, cfg, s=s, naive=False)
            r.extra = {"S": s}
            sweep.append(r)
            line = console_line(f"S={s}", r, peaks, cfg.threads)
        else:
            progress.describe(f"{case.id} {dt} causal={causal}")
            r = run_variant(case, dt, causal, cfg)
            results.setdefault(case.id, []).append(r)
            line = console_line(case.id, r, peaks, cfg.threads)
        failed |= r.status == "failed"
        progress.write(line)
        progress.step()
    progress.close()

    out = ["# flash_attn_c benchmark results", "",
           f"Machine: {machine}", "",
           f"Command: `python benchmarks/bench.py {' '.join(args.argv)}` (mode {mode}: "
           f"{cfg.runs} timed runs each for ours and torch, alternating, after {cfg.warmup} "
           f"warm-up; naive {cfg.naive_runs}; medians)", "",
           "Columns: ms = median time; GFLOP/s from BENCHMARKS.md's FLOP count (causal halved, "
           "training 3.5x forward, varlen real lengths); % of peak = ours against the peak "
           "measured below (AMX bf16 for bf16, fp32 FMA for f32 and f16; DRAM bandwidth for "
           "decode); vs torch / vs naive = median over run pairs of t_peer / t_ours "
           "(> 1: ours faster), with the range over pairs. Every output was checked against "
           "float64 before timing.", "",
           "## Peaks (measured in this run)", ""]
    out += peaks_lines(peaks, cfg.threads, probes_notes)
    for case in cases:
        if case.id in results:
            lines, notes = case_table(case, results[case.id], peaks, cfg.threads)
            out += ["", f"## {case.id}: {case.title} ({case.shape_text()})", ""] + lines
            if notes:
                out += [""] + [f"- {n}" for n in notes]
        elif case.kind == "memory" and memory_rows is not None:
            out += [""] + memory_section(case, memory_rows, cfg.naive_limit)
            out += [""] + memory_section(case, memory_bwd_rows, cfg.naive_limit, "bwd")
        elif case.kind == "sweep" and sweep:
            rows = table_head(False, first=["S"])
            for r in sweep:
                cells = ([str(r.extra["S"]), r.dtype, causal_text(r.causal)]
                         + (result_columns(r, peaks, cfg.threads) if r.status == "ok"
                            else [f"**{r.status}**: {r.note}"] + [""] * 7))
                rows.append("| " + " | ".join(cells) + " |")
            out += ["", f"## S: {case.title} ({case.shape_text()})", ""] + rows
            if args.plot:
                info = fa.cpu_info()
                title = (f"{cpu_model()}, flash_attn_c ISA {info['isa']}, {cfg.threads} threads, "
                         f"torch {torch.__version__ if torch else '-'}, "
                         f"{datetime.date.today().isoformat()}")
                msg = make_plot(args.plot, sweep, title)
                print(msg)
                if msg.startswith("plot written"):
                    rel = os.path.relpath(args.plot, os.path.dirname(os.path.abspath(args.out)))
                    out += ["", f"![GFLOP/s against sequence length]({rel})"]
                else:
                    out += ["", msg]
    merge_scaling(args.out, out, None)
    print(f"results written to {args.out}")
    return failed


def run_scaling(args, mode, cfg, machine, peaks):
    """F1 and T1 (and the FMA / AMX peaks) at 1, 2, 4, 8, 16 threads."""
    ncpu = os.cpu_count() or 1
    counts = [n for n in args.scaling_threads if n <= ncpu]
    skipped = [n for n in args.scaling_threads if n > ncpu]
    work = [(CASES[c], dt, causal) for c in ("F1", "T1") if c in args.cases
            for dt, causal in variants(CASES[c], args.dtypes)]
    progress = Progress(len(counts) * (1 + len(work)))
    table = {}
    failed = False
    for n in counts:
        progress.describe(f"peaks at {n} threads")
        peaks.measure(n, dram=False)
        progress.step()
        set_threads(n)
        cfg.threads = n
        for case, dt, causal in work:
            progress.describe(f"{case.id} {dt} causal={int(causal)} threads={n}")
            r = run_variant(case, dt, causal, cfg)
            table.setdefault((case.id, dt, causal), {})[n] = r
            failed |= r.status == "failed"
            progress.write(f"[{n} threads] " + console_line(case.id, r, peaks, n))
            progress.step()
    progress.close()

    lines = ["## Scaling", "", f"Machine: {machine}", "",
             f"Command: `python benchmarks/bench.py {' '.join(args.argv)}`. Speedup = time at "
             f"{counts[0] if counts else 1} thread(s) / time at n threads (for the peak: rate at n "
             "/ rate at the first count). vs torch = median over run pairs of t_torch / t_ours.",
             ""]
    if skipped:
        lines += [f"Thread counts {skipped} skipped: this machine has {ncpu} CPUs.", ""]
    lines += ["| threads | fp32 FMA peak GFLOP/s | speedup | AMX bf16 peak GFLOP/s | speedup |",
              "|---|---|---|---|---|"]
    first = peaks.by_threads.get(counts[0], {}) if counts else {}
    for n in counts:
        pk = peaks.by_threads[n]
        cells = [str(n)]
        for key in ("fma", "amx"):
            v, v0 = pk.get(key), first.get(key)
            cells += [fmt_rate(v), f"{v / v0:.2f}x" if (v and v0) else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    for (cid, dt, causal), by_n in table.items():
        case = CASES[cid]
        lines += ["", f"### {cid} {dt} causal={int(causal)} ({case.title}, {case.shape_text()})",
                  ""]
        notes = {(r.status, r.note) for r in by_n.values()}
        if len(notes) == 1 and next(iter(notes))[0] == "skipped":
            lines.append(f"**skipped** at every thread count: {next(iter(notes))[1]}")
            continue
        lines += ["| threads | ours ms | ours GFLOP/s | ours speedup | % of peak | torch ms | "
                  "torch GFLOP/s | torch speedup | vs torch |", "|---|---|---|---|---|---|---|---|---|"]
        r0 = by_n.get(counts[0])
        for n in counts:
            r = by_n[n]
            if r.status != "ok":
                lines.append(f"| {n} | **{r.status}**: {r.note} |" + " |" * 7)
                continue
            cells = result_columns(r, peaks, n)
            sp = []
            for impl in ("ours", "torch"):
                t, t0 = r.median(impl), (r0.median(impl) if r0 and r0.status == "ok" else None)
                sp.append(f"{t0 / t:.2f}x" if (t and t0) else "-")
            lines.append("| " + " | ".join([str(n), cells[0], cells[1], sp[0], cells[2],
                                              cells[3], cells[4], sp[1], cells[6]]) + " |")
    for line in lines:
        print(line)
    merge_scaling(args.out, None, lines)
    print(f"scaling results written to {args.out}")
    return failed


def parse_args(argv):
    p = argparse.ArgumentParser(
        description="flash_attn_c benchmarks (BENCHMARKS.md): ours vs torch SDPA vs naive "
                    "NumPy, against the machine's measured peaks.")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="a subset, 3 runs each")
    g.add_argument("--full", action="store_true", help="every case and dtype, 7 runs each")
    p.add_argument("--cases", help=f"comma-separated ids from {','.join(CASES)} (S = the plot "
                                   "sweep); default: the mode's set")
    p.add_argument("--dtypes", help="comma-separated subset of f32,bf16,f16")
    p.add_argument("--threads", type=int, help="threads for ours, torch, the naive BLAS and the "
                                               "probes (default: flash_attn_c's default)")
    p.add_argument("--runs", type=int, help="timed runs per implementation (override the mode)")
    p.add_argument("--out", default=os.path.join(HERE, "RESULTS.md"),
                   help="results file (a run keeps its existing Scaling section)")
    p.add_argument("--plot", default=os.path.join(HERE, "gflops.png"),
                   help="PNG of the sweep S ('' to skip)")
    p.add_argument("--scaling", action="store_true",
                   help="F1 and T1 and the FMA peak at 1, 2, 4, 8, 16 threads; written to the "
                        "Scaling section of --out")
    p.add_argument("--scaling-threads", default=",".join(map(str, SCALING_THREADS)),
                   help="thread counts for --scaling")
    p.add_argument("--naive-limit-gib", type=float, default=4.0,
                   help="skip the naive peer where it would need more memory than this")
    p.add_argument("--no-peaks", action="store_true", help="skip the machine-peak probes")
    p.add_argument("--isa", choices=["avx2", "avx512"],
                   help="run ours on this kernel family and torch capped to the same ISA (ATen, "
                        "oneDNN, MKL), with the FMA probe of that width: e.g. --isa avx2 "
                        "--dtypes f32 for machines without AVX-512")
    args = p.parse_args(argv)
    args.argv = list(argv)
    mode = "quick" if args.quick else "full" if args.full else "default"
    if args.cases:
        args.cases = [c.strip().upper() for c in args.cases.split(",") if c.strip()]
        unknown = [c for c in args.cases if c not in CASES]
        if unknown:
            p.error(f"unknown case ids {unknown}; known: {', '.join(CASES)}")
    else:
        args.cases = ["F1", "T1"] if args.scaling else MODES[mode]["cases"]
    if args.dtypes:
        args.dtypes = [d.strip().lower() for d in args.dtypes.split(",") if d.strip()]
        bad = [d for d in args.dtypes if d not in ("f32", "bf16", "f16")]
        if bad:
            p.error(f"unknown dtypes {bad}; known: f32, bf16, f16")
    else:
        args.dtypes = ["f32", "bf16"] if args.scaling else MODES[mode]["dtypes"]
    args.scaling_threads = [int(x) for x in args.scaling_threads.split(",") if x.strip()]
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    return args, mode


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args, mode = parse_args(argv)
    load_libraries(args.threads, args.isa)
    m = MODES[mode]
    threads = args.threads or fa.get_num_threads()
    set_threads(threads)
    cfg = Config(threads=threads, runs=args.runs or m["runs"],
                 naive_runs=min(args.runs or m["naive_runs"], m["naive_runs"]), warmup=1,
                 naive_limit=args.naive_limit_gib * GIB, naive=not args.scaling, mem_lengths=m["mem"], sweep=m["sweep"])
    machine = machine_line(threads if not args.scaling else
                           "/".join(str(n) for n in args.scaling_threads
                                    if n <= (os.cpu_count() or 1)))
    print(f"Machine: {machine}", flush=True)

    probes = None
    notes = []
    if args.no_peaks:
        notes.append("peaks skipped (--no-peaks)")
    else:
        sys.path.insert(0, HERE)
        from peaks import Probes
        probes = Probes(fma_isa=args.isa)
    peaks = Peaks(probes, m["probe_s"])
    try:
        if not args.scaling:
            if probes is not None:
                print("Measuring peaks ...", flush=True)
            peaks.measure(threads)
            notes += probes.notes if probes else []
            for line in peaks_lines(peaks, threads, notes):
                print(line)
            failed = run_benchmarks(args, mode, cfg, machine, peaks, notes)
        else:
            failed = run_scaling(args, mode, cfg, machine, peaks)
            for n in (probes.notes if probes else []):
                print(f"note: {n}")
    finally:
        if probes is not None:
            probes.close()
    if failed:
        print("SOME CASES FAILED (see above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
