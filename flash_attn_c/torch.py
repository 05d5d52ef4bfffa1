"""PyTorch drop-in (API.md section 5): flash-attn 2.8, torch_npu and SDPA on CPU tensors.

Importing this module imports torch; nothing else in flash_attn_c does. Every function here is an
adapter with no attention math: it checks that tensors are CPU tensors of a supported dtype, views
them as NumPy arrays sharing their memory (bfloat16 through an int16 view of the storage, since
NumPy has no bfloat16 of its own), calls the NumPy-level C-backed functions of flash_attn_c (SDPA,
which has no NumPy-level twin, calls the kernel funnel flash_attn_c._core with its mask as the
kernel's pse/mask views), and wraps the fresh result arrays as tensors (torch.from_numpy shares
their memory). The only copies are the ones the NumPy layer makes for a non-contiguous last
dimension, and the small ones of an SDPA attn_mask (negated or divided by the scale) before it
is broadcast.

Gradients come from the C backward kernels through torch.autograd.Function classes named as in
flash-attn (FlashAttnFunc, ...). Differences from flash-attn on CUDA, all deliberate:

- Dropout seeds come from torch's CPU generator, so torch.manual_seed makes a training run
  reproducible, and the forward's rng_state is saved so backward replays the same mask.
- softmax_lse and S_dmask are marked non-differentiable (flash-attn returns them from its
  Function and silently ignores their gradients; here a use that needs one fails loudly).
- S_dmask is returned whenever return_attn_probs=True (normalized probabilities, dropped entries
  negated, float32), as flash_attn_c's NumPy functions do.
"""
import importlib.machinery
import math
import sys
import types

import numpy as np
import torch
# The backward kernels are not themselves differentiable: a double backward must fail loudly.
from torch.autograd.function import once_differentiable

from . import _validate as V
from . import flash_attn_interface as _fa
from . import kvcache as _kvcache
from . import npu as _npu
from . import npu_grad as _npu_grad
from ._core import backward as _kernel_backward
from ._core import forward as _kernel_forward
from ._runtime import bfloat16 as _np_bfloat16

# install() reports this as flash_attn.__version__: the flash-attn release whose API is served.
FLASH_ATTN_VERSION = "2.8.3"

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


# ---- tensor <-> array, without copies ------------------------------------------------------------

def _check_tensor(t, name):
    """A clear error for anything the CPU kernels cannot read in place."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.device.type != "cpu":
        # TypeError, as for a wrong dtype: a CUDA tensor is another tensor type for a CPU library
        # (torch.cuda.FloatTensor vs torch.FloatTensor); moving it is the caller's decision.
        raise TypeError(f"{name}: expected a CPU tensor, got a tensor on {t.device} "
                        "(flash_attn_c runs on the CPU; move it with .cpu())")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout}")


def _array(t, name):
    """The NumPy view of a float CPU tensor: same memory, same strides, no copy."""
    _check_tensor(t, name)
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float32, float16, bfloat16 or float64, got {t.dtype}")
    t = t.detach()
    if t.dtype == torch.bfloat16:
        # Reinterpret the 2-byte storage: int16 has bfloat16's size, so view() keeps every stride,
        # and NumPy's view to ml_dtypes.bfloat16 is again a pure reinterpretation.
        return t.view(torch.int16).numpy().view(_np_bfloat16)
    return t.numpy()


def _index_array(t, name):
    """Integer tensors (cu_seqlens, block_table, cache_seqlens...) as NumPy views; other values
    (Python ints, lists, None) pass through for the NumPy layer to validate."""
    if not isinstance(t, torch.Tensor):
        return t
    _check_tensor(t, name)
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an int32 or int64 tensor, got {t.dtype}")
    return t.detach().numpy()


def _optional_array(t, name):
    return None if t is None else _array(t, name)


def _slopes(t):
    """alibi_slopes: a float32 tensor (flash-attn's rule), viewed as an array."""
    if t is None:
        return None
    _check_tensor(t, "alibi_slopes")
    if t.dtype != torch.float32:
        raise TypeError(f"alibi_slopes: expected a float32 tensor, got {t.dtype}")
    return t.detach().numpy()


def _tensor(a):
    """A result array as a tensor sharing its memory (the array stays alive through the tensor)."""
    if a is None:
        return None
    if a.dtype == _np_bfloat16:
        return torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(a)


def _seed():
    """A dropout seed from torch's default CPU generator, so torch.manual_seed governs dropout as it
    governs everything else in a torch training script."""
    return int(torch.empty((), dtype=torch.int64).random_())


def _seed_for(dropout_p):
    return _seed() if V.dropout(dropout_p) > 0 else None


def _rng_tensor(rng_state):
    return torch.from_numpy(rng_state)


def _outputs(ctx, out, lse, s_dmask, return_softmax):
    """The Function's outputs: out, or (out, lse, S_dmask) with the statistics non-differentiable."""
    out_t = _tensor(out)
    if not return_softmax:
        return out_t
    lse_t, sd_t = _tensor(lse), _tensor(s_dmask)
    ctx.mark_non_differentiable(lse_t, sd_t)
    return out_t, lse_t, sd_t


# ---- flash-attn: fixed length --------------------------------------------------------------------

def _fixed_forward(ctx, packed, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                   alibi_slopes, deterministic, return_softmax):
    """Forward for the three fixed-length Functions; packed is what backward's gradients are
    shaped like (q/k/v views are taken from it) and is saved with the results."""
    out, lse, s_dmask, rng_state = _fa._run_fixed(
        q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, _slopes(alibi_slopes),
        deterministic, return_softmax, seed=_seed_for(dropout_p))
    result = _outputs(ctx, out, lse, s_dmask, return_softmax)
    out_t = result[0] if return_softmax else result
    ctx.save_for_backward(*packed, out_t, _tensor(lse), _rng_tensor(rng_state), alibi_slopes)
    ctx.options = (dropout_p, softmax_scale, causal, window_size, softcap, deterministic)
    return result


def _fixed_backward(ctx, dout, split):
    """(dq, dk, dv) arrays from the saved tensors; split turns the saved inputs into q, k, v."""
    *inputs, out, lse, rng_state, alibi_slopes = ctx.saved_tensors
    q, k, v = split(*inputs)
    dropout_p, softmax_scale, causal, window_size, softcap, deterministic = ctx.options
    return _fa.flash_attn_bwd(_array(dout, "dout"), q, k, v, _array(out, "out"), lse.numpy(),
                              dropout_p, softmax_scale, causal, window_size, softcap,
                              _slopes(alibi_slopes), deterministic, rng_state.numpy())


def _qkv_views(qkv):
    a = _array(qkv, "qkv")
    V.check_ndim(a, "qkv", 5, "(batch, seqlen, 3, nheads, headdim)")
    if a.shape[2] != 3:
        raise ValueError(f"qkv: expected size 3 in dim 2, got shape {tuple(a.shape)}")
    return a[:, :, 0], a[:, :, 1], a[:, :, 2]


def _q_kv_views(q, kv):
    b = _array(kv, "kv")
    V.check_ndim(b, "kv", 5, "(batch, seqlen_k, 2, nheads_k, headdim)")
    if b.shape[2] != 2:
        raise ValueError(f"kv: expected size 2 in dim 2, got shape {tuple(b.shape)}")
    return _array(q, "q"), b[:, :, 0], b[:, :, 1]


def _q_k_v_views(q, k, v):
    return _array(q, "q"), _array(k, "k"), _array(v, "v")


class FlashAttnFunc(torch.autograd.Function):
    """flash_attn_func with gradients for q, k, v (k/v gradients summed over GQA groups)."""

    @staticmethod
    def forward(ctx, q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_softmax):
        return _fixed_forward(ctx, (q, k, v), *_q_k_v_views(q, k, v), dropout_p, softmax_scale,
                              causal, window_size, softcap, alibi_slopes, deterministic,
                              return_softmax)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *unused):
        dq, dk, dv = _fixed_backward(ctx, dout, _q_k_v_views)
        return (_tensor(dq), _tensor(dk), _tensor(dv)) + (None,) * 8


class FlashAttnQKVPackedFunc(torch.autograd.Function):
    """flash_attn_qkvpacked_func with the gradient dqkv (batch, seqlen, 3, nheads, headdim)."""

    @staticmethod
    def forward(ctx, qkv, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_softmax):
        return _fixed_forward(ctx, (qkv,), *_qkv_views(qkv), dropout_p, softmax_scale, causal,
                              window_size, softcap, alibi_slopes, deterministic, return_softmax)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *unused):
        dq, dk, dv = _fixed_backward(ctx, dout, _qkv_views)
        return (_tensor(np.stack((dq, dk, dv), axis=2)),) + (None,) * 8


class FlashAttnKVPackedFunc(torch.autograd.Function):
    """flash_attn_kvpacked_func with the gradients dq and dkv (batch, seqlen_k, 2, nheads_k, d)."""

    @staticmethod
    def forward(ctx, q, kv, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                deterministic, return_softmax):
        return _fixed_forward(ctx, (q, kv), *_q_kv_views(q, kv), dropout_p, softmax_scale, causal,
                              window_size, softcap, alibi_slopes, deterministic, return_softmax)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *unused):
        dq, dk, dv = _fixed_backward(ctx, dout, _q_kv_views)
        return (_tensor(dq), _tensor(np.stack((dk, dv), axis=2))) + (None,) * 8


# ---- flash-attn: variable length -----------------------------------------------------------------

def _varlen_forward(ctx, packed, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                    dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                    deterministic, return_softmax, block_table=None):
    cu_q = _index_array(cu_seqlens_q, "cu_seqlens_q")
    cu_k = _index_array(cu_seqlens_k, "cu_seqlens_k")
    out, lse, s_dmask, rng_state = _fa._run_varlen(
        q, k, v, cu_q, cu_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
        window_size, softcap, _slopes(alibi_slopes), deterministic, return_softmax,
        block_table=_index_array(block_table, "block_table"), seed=_seed_for(dropout_p))
    result = _outputs(ctx, out, lse, s_dmask, return_softmax)
    out_t = result[0] if return_softmax else result
    ctx.save_for_backward(*packed, out_t, _tensor(lse), _rng_tensor(rng_state), alibi_slopes)
    # cu_seqlens stay arrays on ctx: integer inputs autograd has nothing to track in.
    ctx.varlen = (cu_q, cu_k, max_seqlen_q, max_seqlen_k, block_table is not None)
    ctx.options = (dropout_p, softmax_scale, causal, window_size, softcap, deterministic)
    return result


def _varlen_backward(ctx, dout, split):
    """(dq, dk, dv) arrays for the varlen Functions."""
    cu_q, cu_k, max_seqlen_q, max_seqlen_k, paged = ctx.varlen
    if paged:
        raise RuntimeError("flash_attn_varlen_func: backward with block_table (paged K/V) is not "
                           "supported, as in flash-attn")
    *inputs, out, lse, rng_state, alibi_slopes = ctx.saved_tensors
    q, k, v = split(*inputs)
    dropout_p, softmax_scale, causal, window_size, softcap, deterministic = ctx.options
    return _fa.flash_attn_varlen_bwd(_array(dout, "dout"), q, k, v, _array(out, "out"),
                                     lse.numpy(), cu_q, cu_k, max_seqlen_q, max_seqlen_k,
                                     dropout_p, softmax_scale, causal, window_size, softcap,
                                     _slopes(alibi_slopes), deterministic, rng_state.numpy())


def _varlen_qkv_views(qkv):
    a = _array(qkv, "qkv")
    V.check_ndim(a, "qkv", 4, "(total, 3, nheads, headdim)")
    if a.shape[1] != 3:
        raise ValueError(f"qkv: expected size 3 in dim 1, got shape {tuple(a.shape)}")
    return a[:, 0], a[:, 1], a[:, 2]


def _varlen_q_kv_views(q, kv):
    b = _array(kv, "kv")
    V.check_ndim(b, "kv", 4, "(total_k, 2, nheads_k, headdim)")
    if b.shape[1] != 2:
        raise ValueError(f"kv: expected size 2 in dim 1, got shape {tuple(b.shape)}")
    return _array(q, "q"), b[:, 0], b[:, 1]


class FlashAttnVarlenFunc(torch.autograd.Function):
    """flash_attn_varlen_func with gradients for q, k, v (not with block_table, as flash-attn)."""

    @staticmethod
    def forward(ctx, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_softmax, block_table):
        return _varlen_forward(ctx, (q, k, v), *_q_k_v_views(q, k, v), cu_seqlens_q, cu_seqlens_k,
                               max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal,
                               window_size, softcap, alibi_slopes, deterministic, return_softmax,
                               block_table)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *unused):
        dq, dk, dv = _varlen_backward(ctx, dout, _q_k_v_views)
        return (_tensor(dq), _tensor(dk), _tensor(dv)) + (None,) * 13


class FlashAttnVarlenQKVPackedFunc(torch.autograd.Function):
    """flash_attn_varlen_qkvpacked_func with the gradient dqkv (total, 3, nheads, headdim)."""

    @staticmethod
    def forward(ctx, qkv, cu_seqlens, max_seqlen, dropout_p, softmax_scale, causal, window_size,
                softcap, alibi_slopes, deterministic, return_softmax):
        return _varlen_forward(ctx, (qkv,), *_varlen_qkv_views(qkv), cu_seqlens, cu_seqlens,
                               max_seqlen, max_seqlen, dropout_p, softmax_scale, causal,
                               window_size, softcap, alibi_slopes, deterministic, return_softmax)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *unused):
        dq, dk, dv = _varlen_backward(ctx, dout, _varlen_qkv_views)
        return (_tensor(np.stack((dq, dk, dv), axis=1)),) + (None,) * 10


class FlashAttnVarlenKVPackedFunc(torch.autograd.Function):
    """flash_attn_varlen_kvpacked_func with the gradients dq and dkv (total_k, 2, nheads_k, d)."""

    @staticmethod
    def forward(ctx, q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                return_softmax):
        return _varlen_forward(ctx, (q, kv), *_varlen_q_kv_views(q, kv), cu_seqlens_q,
                               cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale,
                               causal, window_size, softcap, alibi_slopes, deterministic,
                               return_softmax)

    @staticmethod
    @once_differentiable
    def backward(ctx, dout, *unused):
        dq, dk, dv = _varlen_backward(ctx, dout, _varlen_q_kv_views)
        return (_tensor(dq), _tensor(np.stack((dk, dv), axis=1))) + (None,) * 12


# ---- flash-attn public functions (flash_attn/flash_attn_interface.py signatures) -----------------

def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """flash_attn_c.flash_attn_func on CPU tensors (batch, seqlen, nheads, headdim), differentiable
    with respect to q, k and v. Returns out, or (out, softmax_lse, S_dmask) with
    return_attn_probs=True."""
    return FlashAttnFunc.apply(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                               alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """flash_attn_func on qkv (batch, seqlen, 3, nheads, headdim); the gradient is dqkv."""
    return FlashAttnQKVPackedFunc.apply(qkv, dropout_p, softmax_scale, causal, window_size,
                                        softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """flash_attn_func on q and kv (batch, seqlen_k, 2, nheads_k, headdim); gradients dq, dkv."""
    return FlashAttnKVPackedFunc.apply(q, kv, dropout_p, softmax_scale, causal, window_size,
                                       softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """flash_attn_c.flash_attn_varlen_func on CPU tensors (total, nheads, headdim) with int32
    cu_seqlens; differentiable with respect to q, k, v (except with block_table)."""
    return FlashAttnVarlenFunc.apply(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                     max_seqlen_k, dropout_p, softmax_scale, causal, window_size,
                                     softcap, alibi_slopes, deterministic, return_attn_probs,
                                     block_table)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """flash_attn_varlen_func on qkv (total, 3, nheads, headdim); the gradient is dqkv."""
    return FlashAttnVarlenQKVPackedFunc.apply(qkv, cu_seqlens, max_seqlen, dropout_p,
                                              softmax_scale, causal, window_size, softcap,
                                              alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """flash_attn_varlen_func on q and kv (total_k, 2, nheads_k, headdim); gradients dq, dkv."""
    return FlashAttnVarlenKVPackedFunc.apply(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                             max_seqlen_k, dropout_p, softmax_scale, causal,
                                             window_size, softcap, alibi_slopes, deterministic,
                                             return_attn_probs)


def _bump_version(t):
    """Tell autograd that t's memory changed behind its back (the cache append writes through a
    NumPy view), so a saved copy of it is detected as stale instead of silently reused."""
    if isinstance(t, torch.Tensor):
        torch.autograd.graph.increment_version(t)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None,
                            block_table=None, softmax_scale=None, causal=False,
                            window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash_attn_c.flash_attn_with_kvcache on CPU tensors. No backward (as flash-attn). With k/v
    given, k_cache/v_cache are updated in place: the kernel writes through views of the caller's
    tensors, so the caller sees the appended (and rotated) keys."""
    with torch.no_grad():
        caches = (_array(k_cache, "k_cache"), _array(v_cache, "v_cache"))
        result = _kvcache.flash_attn_with_kvcache(
            _array(q, "q"), *caches, _optional_array(k, "k"), _optional_array(v, "v"),
            _optional_array(rotary_cos, "rotary_cos"), _optional_array(rotary_sin, "rotary_sin"),
            _index_array(cache_seqlens, "cache_seqlens"),
            _index_array(cache_batch_idx, "cache_batch_idx"),
            _index_array(cache_leftpad, "cache_leftpad"), _index_array(block_table, "block_table"),
            softmax_scale, causal, window_size, softcap, rotary_interleaved, _slopes(alibi_slopes),
            num_splits, return_softmax_lse)
    if k is not None:
        _bump_version(k_cache)
        _bump_version(v_cache)
    if return_softmax_lse:
        return _tensor(result[0]), _tensor(result[1])
    return _tensor(result)


# ---- torch.nn.functional.scaled_dot_product_attention --------------------------------------------

class _SDPAFunc(torch.autograd.Function):
    """Attention on (b, s, h, d) views with an optional additive bias and boolean mask, both
    (b, h, sq or 1, sk) tensors with broadcast dims as 0 strides: the kernel's pse (added to q.k
    before the scale, so the caller passes attn_mask / scale) and mask (True = masked, the kernel's
    convention). Gradients for q, k, v and the bias."""

    @staticmethod
    def forward(ctx, q, k, v, bias, masked, scale, right, dropout_p):
        qa, ka, va = _array(q, "query"), _array(k, "key"), _array(v, "value")
        b, sq, h, _ = qa.shape
        sk = ka.shape[1]
        pse = None if bias is None else np.broadcast_to(_array(bias, "attn_mask"), (b, h, sq, sk))
        mask = None if masked is None else np.broadcast_to(masked.numpy(), (b, h, sq, sk))
        seed = _seed() if dropout_p > 0 else 0
        qa, ka, va = (V.last_dim_contiguous(x) for x in (qa, ka, va))
        out, lse, _ = _kernel_forward(
            qa, ka, va, scale=scale, out_shape=qa.shape, lse_shape=(b, h, sq), right=right,
            anchor_br=False, dropout_p=dropout_p, seed=seed, pse=pse, mask=mask)
        out_t = _tensor(out)
        ctx.save_for_backward(q, k, v, out_t, _tensor(lse), bias, masked)
        ctx.options = (scale, right, dropout_p, seed)
        return out_t

    @staticmethod
    @once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse, bias, masked = ctx.saved_tensors
        scale, right, dropout_p, seed = ctx.options
        qa, ka, va = _array(q, "query"), _array(k, "key"), _array(v, "value")
        b, sq, h, _ = qa.shape
        sk = ka.shape[1]
        pse = None if bias is None else np.broadcast_to(_array(bias, "attn_mask"), (b, h, sq, sk))
        mask = None if masked is None else np.broadcast_to(masked.numpy(), (b, h, sq, sk))
        arrays = (V.last_dim_contiguous(x)
                  for x in (_array(dout, "dout"), qa, ka, va, _array(out, "out")))
        want_dpse = bias is not None and ctx.needs_input_grad[3]
        dq, dk, dv, dpse = _kernel_backward(
            *arrays, scale=scale, lse=lse.numpy(), right=right, anchor_br=False,
            dropout_p=dropout_p, seed=seed, pse=pse, mask=mask, want_dpse=want_dpse)
        # dpse is per (batch, head) and per row, or summed over rows when the bias has one row:
        # exactly the gradient of the (b, h, rows, sk) bias tensor this Function was given.
        return _tensor(dq), _tensor(dk), _tensor(dv), _tensor(dpse), None, None, None, None


def _sdpa_heads(x, name):
    """(..., H, L, E) as (batch_shape, H, L, E); 2-D inputs get one batch and one head."""
    _check_tensor(x, name)
    if x.dim() < 2:
        raise ValueError(f"{name}: expected at least 2 dims (..., L, E), got shape {tuple(x.shape)}")
    if x.dim() == 2:
        return (), 1
    return tuple(x.shape[:-3]), x.shape[-3]


def _sdpa_mask_view(m, batch, hq, L, S):
    """attn_mask broadcast to (B, Hq, rows, S) as a view (0 strides), rows = 1 when the mask has
    one row for every query, so the kernel reads it row-broadcast and the bias gradient is summed
    over rows by the kernel rather than materialized."""
    rows = L if m.dim() >= 2 and m.shape[-2] == L else 1
    try:
        shaped = m.expand(batch + (hq, rows, S))
    except RuntimeError:
        raise ValueError(f"attn_mask: shape {tuple(m.shape)} does not broadcast to "
                         f"{batch + (hq, L, S)}") from None
    return shaped.reshape(math.prod(batch), hq, rows, S)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                 scale=None, enable_gqa=False):
    """torch.nn.functional.scaled_dot_product_attention on the flash_attn_c kernels.

    Same semantics as torch 2.13: query (..., Hq, L, E), key/value (..., H, S, E) with broadcast
    leading dims; attn_mask broadcastable to (..., Hq, L, S), bool (True = take part in attention)
    or float (added to the scaled scores, differentiable); is_causal top-left (key j <= query i),
    combinable with attn_mask; scale default 1/sqrt(E); enable_gqa lets H divide Hq (query head i
    uses key head i // (Hq // H)). A query row that can see no key gives 0 and no gradient, as
    torch's own kernels (safe softmax) do. Dropout masks come from a seed drawn from torch's
    generator. Differences: E of value must equal E of query; the output is a (..., Hq, L, E) view
    of a (batch, L, Hq, E) buffer (free to transpose back to a token-major layout).
    """
    for t, name in ((query, "query"), (key, "key"), (value, "value")):
        _check_tensor(t, name)
    if not (query.dtype == key.dtype == value.dtype):
        raise TypeError(f"query, key, value: expected one dtype, got {query.dtype}, {key.dtype}, "
                        f"{value.dtype}")
    qbatch, hq = _sdpa_heads(query, "query")
    kbatch, hk = _sdpa_heads(key, "key")
    vbatch, hv = _sdpa_heads(value, "value")
    L, E = query.shape[-2:]
    S = key.shape[-2]
    if key.shape[-1] != E:
        raise ValueError(f"key: expected head dim {E} (as query), got {key.shape[-1]}")
    if value.shape[-1] != E:
        raise ValueError(f"value: head dim {value.shape[-1]} differs from query's {E}; flash_attn_c "
                         "kernels need one head dim for query, key and value")
    if value.shape[-2] != S or hv != hk:
        raise ValueError(f"value: expected {hk} heads and {S} keys (as key), "
                         f"got shape {tuple(value.shape)}")
    if hq != hk and not (hk == 1 or (enable_gqa and hq % hk == 0)):
        raise ValueError(f"key: {hk} heads do not match query's {hq}"
                         + ("" if enable_gqa else " (pass enable_gqa=True for grouped-query attention)"))
    try:
        batch = torch.broadcast_shapes(qbatch, kbatch, vbatch)
    except RuntimeError as e:
        raise ValueError(f"query, key, value: leading (batch) dims do not broadcast ({e})") from None
    dropout_p = V.dropout(dropout_p)
    scale = V.softmax_scale(scale, E)
    # Leading dims become one batch dim and heads move next to E: (B, L, H, E) views. Broadcasting
    # is expand() (0 strides, autograd sums the gradients); GQA stays unexpanded for the kernel.
    B = math.prod(batch)
    hkv = hq if hk == 1 and not enable_gqa else hk

    def as_bshd(x, h, rows):
        x = x[None] if x.dim() == 2 else x  # the one head of a 2-D input
        x = x.expand(batch + (h, rows, E)).reshape(B, h, rows, E)
        return x.transpose(1, 2)

    q = as_bshd(query, hq, L)
    k = as_bshd(key, hkv, S)
    v = as_bshd(value, hkv, S)
    bias = masked = None
    if attn_mask is not None:
        _check_tensor(attn_mask, "attn_mask")
        if attn_mask.dtype == torch.bool:
            # torch: True = attend; the kernel: nonzero = masked (as the NPU's atten_mask).
            masked = _sdpa_mask_view(torch.logical_not(attn_mask), batch, hq, L, S)
        elif attn_mask.dtype == query.dtype:
            if scale == 0:
                raise ValueError("attn_mask: a float mask with scale=0 is not supported (the kernel "
                                 "adds the bias before scaling)")
            # The kernel computes (q.k + pse) * scale, so pse = attn_mask / scale, formed on the
            # mask as given (before any broadcast) and in the accumulator dtype so a bfloat16 or
            # float16 mask is not rounded a second time. Autograd carries its gradient back.
            acc = torch.float64 if query.dtype == torch.float64 else torch.float32
            bias = _sdpa_mask_view(attn_mask.to(acc) / scale, batch, hq, L, S)
        else:
            raise TypeError(f"attn_mask: expected dtype bool or {query.dtype} (the query's), got "
                            f"{attn_mask.dtype}")
    out = _SDPAFunc.apply(q, k, v, bias, masked, scale, 0 if is_causal else None, dropout_p)
    out = out.transpose(1, 2)
    return out.reshape(batch + (hq, L, E)) if query.dim() > 2 else out.reshape(L, E)


# ---- torch_npu -----------------------------------------------------------------------------------

class _NPUFusionAttentionFunc(torch.autograd.Function):
    """npu_fusion_attention with gradients for query, key, value and pse through
    flash_attn_c.npu_fusion_attention_grad, fed the forward's own softmax_max/softmax_sum, output
    and (seed, offset, numels) so dropout replays."""

    @staticmethod
    def forward(ctx, query, key, value, pse, atten_mask, head_num, input_layout, options):
        qa, ka, va = _array(query, "query"), _array(key, "key"), _array(value, "value")
        pa = _optional_array(pse, "pse")
        ma = None if atten_mask is None else _npu_mask(atten_mask)
        res = _npu.npu_fusion_attention(qa, ka, va, head_num, input_layout, pse=pa,
                                       atten_mask=ma, **options)
        out, smax, ssum, sout = (_tensor(np.asarray(a)) for a in res[:4])
        seed, offset, numels = res[4:]
        ctx.mark_non_differentiable(smax, ssum, sout)
        ctx.save_for_backward(query, key, value, pse, atten_mask, out, smax, ssum)
        ctx.call = (head_num, input_layout, options, seed, offset, numels)
        return out, smax, ssum, sout, seed, offset, numels

    @staticmethod
    @once_differentiable
    def backward(ctx, dy, *unused):
        query, key, value, pse, atten_mask, out, smax, ssum = ctx.saved_tensors
        head_num, input_layout, options, seed, offset, numels = ctx.call
        grad_options = dict(options)
        grad_options["scale_value"] = grad_options.pop("scale")
        dq, dk, dv, dpse = _npu_grad.npu_fusion_attention_grad(
            _array(query, "query"), _array(key, "key"), _array(value, "value"), _array(dy, "dy"),
            head_num, input_layout, pse=_optional_array(pse, "pse"),
            atten_mask=None if atten_mask is None else _npu_mask(atten_mask),
            softmax_max=smax.numpy(), softmax_sum=ssum.numpy(), attention_in=_array(out, "out"),
            seed=seed, offset=offset, numels=numels, **grad_options)
        dpse_t = _tensor(dpse) if pse is not None and ctx.needs_input_grad[3] else None
        return _tensor(dq), _tensor(dk), _tensor(dv), dpse_t, None, None, None, None


def _npu_mask(m):
    """atten_mask (bool or uint8, True/1 = masked: the NPU convention, opposite to SDPA's)."""
    _check_tensor(m, "atten_mask")
    if m.dtype not in (torch.bool, torch.uint8):
        raise TypeError(f"atten_mask: expected dtype bool or uint8, got {m.dtype}")
    return m.detach().numpy()


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=2147483647,
                         next_tockens=2147483647, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None):
    """torch_npu.npu_fusion_attention on CPU tensors (flash_attn_c.npu), differentiable with
    respect to query, key, value and pse. Returns (attention_out, softmax_max, softmax_sum,
    softmax_out, seed, offset, numels) as torch_npu does."""
    if padding_mask is not None:
        raise ValueError("padding_mask: not supported (torch_npu reserves it; pass None)")
    as_list = (lambda x: x.tolist() if isinstance(x, torch.Tensor) else x)
    options = dict(scale=scale, keep_prob=keep_prob, pre_tockens=pre_tockens,
                   next_tockens=next_tockens, inner_precise=inner_precise,
                   prefix=as_list(prefix), actual_seq_qlen=as_list(actual_seq_qlen),
                   actual_seq_kvlen=as_list(actual_seq_kvlen), sparse_mode=sparse_mode,
                   gen_mask_parallel=gen_mask_parallel, sync=sync, softmax_layout=softmax_layout,
                   sink=None if sink is None else _array(sink, "sink"))
    return _NPUFusionAttentionFunc.apply(query, key, value, pse, atten_mask, head_num,
                                         input_layout, options)


# ---- `import flash_attn` -------------------------------------------------------------------------

_FLASH_ATTN_EXPORTS = ("flash_attn_func", "flash_attn_kvpacked_func", "flash_attn_qkvpacked_func",
                       "flash_attn_varlen_func", "flash_attn_varlen_kvpacked_func",
                       "flash_attn_varlen_qkvpacked_func", "flash_attn_with_kvcache")
_FLASH_ATTN_CLASSES = ("FlashAttnFunc", "FlashAttnQKVPackedFunc", "FlashAttnKVPackedFunc",
                       "FlashAttnVarlenFunc", "FlashAttnVarlenQKVPackedFunc",
                       "FlashAttnVarlenKVPackedFunc")


def install():
    """Make `import flash_attn` (and `flash_attn.flash_attn_interface`) resolve to this module's
    functions, so an unmodified flash-attn training script runs on the CPU after one added line.

    Registers two module objects in sys.modules: `flash_attn` (the seven exported functions and
    __version__ as flash-attn's __init__) and `flash_attn.flash_attn_interface` (the same plus the
    autograd Function classes). Idempotent; returns the `flash_attn` module. A real flash-attn
    imported earlier is replaced in sys.modules (names already bound in other modules stay)."""
    existing = sys.modules.get("flash_attn")
    if getattr(existing, "__flash_attn_c__", False):
        return existing
    this = sys.modules[__name__]
    interface = types.ModuleType("flash_attn.flash_attn_interface",
                                 "flash-attn's interface, served by flash_attn_c.torch on the CPU.")
    for name in _FLASH_ATTN_EXPORTS + _FLASH_ATTN_CLASSES:
        setattr(interface, name, getattr(this, name))
    package = types.ModuleType("flash_attn", "flash-attn 2.8 API on the CPU (flash_attn_c.torch).")
    for name in _FLASH_ATTN_EXPORTS:
        setattr(package, name, getattr(this, name))
    package.__version__ = FLASH_ATTN_VERSION
    package.__all__ = list(_FLASH_ATTN_EXPORTS)
    package.__path__ = []  # a package, so `import flash_attn.flash_attn_interface` is looked up
    package.__spec__ = importlib.machinery.ModuleSpec("flash_attn", None, is_package=True)
    interface.__spec__ = importlib.machinery.ModuleSpec("flash_attn.flash_attn_interface", None)
    package.flash_attn_interface = interface
    for m in (package, interface):
        m.__flash_attn_c__ = True
    sys.modules["flash_attn.flash_attn_interface"] = interface
    sys.modules["flash_attn"] = package
    return package


__all__ = list(_FLASH_ATTN_EXPORTS) + list(_FLASH_ATTN_CLASSES) + [
    "scaled_dot_product_attention", "npu_fusion_attention", "install"]
