"""Naive NumPy reference for the torch_npu attention functions (re-exported by ``reference``).

``npu_fusion_attention``, ``npu_flash_attention`` and ``npu_fusion_attention_grad`` with the
semantics of ``specs/npu_fusion_attention.md`` (cited "NPU §x"). Like the rest of the reference it
works one batch element at a time on the full score matrix with explicit boolean masks;
``compute_dtype`` and ``dropout_mask`` work as described in ``flash_attn_c.reference``.

Summary of the rules implemented (i = query row, j = key column, both within a batch element):

* S = scale * (Q K^T + pse) (pse added BEFORE scaling, NPU §2, §5). The softmax of a row runs
  over its band: the keys the sparse mode, pre/next_tockens and prefix leave (the "visited
  columns" of NPU §2); keys outside the band get weight 0. Keys masked by ``atten_mask`` inside
  the band score -FLT_MAX (not -inf), so a row whose band keys are all masked averages V
  uniformly over the band (softmax_max = -FLT_MAX, softmax_sum = the number of band keys).
* A row with nothing to attend to -- its band holds no key (e.g. prefix modes 5/6 with
  Sq > Skv and prefix[b] = 0), or invalid-line mode is on (``inner_precise=2``, or switched on
  automatically when the sparse band leaves rows empty, NPU §2) and all its band keys are
  masked -- gives output 0 and softmax_max = -FLT_MAX, softmax_sum = +FLT_MAX; with a sink, the
  sink's own statistics (softmax_max = sink, softmax_sum = 1).
* ``atten_mask`` True/1 = masked out. ``atten_mask=None`` means full attention whatever
  sparse_mode/pre_tockens/next_tockens say (NPU §3). A TND mask with more than one batch whose
  shape is [Tq, Tkv] or [sum Sq, sum Skv] is block-diagonal: batch b reads rows
  cu_q[b]:cu_q[b+1] and columns cu_kv[b]:cu_kv[b+1]; any other 2-D mask of at least
  [max Sq, max Skv] gives every batch its top-left [Sq_b, Skv_b] corner.
* sparse_mode keep rules (NPU §4), with d_lu = j - i and d_rd = j - i - (Skv - Sq):
  0: ~mask and -pre <= d_lu <= next;  1: ~mask;  2: d_lu <= 0;  3: d_rd <= 0;
  4: -pre <= d_rd <= next;  5: ~mask and (d_rd <= 0 or j < prefix[b]);
  6: d_rd <= 0 or j < prefix[b];
  7 (TND): the last batch with Sq_b > 0 keeps d_rd <= next, the others use mode 3;
  8 (TND): the first batch with Sq_b > 0 keeps d_lu <= Skv_b - max(Sq_b - next, 0), the others
  use mode 2.
  Modes 2, 3, 4, 6, 7, 8 take their pattern from the mode; the compressed mask
  ((2048, 2048), mode 6: (3072, 2048)) only has its shape checked.
* sink (per head, fp32): an extra logit in the softmax denominator, in the same units as S
  (i.e. not multiplied by ``scale``): m = max(sink, max_j S), sum = sum_j e^(S-m) + e^(sink-m),
  and softmax_max/softmax_sum include it (NPU §5 leaves both points open; this choice keeps the
  grad's "P = exp(S - max) / sum" consistent with the forward).
* Dropout: P * keep / keep_prob after the softmax statistics (NPU §7).
"""

import numpy as np

__all__ = ["npu_fusion_attention", "npu_flash_attention", "npu_fusion_attention_grad"]

FLT_MAX = float(np.finfo(np.float32).max)
_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")


# --------------------------------------------------------------------------------------------
# Layouts (NPU §1.3, §1.4)
# --------------------------------------------------------------------------------------------

class _Problem:
    """q/k/v split into per-batch (N, S, D) blocks, plus how to put outputs back."""

    def __init__(self, query, key, value, head_num, input_layout, actual_seq_qlen,
                 actual_seq_kvlen):
        layout = str(input_layout).upper()
        if layout not in _LAYOUTS:
            raise ValueError(f"input_layout: expected one of {_LAYOUTS}, got {input_layout!r}")
        q, k = _float_array(query, "query"), _float_array(key, "key")
        v = _float_array(value, "value")
        head_num = int(head_num)
        if head_num <= 0:
            raise ValueError(f"head_num: expected > 0, got {head_num}")
        self.layout, self.tnd = layout, layout == "TND"
        if self.tnd:
            if actual_seq_qlen is None or actual_seq_kvlen is None:
                raise ValueError("TND needs actual_seq_qlen and actual_seq_kvlen")
            self.cum_q = _int_list(actual_seq_qlen, "actual_seq_qlen")
            self.cum_kv = _int_list(actual_seq_kvlen, "actual_seq_kvlen")
            if not self.cum_q or len(self.cum_q) != len(self.cum_kv):
                raise ValueError("actual_seq_qlen/actual_seq_kvlen: expected equally long, "
                                 "non-empty lists")
            if q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
                raise ValueError(f"TND: expected 3-D query/key/value, got {q.shape}, {k.shape}, "
                                 f"{v.shape}")
            # NPU §1.4: cumulative ends without a leading 0; len[i] = max(cum[i] - cum[i-1], 0).
            self.sq = [max(c - p, 0) for c, p in zip(self.cum_q, [0] + self.cum_q[:-1])]
            self.skv = [max(c - p, 0) for c, p in zip(self.cum_kv, [0] + self.cum_kv[:-1])]
            self.q_start = [c - n for c, n in zip(self.cum_q, self.sq)]
            self.kv_start = [c - n for c, n in zip(self.cum_kv, self.skv)]
            if max(self.cum_q) > q.shape[0] or max(self.cum_kv) > k.shape[0]:
                raise ValueError("actual_seq_qlen/actual_seq_kvlen point past the end of T")
            if q.shape[1] != head_num:
                raise ValueError(f"head_num is {head_num}, but query has {q.shape[1]} heads")
            self.q, self.k, self.v = q, k, v
            self.batch = len(self.sq)
        else:
            if actual_seq_qlen is not None or actual_seq_kvlen is not None:
                raise ValueError("actual_seq_qlen/actual_seq_kvlen are only supported with TND")
            want = 3 if layout in ("BSH", "SBH") else 4
            if q.ndim != want or k.ndim != want or v.ndim != want:
                raise ValueError(f"{layout}: expected {want}-D query/key/value, got {q.shape}, "
                                 f"{k.shape}, {v.shape}")
            if layout in ("BSH", "SBH"):
                if q.shape[2] % head_num:
                    raise ValueError(f"query hidden size {q.shape[2]} is not a multiple of "
                                     f"head_num {head_num}")
                d = q.shape[2] // head_num
                if k.shape[2] % d:
                    raise ValueError("key hidden size is not a multiple of the head dim")
                n_kv = k.shape[2] // d
                if n_kv == 0 or v.shape[2] % n_kv:
                    raise ValueError("value hidden size is not a multiple of the kv head count")
                q, k, v = (self._split_h(x, n) for x, n in ((q, head_num), (k, n_kv), (v, n_kv)))
            self.q, self.k, self.v = (self._to_bnsd(x) for x in (q, k, v))
            if self.q.shape[1] != head_num:
                raise ValueError(f"head_num is {head_num}, but query has {self.q.shape[1]} heads")
            self.batch = self.q.shape[0]
            self.sq = [self.q.shape[2]] * self.batch
            self.skv = [self.k.shape[2]] * self.batch
        self.n = head_num
        self.n_kv = self.k.shape[-2] if self.tnd else self.k.shape[1]
        self.dv = self.v.shape[-1]
        if self.n % self.n_kv or self.k.shape[-1] != self.q.shape[-1]:
            raise ValueError("query heads must be a multiple of key heads and Dq must equal Dk")
        if any(s > 0 and t == 0 for s, t in zip(self.sq, self.skv)):
            raise ValueError("a batch with Sq > 0 and Skv = 0 is not supported (NPU §1.4)")

    def _split_h(self, x, n):
        return x.reshape(x.shape[0], x.shape[1], n, x.shape[2] // n)

    _PERM = {"BSH": (0, 2, 1, 3), "SBH": (1, 2, 0, 3), "BSND": (0, 2, 1, 3), "BNSD": (0, 1, 2, 3)}

    def _to_bnsd(self, x):
        return x.transpose(self._PERM[self.layout])

    def q_block(self, x, b):
        """(N, Sq_b, .) block of batch b of a query-like array in internal form."""
        if self.tnd:
            start = self.q_start[b]
            return x[start:start + self.sq[b]].transpose(1, 0, 2)
        return x[b]

    def kv_block(self, x, b):
        """(Nkv, Skv_b, .) block of batch b of a key-like array in internal form."""
        if self.tnd:
            start = self.kv_start[b]
            return x[start:start + self.skv[b]].transpose(1, 0, 2)
        return x[b]

    def like_query(self, x):
        """Bring an array in the query's input layout to the internal form (BNSD or TND)."""
        x = np.asarray(x)
        if self.tnd:
            return x
        if self.layout in ("BSH", "SBH"):
            x = self._split_h(x, self.n)
        return self._to_bnsd(x)

    def from_bnsd(self, x):
        """Internal BNSD (or TND) array -> the input layout."""
        if self.tnd:
            return x
        if self.layout == "BNSD":
            return x
        if self.layout == "BSND":
            return x.transpose(0, 2, 1, 3)
        if self.layout == "BSH":
            b, n, s, d = x.shape
            return x.transpose(0, 2, 1, 3).reshape(b, s, n * d)
        b, n, s, d = x.shape
        return x.transpose(2, 0, 1, 3).reshape(s, b, n * d)

    def new_out(self, d, wide, like_k=False):
        """Zero output in internal form for per-batch (N, S, d) blocks."""
        if self.tnd:
            src = self.k if like_k else self.q
            return np.zeros((src.shape[0], self.n_kv if like_k else self.n, d), wide)
        src = self.k if like_k else self.q
        return np.zeros(src.shape[:3] + (d,), wide)

    def put(self, arr, b, block, like_k=False):
        """Store a per-batch (N, S, d) block into an array made by ``new_out``."""
        if self.tnd:
            start = self.kv_start[b] if like_k else self.q_start[b]
            arr[start:start + block.shape[1]] = block.transpose(1, 0, 2)
        else:
            arr[b] = block

    def numels(self):
        """Dropout-mask element count as the wrapper computes it (NPU §1.2)."""
        if not self.tnd:
            return self.batch * self.n * self.sq[0] * self.skv[0]
        q, kv = self.cum_q, self.cum_kv
        total = q[0] * kv[0] + sum((q[i] - q[i - 1]) * (kv[i] - kv[i - 1])
                                   for i in range(1, len(q)))
        return self.n * total

    # softmax_max / softmax_sum, NPU §1.2, §1.4 -----------------------------------------------

    def stats_out(self, per_batch, softmax_layout, wide):
        """Per-batch (N, Sq_b) statistics -> [B, N, Sq, 8] or TND [T, N, 8]."""
        if not self.tnd:
            return np.ascontiguousarray(np.repeat(np.stack(per_batch)[..., None], 8, axis=-1)
                                        .astype(wide))
        t = self.q.shape[0]
        if softmax_layout == "TND":
            res = np.zeros((t, self.n, 8), wide)
            for b, st in enumerate(per_batch):
                res[self.q_start[b]:self.q_start[b] + self.sq[b]] = st.T[..., None]
            return res
        # "" ("NTD"): per-batch [N, Sq_b, 8] blocks back to back in a [T, N, 8] buffer.
        flat = np.zeros(t * self.n * 8, wide)
        for b, st in enumerate(per_batch):
            off = self.q_start[b] * self.n * 8
            flat[off:off + st.size * 8] = np.repeat(st[..., None], 8, axis=-1).reshape(-1)
        return flat.reshape(t, self.n, 8)

    def stats_in(self, stats, b, softmax_layout, name):
        """Read lane 0 of a softmax_max/softmax_sum input for batch b -> (N, Sq_b) float64."""
        s = np.asarray(stats, np.float64)
        if not self.tnd:
            if s.ndim != 4 or s.shape[:3] != (self.batch, self.n, self.sq[0]):
                raise ValueError(f"{name}: expected [B, N, Sq, 8], got {s.shape}")
            return s[b, :, :, 0]
        if s.ndim != 3 or s.shape[:2] != (self.q.shape[0], self.n):
            raise ValueError(f"{name}: expected [T, N, 8], got {s.shape}")
        start, n_rows = self.q_start[b], self.sq[b]
        if softmax_layout == "TND":
            return s[start:start + n_rows, :, 0].T
        lanes = s.shape[2]
        flat = s.reshape(-1)
        off = start * self.n * lanes
        return flat[off:off + self.n * n_rows * lanes].reshape(self.n, n_rows, lanes)[..., 0]


# --------------------------------------------------------------------------------------------
# Masks (NPU §3, §4)
# --------------------------------------------------------------------------------------------

class _Masking:
    """Per-batch visibility (True = attended) from atten_mask, sparse_mode, pre/next, prefix."""

    def __init__(self, prob, atten_mask, sparse_mode, pre_tockens, next_tockens, prefix,
                 inner_precise):
        mode = int(sparse_mode)
        allowed = (0, 1, 2, 3, 4, 6, 7, 8) if prob.tnd else (0, 1, 2, 3, 4, 5, 6)
        if mode not in allowed:
            raise ValueError(f"sparse_mode value must be in {allowed}, got {mode}")
        self.prob, self.mode = prob, mode
        self.pre, self.next = int(pre_tockens), int(next_tockens)
        self.mask = None
        self.active = atten_mask is not None      # NPU §3: no mask => full attention
        if self.active:
            m = np.asarray(atten_mask)
            if m.dtype != np.bool_ and m.dtype != np.uint8:
                raise TypeError(f"atten_mask: expected bool or uint8, got {m.dtype}")
            m = m.astype(bool)
            if mode in (2, 3, 4, 7, 8) and m.shape[-2:] != (2048, 2048):
                raise ValueError(f"sparse_mode {mode}: please set the atten_mask_shape to "
                                 f"[2048,2048], got {m.shape}")
            if mode == 6 and m.shape[-2:] != (3072, 2048):
                raise ValueError(f"sparse_mode 6: expected a [3072,2048] atten_mask, got {m.shape}")
            if mode in (0, 1, 5):
                self.mask = self._user_mask(m)
        self.prefix = None
        if self.active and mode in (5, 6):
            if prefix is None:
                raise ValueError(f"sparse_mode {mode} needs prefix")
            self.prefix = _int_list(prefix, "prefix")
            if len(self.prefix) != prob.batch:
                raise ValueError(f"prefix: expected {prob.batch} entries, got {len(self.prefix)}")
        nonempty = [b for b in range(prob.batch) if prob.sq[b] > 0]
        self.band_batch = None
        if self.active and mode == 7:
            self.band_batch = nonempty[-1] if nonempty else None
        if self.active and mode == 8:
            self.band_batch = nonempty[0] if nonempty else None
        # Invalid-line mode (NPU §2): explicit, or automatic when the band (in left-up
        # coordinates -pre_lu <= j - i <= next_lu) leaves a row empty: pre_lu < Sq - Skv or
        # next_lu < 0. The switch is per call, as the tiling sets it once.
        self.invalid_line = int(inner_precise) == 2 or any(
            self._auto_invalid(prob.sq[b], prob.skv[b]) for b in nonempty)

    def _user_mask(self, m):
        p = self.prob
        if not p.tnd:
            # [B,N,Sq,Skv], [B,1,Sq,Skv], [1,1,Sq,Skv] or [Sq,Skv] (NPU §3)
            want = (p.batch, p.n, p.sq[0], p.skv[0])
            if m.ndim not in (2, 4):
                raise ValueError(f"atten_mask: expected 2 or 4 dims, got shape {m.shape}")
            try:
                return np.broadcast_to(m, want)
            except ValueError:
                raise ValueError(f"atten_mask: shape {m.shape} does not broadcast to {want}")
        while m.ndim > 2 and m.shape[0] == 1:
            m = m[0]
        if m.ndim != 2:
            raise ValueError(f"TND atten_mask: expected [maxSq, maxSkv], got {m.shape}")
        return m

    def _auto_invalid(self, sq, skv):
        if not self.active:
            return False
        band = {0: (self.pre, self.next), 2: (None, 0), 3: (None, skv - sq),
                4: (self.pre + sq - skv, self.next + skv - sq)}.get(self.mode)
        if band is None:
            return False
        pre_lu, next_lu = band
        return (pre_lu is not None and pre_lu < sq - skv) or next_lu < 0

    def user_mask_block(self, b):
        """The atten_mask block of batch b, (N or 1, Sq_b, Skv_b), True = masked."""
        p, m = self.prob, self.mask
        sq, skv = p.sq[b], p.skv[b]
        if not p.tnd:
            return m[b]
        block_shapes = ((p.q.shape[0], p.k.shape[0]), (sum(p.sq), sum(p.skv)))
        if p.batch > 1 and m.shape in block_shapes:
            # block-diagonal: batch b owns rows cu_q[b]:cu_q[b+1], cols cu_kv[b]:cu_kv[b+1]
            q0, k0 = sum(p.sq[:b]), sum(p.skv[:b])
            return m[None, q0:q0 + sq, k0:k0 + skv]
        if m.shape[0] < sq or m.shape[1] < skv:
            raise ValueError(f"TND atten_mask {m.shape} is smaller than batch {b} ({sq}, {skv})")
        return m[None, :sq, :skv]          # top-left window (NPU §1.4)

    def band(self, b):
        """Keys row i of batch b visits (sparse mode, pre/next, prefix), (1, Sq_b, Skv_b)."""
        p = self.prob
        sq, skv = p.sq[b], p.skv[b]
        i = np.arange(sq)[:, None]
        j = np.arange(skv)[None, :]
        d_lu = j - i
        d_rd = j - i - (skv - sq)
        mode = self.mode
        if not self.active or mode == 1:
            keep = np.ones((sq, skv), bool)
        elif mode in (7, 8) and b != self.band_batch:
            keep = d_rd <= 0 if mode == 7 else d_lu <= 0
        elif mode == 0:
            keep = (d_lu >= -self.pre) & (d_lu <= self.next)
        elif mode == 2:
            keep = d_lu <= 0
        elif mode == 3:
            keep = d_rd <= 0
        elif mode == 4:
            keep = (d_rd >= -self.pre) & (d_rd <= self.next)
        elif mode in (5, 6):
            keep = (d_rd <= 0) | (j < self.prefix[b])
        elif mode == 7:
            keep = d_rd <= self.next
        else:  # mode 8, band batch
            keep = d_lu <= skv - max(sq - self.next, 0)
        return keep[None]

    def visible(self, b):
        """Band keys not masked by atten_mask, broadcastable to (N, Sq_b, Skv_b)."""
        keep = self.band(b)
        if self.active and self.mode in (0, 1, 5):
            keep = keep & ~self.user_mask_block(b)
        return keep


# --------------------------------------------------------------------------------------------
# pse (NPU §5)
# --------------------------------------------------------------------------------------------

def _alibi_compressed_rc(cols, s):
    """Rows/cols into a compressed [1024, cols] alibi pse for an s x s block (NPU §5).

    The compressed tensor is the last 1024 rows of a cols x cols Toeplitz matrix. The spec's
    reconstruction (rows I >= C - 1024 use compressed row I - (C - 1024); earlier rows use
    comp[m, J - I + C - 1024 + m], here m = 1023) gives the full matrix; batch blocks shorter than
    cols take its bottom-right s x s corner (the same Toeplitz values). The kernel adds the bias
    on and below the diagonal only, so entries above it are -1 (no bias).
    """
    i = np.arange(s)[:, None]
    j = np.arange(s)[None, :]
    big_i, big_j = i + cols - s, j + cols - s
    direct = big_i >= cols - 1024
    rows = np.where(direct, big_i - (cols - 1024), 1023)
    cols_idx = np.where(direct, big_j, big_j - big_i + cols - 1)
    valid = j <= i
    return np.where(valid, rows, -1), np.where(valid, cols_idx, -1)


class _Pse:
    """Maps every (n, i, j) of a batch to a flat index into pse (-1: no bias), so the forward is
    a gather and dpse the matching scatter-add (which reduces over broadcast dims)."""

    def __init__(self, prob, pse, prec):
        self.prob = prob
        self.pse = None
        if pse is None:
            return
        pse = _float_array(pse, "pse")
        if pse.ndim != 4 or pse.shape[0] not in (1, prob.batch) or pse.shape[1] != prob.n:
            raise ValueError(f"pse: expected [B or 1, {prob.n}, ., .], got {pse.shape}")
        self.pse, self.shape = pse, pse.shape
        self.flat = prec(pse).reshape(-1)
        self.index = np.arange(pse.size).reshape(pse.shape)
        rows, cols = pse.shape[2], pse.shape[3]
        if prob.tnd:
            if rows != 1024:
                raise ValueError("TND pse: expected the alibi-compressed [B or 1, N, 1024, S] form")
            for b in range(prob.batch):
                if prob.sq[b] and (prob.sq[b] != prob.skv[b] or prob.sq[b] > cols):
                    raise ValueError("TND pse needs Sq_b == Skv_b <= pse.shape[3] per batch")
            self.kind = "compressed"
        else:
            sq, skv = prob.sq[0], prob.skv[0]
            if cols != skv:
                raise ValueError(f"pse: last dim must be Skv={skv}, got {cols}")
            if rows == sq:
                self.kind = "full"
            elif rows == 1:
                self.kind = "rows"
            elif rows == 1024 and sq > 1024 and sq == skv:
                self.kind = "compressed"
            else:
                raise ValueError(f"pse: rows must be Sq={sq}, 1 or (alibi, Sq == Skv > 1024) 1024;"
                                 f" got {pse.shape}")

    def indices(self, b):
        """(N, Sq_b, Skv_b) flat indices into pse, -1 where no bias is added."""
        p = self.prob
        sq, skv = p.sq[b], p.skv[b]
        base = self.index[b if self.shape[0] > 1 else 0]            # (N, R, C)
        if self.kind == "full":
            return base
        if self.kind == "rows":
            return np.broadcast_to(base, (p.n, sq, skv))
        r, c = _alibi_compressed_rc(self.shape[3], sq)
        return np.where(r[None] >= 0, base[:, np.maximum(r, 0), np.maximum(c, 0)], -1)

    def values(self, b):
        if self.pse is None:
            return None
        idx = self.indices(b)
        return np.where(idx >= 0, self.flat[np.maximum(idx, 0)], 0.0)

    def scatter(self, grads, prec):
        """Sum per-batch (N, Sq_b, Skv_b) gradients into pse's shape."""
        acc = np.zeros(self.pse.size, np.float64)
        for b, g in enumerate(grads):
            if g is None:
                continue
            idx = np.broadcast_to(self.indices(b), g.shape)
            sel = idx >= 0
            np.add.at(acc, idx[sel], g[sel])
        return prec.out(prec(acc).reshape(self.shape))


# --------------------------------------------------------------------------------------------
# Dropout masks
# --------------------------------------------------------------------------------------------

def _dropout_blocks(prob, keep_prob, dropout_mask):
    """Per-batch (N, Sq_b, Skv_b) keep masks, or None when keep_prob == 1.

    Accepted ``dropout_mask`` forms (True = keep):
      * non-TND: [B, N, Sq, Skv];
      * TND: a list of per-batch [N, Sq_b, Skv_b] arrays, or [B, N, maxSq, maxSkv] with each batch
        in the top-left corner;
      * any layout: a 1-D array of ``numels`` (clamped lengths for TND) entries in the NPU's
        logical order ([B, N, Sq, Skv] row-major; TND: per-batch [N, Sq_b, Skv_b] blocks back to
        back), e.g. an NPU bit mask unpacked with
        ``np.unpackbits(m, bitorder="little")[:numels].astype(bool)`` (NPU §7).
    """
    keep_prob = float(keep_prob)
    if not 0.0 < keep_prob <= 1.0:
        raise ValueError(f"keep_prob: expected 0 < keep_prob <= 1, got {keep_prob}")
    if keep_prob == 1.0:
        return keep_prob, None
    if dropout_mask is None:
        raise ValueError("keep_prob < 1 needs dropout_mask: the reference cannot reproduce the "
                         "library's random generator; pass the keep mask the kernel used")
    shapes = [(prob.n, prob.sq[b], prob.skv[b]) for b in range(prob.batch)]
    if isinstance(dropout_mask, (list, tuple)):
        if len(dropout_mask) != prob.batch:
            raise ValueError(f"dropout_mask: expected {prob.batch} per-batch arrays")
        return keep_prob, [_keep_mask(m, s) for m, s in zip(dropout_mask, shapes)]
    m = np.asarray(dropout_mask)
    if m.ndim == 1:
        m = _keep_mask(m, (sum(int(np.prod(s)) for s in shapes),))
        blocks, off = [], 0
        for s in shapes:
            n = int(np.prod(s))
            blocks.append(m[off:off + n].reshape(s))
            off += n
        return keep_prob, blocks
    if prob.tnd:
        m = _keep_mask(m, (prob.batch, prob.n) + m.shape[2:])
        if m.shape[2] < max(prob.sq) or m.shape[3] < max(prob.skv):
            raise ValueError(f"dropout_mask: {m.shape} is smaller than [B, N, maxSq, maxSkv]")
        return keep_prob, [m[b, :, :s[1], :s[2]] for b, s in enumerate(shapes)]
    m = _keep_mask(m, (prob.batch, prob.n, prob.sq[0], prob.skv[0]))
    return keep_prob, list(m)


# --------------------------------------------------------------------------------------------
# Per-batch math (NPU §2, §9)
# --------------------------------------------------------------------------------------------

def _scores(qb, kh, pse_b, scale, visible, prec):
    """S = scale * (Q K^T + pse), masked entries replaced by -FLT_MAX (NPU §2)."""
    s = prec.mm(qb, kh.transpose(0, 2, 1))
    if pse_b is not None:
        s = prec(s + pse_b)
    s = prec(s * scale)
    return np.where(visible, s, -FLT_MAX)


def _nothing_to_attend(band, visible, invalid_line, shape):
    """(N, Sq_b) rows that give output 0: no band key, or (invalid-line mode) no unmasked one."""
    rows = ~band.any(axis=-1)
    if invalid_line:
        rows = rows | ~visible.any(axis=-1)
    return np.broadcast_to(rows, shape)


def _forward_batch(qb, kb, vb, band, visible, pse_b, scale, sink, keep, keep_prob, invalid_line,
                   prec):
    n = qb.shape[0]
    groups = n // kb.shape[0]
    qb = prec(qb)
    kh, vh = np.repeat(prec(kb), groups, axis=0), np.repeat(prec(vb), groups, axis=0)
    s = _scores(qb, kh, pse_b, scale, visible, prec)
    band = np.broadcast_to(band, s.shape)
    with np.errstate(over="ignore", invalid="ignore"):
        # The softmax runs over the band only: keys outside it weigh 0 (NPU §2).
        m = np.where(band, s, -np.inf).max(axis=-1)
        if sink is not None:
            m = np.maximum(m, sink[:, None])
        e = np.where(band, np.exp(s - m[..., None]), 0.0)
        total = e.sum(axis=-1)
        if sink is not None:
            total = total + np.exp(sink[:, None] - m)
        p = e / total[..., None]
    nothing = _nothing_to_attend(band, visible, invalid_line, m.shape)
    p = np.where(nothing[..., None], 0.0, p)
    if sink is None:
        # No key and no sink: the NPU's invalid-line statistics (NPU §2).
        m = np.where(nothing, -FLT_MAX, m)
        total = np.where(nothing, FLT_MAX, total)
    p = prec(p)
    if keep is not None:
        p = prec(p * keep * (1.0 / keep_prob))
    out = prec.mm(p, vh)
    return out, m, total


def _backward_batch(qb, kb, vb, dy, o, smax, ssum, band, visible, pse_b, scale, keep, keep_prob,
                    invalid_line, prec):
    """Closed-form gradient with P rebuilt from the GIVEN softmax_max/sum and D from the GIVEN
    attention_in (NPU §9). Returns dq (N, Sq, D), dk, dv (Nkv, Skv, .), dS*scale (N, Sq, Skv)."""
    n, n_kv = qb.shape[0], kb.shape[0]
    groups = n // n_kv
    qb = prec(qb)
    kh, vh = np.repeat(prec(kb), groups, axis=0), np.repeat(prec(vb), groups, axis=0)
    dy, o = prec(dy), prec(o)
    s = _scores(qb, kh, pse_b, scale, visible, prec)
    band = np.broadcast_to(band, s.shape)
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        p = np.where(band, np.exp(s - smax[..., None]) / ssum[..., None], 0.0)
    nothing = _nothing_to_attend(band, visible, invalid_line, smax.shape)
    p = prec(np.where(nothing[..., None], 0.0, p))
    kept = np.ones_like(p) if keep is None else keep.astype(prec.wide)
    r = 1.0 / keep_prob
    dv = prec.mm(prec(p * kept * r).transpose(0, 2, 1), dy)            # dV = (P keep/kp)^T dY
    dp = prec.mm(dy, vh.transpose(0, 2, 1))                            # dP = dY V^T
    dsum = prec(np.sum(dy * o, axis=-1, keepdims=True))                # D = rowsum(dY * O)
    ds = prec(p * prec(kept * dp * r - dsum))                          # dS = P (keep dP/kp - D)
    # Masked scores are the constant -FLT_MAX: they pass no gradient to Q, K or pse (this also
    # makes a row whose band keys are all masked, whose output is a plain mean of V over the
    # band, contribute only to dV).
    ds = np.where(visible, ds, 0.0)
    dq = prec(scale * prec.mm(ds, kh))
    dk = prec(scale * prec.mm(ds.transpose(0, 2, 1), qb))
    dk = prec(dk.reshape(n_kv, groups, *dk.shape[1:]).sum(axis=1))      # GQA group sums
    dv = prec(dv.reshape(n_kv, groups, *dv.shape[1:]).sum(axis=1))
    return dq, dk, dv, prec(scale * ds)


def _sink(sink, n):
    if sink is None:
        return None
    s = np.asarray(sink, np.float64).reshape(-1)
    if s.shape != (n,):
        raise ValueError(f"sink: expected shape ({n},), got {np.shape(sink)}")
    return s


def _check_common(padding_mask, softmax_layout, prob, pse, sparse_mode):
    if padding_mask is not None:
        raise ValueError("padding_mask is not supported (reserved by torch_npu)")
    if softmax_layout not in ("", "TND"):
        raise ValueError(f"softmax_layout: expected '' or 'TND', got {softmax_layout!r}")
    if softmax_layout == "TND" and not prob.tnd:
        raise ValueError("softmax_layout='TND' is only valid with input_layout='TND'")
    if pse is not None and int(sparse_mode) in (7, 8):
        raise ValueError("sparse_mode 7/8 do not accept pse")


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------

def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None,
                         *, dropout_mask=None, compute_dtype=np.float64):
    """Reference ``npu_fusion_attention`` (NPU §1-§8).

    Returns ``(attention_out, softmax_max, softmax_sum, softmax_out, seed, offset, numels)``:
    attention_out in the input layout (D from value); softmax_max/softmax_sum [B, N, Sq, 8]
    (TND: [T, N, 8] in the order ``softmax_layout`` names: "TND" = rows in T order, "" = per-batch
    [N, Sq_b, 8] blocks back to back), float64 (float32 for a lower compute_dtype), all 8 lanes
    equal; softmax_out an empty array; seed = offset = 0 (the reference has no generator:
    dropout comes from ``dropout_mask``, see ``_dropout_blocks`` for its accepted forms); numels
    as the NPU wrapper computes it. TND rows of T past the last sequence are 0.
    ``gen_mask_parallel`` and ``sync`` do not change the numbers and are ignored.
    """
    prec = _Precision(compute_dtype)
    prob = _Problem(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen)
    _check_common(padding_mask, softmax_layout, prob, pse, sparse_mode)
    masking = _Masking(prob, atten_mask, sparse_mode, pre_tockens, next_tockens, prefix,
                       inner_precise)
    bias = _Pse(prob, pse, prec)
    sinks = _sink(sink, prob.n)
    keep_prob, keeps = _dropout_blocks(prob, keep_prob, dropout_mask)
    out = prob.new_out(prob.dv, prec.wide)
    maxes, sums = [], []
    for b in range(prob.batch):
        if prob.sq[b] == 0:
            maxes.append(np.zeros((prob.n, 0)))
            sums.append(np.zeros((prob.n, 0)))
            continue
        qb, kb, vb = prob.q_block(prob.q, b), prob.kv_block(prob.k, b), prob.kv_block(prob.v, b)
        o, m, t = _forward_batch(qb, kb, vb, masking.band(b), masking.visible(b),
                                 bias.values(b), float(scale), sinks,
                                 None if keeps is None else keeps[b], keep_prob,
                                 masking.invalid_line, prec)
        prob.put(out, b, o)
        maxes.append(m)
        sums.append(t)
    return (prec.out(prob.from_bnsd(out)),
            prob.stats_out(maxes, softmax_layout, prec.wide),
            prob.stats_out(sums, softmax_layout, prec.wide),
            np.empty((0,), prec.dtype), 0, 0, prob.numels())


def npu_flash_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                        atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                        next_tockens=2147483647, inner_precise=1, prefix=None,
                        actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                        gen_mask_parallel=True, sync=False, softmax_layout="", sink=None,
                        *, dropout_mask=None, compute_dtype=np.float64):
    """Legacy alias of ``npu_fusion_attention`` with ``inner_precise=1`` by default (NPU §10);
    inner_precise 0 and 1 behave identically (NPU §7)."""
    return npu_fusion_attention(query, key, value, head_num, input_layout, pse, padding_mask,
                                atten_mask, scale, keep_prob, pre_tockens, next_tockens,
                                inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                                sparse_mode, gen_mask_parallel, sync, softmax_layout, sink,
                                dropout_mask=dropout_mask, compute_dtype=compute_dtype)


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None,
                              padding_mask=None, atten_mask=None, softmax_max=None,
                              softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value=1.0, keep_prob=1.0, pre_tockens=2147483647,
                              next_tockens=2147483647, inner_precise=0, seed=0, offset=0,
                              numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                              sparse_mode=0, gen_mask_parallel=True, sync=False,
                              softmax_layout="", sink=None, dropout_mask=None,
                              compute_dtype=np.float64):
    """Reference ``npu_fusion_attention_grad`` -> ``(dq, dk, dv, dpse)`` (NPU §9).

    P is rebuilt from the GIVEN ``softmax_max``/``softmax_sum`` (lane 0) and D = rowsum(dy *
    attention_in) from the GIVEN ``attention_in`` (so ring attention's merged statistics work);
    if any of the three is None it is computed with the reference forward first (a convenience:
    the NPU requires them). dq/dk/dv have query/key/value's shapes; GQA dk/dv are summed over each
    kv head's group. Masked positions pass no gradient. ``dpse`` is the true gradient
    scale * dS summed into pse's shape (over broadcast batch/row dims and, for the compressed
    alibi form, over every position that reads an entry) -- the NPU leaves it unwritten; ours is
    the documented improvement of API.md §4 -- or an empty array when pse is None.
    ``softmax_in``, ``seed``, ``offset``, ``numels``, ``gen_mask_parallel``, ``sync`` are
    ignored; dropout comes from ``dropout_mask`` as in the forward. The sink logit gets no
    gradient (the 4-output API has no dsink).
    """
    prec = _Precision(compute_dtype)
    prob = _Problem(query, key, value, head_num, input_layout, actual_seq_qlen, actual_seq_kvlen)
    _check_common(padding_mask, softmax_layout, prob, pse, sparse_mode)
    if softmax_max is None or softmax_sum is None or attention_in is None:
        fwd = npu_fusion_attention(query, key, value, head_num, input_layout, pse, None,
                                   atten_mask, scale_value, keep_prob, pre_tockens, next_tockens,
                                   inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                                   sparse_mode, softmax_layout=softmax_layout, sink=sink,
                                   dropout_mask=dropout_mask, compute_dtype=compute_dtype)
        attention_in = fwd[0] if attention_in is None else attention_in
        softmax_max = fwd[1] if softmax_max is None else softmax_max
        softmax_sum = fwd[2] if softmax_sum is None else softmax_sum
    masking = _Masking(prob, atten_mask, sparse_mode, pre_tockens, next_tockens, prefix,
                       inner_precise)
    bias = _Pse(prob, pse, prec)
    keep_prob, keeps = _dropout_blocks(prob, keep_prob, dropout_mask)
    dy_i = prob.like_query(_float_array(dy, "dy"))
    o_i = prob.like_query(_float_array(attention_in, "attention_in"))
    dq = prob.new_out(prob.q.shape[-1], prec.wide)
    dk = prob.new_out(prob.k.shape[-1], prec.wide, like_k=True)
    dv = prob.new_out(prob.dv, prec.wide, like_k=True)
    dpse = []
    for b in range(prob.batch):
        if prob.sq[b] == 0:
            dpse.append(None)
            continue
        qb, kb, vb = prob.q_block(prob.q, b), prob.kv_block(prob.k, b), prob.kv_block(prob.v, b)
        dyb, ob = prob.q_block(dy_i, b), prob.q_block(o_i, b)
        smax = prob.stats_in(softmax_max, b, softmax_layout, "softmax_max")
        ssum = prob.stats_in(softmax_sum, b, softmax_layout, "softmax_sum")
        g_q, g_k, g_v, g_s = _backward_batch(
            qb, kb, vb, dyb, ob, smax, ssum, masking.band(b), masking.visible(b), bias.values(b),
            float(scale_value), None if keeps is None else keeps[b], keep_prob,
            masking.invalid_line, prec)
        prob.put(dq, b, g_q)
        prob.put(dk, b, g_k, like_k=True)
        prob.put(dv, b, g_v, like_k=True)
        dpse.append(g_s)
    dpse = np.empty((0,), prec.dtype) if bias.pse is None else bias.scatter(dpse, prec)
    return (prec.out(prob.from_bnsd(dq)), prec.out(prob.from_bnsd(dk)),
            prec.out(prob.from_bnsd(dv)), dpse)


# Shared helpers, imported last so that either module can be imported first: reference.py
# re-exports the functions above from its own last line.
from .reference import _Precision, _float_array, _int_list, _keep_mask  # noqa: E402
