"""torch_npu compatible attention on NumPy arrays (API.md section 4).

``npu_fusion_attention`` (and the legacy ``npu_flash_attention``) with the names, argument order,
defaults and 7-tuple result of torch_npu, following specs/npu_fusion_attention.md. Like every
front-end this module holds no attention math: it validates the arguments the way torch_npu does,
turns the layouts into (batch, row, head, dim) stride views (no copies), turns sparse_mode and
pre/next_tockens into the kernel's per-row visible key band, pse and atten_mask into strided views
(compressed masks become bands and are never expanded; the alibi-compressed pse becomes an O(S)
Toeplitz view), and calls the one forward kernel.

Documented differences from the NPU are listed in docs/npu.md; the main ones: dropout bits come
from our own counter-based generator (Philox-4x32-10 keyed by (seed, offset, batch * head_num +
head, row, col)), P is not rounded to fp16/bf16 before P.V (more accurate), and head dims are
limited to 512.
"""
from types import SimpleNamespace

import numpy as np

from . import _rng
from . import _validate as V
from ._core import forward
from ._npu_args import INT32_MAX, check_rank, int_list, kernel_view, qkv_arrays
from ._runtime import empty

# torch_npu fills masked scores with -FLT_MAX (not -inf): a fully masked row then averages V
# instead of producing NaN, and the "invalid line" rows are recognised by a max of -FLT_MAX.
FLT_MAX = float(np.finfo(np.float32).max)

_LAYOUTS = ("BSH", "SBH", "BSND", "BNSD", "TND")
_MODES = {False: (0, 1, 2, 3, 4, 5, 6), True: (0, 1, 2, 3, 4, 6, 7, 8)}  # keyed by "is TND"
_FULL_MASK_MODES = (0, 1, 5)     # the mask's contents are used element by element
_COMPRESSED = (2048, 2048)       # modes 2, 3, 4, 7, 8: the pattern comes from the mode
_PREFIX_COMPRESSED = (3072, 2048)  # mode 6
_ALIBI_ROWS = 1024               # rows of the alibi-compressed pse
_MAX_HEAD_DIM = 512              # the kernel's limit (the NPU allows 768)
_TOCKEN_CLAMP = 1 << 62


# ---- layouts ------------------------------------------------------------------------------------

def _hidden_split(q, k, v, head_num):
    """BSH/SBH: head dims from hidden sizes (D = Hq / head_num, Nkv = Hk / D, Dv = Hv / Nkv)."""
    hq, hk, hv = q.shape[-1], k.shape[-1], v.shape[-1]
    if hq % head_num:
        raise ValueError(f"query: hidden size {hq} is not divisible by head_num {head_num}")
    d = hq // head_num
    if d == 0 or hk % d or hk == 0:
        raise ValueError(f"key: hidden size {hk} is not a positive multiple of the head dim {d} "
                         f"(query hidden size {hq} / head_num {head_num})")
    nkv = hk // d
    if hv % nkv or hv == 0:
        raise ValueError(f"value: hidden size {hv} is not a positive multiple of the {nkv} kv heads "
                         f"(key hidden size {hk} / head dim {d})")
    return d, nkv, hv // nkv


def _geometry(query, key, value, head_num, input_layout):
    """Validate q/k/v against the layout and head_num; return sizes and (b, s, n, d) views."""
    if not isinstance(input_layout, str):
        raise TypeError(f"input_layout: expected a str, got {type(input_layout).__name__}")
    layout = input_layout.upper()  # torch_npu upper-cases the layout string
    if layout not in _LAYOUTS:
        raise ValueError(f"input_layout: expected one of {', '.join(_LAYOUTS)}, got {input_layout!r}")
    head_num = V.to_int(head_num, "head_num")
    if head_num <= 0:
        raise ValueError(f"head_num: expected a positive integer, got {head_num}")
    q, k, v = qkv_arrays(query, key, value)
    for a, name in ((q, "query"), (k, "key"), (v, "value")):
        check_rank(a, name, layout)
    # Only a strided last dim is copied (API.md section 1); for BSH/SBH that dim is H.
    q, k, v = (V.last_dim_contiguous(a) for a in (q, k, v))

    heads = (None, None, None)
    if layout in ("BSH", "SBH"):
        _, nkv, _ = _hidden_split(q, k, v, head_num)
        heads = (head_num, nkv, nkv)
    q4, k4, v4 = (kernel_view(a, layout, n) for a, n in zip((q, k, v), heads))
    nq, d = q4.shape[-2], q4.shape[-1]
    nkv, dk, dv = k4.shape[-2], k4.shape[-1], v4.shape[-1]
    if layout not in ("BSH", "SBH") and nq != head_num:
        axis = {"BNSD": 1, "BSND": 2, "TND": 1}[layout]
        raise ValueError(f"head_num: is {head_num}, but query dim {axis} (N of {layout}) is {nq}")
    if nkv < 1:
        raise ValueError(f"key: expected at least one head, got shape {tuple(key.shape)}")
    if dk != d:
        raise ValueError(f"key: head dim {dk} differs from the query head dim {d}")
    if v4.shape[-2] != nkv:
        raise ValueError(f"value: {v4.shape[-2]} heads differ from the {nkv} heads of key")
    if dv > d:
        raise ValueError(f"value: head dim {dv} exceeds the query/key head dim {d} (Dv <= Dk is required)")
    if not 1 <= d <= _MAX_HEAD_DIM:
        raise ValueError(f"query: head dim must be in [1, {_MAX_HEAD_DIM}], got {d} (the NPU allows up "
                         f"to 768; not supported here yet)")
    if nq % nkv:
        raise ValueError(f"key: the number of query heads ({nq}) must be a multiple of the number of "
                         f"kv heads ({nkv})")
    if layout == "TND":
        if k4.shape[0] != v4.shape[0]:
            raise ValueError(f"value: {v4.shape[0]} tokens differ from the {k4.shape[0]} tokens of key")
        return SimpleNamespace(layout=layout, tnd=True, b=None, sq=None, sk=None,
                               tq=q4.shape[0], tk=k4.shape[0], h=nq, hk=nkv, d=d, dv=dv, q=q4,
                               k=k4, v=v4)
    b, sq = q4.shape[0], q4.shape[1]
    if k4.shape[0] != b or v4.shape[0] != b:
        raise ValueError(f"key/value: batch sizes {k4.shape[0]}/{v4.shape[0]} differ from the query "
                         f"batch {b}")
    sk = k4.shape[1]
    if v4.shape[1] != sk:
        raise ValueError(f"value: sequence length {v4.shape[1]} differs from the key length {sk}")
    for n, name in ((b, "batch"), (sq, "query sequence length"), (sk, "key sequence length")):
        if n < 1:
            raise ValueError(f"query/key: {name} must be at least 1, got {n}")
    return SimpleNamespace(layout=layout, tnd=False, b=b, sq=sq, sk=sk, h=nq, hk=nkv, d=d,
                           dv=dv, q=q4, k=k4, v=v4)


# ---- TND sequence lists -------------------------------------------------------------------------

def _seq_list(x, name):
    a = int_list(x, name)
    # Cumulative ends without a leading 0. Trailing zeros disable trailing batches (the NPU clamps
    # each length at 0); any other decrease is rejected because the rows it implies overlap.
    nz = np.flatnonzero(a)
    head = a[: nz[-1] + 1] if nz.size else a[:0]
    if np.any(np.diff(head) < 0):
        raise ValueError(f"{name}: must be cumulative (non-decreasing, optionally followed by "
                         f"zeros), got {a.tolist()}")
    lengths = np.diff(head, prepend=0)
    lengths = np.concatenate([lengths, np.zeros(a.shape[0] - head.shape[0], np.int64)])
    return a, np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def _tnd_sequences(g, actual_seq_qlen, actual_seq_kvlen):
    if actual_seq_qlen is None or actual_seq_kvlen is None:
        raise ValueError("actual_seq_qlen and actual_seq_kvlen: both are required with input_layout TND")
    raw_q, cu_q = _seq_list(actual_seq_qlen, "actual_seq_qlen")
    raw_k, cu_k = _seq_list(actual_seq_kvlen, "actual_seq_kvlen")
    if raw_q.shape[0] != raw_k.shape[0]:
        raise ValueError(f"actual_seq_kvlen: expected {raw_q.shape[0]} entries (as actual_seq_qlen), "
                         f"got {raw_k.shape[0]}")
    if cu_q[-1] > g.tq:
        raise ValueError(f"actual_seq_qlen: the sequences cover {cu_q[-1]} query tokens but query has "
                         f"T = {g.tq}")
    if cu_k[-1] > g.tk:
        raise ValueError(f"actual_seq_kvlen: the sequences cover {cu_k[-1]} key tokens but key has "
                         f"T = {g.tk}")
    lq, lk = np.diff(cu_q), np.diff(cu_k)
    bad = np.flatnonzero((lq > 0) & (lk == 0))
    if bad.size:
        raise ValueError(f"actual_seq_kvlen: batch {bad[0]} has {lq[bad[0]]} queries but no keys "
                         f"(not supported, as on the NPU)")
    g.b, g.cu_q, g.cu_k, g.lq, g.lk = raw_q.shape[0], cu_q, cu_k, lq, lk
    g.sq, g.sk = int(lq.max()), int(lk.max())
    # numels as torch_npu computes it from the raw lists (differences deliberately not clamped).
    dq, dk = np.diff(raw_q, prepend=0), np.diff(raw_k, prepend=0)
    g.numels = int(g.h * int(np.dot(dq, dk)))


# ---- options ------------------------------------------------------------------------------------

def _options(g, scale, keep_prob, pre_tockens, next_tockens, inner_precise, sparse_mode,
             gen_mask_parallel, sync, softmax_layout, padding_mask, scale_name="scale"):
    if padding_mask is not None:
        raise NotImplementedError("padding_mask: not supported (torch_npu documents it as reserved "
                                  "and unsupported); pass None and use atten_mask")
    o = dict(scale=V.to_float(scale, scale_name),
             keep_prob=V.to_float(keep_prob, "keep_prob"),
             pre=V.to_int(pre_tockens, "pre_tockens"),
             next=V.to_int(next_tockens, "next_tockens"),
             inner_precise=V.to_int(inner_precise, "inner_precise"),
             mode=V.to_int(sparse_mode, "sparse_mode"))
    # Band sides beyond +-2**62 act like +-2**62 (sequence sizes are far smaller): keeps every
    # later comparison within int64, also inside NumPy.
    o["pre"], o["next"] = (min(max(o[key], -_TOCKEN_CLAMP), _TOCKEN_CLAMP) for key in ("pre", "next"))
    V.to_bool(gen_mask_parallel, "gen_mask_parallel")  # stream scheduling on the NPU: no effect here
    V.to_bool(sync, "sync")
    if not 0.0 < o["keep_prob"] <= 1.0:
        raise ValueError(f"keep_prob: expected a value in (0, 1], got {o['keep_prob']}")
    if o["inner_precise"] not in (0, 1, 2):
        raise ValueError(f"inner_precise: expected 0, 1 or 2, got {o['inner_precise']}")
    modes = _MODES[g.tnd]
    if o["mode"] not in modes:
        raise ValueError(f"sparse_mode: value must be in {list(modes)} for input_layout {g.layout}, "
                         f"got {o['mode']}")
    if not isinstance(softmax_layout, str):
        raise TypeError(f"softmax_layout: expected a str, got {type(softmax_layout).__name__}")
    if softmax_layout not in ("", "TND"):
        raise ValueError(f"softmax_layout: expected '' or 'TND', got {softmax_layout!r}")
    if softmax_layout == "TND" and not g.tnd:
        raise ValueError(f"softmax_layout: 'TND' requires input_layout TND, got {g.layout}")
    o["softmax_layout"] = softmax_layout
    return o


def _sink(sink, h):
    if sink is None:
        return None
    s = V.as_array(sink, "sink")
    if s.dtype.kind != "f":
        raise TypeError(f"sink: expected a float32 array, got dtype {s.dtype}")
    if s.shape != (h,):
        raise ValueError(f"sink: expected shape ({h},) (head_num), got {tuple(s.shape)}")
    return np.ascontiguousarray(s, dtype=np.float32)


# ---- bands: sparse_mode and pre/next_tockens --------------------------------------------------

def _bound(x, limit):
    """A band side as the kernel takes it: None when it reaches past every key, and clamped at
    -limit (already past every key on the other side), so any Python int stays int64-safe."""
    return None if x >= limit else max(int(x), -limit)


class _Band:
    """Visible keys of row i: [diag - left, diag + right] with diag = i (+ sk - sq if anchor_br),
    sides None = open (fa_row_band in csrc/fa_seq.h)."""

    def __init__(self, left=None, right=None, anchor_br=False):
        self.left, self.right, self.anchor_br = left, right, anchor_br

    def key(self):
        return (self.left, self.right, self.anchor_br)


def _check_tockens(pre, nxt, sq, sk, mode):
    """torch_npu's band checks (spec section 4, mode 0 details; SparseBandModeCheck)."""
    if pre < 0 and nxt < 0:
        raise ValueError(f"pre_tockens/next_tockens: both are negative ({pre}, {nxt}); at most one "
                         f"may be")
    if nxt < 0 and (pre < -nxt or (mode == 0 and -nxt >= sk)):
        raise ValueError(f"next_tockens: {nxt} < 0 requires pre_tockens >= {-nxt}"
                         + (f" and |next_tockens| < {sk} (the key length)" if mode == 0 else "")
                         + f", got pre_tockens = {pre}")
    if pre < 0 and (nxt < -pre or (mode == 0 and -pre >= sq)):
        raise ValueError(f"pre_tockens: {pre} < 0 requires next_tockens >= {-pre}"
                         + (f" and |pre_tockens| < {sq} (the query length)" if mode == 0 else "")
                         + f", got next_tockens = {nxt}")


def _fixed_band(o, g):
    """Band, prefix use and automatic invalid-line mode of a BSH/SBH/BSND/BNSD call with a mask."""
    mode, pre, nxt, sq, sk = o["mode"], o["pre"], o["next"], g.sq, g.sk
    lim = sq + sk
    if mode == 0:
        _check_tockens(pre, nxt, sq, sk, mode)
        # TILING EnableBandInvalidLineImplMode (left-up coordinates).
        return _Band(_bound(pre, lim), _bound(nxt, lim), False), pre < sq - sk or nxt < 0
    if mode == 1:
        return _Band(), False
    if mode == 2:
        return _Band(None, 0, False), False
    if mode == 3:
        return _Band(None, 0, True), sq > sk
    if mode == 4:
        _check_tockens(pre, nxt, sq, sk, mode)
        band = _Band(_bound(pre, lim), _bound(nxt, lim), True)
        if not _band_rows(band, sq, sk).any():
            raise ValueError(f"pre_tockens/next_tockens: the band ({pre}, {nxt}) of sparse_mode 4 "
                             f"contains no key of the {sq} x {sk} score matrix (no valid data block)")
        # The LU conversion pre' = pre + sq - sk, next' = next + sk - sq, then the mode 0 rule.
        return band, pre < 0 or nxt < sq - sk
    return _Band(None, 0, True), False  # modes 5, 6: right-down causal plus prefix


def _band_rows(band, sq, sk):
    """Which rows of a sq x sk matrix see at least one key (used for validation only: O(sq))."""
    i = np.arange(sq)
    diag = i + (sk - sq if band.anchor_br else 0)
    lo = np.zeros(sq, np.int64) if band.left is None else np.maximum(diag - band.left, 0)
    hi = np.full(sq, sk) if band.right is None else np.minimum(diag + band.right + 1, sk)
    return lo < hi


def _tnd_bands(o, g):
    """Per-batch bands of a TND call with a mask; torch_npu's varlen checks (TILING
    CheckPretokenAndNexttoken): configurations that would leave a row with no key are errors."""
    mode, pre, nxt = o["mode"], o["pre"], o["next"]
    lq, lk, b = g.lq, g.lk, g.b
    lim = g.sq + g.sk
    live = np.flatnonzero(lq > 0)
    bands = [_Band() for _ in range(b)]
    if mode == 0:
        if nxt < 0:
            raise ValueError(f"next_tockens: must be >= 0 with input_layout TND and sparse_mode 0, got {nxt}")
        bad = live[lk[live] + pre < lq[live]]
        if bad.size:
            raise ValueError(f"pre_tockens: {pre} leaves rows of batch {bad[0]} (Sq={lq[bad[0]]}, "
                             f"Skv={lk[bad[0]]}) without keys; TND requires Skv + pre_tockens >= Sq")
        bands = [_Band(_bound(pre, lim), _bound(nxt, lim), False) for _ in range(b)]
    elif mode == 2:
        bands = [_Band(None, 0, False) for _ in range(b)]
    elif mode in (3, 6, 7):
        bad = live[lq[live] > lk[live]] if mode != 6 else live[:0]
        if bad.size:
            raise ValueError(f"actual_seq_qlen: batch {bad[0]} has Sq={lq[bad[0]]} > Skv={lk[bad[0]]}, "
                             f"which sparse_mode {mode} (right-down causal) does not allow with TND")
        bands = [_Band(None, 0, True) for _ in range(b)]
        if mode == 7 and live.size:
            bi = live[-1]  # the last batch with queries carries the band
            if nxt > 0:
                raise ValueError(f"next_tockens: must be <= 0 with sparse_mode 7, got {nxt}")
            if pre < lk[bi]:
                raise ValueError(f"pre_tockens: must be >= {lk[bi]} (Skv of the last batch) with "
                                 f"sparse_mode 7, got {pre}")
            if lq[bi] - nxt > lk[bi]:
                raise ValueError(f"next_tockens: {nxt} leaves rows of batch {bi} without keys "
                                 f"(Sq - next_tockens > Skv)")
            bands[bi] = _Band(None, nxt, True)
    elif mode == 4:
        if pre < 0:
            raise ValueError(f"pre_tockens: must be >= 0 with input_layout TND and sparse_mode 4, got {pre}")
        if nxt < 0 and pre + nxt < 0:
            raise ValueError(f"pre_tockens/next_tockens: ({pre}, {nxt}) is an empty band")
        bad = live[lq[live] - nxt > lk[live]]
        if bad.size:
            raise ValueError(f"next_tockens: {nxt} leaves rows of batch {bad[0]} without keys "
                             f"(Sq={lq[bad[0]]} - next_tockens > Skv={lk[bad[0]]})")
        bands = [_Band(_bound(pre, lim), _bound(nxt, lim), True) for _ in range(b)]
    elif mode == 8:
        bands = [_Band(None, 0, False) for _ in range(b)]
        if live.size:
            bi = live[0]  # the first batch with queries carries the band
            if pre < lk[bi]:
                raise ValueError(f"pre_tockens: must be >= {lk[bi]} (Skv of the first batch) with "
                                 f"sparse_mode 8, got {pre}")
            right = int(lk[bi] - max(lq[bi] - nxt, 0))  # left-up: j - i <= Skv - max(Sq - next, 0)
            if right < 0:
                raise ValueError(f"next_tockens: {nxt} leaves rows of batch {bi} without keys")
            bands[bi] = _Band(None, _bound(right, lim), False)
    return bands


def _prefix(prefix, g, mode):
    if prefix is None:
        raise ValueError(f"prefix: required with sparse_mode {mode} (one entry per batch)")
    p = _seq_like(prefix, "prefix")
    if p.shape[0] != g.b:
        raise ValueError(f"prefix: expected {g.b} entries (the batch size), got {p.shape[0]}")
    lq = g.lq if g.tnd else np.full(g.b, g.sq)
    lk = g.lk if g.tnd else np.full(g.b, g.sk)
    lo = np.where(lq > lk, 0, lk - lq)
    bad = np.flatnonzero((p < lo) | (p > lk))
    if bad.size:
        i = bad[0]
        raise ValueError(f"prefix: entry {i} = {p[i]} is outside [{lo[i]}, {lk[i]}] (Sq={lq[i]}, "
                         f"Skv={lk[i]})")
    return p


def _seq_like(x, name):
    a = V.as_array(x, name)
    if a.dtype.kind not in "iu" or a.ndim != 1:
        raise TypeError(f"{name}: expected a 1-D list of integers, got {a.dtype} of shape {tuple(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.int64)


# ---- atten_mask ---------------------------------------------------------------------------------

def _mask_array(atten_mask):
    m = V.as_array(atten_mask, "atten_mask")
    if m.dtype not in (np.bool_, np.uint8):
        raise TypeError(f"atten_mask: expected dtype bool or uint8, got {m.dtype}")
    if m.ndim not in (2, 4):
        raise ValueError(f"atten_mask: expected 2 or 4 dims, got shape {tuple(m.shape)}")
    return m


def _check_compressed(m, mode):
    want = _PREFIX_COMPRESSED if mode == 6 else _COMPRESSED
    if tuple(m.shape) != want:
        raise ValueError(f"atten_mask: sparse_mode {mode} expects the compressed mask of shape "
                         f"[{want[0]}, {want[1]}] (its pattern comes from the mode), got "
                         f"{list(m.shape)}")


def _fixed_mask(m, g, mode):
    """A full mask as a (B, Nq, Sq, Skv) broadcast view."""
    b, n, sq, sk = g.b, g.h, g.sq, g.sk
    shapes = [(b, n, sq, sk), (b, 1, sq, sk), (1, 1, sq, sk), (sq, sk)]
    if mode == 5 and b != 1:
        shapes = shapes[:2]
    if tuple(m.shape) not in shapes:
        listed = ", ".join(str(list(s)) for s in dict.fromkeys(shapes))
        raise ValueError(f"atten_mask: sparse_mode {mode} expects one of the shapes {listed}, got "
                         f"{list(m.shape)}")
    m4 = m if m.ndim == 4 else m[None, None]
    return np.broadcast_to(m4, (b, n, sq, sk))


def _tnd_mask(m, g):
    """A TND full mask: ('window', view) when every batch uses its top-left [Sq_b, Skv_b] corner
    of a [>= maxSq, >= maxSkv] mask, ('block', m) for the block-diagonal [sum Sq, sum Skv] form."""
    if m.ndim != 2:
        raise ValueError(f"atten_mask: input_layout TND expects a 2-D mask, got shape {tuple(m.shape)}")
    shape = tuple(m.shape)
    if g.b > 1 and shape in ((g.tq, g.tk), (int(g.cu_q[-1]), int(g.cu_k[-1]))):
        return "block", m
    if shape[0] < g.sq or shape[1] < g.sk:
        raise ValueError(f"atten_mask: input_layout TND expects [maxSq, maxSkv] = [{g.sq}, {g.sk}] "
                         f"(or the block-diagonal [{g.cu_q[-1]}, {g.cu_k[-1]}]), got {list(shape)}")
    return "window", np.broadcast_to(m[None, None], (1, g.h) + shape)


# ---- pse ----------------------------------------------------------------------------------------

def _alibi_toeplitz(last, rows, cols):
    """The alibi-compressed pse as a (P0, N, rows, cols) view of an O(S) buffer.

    last: (P0, N, C), the last row of the original C x C Toeplitz pse, so pse[i, j] = f(j - i) with
    f(t) = last[t + C - 1] for t <= 0. The NPU adds the compressed pse only on and below the
    diagonal (NeedPseAlibiCompute), so f(t > 0) = 0. Element (i, j) reads buf[C - 1 + j - i]:
    row stride -1, column stride +1, every index inside buf (rows <= C).
    """
    p0, n, c = last.shape
    buf = np.zeros((p0, n, c + cols - 1), dtype=last.dtype)
    buf[:, :, :c] = last
    s0, s1, s2 = buf.strides
    return np.lib.stride_tricks.as_strided(buf[:, :, c - 1:], shape=(p0, n, rows, cols),
                                           strides=(s0, s1, -s2, s2), writeable=False)


def _pse_array(pse, g, dtype):
    p = V.as_array(pse, "pse")
    if p.dtype != dtype:
        raise TypeError(f"pse: expected dtype {dtype} (the dtype of query), got {p.dtype}")
    if p.ndim != 4:
        raise ValueError(f"pse: expected 4 dims (B or 1, N, rows, Skv), got shape {tuple(p.shape)}")
    if p.shape[0] not in (1, g.b) or p.shape[1] != g.h:
        raise ValueError(f"pse: expected dims 0-1 of ({g.b} or 1, {g.h}) (batch, query heads), got "
                         f"{tuple(p.shape)}")
    return p


def _fixed_pse(pse, g, dtype):
    """pse as a (B, Nq, Sq, Skv) view: full, row-broadcast, or alibi-compressed (Toeplitz)."""
    p = _pse_array(pse, g, dtype)
    b, n, sq, sk = g.b, g.h, g.sq, g.sk
    rows, cols = p.shape[2], p.shape[3]
    if cols == sk and rows in (sq, 1):
        return np.broadcast_to(p, (b, n, sq, sk))
    if cols == sk and rows == _ALIBI_ROWS and sq > _ALIBI_ROWS:
        if sq != sk:
            raise ValueError(f"pse: the alibi-compressed [.., {_ALIBI_ROWS}, Skv] form requires Sq == Skv, "
                             f"got Sq={sq}, Skv={sk}")
        return np.broadcast_to(_alibi_toeplitz(p[:, :, -1, :], sq, sk), (b, n, sq, sk))
    raise ValueError(f"pse: expected shape [{b} or 1, {n}, S, {sk}] with S = {sq} (Sq) or 1"
                     + (f" or {_ALIBI_ROWS} (alibi-compressed)" if sq > _ALIBI_ROWS else "")
                     + f", got {list(p.shape)}")


def _tnd_pse(pse, g, dtype, mode):
    """TND pse: only the alibi-compressed [B or 1, N, 1024, C >= maxSkv] form (as the NPU
    documents). Returns (per_batch, buffer view (P0, N, maxSq, maxSkv))."""
    if mode in (7, 8):
        raise ValueError(f"pse: not allowed with sparse_mode {mode}")
    p = _pse_array(pse, g, dtype)
    if p.shape[2] != _ALIBI_ROWS or p.shape[3] < g.sk:
        raise ValueError(f"pse: input_layout TND accepts only the alibi-compressed shape "
                         f"[{g.b} or 1, {g.h}, {_ALIBI_ROWS}, >= {g.sk}], got {list(p.shape)}")
    if np.any(g.lq == 0):
        raise ValueError("pse: not allowed when a batch has no queries (a 0-length entry in "
                         "actual_seq_qlen)")
    if np.any(g.lq != g.lk):
        raise ValueError("pse: the alibi-compressed form requires Sq == Skv in every batch")
    return p.shape[0] > 1, _alibi_toeplitz(p[:, :, -1, :], g.sq, g.sk)


# ---- the call -----------------------------------------------------------------------------------

def _pad_head_dim(a, d):
    """The kernel shares one head dim between K and V: Dv < Dk runs on V (and, in the backward,
    dy and attention_in) zero-padded to Dk -- exact: the extra columns are zero and add 0 to every
    product. The only copies the NPU front-ends make of their inputs."""
    if a.shape[-1] == d:
        return a
    out = np.zeros(a.shape[:-1] + (d,), a.dtype)
    out[..., : a.shape[-1]] = a
    return out


def _layout_array(g, rows, n, dtype, zeroed=False):
    """An output of `rows` rows and n heads of head dim Dk in the call's layout order
    (C-contiguous, 4-D with N and D split for BSH/SBH) and the kernel's view of it. zeroed:
    start from 0 (rows no kernel call writes stay 0) instead of an uninitialised buffer."""
    shape = {"TND": (rows, n, g.d), "BNSD": (g.b, n, rows, g.d),
             "SBH": (rows, g.b, n, g.d)}.get(g.layout, (g.b, rows, n, g.d))
    a = np.zeros(shape, dtype) if zeroed else empty(shape, dtype)
    return a, kernel_view(a, g.layout)


def _finish(a, g, n, d):
    """Drop the head-dim padding (to d) and merge N, D for BSH/SBH."""
    if a.shape[-1] != d:
        a = np.ascontiguousarray(a[..., :d])
    if g.layout in ("BSH", "SBH"):
        a = a.reshape(a.shape[:2] + (n * d,))
    return a


def _ntd_block(flat, g, bi):
    """Batch bi's [N, Sq_b, 8] block of TND statistics in torch_npu's default "NTD" order: the
    per-batch blocks back to back in the flat buffer (MindSpeed flatten_softmax)."""
    qa, qb = int(g.cu_q[bi]), int(g.cu_q[bi + 1])
    return flat[8 * g.h * qa: 8 * g.h * qb].reshape(g.h, qb - qa, 8)


def _invalid_stats(rmax, rsum):
    """Rows whose band holds no key report the NPU's invalid-line statistics (max -FLT_MAX, sum
    FLT_MAX, as AdjustSoftMaxRes writes them) rather than the kernel's (-inf, 0): a backward or a
    merge computing exp(S - max) / sum then gets 0 for them, never NaN. The kernel's sum is
    exactly 0 only for such rows (a visible key contributes exp(0) = 1)."""
    empty_rows = rsum == 0
    np.copyto(rmax, -FLT_MAX, where=empty_rows)
    np.copyto(rsum, FLT_MAX, where=empty_rows)


def _tnd_groups(g, bands, per_batch):
    """Runs of consecutive batches that one kernel call can serve: same band and, unless some
    operand is addressed per batch (block-diagonal mask, per-batch pse), as long as possible.
    Batches without queries are skipped."""
    groups = []
    for bi in range(g.b):
        if g.lq[bi] == 0:
            continue
        if groups and not per_batch and groups[-1][2] == bands[bi].key():
            groups[-1][1] = bi + 1  # batches without queries in between cost nothing
        else:
            groups.append([bi, bi + 1, bands[bi].key()])
    return [(b0, b1, bands[b0]) for b0, b1, _ in groups]


class _Call:
    """One kernel call: the packed query and key rows it covers ((start, stop), None: all of a
    fixed-length call), its batches [b0, b1) (TND), and its band/mask/pse/prefix/cu keywords for
    _core.forward and _core.backward."""

    def __init__(self, q_rows, k_rows, batches, kw):
        self.q_rows, self.k_rows, self.batches, self.kw = q_rows, k_rows, batches, kw


class _Plan:
    """A validated call as kernel work: the geometry, the options every kernel call shares, and
    the calls themselves. The backward front-end (npu_grad) replays the same calls on the same
    slices, so it sees exactly the forward's bands, masks, pse views and invalid-line switch."""

    def __init__(self, g, o, calls, invalid, sink):
        self.g, self.o, self.calls = g, o, calls
        self.invalid, self.sink = invalid, sink

    def common(self, seed, offset):
        return dict(scale=self.o["scale"], dropout_p=1.0 - self.o["keep_prob"], seed=seed,
                    offset=offset, mask_fill=-FLT_MAX, invalid_line_zero=self.invalid,
                    sink=self.sink)


def _fixed_calls(band, mask, prefix, pse):
    return [_Call(None, None, None, dict(left=band.left, right=band.right,
                                         anchor_br=band.anchor_br, mask=mask, prefix=prefix,
                                         pse=pse))]


def _tnd_calls(g, bands, mask, prefix, pse):
    mask_kind, mask_arr = mask if mask is not None else (None, None)
    pse_per_batch, pse_buf = pse if pse is not None else (False, None)
    calls = []
    for b0, b1, band in _tnd_groups(g, bands, mask_kind == "block" or pse_per_batch):
        # One varlen call for batches [b0, b1): the cumulative lists keep b0 leading empty
        # sequences, so the kernel's batch index (dropout keying, prefix) stays the global one.
        qa, qb = int(g.cu_q[b0]), int(g.cu_q[b1])
        ka, kb = int(g.cu_k[b0]), int(g.cu_k[b1])
        m = mask_arr
        if mask_kind == "block":
            m = np.broadcast_to(mask_arr[qa:qb, ka:kb][None, None], (1, g.h, qb - qa, kb - ka))
        p = pse_buf[b0:b0 + 1] if pse_per_batch else pse_buf
        calls.append(_Call((qa, qb), (ka, kb), (b0, b1), dict(
            varlen=True, cu_q=np.concatenate([np.zeros(b0, np.int64), g.cu_q[b0:b1 + 1] - qa]),
            cu_k=np.concatenate([np.zeros(b0, np.int64), g.cu_k[b0:b1 + 1] - ka]),
            left=band.left, right=band.right, anchor_br=band.anchor_br, mask=m, pse=p,
            prefix=prefix[:b1] if prefix is not None else None)))
    return calls


def _translate(g, o, atten_mask, prefix, pse):
    """atten_mask, sparse_mode, tockens, prefix and pse as kernel calls, plus the invalid-line
    switch (explicit, or switched on as torch_npu's tiling does)."""
    mode = o["mode"]
    invalid = o["inner_precise"] == 2
    prefix_arr = mask = None
    band, bands = _Band(), [_Band() for _ in range(g.b)]
    if atten_mask is not None:  # without a mask torch_npu ignores sparse_mode and the tockens
        m = _mask_array(atten_mask)
        if mode in _FULL_MASK_MODES:
            mask = _tnd_mask(m, g) if g.tnd else _fixed_mask(m, g, mode)
        else:
            _check_compressed(m, mode)
        if mode in (5, 6):
            prefix_arr = _prefix(prefix, g, mode)
        if g.tnd:
            bands = _tnd_bands(o, g)
        else:
            band, auto_invalid = _fixed_band(o, g)
            invalid = invalid or auto_invalid
    pse_view = None
    if pse is not None:
        pse_view = _tnd_pse(pse, g, g.q.dtype, mode if atten_mask is not None else 0) if g.tnd \
            else _fixed_pse(pse, g, g.q.dtype)
    calls = _tnd_calls(g, bands, mask, prefix_arr, pse_view) if g.tnd else \
        _fixed_calls(band, mask, prefix_arr, pse_view)
    return calls, invalid


def _plan(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
          keep_prob, pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen,
          actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, softmax_layout, sink,
          scale_name="scale"):
    """Every check of npu_fusion_attention, in torch_npu's order, and its translation into kernel
    calls. Nothing is computed and no output is allocated here."""
    g = _geometry(query, key, value, head_num, input_layout)
    if g.tnd:
        _tnd_sequences(g, actual_seq_qlen, actual_seq_kvlen)
    elif actual_seq_qlen is not None or actual_seq_kvlen is not None:
        raise ValueError(f"actual_seq_qlen/actual_seq_kvlen: only valid with input_layout TND, got "
                         f"{g.layout}")
    else:
        g.numels = g.b * g.h * g.sq * g.sk
    o = _options(g, scale, keep_prob, pre_tockens, next_tockens, inner_precise, sparse_mode,
                 gen_mask_parallel, sync, softmax_layout, padding_mask, scale_name)
    sink_arr = _sink(sink, g.h)
    calls, invalid = _translate(g, o, atten_mask, prefix, pse)
    return _Plan(g, o, calls, invalid, sink_arr)


def _run_fixed(plan, common, acc):
    g = plan.g
    out, out_k = _layout_array(g, g.sq, g.h, g.q.dtype)
    smax = empty((g.b, g.h, g.sq, 8), acc)
    ssum = empty((g.b, g.h, g.sq, 8), acc)
    call, = plan.calls
    forward(g.q, g.k, _pad_head_dim(g.v, g.d), out=out_k, rowmax=smax[..., 0],
            rowsum=ssum[..., 0], **call.kw, **common)
    _invalid_stats(smax[..., 0], ssum[..., 0])
    smax[..., 1:] = smax[..., :1]  # torch_npu broadcasts the statistic to 8 lanes
    ssum[..., 1:] = ssum[..., :1]
    return _finish(out, g, g.h, g.dv), smax, ssum


def _run_tnd(plan, common, acc):
    g = plan.g
    out, _ = _layout_array(g, g.tq, g.h, g.q.dtype)
    total = int(g.cu_q[-1])
    out[total:] = 0  # rows past the sequences: the NPU leaves them unwritten, we zero them
    stats = np.zeros((2, g.h, g.tq), acc)
    vk = _pad_head_dim(g.v, g.d)
    for c in plan.calls:
        (qa, qb), (ka, kb) = c.q_rows, c.k_rows
        forward(g.q[qa:qb], g.k[ka:kb], vk[ka:kb], out=out[qa:qb],
                rowmax=stats[0][None, :, qa:qb], rowsum=stats[1][None, :, qa:qb], **c.kw,
                **common)
    _invalid_stats(stats[0][:, :total], stats[1][:, :total])
    smax = np.zeros((g.tq, g.h, 8), acc)
    ssum = np.zeros((g.tq, g.h, 8), acc)
    if plan.o["softmax_layout"] == "TND":
        smax[...] = stats[0].T[:, :, None]
        ssum[...] = stats[1].T[:, :, None]
    else:  # torch_npu's default "NTD" blocks, returned in a [T, N, 8]-shaped array
        for bi in range(g.b):
            qa, qb = int(g.cu_q[bi]), int(g.cu_q[bi + 1])
            _ntd_block(smax.reshape(-1), g, bi)[...] = stats[0][:, qa:qb, None]
            _ntd_block(ssum.reshape(-1), g, bi)[...] = stats[1][:, qa:qb, None]
    return _finish(out, g, g.h, g.dv), smax, ssum


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=INT32_MAX,
                         next_tockens=INT32_MAX, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None):
    """torch_npu.npu_fusion_attention on NumPy arrays.

    out = softmax(scale * (query . key^T + pse), masked) . value, with

    - input_layout BSH [B,S,N*D], SBH [S,B,N*D], BSND [B,S,N,D], BNSD [B,N,S,D] or TND [T,N,D]
      (varlen, with actual_seq_qlen/actual_seq_kvlen: cumulative ends without a leading 0, e.g.
      [2, 4, 6]); query has head_num heads, key/value any divisor of it (GQA: query head h uses kv
      head h // (head_num // Nkv)); value's head dim may be smaller than key's.
    - scale defaults to 1.0 and multiplies (q.k + pse). pse: [B or 1, N, Sq, Skv], [B or 1, N, 1,
      Skv], or the alibi-compressed [B or 1, N, 1024, Skv] (Sq == Skv > 1024; TND: the only form).
    - atten_mask bool/uint8, True/1 = masked (score -FLT_MAX). sparse_mode 0 (mask plus left-up band
      -pre_tockens <= j - i <= next_tockens), 1 (mask only), 2/3 (left-up / right-down causal), 4
      (right-down band), 5/6 (right-down causal or j < prefix[b]), 7/8 (TND causal variants with a
      band on the last / first batch). Modes 2-4 and 6-8 take the compressed [2048, 2048] mask
      ([3072, 2048] for mode 6) and generate the pattern from the mode; atten_mask=None means full
      attention whatever sparse_mode and tockens say.
    - A row whose scores are all masked averages value over its visible keys; with inner_precise=2,
      or where torch_npu enables it by itself (sparse_mode 3 with Sq > Skv, bands with
      pre_tockens < Sq - Skv or next_tockens < 0 in left-up coordinates), it gives 0 instead and
      softmax_sum FLT_MAX. Rows whose band holds no key give 0 (max -FLT_MAX, sum FLT_MAX).
    - sink (head_num,) float32: one extra unscaled logit per head in the softmax denominator.
    - keep_prob < 1: dropout; kept probabilities are scaled by 1 / keep_prob.

    Returns (attention_out in the input layout, softmax_max, softmax_sum, softmax_out, seed, offset,
    numels). softmax_max/softmax_sum are float32 (float64 for float64 inputs) [B, N, Sq, 8] (TND
    [T, N, 8]: softmax_layout "TND" in token order, "" as per-batch [N, Sq_b, 8] blocks); the max is
    of the scaled scores, the sum of exp(score - max) before dropout, all 8 lanes equal.
    softmax_out is an empty array. numels = B*N*Sq*Skv (TND: torch_npu's formula on the raw lists).

    Dropout reproducibility: with keep_prob < 1, (seed, offset) is drawn from the global generator
    (flash_attn_c.manual_seed) and element (b, h, i, j), i and j within batch b's sequences, is kept
    iff Philox-4x32-10 keyed by (seed, offset, b * head_num + h, i, j) clears 1 - keep_prob: the
    returned (seed, offset, numels) replays the same mask in npu_fusion_attention_grad. With
    keep_prob == 1, seed and offset are 0. gen_mask_parallel and sync are accepted and have no
    effect (they schedule mask generation on the NPU). padding_mask is unsupported, as on the NPU.
    """
    plan = _plan(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask, scale,
                 keep_prob, pre_tockens, next_tockens, inner_precise, prefix, actual_seq_qlen,
                 actual_seq_kvlen, sparse_mode, gen_mask_parallel, sync, softmax_layout, sink)
    g = plan.g
    acc = np.float64 if g.q.dtype == np.float64 else np.float32
    seed, offset = _rng.next_state() if plan.o["keep_prob"] < 1.0 else (0, 0)
    run = _run_tnd if g.tnd else _run_fixed
    out, smax, ssum = run(plan, plan.common(seed, offset), acc)
    softmax_out = np.empty((0,), dtype=g.q.dtype)
    return out, smax, ssum, softmax_out, int(seed), int(offset), int(g.numels)


def npu_flash_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                        atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=INT32_MAX,
                        next_tockens=INT32_MAX, inner_precise=1, prefix=None,
                        actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                        gen_mask_parallel=True, sync=False, softmax_layout="", sink=None):
    """The legacy torch_npu (torch 1.11 builds) name: npu_fusion_attention with inner_precise=1
    by default (same numbers as 0). Its 6.0.0 signature ends at sync; softmax_layout and sink are
    accepted too (as flash_attn_c.reference does), so newer call sites also work."""
    return npu_fusion_attention(query, key, value, head_num, input_layout, pse, padding_mask,
                                atten_mask, scale, keep_prob, pre_tockens, next_tockens,
                                inner_precise, prefix, actual_seq_qlen, actual_seq_kvlen,
                                sparse_mode, gen_mask_parallel, sync, softmax_layout, sink)
