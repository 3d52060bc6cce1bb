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

import contextlib
import json
import shlex
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from anexa_core import options, plugins
from anexa_core.config import FINETUNE, FIXED_BY_BASE, LORA, ModelConfig, TrainConfig
from anexa_core.data.corpus import hf_normalizer
from anexa_core.errors import AnexaError, choose_one_of, listed
from anexa_core.io import checkpoint, generation_config
from anexa_core.io.files import atomic_folder, check_outside_runs, put_back
from anexa_core.io.load import bases_needed, load
from anexa_core.io.pretrained import Origin, is_hub_id, origin_of
from anexa_core.kinds import SETTINGS

FORMATS = ("hf", "gguf")
UPLOAD_COMMAND = "hf upload USER/NAME {out} ."
"""How to upload an exported folder with huggingface_hub's CLI (after ``hf auth login``)."""

HF_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
    "README.md",
)  # fmt: skip
"""What an ``hf`` export may hold (``generation_config.json`` only for a model with recommended sampling)."""


@dataclass
class Exported:
    """What :func:`export` wrote: the folder, its files, the transformers architecture and the checkpoint's
    step, validation loss (nats per token, ``None`` if never evaluated) and parameter count; ``notes``:
    what the format could not carry, one line each, for the user to read."""

    out: Path
    files: list[str]
    architecture: str
    parameters: int
    step: int | None
    val_loss: float | None
    source: Path
    notes: list[str] = field(default_factory=list)


def export(run: Path, out: Path, format: str = "hf", overwrite: bool = False, outtype: str = "f32") -> Exported:
    """Write the model of ``run`` (a run folder — its best checkpoint — or a ``.safetensors`` file) to the
    folder ``out`` in ``format``; ``outtype`` (``gguf`` only): how its weight matrices are stored, one of
    :data:`anexa_core.io.gguf.WRITE_DTYPES` (``hf`` stores the run's float32).

    Raises :class:`AnexaError` for an unknown format or outtype, an outtype other than f32 or an ``out``
    ending in ``.gguf`` for ``hf``, a model or tokenizer that cannot be expressed in the format, an ``out``
    that is a file, holds an Anexa run or anything an export does not write (``overwrite`` replaces an
    earlier export, nothing else), or holds an earlier export without ``overwrite``.
    """
    from anexa_core.io.gguf import WRITE_DTYPES

    if format not in FORMATS:
        raise AnexaError(f"unknown export format {format!r}: {choose_one_of(format, FORMATS)}")
    if outtype not in WRITE_DTYPES:
        raise AnexaError(f"unknown --outtype {outtype!r}: {choose_one_of(outtype, WRITE_DTYPES)}")
    if format != "gguf" and outtype != "f32":
        raise AnexaError(
            f"--outtype {outtype} applies to --format gguf (hf stores float32): drop it or add --format gguf"
        )
    out = Path(out)
    if format == "hf" and out.suffix.lower() == ".gguf":
        raise AnexaError(f"{out} names a GGUF file, but --format hf writes a folder: add --format gguf")
    put_back(out)  # an export killed mid-rename put the old OUT aside: back first
    _check_beside_runs(run, out)
    if format == "gguf":
        return export_gguf(run, out, overwrite, outtype)
    _check_target(out, overwrite)
    loaded = load(run, "cpu", decoding=False)
    model, tokenizer, meta = loaded.model, loaded.tokenizer, loaded.meta
    hf_config, tensors = hf_model(model, meta)
    hf_tokenizer = tokenizer_hf(tokenizer, meta)
    specials = special_tokens(tokenizer)
    hf_config.update(specials["ids"])
    parameters = model.num_parameters()
    origin = origin_of(meta)
    card = model_card(meta, hf_config, parameters, out, origin, latest_of_run(meta))
    generation = _generation_config(origin, specials["ids"])
    with atomic_folder(out, replace=out.exists()) as folder:
        (folder / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n", encoding="utf-8")
        if generation:
            (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
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
        [name for name in HF_FILES if generation or name != "generation_config.json"],
        hf_config["architectures"][0],
        parameters,
        meta.get("step"),
        meta.get("val_loss"),
        Path(meta["path"]),
    )


def _generation_config(origin: Origin | None, ids: dict[str, Any]) -> dict[str, Any]:
    """``generation_config.json`` for a model whose makers recommend a sampling (``{}`` for others; ``origin``:
    :func:`origin_of` the run), with the special ids: transformers reads them from this file once it exists."""
    generation = generation_config.to_hf(origin.generation() if origin is not None else {})
    return {**{key: value for key, value in ids.items() if value is not None}, **generation} if generation else {}


CARD_TAGS = "tags: [anexa, "
"""How the tags of every model card an export writes begin: what tells an earlier export's folder from a
folder of the same file names that someone else wrote."""


def _not_exported(out: Path, present: list[str]) -> list[str]:
    """The entries of ``present`` (in the folder ``out``) that no Anexa export wrote: names an export never
    writes, or every file when the model card is not Anexa's (a folder of transformers' ``save_pretrained``
    holds the same names; only an export's card has front-matter tags starting with ``anexa``)."""
    others = [name for name in present if name not in HF_FILES]
    if present and not others:
        try:
            ours = f"\n{CARD_TAGS}" in (out / "README.md").read_text(encoding="utf-8")[:2000]
        except (OSError, UnicodeDecodeError):
            ours = False
        others = [] if ours else [name for name in present if name != "README.md"] or present
    return others


def _check_beside_runs(run: Path, out: Path) -> None:
    """Raises :class:`AnexaError` for an ``out`` inside a run folder (or below one), and for one that is, or
    holds, a base the LoRA run ``run`` loads its model from (replacing it would break the run for good)."""
    check_outside_runs(out, "OUT")
    target = out.resolve()
    for base in bases_needed(run):
        if target == base or target in base.parents:
            raise AnexaError(
                f"{out} is the base the LoRA run {run} loads its model from: exporting over it would break the "
                "run; pass another path"
            )


def _check_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise AnexaError(f"{out} is a file: pass a folder to export into")
    if checkpoint.holds_a_run(out):
        raise AnexaError(f"{out} holds an Anexa run: export into another folder (--overwrite never replaces a run)")
    present = sorted(entry.name for entry in out.iterdir()) if out.is_dir() else []
    others = _not_exported(out, present)
    if others:  # a parent of runs, a user's folder, the current directory: never replaced, not even on request
        raise AnexaError(
            f"{out} is not empty and not an earlier export (it holds {listed(others)}): pass a new or empty folder "
            "(--overwrite replaces only an export)"
        )
    if present and not overwrite:
        raise AnexaError(f"{out} holds an earlier export: pass --overwrite to replace it, or another folder")


def hf_model(model, meta: dict[str, Any]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json entries, tensors under transformers' names)`` for ``model``, from its blocks plugin's
    ``export_hf`` plus the entries the core owns. The tensors are contiguous CPU copies sharing no memory.

    Raises :class:`AnexaError` when the blocks plugin has no ``export_hf`` or refuses the model's options,
    or when the attention plugin computes something else than the exact softmax attention every
    transformers architecture computes (:func:`check_exact_attention`)."""
    config = model.config
    check_exact_attention(config)
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


def _described(name: str, options_given: dict[str, Any]) -> str:
    shown = ", ".join(f"{key}={value!r}" for key, value in options_given.items())
    return f"{name!r} ({shown})" if shown else repr(name)


def check_exact_attention(config) -> None:
    """Refuse a model whose attention plugin, with its options, does not compute exact causal softmax
    attention over the whole context (:func:`attention_deviation` above 1e-4) — the only attention
    ``GPT2LMHeadModel``, ``LlamaForCausalLM`` and ``Qwen3ForCausalLM`` compute — so an export never silently
    changes what the model says. A sliding window at least as long as the context passes (it is exact
    there); a shorter one does not. Raises :class:`AnexaError` naming the plugin and its options."""
    worst, options_used = attention_deviation(config)
    if not worst <= EXACT_ATTENTION:  # also catches NaN
        raise AnexaError(
            f"attention {_described(config.attention, options_used)} cannot be exported to Hugging Face: it is "
            f"not exact softmax attention over the {config.block_size}-token context (it differs by {worst:.2g} "
            "on random inputs), which is all transformers computes; export a model trained with exact attention (sdpa)"
        )


EXACT_ATTENTION = 1e-4
"""The largest :func:`attention_deviation` of an attention that computes exact softmax attention."""


def attention_deviation(config) -> tuple[float, dict[str, Any]]:
    """How far ``config``'s attention plugin, with its options, is from exact causal softmax attention: the
    largest absolute difference relative to the largest output (at least 1), float64, and the options it used.

    Judged by what the plugin computes, not by its name: random queries, keys and values of the model's
    shapes (every position of a context of up to 512 tokens, and the last 3 queries against keys of the
    whole ``block_size``, as when decoding), compared with :func:`anexa_core.testing.reference_attention`.
    NaN when the plugin returns NaN. Raises :class:`AnexaError` for a plugin that is not installed."""
    from anexa_core.testing import reference_attention

    attend, options_used = plugins.create("attention", config.attention, config.attention_options)
    generator = torch.Generator().manual_seed(0)
    length, heads, dim = config.block_size, config.n_head, config.head_dim
    worst = 0.0
    # A pretrained model's 8192-token context in full would take gigabytes of attention scores.
    for queries, keys in ((min(length, 512),) * 2, (min(3, length), length)):
        q = torch.randn(2, heads, queries, dim, generator=generator)
        k, v = (torch.randn(2, heads, keys, dim, generator=generator) for _ in range(2))
        with torch.no_grad():
            got = attend(q, k, v, causal=True).double()
        expected = reference_attention(q, k, v, causal=True)
        deviation = (got - expected).abs().max().item() / max(1.0, expected.abs().max().item())
        if deviation != deviation:  # NaN: max() would drop it
            return deviation, options_used
        worst = max(worst, deviation)
    return worst, options_used


def tokenizer_hf(tokenizer, meta: dict[str, Any]):
    """The tokenizer plugin's ``export_hf()`` — a ``tokenizers.Tokenizer`` with the plugin's ids — behind
    Anexa's own text normalisation (:func:`~anexa_core.data.corpus.hf_normalizer`, ahead of any normalizer
    the plugin's has), so the export turns any text into the ids Anexa feeds the model for it
    (:func:`~anexa_core.infer.generation.encode_prompt`): ``a\\r\\nb`` like ``a\\nb``, no byte-order mark."""
    from tokenizers import normalizers

    mapping = getattr(tokenizer, "export_hf", None)
    name = meta["tokenizer"]["name"]
    if mapping is None:
        raise AnexaError(f"tokenizer {name!r} cannot be exported to Hugging Face: its plugin defines no export_hf")
    exported = mapping()
    own = exported.normalizer
    exported.normalizer = normalizers.Sequence([hf_normalizer(), *([own] if own is not None else [])])
    return exported


# --- the model card ---------------------------------------------------------------------------------


def _flag_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return "none" if value is None else str(value)


_MODEL_FLAGS = ("blocks", "attention", "n_layer", "n_head", "n_embd", "block_size", "dropout")
_TRAIN_FLAGS = (
    "tokenizer",
    "optimizer",
    "steps",
    "minutes",
    "decay_steps",
    "batch_size",
    "lr",
    "min_lr",
    "warmup_steps",
    "eval_every",
    "save_every",
    "seed",
    "device",
    "precision",
)
_NO_FLAG = {"model": ("tie_embeddings",), "train": ("grad_clip", "eval_batches", "decay_minutes")}


def shareable_data(spec: str) -> str:
    """A ``--data`` value as it may appear in something shared: a dataset name or an http(s) URL (without
    user, password, query or fragment; its port kept) as it is, a local file or folder by its name alone —
    never the path, which would tell where the files lie and, often, the user's name."""
    if spec in plugins.registered("datasets"):
        return spec
    parsed = urllib.parse.urlsplit(spec)
    if parsed.scheme in ("http", "https"):
        host = parsed.hostname or ""
        host = f"[{host}]" if ":" in host else host  # IPv6
        host += f":{parsed.port}" if parsed.port is not None else ""
        return urllib.parse.urlunsplit((parsed.scheme, host, parsed.path, "", ""))
    name = Path(spec.rstrip("/\\")).name
    return "data" if not name or name in _user_names() else name


def _user_names() -> set[str]:
    """The names that would tell who the user is: the home folder's and the login's (``--data ~/``)."""
    import getpass

    names = {Path.home().name}
    with contextlib.suppress(Exception):  # no login name in some containers
        names.add(getpass.getuser())
    return names


def _data_list(train_config: dict[str, Any]) -> list[str]:
    data = train_config.get("data")
    return [data] if isinstance(data, str) else list(data or [])


def _shareable(values: Any) -> list[str]:
    return [shareable_data(spec) for spec in ([values] if isinstance(values, str) else list(values or []))]


def shareable_model(spec: str) -> str:
    """An ``--init-from`` value as it may appear in something shared: a Hugging Face hub id (``ORG/NAME``,
    not a local path) as it is, a local run, folder or file by its name alone."""
    if is_hub_id(spec):
        return spec
    return Path(spec.rstrip("/\\")).name or "model"


def training_command(
    model_config: dict[str, Any], train_config: dict[str, Any], init_from: str | None = None
) -> tuple[str, str | None]:
    """An ``anexa train`` command that trains this model again, and the TOML ``--config`` file it needs
    (``None`` when every setting has a flag).

    Every setting with a flag is given (presets do not matter then); plugin options as ``-o
    KIND.OPTION=VALUE`` where they differ from the installed plugin's default (all of them when the
    plugin is not installed). ``--data`` values as :func:`shareable_data` shows them (a local file by its
    name). ``--steps`` only when the run had a step limit, ``--minutes`` only when it had a time budget,
    ``--decay-steps`` only when it differs from ``--steps`` (and ``decay_minutes`` from ``--minutes``),
    ``--device`` and ``--precision`` only when not ``auto``; never ``--threads``, which changes only the
    speed (and the last bits of the sums). A fine-tuning run gives ``--init-from`` (``init_from`` when given —
    the name of the pretrained model its base was imported from —, else the run's own as
    :func:`shareable_model` shows it), ``--lora`` and ``--seq-len``, and none of the settings its base fixes
    (shape, blocks, tokenizer).
    """
    # Why complex: each condition is one of the docstring's rules for when a flag is written or left out, in the
    # docstring's order (fine-tuning, data, globs, steps/minutes, decay, auto); apart they would not read as a list.
    args = ["anexa", "train"]
    settings = {**model_config, **train_config}
    base = train_config.get("init_from")
    fixed = FIXED_BY_BASE if base is not None else ()
    if base is not None:
        args += ["--init-from", init_from or shareable_model(base)]
        if train_config.get("lora") is not None:
            args += ["--lora", _flag_value(train_config["lora"])]
    if train_config.get("seq_len") is not None:  # windows shorter than the context, from scratch too
        args += ["--seq-len", _flag_value(train_config["seq_len"])]
    for spec in _shareable(train_config.get("data", "sherlock")):
        args += ["--data", spec]
    globs = train_config.get("data_glob")
    if globs and tuple(globs) != ("*.txt", "*.md"):
        for glob in globs:
            args += ["--glob", glob]
    for key in _MODEL_FLAGS + _TRAIN_FLAGS:
        value = settings.get(key)
        if key in fixed or (key == "decay_steps" and value in (None, settings.get("steps"))):
            continue
        if key in ("steps", "minutes") and value is None:
            continue
        if key in ("device", "precision") and value == "auto":
            continue
        args += [f"--{key.replace('_', '-')}", _flag_value(value)]
    args += _option_flags(model_config, train_config, fixed)
    defaults = TrainConfig(**((LORA if train_config.get("lora") else FINETUNE) if base is not None else {}))
    toml_lines = _toml_lines(model_config, train_config, fixed, defaults)
    if toml_lines:
        args += ["--config", "train.toml"]
    return shlex.join(args), ("\n".join(toml_lines) + "\n" if toml_lines else None)


def _option_flags(model_config: dict[str, Any], train_config: dict[str, Any], fixed: tuple[str, ...]) -> list[str]:
    """``-o KIND.OPTION=VALUE`` for each plugin option that differs from the installed plugin's default."""
    flags = []
    for setting, kind in SETTINGS.items():
        if setting in fixed:
            continue
        config = model_config if kind.config == "model" else train_config
        given = config.get(f"{setting}_options") or {}
        try:
            defaults = {o.name: o.default for o in options.describe(plugins.get(kind.name, config[setting]))}
        except (AnexaError, TypeError):  # not installed, or several --data values
            defaults = {}
        for name, value in given.items():
            if name not in defaults or defaults[name] != value:
                flags += ["-o", f"{setting}.{name}={_flag_value(value)}"]
    return flags


def _toml_lines(
    model_config: dict[str, Any], train_config: dict[str, Any], fixed: tuple[str, ...], defaults: TrainConfig
) -> list[str]:
    """The ``train.toml`` lines of the settings without a flag that differ from their defaults: ``defaults``
    for the training settings (a fine-tune's, :data:`~anexa_core.config.FINETUNE` or
    :data:`~anexa_core.config.LORA`, which ``--init-from`` brings back), ``ModelConfig()``'s for the model's."""
    lines = []
    for section, keys in _NO_FLAG.items():
        fresh: ModelConfig | TrainConfig = ModelConfig() if section == "model" else defaults
        config = model_config if section == "model" else train_config
        for key in keys:
            if key in fixed or (key == "decay_minutes" and config.get(key) == config.get("minutes")):
                continue
            if key in config and config[key] != getattr(fresh, key):
                lines.append(f"{key} = {json.dumps(config[key])}")
    return lines


def _describe_data(data: Any) -> str:
    """The card's data cell: each ``--data`` value as :func:`shareable_data` shows it, a dataset with its
    description, a local file or folder said to be one."""
    datasets = plugins.registered("datasets")
    described = []
    for spec in [data] if isinstance(data, str) else list(data or ["?"]):
        shown = shareable_data(spec)
        if spec in datasets:
            try:
                corpus, _ = plugins.create("datasets", spec)
                described.append(f"`{spec}`: {' '.join(corpus.description.split())}")
                continue
            except AnexaError:
                pass
        described.append(f"`{shown}`" if shown == spec or "://" in shown else f"`{shown}` (a local file or folder)")
    return "; ".join(described)


def _loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, (int, float)) else "not evaluated"


def latest_of_run(meta: dict[str, Any]) -> dict[str, Any]:
    """The metadata of the latest checkpoint of the run the checkpoint ``meta`` (with ``"path"``) belongs
    to: its folder's ``model.safetensors`` when that holds the same model, else ``meta`` itself."""
    source = Path(meta["path"])
    latest_path = source.parent / checkpoint.MODEL_FILE
    if latest_path == source or not latest_path.is_file():
        return meta
    try:
        latest = checkpoint.read_metadata(latest_path)
    except AnexaError:
        return meta
    same = all(latest.get(key) == meta.get(key) for key in ("model_config", "tokenizer"))
    return latest if same else meta


def _steps_cell(meta: dict[str, Any], latest: dict[str, Any]) -> str:
    step, last = meta.get("step"), latest.get("step")
    if last is None or step == last:
        return f"{step}"
    return f"{step} of the run's {last} (the checkpoint with the best validation loss)"


def _time_cell(latest: dict[str, Any], train_config: dict[str, Any]) -> str | None:
    elapsed = latest.get("elapsed_s")
    if not isinstance(elapsed, (int, float)):
        return None
    budget = train_config.get("minutes")
    limit = f" of a {budget:g}-minute budget" if isinstance(budget, (int, float)) else ""
    return f"{elapsed / 60:.1f} minutes{limit}"


def _what_it_is(
    meta: dict[str, Any], train_config: dict[str, Any], origin: Origin | None, architecture: str, parameters: int
) -> str:
    """The card's first sentence: trained from scratch, fine-tuned from a pretrained model, imported, or
    saved untrained."""
    model = f"{architecture} language model ({parameters:,} parameters)"
    version = f"Anexa {meta.get('anexa_version', '')}"
    if not train_config and origin is None:
        return f"A small {model} saved by {version} without training (its initial weights), exported by `anexa export`."
    if origin is not None and not train_config:
        return (
            f"A {model} imported into {version} from {origin.describe()} and exported by `anexa export`: its "
            "pretrained weights, not trained by Anexa."
        )
    base = train_config.get("init_from")
    if base is None:
        return f"A small {model} trained from scratch with {version} and exported by `anexa export`."
    lora = train_config.get("lora")
    how = f"its LoRA adapters (`--lora {lora}`) merged into the weights" if lora else "every weight trained"
    source = origin.describe() if origin is not None else f"`{shareable_model(base)}`"
    return f"A {model} fine-tuned from {source} with {version}, {how}, and exported by `anexa export`."


def _history_rows(
    meta: dict[str, Any], latest: dict[str, Any], train_config: dict[str, Any], origin: Origin | None
) -> list[str]:
    """The card's rows on where the weights came from and how Anexa trained them: the pretrained model, a GGUF
    file's SHA-256 (so that whoever retrains it can check their copy), its licence and recommended sampling;
    the data, steps, time and losses of a trained model; "not trained" for one saved untrained."""
    rows = []
    if origin is not None:
        rows.append(f"| {'base model' if train_config else 'source'} | {origin.describe()} |")
        if digest := origin.sha256sum():
            rows.append(f"| its SHA-256 | `{digest}` |")
        if origin.source.get("license"):
            rows.append(f"| licence | {origin.source['license']} (the pretrained model's) |")
        found = generation_config.recommended(origin.generation(), meta["model_config"]["block_size"])
        if found is not None:
            shown = " → ".join(f"`{spec}`" for spec in found.every)
            rows.append(f"| recommended sampling | {shown} (its makers'; used when none is chosen) |")
    steps = _steps_cell(meta, latest)
    if train_config:
        trained_for = _time_cell(latest, train_config)
        rows += [
            f"| data | {_describe_data(train_config.get('data', '?'))} |",
            f"| steps | {steps} |",
            *([f"| training time | {trained_for} |"] if trained_for else []),
            f"| val loss | {_loss(meta.get('val_loss'))} nats/token (train {_loss(meta.get('train_loss'))}) |",
        ]
    elif origin is None:
        rows += [f"| steps | {steps} (not trained) |", "| val loss | not evaluated |"]
    return rows


def _window(model_config: dict[str, Any], train_config: dict[str, Any]) -> int | None:
    """Tokens per training window (``--seq-len``, else the context); ``None`` for a model Anexa did not train."""
    if not train_config:
        return None
    return min(train_config.get("seq_len") or model_config["block_size"], model_config["block_size"])


def model_card(
    meta: dict[str, Any],
    hf_config: dict[str, Any],
    parameters: int,
    out: Path,
    origin: Origin | None,
    latest: dict[str, Any] | None = None,
) -> str:
    """The README.md of an exported folder: front matter for the Hub, then what the model is, how it was
    trained (the command), and how to load and upload it.

    ``origin``: where the model came from (:func:`origin_of` ``meta``). ``latest``: the metadata of the
    run's latest checkpoint (:func:`latest_of_run`), for the steps and time the run trained when ``meta``
    is its best checkpoint. Every number is read from the metadata;
    no local path appears (data by :func:`shareable_data`, the folder by its name)."""
    # Why long: the card's Markdown written out line by line in the order it reads (front matter, table, command,
    # usage, upload); nearly all of it is literal text, the few ifs add optional lines.
    latest = latest or meta
    model_config, train_config = meta["model_config"], latest.get("train_config") or meta.get("train_config") or {}
    tokenizer = meta["tokenizer"]["name"]
    architecture = hf_config["architectures"][0]
    shown_base = origin.source.get("name") if origin is not None and origin.direct else None
    command, toml = training_command(model_config, train_config, shown_base) if train_config else (None, None)
    name = out.resolve().name
    prompt = "Sherlock Holmes" if train_config.get("data") == "sherlock" else "The"
    license = origin.source.get("license") if origin is not None else None
    hub_base = origin.hub_id() if origin is not None else None
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        *([f"license: {license}"] if license else []),
        *([f"base_model: {hub_base}"] if hub_base else []),
        f"{CARD_TAGS}{model_config['blocks']}, {tokenizer}-tokenizer]",
        "---",
        "",
        f"# {name}",
        "",
        _what_it_is(meta, train_config, origin, architecture, parameters),
        "",
        "| | |",
        "| --- | --- |",
        *_history_rows(meta, latest, train_config, origin),
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
        local = [
            shown
            for spec, shown in zip(_data_list(train_config), _shareable(train_config.get("data")), strict=True)
            if shown != spec and "://" not in shown
        ]
        if shown_base is not None and origin is not None and origin.source.get("kind") != "hub":
            local.append(shown_base)
        if local:
            lines += [
                f"{', '.join(f'`{name}`' for name in local)}: a local file or folder of the trainer's; put your copy there.",
                "",
            ]
        if train_config.get("minutes") is not None:
            lines += [
                "`--minutes` ends the run when its time is up, so the same command trains more or fewer steps on "
                "a faster or slower machine.",
                "",
            ]
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
        f"Its context is {model_config['block_size']} tokens: keep prompt plus output within that, cropping the "
        "prompt from the left."
        + (
            f" Anexa trained it on windows of {window} tokens."
            if (window := _window(model_config, train_config))
            else ""
        ),
    ]
    if tokenizer == "char":
        lines += ["The tokenizer knows only the characters of the training text; others cannot be encoded."]
    lines += [
        "",
        "## Upload",
        "",
        "```sh",
        "hf auth login",
        UPLOAD_COMMAND.format(out=shlex.quote(name)) + "   # from the folder that holds this one",
        "```",
        "",
    ]
    return "\n".join(lines)


# --- GGUF -------------------------------------------------------------------------------------------


def export_gguf(run: Path, out: Path, overwrite: bool = False, dtype: str = "f32") -> Exported:
    """Write the model of ``run`` as one GGUF file ``out`` (``….gguf``) for llama.cpp and ollama: the same
    transformers mapping as ``--format hf`` (:func:`hf_model`), through :func:`anexa_core.io.gguf.write_gguf`,
    with the tokenizer and the chat template in the file's metadata, and for a pretrained model or its
    fine-tune the pretrained model's licence and name (``general.license``, ``general.base_model.0.*``).

    Raises :class:`AnexaError` for an ``out`` that is not a ``.gguf`` path or exists (without
    ``overwrite``), a char tokenizer (GGUF has no character-level tokenizer), GPT-2 blocks with the exact
    GELU (llama.cpp's GPT-2 computes the tanh approximation), and what :func:`hf_model` refuses."""
    from anexa_core.io import gguf

    if out.suffix.lower() != ".gguf":
        raise AnexaError(f"{out}: a GGUF export is one file: pass OUT ending in .gguf")
    if out.is_dir() or (out.exists() and not overwrite):
        raise AnexaError(f"{out} exists: pass --overwrite to replace it, or another file")
    loaded = load(run, "cpu", decoding=False)
    model, tokenizer, meta = loaded.model, loaded.tokenizer, loaded.meta
    config = model.config
    refusals = {  # every reason at once, so that one retraining fixes them all
        "its blocks 'gpt2' compute the exact GELU where llama.cpp's GPT-2 computes the tanh one": (
            config.blocks == "gpt2" and config.blocks_options.get("gelu", "exact") == "exact",
            "-o blocks.gelu=tanh",
        ),
        "its tokenizer 'char' is character-level, which llama.cpp has no tokenizer for": (
            meta["tokenizer"]["name"] == "char",
            "--tokenizer bpe",
        ),
    }
    refused = {reason: fix for reason, (applies, fix) in refusals.items() if applies}
    if refused:
        raise AnexaError(
            f"{run} cannot be exported to GGUF: {'; '.join(refused)}. Export --format hf, or train with "
            f"{' '.join(refused.values())}"
        )
    hf_config, tensors = hf_model(model, meta)
    if meta["tokenizer"]["name"] == "hf":
        state = tokenizer.state_dict()
    else:
        state = {
            "type": "hf",
            "tokenizer": tokenizer_hf(tokenizer, meta).to_str(),
            "special_tokens": {},
            "eos_tokens": [],
            "add_bos": False,
            "chat_template": None,
        }
    gguf.write_gguf(out, hf_config, tensors, state, name=out.stem, dtype=dtype, **_gguf_provenance(meta))
    return Exported(
        out,
        [out.name],
        hf_config["architectures"][0],
        model.num_parameters(),
        meta.get("step"),
        meta.get("val_loss"),
        Path(meta["path"]),
        [GGUF_NORMALIZATION_NOTE],
    )


def _gguf_provenance(meta: dict[str, Any]) -> dict[str, Any]:
    """:func:`~anexa_core.io.gguf.write_gguf`'s ``license``, ``base_model`` and ``sampling`` for a pretrained
    model or its fine-tune (none for a model trained from scratch)."""
    origin = origin_of(meta)
    if origin is None:
        return {}
    base_model = {"name": origin.source.get("model_name") or origin.source["name"]}
    if origin.source.get("organization"):
        base_model["organization"] = origin.source["organization"]
    if hub_id := origin.hub_id():
        base_model["repo_url"] = f"https://huggingface.co/{hub_id}"
    sampling = generation_config.to_gguf(origin.generation())
    return {"license": origin.source.get("license"), "base_model": base_model, "sampling": sampling}


GGUF_NORMALIZATION_NOTE = (
    "llama.cpp encodes text as given, while Anexa turns \\r\\n and \\r into \\n and drops a leading byte-order "
    "mark before encoding (GGUF has no field for that; the hf export keeps it): give llama.cpp text with \\n "
    "line ends"
)
"""Why a GGUF export's tokenizer can give other ids than Anexa's: :func:`~anexa_core.data.corpus.normalize_text`
runs before every encode in Anexa, and travels into an ``hf`` export as the tokenizer's normalizer, but
GGUF's tokenizer metadata has no normalizer (llama.cpp's own converter drops one too)."""
