"""Attention plugin ``math``: softmax(QKᵀ/√d)·V written out, the reference every other backend is checked against."""

import math
from dataclasses import dataclass

import torch

from anexa_core import hookimpl


def math_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
    """Materialises the full score matrix; softmax in at least float32 (float64 stays float64)."""
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    if causal:
        t_q, t_k = q.size(-2), k.size(-2)
        visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return weights @ v


@dataclass
class MathAttention:
    """Exact attention, the slow and obvious way (Vaswani et al. 2017, eq. 1)."""

    def __call__(self, q, k, v, *, causal):
        return math_attention(q, k, v, causal=causal)


@hookimpl
def register_attention(register):
    register("math", MathAttention)
