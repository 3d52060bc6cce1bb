"""The runs in a folder, for ``anexa runs``: read from the checkpoints' safetensors headers alone.

A safetensors file begins with 8 bytes (little-endian) giving the length of a JSON header that holds every
tensor's shape and the metadata Anexa writes (:mod:`anexa_core.io.checkpoint`). Reading only that keeps
listing fast — no torch, no weights — however large the models.
"""

from __future__ import annotations

import datetime
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError

MODEL_FILE, BEST_FILE = "model.safetensors", "best.safetensors"  # as anexa_core.io.checkpoint names them
MAX_HEADER_BYTES = 100 << 20
"""A header larger than this is not one Anexa wrote (its metadata is kilobytes)."""


@dataclass(frozen=True)
class RunSummary:
    """One run folder: what it is, how far it trained, its best validation loss, its size and age.

    ``parameters``: unique parameters the run stores (a tied head counts once, as safetensors stores it
    once) — for a LoRA run its adapters only, the base staying where it is; ``lora``: ``None``, or the
    adapters' rank, the base as given to ``--init-from`` and whether it is missing;
    ``step``: the latest checkpoint's; ``best_val_loss`` (nats/token) and ``best_step``: the best
    checkpoint's, ``None`` before the first evaluation; ``size_bytes``: every file in the folder;
    ``modified``: when ``model.safetensors`` was last written (Unix seconds)."""

    name: str
    path: str
    blocks: str
    attention: str
    n_layer: int
    n_embd: int
    block_size: int
    tokenizer: str
    vocab_size: int
    parameters: int
    step: int | None
    best_step: int | None
    best_val_loss: float | None
    size_bytes: int
    modified: float
    lora: dict[str, Any] | None = None

    def architecture(self) -> str:
        """``llama 4×128 · bpe 1024``; the attention too when it is not the default ``sdpa``; a LoRA run adds
        ``+ LoRA r=16 on BASE``, and says so when the base is missing."""
        attention = "" if self.attention == "sdpa" else f" {self.attention}"
        text = f"{self.blocks} {self.n_layer}×{self.n_embd}{attention} · {self.tokenizer} {self.vocab_size}"
        if self.lora is not None:
            text += f" + LoRA r={self.lora['r']} on {self.lora['base']}"
            text += " (base missing: put it back to use this run)" if self.lora.get("base_missing") else ""
        return text

    def as_dict(self) -> dict[str, Any]:
        utc = datetime.datetime.fromtimestamp(self.modified, datetime.UTC)
        return {**asdict(self), "architecture": self.architecture(), "modified": utc.isoformat(timespec="seconds")}


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """``(Anexa metadata, tensor name → shape)`` from a safetensors file's header. Raises
    :class:`AnexaError` for a file that is not a safetensors file Anexa wrote."""
    try:
        with open(path, "rb") as handle:
            length = int.from_bytes(handle.read(8), "little")
            if not 2 <= length <= MAX_HEADER_BYTES:
                raise ValueError(f"header of {length} bytes")
            header = json.loads(handle.read(length))
        meta = json.loads((header.get("__metadata__") or {}).get("anexa") or "null")
        shapes = {name: entry["shape"] for name, entry in header.items() if name != "__metadata__"}
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
        raise AnexaError(f"{path} is not a readable Anexa checkpoint ({type(exc).__name__})") from None
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise AnexaError(f"{path} is not an Anexa model checkpoint")
    return meta, shapes


def summarize(folder: Path) -> RunSummary:
    """The :class:`RunSummary` of one run folder (one that holds ``model.safetensors``)."""
    meta, shapes = read_header(folder / MODEL_FILE)
    best = meta
    if (folder / BEST_FILE).is_file():
        try:
            best, _ = read_header(folder / BEST_FILE)
        except AnexaError:
            best = meta
    config = meta["model_config"]
    best_loss = best.get("val_loss") if best is not meta else meta.get("best_val_loss")
    best_step = best.get("step") if best is not meta else meta.get("best_step")
    size = sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())
    return RunSummary(
        name=folder.name,
        path=str(folder),
        blocks=config.get("blocks", "?"),
        attention=config.get("attention", "?"),
        n_layer=config.get("n_layer", 0),
        n_embd=config.get("n_embd", 0),
        block_size=config.get("block_size", 0),
        tokenizer=(meta.get("tokenizer") or {}).get("name", "?"),
        vocab_size=config.get("vocab_size", 0),
        parameters=sum(math.prod(shape) for shape in shapes.values()),
        step=meta.get("step"),
        best_step=best_step if isinstance(best_loss, (int, float)) else None,
        best_val_loss=best_loss if isinstance(best_loss, (int, float)) else None,
        size_bytes=size,
        modified=(folder / MODEL_FILE).stat().st_mtime,
        lora=_lora(meta),
    )


def _lora(meta: dict[str, Any]) -> dict[str, Any] | None:
    """A LoRA run's rank, base (``--init-from`` as given) and whether that base is gone from where it was
    trained, from its metadata; ``None`` for other runs."""
    lora = meta.get("lora")
    if not isinstance(lora, dict):
        return None
    spec, base = lora.get("spec") or {}, lora.get("base") or {}
    missing = bool(base.get("path")) and not Path(base["path"]).exists()  # a hub id's base has no path
    return {"r": spec.get("r", "?"), "base": base.get("init_from", "?"), "base_missing": missing}


def list_runs(runs_dir: Path, missing_ok: bool = True) -> tuple[list[RunSummary], list[tuple[Path, str]]]:
    """Every run folder directly under ``runs_dir``, newest first, and the folders whose checkpoint could
    not be read with the reason. A missing ``runs_dir`` has no runs when ``missing_ok`` (the default folder
    before a first run), else raises :class:`AnexaError`, as a ``runs_dir`` that is a file always does."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        if runs_dir.exists() or not missing_ok:
            what = "is not a folder" if runs_dir.exists() else "does not exist"
            raise AnexaError(f"{runs_dir} {what}: pass the folder that holds your run folders")
        return [], []
    found, unreadable = [], []
    for folder in sorted(runs_dir.iterdir()):
        if (folder / MODEL_FILE).is_file():
            try:
                found.append(summarize(folder))
            except (AnexaError, OSError) as exc:
                unreadable.append((folder, str(exc)))
    return sorted(found, key=lambda run: run.modified, reverse=True), unreadable
