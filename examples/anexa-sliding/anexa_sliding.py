"""Anexa plugin ``sliding``: sliding-window attention — each query sees at most the last ``window`` keys.

Deliberately not exact softmax attention, and it says so: :meth:`SlidingWindow.reference` computes the
same thing plainly, so Anexa's conformance kit and ``anexa bench`` check it against that (labelled
"not exact") instead of against full attention. Uses only Anexa's public plugin API and torch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from anexa_core import AnexaError, hookimpl


def band(t_q: int, t_k: int, window: int, causal: bool, device: torch.device) -> torch.Tensor:
    """``(t_q, t_k)`` bool, True where query i may see key j.

    Queries are the last ``t_q`` of ``t_k`` positions (bottom-right alignment, as with a KV cache):
    query i sits at position ``p = i + t_k - t_q``. Causal: ``p - window < j <= p`` (itself and the
    ``window - 1`` keys before it). Not causal: ``|j - p| < window`` (a local window on both sides).
    """
    position = torch.arange(t_q, device=device).unsqueeze(1) + (t_k - t_q)
    distance = position - torch.arange(t_k, device=device).unsqueeze(0)  # > 0: the key is earlier
    if causal:
        return (distance >= 0) & (distance < window)
    return distance.abs() < window


@dataclass
class SlidingWindow:
    """``--attention sliding -o attention.window=64``: attention over the last ``window`` positions.

    Memory and compute still scale with the full length here (a band mask for SDPA); what the window
    buys is a model that only uses local context, e.g. to study how much context a small model needs.
    """

    window: int = field(default=64, metadata={"help": "keys each query sees, itself included"})

    def __post_init__(self) -> None:
        if self.window < 1:
            raise AnexaError(f"sliding window must be at least 1, got {self.window}: use e.g. -o attention.window=64")

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
        t_q, t_k = q.size(-2), k.size(-2)
        if t_k <= self.window and not causal:  # the window covers every key: full attention
            return F.scaled_dot_product_attention(q, k, v)
        if t_k <= self.window and t_q == t_k:  # SDPA's own causal mask is the same band then
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=band(t_q, t_k, self.window, causal, q.device))

    def reference(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor:
        """The same attention written plainly: softmax(QKᵀ/√d + band mask)·V, in the inputs' dtype
        (the kit and ``anexa bench`` pass float64)."""
        scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
        visible = band(q.size(-2), k.size(-2), self.window, causal, q.device)
        return scores.masked_fill(~visible, float("-inf")).softmax(dim=-1) @ v


@hookimpl
def register_attention(register):
    register("sliding", SlidingWindow)
