"""The six kinds of plugin, in one table every other module reads.

Each kind has the name its registry goes by (``tokenizers``), the hook that fills it
(``register_tokenizers``, :mod:`anexa_core.hookspecs`), how messages name one of them (``tokenizer``), and,
for kinds a run chooses, the setting that chooses it (``--tokenizer``, ``-o tokenizer.OPTION=…``, a
``[tokenizer]`` TOML table) and the config that stores the choice with ``<setting>_options``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One kind of plugin. ``setting`` and ``config`` are ``None`` for samplers, which a request chooses
    (``-s NAME``) rather than a run."""

    name: str
    hook: str
    singular: str
    setting: str | None = None
    config: str | None = None  # "model" (ModelConfig) or "train" (TrainConfig)


KINDS: dict[str, Kind] = {
    kind.name: kind
    for kind in (
        Kind("tokenizers", "register_tokenizers", "tokenizer", setting="tokenizer", config="train"),
        Kind("attention", "register_attention", "attention", setting="attention", config="model"),
        Kind("samplers", "register_samplers", "sampler"),
        Kind("blocks", "register_blocks", "blocks", setting="blocks", config="model"),
        Kind("datasets", "register_datasets", "dataset", setting="data", config="train"),
        Kind("optimizers", "register_optimizers", "optimizer", setting="optimizer", config="train"),
    )
}

SETTINGS: dict[str, Kind] = {kind.setting: kind for kind in KINDS.values() if kind.setting}
"""The kinds a run chooses, by setting name: ``blocks``, ``attention``, ``tokenizer``, ``optimizer``, ``data``."""
