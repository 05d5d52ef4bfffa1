"""Greedy generation with a small randomly initialised transformer and a paged KV cache.

Every layer's attention goes through flash_attn_c.flash_attn_with_kvcache: the prompt is written
into a paged cache (rotary applied to q and the new k inside the call), then each decode step
appends one token per sequence. After every step the logits are checked against a full
recomputation of the whole sequence without a cache (NumPy rotary + flash_attn_func with
causal=True), and tokens per second are printed.

    python examples/generate.py [--steps 32] [--batch 2] [--prompt 40] [--page 16] [--dtype float32]
"""
import argparse
import time

import numpy as np

import flash_attn_c


class TinyTransformer:
    """A pre-norm decoder: embeddings, n_layers x (attention with GQA + rotary, GELU MLP), head."""

    def __init__(self, vocab=256, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, seed=0):
        rng = np.random.default_rng(seed)
        self.vocab, self.d, self.n_layers = vocab, d_model, n_layers
        self.h, self.hk, self.hd = n_heads, n_kv_heads, d_model // n_heads
        s = d_model ** -0.5
        self.emb = rng.standard_normal((vocab, d_model)).astype(np.float32)
        self.layers = []
        for _ in range(n_layers):
            self.layers.append(dict(
                wq=rng.standard_normal((d_model, self.h * self.hd)).astype(np.float32) * s,
                wk=rng.standard_normal((d_model, self.hk * self.hd)).astype(np.float32) * s,
                wv=rng.standard_normal((d_model, self.hk * self.hd)).astype(np.float32) * s,
                wo=rng.standard_normal((self.h * self.hd, d_model)).astype(np.float32) * s,
                w1=rng.standard_normal((d_model, 4 * d_model)).astype(np.float32) * s,
                w2=rng.standard_normal((4 * d_model, d_model)).astype(np.float32) * (4 * d_model) ** -0.5,
            ))
        self.head = rng.standard_normal((d_model, vocab)).astype(np.float32) * s

    @staticmethod
    def _norm(x):
        return (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)

    def _mlp(self, x, layer):
        u = self._norm(x) @ layer["w1"]
        return x + (0.5 * u * (1 + np.tanh(0.7978845608 * (u + 0.044715 * u ** 3)))) @ layer["w2"]

    def _qkv(self, x, layer):
        b, s, _ = x.shape
        n = self._norm(x)
        return ((n @ layer["wq"]).reshape(b, s, self.h, self.hd),
                (n @ layer["wk"]).reshape(b, s, self.hk, self.hd),
                (n @ layer["wv"]).reshape(b, s, self.hk, self.hd))

    def step(self, tokens, cache, dtype):
        """Logits (b, s, vocab) for new tokens (b, s), appending them to the paged cache."""
        x = self.emb[tokens]
        b, s = tokens.shape
        for li, layer in enumerate(self.layers):
            q, k, v = (t.astype(dtype) for t in self._qkv(x, layer))
            out = flash_attn_c.flash_attn_with_kvcache(
                q, cache.k[li], cache.v[li], k, v, rotary_cos=cache.cos, rotary_sin=cache.sin,
                cache_seqlens=cache.lengths, block_table=cache.block_table, causal=True,
                rotary_interleaved=False)
            x = x + out.astype(np.float32).reshape(b, s, -1) @ layer["wo"]
            x = self._mlp(x, layer)
        cache.lengths = cache.lengths + s
        return self._norm(x) @ self.head

    def full(self, tokens, cos, sin, dtype):
        """Logits of the whole sequence recomputed without a cache."""
        x = self.emb[tokens]
        b, s = tokens.shape
        pos = np.arange(s)
        for layer in self.layers:
            q, k, v = self._qkv(x, layer)
            q, k = rotate_half(q, cos, sin, pos), rotate_half(k, cos, sin, pos)
            out = flash_attn_c.flash_attn_func(q.astype(dtype), k.astype(dtype), v.astype(dtype),
                                               causal=True)
            x = x + out.astype(np.float32).reshape(b, s, -1) @ layer["wo"]
            x = self._mlp(x, layer)
        return self._norm(x) @ self.head


def rotate_half(x, cos, sin, pos):
    """GPT-NeoX rotary (pairs (x[m], x[m + r/2])) on the first 2 * cos.shape[1] dims."""
    half = cos.shape[1]
    c = cos[pos][None, :, None, :].astype(np.float32)
    s = sin[pos][None, :, None, :].astype(np.float32)
    x = x.copy()
    a, b = x[..., :half].copy(), x[..., half:2 * half].copy()
    x[..., :half] = a * c - b * s
    x[..., half:2 * half] = a * s + b * c
    return x


class PagedCache:
    """Per-layer paged K/V blocks shared by all sequences through a block table."""

    def __init__(self, model, batch, capacity, page, dtype, rng):
        blocks_per_seq = -(-capacity // page)
        n_blocks = blocks_per_seq * batch
        shape = (n_blocks, page, model.hk, model.hd)
        self.k = [np.zeros(shape, dtype) for _ in range(model.n_layers)]
        self.v = [np.zeros(shape, dtype) for _ in range(model.n_layers)]
        # Blocks handed out in a shuffled order, as a real allocator would after some churn.
        self.block_table = rng.permutation(n_blocks).reshape(batch, blocks_per_seq).astype(np.int32)
        self.lengths = np.zeros(batch, np.int32)
        inv = 1.0 / 10000 ** (np.arange(0, model.hd, 2) / model.hd)
        angles = np.arange(blocks_per_seq * page)[:, None] * inv[None, :]
        self.cos, self.sin = np.cos(angles).astype(dtype), np.sin(angles).astype(dtype)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--prompt", type=int, default=40)
    ap.add_argument("--page", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = ap.parse_args()
    dtype = flash_attn_c.bfloat16 if args.dtype == "bfloat16" else np.dtype(args.dtype)
    tol = 2e-3 if args.dtype == "float32" else 0.25

    rng = np.random.default_rng(0)
    model = TinyTransformer()
    cache = PagedCache(model, args.batch, args.prompt + args.steps, args.page, dtype, rng)
    tokens = rng.integers(0, model.vocab, size=(args.batch, args.prompt))

    t0 = time.perf_counter()
    logits = model.step(tokens, cache, dtype)
    t_prefill = time.perf_counter() - t0
    worst = 0.0
    t_decode = 0.0
    for i in range(args.steps):
        nxt = logits[:, -1].argmax(-1)[:, None]
        tokens = np.concatenate([tokens, nxt], axis=1)
        t0 = time.perf_counter()
        logits = model.step(nxt, cache, dtype)
        t_decode += time.perf_counter() - t0
        full = model.full(tokens, cache.cos, cache.sin, dtype)[:, -1]
        err = float(np.abs(full - logits[:, -1]).max())
        worst = max(worst, err)
        if err > tol:
            raise SystemExit(f"step {i}: cached logits differ from the full recomputation by {err:.3g}")
    print(f"prefill {args.batch}x{args.prompt} tokens: {t_prefill * 1e3:.1f} ms")
    print(f"decode: {args.steps} steps x {args.batch} sequences, "
          f"{args.steps * args.batch / t_decode:.1f} tokens/s")
    print(f"max |logits(cache) - logits(full recomputation)| over all steps: {worst:.3g} (dtype {args.dtype})")
    print("generated tokens of sequence 0:", tokens[0, args.prompt:].tolist())


if __name__ == "__main__":
    main()
