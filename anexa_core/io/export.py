"""Export a trained model to another library's format. One format so far: ``hf``.

``hf`` writes a folder that Hugging Face ``transformers`` loads with
``AutoModelForCausalLM.from_pretrained(OUT)`` and ``AutoTokenizer.from_pretrained(OUT)``:

- ``config.json`` and ``model.safetensors``: the blocks plugin maps its family onto a transformers
  architecture through its optional ``export_hf(config, state_dict)`` method (see
  :class:`~anexa_core.interfaces.Blocks`); the core adds what it owns (vocabulary size, tied head, no
  special tokens). A family or option without a mapping is a one-line :class:`AnexaError`.
- ``tokenizer.json`` and ``tokenizer_config.json``: the tokenizer plugin's optional ``export_hf()``
  returns a ``tokenizers.Tokenizer`` with the same ids (see :class:`~anexa_core.interfaces.Tokenizer`).
- ``README.md``: a model card (data, steps, losses, parameters, the command that trained it, how to load
  and upload it), which the Hub shows as the model's page.

The folder is written beside ``OUT`` and renamed into place, so ``OUT`` is never half-written.
Uploading is ``huggingface_hub``'s job: ``hf upload USER/NAME OUT .``. Nothing here imports transformers.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from anexa_core import options, plugins
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.io import checkpoint
from anexa_core.io.files import atomic_folder
from anexa_core.io.load import load
from anexa_core.kinds import SETTINGS

FORMATS = ("hf", "gguf")
UPLOAD_COMMAND = "hf upload USER/NAME {out} ."
"""How to upload an exported folder with huggingface_hub's CLI (after ``hf auth login``)."""

HF_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "README.md")


@dataclass
class Exported:
    """What :func:`export` wrote: the folder, its files, the transformers architecture and the checkpoint's
    step, validation loss (nats per token, ``None`` if never evaluated) and parameter count."""

    out: Path
    files: list[str]
    architecture: str
    parameters: int
    step: int | None
    val_loss: float | None
    source: Path


def export(run: Path, out: Path, format: str = "hf", overwrite: bool = False) -> Exported:
    """Write the model of ``run`` (a run folder — its best checkpoint — or a ``.safetensors`` file) to the
    folder ``out`` in ``format``.

    Raises :class:`AnexaError` for an unknown format, a model or tokenizer that cannot be expressed in
    it, an ``out`` that is a file, holds an Anexa run, or is a non-empty folder without ``overwrite``.
    """
    if format not in FORMATS:
        raise AnexaError(f"unknown export format {format!r}: use one of {', '.join(FORMATS)}")
    out = Path(out)
    if format == "gguf":
        return export_gguf(run, out, overwrite)
    _check_target(out, overwrite)
    loaded = load(run, "cpu")
    model, tokenizer, meta = loaded.model, loaded.tokenizer, loaded.meta
    hf_config, tensors = hf_model(model, meta)
    hf_tokenizer = tokenizer_hf(tokenizer, meta)
    specials = special_tokens(tokenizer)
    hf_config.update(specials["ids"])
    parameters = model.num_parameters()
    card = model_card(meta, hf_config, parameters, out)
    with atomic_folder(out, replace=out.exists()) as folder:
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        safetensors.torch.save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        (folder / "tokenizer.json").write_text(hf_tokenizer.to_str(pretty=True), encoding="utf-8")
        tokenizer_config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model.config.block_size,
            "clean_up_tokenization_spaces": False,  # decode must give the text back exactly
            **specials["config"],
        }
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n", encoding="utf-8")
        (folder / "README.md").write_text(card, encoding="utf-8")
    return Exported(
        out,
        list(HF_FILES),
        hf_config["architectures"][0],
        parameters,
        meta.get("step"),
        meta.get("val_loss"),
        Path(meta["path"]),
    )


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AnexaError(f"{out} is a file: pass a folder to export into")
    if checkpoint.holds_a_run(out):
        raise AnexaError(f"{out} holds an Anexa run: export into another folder (--overwrite never replaces a run)")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AnexaError(f"{out} is not empty: pass --overwrite to replace it, or another folder")


def hf_model(model, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json entries, tensors under transformers' names)`` for ``model``, from its blocks plugin's
    ``export_hf`` plus the entries the core owns. The tensors are contiguous CPU copies sharing no memory.

    Raises :class:`AnexaError` when the blocks plugin has no ``export_hf`` or refuses the model's options."""
    config = model.config
    family, _ = plugins.create(
        "blocks", config.blocks, config.blocks_options, needed_by=meta.get("plugins", {}).get("blocks")
    )
    mapping = getattr(family, "export_hf", None)
    if mapping is None:
        owner = plugins.lookup("blocks", config.blocks).owner()
        raise AnexaError(
            f"blocks {config.blocks!r} cannot be exported to Hugging Face: its {owner} defines no "
            "export_hf mapping (see docs/plugins.md)"
        )
    state = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()}
    if config.tie_embeddings:
        del state["lm_head.weight"]  # the same matrix as wte.weight; transformers ties it again on load
    hf_config, hf_state = mapping(config, state)
    dtype = state["wte.weight"].dtype
    hf_config = {
        **hf_config,
        "vocab_size": config.vocab_size,
        "tie_word_embeddings": config.tie_embeddings,
        # Anexa's tokenizers have no special tokens: no BOS/EOS/padding (Llama's config would default to 1 and 2).
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
        "dtype": str(dtype).removeprefix("torch."),
    }
    # Copies: safetensors refuses tensors that share memory (a view, the same tensor under two names).
    tensors = {name: tensor.detach().to("cpu", copy=True).contiguous() for name, tensor in hf_state.items()}
    return hf_config, tensors


def special_tokens(tokenizer) -> dict[str, dict[str, Any]]:
    """What a pretrained model's tokenizer (the ``hf`` plugin) says is special, for ``config.json``
    (``ids``: ``bos_token_id``, ``eos_token_id`` — every end-of-turn id) and ``tokenizer_config.json``
    (``config``: the special tokens, ``add_bos_token``, ``chat_template``). Empty for Anexa's own
    tokenizers, which have none."""
    special = getattr(tokenizer, "special_tokens", None)
    if not special:
        return {"ids": {}, "config": {}}
    eos_ids = list(getattr(tokenizer, "eos_ids", []))
    ids = {
        "bos_token_id": getattr(tokenizer, "bos_id", None),
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else eos_ids or None,
    }
    config = {key: value for key, value in special.items() if value is not None}
    config["add_bos_token"] = bool(getattr(tokenizer, "add_bos", False))
    if getattr(tokenizer, "chat_template", None):
        config["chat_template"] = tokenizer.chat_template
    return {"ids": ids, "config": config}


def tokenizer_hf(tokenizer, meta: dict[str, Any]):
    """The tokenizer plugin's ``export_hf()``: a ``tokenizers.Tokenizer`` with the same ids."""
    mapping = getattr(tokenizer, "export_hf", None)
    name = meta["tokenizer"]["name"]
    if mapping is None:
        raise AnexaError(f"tokenizer {name!r} cannot be exported to Hugging Face: its plugin defines no export_hf")
    return mapping()


# --- the model card ---------------------------------------------------------------------------------


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


_MODEL_FLAGS = ("blocks", "attention", "n_layer", "n_head", "n_embd", "block_size", "dropout")
_TRAIN_FLAGS = (
    "data",
    "tokenizer",
    "optimizer",
    "steps",
    "decay_steps",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_steps",
    "eval_every",
    "save_every",
    "seed",
    "device",
)
_NO_FLAG = {"model": ("tie_embeddings",), "train": ("grad_clip", "eval_batches")}


def training_command(model_config: dict[str, Any], train_config: dict[str, Any]) -> tuple[str, str | None]:
    """An ``anexa train`` command that trains this model again, and the TOML ``--config`` file it needs
    (``None`` when every setting has a flag).

    Every setting with a flag is given (presets do not matter then); plugin options as ``-o
    KIND.OPTION=VALUE`` where they differ from the installed plugin's default (all of them when the
    plugin is not installed). ``--decay-steps`` only when it differs from ``--steps``, ``--device`` only
    when not ``auto``.
    """
    args = ["anexa", "train"]
    settings = {**model_config, **train_config}
    for key in _MODEL_FLAGS + _TRAIN_FLAGS:
        value = settings.get(key)
        if key == "decay_steps" and value in (None, settings.get("steps")):
            continue
        if key == "device" and value == "auto":
            continue
        args += [f"--{key.replace('_', '-')}", _flag_value(value)]
    for setting, kind in SETTINGS.items():
        config = model_config if kind.config == "model" else train_config
        given = config.get(f"{setting}_options") or {}
        try:
            defaults = {o.name: o.default for o in options.describe(plugins.get(kind.name, config[setting]))}
        except (AnexaError, TypeError):  # not installed, or several --data values
            defaults = {}
        for name, value in given.items():
            if name not in defaults or defaults[name] != value:
                args += ["-o", f"{setting}.{name}={_flag_value(value)}"]
    toml_lines = []
    for section, keys in _NO_FLAG.items():
        fresh: ModelConfig | TrainConfig = ModelConfig() if section == "model" else TrainConfig()
        config = model_config if section == "model" else train_config
        for key in keys:
            if key in config and config[key] != getattr(fresh, key):
                toml_lines.append(f"{key} = {json.dumps(config[key])}")
    if toml_lines:
        args += ["--config", "train.toml"]
    return shlex.join(args), ("\n".join(toml_lines) + "\n" if toml_lines else None)


def _describe_data(spec: str) -> str:
    datasets = plugins.registered("datasets")
    if spec in datasets:
        try:
            corpus, _ = plugins.create("datasets", spec)
            return f"`{spec}`: {' '.join(corpus.description.split())}"
        except AnexaError:
            pass
    return f"`{spec}`"


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not evaluated"


def model_card(meta: dict[str, Any], hf_config: dict[str, Any], parameters: int, out: Path) -> str:
    """The README.md of an exported folder: front matter for the Hub, then what the model is, how it was
    trained (the command), and how to load and upload it."""
    model_config, train_config = meta["model_config"], meta.get("train_config") or {}
    tokenizer = meta["tokenizer"]["name"]
    architecture = hf_config["architectures"][0]
    command, toml = training_command(model_config, train_config) if train_config else (None, None)
    step, run_steps = meta.get("step"), train_config.get("steps")
    steps = (
        f"{step}"
        if step == run_steps or run_steps is None
        else f"{step} (the best validation loss of a {run_steps}-step run)"
    )
    name = out.resolve().name
    prompt = "Sherlock Holmes" if train_config.get("data") == "sherlock" else "The"
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [anexa, {model_config['blocks']}, {tokenizer}-tokenizer]",
        "---",
        "",
        f"# {name}",
        "",
        f"A small {architecture} language model ({parameters:,} parameters) trained from scratch with "
        f"Anexa {meta.get('anexa_version', '')} and exported by `anexa export`.",
        "",
        "| | |",
        "| --- | --- |",
        f"| data | {_describe_data(train_config.get('data', '?'))} |",
        f"| steps | {steps} |",
        f"| val loss | {_loss(meta.get('val_loss'))} nats/token (train {_loss(meta.get('train_loss'))}) |",
        f"| parameters | {parameters:,} |",
        f"| architecture | Anexa blocks `{model_config['blocks']}` → `{architecture}`: {model_config['n_layer']} layers, "
        f"{model_config['n_head']} heads, width {model_config['n_embd']} |",
        f"| context | {model_config['block_size']} tokens |",
        f"| tokenizer | `{tokenizer}`, {model_config['vocab_size']} tokens |",
        "",
    ]
    if command:
        lines += ["## How it was trained", "", "```sh", command, "```", ""]
        if toml:
            lines += ["with `train.toml`:", "", "```toml", toml.rstrip("\n"), "```", ""]
    lines += [
        "## Use",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'path = "{name}"  # this folder, or USER/NAME on the Hub',
        "tokenizer = AutoTokenizer.from_pretrained(path)",
        "model = AutoModelForCausalLM.from_pretrained(path)",
        f'ids = tokenizer("{prompt}", return_tensors="pt").input_ids',
        f"out = model.generate(ids, max_new_tokens={min(100, model_config['block_size'] // 2)}, do_sample=True, top_k=0)",
        "print(tokenizer.decode(out[0]))",
        "```",
        "",
        f"It was trained on windows of {model_config['block_size']} tokens: keep prompt plus output within "
        "that, cropping the prompt from the left.",
    ]
    if tokenizer == "char":
        lines += ["The tokenizer knows only the characters of the training text; others cannot be encoded."]
    lines += [
        "",
        "## Upload",
        "",
        "```sh",
        "hf auth login",
        UPLOAD_COMMAND.format(out=shlex.quote(str(out))),
        "```",
        "",
    ]
    return "\n".join(lines)


# --- GGUF -------------------------------------------------------------------------------------------


def export_gguf(run: Path, out: Path, overwrite: bool = False, dtype: str = "f32") -> Exported:
    """Write the model of ``run`` as one GGUF file ``out`` (``….gguf``) for llama.cpp and ollama: the same
    transformers mapping as ``--format hf`` (:func:`hf_model`), through :func:`anexa_core.io.gguf.write_gguf`,
    with the tokenizer and the chat template in the file's metadata.

    Raises :class:`AnexaError` for an ``out`` that is not a ``.gguf`` path or exists (without
    ``overwrite``), a char tokenizer (GGUF has no character-level tokenizer), GPT-2 blocks with the exact
    GELU (llama.cpp's GPT-2 computes the tanh approximation), and what :func:`hf_model` refuses."""
    from anexa_core.io import gguf

    if out.suffix.lower() != ".gguf":
        raise AnexaError(f"{out}: a GGUF export is one file: pass OUT ending in .gguf")
    if out.is_dir() or (out.exists() and not overwrite):
        raise AnexaError(f"{out} exists: pass --overwrite to replace it, or another file")
    loaded = load(run, "cpu")
    model, tokenizer, meta = loaded.model, loaded.tokenizer, loaded.meta
    config = model.config
    if config.blocks == "gpt2" and config.blocks_options.get("gelu", "exact") == "exact":
        raise AnexaError(
            "blocks 'gpt2' with gelu='exact' cannot be exported to GGUF: llama.cpp's GPT-2 computes the tanh "
            "GELU, so its logits would differ; export --format hf, or train with -o blocks.gelu=tanh"
        )
    hf_config, tensors = hf_model(model, meta)
    if meta["tokenizer"]["name"] == "hf":
        state = tokenizer.state_dict()
    elif meta["tokenizer"]["name"] == "char":
        raise AnexaError(
            "tokenizer 'char' cannot be exported to GGUF (llama.cpp has no character-level "
            "tokenizer): export --format hf, or train with --tokenizer bpe"
        )
    else:
        state = {
            "type": "hf",
            "tokenizer": tokenizer_hf(tokenizer, meta).to_str(),
            "special_tokens": {},
            "eos_tokens": [],
            "add_bos": False,
            "chat_template": None,
        }
    gguf.write_gguf(out, hf_config, tensors, state, name=out.stem, dtype=dtype)
    return Exported(
        out,
        [out.name],
        hf_config["architectures"][0],
        model.num_parameters(),
        meta.get("step"),
        meta.get("val_loss"),
        Path(meta["path"]),
    )
