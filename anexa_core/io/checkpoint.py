"""Checkpoints as safetensors, written atomically. No pickle anywhere.

A run folder holds:

- ``model.safetensors`` — the latest weights, with JSON metadata: the model config (every plugin's name
  and options), the tokenizer (name, options, learned vocabulary), which distribution and version
  provided each plugin, the step, losses and the training config. Enough to rebuild the model alone.
- ``best.safetensors`` — the same for the step with the lowest validation loss so far. ``generate``,
  ``chat`` and ``export`` load it from a run folder by default.
- ``train_state.safetensors`` — everything ``--resume`` needs, self-contained: the weights again, the
  optimizer's state, the RNG states, the step and the training config. Resuming reads only this file,
  so a crash between two writes can never pair weights of one step with optimizer moments of another.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from anexa_core import plugins
from anexa_core.config import ModelConfig
from anexa_core.errors import AnexaError
from anexa_core.interfaces import Tokenizer
from anexa_core.io.files import atomic_path, is_temp_name, sweep_stale
from anexa_core.io.metrics import METRICS_FILE as METRICS_FILE  # a run folder's file names live here too
from anexa_core.io.metrics import RUN_METRICS
from anexa_core.model.gpt import GPT, build_model

MODEL_FILE = "model.safetensors"
BEST_FILE = "best.safetensors"
STATE_FILE = "train_state.safetensors"
PLOT_FILE = "loss.png"
RUN_FILES = (MODEL_FILE, BEST_FILE, STATE_FILE, *RUN_METRICS, PLOT_FILE)
"""Every file ``anexa train`` or ``anexa import`` writes in a run folder."""
FORMAT = "anexa/2"
_OLD_FORMAT = "anexa/1"  # anexa 0.1: models still load; their runs cannot be resumed


def anexa_version() -> str:
    return importlib.metadata.version("anexa")


def model_metadata(
    model: GPT, tokenizer: Tokenizer, tokenizer_name: str, tokenizer_options: dict[str, Any], **info: Any
) -> dict[str, Any]:
    """Everything needed to rebuild ``model`` and its tokenizer, plus ``info`` (step, losses, …)."""
    config = model.config
    return {
        "format": FORMAT,
        "anexa_version": anexa_version(),
        "model_config": dataclasses.asdict(config),
        "tokenizer": {"name": tokenizer_name, "options": dict(tokenizer_options), "state": tokenizer.state_dict()},
        "plugins": {
            "blocks": plugins.provenance("blocks", config.blocks, config.blocks_options),
            "attention": plugins.provenance("attention", config.attention, config.attention_options),
            "tokenizer": plugins.provenance("tokenizers", tokenizer_name, tokenizer_options),
        },
        **info,
    }


def save_model(path: Path, model: GPT, meta: dict[str, Any]) -> None:
    """Write ``model``'s weights with ``meta`` (from :func:`model_metadata`) atomically — for a LoRA run
    (``meta["lora"]``) only its adapters: the base stays where it is, named and hashed in ``meta``."""
    with atomic_path(path) as tmp:
        if meta.get("lora"):
            from anexa_core.model.lora import adapter_state

            safetensors.torch.save_file(adapter_state(model), str(tmp), metadata={"anexa": json.dumps(meta)})
        else:
            tensors, aliases = _unique_tensors(model)
            safetensors.torch.save_file(tensors, str(tmp), metadata={**aliases, "anexa": json.dumps(meta)})


def _unique_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``model``'s state with one name per tensor, every tensor contiguous, and the names left out
    (``{left out: kept}``): the file ``safetensors.torch.save_model`` writes, byte for byte (a tied head is
    stored as ``lm_head.weight``, the first name in sorted order, and ``load_model`` ties it again). Its
    ``save_model`` itself cannot write a tied head in the :func:`~anexa_core.model.gpt.decoding_layout`:
    it views shared tensors as flat."""
    state = model.state_dict()
    kept: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name in sorted(state):
        first = kept.setdefault(state[name].untyped_storage().data_ptr(), name)
        if first != name:
            aliases[name] = first
    return {name: state[name].contiguous() for name in kept.values()}, aliases


def checkpoint_file(path: Path) -> Path:
    """A run folder's best checkpoint if it has one, else its latest; a file stays as it is."""
    path = Path(path)
    if path.is_dir():
        best = path / BEST_FILE
        return best if best.is_file() else path / MODEL_FILE
    return path


def read_metadata(path: Path, remedy: str = "retrain or pass another --model") -> dict[str, Any]:
    """The Anexa metadata of a checkpoint (file or run folder); a one-line error when it is missing,
    foreign or corrupt (a damaged file's error ends with ``remedy``). Metadata of anexa 0.1 checkpoints is
    brought up to date."""
    path = checkpoint_file(path)
    if path.is_dir() or not path.exists():
        raise AnexaError(
            f"no checkpoint at {path}: pass the folder of a run (`anexa runs` lists them), "
            "or make one with `anexa train` or `anexa import`"
        )
    if not path.is_file():
        raise AnexaError(f"{path} is not a file: pass a run folder or a model.safetensors")
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            raw = (handle.metadata() or {}).get("anexa")
        meta = json.loads(raw) if raw else None
    except Exception as exc:  # safetensors raises several error types for damaged or foreign files
        if path.suffix != ".safetensors":
            raise AnexaError(
                _pretrained_hint(path)
                or f"{path} is not a safetensors checkpoint: pass a run folder or a model.safetensors"
            ) from None
        raise AnexaError(f"checkpoint {path} is corrupt ({type(exc).__name__}): {remedy}") from None
    if not isinstance(meta, dict) or meta.get("format") not in (FORMAT, _OLD_FORMAT):
        raise AnexaError(
            _pretrained_hint(path)
            or f"{path} is not an Anexa checkpoint: pass a model.safetensors written by `anexa train`"
        )
    return _migrate(meta) if meta["format"] == _OLD_FORMAT else meta


def _pretrained_hint(path: Path) -> str | None:
    """For a GGUF file or a Hugging Face model folder's weights given where a run belongs: import it first."""
    if path.suffix.lower() == ".gguf":
        source = path
    elif (path.parent / "config.json").is_file():
        source = path.parent
    else:
        return None
    kind = "a GGUF file" if source is path else "a Hugging Face model folder"
    return f"{source} is {kind}, not an Anexa run: `anexa import {source} --out runs/NAME` makes it one"


def _migrate(meta: dict[str, Any]) -> dict[str, Any]:
    """anexa/1 → anexa/2: plugin options did not exist (gpt2's ``bias`` was a model setting)."""
    if "model_config" not in meta:  # an old training state: nothing to rebuild from it
        return meta
    config = dict(meta["model_config"])
    bias = config.pop("bias", True)
    config["blocks_options"] = {"bias": bias} if config.get("blocks") == "gpt2" else {}
    config.setdefault("attention_options", {})
    old_plugins = meta.get("plugins", {})
    tokenizer = meta["tokenizer"]
    vocab = (meta.get("train_config") or {}).get("vocab_size")
    options = {"vocab_size": vocab} if tokenizer["name"] == "bpe" and vocab else {}
    new_plugins = {
        kind: {**old_plugins.get(kind, {}), "options": config[f"{kind}_options"]} for kind in ("blocks", "attention")
    }
    new_plugins["tokenizer"] = {**old_plugins.get("tokenizers", {}), "options": options}
    return {
        **meta,
        "model_config": config,
        "plugins": new_plugins,
        "tokenizer": {"name": tokenizer["name"], "options": options, "state": tokenizer["data"]},
    }


def _model_config(meta: dict[str, Any], path: Path) -> ModelConfig:
    try:
        return ModelConfig(**meta["model_config"])
    except (TypeError, KeyError, AnexaError) as exc:
        raise AnexaError(
            f"checkpoint {path} has a malformed model config ({exc}): retrain or pass another --model"
        ) from None


def load_tokenizer(meta: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint's metadata describes, created with its options and vocabulary."""
    entry = meta["tokenizer"]
    tokenizer, _ = plugins.create(
        "tokenizers", entry["name"], entry.get("options", {}), needed_by=meta.get("plugins", {}).get("tokenizer")
    )
    tokenizer.load_state_dict(entry["state"])
    return tokenizer


def rebuild(
    meta: dict[str, Any], path: Path, attention: str | None = None, attention_options: dict[str, Any] | None = None
) -> tuple[GPT, Tokenizer]:
    """An untrained model and the tokenizer, exactly as ``meta`` describes them.

    ``attention`` swaps the attention plugin (with ``attention_options``); the weights do not depend on it,
    though an attention that computes something else (a sliding window) changes what the model says.
    """
    config = _model_config(meta, path)
    if attention is not None:
        config = dataclasses.replace(config, attention=attention, attention_options=attention_options or {})
    return build_model(config, needed_by=meta.get("plugins")), load_tokenizer(meta)


def load_model(
    path: Path,
    device: str | torch.device = "cpu",
    attention: str | None = None,
    attention_options: dict[str, Any] | None = None,
) -> tuple[GPT, Tokenizer, dict[str, Any]]:
    """``(model, tokenizer, metadata)`` from a checkpoint file or a run folder (its best checkpoint).

    The metadata gains ``"path"``: the file that was loaded.
    """
    path = checkpoint_file(path)
    meta = read_metadata(path)
    if "model_config" not in meta:
        raise AnexaError(f"{path} is a training state, not a model: pass the run folder or its model.safetensors")
    model, tokenizer = rebuild(meta, path, attention, attention_options)
    try:
        missing, unexpected = safetensors.torch.load_model(model, str(path), strict=False, device=str(device))
    except Exception as exc:
        raise AnexaError(
            f"checkpoint {path} is corrupt ({type(exc).__name__}): retrain or pass another --model"
        ) from None
    _check_keys(model, path, missing, unexpected)
    return model.to(device), tokenizer, {**meta, "path": str(path)}


def _check_keys(model: GPT, path: Path, missing, unexpected) -> None:
    # (A tied head is no "missing" key: safetensors stores one name per shared tensor and knows the rest.)
    if missing or unexpected:
        raise AnexaError(
            f"checkpoint {path} does not match the {model.config.blocks!r} blocks "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}): is the right plugin installed?"
        )


# --- training state -------------------------------------------------------------------------------


def _flatten(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """A nested state dict as JSON, with every tensor moved into ``tensors`` under a path-like key."""
    if isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().contiguous().cpu()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {
            "__dict__": [
                [_flatten(k, f"{prefix}.k{i}", tensors), _flatten(v, f"{prefix}.{i}", tensors)]
                for i, (k, v) in enumerate(value.items())
            ]
        }
    if isinstance(value, (list, tuple)):
        items = [_flatten(v, f"{prefix}.{i}", tensors) for i, v in enumerate(value)]
        return {"__tuple__": items} if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a training state")


def _unflatten(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__tuple__" in value:
            return tuple(_unflatten(v, tensors) for v in value["__tuple__"])
        return {_unflatten(k, tensors): _unflatten(v, tensors) for k, v in value["__dict__"]}
    if isinstance(value, list):
        return [_unflatten(v, tensors) for v in value]
    return value


def save_train_state(
    path: Path,
    model: GPT,
    optimizer: torch.optim.Optimizer,
    rng: dict[str, torch.Tensor],
    model_meta: dict[str, Any],
    **info: Any,
) -> None:
    """Weights, optimizer state and RNG states in one file, so ``--resume`` never mixes steps."""
    tensors: dict[str, torch.Tensor] = {}
    seen: dict[tuple[int, int], str] = {}
    aliases = {}
    if model_meta.get("lora"):  # a LoRA run resumes from its base and these adapters
        from anexa_core.model.lora import adapter_state

        weights = adapter_state(model)
    else:
        weights = model.state_dict()
    for name, tensor in weights.items():  # tied weights are stored once
        key = (tensor.data_ptr(), tensor.numel())
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        tensors[f"model/{name}"] = tensor.detach().contiguous().cpu()
    optimizer_state = _flatten(optimizer.state_dict(), "optimizer", tensors)
    for name, tensor in rng.items():
        tensors[f"rng/{name}"] = tensor.contiguous().cpu()
    meta = {
        "format": FORMAT,
        "kind": "train_state",
        "model": model_meta,
        "aliases": aliases,
        "optimizer_state": optimizer_state,
        **info,
    }
    with atomic_path(path) as tmp:
        safetensors.torch.save_file(tensors, str(tmp), metadata={"anexa": json.dumps(meta)})


@dataclass
class TrainState:
    """What :func:`load_train_state` returns: apply ``weights`` and ``optimizer_state`` to rebuilt objects."""

    meta: dict[str, Any]
    weights: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: dict[str, torch.Tensor]

    @property
    def step(self) -> int:
        return self.meta["step"]


def read_train_state_metadata(run_dir: Path) -> dict[str, Any]:
    """The metadata of a run folder's training state (what resuming needs before any tensor), or a
    one-line error saying why the run cannot be resumed: no state, a damaged one, one of anexa 0.1."""
    path = Path(run_dir) / STATE_FILE
    if not Path(run_dir).is_dir():
        raise AnexaError(f"no run at {run_dir}: pass the folder of an `anexa train` run (`anexa runs` lists them)")
    if not path.is_file() and (Path(run_dir) / MODEL_FILE).is_file():
        raise AnexaError(
            f"{run_dir} holds a model but no {STATE_FILE} (an imported model has none): train it further with "
            f"`anexa train --init-from {run_dir} --out NEW_RUN`"
        )
    if not path.is_file():
        raise AnexaError(
            f"{run_dir} holds no {STATE_FILE}: pass the folder of an `anexa train` run that saved at least once"
        )
    meta = read_metadata(path, remedy="start a new run")
    if meta.get("kind") != "train_state":
        raise AnexaError(
            f"{run_dir} was trained by anexa 0.1, whose runs cannot be resumed by anexa {anexa_version()}: start a "
            "new run (its model still loads for generate and chat)"
        )
    return meta


def load_train_state(run_dir: Path) -> TrainState:
    """The training state of a run folder, or a one-line error saying why it cannot be resumed
    (:func:`read_train_state_metadata`'s, or a damaged tensor section's)."""
    meta = read_train_state_metadata(run_dir)
    path = Path(run_dir) / STATE_FILE
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:
        raise AnexaError(f"training state {path} is corrupt ({type(exc).__name__}): start a new run") from None
    weights = {name.removeprefix("model/"): t for name, t in tensors.items() if name.startswith("model/")}
    for alias, name in meta.get("aliases", {}).items():
        weights[alias] = weights[name]
    rng = {name.removeprefix("rng/"): t for name, t in tensors.items() if name.startswith("rng/")}
    return TrainState(meta, weights, _unflatten(meta["optimizer_state"], tensors), rng)


def latest_run(runs_dir: Path) -> Path:
    """The most recently written run folder under ``runs_dir``."""
    found = sorted(Path(runs_dir).glob(f"*/{MODEL_FILE}"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise AnexaError(f"no trained model under {runs_dir}/: run `anexa train` first or pass --model DIR")
    return found[-1].parent


def holds_a_run(folder: Path) -> bool:
    """Whether ``folder`` holds something ``anexa train`` (or ``anexa import``) wrote that a new run would
    overwrite: a training state, a best model, or a ``model.safetensors`` that is not known to be someone
    else's. A Hugging Face folder (``anexa export``'s, say) also has a ``model.safetensors``, one whose
    header reads and carries no Anexa metadata: that is not a run. A file whose header cannot be read (cut
    short, damaged) counts as a run, so nothing a user trained is replaced on a guess."""
    folder = Path(folder)
    if (folder / BEST_FILE).exists() or (folder / STATE_FILE).exists():
        return True
    weights = folder / MODEL_FILE
    return weights.exists() and not _foreign_weights(weights)


def holds_foreign_weights(folder: Path) -> bool:
    """Whether ``folder`` has a readable ``model.safetensors`` that Anexa did not write (a Hugging Face
    folder's): a new run there would replace someone else's model, so none is started, even with
    ``--overwrite``."""
    weights = Path(folder) / MODEL_FILE
    return weights.exists() and _foreign_weights(weights)


def _foreign_weights(path: Path) -> bool:
    """Whether ``path`` is a readable safetensors file without Anexa's metadata (one Anexa did not write)."""
    try:
        with safetensors.safe_open(str(path), framework="pt") as handle:
            return "anexa" not in (handle.metadata() or {})
    except Exception:  # safetensors raises several error types for damaged or foreign files
        return False


def foreign_entries(folder: Path) -> list[str]:
    """The names in ``folder`` that no run wrote (a user's files and folders, a ``model.safetensors``
    Anexa did not write), sorted; ``[]`` for a folder that does not exist. A writer's temp entries count
    as a run's."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    names = {e.name for e in folder.iterdir() if e.name not in RUN_FILES and not is_temp_name(e.name)}
    return sorted(names | ({MODEL_FILE} if holds_foreign_weights(folder) else set()))


def clear_run(out_dir: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote in ``out_dir``."""
    for name in (MODEL_FILE, BEST_FILE, STATE_FILE, *RUN_METRICS):
        (out_dir / name).unlink(missing_ok=True)


def remove_stale_temp_files(out_dir: Path) -> None:
    """A SIGKILL during a save leaves ``.model.safetensors.*.tmp`` behind; the real files are intact.
    Called as a run starts, before it writes: a run folder has one writer, so every such file is stale."""
    if out_dir.is_dir():
        for stale in out_dir.glob(".*.tmp"):
            if stale.is_file():
                stale.unlink(missing_ok=True)
        sweep_stale(out_dir)
