"""Model and training configuration: a preset, overridden by a TOML file, then by command-line flags.

Every plugin choice is a name plus options (see :mod:`anexa_core.options`): ``blocks`` /
``blocks_options`` and ``attention`` / ``attention_options`` in :class:`ModelConfig`, ``tokenizer`` /
``tokenizer_options`` and ``optimizer`` / ``optimizer_options`` in :class:`TrainConfig`. In a TOML file
a plugin is a table holding its name and options::

    [model]
    n_layer = 6
    [attention]
    name = "sliding"
    window = 64

A layer that changes a plugin's name drops the options the preset (or, on resume, the run) gave the
old one. Options a user gives — in the file, with or without a ``name``, or as ``-o`` flags — are never
dropped: they go to whichever plugin the last layer names, which must accept them, or the run is refused
in one line naming the option (``blocks gpt2 has no option 'rope_theta'``). So ``--blocks llama`` with a
file whose ``[blocks]`` table holds ``rope_theta = 5000.0`` trains llama with that base. A few flat keys
are shorthands for the options of the chosen plugin (:data:`SHORTHANDS`): ``vocab_size`` sets the
tokenizer's, ``weight_decay``/``beta1``/``beta2`` the optimizer's, ``bias`` the blocks'.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError, choose_one_of, one_line
from anexa_core.kinds import SETTINGS

PRECISIONS = ("auto", "fp32", "bf16")

MAX_LR = 10.0
"""The largest learning rate a run accepts: far above what any optimizer trains with (AdamW ~1e-3, Muon ~0.02),
so a larger one is a slip of the exponent (``1e30``), and the run would only diverge."""
MAX_INT = 2**53
"""Largest integer setting: beyond it JSON metadata (and floats) stop being exact. Messages call it
:data:`MAX_INT_TEXT`; it is a limit, never a stand-in for "no limit" (``steps=None`` is that)."""
MAX_INT_TEXT = "2**53 (JSON stores larger integers inexactly)"


SHORTHANDS = {
    "vocab_size": "tokenizer",
    "weight_decay": "optimizer",
    "beta1": "optimizer",
    "beta2": "optimizer",
    "bias": "blocks",
}


def flag_of(key: str) -> str:
    """A setting as the user types it on the command line: ``--lr``, ``--glob`` (``data_glob``), ``-o blocks.…``
    for a plugin's options."""
    if key.endswith("_options"):
        return f"-o {key.removesuffix('_options')}.…"
    return "--glob" if key == "data_glob" else f"--{key.replace('_', '-')}"


def _check_fields(config: Any) -> None:
    """Types and integer ranges of a config's fields, whatever wrote them (TOML, flags, a checkpoint)."""
    # Why complex: one branch per field type (int, float, bool, str, table of options), each with the tests
    # that value fails and its own message; the conditions are the many ways a TOML or flag value can be wrong.
    hints = typing.get_type_hints(type(config))
    for item in dataclasses.fields(config):
        value, kind = getattr(config, item.name), hints[item.name]
        optional = type(None) in typing.get_args(kind)
        base = next((a for a in typing.get_args(kind) if a is not type(None)), kind) if optional else kind
        if value is None and optional:
            continue
        flag = f"{item.name} (--{item.name.replace('_', '-')})"
        if base is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise AnexaError(f"{flag} must be an integer, got {value!r}")
            if abs(value) > MAX_INT:
                raise AnexaError(
                    f"{flag} is {value}, beyond the largest supported value {MAX_INT_TEXT}: use a smaller one"
                )
        elif base is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise AnexaError(f"{flag} must be a finite number, got {value!r}")
            setattr(config, item.name, float(value))
        elif base is bool and not isinstance(value, bool):
            raise AnexaError(f"{flag} must be true or false, got {value!r}")
        elif base is str and not isinstance(value, str):
            raise AnexaError(f"{flag} must be a string, got {value!r}")
        elif typing.get_origin(base) is dict and not isinstance(value, dict):
            raise AnexaError(f"{item.name} must be a table of options, got {value!r}")


@dataclass
class ModelConfig:
    """The architecture; saved inside every checkpoint."""

    vocab_size: int = 0  # filled in from the tokenizer
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    block_size: int = 128
    dropout: float = 0.0
    tie_embeddings: bool = True
    blocks: str = "gpt2"
    blocks_options: dict[str, Any] = field(default_factory=dict)
    attention: str = "sdpa"
    attention_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_fields(self)
        for name in ("n_layer", "n_head", "n_embd", "block_size"):
            if getattr(self, name) < 1:
                raise AnexaError(f"{name} must be at least 1")
        if self.n_embd % self.n_head:
            raise AnexaError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if not 0.0 <= self.dropout < 1.0:
            raise AnexaError("dropout must be in [0, 1)")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


@dataclass
class TrainConfig:
    """How to train; saved in the training state so a resumed run continues identically."""

    data: str | list[str] = "sherlock"  # one --data value, or several (each a dataset, file, folder or URL)
    data_glob: list[str] = field(default_factory=lambda: ["*.txt", "*.md"])  # files a --data folder contributes
    data_options: dict[str, Any] = field(default_factory=dict)  # options of the dataset plugins --data names
    tokenizer: str = "char"
    tokenizer_options: dict[str, Any] = field(default_factory=dict)
    optimizer: str = "adamw"
    optimizer_options: dict[str, Any] = field(default_factory=dict)
    steps: int | None = 5000  # None: no step limit (only with ``minutes``: the clock ends the run)
    decay_steps: int | None = None  # the LR schedule's horizon in steps; None: ``steps``
    decay_minutes: float | None = None  # the horizon in minutes: the LR follows the clock (see schedule_by_time)
    batch_size: int = 32
    lr: float = 1e-3
    min_lr: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    eval_every: int = 250
    log_every: int = 10  # a line of steps.jsonl (training loss, LR, tokens/s) every this many steps
    eval_batches: int = 20
    save_every: int = 1000
    seed: int = 1337
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA and on CPUs with bf16 instructions, else fp32
    compile: bool = False  # torch.compile the model (pays off only for long runs; see benchmarks/RESULTS.md)
    minutes: float | None = None  # train to a wall-clock budget (earlier sessions of a resumed run count)
    threads: int | None = None  # CPU threads for torch; None or 0: chosen (anexa_core.device.configure_threads)
    init_from: str | None = None  # fine-tune this model (a run, a GGUF file, a Hugging Face folder or hub id)
    lora: str | None = None  # train LoRA adapters only: "r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj"
    seq_len: int | None = None  # tokens per training window; None: the model's block_size

    def __post_init__(self) -> None:
        _check_fields(self)
        self._check_data()
        self._check_length()
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise AnexaError("learning rates must satisfy 0 <= min_lr <= lr and lr > 0")
        if self.lr > MAX_LR:
            raise AnexaError(
                f"--lr {self.lr:g} would make any model diverge: give at most {MAX_LR:g} (1e-3 is typical)"
            )
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise AnexaError("--warmup-steps and --grad-clip must not be negative")
        if not 0 <= self.seed <= MAX_INT:
            raise AnexaError(f"--seed must be between 0 and {MAX_INT_TEXT}, got {self.seed}")
        if self.precision not in PRECISIONS:
            raise AnexaError(f"unknown precision {self.precision!r}: {choose_one_of(self.precision, PRECISIONS)}")
        if self.seq_len is not None and self.seq_len < 1:
            raise AnexaError("--seq-len must be at least 1")
        if self.lora is not None and self.init_from is None:
            raise AnexaError("--lora trains adapters on a pretrained model: pass --init-from MODEL too")
        if self.threads is not None and self.threads < 0:
            raise AnexaError(f"--threads must be 0 (choose) or a number of threads, got {self.threads}")

    def _check_data(self) -> None:
        """``data`` and ``data_glob`` as non-empty lists of strings (a single string stays one)."""
        if isinstance(self.data, tuple):
            self.data = list(self.data)
        if not (isinstance(self.data, str) and self.data) and not (
            isinstance(self.data, list) and self.data and all(isinstance(v, str) and v for v in self.data)
        ):
            raise AnexaError(f"data (--data) must be a non-empty string or list of strings, got {self.data!r}")
        if isinstance(self.data_glob, str):
            self.data_glob = [self.data_glob]
        if not (
            isinstance(self.data_glob, (list, tuple))
            and self.data_glob
            and all(isinstance(v, str) and v for v in self.data_glob)
        ):
            raise AnexaError(f"data_glob (--glob) must be a non-empty list of patterns, got {self.data_glob!r}")
        self.data_glob = list(self.data_glob)

    def _check_length(self) -> None:
        """Counts at least 1, a length (``steps`` or ``minutes``) and one end of the LR decay."""
        # Why complex: independent checks, each of one or two fields with its own message naming the flag to fix;
        # split up, the rules a run's length must meet would no longer read in one place.
        for name in ("batch_size", "eval_every", "log_every", "eval_batches", "save_every"):
            if getattr(self, name) < 1:
                raise AnexaError(f"--{name.replace('_', '-')} must be at least 1")
        if self.steps is None and self.minutes is None:
            raise AnexaError("a run needs a length: pass --steps N or --minutes M")
        if self.steps is not None and self.steps < 1:
            raise AnexaError("--steps must be at least 1")
        if self.decay_steps is not None and self.decay_steps < 1:
            raise AnexaError("--decay-steps must be at least 1")
        if self.decay_steps is not None and self.decay_minutes is not None:
            raise AnexaError("decay_steps and decay_minutes both set where the LR decay ends: give one")
        for name in ("minutes", "decay_minutes"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value * 60)):
                flag = "--minutes" if name == "minutes" else name
                raise AnexaError(f"{flag} must be a positive number of minutes that fits in seconds, got {value:g}")

    @property
    def schedule_steps(self) -> int | None:
        """The step at which the LR reaches ``min_lr``: ``decay_steps``, else ``steps`` (``None`` for a run
        without a step limit, whose schedule follows the clock)."""
        return self.decay_steps if self.decay_steps is not None else self.steps

    @property
    def schedule_by_time(self) -> bool:
        """Whether the LR decay follows the clock (``decay_minutes``) rather than the step count."""
        return self.decay_minutes is not None

    def with_schedule(self) -> TrainConfig:
        """This config with the LR schedule's horizon fixed, as a new run fixes it once: ``decay_minutes =
        minutes`` when there is a time budget and no ``decay_steps`` was given (the decay follows the clock),
        else ``decay_steps = schedule_steps``. A resumed run keeps the horizon its first session fixed, so
        a larger ``steps`` or ``minutes`` continues at ``min_lr`` instead of restarting the decay."""
        if self.decay_minutes is not None or self.decay_steps is not None:
            return self
        if self.minutes is not None:
            return dataclasses.replace(self, decay_minutes=self.minutes)
        return dataclasses.replace(self, decay_steps=self.schedule_steps)


FIXED_BY_BASE = ("n_layer", "n_head", "n_embd", "block_size", "tie_embeddings", "blocks", "blocks_options",
                 "tokenizer", "tokenizer_options")  # fmt: skip
"""The settings a fine-tuning run (``init_from``) takes from its base model: ``anexa train --init-from``
refuses others, and a fine-tuned model's card leaves them out of its command."""


@dataclass
class Preset:
    model: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)


PRESETS = {
    # The seed's model: about 0.8M parameters with a character vocabulary.
    "seed": Preset(model=dict(n_layer=4, n_head=4, n_embd=128, block_size=128), train=dict(batch_size=32)),
    # The seed's size with what the modded-nanogpt speedrun learned, each choice measured here on Sherlock
    # (benchmarks/RESULTS.md): LLaMA-style blocks (rotary, RMSNorm, SwiGLU), QK-norm, zero-initialised
    # output projections, an untied head, Muon for the matrices, a higher peak LR.
    "fast": Preset(
        model=dict(
            n_layer=4,
            n_head=4,
            n_embd=128,
            block_size=128,
            blocks="llama",
            tie_embeddings=False,
            blocks_options=dict(mlp="swiglu", qk_norm=True, zero_init=True),
        ),
        train=dict(batch_size=32, optimizer="muon", lr=5e-3, min_lr=5e-4, warmup_steps=50),
    ),
    # nanoGPT's shakespeare_char size: about 10.7M parameters.
    "small": Preset(
        model=dict(n_layer=6, n_head=6, n_embd=384, block_size=256, dropout=0.2),
        train=dict(batch_size=64, lr=1e-3, min_lr=1e-4, warmup_steps=100),
    ),
}


BENCH_RUN_NEW_TOKENS = 256
"""The most tokens ``anexa bench generate --model`` decodes by default: twice a pretrained model's context
(SmolLM2's 8,192 tokens) would take hours on a CPU, recomputing the window for each token far longer."""


FINETUNE: dict[str, Any] = dict(
    lr=1e-4, min_lr=1e-5, warmup_steps=10, batch_size=8, seq_len=256, steps=300, eval_every=50, eval_batches=8,
    save_every=100,
)  # fmt: skip
"""Fine-tuning's defaults (``--init-from``, every weight trains): the model's own settings, short windows."""
LORA: dict[str, Any] = {**FINETUNE, "lr": 1e-3, "min_lr": 1e-4}
"""LoRA's defaults (``--init-from … --lora``): the adapters start at zero and take a larger learning rate."""


def preset_values(key: str) -> dict[str, Any]:
    """What each preset runs with for the setting ``key`` (a :class:`ModelConfig` or :class:`TrainConfig`
    field): the preset's own value, else the config's default; and what a fine-tune (``--init-from``) and
    a LoRA fine-tune run with where they set it. ``--help`` shows these."""
    defaults = {**dataclasses.asdict(ModelConfig()), **dataclasses.asdict(TrainConfig())}
    values = {name: {**defaults, **preset.model, **preset.train}.get(key) for name, preset in PRESETS.items()}
    for label, finetune in (("--init-from", FINETUNE), ("--lora", LORA)):
        if key in finetune:
            values[label] = finetune[key]
    return values


_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)} - {"vocab_size"}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_OPTION_FIELDS = {f"{kind}_options" for kind in SETTINGS}


def read_toml(path: Path) -> dict[str, Any]:
    """A config file's settings: flat keys and ``[model]``/``[train]`` tables merged into one dict; a
    plugin table (``[attention]``) becomes ``attention`` (its ``name``, if any) and ``attention_options``."""
    try:
        data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnexaError(f"config file {path} not found: pass an existing --config FILE.toml") from None
    except IsADirectoryError:
        raise AnexaError(f"config {path} is a folder: pass a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        detail = one_line(exc)
        if detail.startswith("Cannot overwrite a value"):  # tomllib's words for a key given twice in one table
            place = detail.removeprefix("Cannot overwrite a value").strip(" ()")
            raise AnexaError(f"config file {path} sets a key twice ({place}): keep one of them") from None
        raise AnexaError(f"config file {path} is not valid TOML ({detail}): fix the file") from None
    flat: dict[str, Any] = {}
    where: dict[str, str] = {}

    def put(key: str, value: Any, place: str) -> None:  # a setting given twice is refused, never dropped
        if key in flat:
            raise AnexaError(f"config file {path} sets {key} twice ({where[key]} and {place}): keep one of them")
        flat[key], where[key] = value, place

    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            for inner, setting in value.items():
                put(inner, setting, f"in [{key}]")
        elif key in SETTINGS and isinstance(value, dict):
            table = dict(value)
            if "name" in table:
                put(key, table.pop("name"), f"as name in [{key}]")
            put(f"{key}_options", table, f"as the [{key}] table")
        else:
            put(key, value, "at the top")
    return flat


def init_from_in(path: Path) -> str | None:
    """The base a config file names (``init_from``), so that it fine-tunes as ``--init-from`` does; ``None``
    when it names none. Raises :class:`AnexaError` for an unreadable file or a base that is not text."""
    base = read_toml(path).get("init_from")
    if base is not None and not isinstance(base, str):
        raise AnexaError(f"init_from in {path} must be a model (a run, a GGUF file, a folder or a hub id) as text")
    return base


def resolve(
    preset: str = "seed",
    config_file: Path | None = None,
    overrides: dict[str, Any] | None = None,
    plugin_options: dict[str, dict[str, Any]] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Preset, then the TOML file, then flags (``overrides``; ``None`` values mean "not given") and
    ``plugin_options`` (``{"attention": {"window": "64"}}``, from ``-o attention.window=64``)."""
    if preset not in PRESETS:
        raise AnexaError(f"unknown preset {preset!r}: {choose_one_of(preset, PRESETS)}")
    settings: dict[str, Any] = {**PRESETS[preset].model, **PRESETS[preset].train}
    layers = []
    if config_file is not None:
        layers.append((read_toml(config_file), str(config_file)))
    flags = {key: value for key, value in (overrides or {}).items() if value is not None}
    for kind, given in (plugin_options or {}).items():
        if kind not in SETTINGS:
            raise AnexaError(f"-o {kind}.…: {kind!r} is not a plugin setting: {choose_one_of(kind, SETTINGS)}")
        flags[f"{kind}_options"] = dict(given)
    layers.append((flags, "flags"))
    apply_layers(settings, layers)
    clock_decides(settings, layers)
    return split(settings)


def clock_decides(settings: dict[str, Any], layers: list[tuple[dict[str, Any], str]]) -> None:
    """A time budget (``minutes``) with no step count in any of the user's ``layers`` ends the run by the
    clock alone: ``settings["steps"]`` becomes ``None`` in place, whatever a preset or fine-tuning's defaults
    set it to (a run from scratch and a fine-tune alike)."""
    if settings.get("minutes") is not None and not any("steps" in values for values, _ in layers):
        settings["steps"] = None


def apply_layers(settings: dict[str, Any], layers: list[tuple[dict[str, Any], str]]) -> None:
    """Apply the user's layers (``(values, source)``: a TOML file, the flags) in order onto ``settings``
    (a preset's, or a stored run's) in place. A plugin name a layer changes drops the options ``settings``
    had for the old plugin; plugin options the layers give are gathered and go, last layer winning, to
    the plugin finally named (see the module docstring)."""
    given: dict[str, dict[str, Any]] = {kind: {} for kind in SETTINGS}
    for values, source in layers:
        merge(settings, values, source, given)
    for kind, options in given.items():
        if options:
            settings[f"{kind}_options"] = {**settings.get(f"{kind}_options", {}), **options}


def merge(
    settings: dict[str, Any], values: dict[str, Any], source: str, given: dict[str, dict[str, Any]] | None = None
) -> None:
    """Apply one layer of ``values`` onto ``settings`` in place (see the module docstring for the rules).

    ``given`` collects the layer's plugin options per kind instead of writing them into ``settings``, so a
    later layer naming another plugin does not drop them (:func:`apply_layers`); without it they are
    written at once."""
    # Why complex: one pass per rule of the module docstring (unknown keys, a changed plugin drops its options,
    # shorthands go to their plugin), all filling the same `given`; the branches are those rules in order.
    at_once = given is None
    given = {kind: {} for kind in SETTINGS} if given is None else given
    known = _MODEL_FIELDS | _TRAIN_FIELDS
    for key in values:
        if key not in known and key not in SHORTHANDS:
            raise AnexaError(
                f"unknown setting {key!r} in {source}: {choose_one_of(key, sorted(known | set(SHORTHANDS)))}"
            )
    for kind in SETTINGS:
        options_key = f"{kind}_options"
        if kind in values and values[kind] != settings.get(kind):
            settings[options_key] = {}
        if options_key in values:
            if not isinstance(values[options_key], dict):
                raise AnexaError(f"{options_key} in {source} must be a table of options")
            given[kind].update(values[options_key])
    for key, value in values.items():
        if key in SHORTHANDS:
            if key in (values.get(f"{SHORTHANDS[key]}_options") or {}):  # one of the two would be dropped
                twice = (
                    f"{flag_of(key)} and -o {SHORTHANDS[key]}.{key} both set {key}"
                    if source == "flags"
                    else f"config file {source} sets {key} twice (as {key} and in [{SHORTHANDS[key]}])"
                )
                raise AnexaError(f"{twice}: keep one of them")
            given[SHORTHANDS[key]][key] = value
        elif key not in _OPTION_FIELDS:
            settings[key] = value
    if at_once:
        for kind, options in given.items():
            if options:
                settings[f"{kind}_options"] = {**settings.get(f"{kind}_options", {}), **options}


def split(settings: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """Flat settings → the two configs (validated)."""
    model = {k: v for k, v in settings.items() if k in _MODEL_FIELDS}
    train = {k: v for k, v in settings.items() if k in _TRAIN_FIELDS}
    try:
        return ModelConfig(**model), TrainConfig(**train)
    except TypeError as exc:
        raise AnexaError(f"bad setting: {exc}") from None
