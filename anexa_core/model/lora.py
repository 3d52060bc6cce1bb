"""LoRA: low-rank adapters on a model's linear layers (Hu et al. 2021), through the ``peft`` library.

Each targeted ``nn.Linear`` ``W`` (out × in) gains ``B·A`` with ``A`` (r × in) and ``B`` (out × r), scaled by
``alpha / r``: ``y = W x + (alpha / r) · B A x``. ``B`` starts at zero, so training starts from the base
model exactly; only ``A`` and ``B`` train. A LoRA run stores only those (a few MB), with a reference to its
base and the base's SHA-256; :func:`merge` folds them into plain weights for inference and export.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from anexa_core.errors import AnexaError, choose_one_of

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "qkv", "attn.proj")
"""The attention projections of the built-in blocks (llama: q/k/v/o_proj; gpt2: qkv and attn.proj)."""


@dataclass(frozen=True)
class LoraSpec:
    """``r``: the adapters' rank; ``alpha``: their scale numerator (the update is ``alpha / r · B A``);
    ``dropout``: on the adapters' input while training; ``targets``: module-name suffixes of the linear
    layers to adapt (``q_proj``, ``mlp.fc``, …)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    targets: tuple[str, ...] = field(default_factory=lambda: DEFAULT_TARGETS)

    def __post_init__(self) -> None:
        if not 1 <= self.r <= 4096:
            raise AnexaError(f"--lora r={self.r}: the rank must be between 1 and 4096, e.g. r=16")
        if not self.alpha > 0:
            raise AnexaError(f"--lora alpha={self.alpha}: the scale must be positive, e.g. alpha=32")
        if not 0 <= self.dropout < 1:
            raise AnexaError(f"--lora dropout={self.dropout}: must be in [0, 1), e.g. dropout=0.05")
        if not self.targets:
            raise AnexaError("--lora targets= names no module: give e.g. targets=q_proj,v_proj")

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "targets": list(self.targets)}

    @classmethod
    def parse(cls, text: str) -> LoraSpec:
        """``r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj`` (every key optional; ``targets`` takes the
        comma-separated names that follow it). Raises :class:`AnexaError` naming a bad key or value."""
        values: dict[str, Any] = {}
        current = None
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            key, equals, value = part.partition("=")
            if not equals:
                if current != "targets":
                    raise AnexaError(
                        f"bad --lora {text!r}: use KEY=VALUE pairs, e.g. r=16,alpha=32,targets=q_proj,v_proj"
                    )
                values["targets"] = (*values["targets"], part)
                continue
            current = key.strip()
            try:
                if current in ("r", "alpha"):
                    values[current] = int(value)
                elif current == "dropout":
                    values[current] = float(value)
                elif current == "targets":
                    values["targets"] = tuple(name for name in value.split("+") if name)
                else:
                    raise AnexaError(f"--lora has no key {current!r}: use r, alpha, dropout and targets")
            except ValueError:
                kind = "a whole number" if current in ("r", "alpha") else "a number"
                raise AnexaError(f"--lora {current}={value!r} is not {kind}") from None
        return cls(**values)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> LoraSpec:
        return cls(**{**values, "targets": tuple(values.get("targets", DEFAULT_TARGETS))})


def linear_names(model: nn.Module) -> list[str]:
    """The names of every ``nn.Linear`` of ``model`` but the head: what ``targets`` can match."""
    return [name for name, module in model.named_modules() if isinstance(module, nn.Linear) and name != "lm_head"]


def _peft() -> Any:
    try:
        import peft
    except ImportError:
        raise AnexaError("LoRA needs the peft library: pip install 'anexa[lora]'") from None
    return peft


def apply_lora(model: nn.Module, spec: LoraSpec) -> int:
    """Wrap the linear layers ``spec.targets`` match with LoRA adapters (in place), freeze everything else;
    returns the number of trainable parameters. Raises :class:`AnexaError` when a target the user named (or,
    for the defaults, every one) matches no layer, or when peft is not installed."""
    peft = _peft()
    LoraConfig, inject_adapter_in_model = peft.LoraConfig, peft.inject_adapter_in_model

    names = linear_names(model)

    def matches(name: str, target: str) -> bool:
        return name == target or name.endswith("." + target)

    matched = [name for name in names if any(matches(name, t) for t in spec.targets)]
    # The defaults name every family's attention projections (some match nothing here); a target the user
    # names must match a layer, or one part of the request would be dropped without a word.
    unmatched = [t for t in spec.targets if not any(matches(name, t) for name in names)]
    if not matched or (unmatched and spec.targets != DEFAULT_TARGETS):
        suffixes = sorted({name.rpartition(".")[2] for name in names})
        missing = unmatched if matched else list(spec.targets)
        raise AnexaError(
            f"--lora targets {', '.join(missing)} match no linear layer of this model: "
            f"{choose_one_of(missing[0], suffixes)}"
        )
    config = LoraConfig(r=spec.r, lora_alpha=spec.alpha, lora_dropout=spec.dropout, target_modules=matched)
    inject_adapter_in_model(config, model)
    return trainable_parameters(model)


def trainable_parameters(model: nn.Module) -> int:
    """The number of parameters of ``model`` that train (``requires_grad``): a LoRA model's adapters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors (``….lora_A.weight``, ``….lora_B.weight``), CPU copies."""
    from peft import get_peft_model_state_dict

    return {name: tensor.detach().cpu().contiguous() for name, tensor in get_peft_model_state_dict(model).items()}


def load_adapter(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put saved adapter tensors back into a model :func:`apply_lora` prepared; a mismatch is one line."""
    from peft import set_peft_model_state_dict

    # torch's (missing_keys, unexpected_keys) of load_state_dict(strict=False); peft annotates it `namedtuple`
    result: Any = set_peft_model_state_dict(model, tensors)
    missing = [name for name in result.missing_keys if "lora_" in name]  # the base's own weights load apart
    if missing or result.unexpected_keys:
        raise AnexaError(
            f"the adapter does not fit its base model (missing {missing[:2]}, unexpected "
            f"{list(result.unexpected_keys)[:2]}): the base has changed"
        )


def merge(model: nn.Module) -> None:
    """Fold every adapter into its linear layer (``W + alpha/r · B A``) and drop the adapters, leaving a
    plain model with the base's parameter names: what inference and export use."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, LoraLayer):
            module.merge()
            parent, _, child = name.rpartition(".")  # get_submodule("") is the model itself
            setattr(model.get_submodule(parent), child, module.get_base_layer())
    if hasattr(model, "peft_config"):  # peft's record of the adapters, gone now (a LoRA run of it warned)
        del model.peft_config
    for parameter in model.parameters():
        parameter.requires_grad_(True)
