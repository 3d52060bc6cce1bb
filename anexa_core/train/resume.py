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
}


def resume_configs(
    run_dir: Path, overrides: dict[str, Any], plugin_options: dict[str, dict[str, Any]] | None = None
) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was started with, updated by the flags given now (a larger ``steps``, another
    ``data``, another attention). Flags that would change what the checkpoint means — the tokenizer and
    its vocabulary, the model's shape, blocks, the optimizer — are refused."""
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

    steered = sorted(key for key in given if key in _TRAJECTORY and str(given[key]) != str(trained_with(key)))
    if steered:
        values = {key: trained_with(key) for key in steered}
        raise AnexaError(
            f"cannot change {_flags(steered)} when resuming {run_dir} (it has {_flags(steered, values)}): a "
            "resume continues the run bit for bit, and its model card's command must stay true; to train on "
            f"with other settings, start a new run from it: --init-from {run_dir}"
        )
    settings.pop("threads", None)  # this session's choice (--threads, $ANEXA_THREADS, …), as for any command
    if "data" in given:
        settings.pop("data_glob", None)  # the earlier --glob picked files of the earlier --data (a new one is given)
    configs.apply_layers(settings, [(given, "flags")])
    model_config, train_config = configs.split(settings)
    return dataclasses.replace(model_config, vocab_size=meta["model"]["model_config"]["vocab_size"]), train_config


def _flags(keys: list[str], values: dict[str, Any] | None = None) -> str:
    """``keys`` as the user typed them (``--lr``, ``-o blocks.…``); with ``values``, each with its value."""
    shown = []
    for key in keys:
        flag = f"-o {key.removesuffix('_options')}.…" if key.endswith("_options") else f"--{key.replace('_', '-')}"
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
