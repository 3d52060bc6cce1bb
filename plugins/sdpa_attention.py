"""Attention plugin ``sdpa``: PyTorch's fused ``scaled_dot_product_attention`` (the default)."""

import torch
import torch.nn.functional as F

from anexa_core import hookimpl


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """SDPA aligns ``is_causal`` top-left; Anexa's contract aligns bottom-right when queries are fewer."""
    t_q, t_k = q.size(-2), k.size(-2)
    if not causal or t_q == 1:
        return F.scaled_dot_product_attention(q, k, v)
    if t_q == t_k:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)


@hookimpl
def register_attention(register):
    register("sdpa", sdpa_attention)
