"""``anexa import``: a pretrained model as an ordinary Anexa run.

A source is a local Hugging Face folder (``config.json``, safetensors weights, tokenizer files), a hub
id (``HuggingFaceTB/SmolLM2-135M-Instruct``: downloaded once through ``huggingface_hub`` into its cache,
which ``HF_HUB_OFFLINE=1`` restricts to), a hub id with a GGUF file name (``org/repo/model.Q4_K_M.gguf``),
or a local GGUF file (every tensor type the ``gguf`` package dequantizes). All three become transformers'
representation — ``config.json`` entries and tensors under transformers' names — which the blocks plugin
that names the architecture in its ``hf_architectures`` maps onto its own layout (``import_hf``, the
inverse of its ``export_hf``). The model's own tokenizer, special tokens and chat template become the
``hf`` tokenizer plugin's state, its recommended sampling part of the recorded origin
(:mod:`anexa_core.io.generation_config`). The result is a run folder holding ``model.safetensors``: ``chat``,
``generate``, ``serve``, ``eval``, ``bench``, ``export`` and ``train --init-from`` take it like any run.

Nothing is written unless all of it can be: the folder appears complete or not at all. Safetensors and
GGUF only: nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from anexa_core import plugins
from anexa_core.config import ModelConfig
from anexa_core.errors import AnexaError, listed, one_line
from anexa_core.io import checkpoint, generation_config
from anexa_core.io.files import atomic_folder, put_back
from anexa_core.model.gpt import build_model

logger = logging.getLogger("anexa")

HUB_FILES = [
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
]  # fmt: skip
"""What a hub download fetches: never pickled weights (``*.bin``, ``*.pt``)."""
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+(/[^/]+\.gguf)?")
_END_OF_TURN = re.compile(r"end|eot", re.I)


@dataclass(frozen=True)
class Pretrained:
    """A pretrained model in transformers' representation, wherever it came from.

    ``hf_config``: ``config.json`` entries; ``tensors``: weights under transformers' names (CPU);
    ``tokenizer``: the ``hf`` tokenizer plugin's state; ``source``: what the run records about its
    origin (kind, name, hash or revision, licence, recommended sampling) — never a local path."""

    hf_config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    tokenizer: dict[str, Any]
    source: dict[str, Any]


@dataclass(frozen=True)
class Imported:
    """What :func:`import_model` wrote: the run folder, the transformers architecture and Anexa's blocks,
    unique parameters, seconds spent, and the sampler specs its makers recommend (empty: none)."""

    out: Path
    architecture: str
    blocks: str
    parameters: int
    seconds: float
    sampling: list[str]


def import_model(source: str | Path, out: Path, overwrite: bool = False) -> Imported:
    """Import ``source`` (see the module docstring) into the new run folder ``out``.

    Raises :class:`AnexaError` (one line, nothing written) for a missing source, a hub id that is not
    cached while offline, an unsupported architecture (naming the supported ones), a truncated or
    corrupt GGUF file, a tensor type that cannot be dequantized, weights that do not match the config,
    or an ``out`` that holds a run (unless ``overwrite``) or other files.
    """
    started = time.perf_counter()
    out = Path(out)
    put_back(out)  # an import killed mid-rename put the old OUT aside: back first
    _check_target(out, overwrite)
    model, tokenizer, source_info = pretrained_model(source)
    meta = checkpoint.model_metadata(model, tokenizer, "hf", {}, step=0, **source_info)
    with atomic_folder(out, replace=overwrite and out.exists()) as folder:
        checkpoint.save_model(folder / checkpoint.MODEL_FILE, model, meta)
    architecture = source_info["hf_architecture"]
    seconds = time.perf_counter() - started
    found = generation_config.recommended(source_info["imported_from"].get("generation"), model.config.block_size)
    sampling = found.every if found is not None else []
    return Imported(out, architecture, model.config.blocks, model.num_parameters(), seconds, sampling)


def pretrained_model(source: str | Path) -> tuple[Any, Any, dict[str, Any]]:
    """``source`` as an Anexa model (float32, CPU, eval mode), its ``hf`` tokenizer, and what a run records
    about it (``imported_from``, ``hf_architecture``). Raises :class:`AnexaError` as :func:`import_model`."""
    pretrained = read_pretrained(source)
    classes = pretrained.hf_config.get("architectures") or ["?"]
    architecture = classes if isinstance(classes, str) else classes[0]  # a name alone, not in a list: taken
    name, factory = blocks_for(architecture)
    settings, options, state = _mapped(architecture, factory, pretrained)
    try:
        config = ModelConfig(**settings, blocks=name, blocks_options=options)
    except (TypeError, AnexaError) as exc:
        raise AnexaError(f"the {architecture} config does not fit Anexa's model ({exc})") from None
    with torch.device("meta"):  # no time spent initialising weights that are replaced at once
        model = build_model(config)
    model = model.to_empty(device="cpu")
    load_weights(model, state, architecture)
    tokenizer, _ = plugins.create("tokenizers", "hf")
    tokenizer.load_state_dict(pretrained.tokenizer)
    if tokenizer.vocab_size > config.vocab_size:
        raise AnexaError(
            f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {config.vocab_size}: "
            "the weights and the tokenizer do not belong together"
        )
    return model.eval(), tokenizer, {"imported_from": pretrained.source, "hf_architecture": architecture}


def _mapped(architecture: str, factory: Any, pretrained: Pretrained) -> tuple[dict, dict, dict]:
    """The blocks plugin's ``import_hf`` of ``pretrained``: model settings, blocks options and the state dict
    under Anexa's names. Raises :class:`AnexaError` for config entries or tensors missing or of the wrong kind
    (the plugin indexes them), and for a layer count the weights cannot hold."""
    try:
        settings, options, state = factory.import_hf(pretrained.hf_config, pretrained.tensors)
    except KeyError as exc:  # the config names what the weights lack, or lacks an entry the family needs
        raise AnexaError(
            f"the {architecture} model lacks {exc.args[0]!r} (its config or its weights): the files do not "
            "belong together or are damaged; download them again"
        ) from None
    except (ValueError, TypeError, AttributeError, IndexError) as exc:
        detail = one_line(exc, 160)
        raise AnexaError(
            f"the {architecture} config holds a value of the wrong kind ({type(exc).__name__}: {detail}): fix "
            "config.json or download the model again"
        ) from None
    if isinstance(settings.get("n_layer"), int) and settings["n_layer"] > len(state):
        # before building: a corrupt count (10**9 layers) would build for minutes, gigabytes growing
        raise AnexaError(
            f"the {architecture} config says {settings['n_layer']} layers but the weights hold {len(state)} "
            "tensors in all: the files do not belong together or are damaged; download them again"
        )
    return settings, options, state


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AnexaError(f"{out} is a file: pass a new folder for the imported run")
    if others := checkpoint.foreign_entries(out):  # --overwrite replaces a run folder whole: never one of these
        raise AnexaError(
            f"{out} is not empty and holds more than a run ({listed(others)}): pass a new or empty folder "
            "for the imported run"
        )
    if checkpoint.holds_a_run(out) and not overwrite:
        raise AnexaError(f"{out} already holds a run: pass --overwrite to replace it, or another --out")
    if out.is_dir() and any(out.iterdir()) and not overwrite:  # what a run killed before its first save left
        raise AnexaError(f"{out} holds what a run left: pass --overwrite to replace it, or another --out")


def blocks_for(architecture: str) -> tuple[str, Any]:
    """The blocks plugin (name, factory) whose ``hf_architectures`` names ``architecture``; a one-line error
    naming the architectures the installed plugins read."""
    readers: dict[str, str] = {}
    for name, entry in plugins.registered("blocks").items():
        for known in getattr(entry.obj, "hf_architectures", ()):
            readers.setdefault(known, name)
    if architecture not in readers:
        listed = ", ".join(f"{arch} (blocks {name})" for arch, name in sorted(readers.items())) or "none"
        raise AnexaError(f"unsupported architecture {architecture!r}: Anexa imports {listed}")
    return readers[architecture], plugins.get("blocks", readers[architecture])


def load_weights(model: torch.nn.Module, state: dict[str, torch.Tensor], architecture: str) -> None:
    """Copy ``state`` into ``model`` (float32), or a one-line error naming the first mismatching tensors."""
    expected = model.state_dict()
    if getattr(model.config, "tie_embeddings", False):
        expected.pop("lm_head.weight", None)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [
        f"{key} {tuple(state[key].shape)} ≠ {tuple(expected[key].shape)}"
        for key in sorted(set(expected) & set(state))
        if tuple(state[key].shape) != tuple(expected[key].shape)
    ]
    if missing or unexpected or wrong:
        details = "; ".join(
            part
            for part in (
                f"missing {missing[:3]}" if missing else "",
                f"unexpected {unexpected[:3]}" if unexpected else "",
                f"shapes {wrong[:2]}" if wrong else "",
            )
            if part
        )
        raise AnexaError(
            f"the {architecture} weights do not match its config ({details}): the files are "
            "damaged or belong to another model"
        )
    with torch.no_grad():
        for key, tensor in state.items():
            expected[key].copy_(tensor.to(torch.float32))
    if getattr(model.config, "tie_embeddings", False):
        model.lm_head.weight = model.wte.weight  # type: ignore[union-attr]


# --- sources ----------------------------------------------------------------------------------------


def read_pretrained(source: str | Path) -> Pretrained:
    """``source`` in transformers' representation (see :class:`Pretrained`)."""
    path = Path(source).expanduser()
    if path.suffix.lower() == ".gguf" and path.is_file():
        return read_gguf_file(path)
    if path.is_dir():
        return read_hf_folder(path, {"kind": "folder", "name": path.resolve().name})
    if path.exists():
        raise AnexaError(
            f"{source} is neither a GGUF file nor a Hugging Face folder (config.json and safetensors): pass a "
            "model's .gguf file, its folder, or a hub id ORG/NAME"
        )
    text = str(source)
    if is_hub_id(text):
        try:
            return read_hub(text)
        except AnexaError:
            folder = text.split("/")[0]
            if not Path(folder).is_dir():
                raise
            # ``runs/nope`` beside a local ``runs/``: a mistyped path far likelier than a hub id.
            raise AnexaError(
                f"{source} does not exist: {folder}/ holds no {text.split('/', 1)[1]}, and no Hugging Face hub "
                "model of that name is cached: check the path"
            ) from None
    raise AnexaError(f"{source} does not exist: pass a GGUF file, a Hugging Face folder or a hub id (ORG/NAME)")


def is_hub_id(spec: str) -> bool:
    """Whether ``spec`` names a Hugging Face hub model (``ORG/NAME``, or ``ORG/NAME/FILE.gguf`` for one GGUF
    file of a repository) rather than something on this machine: it has that shape and no such local path
    exists."""
    return _HUB_ID.fullmatch(spec) is not None and not Path(spec).expanduser().exists()


@dataclass(frozen=True)
class Origin:
    """Where a model's pretrained weights came from: ``source`` as ``anexa import`` records it (``kind``
    ``gguf``/``folder``/``hub``, ``name`` — a file name, folder name or hub id, never a path —, and where
    known ``license``); ``direct``: the model (or a fine-tune's ``--init-from``) is that import itself, so
    ``--init-from NAME`` starts from the same weights."""

    source: dict[str, Any]
    direct: bool

    def as_dict(self) -> dict[str, Any]:
        """The record a fine-tune's checkpoints keep as ``base_origin`` (see :func:`origin_of`)."""
        return {"source": dict(self.source), "direct": self.direct}

    def hub_id(self) -> str | None:
        """The pretrained model's Hugging Face repository (``ORG/NAME``): a hub import's own id (without a
        GGUF file's name), else the ``repository`` a GGUF file named as its source; ``None`` when unknown."""
        if self.source["kind"] == "hub":
            return "/".join(self.source["name"].split("/")[:2])
        return self.source.get("repository")

    def sha256sum(self) -> str | None:
        """The SHA-256 that ``sha256sum`` prints for the source, so a copy can be checked: a GGUF file's own;
        ``None`` for a folder or hub import (their recorded digest covers several files) or where unknown."""
        return self.source.get("sha256") if self.source["kind"] == "gguf" else None

    def generation(self) -> dict[str, Any]:
        """Its makers' recommended sampling as ``anexa import`` recorded it
        (:mod:`anexa_core.io.generation_config`); ``{}`` when it recommends none."""
        return dict(self.source.get("generation") or {})

    def describe(self) -> str:
        """The pretrained model in words, for a model card: ``the GGUF file `NAME```."""
        return f"{_SOURCE_KINDS[self.source['kind']]} `{self.source['name']}`"


_SOURCE_KINDS = {"gguf": "the GGUF file", "folder": "the Hugging Face model folder", "hub": "the Hugging Face model"}


def origin_of(meta: dict[str, Any], depth: int = 0) -> Origin | None:
    """The :class:`Origin` of the model whose checkpoint metadata is ``meta``: an import's own record; for a
    fine-tune, the ``base_origin`` it recorded when it started (``depth``: how many fine-tunes lie between
    the model asked about and ``meta``'s); for one written before fine-tunes recorded it, its base's — a
    LoRA run's recorded base, else ``--init-from`` as given: a run that is still
    there (followed through at most nine runs that are fine-tunes themselves, so a cycle ends), a GGUF file, a Hugging Face folder, a hub
    id in the local Hugging Face cache. ``None`` for a model trained from scratch, or a base not found (a
    relative path from another directory is not taken for a hub id)."""
    if isinstance(meta.get("imported_from"), dict):
        return Origin(meta["imported_from"], depth <= 1)
    recorded = meta.get("base_origin")
    if isinstance(recorded, dict):  # what a fine-tune found when it started: nothing to follow any more
        return Origin(dict(recorded["source"]), bool(recorded["direct"]) and depth == 0)
    spec = (meta.get("train_config") or {}).get("init_from")
    if not isinstance(spec, str) or depth > 8:
        return None
    path = Path(((meta.get("lora") or {}).get("base") or {}).get("path") or spec)
    if path.suffix.lower() == ".gguf":
        return Origin({"kind": "gguf", "name": path.name}, depth == 0)
    try:
        return origin_of(checkpoint.read_metadata(path), depth + 1)
    except AnexaError:
        pass
    if (path / "config.json").is_file():
        return Origin({"kind": "folder", "name": path.resolve().name}, depth == 0)
    if is_hub_id(spec) and _cached(spec):
        return Origin({"kind": "hub", "name": spec}, depth == 0)
    return None


def _cached(hub_id: str) -> bool:
    """Whether the Hugging Face cache holds ``hub_id``'s ``config.json`` (nothing is downloaded)."""
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)


def read_gguf_file(path: Path, source: dict[str, Any] | None = None) -> Pretrained:
    """A GGUF file through :func:`anexa_core.io.gguf.read_gguf`, with its SHA-256, licence, name,
    organization, Hugging Face source repository (:func:`anexa_core.io.gguf.hub_repository`) and recommended
    sampling (:func:`anexa_core.io.generation_config.from_gguf`) recorded."""
    from anexa_core.io import gguf

    model = gguf.read_gguf(path)
    origin = source or {"kind": "gguf", "name": path.name}
    origin = {
        **origin,
        "sha256": file_sha256(path),
        "license": model.metadata.get("general.license"),
        "model_name": model.metadata.get("general.name"),
        "organization": model.metadata.get("general.organization"),
        "repository": gguf.hub_repository(model.metadata),
    }
    if generation := generation_config.from_gguf(model.metadata):
        origin["generation"] = generation
    return Pretrained(model.hf_config, model.tensors, model.tokenizer, origin)


def read_hf_folder(folder: Path, source: dict[str, Any]) -> Pretrained:
    """A Hugging Face model folder: ``config.json``, ``model.safetensors`` (or shards with their index) and
    the tokenizer files. Pickled weights are refused."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise AnexaError(f"{folder} holds no config.json: pass a Hugging Face model folder or a GGUF file")
    hf_config = _read_json(config_file)
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.glob("*.bin")) + sorted(p.name for p in folder.glob("*.pt"))
        hint = f" (it has {', '.join(pickled[:2])}: pickled weights, which Anexa never loads)" if pickled else ""
        raise AnexaError(f"{folder} holds no safetensors weights{hint}: pass a folder with model.safetensors")
    tensors: dict[str, torch.Tensor] = {}
    digest = hashlib.sha256()
    for file in weights:
        digest.update(file_sha256(file).encode())
        try:
            tensors.update(safetensors.torch.load_file(str(file)))
        except Exception as exc:
            raise AnexaError(f"{file.name} in {folder} is damaged ({type(exc).__name__}): download it again") from None
    source = {**source, "sha256": digest.hexdigest()}
    if generation := generation_config.from_hf(_generation_settings(folder)):
        source["generation"] = generation
    return Pretrained(hf_config, tensors, tokenizer_from_folder(folder, hf_config), source)


def _generation_settings(folder: Path) -> dict[str, Any]:
    """``generation_config.json``'s entries (``{}`` without one): end-of-turn ids and recommended sampling."""
    path = folder / "generation_config.json"
    return _read_json(path) if path.is_file() else {}


def file_sha256(path: Path) -> str:
    """The SHA-256 (hex) of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def read_hub(hub_id: str) -> Pretrained:
    """A hub model through ``huggingface_hub``: from its cache when there, else downloaded into it (unless
    offline: ``HF_HUB_OFFLINE=1``). ``ORG/NAME/FILE.gguf`` fetches one GGUF file of the repository."""
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    parts = hub_id.split("/")
    repo, gguf_name = "/".join(parts[:2]), (parts[2] if len(parts) == 3 else None)
    try:
        # One way for both: a snapshot asks the hub once (hf_hub_download retried an unreachable hub five
        # times over 25 s, logging each retry).
        folder = Path(snapshot_download(repo, allow_patterns=[gguf_name] if gguf_name else HUB_FILES))
    except (LocalEntryNotFoundError, OSError) as exc:
        if constants.HF_HUB_OFFLINE:
            raise _not_cached_offline(hub_id) from None
        if isinstance(exc, LocalEntryNotFoundError):
            raise AnexaError(
                f"{hub_id} is not in the Hugging Face cache and the hub could not be reached: download it once "
                "with network access, or pass a local folder or GGUF file"
            ) from None
        raise AnexaError(f"cannot download {hub_id} ({type(exc).__name__}: {exc}): check the network") from None
    except (RepositoryNotFoundError, HFValidationError):
        raise AnexaError(f"{hub_id} is not a model on the Hugging Face hub: check the name") from None
    revision = folder.name  # the snapshot folder is named after the commit
    if gguf_name:
        if not (folder / gguf_name).is_file():
            if constants.HF_HUB_OFFLINE:  # the repository is cached, not this file of it
                raise _not_cached_offline(hub_id)
            raise AnexaError(f"the hub repository {repo} has no file {gguf_name}: check the name")
        return read_gguf_file(folder / gguf_name, {"kind": "hub", "name": hub_id})
    return read_hf_folder(folder, {"kind": "hub", "name": hub_id, "revision": revision})


def _not_cached_offline(hub_id: str) -> AnexaError:
    return AnexaError(
        f"{hub_id} is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once with "
        "network access (HF_HUB_OFFLINE unset), or pass a local folder or GGUF file"
    )


# --- the tokenizer ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AnexaError(f"{path.name} is not valid JSON ({exc}): the model folder is damaged") from None
    if not isinstance(value, dict):
        raise AnexaError(f"{path.name} is not a JSON object: the model folder is damaged")
    return value


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AnexaError(f"{path.name} cannot be read as UTF-8 text ({exc}): the model folder is damaged") from None


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an ``AddedToken`` dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def tokenizer_from_folder(folder: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
    """The ``hf`` tokenizer plugin's state from ``tokenizer.json``, ``tokenizer_config.json`` (special
    tokens, ``add_bos_token``, ``chat_template``), ``chat_template.jinja`` and ``generation_config.json``
    (its ``eos_token_id`` list: the ids that end a reply)."""
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise AnexaError(f"{folder} holds no tokenizer.json: Anexa needs the model's fast tokenizer file")
    text = _read_text(tokenizer_file)
    settings = _read_json(folder / "tokenizer_config.json") if (folder / "tokenizer_config.json").is_file() else {}
    template = _chat_template(folder, settings)
    special = {key: _token_text(settings.get(key)) for key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    vocab = _vocabulary(text)
    generation = _generation_settings(folder)
    end_ids = generation.get("eos_token_id", hf_config.get("eos_token_id"))
    end_ids = end_ids if isinstance(end_ids, list) else [end_ids] if isinstance(end_ids, int) else []
    by_id = {index: token for token, index in vocab.items()}
    eos_tokens = [by_id[i] for i in end_ids if i in by_id]
    eos_tokens += end_of_turn_tokens(template, vocab)
    return {
        "type": "hf",
        "tokenizer": text,
        "special_tokens": special,
        "eos_tokens": list(dict.fromkeys(eos_tokens)),
        "add_bos": bool(settings.get("add_bos_token", False)),
        "chat_template": template,
    }


def _chat_template(folder: Path, settings: dict[str, Any]) -> str | None:
    """``chat_template.jinja``, else tokenizer_config.json's ``chat_template`` (the default of several named
    ones); ``None`` when neither holds text."""
    if (folder / "chat_template.jinja").is_file():
        return _read_text(folder / "chat_template.jinja")
    template = settings.get("chat_template")
    if isinstance(template, list):  # several named templates: the default one
        named = [t for t in template if isinstance(t, dict)]
        template = next((t.get("template") for t in named if t.get("name") == "default"), None)
    return template if isinstance(template, str) else None


def _vocabulary(tokenizer_json: str) -> dict[str, int]:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True)
    except Exception as exc:  # tokenizers raises plain Exception for a file it cannot read
        detail = one_line(exc, 160)
        raise AnexaError(f"tokenizer.json cannot be read ({detail}): the model folder is damaged") from None


def end_of_turn_tokens(template: str | None, vocab: dict[str, int], special: set[str] | None = None) -> list[str]:
    """Special tokens a chat template writes that end a turn (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``): tokens that look like markup (``<…>``), appear in the template and name an end.
    Generation stops at them as at EOS (llama.cpp decides end-of-turn tokens by their text the same way)."""
    if not template:
        return []
    found = []
    for token in vocab:
        markup = token.startswith("<") and token.endswith(">")
        if markup and (special is None or token in special) and token in template and _END_OF_TURN.search(token):
            found.append(token)
    return found
