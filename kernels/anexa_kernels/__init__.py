"""Fused attention kernels in Triton, with a PyTorch fallback. Imports nothing from Anexa.

``flash_attention(q, k, v, causal=False, sm_scale=None, lengths=None)`` always runs the Triton kernels;
``attention(q, k, v, causal=False, lengths=None)`` runs them where they can run and otherwise falls back
to PyTorch's ``scaled_dot_product_attention``, logging why once (logger ``anexa_kernels``). ``q`` is
(B, H, Tq, D); ``k``, ``v`` (B, Hkv, Tk, D) with ``H`` a multiple of ``Hkv`` (grouped-query attention,
Ainslie et al. 2023); ``lengths`` (B,) int64 gives each row its own number of valid keys.
"""

from .flash_attention import SUPPORTED_HEAD_DIMS, attention, fallback_reason, flash_attention, sdpa_attention

__all__ = ["SUPPORTED_HEAD_DIMS", "attention", "fallback_reason", "flash_attention", "sdpa_attention"]
