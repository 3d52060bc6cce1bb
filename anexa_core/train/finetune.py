"""Fine-tuning: a pretrained model or an Anexa run as the start of a new run, fully or through LoRA.

``anexa train --init-from MODEL`` keeps the model's architecture, weights and tokenizer (never a new
vocabulary trained on the data) and trains with defaults suited to fine-tuning (:data:`anexa_core.config.FINETUNE`,
or :data:`~anexa_core.config.LORA` with ``--lora``): a short warmup, a learning rate a tenth to a hundredth of training from
scratch, short windows (``seq_len``) whatever the model's context. What would change the model —
another tokenizer, width, depth, heads, context, blocks or their options — is refused in one line;
dropout, the attention plugin and every training setting may be set.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from anexa_core import config as configs
from anexa_core.config import FINETUNE, LORA, ModelConfig, TrainConfig
from anexa_core.data.chats import is_chats_file, read_conversations
from anexa_core.data.corpus import check_sources
from anexa_core.errors import AnexaError
from anexa_core.io.load import Base, load_base
from anexa_core.model.lora import LoraSpec


def finetune_configs(
    init_from: str,
    overrides: dict[str, Any],
    plugin_options: dict[str, dict[str, Any]] | None = None,
    config_file: Path | None = None,
) -> tuple[ModelConfig, TrainConfig, Base]:
    """The configs of a fine-tuning run of ``init_from`` and its loaded base: the base's model settings and
    tokenizer, the fine-tuning defaults, then the TOML file and the flags (``None`` values: not given).

    Raises :class:`AnexaError` for a setting that contradicts the base (naming it) and for a base that
    cannot be loaded."""
    given = {key: value for key, value in overrides.items() if value is not None}
    layers: list[tuple[dict[str, Any], str]] = []
    if config_file is not None:
        layers.append((configs.read_toml(config_file), str(config_file)))
    flags = dict(given)
    for kind, options in (plugin_options or {}).items():
        flags[f"{kind}_options"] = dict(options)
    layers.append((flags, "flags"))
    _check_before_loading(layers)
    base = load_base(init_from)
    model_settings = dict(base.meta["model_config"])
    for values, source in layers:
        _refuse_changes(values, model_settings, base, source)
    uses_lora = any(values.get("lora") for values, _ in layers)  # from the flags or the file alike
    settings: dict[str, Any] = {**model_settings, **(LORA if uses_lora else FINETUNE)}
    settings.update(tokenizer=base.tokenizer_name, tokenizer_options=base.tokenizer_options)
    for values, source in layers:
        configs.merge(settings, values, source)
    settings["init_from"] = init_from  # the base loaded (--init-from wins over the file's, as every flag does)
    configs.clock_decides(settings, layers)
    model_config, train_config = configs.split(settings)
    model_config = dataclasses.replace(model_config, vocab_size=model_settings["vocab_size"])
    if train_config.seq_len is not None and not any("seq_len" in values for values, _ in layers):
        # The default's windows, at most the context; a window the user asked for is used or refused.
        train_config = dataclasses.replace(train_config, seq_len=min(train_config.seq_len, model_config.block_size))
    return model_config, train_config, base


def _check_before_loading(layers: list[tuple[dict[str, Any], str]]) -> None:
    """Refuse a typo in ``--lora``, a ``--data`` source that does not exist or a malformed line of a
    conversations file (from the flags or the TOML file) before the base model loads, which takes seconds
    for a pretrained one."""
    for values, _ in layers:
        if isinstance(values.get("lora"), str):
            LoraSpec.parse(values["lora"])
    data = next((values["data"] for values, _ in reversed(layers) if values.get("data")), None)
    if data is not None:
        check_sources(data)
        if is_chats_file(data):
            read_conversations(Path(data).expanduser())


def _refuse_changes(values: dict[str, Any], model: dict[str, Any], base: Base, source: str) -> None:
    current = {**model, "tokenizer": base.tokenizer_name, "tokenizer_options": base.tokenizer_options}
    for key in configs.FIXED_BY_BASE:
        if key not in values or values[key] == current.get(key):
            continue
        if key.endswith("_options") and _same_options(values[key], current.get(key) or {}):
            continue
        raise AnexaError(
            f"{configs.flag_of(key)} in {source} contradicts the model of --init-from {base.reference['init_from']} "
            f"({current.get(key)!r}): fine-tuning keeps its architecture and tokenizer; drop it"
        )
    for shorthand, kind in configs.SHORTHANDS.items():
        if shorthand in values and kind in ("tokenizer", "blocks"):
            raise AnexaError(
                f"--{shorthand.replace('_', '-')} in {source}: fine-tuning keeps the model's {kind}; drop it"
            )


def _same_options(given: dict[str, Any], recorded: dict[str, Any]) -> bool:
    """Whether options given anew agree with the base's, value for value (as text, like the command line)."""
    return all(str(value) == str(recorded.get(name)) for name, value in given.items())
