"""The one way every interface loads a model: ``generate``, ``chat``, ``eval``, ``bench``, ``export`` and the
server all call :func:`load`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from anexa_core.device import pick_device
from anexa_core.interfaces import Tokenizer
from anexa_core.io import checkpoint
from anexa_core.model.gpt import GPT

RUNS_DIR = Path("runs")
"""Where ``anexa train`` puts runs by default, and where :func:`load` finds the newest one."""


@dataclass(frozen=True)
class Loaded:
    """A model ready to use: the module (in eval mode, on ``device``), its tokenizer, the checkpoint's
    metadata, the file it came from and the path the user gave (a run folder or a file)."""

    model: GPT
    tokenizer: Tokenizer
    meta: dict[str, Any]
    path: Path
    source: Path
    device: torch.device


def load(
    model: str | Path | None = None,
    device: str | torch.device = "auto",
    attention: str | None = None,
    attention_options: dict[str, Any] | None = None,
    runs_dir: Path = RUNS_DIR,
) -> Loaded:
    """The model ``model`` names — a run folder (its best checkpoint), a ``.safetensors`` file, or ``None``
    for the newest run under ``runs_dir`` — on ``device`` (``auto``: CUDA when present), optionally with
    another attention plugin (``attention`` and its options; the weights do not depend on it).

    Raises :class:`~anexa_core.AnexaError` (one line) when there is no run, the checkpoint is missing,
    foreign or corrupt, the device is unusable, or a plugin it needs is missing."""
    source = Path(model) if model is not None else checkpoint.latest_run(runs_dir)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    module, tokenizer, meta = checkpoint.load_model(source, torch_device, attention, attention_options)
    module.eval()
    return Loaded(module, tokenizer, meta, Path(meta["path"]), source, torch_device)
