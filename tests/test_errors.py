"""Bad input raises a clear TypeError/ValueError naming the argument, before any work; nothing
crashes the interpreter (API.md section 8)."""
import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import _C

from conftest import BF16, randn

RNG = np.random.default_rng(0)
Q = randn(RNG, (2, 16, 4, 32), np.float32)
K = randn(RNG, (2, 20, 2, 32), np.float32)
V = randn(RNG, (2, 20, 2, 32), np.float32)


def call(**over):
    args = dict(q=Q, k=K, v=V)
    args.update(over)
    return fa.flash_attn_func(**args)


@pytest.mark.parametrize("over,exc,match", [
    (dict(q=Q[0]), ValueError, r"q: expected 4 dims \(batch, seqlen_q, nheads, headdim\), got shape \(16, 4, 32\)"),
    (dict(k=K[0]), ValueError, r"k: expected 4 dims"),
    (dict(v=V[:, :10]), ValueError, r"v: expected the shape of k"),
    (dict(k=K[:1], v=V[:1]), ValueError, r"k: expected batch 2"),
    (dict(k=K[..., :16], v=V[..., :16]), ValueError, r"k: expected head dim 32"),
    (dict(k=randn(RNG, (2, 20, 3, 32), np.float32), v=randn(RNG, (2, 20, 3, 32), np.float32)),
     ValueError, r"number of kv heads \(3\) must divide"),
    (dict(q=Q.astype(np.int32)), TypeError, r"q: expected dtype float32"),
    (dict(q=Q.astype(np.uint16)), TypeError, r"ml_dtypes.bfloat16, not uint16"),
    (dict(k=K.astype(np.float16)), TypeError, r"k: expected dtype float32 \(the dtype of q\), got float16"),
    (dict(v=V.astype(BF16)), TypeError, r"v: expected dtype float32"),
    (dict(q="not an array"), TypeError, r"q: "),
    (dict(q=None), TypeError, r"q: expected an array, got None"),
    (dict(q=np.zeros((2, 16, 4, 0), np.float32), k=np.zeros((2, 20, 2, 0), np.float32),
          v=np.zeros((2, 20, 2, 0), np.float32)), ValueError, r"head dim must be in \[1, 512\]"),
    (dict(q=np.zeros((1, 4, 1, 513), np.float32), k=np.zeros((1, 4, 1, 513), np.float32),
          v=np.zeros((1, 4, 1, 513), np.float32)), ValueError, r"head dim must be in \[1, 512\], got 513"),
    (dict(q=Q[:0], k=K[:0], v=V[:0]), ValueError, r"batch size must be positive"),
])
def test_shape_and_dtype_errors(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(dropout_p=1.0), ValueError, r"dropout_p: expected a probability in \[0, 1\), got 1.0"),
    (dict(dropout_p=-0.1), ValueError, r"dropout_p"),
    (dict(dropout_p="x"), TypeError, r"dropout_p: expected a real number"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p: expected a finite number"),
    (dict(softmax_scale=float("inf")), ValueError, r"softmax_scale: expected a finite number"),
    (dict(softmax_scale="x"), TypeError, r"softmax_scale"),
    (dict(window_size=(1,)), ValueError, r"window_size: expected 2 entries"),
    (dict(window_size=5), TypeError, r"window_size: expected a pair of integers"),
    (dict(window_size=(1.5, 2)), TypeError, r"window_size\[0\]: expected an integer"),
    (dict(softcap=-1.0), ValueError, r"softcap: expected >= 0"),
    (dict(alibi_slopes=np.ones(3, np.float32)), ValueError, r"alibi_slopes: expected shape \(4,\) or \(2, 4\)"),
    (dict(alibi_slopes=np.ones(4, np.int32)), TypeError, r"alibi_slopes: expected a float32 array"),
    (dict(causal="yes"), TypeError, r"causal: expected a bool"),
    (dict(return_attn_probs=None), TypeError, r"return_attn_probs: expected a bool"),
])
def test_option_errors(kw, exc, match):
    with pytest.raises(exc, match=match):
        fa.flash_attn_func(Q, K, V, **kw)


def test_packed_errors():
    with pytest.raises(ValueError, match=r"qkv: expected 5 dims"):
        fa.flash_attn_qkvpacked_func(Q)
    with pytest.raises(ValueError, match=r"qkv: expected size 3 in dim 2"):
        fa.flash_attn_qkvpacked_func(np.zeros((1, 4, 2, 2, 8), np.float32))
    with pytest.raises(ValueError, match=r"kv: expected size 2 in dim 2"):
        fa.flash_attn_kvpacked_func(Q, np.zeros((2, 20, 3, 2, 32), np.float32))


def _varlen_inputs():
    q = randn(RNG, (30, 4, 16), np.float32)
    k = randn(RNG, (40, 2, 16), np.float32)
    return q, k, k.copy(), np.array([0, 10, 30], np.int32), np.array([0, 25, 40], np.int32)


@pytest.mark.parametrize("over,exc,match", [
    (dict(cu_seqlens_q=np.array([0, 20, 10], np.int32)), ValueError, r"cu_seqlens_q: must be non-decreasing"),
    (dict(cu_seqlens_q=np.array([1, 10, 30], np.int32)), ValueError, r"cu_seqlens_q: must start at 0"),
    (dict(cu_seqlens_q=np.array([0, 10, 31], np.int32)), ValueError, r"cu_seqlens_q: last entry 31 exceeds the 30 rows"),
    (dict(cu_seqlens_k=np.array([0, 25, 400], np.int32)), ValueError, r"cu_seqlens_k: last entry 400"),
    (dict(cu_seqlens_k=np.array([0, 40], np.int32)), ValueError, r"cu_seqlens_k: expected 3 entries"),
    (dict(cu_seqlens_q=np.array([0.0, 10, 30])), TypeError, r"cu_seqlens_q: expected an int32 or int64 array"),
    (dict(cu_seqlens_q=np.array([0], np.int32)), ValueError, r"batch >= 1"),
    (dict(max_seqlen_q=5), ValueError, r"max_seqlen_q: 5 is smaller than the longest sequence \(20\)"),
    (dict(max_seqlen_k="a"), TypeError, r"max_seqlen_k: expected an integer"),
])
def test_varlen_errors(over, exc, match):
    q, k, v, cq, ck = _varlen_inputs()
    args = dict(q=q, k=k, v=v, cu_seqlens_q=cq, cu_seqlens_k=ck, max_seqlen_q=20, max_seqlen_k=25)
    args.update(over)
    with pytest.raises(exc, match=match):
        fa.flash_attn_varlen_func(**args)


def test_paged_errors():
    q, _, _, cq, _ = _varlen_inputs()
    kp = randn(RNG, (6, 16, 2, 16), np.float32)
    ck = np.array([0, 20, 40], np.int32)
    bt = np.array([[0, 1], [2, 6]], np.int32)  # 6 is out of range
    with pytest.raises(ValueError, match=r"block_table: entry 6 out of range for 6 blocks"):
        fa.flash_attn_varlen_func(q, kp, kp, cq, ck, 20, 20, block_table=bt)
    bt = np.array([[0, -1], [2, 3]], np.int32)
    with pytest.raises(ValueError, match=r"block_table: entries must be >= 0"):
        fa.flash_attn_varlen_func(q, kp, kp, cq, ck, 20, 20, block_table=bt)
    bt = np.array([[0], [2]], np.int32)  # capacity 16 < 20 keys
    with pytest.raises(ValueError, match=r"exceeds the paged capacity 16"):
        fa.flash_attn_varlen_func(q, kp, kp, cq, ck, 20, 20, block_table=bt)


def test_runtime_errors():
    with pytest.raises(ValueError, match=r"unknown kernel family 'neon'"):
        fa.set_isa("neon")
    with pytest.raises(ValueError, match=r"num_threads: expected an integer in \[1, 4096\], got 0"):
        fa.set_num_threads(0)
    with pytest.raises(TypeError, match=r"num_threads: expected an integer"):
        fa.set_num_threads(1.5)
    with pytest.raises(TypeError, match=r"seed: expected an integer"):
        fa.manual_seed("x")


def test_binding_rejects_inconsistent_views_without_crashing():
    """The C binding re-checks what the kernels rely on, even when called directly."""
    out = np.empty_like(Q)
    lse = np.empty((2, 4, 16), np.float32)
    with pytest.raises(ValueError, match=r"out: must have the shape of q"):
        _C.fwd(Q, K, V, out[:, :8], lse, scale=1.0)
    with pytest.raises(ValueError, match=r"lse: expected shape"):
        _C.fwd(Q, K, V, out, lse[:, :2], scale=1.0)
    with pytest.raises(ValueError, match=r"out: must be a writable array"):
        ro = np.empty_like(Q)
        ro.flags.writeable = False
        _C.fwd(Q, K, V, ro, lse, scale=1.0)
    with pytest.raises(ValueError, match=r"cu_seqlens_q: last entry"):
        _C.fwd(Q[:1], K[:1], V[:1], out[:1], None, scale=1.0, cu_q=np.array([0, 99], np.int64),
               cu_k=np.array([0, 5], np.int64))
    with pytest.raises(ValueError, match=r"k: sequence 0 needs key rows up to 30"):
        _C.fwd(Q, K, V, out, lse, scale=1.0, seqlen_k=np.array([30, 5], np.int64))
    with pytest.raises(ValueError, match=r"dropout_p: must be in \[0, 1\)"):
        _C.fwd(Q, K, V, out, lse, scale=1.0, dropout_p=1.5)
    with pytest.raises(TypeError, match=r"expected a numpy.ndarray"):
        _C.fwd([1], K, V, out, lse, scale=1.0)


def test_no_output_written_on_error():
    """Validation runs before allocation/work: a rejected call leaves user arrays untouched."""
    q = Q.copy()
    before = q.copy()
    with pytest.raises(ValueError):
        fa.flash_attn_func(q, K, V[:, :3])
    np.testing.assert_array_equal(q, before)
