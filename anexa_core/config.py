"""Model and training configuration: presets, overridden by a TOML file, then by CLI flags."""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError


@dataclass
class ModelConfig:
    """The architecture; saved inside every checkpoint."""

    vocab_size: int = 0  # filled in from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    bias: bool = True
    blocks: str = "gpt2"
    attention: str = "sdpa"

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise AnexaError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise AnexaError(f"{name} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise AnexaError("dropout must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    """How to train; saved beside the optimizer state so a resumed run continues identically."""

    data: str = "sherlock"
    tokenizer: str = "char"
    vocab_size: int | None = None  # for trainable-vocabulary tokenizers such as bpe
    steps: int = 5000
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_batches: int = 20
    save_every: int = 1000
    seed: int = 1337
    device: str = "auto"

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                raise AnexaError(f"--{name.replace('_', '-')} must be at least 1")
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise AnexaError("learning rates must satisfy 0 <= min_lr <= lr and lr > 0")
        if self.warmup_steps < 0 or self.grad_clip < 0 or self.weight_decay < 0:
            raise AnexaError("warmup_steps, grad_clip and weight_decay must not be negative")


@dataclass
class Preset:
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    # The seed's model: about 0.8M parameters with a character vocabulary.
    "seed": Preset(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), train=dict(batch_size=32)),
    # nanoGPT's shakespeare_char size: about 10.7M parameters.
    "small": Preset(
        model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
        train=dict(batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=100),
    ),
}


def _split(values: dict[str, Any], source: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """Sort flat keys into model and train fields; unknown keys are an error."""
    model_fields = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model, train = {}, {}
    for key, value in values.items():
        if key in model_fields:
            model[key] = value
        elif key in train_fields:
            train[key] = value
        else:
            known = ", ".join(sorted(model_fields | train_fields))
            raise AnexaError(f"unknown setting {key!r} in {source}: use one of {known}")
    return model, train


def read_toml(path: Path) -> dict[str, Any]:
    """A config file: flat keys, or ``[model]`` and ``[train]`` tables."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnexaError(f"config file {path} not found: pass an existing --config FILE.toml") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise AnexaError(f"config file {path} is not valid TOML ({exc}): fix the file") from None
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def resolve(
    preset: str = "seed", config_file: Path | None = None, overrides: dict[str, Any] | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then the TOML file, then explicit overrides (``None`` values are ignored)."""
    if preset not in PRESETS:
        raise AnexaError(f"unknown preset {preset!r}: choose one of {', '.join(PRESETS)}")
    model = dict(PRESETS[preset].model)
    train = dict(PRESETS[preset].train)
    layers = []
    if config_file is not None:
        layers.append((read_toml(config_file), str(config_file)))
    layers.append(({k: v for k, v in (overrides or {}).items() if v is not None}, "flags"))
    for values, source in layers:
        model_part, train_part = _split(values, source)
        model.update(model_part)
        train.update(train_part)
    try:
        return ModelConfig(**model), TrainConfig(**train)
    except TypeError as exc:
        raise AnexaError(f"bad setting: {exc}") from None
