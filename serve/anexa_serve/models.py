"""The served models: each checkpoint loaded once, named after its run folder, shared by all requests.

One model instance serves every request: each model has one engine, stepped by one thread
(:mod:`anexa_serve.engine`), so the weights are only ever read by that thread (in eval mode, under
``torch.no_grad``). All per-request state lives outside the model: each request is a row of the engine's
KV cache with its own sampler chain and its own ``torch.Generator`` seeded from its ``seed``. So a
request's text depends only on its own prompt, options and seed, not on what runs beside it (tested with
8 concurrent clients).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError


@dataclass(frozen=True)
class ServedModel:
    """One loaded checkpoint: ``name`` (what requests put in ``model``), the torch module, tokenizer,
    checkpoint metadata, the run folder or file given, its modification time (Unix seconds), and the
    sampler specs its makers recommend (:meth:`anexa_core.io.load.Loaded.sampling`), used by requests that
    choose no sampling."""

    name: str
    model: Any
    tokenizer: Any
    meta: dict[str, Any]
    path: Path
    created: int
    sampling: tuple[str, ...] = ()

    @property
    def context_length(self) -> int:
        """Tokens the model sees at once (``block_size``); longer prompts are cropped from the left."""
        return int(self.model.config.block_size)

    def card(self) -> dict[str, Any]:
        """The ``/v1/models`` entry: OpenAI's fields plus an ``anexa`` object describing the checkpoint."""
        config = self.meta.get("model_config", {})
        return {
            "id": self.name,
            "object": "model",
            "created": self.created,
            "owned_by": "anexa",
            "anexa": {
                "tokenizer": self.meta.get("tokenizer", {}).get("name"),
                "context_length": self.context_length,
                "n_layer": config.get("n_layer"),
                "n_embd": config.get("n_embd"),
                "step": self.meta.get("step"),
                "val_loss": self.meta.get("val_loss"),
                "sampling": list(self.sampling),
            },
        }


def unique_names(paths: list[Path]) -> list[str]:
    """Model names from run folder names, made unique in order: ``tiny``, ``tiny-2``, ``tiny-3``…

    A path to a ``model.safetensors`` file is named after its folder.
    """
    names: list[str] = []
    taken: set[str] = set()
    for path in paths:
        path = Path(os.path.abspath(path))
        base = (path.parent if path.suffix == ".safetensors" else path).name or "model"
        name, counter = base, 1
        while name in taken:
            counter += 1
            name = f"{base}-{counter}"
        taken.add(name)
        names.append(name)
    return names


def load_models(paths: list[Path] | None, device: Any = "auto") -> dict[str, ServedModel]:
    """Load each checkpoint once, in order, keyed by its unique name; ``None`` or ``[]``: the newest run
    under ./runs (:func:`anexa_core.io.load.load`).

    Raises :class:`anexa_core.errors.AnexaError` for a missing, foreign or corrupt checkpoint, or one given
    twice.
    """
    from anexa_core.io.load import load

    seen: set[Path] = set()
    for path in paths or []:
        if path.resolve() in seen:
            raise AnexaError(f"--model {path} is given twice: serve each model once")
        seen.add(path.resolve())
    loaded = [load(path, device) for path in paths] if paths else [load(None, device)]
    served: dict[str, ServedModel] = {}
    for name, one in zip(unique_names([item.source for item in loaded]), loaded, strict=True):
        recommended = one.sampling()
        specs = tuple(recommended.specs) if recommended is not None else ()
        served[name] = ServedModel(
            name, one.model, one.tokenizer, one.meta, one.source, int(one.source.stat().st_mtime), specs
        )
    return served
