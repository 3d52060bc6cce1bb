"""Blocks plugin ``reference``: the pure-Python model of ``reference_gpt.py`` inside ``anexa train``.

The block stack's arithmetic runs in plain Python (``reference_gpt.stack_forward`` and
``stack_backward``) while everything around it stays the core's: the token embedding, the tied head,
the loss, the optimizer, checkpoints, generation. The bridge is a ``torch.autograd.Function`` whose
forward turns the tensors into nested lists and back, and whose backward calls the hand-written
backward instead of PyTorch's autograd.

Parameters are held by ordinary ``nn.Embedding``/``nn.LayerNorm``/``nn.Linear`` modules (their own
``forward`` is never called) under the same names and with the same initialisation as the ``gpt2``
blocks with biases, so a reference run's weights load into ``gpt2`` blocks and back.

It is slow — thousands of times slower than PyTorch — and meant for a tiny config, e.g.
``anexa train --blocks reference --n-layer 1 --n-head 2 --n-embd 16 --block-size 16 --batch-size 4
--steps 30``. The attention plugin is not used: the reference computes attention itself, in plain
Python. It has no dropout. With a KV cache it computes the new positions only (keys and values
round-trip through ``cache.update``); such a forward is for decoding and carries no gradient.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from anexa_core import AnexaError, hookimpl

from . import reference_gpt


class _PurePythonStack(torch.autograd.Function):
    """``(x (B, T, C), positions (T,), n_head, names, *weights) → hidden (B, T, C)``, x's dtype and device.

    The computation is float64 whatever the tensors' dtype (Python floats); the result is cast back.
    """

    @staticmethod
    def forward(ctx, x, positions, n_head, names, *weights):
        batch, time, width = x.shape
        params = {name: weight.detach().tolist() for name, weight in zip(names, weights, strict=True)}
        rows = x.detach().reshape(batch * time, width).tolist()
        hidden, tape = reference_gpt.stack_forward(params, n_head, rows, batch, positions.tolist())
        ctx.tape, ctx.params, ctx.names = tape, params, names
        ctx.shapes = [(weight.shape, weight.dtype) for weight in weights]
        return torch.tensor(hidden, dtype=x.dtype, device=x.device).view(batch, time, width)

    @staticmethod
    def backward(ctx, grad_hidden):
        batch, time, width = grad_hidden.shape
        d_rows = grad_hidden.reshape(batch * time, width).tolist()
        dx, grads = reference_gpt.stack_backward(d_rows, ctx.tape, ctx.params)
        device = grad_hidden.device
        d_weights = [
            torch.tensor(grads[name], dtype=dtype, device=device).view(shape)
            for name, (shape, dtype) in zip(ctx.names, ctx.shapes, strict=True)
        ]
        dx = torch.tensor(dx, dtype=grad_hidden.dtype, device=device).view(batch, time, width)
        return (dx, None, None, None, *d_weights)


class _Attention(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)


class _MLP(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, 4 * width)
        self.proj = nn.Linear(4 * width, width)


class _Block(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.ln_1, self.attn = nn.LayerNorm(width), _Attention(width)
        self.ln_2, self.mlp = nn.LayerNorm(width), _MLP(width)


class ReferenceStack(nn.Module):
    """The gpt2 stack's parameters, computed on by ``reference_gpt``; see the module docstring."""

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.layers = nn.ModuleList(_Block(config.n_embd) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        for name, param in self.named_parameters():  # as the gpt2 blocks: GPT-2's initialisation
            if name.endswith("bias"):
                nn.init.zeros_(param)
            elif name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight")):
                nn.init.ones_(param)
            elif name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
            else:
                nn.init.normal_(param, mean=0.0, std=0.02)

    def forward(self, x, positions, cache=None):
        names, weights = zip(*self.named_parameters(), strict=True)
        if cache is None:
            return _PurePythonStack.apply(x, positions, self.n_head, names, *weights)
        return self._decode(x, positions, cache, names, weights)

    @torch.no_grad()
    def _decode(self, x, positions, cache, names, weights):
        """The forward over new positions only, attending over the cache's keys and values."""
        batch, time, width = x.shape

        def remember(layer, k, v):  # lists [b][h][t][d] → the cache's tensors → lists again
            as_tensor = lambda lists: torch.tensor(lists, dtype=x.dtype, device=x.device)  # noqa: E731
            keys, values = cache.update(layer, as_tensor(k), as_tensor(v))
            return keys.tolist(), values.tolist()

        params = {name: weight.tolist() for name, weight in zip(names, weights, strict=True)}
        rows = x.reshape(batch * time, width).tolist()
        hidden, _ = reference_gpt.stack_forward(params, self.n_head, rows, batch, positions.tolist(), remember)
        return torch.tensor(hidden, dtype=x.dtype, device=x.device).view(batch, time, width)


@dataclass
class Reference:
    """GPT-2's blocks computed in plain Python (``reference_gpt.py``): for reading and for tests, not speed."""

    def build(self, config, attention) -> nn.Module:
        if config.dropout:
            raise AnexaError(f"the reference blocks have no dropout: use --dropout 0 (got {config.dropout})")
        return ReferenceStack(config)


@hookimpl
def register_blocks(register):
    register("reference", Reference)
