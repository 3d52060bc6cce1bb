"""Anexa plugin ``top_k``: keeps the ``k`` most likely tokens and removes the rest.

Order 30 puts it after repetition_penalty (10) and temperature (20), before top_p (40), min_p (50)
and greedy (90). Uses only Anexa's public plugin API: ``hookimpl`` and ``AnexaError``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from anexa_core import AnexaError, hookimpl


@dataclass
class TopK:
    """``-s top_k=40``. Exactly k tokens survive; ties at the k-th logit keep the lowest token ids, so
    ``top_k=1`` picks the same token as ``greedy`` and ``--temperature 0``."""

    k: int = 40
    order: ClassVar[int] = 30
    reads_context: ClassVar[bool] = False  # the engine may process many requests' rows at once

    def __post_init__(self) -> None:
        if self.k < 1:
            raise AnexaError(f"top_k must be at least 1, got {self.k}: use e.g. -s top_k=40")

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        k = min(self.k, logits.size(-1))
        # Keeping the k first indices of a stable sort (not every logit >= the k-th value) holds the count
        # at k under ties and breaks them toward the lowest id, deterministically.
        order = logits.sort(dim=-1, descending=True, stable=True).indices[..., :k]
        kept = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, order, True)
        return logits.masked_fill(~kept, float("-inf"))


@hookimpl
def register_samplers(register):
    register("top_k", TopK)
