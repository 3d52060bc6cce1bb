"""Attention plugin ``triton``: the FlashAttention-2 Triton kernels, else SDPA (logged once)."""

import torch
from anexa_kernels import SUPPORTED_HEAD_DIMS, attention, fallback_reason

from anexa_core import AnexaError, hookimpl


def triton_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """The kernel's head-dim limit is a model-config choice, so it is reported as a user mistake."""
    head_dim = q.size(-1)
    if head_dim not in SUPPORTED_HEAD_DIMS:
        raise AnexaError(
            f"attention 'triton' supports head_dim (n_embd / n_head) in {SUPPORTED_HEAD_DIMS}, the model has "
            f"head_dim {head_dim}: change n_embd or n_head, or use attention 'sdpa'"
        )
    return attention(q, k, v, causal=causal)


triton_attention.fallback_reason = fallback_reason  # lets `anexa bench` label fallback rows honestly


@hookimpl
def register_attention(register):
    register("triton", triton_attention)
