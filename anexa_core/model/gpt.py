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
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(logits (B, T, vocab), None)`` for token ids ``idx`` (B, T) int64; or, when ``targets`` (B, T)
        are given, ``(None, the mean cross-entropy)`` in nats per token (targets of -100 are ignored: prompt
        tokens in fine-tuning), computed by :func:`head_loss` without the whole batch's logits. With
        ``cache``, ``idx`` continues each row's cached positions.

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
        if targets is not None:
            return None, head_loss(hidden.reshape(-1, hidden.size(-1)), self.lm_head, targets.reshape(-1))
        return self.lm_head(hidden), None

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


LOSS_CHUNK_ELEMENTS = 1 << 25
"""Logits :func:`head_loss` holds at once (128 MB in float32): chunks of ``LOSS_CHUNK_ELEMENTS // vocab`` rows."""


def head_loss(hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """The mean cross-entropy (nats, float32 even under bf16 autocast) of ``head(hidden)`` against
    ``targets`` (N,) int64, ``hidden`` (N, C): ``F.cross_entropy`` with targets of -100 not counted (all
    of them ignored: NaN, as there).

    The whole batch's logits, their log-softmax and the gradients of both would take N × vocab floats
    each (400 MB apiece for 8 × 256 tokens of a 49,152-token vocabulary: the largest tensors of a
    fine-tuning step). A plain head (``nn.Linear`` without bias) instead goes through the rows a chunk of
    about :data:`LOSS_CHUNK_ELEMENTS` logits at a time and, when gradients are wanted, computes them
    there — ``softmax − one-hot`` of the chunk times the weight for ``hidden``, its transpose times the
    chunk for the weight — so nothing of size N × vocab is ever kept, and nothing is computed twice (the
    fused linear cross-entropy of Liger Kernel, Hsu et al. 2024, and Cut Cross-Entropy, Wijmans et al.
    2024). The backward pass only scales them. Logits that fit in one chunk (small vocabularies), and any
    other head (a LoRA-adapted one), go through ``F.cross_entropy`` at once, as autograd computes it;
    chunks cost ~3% more time than that (benchmarks/RESULTS.md). Equal to ``F.cross_entropy`` up to
    float rounding.
    """
    if (
        type(head) is not nn.Linear
        or head.bias is not None
        or hidden.size(0) * head.out_features <= LOSS_CHUNK_ELEMENTS
    ):
        return F.cross_entropy(_wide(head(hidden)), targets)
    rows = max(1, LOSS_CHUNK_ELEMENTS // head.out_features)
    if torch.is_grad_enabled() and (hidden.requires_grad or head.weight.requires_grad):
        return _HeadLoss.apply(hidden, head.weight, targets, rows)
    total, _, _ = _chunked_head_loss(hidden, head.weight, targets, rows, False, False)
    return total / (targets != -100).sum()


class _HeadLoss(torch.autograd.Function):
    """:func:`head_loss` with the gradients computed in the forward pass, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, rows):
        want_hidden, want_weight = ctx.needs_input_grad[:2]
        total, grad_hidden, grad_weight = _chunked_head_loss(hidden, weight, targets, rows, want_hidden, want_weight)
        counted = (targets != -100).sum()
        ctx.save_for_backward(grad_hidden, grad_weight, counted)
        ctx.weight_dtype = weight.dtype
        return total / counted

    @staticmethod
    def backward(ctx, grad_loss):
        grad_hidden, grad_weight, counted = ctx.saved_tensors
        scale = grad_loss / counted  # the mean's 1/N and whatever scaled the loss afterwards
        return (
            None if grad_hidden is None else grad_hidden * scale.to(grad_hidden.dtype),
            None if grad_weight is None else (grad_weight * scale).to(ctx.weight_dtype),
            None,
            None,
        )


def _chunked_head_loss(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, rows: int, want_hidden: bool, want_weight: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The summed cross-entropy of ``hidden @ weight.T`` against ``targets`` (-100: not counted), and
    when asked its gradients with respect to ``hidden`` and ``weight`` (float32 sums for the weight)."""
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if want_hidden else None
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_weight else None
    for start in range(0, hidden.size(0), rows):
        part, wanted = hidden[start : start + rows], targets[start : start + rows]
        raw = F.linear(part, weight)  # (rows, vocab), in the autocast dtype if any
        logits = _wide(raw)
        counted = wanted != -100
        picked = wanted.masked_fill(~counted, 0)[:, None]
        normalizer = logits.logsumexp(dim=-1, keepdim=True)
        total += ((normalizer - logits.gather(1, picked)).squeeze(1) * counted).sum()
        if grad_hidden is None and grad_weight is None:
            continue
        grad_logits = logits.sub_(normalizer).exp_()  # the softmax, in the logits' memory
        grad_logits.scatter_add_(1, picked, torch.full_like(picked, -1, dtype=grad_logits.dtype))
        grad_logits = grad_logits.mul_(counted[:, None]).to(raw.dtype)  # d(summed loss) / d(raw), as autograd
        if grad_hidden is not None:
            grad_hidden[start : start + rows] = grad_logits @ weight
        if grad_weight is not None:
            grad_weight += grad_logits.t() @ part
    return total, grad_hidden, grad_weight


def _wide(logits: torch.Tensor) -> torch.Tensor:
    """Logits in float32 at least: bf16 logits' loss is computed in float32."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


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
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, nn.Linear) or module.out_features <= module.in_features:
                continue
            weight = module.weight  # a tied head is the token embedding: both read the re-stored matrix
            if weight.device.type == "cpu" and weight.dtype == torch.float32:
                weight.data = weight.data.t().contiguous().t()  # a no-op for a weight already column-major
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
