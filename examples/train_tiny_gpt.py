"""Train a tiny GPT-style character model on the CPU with three interchangeable attentions.

    python examples/train_tiny_gpt.py [--attn sdpa|flash_attn_c|flash_attn] [--steps 150]
    python examples/train_tiny_gpt.py --check [--steps 40]

--attn picks how the causal self-attention is computed:
  sdpa          torch.nn.functional.scaled_dot_product_attention (torch's own CPU kernels)
  flash_attn_c  flash_attn_c.torch.scaled_dot_product_attention (the one-import SDPA swap)
  flash_attn    `from flash_attn import flash_attn_qkvpacked_func`, served on the CPU by
                flash_attn_c.torch.install() (an unmodified flash-attn code path)

Attention dropout is on (--attn-dropout 0.1). --check trains all three from the same seed with
dropout off and verifies that their loss curves agree, then with dropout on and compares the final
losses (dropout masks come from different generators, so only the statistics can agree).
"""
import argparse
import math
import os
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "tiny.txt")
try:
    import flash_attn_c  # noqa: F401  (installed, or on PYTHONPATH)
except ImportError:  # run from a source checkout with the extension built in place
    sys.path.insert(0, os.path.dirname(HERE))
ATTNS = ("sdpa", "flash_attn_c", "flash_attn")


def attention_function(name):
    """fn(qkv (B, T, 3, H, D), dropout_p) -> (B, T, H, D), causal, for one of ATTNS."""
    if name == "sdpa":
        def sdpa(qkv, dropout_p):
            q, k, v = qkv.permute(2, 0, 3, 1, 4)  # (B, H, T, D) views
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                  is_causal=True).transpose(1, 2)
        return sdpa
    if name == "flash_attn_c":
        import flash_attn_c.torch as fat

        def swapped_sdpa(qkv, dropout_p):
            q, k, v = qkv.permute(2, 0, 3, 1, 4)
            return fat.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p,
                                                    is_causal=True).transpose(1, 2)
        return swapped_sdpa
    if name == "flash_attn":
        import flash_attn_c.torch
        flash_attn_c.torch.install()  # the one line a flash-attn script needs on the CPU
        from flash_attn import flash_attn_qkvpacked_func

        def flash(qkv, dropout_p):
            return flash_attn_qkvpacked_func(qkv, dropout_p=dropout_p, causal=True)
        return flash
    raise ValueError(f"--attn: expected one of {ATTNS}, got {name!r}")


class Block(nn.Module):
    def __init__(self, n_embd, n_head, attn, attn_dropout, dropout):
        super().__init__()
        self.n_head, self.attn, self.attn_dropout = n_head, attn, attn_dropout
        self.ln1, self.ln2 = nn.LayerNorm(n_embd), nn.LayerNorm(n_embd)
        self.qkv = nn.Linear(n_embd, 3 * n_embd)
        self.proj = nn.Linear(n_embd, n_embd)
        self.mlp = nn.Sequential(nn.Linear(n_embd, 4 * n_embd), nn.GELU(),
                                 nn.Linear(4 * n_embd, n_embd), nn.Dropout(dropout))

    def forward(self, x):
        B, T, C = x.shape
        qkv = self.qkv(self.ln1(x)).view(B, T, 3, self.n_head, C // self.n_head)
        p = self.attn_dropout if self.training else 0.0
        y = self.attn(qkv, p).reshape(B, T, C)
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab, block_size, n_layer, n_head, n_embd, attn, attn_dropout, dropout):
        super().__init__()
        self.tok = nn.Embedding(vocab, n_embd)
        self.pos = nn.Embedding(block_size, n_embd)
        self.blocks = nn.Sequential(*[Block(n_embd, n_head, attn, attn_dropout, dropout)
                                      for _ in range(n_layer)])
        self.ln = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab, bias=False)

    def forward(self, idx):
        T = idx.shape[1]
        x = self.tok(idx) + self.pos(torch.arange(T))
        return self.head(self.ln(self.blocks(x)))


def load_text():
    with open(DATA, encoding="utf-8") as f:
        text = f.read()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return torch.tensor([index[c] for c in text], dtype=torch.long), len(chars)


class _Progress:
    """tqdm when installed, else one self-overwriting line."""

    def __init__(self, total, desc, quiet):
        self.quiet, self.bar = quiet, None
        if quiet:
            return
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc=desc, leave=True)
        except ImportError:
            self.total, self.n, self.desc = total, 0, desc

    def update(self, **info):
        if self.quiet:
            return
        text = " ".join(f"{k}={v}" for k, v in info.items())
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            self.bar.update(1)
            return
        self.n += 1
        filled = 30 * self.n // self.total
        print(f"\r{self.desc} [{'#' * filled}{'.' * (30 - filled)}] {self.n}/{self.total} {text}",
              end="", flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()
        elif not self.quiet:
            print()


def train(attn="flash_attn_c", steps=150, attn_dropout=0.1, dropout=0.0, seed=0, batch=16,
          block_size=64, n_layer=2, n_head=4, n_embd=64, lr=3e-3, quiet=False):
    """Train from scratch; returns (losses, seconds per step). Same seed = same initial weights
    and the same batches for every attention (batches come from their own generator, so dropout
    drawing from torch's global generator cannot shift them)."""
    data, vocab = load_text()
    torch.manual_seed(seed)
    model = TinyGPT(vocab, block_size, n_layer, n_head, n_embd, attention_function(attn),
                    attn_dropout, dropout)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    batches = torch.Generator().manual_seed(seed + 1)
    losses, times = [], []
    bar = _Progress(steps, attn, quiet)
    model.train()
    for _ in range(steps):
        start = torch.randint(0, len(data) - block_size - 1, (batch,), generator=batches)
        x = torch.stack([data[s:s + block_size] for s in start.tolist()])
        y = torch.stack([data[s + 1:s + block_size + 1] for s in start.tolist()])
        t0 = time.perf_counter()
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
        bar.update(loss=f"{losses[-1]:.4f}", ms=f"{1e3 * times[-1]:.1f}")
    bar.close()
    return losses, sum(times[1:]) / max(len(times) - 1, 1)


def _curve(losses, every):
    return " ".join(f"{losses[i]:.4f}" for i in range(0, len(losses), every)) + f" {losses[-1]:.4f}"


def check(steps, attn_dropout, seed, tolerance):
    """Dropout off: the three loss curves must agree within tolerance (float32 rounding differs
    between kernels and grows slowly through training). Dropout on: compare the final losses."""
    every = max(steps // 8, 1)
    print(f"dropout off, {steps} steps, loss every {every} steps:")
    curves = {}
    for name in ATTNS:
        curves[name], sec = train(name, steps, attn_dropout=0.0, seed=seed, quiet=True)
        print(f"  {name:13s} {_curve(curves[name], every)}   ({1e3 * sec:.1f} ms/step)")
    worst = max(abs(a - b) for name in ATTNS[1:] for a, b in zip(curves[name], curves["sdpa"]))
    print(f"  max |loss - loss(sdpa)| over all steps: {worst:.2e} (tolerance {tolerance:g})")
    print(f"dropout {attn_dropout}, {steps} steps (masks differ; final loss = mean of the last 10):")
    finals = {}
    for name in ATTNS:
        losses, _ = train(name, steps, attn_dropout=attn_dropout, seed=seed, quiet=True)
        finals[name] = sum(losses[-10:]) / len(losses[-10:])
        print(f"  {name:13s} {_curve(losses, every)}   final {finals[name]:.4f}")
    spread = max(finals.values()) - min(finals.values())
    print(f"  spread of final losses: {spread:.3f}")
    if worst > tolerance:
        raise SystemExit(f"FAILED: loss curves differ by {worst:.2e} > {tolerance:g}")
    print("OK: the three attentions train identically without dropout")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--attn", choices=ATTNS, default="flash_attn_c")
    ap.add_argument("--steps", type=int, default=None, help="default 150 (40 with --check)")
    ap.add_argument("--attn-dropout", type=float, default=0.1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", action="store_true", help="compare the three attentions")
    ap.add_argument("--tolerance", type=float, default=2e-3)
    ap.add_argument("--threads", type=int, default=1,
                    help="threads for torch and flash_attn_c (default 1: this model's matrices are "
                         "tiny, and two OpenMP pools spinning on 2 shared cores cost more than "
                         "they give)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    import flash_attn_c
    flash_attn_c.set_num_threads(args.threads)
    if args.check:
        check(args.steps or 40, args.attn_dropout, args.seed, args.tolerance)
        return
    losses, sec = train(args.attn, args.steps or 150, attn_dropout=args.attn_dropout,
                        seed=args.seed)
    every = max(len(losses) // 10, 1)
    for i in range(0, len(losses), every):
        print(f"step {i:4d}  loss {losses[i]:.4f}")
    print(f"step {len(losses) - 1:4d}  loss {losses[-1]:.4f}")
    print(f"{args.attn}: {1e3 * sec:.1f} ms/step (forward + backward + AdamW), "
          f"final loss {losses[-1]:.4f} (uniform would be {math.log(load_text()[1]):.4f})")


if __name__ == "__main__":
    main()
