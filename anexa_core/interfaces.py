"""The small typed interfaces that plugins implement. Structural: no base class to inherit."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, Sequence, runtime_checkable

if TYPE_CHECKING:
    import torch
    from torch import nn

    from anexa_core.config import ModelConfig


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> token ids. Serialises to a JSON-able dict so it travels inside the checkpoint."""

    vocab_size: int

    @classmethod
    def train(cls, text: str, vocab_size: int | None = None) -> Tokenizer: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def to_dict(self) -> dict[str, Any]: ...

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Tokenizer: ...


@runtime_checkable
class Attention(Protocol):
    """``(q, k, v, *, causal) -> out`` on ``(batch, heads, time, head_dim)`` tensors.

    ``q`` may be shorter than ``k``/``v`` (decoding with a KV cache): queries are then the last
    positions, and the causal mask is aligned to the bottom right (query i sees keys <= i + Tk - Tq).
    A backend that may compute with another one (a kernel's fallback) can expose
    ``fallback_reason(q) -> str | None`` and ``fallback_backend: str`` so benchmarks label it honestly.
    """

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool) -> torch.Tensor: ...


@runtime_checkable
class Sampler(Protocol):
    """A logits processor, one link in the sampling chain: ``(logits, context_ids) -> logits``.

    Constructed with keyword options; ``order`` places it in the chain (lower runs first).
    """

    order: ClassVar[int]

    def __call__(self, logits: torch.Tensor, context: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Blocks(Protocol):
    """A model family: builds the block stack from the model config and an attention function.

    The returned module maps token embeddings ``(B, T, C)`` to final-normalised hidden states
    ``(B, T, C)``; it adds positions itself and reads/writes ``cache`` (a
    :class:`~anexa_core.model.KVCache`) when one is given.
    """

    def __call__(self, config: ModelConfig, attention: Attention) -> nn.Module: ...


@runtime_checkable
class Dataset(Protocol):
    """A named corpus: ``path()`` returns a local text file, downloading into the cache if needed."""

    def path(self) -> Path: ...
