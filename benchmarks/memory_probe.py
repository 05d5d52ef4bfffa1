"""Peak extra memory of one causal float32 attention call, measured in a fresh process.

Run by bench.py (case M1), one process per (implementation, sequence length), so nothing another
measurement allocated or freed can hide in this one. The process builds q, k, v of shape
(1, S, H, D), then resets the kernel's resident-set high-water mark (writing "5" to
/proc/self/clear_refs makes VmHWM equal the current VmRSS), makes one call, and reads VmHWM:

    extra = VmHWM after the call - VmRSS before it - bytes of the output

i.e. every byte the call touched beyond its inputs and output (workspace, temporaries, thread
stacks, a full score matrix if there is one). Where clear_refs is not writable, a thread samples
VmRSS every 0.2 ms instead (it can miss a short spike; the JSON says which method ran).

With --pass bwd the measured call is the backward instead (issue: memory of the backward at long
S): the forward runs first, outside the measurement, and the gradients dq, dk, dv count as
outputs.

Prints one JSON line: impl, pass, seqlen, extra_bytes, io_bytes, seconds, method.
"""
import argparse
import gc
import json
import os
import threading
import time


def status_bytes(field):
    """A 'kB' field of /proc/self/status (VmRSS, VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_high_water_mark():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class RssSampler(threading.Thread):
    """Fallback peak tracker: polls VmRSS (via statm) until stopped."""

    def __init__(self):
        super().__init__(daemon=True)
        self.page = os.sysconf("SC_PAGE_SIZE")
        self.peak = 0
        self.done = threading.Event()

    def rss(self):
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * self.page

    def run(self):
        while not self.done.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(0.0002)

    def stop(self):
        self.done.set()
        self.join()
        self.peak = max(self.peak, self.rss())
        return self.peak


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=["ours", "torch"], required=True)
    p.add_argument("--seqlen", type=int, required=True)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--pass", dest="which", choices=["fwd", "bwd"], default="fwd")
    a = p.parse_args()

    import numpy as np
    rng = np.random.default_rng(a.seqlen)
    shape = (1, a.seqlen, a.heads, a.dim)
    q, k, v = (rng.standard_normal(shape, dtype=np.float32) for _ in range(3))
    io_bytes = 4 * q.nbytes  # q, k, v and the output
    out_bytes = q.nbytes
    bwd = a.which == "bwd"

    if a.impl == "ours":
        import flash_attn_c as fa
        fa.set_num_threads(a.threads)
        if bwd:
            do = rng.standard_normal(shape, dtype=np.float32)
            o, lse, _ = fa.flash_attn_fwd(q, k, v, causal=True)
            io_bytes = 8 * q.nbytes  # q, k, v, out, dout and dq, dk, dv
            out_bytes = 3 * q.nbytes

            def call():
                return fa.flash_attn_bwd(do, q, k, v, o, lse, causal=True)
        else:
            def call():
                return fa.flash_attn_func(q, k, v, causal=True)
    else:
        import torch
        import torch.nn.functional as F
        torch.set_num_threads(a.threads)
        tq, tk, tv = (torch.from_numpy(x).transpose(1, 2) for x in (q, k, v))
        if bwd:
            for t in (tq, tk, tv):
                t.requires_grad_()
            tdo = torch.from_numpy(rng.standard_normal(shape, dtype=np.float32)).transpose(1, 2)
            to = F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
            io_bytes = 8 * q.nbytes
            out_bytes = 3 * q.nbytes

            def call():
                return torch.autograd.grad(to, (tq, tk, tv), tdo)
        else:
            def call():
                with torch.no_grad():
                    return F.scaled_dot_product_attention(tq, tk, tv, is_causal=True)

    gc.collect()
    sampler = None
    rss0 = status_bytes("VmRSS")
    method = "VmHWM after clear_refs"
    if not reset_high_water_mark():
        method = "VmRSS sampled every 0.2 ms"
        sampler = RssSampler()
        sampler.start()
    t0 = time.perf_counter()
    out = call()
    seconds = time.perf_counter() - t0
    peak = sampler.stop() if sampler is not None else status_bytes("VmHWM")
    extra = peak - rss0 - out_bytes  # outputs: out (fwd) or dq, dk, dv (bwd), each q's size
    del out
    print(json.dumps(dict(impl=a.impl, pass_=a.which, seqlen=a.seqlen, extra_bytes=int(extra),
                          io_bytes=int(io_bytes), seconds=seconds, method=method)))


if __name__ == "__main__":
    main()
