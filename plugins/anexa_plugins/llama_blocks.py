"""Blocks plugin ``llama``: the LLaMA family's block (Touvron et al. 2023) with its choices as options.

RMSNorm before attention and MLP (Zhang & Sennrich 2019), rotary position embeddings applied to queries
and keys at their absolute positions (RoPE, Su et al. 2021, in the "rotate half" layout Hugging Face's
``LlamaForCausalLM`` uses), no biases, a final RMSNorm. Options make the architectural choices that
the modded-nanogpt speedrun tuned into switches: the MLP (SwiGLU, Shazeer 2020; ReLU², So et al. 2021;
GELU), RMSNorm on queries and keys (QK-norm, Dehghani et al. 2023), grouped-query attention (Ainslie et
al. 2023), zero-initialised output projections. Written only against the public blocks contract.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from anexa_core import AnexaError, hookimpl


def rotary_angles(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(cos, sin)`` of the rotary angles of ``positions`` (T,) — or (B, T) for rows at different
    positions — for heads of width ``head_dim``: pair (i, i + D/2) turns by ``position / theta^(2i/D)``
    (Su et al. 2021). Shapes (T, D/2) or (B, 1, T, D/2), in ``dtype`` (float32 at least: the stack computes
    them once per forward pass for every layer)."""
    half = head_dim // 2
    inv_freq = theta ** (-torch.arange(0, half, device=positions.device, dtype=dtype) / half)
    angles = positions.to(dtype)[..., None] * inv_freq  # (T, D/2) or (B, T, D/2)
    if angles.dim() == 3:
        angles = angles[:, None]  # (B, 1, T, D/2): the same angles for every head
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` (B, H, T, D) by :func:`rotary_angles` in the "rotate half" layout. A dot product of two
    rotated vectors depends only on their distance."""
    half = x.size(-1) // 2
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    first, second = x[..., :half], x[..., half:]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)


class Attention(nn.Module):
    def __init__(self, config, attention, layer: int, family: Llama):
        super().__init__()
        self.layer, self.attention, self.family = layer, attention, family
        self.n_head = config.n_head
        self.n_kv_head = family.n_kv_head or config.n_head
        self.head_dim = family.head_dim or config.head_dim
        self.q_proj = nn.Linear(config.n_embd, self.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(config.n_embd, self.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_head * self.head_dim, config.n_embd, bias=False)
        self.q_norm = nn.RMSNorm(self.head_dim, eps=family.norm_eps) if family.qk_norm else None
        self.k_norm = nn.RMSNorm(self.head_dim, eps=family.norm_eps) if family.qk_norm else None
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x, angles, cache=None):
        batch, time, _ = x.shape
        q = self.q_proj(x).view(batch, time, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, time, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # in the norm weights' dtype: float32 under bf16 autocast, else the model's
            dtype = self.q_norm.weight.dtype
            q, k = self.q_norm(q.to(dtype)).to(v.dtype), self.k_norm(k.to(dtype)).to(v.dtype)
        q, k = apply_rotary(q, *angles), apply_rotary(k, *angles)
        lengths = None
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # the cache keeps the (fewer) key/value heads
            lengths = cache.lengths(self.layer)
        # Grouped-query: k and v keep their n_kv_head heads; the attention serves each to n_head / n_kv_head queries.
        y = self.attention(q, k, v, causal=True, lengths=lengths).transpose(1, 2).reshape(batch, time, -1)
        return self.drop(self.o_proj(y))


class MLP(nn.Module):
    def __init__(self, config, family: Llama):
        super().__init__()
        self.kind = family.mlp
        hidden = family.hidden_size(config.n_embd)
        if self.kind == "swiglu":
            self.gate_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.n_embd, bias=False)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        up = self.up_proj(x)
        if self.kind == "swiglu":
            hidden = F.silu(self.gate_proj(x)) * up
        elif self.kind == "relu2":
            hidden = F.relu(up).square()
        else:
            hidden = F.gelu(up)
        return self.drop(self.down_proj(hidden))


class Block(nn.Module):
    def __init__(self, config, attention, layer: int, family: Llama):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.n_embd, eps=family.norm_eps)
        self.self_attn = Attention(config, attention, layer, family)
        self.post_attention_layernorm = nn.RMSNorm(config.n_embd, eps=family.norm_eps)
        self.mlp = MLP(config, family)

    def forward(self, x, angles, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), angles, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaStack(nn.Module):
    """``n_layer`` blocks and the final RMSNorm; positions enter through the rotary embedding only."""

    batched = True  # rows at different positions ((B, T) positions, ragged cache lengths) in one batch

    def __init__(self, config, attention, family: Llama):
        super().__init__()
        self.layers = nn.ModuleList(Block(config, attention, i, family) for i in range(config.n_layer))
        self.norm = nn.RMSNorm(config.n_embd, eps=family.norm_eps)
        self.rope_theta = family.rope_theta
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
        for name, param in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):  # the residual branch's outputs
                if family.zero_init:
                    nn.init.zeros_(param)
                else:
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def forward(self, x, positions, cache=None):
        # The angles are the same in every layer: computed once per forward, not n_layer times.
        dtype = torch.promote_types(x.dtype, torch.float32)
        angles = rotary_angles(positions, self.layers[0].self_attn.head_dim, self.rope_theta, dtype)
        for layer in self.layers:
            x = layer(x, angles, cache)
        return self.norm(x)


@dataclass
class Llama:
    """The LLaMA family; every architectural choice is an option (``-o blocks.mlp=relu2``)."""

    rope_theta: float = field(default=10000.0, metadata={"help": "RoPE base: larger turns more slowly"})
    mlp: Literal["swiglu", "relu2", "gelu"] = field(default="swiglu", metadata={"help": "MLP nonlinearity"})
    mlp_hidden: int = field(default=0, metadata={"help": "MLP width; 0: 8/3·n_embd (swiglu) or 4·n_embd"})
    qk_norm: bool = field(default=False, metadata={"help": "RMSNorm on queries and keys per head"})
    n_kv_head: int = field(default=0, metadata={"help": "key/value heads (grouped-query); 0: n_head"})
    head_dim: int = field(default=0, metadata={"help": "width of each head; 0: n_embd / n_head"})
    norm_eps: float = 1e-5
    zero_init: bool = field(default=False, metadata={"help": "output projections start at zero"})

    def __post_init__(self) -> None:
        if not self.rope_theta > 1:
            raise AnexaError(f"llama rope_theta must be above 1, got {self.rope_theta}")
        if self.mlp_hidden < 0 or self.n_kv_head < 0 or self.head_dim < 0:
            raise AnexaError("llama mlp_hidden, n_kv_head and head_dim must not be negative (0 picks the default)")
        if not self.norm_eps > 0:
            raise AnexaError(f"llama norm_eps must be positive, got {self.norm_eps}")

    def hidden_size(self, n_embd: int) -> int:
        """The MLP width: ``mlp_hidden``, else LLaMA's 2/3 of 4·n_embd for SwiGLU (same parameters as a
        4× two-matrix MLP), rounded up to a multiple of 16, or 4·n_embd."""
        if self.mlp_hidden:
            return self.mlp_hidden
        if self.mlp == "swiglu":
            return 16 * math.ceil(8 * n_embd / 3 / 16)
        return 4 * n_embd

    def build(self, config, attention) -> nn.Module:
        head_dim = self.head_dim or config.head_dim
        if head_dim % 2:
            fix = "-o blocks.head_dim" if self.head_dim else "n_embd or n_head"
            raise AnexaError(f"rotary embeddings need an even head_dim, got {head_dim}: change {fix}")
        if config.n_head % (self.n_kv_head or config.n_head):
            raise AnexaError(f"n_head ({config.n_head}) must be a multiple of llama n_kv_head ({self.n_kv_head})")
        return LlamaStack(config, attention, self)

    hf_architectures: ClassVar[tuple[str, ...]] = ("LlamaForCausalLM", "Qwen3ForCausalLM")

    @staticmethod
    def import_hf(hf_config: dict[str, Any], tensors: dict[str, torch.Tensor]):
        """The inverse of :meth:`Llama.export_hf`: a transformers ``LlamaForCausalLM`` or ``Qwen3ForCausalLM``
        (``config.json`` entries and weights under its names) as ``(model settings, blocks options, state dict
        under Anexa's names)``. Grouped-query heads, a tied or untied head, ``rope_theta``, the RMSNorm
        epsilon, Qwen3's QK-norm and a head width other than ``hidden_size / num_attention_heads`` carry over;
        what these blocks cannot compute (rotary scaling, attention or MLP biases, another activation, sliding
        windows) raises :class:`AnexaError` naming it."""
        architecture = hf_config["architectures"][0]
        name = f"{architecture} cannot be imported into blocks 'llama'"
        rope = dict(hf_config.get("rope_parameters") or {})
        scalings = [dict(part) for part in (hf_config.get("rope_scaling"), rope) if part]
        kinds = [part.get("rope_type") or part.get("type") or "default" for part in scalings]
        rope_type = next((kind for kind in kinds if kind != "default"), "default")
        refusals = {
            f"rotary scaling {rope_type!r}": rope_type != "default",
            "attention biases": bool(hf_config.get("attention_bias")),
            "MLP biases": bool(hf_config.get("mlp_bias")),
            f"activation {hf_config.get('hidden_act')!r}": hf_config.get("hidden_act", "silu") != "silu",
            "sliding-window attention": bool(hf_config.get("use_sliding_window"))
            or any(kind != "full_attention" for kind in hf_config.get("layer_types") or []),
        }
        for what, refused in refusals.items():
            if refused:
                raise AnexaError(f"{name}: it uses {what}, which Anexa's llama blocks do not compute")
        n_embd, n_head = int(hf_config["hidden_size"]), int(hf_config["num_attention_heads"])
        n_kv_head = int(hf_config.get("num_key_value_heads") or n_head)
        head_dim = int(hf_config.get("head_dim") or n_embd // n_head)
        settings = {
            "n_layer": int(hf_config["num_hidden_layers"]),
            "n_head": n_head,
            "n_embd": n_embd,
            "block_size": int(hf_config.get("max_position_embeddings") or 2048),
            "vocab_size": int(hf_config["vocab_size"]),
            "tie_embeddings": bool(hf_config.get("tie_word_embeddings", "lm_head.weight" not in tensors)),
        }
        options = {
            "rope_theta": float(rope.get("rope_theta") or hf_config.get("rope_theta") or 10000.0),
            "mlp": "swiglu",
            "mlp_hidden": int(hf_config["intermediate_size"]),
            "qk_norm": architecture == "Qwen3ForCausalLM",
            "n_kv_head": n_kv_head if n_kv_head != n_head else 0,
            "head_dim": head_dim if head_dim * n_head != n_embd else 0,
            "norm_eps": float(hf_config.get("rms_norm_eps", 1e-6)),
        }
        state = {"wte.weight": tensors["model.embed_tokens.weight"]}
        for key, tensor in tensors.items():
            if key.startswith("model.") and key != "model.embed_tokens.weight":
                state["blocks." + key.removeprefix("model.")] = tensor
        if not settings["tie_embeddings"]:
            state["lm_head.weight"] = tensors["lm_head.weight"]
        return settings, options, state

    def export_hf(self, config, state_dict):
        """Hugging Face's ``LlamaForCausalLM``, or ``Qwen3ForCausalLM`` with ``qk_norm`` (Qwen3's attention
        applies an RMSNorm per head to queries and keys before the rotary embedding, exactly as here):
        ``(config.json entries, weights under its names)``.

        The stack's parameter names are already HF's (under ``model.``) and the rotary layout is HF's
        "rotate half", so the weights copy as they are. Both HF families' MLP is SwiGLU, so ``mlp`` other
        than ``swiglu`` raises :class:`AnexaError`. HF's models have no residual dropout; at inference
        that changes nothing.
        """
        if self.mlp != "swiglu":
            raise AnexaError(
                f"blocks 'llama' with mlp={self.mlp!r} cannot be exported to Hugging Face: "
                "LlamaForCausalLM's and Qwen3ForCausalLM's MLP is swiglu only"
            )
        tensors = {"model.embed_tokens.weight": state_dict["wte.weight"]}
        for name, tensor in state_dict.items():
            if name.startswith("blocks."):
                tensors["model." + name.removeprefix("blocks.")] = tensor
        if "lm_head.weight" in state_dict:
            tensors["lm_head.weight"] = state_dict["lm_head.weight"]
        hf_config = {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": config.n_embd,
            "intermediate_size": self.hidden_size(config.n_embd),
            "num_hidden_layers": config.n_layer,
            "num_attention_heads": config.n_head,
            "num_key_value_heads": self.n_kv_head or config.n_head,
            "head_dim": self.head_dim or config.head_dim,
            "max_position_embeddings": config.block_size,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": "silu",
            "attention_bias": False,
            "mlp_bias": False,
            "attention_dropout": 0.0,
            # transformers ≥ 5 reads rope_parameters; earlier versions read rope_theta.
            "rope_theta": self.rope_theta,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "initializer_range": 0.02,
            "pretraining_tp": 1,
            "use_cache": True,
        }
        if self.qk_norm:
            hf_config.update(
                architectures=["Qwen3ForCausalLM"],
                model_type="qwen3",
                use_sliding_window=False,
                sliding_window=None,
                max_window_layers=config.n_layer,
                layer_types=["full_attention"] * config.n_layer,
            )
        return hf_config, tensors


@hookimpl
def register_blocks(register):
    register("llama", Llama)
