"""The one way every interface loads a model: ``generate``, ``chat``, ``eval``, ``bench``, ``export`` and the
server all call :func:`load`; ``train --init-from`` and LoRA runs find their base with :func:`load_base`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from anexa_core.device import pick_device
from anexa_core.errors import AnexaError
from anexa_core.interfaces import Tokenizer
from anexa_core.io import checkpoint
from anexa_core.io.generation_config import Recommended, recommended
from anexa_core.model.gpt import GPT, decoding_layout

RUNS_DIR = Path("runs")
"""Where ``anexa train`` puts runs by default, and where :func:`load` finds the newest one."""


@dataclass(frozen=True)
class Loaded:
    """A model ready to use: the module (in eval mode, on ``device``, on a CPU in the
    :func:`decoding_layout` unless asked not to), its tokenizer, the checkpoint's metadata, the file it came
    from and the path the user gave (a run folder or a file)."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path
    source: Path
    device: torch.device

    def sampling(self) -> Recommended | None:
        """The sampling its makers recommend (a pretrained model and its fine-tunes:
        :mod:`anexa_core.io.generation_config`), for when the user chooses none; ``None`` when there is none."""
        from anexa_core.io.pretrained import origin_of

        origin = origin_of(self.meta)
        return recommended(origin.generation() if origin is not None else None, self.model.config.block_size)


def load(
    model: str | Path | None = None,
    device: str | torch.device = "auto",
    attention: str | None = None,
    attention_options: dict[str, Any] | None = None,
    runs_dir: Path = RUNS_DIR,
    decoding: bool = True,
) -> Loaded:
    """The model ``model`` names — a run folder (its best checkpoint), a ``.safetensors`` file, or ``None``
    for the newest run under ``runs_dir`` — on ``device`` (``auto``: CUDA when present), optionally with
    another attention plugin (``attention`` and its options; the weights do not depend on it). A LoRA run
    loads its base and folds the adapters into it. ``decoding=False`` keeps the weights in their stored
    order (``export``, which writes them out at once, would only undo the :func:`decoding_layout`).

    Raises :class:`~anexa_core.AnexaError` (one line) when there is no run, the checkpoint is missing,
    foreign or corrupt, a LoRA run's base is missing or changed, the device is unusable, or a plugin it
    needs is missing."""
    source = Path(model) if model is not None else checkpoint.latest_run(runs_dir)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    path = checkpoint.checkpoint_file(source)
    meta = checkpoint.read_metadata(path)
    if "lora" in meta:
        module, tokenizer = lora_model(meta, path, attention, attention_options)
        module = module.to(torch_device)
        meta = {**meta, "path": str(path)}
    else:
        module, tokenizer, meta = checkpoint.load_model(source, torch_device, attention, attention_options)
    module.eval()
    if decoding:
        decoding_layout(module)
    return Loaded(module, tokenizer, meta, Path(meta["path"]), source, torch_device)


@dataclass(frozen=True)
class Base:
    """A model to fine-tune: the module (float32, CPU, weights in their stored row-major layout), its tokenizer with the name and options a run
    records, its checkpoint metadata (``model_config``, ``plugins``, and for an import ``imported_from``),
    and ``reference``: what a LoRA run keeps to find it again (``init_from`` as given, ``path`` resolved
    for a local file, its ``sha256``)."""

    model: GPT
    tokenizer: Any
    tokenizer_name: str
    tokenizer_options: dict[str, Any]
    meta: dict[str, Any]
    reference: dict[str, Any]


def load_base(spec: str) -> Base:
    """The model ``spec`` names for ``train --init-from``: an Anexa run folder or checkpoint (a LoRA run's
    adapters folded in), or anything ``anexa import`` takes (a GGUF file, a Hugging Face folder or hub id).
    Raises :class:`AnexaError` as :func:`load` and :func:`anexa_core.io.pretrained.import_model` do."""
    from anexa_core.io.pretrained import file_sha256, pretrained_model

    path = Path(spec).expanduser()
    reference: dict[str, Any] = {"init_from": spec}
    if path.exists():
        reference["path"] = str(path.resolve())
    if _is_anexa_checkpoint(path):
        # The stored layout, not the decoding one: training's backward through a column-major head in bfloat16
        # crashed PyTorch 2.13 (SIGFPE in oneDNN on CPUs with AMX, at 32 tokens a batch), and gains nothing.
        loaded = load(path, "cpu", decoding=False)
        reference["sha256"] = file_sha256(loaded.path)
        entry = loaded.meta["tokenizer"]
        return Base(
            loaded.model, loaded.tokenizer, entry["name"], dict(entry.get("options", {})), loaded.meta, reference
        )
    model, tokenizer, info = pretrained_model(path if path.exists() else spec)
    reference["sha256"] = info["imported_from"].get("sha256")
    meta = checkpoint.model_metadata(model, tokenizer, "hf", {}, **info)
    return Base(model, tokenizer, "hf", {}, meta, reference)


def _is_anexa_checkpoint(path: Path) -> bool:
    if path.is_dir():
        return checkpoint.holds_a_run(path)
    return path.suffix == ".safetensors" and path.is_file()


def base_of(reference: dict[str, Any]) -> Base:
    """The base a LoRA run was trained on, found again from its ``reference`` and checked against its
    SHA-256; a one-line error when it is missing or has changed."""
    located = reference.get("path") if reference.get("path") and Path(reference["path"]).exists() else None
    spec = located or reference["init_from"]
    try:
        base = load_base(spec)
    except AnexaError as exc:
        raise AnexaError(
            f"this LoRA run's base {reference['init_from']} cannot be loaded ({exc}): put it back where it was"
        ) from None
    if reference.get("sha256") and base.reference.get("sha256") != reference["sha256"]:
        raise AnexaError(
            f"this LoRA run's base {reference['init_from']} has changed since it was trained (SHA-256 "
            f"{str(base.reference.get('sha256'))[:12]}…, not {reference['sha256'][:12]}…): restore it"
        )
    return base


def bases_needed(model: str | Path) -> list[Path]:
    """The local files or folders a LoRA run loads its model from (resolved): its base, and that base's base
    when the base is a LoRA run too; ``[]`` for any other model. Raises :class:`AnexaError` as
    :func:`~anexa_core.io.checkpoint.checkpoint_file` does for a missing or foreign ``model``."""
    needed: list[Path] = []
    path = checkpoint.checkpoint_file(Path(model))
    for _ in range(10):  # a chain of LoRA runs; a cycle ends
        base = ((checkpoint.read_metadata(path).get("lora") or {}).get("base") or {}).get("path")
        if not base:
            break
        needed.append(Path(base).resolve())
        if not _is_anexa_checkpoint(Path(base)):
            break
        path = checkpoint.checkpoint_file(Path(base))
    return needed


def lora_model(
    meta: dict[str, Any], path: Path, attention: str | None = None, attention_options: dict[str, Any] | None = None
) -> tuple[GPT, Any]:
    """A LoRA run's model: its base (:func:`base_of`) with the adapters of ``path`` folded in."""
    from anexa_core.model.lora import LoraSpec, apply_lora, load_adapter, merge

    base = base_of(meta["lora"]["base"])
    model = base.model
    if attention is not None:
        rebuilt, _ = checkpoint.rebuild(base.meta, path, attention, attention_options)
        rebuilt.load_state_dict(model.state_dict())
        model = rebuilt
    apply_lora(model, LoraSpec.from_dict(meta["lora"]["spec"]))
    try:
        load_adapter(model, safetensors.torch.load_file(str(path)))
    except AnexaError:
        raise
    except Exception as exc:
        raise AnexaError(
            f"checkpoint {path} is corrupt ({type(exc).__name__}): retrain or pass another --model"
        ) from None
    merge(model)
    return model, base.tokenizer
