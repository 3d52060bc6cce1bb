"""Attention plugin ``math``: softmax(QKᵀ/√d)·V written out, the reference every other backend is checked against."""

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from anexa_core import hookimpl


def math_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Materialises the full score matrix; softmax in at least float32 (float64 stays float64).

    Grouped-query: ``k``, ``v`` may have fewer heads than ``q`` (each serves ``H / Hkv`` query heads).
    ``lengths`` (B,): valid keys per row, queries at each row's last positions (the Attention contract).
    """
    if k.size(1) != q.size(1):
        group = q.size(1) // k.size(1)
        k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))
    t_q, t_k = q.size(-2), k.size(-2)
    keys = torch.arange(t_k, device=q.device)
    if lengths is not None:
        ends = lengths.to(q.device)[:, None, None, None]
        visible = keys < ends
        if causal:
            visible = visible & (keys <= ends - t_q + torch.arange(t_q, device=q.device)[:, None])
        scores = scores.masked_fill(~(visible | (keys == 0)), float("-inf"))
    elif causal:
        visible = torch.ones(t_q, t_k, dtype=torch.bool, device=q.device).tril(diagonal=t_k - t_q)
        scores = scores.masked_fill(~visible, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.promote_types(scores.dtype, torch.float32)).to(v.dtype)
    return weights @ v


@dataclass
class MathAttention:
    """Exact attention, the slow and obvious way (Vaswani et al. 2017, eq. 1)."""

    grouped_query: ClassVar[bool] = True
    ragged: ClassVar[bool] = True

    def __call__(self, q, k, v, *, causal, lengths=None):
        return math_attention(q, k, v, causal=causal, lengths=lengths)


@hookimpl
def register_attention(register):
    register("math", MathAttention)
