"""The GPT: token embedding → a block stack from a ``blocks`` plugin → a tied language-model head.

The model family (positions, block layout, final norm) belongs to the blocks plugin; attention comes
from an attention plugin. The core only embeds tokens, ties the head to the embedding and owns the
KV cache that blocks read and write during incremental decoding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from anexa_core import plugins
from anexa_core.config import ModelConfig
from anexa_core.interfaces import Attention


class KVCache:
    """Keys and values of the positions seen so far, one preallocated buffer pair per layer.

    Blocks call :meth:`update` once per layer per forward; the model advances :attr:`pos` after the
    whole stack has run, so every layer writes the same positions.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.pos = 0
        self._keys: list[torch.Tensor] = []
        self._values: list[torch.Tensor] = []

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``k, v`` of shape (B, H, T, D) at the current position; return all keys/values so far."""
        end = self.pos + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache holds {self.max_len} positions; {end} requested")
        if layer == len(self._keys):
            shape = (k.size(0), k.size(1), self.max_len, k.size(3))
            self._keys.append(k.new_empty(shape))
            self._values.append(v.new_empty(shape))
        self._keys[layer][:, :, self.pos : end] = k
        self._values[layer][:, :, self.pos : end] = v
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.pos += n


class GPT(nn.Module):
    """A decoder-only language model assembled from a blocks plugin and an attention plugin."""

    def __init__(self, config: ModelConfig, blocks: nn.Module):
        super().__init__()
        if config.vocab_size < 1:
            raise ValueError("ModelConfig.vocab_size must be set from the tokenizer")
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = blocks
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits for ``idx`` (B, T), and the cross-entropy loss when ``targets`` are given.

        ``last_only`` computes logits for the final position only, which is all decoding needs.
        """
        hidden = self.blocks(self.drop(self.wte(idx)), cache)
        if cache is not None:
            cache.advance(idx.size(1))
        if last_only:
            hidden = hidden[:, -1:, :]
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))
        return logits, loss

    def num_parameters(self) -> int:
        """Unique parameters (the tied head counts once)."""
        return sum(p.numel() for p in self.parameters())


def build_model(config: ModelConfig, attention: Attention | None = None) -> GPT:
    """The model named by ``config.blocks`` with the attention named by ``config.attention``."""
    build_blocks = plugins.get("blocks", config.blocks)
    if attention is None:
        attention = plugins.get("attention", config.attention)
    return GPT(config, build_blocks(config, attention))
