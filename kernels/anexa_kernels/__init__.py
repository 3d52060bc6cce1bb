"""Fused attention kernels in Triton, with a PyTorch fallback. Imports nothing from Anexa.

``flash_attention(q, k, v, causal=False, sm_scale=None)`` always runs the Triton kernels;
``attention(q, k, v, causal)`` runs them where they can run and otherwise falls back to PyTorch's
``scaled_dot_product_attention``, logging why once (logger ``anexa_kernels``).
"""

from .flash_attention import SUPPORTED_HEAD_DIMS, attention, fallback_reason, flash_attention, sdpa_attention

__all__ = ["SUPPORTED_HEAD_DIMS", "attention", "fallback_reason", "flash_attention", "sdpa_attention"]
