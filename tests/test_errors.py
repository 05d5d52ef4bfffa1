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


def _i64(*x):
    return np.array(x, np.int64)


def _readonly(a):
    a = a.copy()
    a.flags.writeable = False
    return a


def _fwd(**over):
    """A direct _C.fwd call on the module's (2, 16, 4, 32) / (2, 20, 2, 32) problem."""
    args = dict(q=Q, k=K, v=V, out=np.empty_like(Q), lse=np.empty((2, 4, 16), np.float32), scale=1.0)
    args.update(over)
    return _C.fwd(**args)


def _fwd_varlen(**over):
    """Packed (1, 16, 4, 32) queries against packed (1, 20, 2, 32) keys, two sequences."""
    args = dict(q=Q[:1], k=K[:1], v=V[:1], out=np.empty_like(Q[:1]), lse=None, scale=1.0,
                cu_q=_i64(0, 6, 16), cu_k=_i64(0, 9, 20))
    args.update(over)
    return _C.fwd(**args)


def _paged(**over):
    """Six pages of 4 keys; each of the 2 sequences reads 5 pages (20 keys)."""
    kp = randn(RNG, (6, 4, 2, 32), np.float32)
    args = dict(k=kp, v=kp, block_table=_i64(0, 1, 2, 3, 4, 5, 4, 3, 2, 1).reshape(2, 5))
    args.update(over)
    return _fwd(**args)


# Each call is malformed in one way the Python layer would have caught; the binding must still
# raise a clear exception before any kernel runs (API.md section 8), never read or write out of
# bounds or crash.
@pytest.mark.parametrize("call,exc,match", [
    (lambda: _fwd_varlen(cu_q=_i64(0, -3, 16)), ValueError, r"cu_seqlens_q: must be non-decreasing"),
    (lambda: _fwd_varlen(cu_q=_i64(5, 6, 16)), ValueError, r"cu_seqlens_q: must start at 0"),
    (lambda: _fwd_varlen(cu_q=_i64(0, 6, 2**62)), ValueError, r"cu_seqlens_q: last entry 4611686018427387904 exceeds"),
    (lambda: _fwd_varlen(cu_k=_i64(0, 9, 2**62)), ValueError, r"cu_seqlens_k: last entry"),
    (lambda: _fwd_varlen(cu_k=_i64(0, -9, 20)), ValueError, r"cu_seqlens_k: must be non-decreasing"),
    (lambda: _fwd_varlen(cu_q=np.array([0, 6, 16], np.int32)), TypeError, r"cu_seqlens_q: expected dtype int64"),
    (lambda: _fwd_varlen(cu_k=_i64(0, 9)), ValueError, r"cu_seqlens_k: expected a contiguous array of length 3"),
    (lambda: _fwd_varlen(cu_k=_i64(0, 2, 9, 20, 20, 20)[::2]), ValueError, r"cu_seqlens_k: expected a contiguous"),
    (lambda: _fwd_varlen(cu_k=None), ValueError, r"cu_seqlens_k: required with cu_seqlens_q"),
    (lambda: _fwd_varlen(cu_q=_i64()), ValueError, r"cu_seqlens_q: needs at least one entry"),
    (lambda: _fwd(cu_k=_i64(0, 9, 20)), ValueError, r"cu_seqlens_k: given without cu_seqlens_q"),
    (lambda: _fwd_varlen(seqlen_k=_i64(30, 1)), ValueError, r"k: sequence 0 needs key rows up to 30 but only 20"),
    (lambda: _fwd(seqlen_k=_i64(3)), ValueError, r"seqlen_k: expected a contiguous array of length 2"),
    (lambda: _fwd(seqlen_k=_i64(3, -1)), ValueError, r"seqlen_k: entries must be >= 0"),
    (lambda: _fwd(k_start=_i64(0, -2)), ValueError, r"k_start: entries must be >= 0"),
    # Huge entries whose sums overflow int64 must not slip past the key-range check.
    (lambda: _fwd(k_start=_i64(2**63 - 1, 0)), ValueError, r"k: sequence 0 needs key rows up to"),
    (lambda: _fwd(k_start=_i64(5, 0), seqlen_k=_i64(2**63 - 3, 4)), ValueError, r"k: sequence 0 needs key rows"),
    (lambda: _fwd(k_start=_i64(2**63 - 1, 0), seqlen_k=_i64(2**63 - 1, 4)), ValueError, r"k: sequence 0 needs key rows"),
    (lambda: _fwd_varlen(seqlen_k=_i64(4, 2**63 - 1), cu_k=_i64(0, 9, 20)), ValueError, r"k: sequence 1 needs key rows"),
    (lambda: _fwd(k_batch_idx=_i64(0, 2)), ValueError, r"cache_batch_idx: entry 2 out of range \[0, 2\)"),
    (lambda: _fwd(k_batch_idx=_i64(-1, 0)), ValueError, r"cache_batch_idx: entry -1 out of range"),
    (lambda: _fwd(k_batch_idx=_i64(0, 1, 1)), ValueError, r"k_batch_idx: expected a contiguous array of length 2"),
    (lambda: _fwd(k=K[:1], v=V[:1]), ValueError, r"k: batch 1 differs from q's 2"),
    (lambda: _paged(block_table=_i64(0, 1, 2, 3, 4, 5, 6, 3, 2, 1).reshape(2, 5)), ValueError, r"block_table: entry 6 out of range \[0, 6\)"),
    (lambda: _paged(block_table=_i64(0, 1, 2, 3, 4, 5, -1, 3, 2, 1).reshape(2, 5)), ValueError, r"block_table: entry -1 out of range"),
    (lambda: _paged(block_table=_i64(0, 1, 2, 3, 4).reshape(1, 5)), ValueError, r"block_table: expected a contiguous \(2, max_blocks\)"),
    (lambda: _paged(block_table=np.zeros((2, 5), np.int32)), TypeError, r"block_table: expected dtype int64"),
    (lambda: _paged(block_table=np.zeros((2, 10), np.int64)[:, ::2]), ValueError, r"block_table: expected a contiguous"),
    (lambda: _paged(block_table=_i64(0, 1, 2, 3).reshape(2, 2), seqlen_k=_i64(20, 5)), ValueError, r"k: sequence 0 needs key rows up to 20 but only 8"),
    (lambda: _paged(k_batch_idx=_i64(0, 1)), ValueError, r"block_table: cannot be combined"),
    (lambda: _paged(k_start=_i64(2**63 - 1, 0)), ValueError, r"k: sequence 0 needs key rows up to"),
    # A zero-stride k with a huge page: pages * page keys would overflow int64.
    (lambda: _C.fwd(Q[:1, :, :1, :1].copy(), np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (1, 2**58, 1, 1)),
                    np.broadcast_to(np.zeros((1, 1, 1, 1), np.float32), (1, 2**58, 1, 1)),
                    np.empty((1, 16, 1, 1), np.float32), None, scale=1.0, block_table=np.zeros((1, 64), np.int64)),
     ValueError, r"block_table: 64 blocks of 288230376151711744 keys overflow"),
    (lambda: _fwd(lse=_readonly(np.empty((2, 4, 16), np.float32))), ValueError, r"lse: must be a writable array"),
    (lambda: _fwd(lse=np.empty((2, 4, 16), np.float64)), TypeError, r"lse: expected float32"),
    (lambda: _fwd_varlen(lse=np.empty((2, 4, 16), np.float32)), ValueError, r"lse: expected shape \(1, 4, 16\)"),
    (lambda: _fwd(rowmax=np.empty((2, 4, 16), np.float32)), ValueError, r"rowmax and rowsum: give both or neither"),
    (lambda: _fwd(rowmax=np.empty((2, 4, 16), np.float32), rowsum=_readonly(np.empty((2, 4, 16), np.float32))),
     ValueError, r"rowsum: must be a writable array"),
    (lambda: _fwd(rowmax=np.empty((2, 4, 16), np.float32), rowsum=np.empty((2, 4, 15), np.float32)),
     ValueError, r"rowsum: expected shape \(2, 4, 16\)"),
    (lambda: _fwd(rowmax=np.empty((2, 4, 16), np.float32), rowsum=np.empty((2, 16, 4), np.float32).transpose(0, 2, 1)),
     ValueError, r"rowmax and rowsum: must have the same strides"),
    (lambda: _fwd(s_dmask=_readonly(np.empty((2, 4, 16, 20), np.float32))), ValueError, r"s_dmask: must be a writable array"),
    (lambda: _fwd(s_dmask=np.empty((2, 4, 16, 19), np.float32)), ValueError, r"s_dmask: expected \(broadcast\) shape"),
    (lambda: _fwd(s_dmask=np.empty((2, 4, 16, 40), np.float32)[..., ::2]), ValueError, r"s_dmask: the last dimension must be contiguous"),
    (lambda: _fwd(alibi=np.ones((2, 3), np.float32)), ValueError, r"alibi_slopes: expected \(broadcast\) shape \(2, 4\)"),
    (lambda: _fwd(alibi=np.ones((2, 4), np.float64)), TypeError, r"alibi_slopes: expected dtype float32"),
    (lambda: _fwd(sink=np.ones(3, np.float32)), ValueError, r"sink: expected a contiguous array of length 4"),
    (lambda: _fwd(pse=np.zeros((2, 4, 16, 19), np.float32)), ValueError, r"pse: expected \(broadcast\) shape"),
    (lambda: _fwd(pse=np.zeros((2, 4, 16, 20), np.int32)), TypeError, r"pse: expected a floating dtype"),
    (lambda: _fwd(mask=np.zeros((2, 4, 16, 20), np.float32)), TypeError, r"atten_mask: expected dtype bool or uint8"),
    (lambda: _fwd_varlen(mask=np.zeros((1, 4, 9, 11), np.uint8)), ValueError, r"atten_mask: expected \(broadcast\) shape \(1, 4, >=10, >=11\)"),
    (lambda: _fwd(out=np.empty(Q.shape, np.float64)), TypeError, r"out: expected dtype float32 \(the dtype of q\)"),
    (lambda: _fwd(q=Q[..., :31], out=np.empty_like(Q[..., :31])), ValueError, r"k: head dim 32 differs from q's 31"),
    (lambda: _fwd(q=np.zeros((2, 16, 3, 32), np.float32), out=np.empty((2, 16, 3, 32), np.float32)),
     ValueError, r"k: 2 kv heads must divide the 3 query heads"),
    (lambda: _fwd(q=np.zeros((2, 16, 4, 64), np.float32)[..., ::2], out=np.empty_like(Q)), ValueError, r"q: the last dimension must be contiguous"),
    (lambda: _fwd(q=np.ndarray((2, 16, 4, 32), np.float32, np.zeros(2**18, np.uint8), 0, (32770, 2050, 514, 4))),
     ValueError, r"q: stride 32770 of dim 0 is not a multiple of the item size 4"),
    (lambda: _fwd(left="x"), TypeError, r"integer"),
    (lambda: _fwd(dropout_p=float("nan")), ValueError, r"dropout_p: must be in \[0, 1\), got nan"),
])
def test_binding_rejects_malformed_fwd(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def _bwd_args(b=2, sq=6, sk=7):
    q = randn(RNG, (b, sq, 4, 8), np.float32)
    k = randn(RNG, (b, sk, 2, 8), np.float32)
    return dict(dout=q.copy(), q=q, k=k, v=k.copy(), out=q.copy(), dq=np.empty_like(q),
                dk=np.empty_like(k), dv=np.empty_like(k), scale=0.5,
                lse=np.zeros((b, 4, sq), np.float32))


def _bwd(**over):
    args = _bwd_args()
    args.update(over)
    return _C.bwd(**args)


def _bwd_varlen(**over):
    args = _bwd_args(b=1, sq=10, sk=12)
    args.update(lse=np.zeros((1, 4, 10), np.float32), cu_q=_i64(0, 4, 10), cu_k=_i64(0, 5, 12))
    args.update(over)
    return _C.bwd(**args)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: _bwd(dk=_readonly(np.empty((2, 7, 2, 8), np.float32))), ValueError, r"dk: must be a writable array"),
    (lambda: _bwd(dv=_readonly(np.empty((2, 7, 2, 8), np.float32))), ValueError, r"dv: must be a writable array"),
    (lambda: _bwd(dv=np.empty((2, 6, 2, 8), np.float32)), ValueError, r"dv: must have the shape of k"),
    (lambda: _bwd(dq=np.empty((2, 6, 4, 8), np.float64)), TypeError, r"dq: expected dtype float32"),
    (lambda: _bwd(dout=np.empty((2, 6, 4), np.float32)), ValueError, r"dout: expected 4 dims"),
    (lambda: _bwd(k=np.zeros((1, 7, 2, 8), np.float32), v=np.zeros((1, 7, 2, 8), np.float32),
                  dk=np.empty((1, 7, 2, 8), np.float32), dv=np.empty((1, 7, 2, 8), np.float32)),
     ValueError, r"k: batch 1 differs from q's 2"),
    (lambda: _bwd(lse=np.zeros((2, 4, 5), np.float32)), ValueError, r"lse: expected shape \(2, 4, 6\), got \(2, 4, 5\)"),
    (lambda: _bwd(lse=np.zeros((2, 4, 6), np.float64)), TypeError, r"lse: expected float32"),
    (lambda: _bwd(rowmax=np.zeros((2, 4, 6), np.float32), rowsum=np.ones((2, 4, 6), np.float32)),
     ValueError, r"softmax statistics: give lse, or both"),
    (lambda: _bwd(lse=None, rowmax=np.zeros((2, 4, 6), np.float32)), ValueError, r"softmax statistics"),
    (lambda: _bwd(lse=None, rowmax=np.zeros((2, 4, 6), np.float32), rowsum=np.ones((2, 6, 4), np.float32).transpose(0, 2, 1)),
     ValueError, r"rowmax and rowsum: must have the same strides"),
    (lambda: _bwd_varlen(cu_k=None), ValueError, r"cu_seqlens_k: required with cu_seqlens_q"),
    (lambda: _bwd(cu_k=_i64(0, 5, 7)), ValueError, r"cu_seqlens_k: given without cu_seqlens_q"),
    (lambda: _bwd_varlen(cu_q=_i64(0, -4, 10)), ValueError, r"cu_seqlens_q: must be non-decreasing"),
    (lambda: _bwd_varlen(cu_q=_i64(0, 4, 2**62)), ValueError, r"cu_seqlens_q: last entry"),
    (lambda: _bwd_varlen(cu_k=_i64(0, 5, 2**62)), ValueError, r"cu_seqlens_k: last entry"),
    (lambda: _bwd_varlen(cu_k=_i64(0, 5)), ValueError, r"cu_seqlens_k: expected a contiguous array of length 3"),
    (lambda: _bwd_varlen(prefix=_i64(1)), ValueError, r"prefix: expected a contiguous array of length 2"),
    (lambda: _bwd_varlen(k=randn(RNG, (2, 12, 2, 8), np.float32), v=np.zeros((2, 12, 2, 8), np.float32),
                         dk=np.empty((2, 12, 2, 8), np.float32), dv=np.empty((2, 12, 2, 8), np.float32)),
     ValueError, r"cu_seqlens_q: needs at least one entry and q, k of batch 1"),
    (lambda: _bwd(dpse=_readonly(np.zeros((2, 4, 6, 7), np.float32))), ValueError, r"dpse: must be a writable array"),
    (lambda: _bwd(dpse=np.zeros((2, 4, 6, 7), np.float64)), TypeError, r"dpse: expected float32"),
    (lambda: _bwd(dpse=np.zeros((2, 4, 3, 7), np.float32)), ValueError, r"dpse: expected shape \(2, 4, 1 or >=6, >=7\)"),
    (lambda: _bwd_varlen(pse=np.zeros((1, 4, 6, 6), np.float32)), ValueError, r"pse: expected \(broadcast\) shape \(1, 4, >=6, >=7\)"),
    (lambda: _bwd(sink=np.ones(4, np.float32)[::2]), ValueError, r"sink: expected a contiguous array of length 4"),
    (lambda: _bwd(alibi=np.ones((1, 4), np.float32)), ValueError, r"alibi_slopes: expected \(broadcast\) shape \(2, 4\)"),
    (lambda: _bwd(dropout_p=1.0), ValueError, r"dropout_p: must be in \[0, 1\), got 1$"),
])
def test_binding_rejects_malformed_bwd(call, exc, match):
    with pytest.raises(exc, match=match):
        call()
