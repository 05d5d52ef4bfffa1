"""flash_attn_varlen_bwd against the float64 reference (varlen gradients, dropout replay)."""
import numpy as np
import pytest

import flash_attn_c as fa
from flash_attn_c import reference as ref
from flash_attn_c.testing import assert_attention_close

from conftest import DTYPES, ISAS, randn, using_isa


def _inputs(rng, dtype, lens_q, lens_k, h=6, hk=2, d=40):
    cq = np.concatenate([[0], np.cumsum(lens_q)]).astype(np.int32)
    ck = np.concatenate([[0], np.cumsum(lens_k)]).astype(np.int32)
    dt = DTYPES[dtype]
    return (randn(rng, (cq[-1], h, d), dt), randn(rng, (ck[-1], hk, d), dt),
            randn(rng, (ck[-1], hk, d), dt), randn(rng, (cq[-1], h, d), dt), cq, ck)


@pytest.mark.parametrize("dtype", ["f32", "bf16", "f64"])
@pytest.mark.parametrize("causal,window,dropout", [(False, (-1, -1), 0.0), (True, (-1, -1), 0.0),
                                                    (False, (16, 4), 0.0), (True, (-1, -1), 0.2)])
def test_varlen_backward(dtype, causal, window, dropout):
    rng = np.random.default_rng(0)
    lens_q, lens_k = [5, 70, 1, 0, 90], [9, 70, 130, 4, 65]
    q, k, v, do, cq, ck = _inputs(rng, dtype, lens_q, lens_k)
    kw = dict(causal=causal, window_size=window)
    fa.manual_seed(7)
    out, lse, st = fa.flash_attn_varlen_fwd(q, k, v, cq, ck, 96, 140, dropout, **kw)
    keep = None
    if dropout:
        # The same generator state again: the forward's mask, read back through S_dmask.
        fa.manual_seed(7)
        _, _, s = fa.flash_attn_varlen_func(q, k, v, cq, ck, 96, 140, dropout,
                                            return_attn_probs=True, **kw)
        keep = ~np.signbit(s)
    want = ref.flash_attn_varlen_bwd(do, q, k, v, out, lse, cq, ck, 96, 140, dropout, dropout_mask=keep, **kw)
    low = None
    if q.dtype != np.float64:
        low = ref.flash_attn_varlen_bwd(do, q, k, v, out, lse, cq, ck, 96, 140, dropout,
                                        dropout_mask=keep, compute_dtype=q.dtype, **kw)
    for isa in ISAS:
        with using_isa(isa):
            got = fa.flash_attn_varlen_bwd(do, q, k, v, out, lse, cq, ck, 96, 140, dropout,
                                           rng_state=st, **kw)
        for name, g, w, lw in zip(("dq", "dk", "dv"), got, want, low or (None,) * 3):
            assert g.dtype == q.dtype and g.shape == w.shape
            assert_attention_close(g, w, reference_low_precision=lw, multiplier=3.0,
                                   name=f"{name}[{isa}]")


def test_varlen_backward_errors():
    rng = np.random.default_rng(1)
    q, k, v, do, cq, ck = _inputs(rng, "f32", [4, 6], [5, 5])
    out, lse, st = fa.flash_attn_varlen_fwd(q, k, v, cq, ck, 6, 5)
    with pytest.raises(ValueError, match=r"softmax_lse: expected shape \(6, 10\)"):
        fa.flash_attn_varlen_bwd(do, q, k, v, out, lse[:, :4], cq, ck, 6, 5)
    with pytest.raises(ValueError, match=r"rng_state: required when dropout_p > 0"):
        fa.flash_attn_varlen_bwd(do, q, k, v, out, lse, cq, ck, 6, 5, 0.1)
    with pytest.raises(ValueError, match=r"dout: expected shape"):
        fa.flash_attn_varlen_bwd(do[:3], q, k, v, out, lse, cq, ck, 6, 5)
