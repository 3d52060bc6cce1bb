"""Blocks plugin ``gpt2``: pre-LayerNorm transformer blocks, learned positions, GELU MLP (the seed's architecture).

Written against the public blocks contract only (``anexa_core.Blocks``): the stack gets token
embeddings, their absolute positions and an optional :class:`~anexa_core.KVCache`; each attention layer
calls ``cache.update(layer, k, v)`` and attends over what it returns.
"""

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from anexa_core import AnexaError, hookimpl


class SelfAttention(nn.Module):
    """Multi-head causal self-attention; the score computation itself is the attention plugin's."""

    def __init__(self, config, attention, layer: int, bias: bool):
        super().__init__()
        self.n_head = config.n_head
        self.layer = layer
        self.attention = attention
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd, bias=bias)
        self.proj = nn.Linear(config.n_embd, config.n_embd, bias=bias)
        self.resid_drop = nn.Dropout(config.dropout)

    def forward(self, x, cache=None):
        batch, time, channels = x.shape
        q, k, v = (
            t.view(batch, time, self.n_head, channels // self.n_head).transpose(1, 2)
            for t in self.qkv(x).split(channels, dim=2)
        )
        lengths = None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)
            lengths = cache.lengths(self.layer)
        y = self.attention(q, k, v, causal=True, lengths=lengths)
        y = y.transpose(1, 2).contiguous().view(batch, time, channels)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    def __init__(self, config, bias: bool, gelu: str = "exact"):
        super().__init__()
        self.fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=bias)
        self.gelu = nn.GELU(approximate="tanh" if gelu == "tanh" else "none")
        self.proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.proj(self.gelu(self.fc(x))))


class Block(nn.Module):
    def __init__(self, config, attention, layer: int, bias: bool, gelu: str = "exact"):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=bias)
        self.attn = SelfAttention(config, attention, layer, bias)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=bias)
        self.mlp = MLP(config, bias, gelu)

    def forward(self, x, cache=None):
        x = x + self.attn(self.ln_1(x), cache)
        return x + self.mlp(self.ln_2(x))


class GPT2Stack(nn.Module):
    """Learned positions, ``n_layer`` blocks, final LayerNorm."""

    batched = True  # rows at different positions ((B, T) positions, ragged cache lengths) in one batch

    def __init__(self, config, attention, bias: bool = True, gelu: str = "exact"):
        super().__init__()
        self.block_size = config.block_size
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.layers = nn.ModuleList(Block(config, attention, i, bias, gelu) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=bias)
        self.apply(_init_weights)
        # GPT-2: residual projections scaled down so the residual stream's variance stays put with depth.
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, x, positions, cache=None):
        if int(positions.max()) >= self.block_size:
            raise ValueError(f"position {int(positions.max())} is beyond block_size {self.block_size}")
        x = x + self.wpe(positions)  # positions (T,) or (B, T)
        for layer in self.layers:
            x = layer(x, cache)
        return self.ln_f(x)


def _init_weights(module):
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, mean=0.0, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


@dataclass
class GPT2:
    """GPT-2's family (Radford et al. 2019, as in nanoGPT): the seed model's architecture."""

    bias: bool = field(default=True, metadata={"help": "biases in linear layers and LayerNorms"})
    gelu: Literal["exact", "tanh"] = field(
        default="exact", metadata={"help": "GELU exactly (erf), or its tanh approximation (OpenAI's GPT-2)"}
    )

    hf_architectures: ClassVar[tuple[str, ...]] = ("GPT2LMHeadModel",)

    def build(self, config, attention) -> nn.Module:
        return GPT2Stack(config, attention, bias=self.bias, gelu=self.gelu)

    def export_hf(self, config, state_dict):
        """Hugging Face's ``GPT2LMHeadModel``: ``(config.json entries, weights under its names)``.

        ``state_dict`` is the whole model's (``wte.weight``, ``blocks.…``, ``lm_head.weight`` only when
        untied), float tensors. GPT-2's ``Conv1D`` layers store their weight as (in, out), the transpose
        of ``nn.Linear``'s (out, in). HF's GPT-2 always has biases: without them (``bias=false``) they
        are exported as zeros, which computes the same. The activation is exact GELU (``"gelu"``), or
        GPT-2's tanh approximation (``"gelu_new"``) with ``gelu="tanh"``.
        """
        tensors = {
            "transformer.wte.weight": state_dict["wte.weight"],
            "transformer.wpe.weight": state_dict["blocks.wpe.weight"],
        }

        def copy(ours, theirs, transpose=False):
            weight = state_dict[f"{ours}.weight"]
            tensors[f"{theirs}.weight"] = weight.t().contiguous() if transpose else weight
            size = weight.size(0)
            tensors[f"{theirs}.bias"] = state_dict.get(f"{ours}.bias", torch.zeros(size, dtype=weight.dtype))

        for i in range(config.n_layer):
            ours, theirs = f"blocks.layers.{i}", f"transformer.h.{i}"
            copy(f"{ours}.ln_1", f"{theirs}.ln_1")
            copy(f"{ours}.attn.qkv", f"{theirs}.attn.c_attn", transpose=True)
            copy(f"{ours}.attn.proj", f"{theirs}.attn.c_proj", transpose=True)
            copy(f"{ours}.ln_2", f"{theirs}.ln_2")
            copy(f"{ours}.mlp.fc", f"{theirs}.mlp.c_fc", transpose=True)
            copy(f"{ours}.mlp.proj", f"{theirs}.mlp.c_proj", transpose=True)
        copy("blocks.ln_f", "transformer.ln_f")
        if "lm_head.weight" in state_dict:
            tensors["lm_head.weight"] = state_dict["lm_head.weight"]
        hf_config = {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "n_embd": config.n_embd,
            "n_layer": config.n_layer,
            "n_head": config.n_head,
            "n_positions": config.block_size,
            "n_inner": 4 * config.n_embd,
            "activation_function": "gelu" if self.gelu == "exact" else "gelu_new",
            "layer_norm_epsilon": 1e-5,
            # Anexa drops out the embeddings and each residual branch's output, never attention weights.
            "embd_pdrop": config.dropout,
            "resid_pdrop": config.dropout,
            "attn_pdrop": 0.0,
            "scale_attn_weights": True,
            "scale_attn_by_inverse_layer_idx": False,
            "reorder_and_upcast_attn": False,
            "initializer_range": 0.02,
            "use_cache": True,
        }
        return hf_config, tensors

    @staticmethod
    def import_hf(hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        """The inverse of :meth:`export_hf`: a transformers ``GPT2LMHeadModel`` (OpenAI's GPT-2 included)
        as ``(model settings, blocks options, state dict under Anexa's names)``; what these blocks cannot
        compute raises :class:`AnexaError` naming it."""
        name = "GPT2LMHeadModel cannot be imported into blocks 'gpt2'"
        if "transformer.wte.weight" not in tensors and "wte.weight" in tensors:
            # The base model's names, as OpenAI's GPT-2 weights on the Hub are saved (transformers adds the prefix).
            tensors = {
                key if key.startswith("lm_head.") else f"transformer.{key}": value for key, value in tensors.items()
            }
        n_embd = int(hf_config["n_embd"])
        activation = hf_config.get("activation_function", "gelu_new")
        refusals = {
            f"activation {activation!r}": activation not in ("gelu", "gelu_new", "gelu_pytorch_tanh"),
            "an MLP width other than 4 × n_embd": hf_config.get("n_inner") not in (None, 4 * n_embd),
            "unscaled attention": not hf_config.get("scale_attn_weights", True),
            "attention scaled by the inverse layer index": bool(hf_config.get("scale_attn_by_inverse_layer_idx")),
            "a LayerNorm epsilon other than 1e-5": float(hf_config.get("layer_norm_epsilon", 1e-5)) != 1e-5,
        }
        for what, refused in refusals.items():
            if refused:
                raise AnexaError(f"{name}: it uses {what}, which Anexa's gpt2 blocks do not compute")
        settings = {
            "n_layer": int(hf_config["n_layer"]),
            "n_head": int(hf_config["n_head"]),
            "n_embd": n_embd,
            "block_size": int(hf_config.get("n_positions") or 1024),
            "vocab_size": int(hf_config["vocab_size"]),
            "tie_embeddings": bool(hf_config.get("tie_word_embeddings", True)),
        }
        options = {"bias": True, "gelu": "exact" if activation == "gelu" else "tanh"}
        state = {
            "wte.weight": tensors["transformer.wte.weight"],
            "blocks.wpe.weight": tensors["transformer.wpe.weight"],
        }

        def copy(theirs, ours, transpose=False):
            weight = tensors[f"{theirs}.weight"]
            state[f"{ours}.weight"] = weight.t().contiguous() if transpose else weight
            state[f"{ours}.bias"] = tensors[f"{theirs}.bias"]

        for i in range(settings["n_layer"]):
            theirs, ours = f"transformer.h.{i}", f"blocks.layers.{i}"
            copy(f"{theirs}.ln_1", f"{ours}.ln_1")
            copy(f"{theirs}.attn.c_attn", f"{ours}.attn.qkv", transpose=True)
            copy(f"{theirs}.attn.c_proj", f"{ours}.attn.proj", transpose=True)
            copy(f"{theirs}.ln_2", f"{ours}.ln_2")
            copy(f"{theirs}.mlp.c_fc", f"{ours}.mlp.fc", transpose=True)
            copy(f"{theirs}.mlp.c_proj", f"{ours}.mlp.proj", transpose=True)
        copy("transformer.ln_f", "blocks.ln_f")
        if not settings["tie_embeddings"]:
            state["lm_head.weight"] = tensors["lm_head.weight"]
        return settings, options, state


@hookimpl
def register_blocks(register):
    register("gpt2", GPT2)
