"""Continuing a run: the configs it was started with, updated by the flags that may change."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from anexa_core import config as configs
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.io import checkpoint

_FIXED_ON_RESUME = ({f.name for f in dataclasses.fields(ModelConfig)} - {"attention", "attention_options"}) | {
    "tokenizer",
    "tokenizer_options",
    "optimizer",
    "optimizer_options",
}
_TRAJECTORY = {  # what the steps already run were trained with: a resume continues them bit for bit
    "batch_size",
    "seq_len",
    "lr",
    "min_lr",
    "warmup_steps",
    "decay_steps",
    "grad_clip",
    "seed",
    "precision",
    "init_from",
    "lora",
    "data",  # the model card's data and command: other text is a new run from this one (--init-from)
    "data_glob",
    "data_options",
}


def resume_configs(
    run_dir: Path, overrides: dict[str, Any], plugin_options: dict[str, dict[str, Any]] | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was started with, updated by the flags given now (a larger ``steps`` or
    ``minutes``, another attention computing the same). Flags that would change what the checkpoint means —
    the tokenizer and its vocabulary, the model's shape, blocks, the optimizer — are refused, and so are
    those the steps already run were trained with (learning rate, batch, data, an attention that computes
    something other than exact softmax attention, …): each raises :class:`AnexaError` naming it."""
    # Why complex: refusing a changed fixed flag needs each flag's value in the run, plain or a plugin's option
    # (the two helpers), and a message naming it as the user typed it; the rest is straight-line.
    meta = checkpoint.read_train_state_metadata(Path(run_dir))
    settings = {**meta["model"]["model_config"], **_migrated(meta["train_config"])}
    given = {key: value for key, value in overrides.items() if value is not None}
    for kind, options in (plugin_options or {}).items():
        given[f"{kind}_options"] = options

    def current(key: str) -> Any:
        kind = configs.SHORTHANDS.get(key)
        return settings.get(f"{kind}_options", {}).get(key) if kind else settings.get(key)

    def fixed(key: str) -> bool:
        return configs.SHORTHANDS.get(key, key) in _FIXED_ON_RESUME or key in _FIXED_ON_RESUME

    changed = sorted(key for key in given if fixed(key) and str(given[key]) != str(current(key)))
    if changed:
        raise AnexaError(
            f"cannot change {_flags(changed)} when resuming {run_dir}: it would change what the checkpoint "
            "means; start a new run instead (without --resume)"
        )

    def trained_with(key: str) -> Any:  # windows of the whole context when no --seq-len was given
        value = current(key)
        return settings.get("block_size") if key == "seq_len" and value is None else value

    steered = sorted(key for key in given if key in _TRAJECTORY and not _same(key, given[key], trained_with(key)))
    if steered:
        values = {key: trained_with(key) for key in steered}
        raise AnexaError(
            f"cannot change {_flags(steered)} when resuming {run_dir} (it has {_flags(steered, values)}): a "
            "resume continues the run bit for bit, and its model card's command must stay true; to train on "
            f"with other settings, start a new run from it: --init-from {run_dir}"
        )
    settings.pop("threads", None)  # this session's choice (--threads, $ANEXA_THREADS, …), as for any command
    was = configs.split(settings)[0]
    configs.apply_layers(settings, [(given, "flags")])
    model_config, train_config = configs.split(settings)
    _check_attention(run_dir, was, model_config)
    return dataclasses.replace(model_config, vocab_size=meta["model"]["model_config"]["vocab_size"]), train_config


def _same(key: str, given: Any, trained: Any) -> bool:
    """Whether ``given`` is the value the run was trained with; ``data`` and ``init_from`` also when they name
    the same files another way (``./notes.txt`` for ``notes.txt``, a link)."""
    if key in ("data", "init_from") and given is not None and trained is not None:
        paths = [
            [Path(str(item)).expanduser() for item in (v if isinstance(v, list) else [v])] for v in (given, trained)
        ]
        return len(paths[0]) == len(paths[1]) and all(
            str(a) == str(b) or (a.exists() and b.exists() and a.samefile(b)) for a, b in zip(*paths, strict=True)
        )
    return str(given) == str(trained)


def _check_attention(run_dir: Path, was: ModelConfig, now: ModelConfig) -> None:
    """Another attention on resume is fine when both compute exact softmax attention (sdpa for math, the
    Triton kernel on a GPU: :func:`~anexa_core.io.export.attention_deviation`); one that computes something
    else (a sliding window shorter than the context) would change the model the steps so far trained.
    Raises :class:`AnexaError` for that, and for a new attention that is not installed."""
    from anexa_core.io.export import EXACT_ATTENTION, attention_deviation

    if (was.attention, was.attention_options) == (now.attention, now.attention_options):
        return
    deviation, used = attention_deviation(now)
    try:
        was_deviation, was_used = attention_deviation(was)
    except AnexaError:  # the recorded plugin is gone: what it computed can no longer be told
        was_deviation, was_used = 0.0, None
    if (was.attention, was_used) == (now.attention, used):  # the same options, spelt another way ("8" for 8)
        return
    was_exact = was_deviation <= EXACT_ATTENTION
    if not (was_exact and deviation <= EXACT_ATTENTION):
        shown = ", ".join(f"{key}={value}" for key, value in was.attention_options.items())
        raise AnexaError(
            f"cannot change --attention or -o attention.… when resuming {run_dir} (it has --attention "
            f"{was.attention}{f' with {shown}' if shown else ''}): "
            f"{'it' if not was_exact else 'the new one'} computes something other than exact softmax attention, "
            f"so the model the steps so far trained would change; start a new run from it: --init-from {run_dir}"
        )


def _flags(keys: list[str], values: dict[str, Any] | None = None) -> str:
    """``keys`` as the user typed them (``--lr``, ``-o blocks.…``); with ``values``, each with its value."""
    shown = []
    for key in keys:
        flag = configs.flag_of(key)
        value = None if values is None else values.get(key)
        shown.append(flag if values is None else f"{flag} {'unset' if value is None else value}")
    return ", ".join(shown)


def _migrated(train_config: dict[str, Any]) -> dict[str, Any]:
    """A stored training config in today's terms. Runs of Anexa 0.2 with ``--minutes`` stored ``steps``
    (and ``decay_steps``) as 2**53 for "no limit", and their decay followed the budget of each session:
    now ``steps`` is ``None`` and the decay follows the clock up to the minutes the run was started with."""
    config = dict(train_config)
    if config.get("minutes") is not None and "decay_minutes" not in config:
        if config.get("steps") == configs.MAX_INT:
            config["steps"] = None
        config["decay_steps"] = None
        config["decay_minutes"] = config["minutes"]
    return config
