"""Checkpoints as safetensors, written atomically. No pickle anywhere.

``model.safetensors``: weights, with JSON metadata (model config, tokenizer, plugin names and
versions, step, val loss). ``train_state.safetensors``: AdamW moments and RNG states, with the
training config, step and optimizer hyper-parameters as metadata.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from anexa_core import plugins
from anexa_core.config import ModelConfig
from anexa_core.errors import AnexaError
from anexa_core.files import atomic_path
from anexa_core.interfaces import Tokenizer
from anexa_core.model import GPT, build_model

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.safetensors"
FORMAT = "anexa/1"


def _plugin_versions(names: dict[str, str]) -> dict[str, dict[str, str | None]]:
    """For each (kind, name) used, the distribution and version of the plugin that provides it."""
    described = plugins.describe_plugins()
    out = {}
    for kind, name in names.items():
        owner = next((p for p in described if name in p["registers"].get(kind, [])), {})
        out[kind] = {"name": name, "distribution": owner.get("distribution"), "version": owner.get("version")}
    return out


def save_model(path: Path, model: GPT, tokenizer_name: str, tokenizer: Tokenizer, **info: Any) -> None:
    """Write weights and everything needed to rebuild the model and tokenizer."""
    config = model.config
    meta = {
        "format": FORMAT,
        "anexa_version": importlib.metadata.version("anexa"),
        "model_config": dataclasses.asdict(config),
        "tokenizer": {"name": tokenizer_name, "data": tokenizer.to_dict()},
        "plugins": _plugin_versions(
            {"blocks": config.blocks, "attention": config.attention, "tokenizers": tokenizer_name}
        ),
        **info,
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_model(model, str(tmp), metadata={"anexa": json.dumps(meta)})


def read_metadata(path: Path) -> dict[str, Any]:
    """The Anexa metadata of a checkpoint; a one-line error when it is missing, foreign or corrupt."""
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    if not path.is_file():
        raise AnexaError(f"no checkpoint at {path}: train one with `anexa train` or pass --model DIR")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("anexa")
        meta = json.loads(raw) if raw else None
    except Exception as exc:  # safetensors raises several error types for damaged headers
        raise AnexaError(f"checkpoint {path} is corrupt ({type(exc).__name__}): retrain or pass another --model") from None
    if not meta or meta.get("format") != FORMAT:
        raise AnexaError(f"{path} is not an Anexa checkpoint: pass a model.safetensors written by `anexa train`")
    return meta


def load_model(path: Path, device: str | torch.device = "cpu", attention: str | None = None):
    """Rebuild ``(model, tokenizer, metadata)`` from a checkpoint file or run folder.

    ``attention`` swaps the attention backend (weights do not depend on it).
    """
    path = Path(path)
    if path.is_dir():
        path = path / MODEL_FILE
    meta = read_metadata(path)
    config = ModelConfig(**meta["model_config"])
    if attention is not None:
        config = dataclasses.replace(config, attention=attention)
    tokenizer = plugins.get("tokenizers", meta["tokenizer"]["name"]).from_dict(meta["tokenizer"]["data"])
    model = build_model(config)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False, device=str(device))
    except Exception as exc:
        raise AnexaError(f"checkpoint {path} is corrupt ({type(exc).__name__}): retrain or pass another --model") from None
    if missing or unexpected:
        raise AnexaError(
            f"checkpoint {path} does not match the {config.blocks!r} blocks "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): is the right plugin installed?"
        )
    return model.to(device), tokenizer, meta


def save_train_state(path: Path, optimizer: torch.optim.Optimizer, rng: dict[str, torch.Tensor], **info: Any) -> None:
    """Optimizer moments and RNG states as tensors; hyper-parameters and ``info`` as JSON metadata."""
    state = optimizer.state_dict()
    tensors = {f"rng.{name}": t.contiguous().cpu() for name, t in rng.items()}
    for index, param_state in state["state"].items():
        for key, value in param_state.items():
            tensors[f"optim.{index}.{key}"] = value.contiguous().cpu()
    meta = {"format": FORMAT, "param_groups": state["param_groups"], **info}
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"anexa": json.dumps(meta)})


def load_train_state(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Restore the optimizer in place; return the RNG states and the metadata."""
    meta = read_metadata(path)
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:
        raise AnexaError(f"training state {path} is corrupt ({type(exc).__name__}): start a new run") from None
    per_param: dict[int, dict[str, torch.Tensor]] = {}
    rng = {}
    for name, tensor in tensors.items():
        kind, _, rest = name.partition(".")
        if kind == "rng":
            rng[rest] = tensor
        else:
            index, _, key = rest.partition(".")
            per_param.setdefault(int(index), {})[key] = tensor
    optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
    return rng, meta


def latest_run(runs_dir: Path) -> Path:
    """The most recently written model under ``runs_dir``."""
    found = sorted(Path(runs_dir).glob(f"*/{MODEL_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise AnexaError(f"no trained model under {runs_dir}/: run `anexa train` first or pass --model DIR")
    return found[-1].parent
