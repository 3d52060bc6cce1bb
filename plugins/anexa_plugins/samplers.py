"""Sampler plugin ``samplers``: the built-in logits processors.

Each processor is a dataclass whose fields are its options (``-s top_p=0.9`` sets the first field,
``-s repetition_penalty.window=32`` a named one). The chain runs them by ``order``, whatever order the
command line gives them in, and then picks a token:

    repetition_penalty 10 → temperature 20 → top_k 30 (the anexa-topk plugin) → top_p 40 → min_p 50
    → greedy 90 → pick (argmax when one token is left, else a seeded multinomial draw)

Penalties and temperature reshape the distribution before the truncating processors, so ``top_p`` and
``min_p`` measure the probabilities that will actually be sampled from. Removed tokens get ``-inf``.
All but ``repetition_penalty`` say ``reads_context = False``: the engine may process the rows of several
requests at once without their histories.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from anexa_core import AnexaError, hookimpl


def _keep_only(logits: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~keep, float("-inf"))


def _keep_argmax(logits: torch.Tensor) -> torch.Tensor:
    """Exactly one token per row survives, even under ties (the lowest index, as torch.argmax)."""
    keep = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, logits.argmax(-1, keepdim=True), True)
    return _keep_only(logits, keep)


@dataclass
class RepetitionPenalty:
    """Discourages tokens seen in the last ``window`` context tokens (the CTRL paper's penalty).

    Dividing positive logits and multiplying negative ones always lowers the token's probability;
    plain division would raise it for negative logits.
    """

    penalty: float = 1.1
    window: int = 64
    order: ClassVar[int] = 10

    def __post_init__(self) -> None:
        if not 0 < self.penalty < float("inf"):
            raise AnexaError(f"repetition_penalty must be > 0 (1 = off, e.g. 1.2), got {self.penalty}")
        if self.window < 1:
            raise AnexaError(f"repetition_penalty.window must be at least 1 token, got {self.window}")

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        recent = context[:, -self.window :].to(device=logits.device, dtype=torch.long)
        seen = torch.zeros_like(logits, dtype=torch.bool).scatter_(-1, recent, True)
        # In float64, clamped back into range: an extreme penalty (1e300 is a valid float option) must
        # neither become inf in float32 (0 × inf = NaN) nor push a finite logit to ±inf.
        wide = logits.double()
        penalised = torch.where(wide > 0, wide / self.penalty, wide * self.penalty)
        largest = torch.finfo(logits.dtype).max / 4
        penalised = torch.where(torch.isfinite(wide), penalised.clamp(-largest, largest), wide).to(logits.dtype)
        return torch.where(seen, penalised, logits)


@dataclass
class Temperature:
    """Divides logits by ``value``: below 1 sharpens, above 1 flattens, 0 keeps only the argmax."""

    value: float = 1.0
    order: ClassVar[int] = 20
    reads_context: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.value < float("inf"):
            raise AnexaError(f"temperature must be >= 0 (0 means greedy), got {self.value}")

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        if self.value == 0:
            return _keep_argmax(logits)
        # Shifting by the row's maximum leaves the distribution unchanged and keeps every value <= 0, so a
        # tiny temperature sends the others to -inf instead of overflowing the top one to +inf; dividing in
        # float64 keeps a temperature below float32's range from becoming a division by zero.
        top = logits.amax(-1, keepdim=True)
        shifted = (logits - torch.where(torch.isfinite(top), top, 0.0)).double()
        return (shifted / self.value).to(logits.dtype)


@dataclass
class TopP:
    """Nucleus sampling: keeps the smallest set of most likely tokens whose mass reaches ``p``."""

    p: float = 0.9
    order: ClassVar[int] = 40
    reads_context: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 < self.p <= 1:
            raise AnexaError(f"top_p must be in (0, 1], got {self.p}")

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        # A token is needed while the tokens above it have not reached p; the top one always is.
        needed = mass_before < self.p
        needed[:, 0] = True
        keep = torch.zeros_like(needed).scatter_(-1, order, needed)
        return _keep_only(logits, keep)


@dataclass
class MinP:
    """Keeps tokens at least ``p`` times as likely as the top one: the cut follows the model's confidence."""

    p: float = 0.05
    order: ClassVar[int] = 50
    reads_context: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 0 <= self.p <= 1:
            raise AnexaError(f"min_p must be in [0, 1], got {self.p}")

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        probs = logits.float().softmax(-1)
        keep = probs >= self.p * probs.amax(-1, keepdim=True)
        return _keep_only(logits, keep)


@dataclass
class Greedy:
    """Keeps only the most likely token, so the pick is deterministic."""

    order: ClassVar[int] = 90
    reads_context: ClassVar[bool] = False

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return _keep_argmax(logits)


@hookimpl
def register_samplers(register):
    register("repetition_penalty", RepetitionPenalty)
    register("temperature", Temperature)
    register("top_p", TopP)
    register("min_p", MinP)
    register("greedy", Greedy)
