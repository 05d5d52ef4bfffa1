"""flash_attn_c: exact FlashAttention on x86-64 CPUs.

C kernels (scalar, AVX2, AVX-512; chosen at import) behind flash-attn 2.8 and torch_npu compatible
functions on NumPy arrays. See README.md for the API table and flash_attn_c.testing for verifying
other implementations against flash_attn_c.reference.
"""
from ._runtime import (cpu_info, get_num_threads, set_num_threads, set_isa, bfloat16, release_workspace,
                       workspace_cached, set_backward_workspace_budget,
                       get_backward_workspace_budget)
from ._rng import manual_seed
from .kvcache import combine_partials, flash_attn_with_kvcache
from .flash_attn_interface import (
    flash_attn_func,
    flash_attn_kvpacked_func,
    flash_attn_qkvpacked_func,
    flash_attn_fwd,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
    flash_attn_varlen_fwd,
    flash_attn_bwd,
    flash_attn_varlen_bwd,
)
from .npu import npu_flash_attention, npu_fusion_attention
from .npu_grad import npu_fusion_attention_grad
from .npu_infer import (npu_fused_infer_attention_score, npu_incre_flash_attention,
                        npu_prompt_flash_attention)

__version__ = "0.1.0"

__all__ = [
    "flash_attn_func",
    "flash_attn_kvpacked_func",
    "flash_attn_qkvpacked_func",
    "flash_attn_fwd",
    "flash_attn_varlen_func",
    "flash_attn_varlen_kvpacked_func",
    "flash_attn_varlen_qkvpacked_func",
    "flash_attn_varlen_fwd",
    "flash_attn_with_kvcache",
    "combine_partials",
    "flash_attn_bwd",
    "flash_attn_varlen_bwd",
    "npu_fusion_attention",
    "npu_flash_attention",
    "npu_fusion_attention_grad",
    "npu_prompt_flash_attention",
    "npu_incre_flash_attention",
    "npu_fused_infer_attention_score",
    "manual_seed",
    "cpu_info",
    "set_num_threads",
    "get_num_threads",
    "release_workspace",
    "workspace_cached",
    "set_backward_workspace_budget",
    "get_backward_workspace_budget",
    "set_isa",
    "bfloat16",
]
