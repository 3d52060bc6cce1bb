"""The GPT: token embedding → a block stack from a ``blocks`` plugin → a (tied) language-model head.

The model family (positions, block layout, norms) belongs to the blocks plugin; attention comes from an
attention plugin. The core embeds tokens, numbers their positions, owns the head and the KV cache.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from anexa_core import plugins
from anexa_core.config import ModelConfig
from anexa_core.interfaces import Attention
from anexa_core.model.cache import KVCache


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
        self.batched = bool(getattr(blocks, "batched", False))  # rows at different positions in one batch
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        nn.init.normal_(self.wte.weight, mean=0.0, std=0.02)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix reads and writes tokens
        else:
            nn.init.normal_(self.lm_head.weight, mean=0.0, std=0.02)

    def forward(
        self,
        idx: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, vocab) for token ids ``idx`` (B, T) int64, and the mean cross-entropy (nats per
        token) when ``targets`` (B, T) are given (targets of -100 are ignored: prompt tokens in
        fine-tuning). With ``cache``, ``idx`` continues each row's cached positions.

        ``last_only`` computes logits for the final position only, which is all decoding needs.
        """
        if cache is None:
            positions = torch.arange(idx.size(1), device=idx.device)
        else:
            if cache.ragged and not self.batched:
                raise ValueError(f"blocks {self.config.blocks!r} do not decode ragged rows (no `batched`)")
            positions = cache.positions(idx.size(1), idx.device)
        hidden = self.blocks(self.drop(self.wte(idx)), positions, cache)
        if last_only:
            hidden = hidden[:, -1:, :]
        logits = self.lm_head(hidden)
        loss = None
        if targets is not None:
            wide = torch.promote_types(logits.dtype, torch.float32)  # bf16 logits: the loss in float32
            loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).to(wide), targets.reshape(-1))
        return logits, loss

    def num_parameters(self) -> int:
        """Unique parameters (a tied head counts once)."""
        return sum(p.numel() for p in self.parameters())

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The trainable parameters by family, for optimizers that treat them differently (Muon):

        ``embeddings`` (every ``nn.Embedding``: tokens, learned positions), ``head`` (the untied output
        matrix), ``matrices`` (the other 2-D weights: the blocks' projections) and ``vectors`` (biases,
        norm gains). Each parameter appears once.
        """
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        groups: dict[str, list[nn.Parameter]] = {"embeddings": [], "head": [], "matrices": [], "vectors": []}
        for name, param in self.named_parameters():  # a tied head is the embedding and is listed once
            if not param.requires_grad:
                continue
            if id(param) in embeddings:
                groups["embeddings"].append(param)
            elif name == "lm_head.weight":
                groups["head"].append(param)
            elif param.dim() >= 2:
                groups["matrices"].append(param)
            else:
                groups["vectors"].append(param)
        return groups


def build_model(config: ModelConfig, needed_by: dict | None = None) -> GPT:
    """The model named by ``config.blocks`` with the attention named by ``config.attention``, each with
    its options. The returned model's ``config`` records every option's value, defaults included.

    ``needed_by``: a checkpoint's plugin entries, so a missing plugin's error names what to install.
    """
    needed_by = needed_by or {}
    blocks, blocks_options = plugins.create("blocks", config.blocks, config.blocks_options, needed_by.get("blocks"))
    attention, attention_options = plugins.create(
        "attention", config.attention, config.attention_options, needed_by.get("attention")
    )
    config = dataclasses.replace(config, blocks_options=blocks_options, attention_options=attention_options)
    return GPT(config, blocks.build(config, Attend(attention)))


def decoding_layout(model: nn.Module) -> nn.Module:
    """Store each float32 CPU linear weight that has more outputs than inputs column-major, in place;
    return ``model``. Values, shapes and names stay the same; only the memory order changes.

    A decoding step at batch 1 multiplies one vector by every weight matrix, so it is bound by how fast
    the matrix-vector product streams the weights. On CPUs, PyTorch's float32 ``linear`` (MKL's GEMV)
    streams an (out, in) weight up to 1.8× faster when it is stored transposed (column-major) and
    ``out > in`` (MLP up/gate projections, a fused QKV, the vocabulary head — the tied embedding with it),
    and slower when ``out < in``; square matrices gain nothing. Measured in benchmarks/RESULTS.md ("the
    decoding layout"). Training never uses this: gradients and optimizer states keep the usual order,
    and every writer of weights (checkpoints, ``export``) stores tensors contiguously. CUDA and
    reduced-precision weights are left as they are.
    """
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module.out_features <= module.in_features:
                continue
            weight = module.weight
            if id(weight) in seen or weight.device.type != "cpu" or weight.dtype != torch.float32:
                continue
            seen.add(id(weight))  # a tied head is the token embedding: re-stored once, for both
            weight.data = weight.data.t().contiguous().t()
    return model


class Attend:
    """An attention plugin as the blocks call it: ``(q, k, v, *, causal, lengths=None)``.

    The contract (:class:`~anexa_core.interfaces.Attention`) lets blocks pass keys and values with fewer
    heads than the queries (grouped-query) and per-row ``lengths`` (ragged rows of the batched engine).
    A plugin that declares ``grouped_query`` or ``ragged`` gets them as they are; for one that does not,
    this repeats the key/value heads, or runs each row alone over its valid keys — slower, never wrong.
    """

    def __init__(self, plugin: Attention):
        self.plugin: Any = plugin  # called with `lengths` only when it declares `ragged`
        self.grouped_query = bool(getattr(plugin, "grouped_query", False))
        self.ragged = bool(getattr(plugin, "ragged", False))

    def __repr__(self) -> str:
        return repr(self.plugin)

    def __call__(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool, lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        if k.size(1) != q.size(1) and not self.grouped_query:
            group = q.size(1) // k.size(1)
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        if lengths is None:
            return self.plugin(q, k, v, causal=causal)
        if self.ragged:
            return self.plugin(q, k, v, causal=causal, lengths=lengths)
        rows = [
            self.plugin(q[b : b + 1], k[b : b + 1, :, :n], v[b : b + 1, :, :n], causal=causal)
            for b, n in enumerate(lengths.tolist())
        ]
        return torch.cat(rows)
