"""The training loop: random windows of the corpus, an optimizer plugin, warmup + cosine LR, periodic eval,
checkpoints that survive interruption.

Deterministic under a seed: batches come from a dedicated generator, eval from fixed ones, and the
generators' states travel in ``train_state.safetensors`` so ``--resume`` continues bit for bit.
What a run folder holds is described in :mod:`anexa_core.checkpoint`; the guarantees (nothing a user
trained is overwritten or lost to Ctrl-C, SIGTERM or SIGKILL) in ``docs/reliability.md``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from anexa_core import checkpoint, config as configs, data, distributed, plugins, tokens
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.model import GPT, build_model

METRICS_FILE = checkpoint.METRICS_FILE
logger = logging.getLogger("anexa")


class Reporter(Protocol):
    """Where the loop reports progress; the CLI supplies a progress bar or plain log lines.

    A reporter may also have ``data_progress(phase, done, total)``, told how preparing the data advances
    (fingerprinting, training the tokenizer, tokenizing: bytes; see :func:`prepare_data`).
    """

    def start(self, total_steps: int, first_step: int, info: dict[str, Any]) -> None: ...

    def step(self, step: int, loss: float, tokens_per_s: float) -> None: ...

    def evaluated(self, metrics: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class SilentReporter:
    def start(self, total_steps, first_step, info):
        pass

    def step(self, step, loss, tokens_per_s):
        pass

    def evaluated(self, metrics):
        pass

    def finish(self):
        pass


class TrainingInterrupted(Exception):
    """Training stopped early at the user's request (Ctrl-C, SIGTERM); ``saved`` says whether a checkpoint
    of ``step`` was written to ``out_dir`` (nothing is saved before the first step)."""

    def __init__(self, step: int, out_dir: Path, saved: bool):
        super().__init__(f"interrupted at step {step}")
        self.step, self.out_dir, self.saved = step, out_dir, saved


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    val_loss: float
    train_loss: float
    best_step: int | None
    best_val_loss: float
    parameters: int
    seconds: float


def pick_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; anything else must be usable here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise AnexaError(f"unknown device {name!r}: use auto, cpu or cuda") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise AnexaError("--device cuda but no CUDA GPU is visible: use --device cpu")
    return device


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX); elsewhere autocast would emulate it."""
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def uses_bf16(device: torch.device, precision: str = "auto") -> bool:
    """``precision`` (auto, fp32, bf16) on ``device`` → whether the step runs under bf16 autocast.

    ``auto`` picks bf16 on CUDA GPUs that support it and on CPUs with bf16 instructions (measured on this
    project's 2-core AVX512-BF16 CPU: 1.3× faster steps with the same loss curve, benchmarks/RESULTS.md).
    Weights, optimizer state, the loss and the norms stay float32 (PyTorch's autocast policy).
    """
    if precision == "fp32":
        return False
    if precision == "bf16":
        return True
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and cpu_has_bf16()


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of ``precision`` on ``device`` (see :func:`uses_bf16`)."""
    if uses_bf16(device, precision):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, config: TrainConfig, time_fraction: float | None = None) -> float:
    """The learning rate of (0-based) ``step``: linear warmup over ``warmup_steps`` to ``lr``, then cosine
    decay reaching ``min_lr`` at ``schedule_steps`` (SGDR, Loshchilov & Hutter 2017), ``min_lr`` after.

    With a time budget (``--minutes``) the decay follows ``time_fraction``, the share of the budget used
    so far, instead of the step count, so a short run still ends at ``min_lr``.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if time_fraction is not None:
        progress = min(1.0, max(0.0, time_fraction))
    else:
        span = max(1, config.schedule_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


class Optimizers:
    """Several optimizers stepped as one — Muon for the matrices, AdamW for the rest — offering what the
    loop, the LR schedule and checkpoints use of an optimizer."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = list(optimizers)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [group for optimizer in self.optimizers for group in optimizer.param_groups]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [optimizer.state_dict() for optimizer in self.optimizers]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        states = state.get("optimizers") if isinstance(state, dict) else None
        if not isinstance(states, list) or len(states) != len(self.optimizers):
            raise ValueError(f"expected the state of {len(self.optimizers)} optimizers")
        for optimizer, one in zip(self.optimizers, states):
            optimizer.load_state_dict(one)


def combine(built: torch.optim.Optimizer | list[torch.optim.Optimizer]) -> torch.optim.Optimizer | Optimizers:
    """What an optimizer plugin's ``build`` returned, as one optimizer."""
    if isinstance(built, (list, tuple)):
        return built[0] if len(built) == 1 else Optimizers(built)
    return built


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer | Optimizers:
    """The optimizer plugin ``config.optimizer`` built over ``model``; each group remembers its peak LR."""
    factory, _ = plugins.create("optimizers", config.optimizer, config.optimizer_options)
    optimizer = combine(factory.build(model, config))
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the peak; the schedule scales it
    return optimizer


def make_train_step(model: GPT, optimizer: torch.optim.Optimizer, config: TrainConfig, device: torch.device,
                    forward: torch.nn.Module | None = None) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimizer step on a batch ``(x, y)`` (B, T) int64 already on ``device``: forward under the
    configured precision (``forward``: ``model`` or its DDP wrapper; compiled with ``config.compile``),
    backward, gradient clipping, the optimizer's step. Returns the loss, a 0-d tensor (nats/token).

    The training loop and ``anexa bench train`` both run exactly this, so the benchmark times the product.
    """
    forward = forward if forward is not None else model
    if config.compile:
        forward = torch.compile(forward)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, config.precision):
            _, loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip, foreach=True)
        optimizer.step()
        return loss.detach()

    return step


def get_batch(
    ids: np.ndarray | torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``block_size`` tokens (B, T) int64 and the same windows shifted by one.

    ``ids``: 1-D token ids of any integer dtype — a :class:`numpy.memmap` of the token cache, any numpy
    array, or a CPU tensor. The window starts are drawn with ``torch.randint`` from ``generator`` (so a
    saved generator state replays them), and the windows are gathered with one numpy fancy index.
    """
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
    array = ids.numpy() if isinstance(ids, torch.Tensor) else ids
    windows = array[starts.numpy()[:, None] + np.arange(block_size + 1)].astype(np.int64)
    return torch.from_numpy(windows[:, :-1].copy()), torch.from_numpy(windows[:, 1:].copy())


@torch.no_grad()
def estimate_loss(
    model: GPT, ids: np.ndarray | torch.Tensor, config: TrainConfig, device: torch.device, seed: int
) -> float:
    """Mean loss (nats/token) over ``eval_batches`` batches drawn from a generator seeded with ``seed``,
    so the same windows are scored at every evaluation and losses are comparable across steps."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(config.eval_batches):
        x, y = get_batch(ids, model.config.block_size, config.batch_size, generator)
        with autocast(device, config.precision):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def prepare_data(train_config: TrainConfig, block_size: int, tokenizer=None, progress=None):
    """The corpus of ``train_config.data`` as token ids, split 90/10 into train and val.

    Without ``tokenizer`` the plugin ``train_config.tokenizer`` is trained on the corpus (or loaded from
    the cache when it was trained on the same files before); with one (``--resume``), the corpus is
    encoded with it, and text it cannot encode is refused before any training. Ids come from the token
    cache (:mod:`anexa_core.tokens`): the second run on the same data does not tokenize. The split is on
    the token stream: the first 90% of the ids train, the last 10% validate — the same on every run.
    ``progress(phase, done, total)`` is told how reading and tokenizing advance (bytes).

    Returns ``(short name, tokenizer, tokenizer options, train ids, val ids)``; the ids are 1-D read-only
    numpy arrays (``uint16``, or ``uint32`` for vocabularies over 65,536) mapping the cache file, so
    memory does not grow with the corpus. Raises :class:`AnexaError` for unusable data (one line) and
    for a corpus with too few tokens for ``block_size``.
    """
    corpus = data.resolve_corpus(train_config.data, train_config.data_glob, train_config.data_options)
    digests = tokens.file_digests(corpus.files, progress)
    if tokenizer is None:
        tokenizer, options = tokens.trained_tokenizer(
            corpus, digests, train_config.tokenizer, train_config.tokenizer_options, progress
        )
        stream = tokens.encoded(corpus, digests, tokenizer, train_config.tokenizer, options, progress)
    else:
        options = train_config.tokenizer_options
        try:
            stream = tokens.encoded(corpus, digests, tokenizer, train_config.tokenizer, options, progress)
        except tokens.TokenizeError as exc:
            raise AnexaError(f"--data {data.data_label(train_config.data)} does not fit this run's tokenizer: "
                             f"{exc}") from None
    ids = stream.ids
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    if len(val_ids) <= block_size + 1:
        need = (block_size + 2) * 10
        raise AnexaError(
            f"corpus {data.data_label(train_config.data)} has {len(ids)} tokens, too few for block_size "
            f"{block_size}: use a text of at least {need} tokens or a smaller --block-size"
        )
    return corpus.name, tokenizer, options, train_ids, val_ids


def _number(value: float) -> float | None:
    """A loss for JSON metadata: ``None`` before the first evaluation rather than a non-standard NaN."""
    return None if value != value else value


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line cut short by a killed process is dropped, not fatal."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint a run resumes from (a crashed run may have gone further)."""
    if path.is_file():
        kept = [record for record in _read_metrics(path) if record["step"] <= last_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def _clear_run(out_dir: Path) -> None:
    """``--overwrite``: remove what an earlier run wrote, and stray temp files of a killed save."""
    for name in (checkpoint.MODEL_FILE, checkpoint.BEST_FILE, checkpoint.STATE_FILE, METRICS_FILE):
        (out_dir / name).unlink(missing_ok=True)


def _remove_stale_temp_files(out_dir: Path) -> None:
    """A SIGKILL during a save leaves ``.model.safetensors.*.tmp`` behind; the real files are intact."""
    if out_dir.is_dir():
        for stale in out_dir.glob(".*.tmp"):
            stale.unlink(missing_ok=True)


def _plot_losses(out_dir: Path) -> None:
    """``loss.png`` beside the metrics, when matplotlib is installed (the ``plot`` extra)."""
    from anexa_core import plots

    try:
        plots.plot_runs([out_dir], out_dir / "loss.png")
    except AnexaError as exc:
        logger.info("no loss.png: %s", exc)


def _save_delay() -> float:
    """Test hook: seconds to sleep inside each save (``ANEXA_TEST_SAVE_DELAY``), to kill a run mid-save."""
    return float(os.environ.get("ANEXA_TEST_SAVE_DELAY", "0") or 0)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    reporter: Reporter | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_requested: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue training) and write checkpoints under ``out_dir``.

    ``out_dir`` holding a run is refused unless ``resume`` or ``overwrite``. ``stop_requested`` is polled
    after every step; when it returns true the step's checkpoint is written and
    :class:`TrainingInterrupted` is raised.
    """
    reporter = reporter or SilentReporter()
    out_dir = Path(out_dir)
    ranks, device = distributed.setup(pick_device(train_config.device))
    if not ranks.is_main:
        reporter = SilentReporter()
    if not resume and checkpoint.holds_a_run(out_dir) and not overwrite:
        raise AnexaError(
            f"{out_dir} already holds a trained run: continue it with `anexa train --resume {out_dir}`, "
            "replace it with --overwrite, or pass another --out"
        )
    # Fail on a misspelt plugin, a missing one or a bad option before spending time on data.
    state = checkpoint.load_train_state(out_dir) if resume else None
    recorded = state.meta["model"].get("plugins", {}) if state else {}
    plugins.create("tokenizers", train_config.tokenizer, train_config.tokenizer_options, recorded.get("tokenizer"))
    plugins.create("blocks", model_config.blocks, model_config.blocks_options, recorded.get("blocks"))
    stored_attention = recorded.get("attention") or {}
    plugins.create("attention", model_config.attention, model_config.attention_options,
                   stored_attention if stored_attention.get("name") == model_config.attention else None)
    _, optimizer_options = plugins.create("optimizers", train_config.optimizer, train_config.optimizer_options,
                                          state.meta.get("optimizer_plugin") if state else None)
    torch.manual_seed(train_config.seed)
    batch_generator = torch.Generator().manual_seed(train_config.seed + 1)
    first_step, best_step, best_val_loss, elapsed_before = 0, None, float("inf"), 0.0

    if resume:
        model, tokenizer = checkpoint.rebuild(state.meta["model"], out_dir / checkpoint.STATE_FILE,
                                              model_config.attention, model_config.attention_options)
        model.load_state_dict(state.weights)
        model.to(device)
        _, _, tokenizer_options, train_ids, val_ids = prepare_data(
            train_config, model.config.block_size, tokenizer, getattr(reporter, "data_progress", None))
    else:
        _, tokenizer, tokenizer_options, train_ids, val_ids = prepare_data(
            train_config, model_config.block_size, None, getattr(reporter, "data_progress", None))
        model = build_model(dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)).to(device)
        train_config = dataclasses.replace(train_config, decay_steps=train_config.schedule_steps)
    train_config = dataclasses.replace(train_config, tokenizer_options=tokenizer_options,
                                       optimizer_options=optimizer_options)
    model_config = model.config
    optimizer = make_optimizer(model, train_config)
    if state is not None:
        try:
            optimizer.load_state_dict(state.optimizer_state)
        except (ValueError, KeyError) as exc:
            raise AnexaError(f"the optimizer state in {out_dir} does not fit optimizer "
                             f"{train_config.optimizer!r} ({exc}): start a new run") from None
        first_step = state.step
        best_step = state.meta.get("best_step")
        if best_step is not None:
            best_val_loss = state.meta["best_val_loss"]
        elapsed_before = state.meta.get("elapsed_s", 0.0)
        torch.set_rng_state(state.rng["torch"])
        batch_generator.set_state(state.rng["batch"])
        if device.type == "cuda" and "cuda" in state.rng:
            torch.cuda.set_rng_state(state.rng["cuda"], device)
        if first_step >= train_config.steps:
            raise AnexaError(f"run {out_dir} already reached step {first_step}: pass a larger --steps to continue")
    parallel_model = distributed.wrap(model, ranks, device)
    tokenizer_name = train_config.tokenizer

    if ranks.is_main:
        _remove_stale_temp_files(out_dir)
        if resume:
            _truncate_metrics(out_dir / METRICS_FILE, first_step)
        elif out_dir.is_dir():
            _clear_run(out_dir)

    tokens_per_step = train_config.batch_size * model_config.block_size * ranks.world_size
    reporter.start(
        train_config.steps,
        first_step,
        {
            "parameters": model.num_parameters(),
            "device": str(device),
            "vocab_size": model_config.vocab_size,
            "train_tokens": len(train_ids),
            "val_tokens": len(val_ids),
            "resumed_from": first_step if resume else None,
            "out_dir": str(out_dir),
            "minutes": train_config.minutes,
            "elapsed_s": elapsed_before,
        },
    )

    started = time.perf_counter()

    def elapsed() -> float:
        return round(elapsed_before + time.perf_counter() - started, 2)

    def model_meta(step: int, **losses: Any) -> dict[str, Any]:
        return checkpoint.model_metadata(
            model, tokenizer, tokenizer_name, tokenizer_options, step=step, **losses,
            train_config=dataclasses.asdict(train_config), elapsed_s=elapsed(),
        )

    def save(step: int) -> None:
        delay = _save_delay()
        best = None if best_step is None else best_val_loss
        meta = model_meta(step, val_loss=_number(val_loss), train_loss=_number(train_loss), best_step=best_step,
                          best_val_loss=best)
        rng = {"torch": torch.get_rng_state(), "batch": batch_generator.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        # The training state first: it alone is what --resume reads, so the pair can never disagree.
        checkpoint.save_train_state(
            out_dir / checkpoint.STATE_FILE, model, optimizer, rng, meta, step=step,
            train_config=dataclasses.asdict(train_config), best_step=best_step, best_val_loss=best,
            elapsed_s=elapsed(),
            optimizer_plugin=plugins.provenance("optimizers", train_config.optimizer, train_config.optimizer_options),
        )
        if delay:
            time.sleep(delay)
        checkpoint.save_model(out_dir / checkpoint.MODEL_FILE, model, meta)

    def stopping() -> bool:
        wanted = bool(stop_requested and stop_requested())
        return distributed.any_rank(wanted, ranks, device)

    model.train()
    train_step = make_train_step(model, optimizer, train_config, device, parallel_model)
    window_start, window_tokens = time.perf_counter(), 0
    val_loss = train_loss = float("nan")
    step = done = first_step
    budget_s = train_config.minutes * 60 if train_config.minutes is not None else None
    eval_seconds = 0.0  # how long an evaluation takes, so a time budget ends with its final one on time

    def time_fraction() -> float | None:
        return None if budget_s is None else elapsed() / budget_s

    if budget_s is not None and resume and elapsed_before >= budget_s:
        raise AnexaError(f"run {out_dir} already used its {train_config.minutes:g}-minute budget: pass a larger "
                         "--minutes to continue")
    for step in range(first_step, train_config.steps):
        lr = lr_at(step, train_config, time_fraction())
        factor = lr / train_config.lr
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        x, y = get_batch(
            train_ids, model_config.block_size, train_config.batch_size * ranks.world_size, batch_generator
        )
        x, y = ranks.shard(x).to(device, non_blocking=True), ranks.shard(y).to(device, non_blocking=True)
        loss = train_step(x, y)

        done = step + 1
        window_tokens += tokens_per_step
        now = time.perf_counter()
        reporter.step(done, loss.item(), window_tokens / max(now - window_start, 1e-9))
        time_up = budget_s is not None and distributed.any_rank(elapsed() + eval_seconds >= budget_s, ranks, device)
        last = done == train_config.steps or time_up
        if done % train_config.eval_every == 0 or last:
            eval_started = time.perf_counter()
            train_loss = estimate_loss(model, train_ids, train_config, device, train_config.seed + 2)
            val_loss = estimate_loss(model, val_ids, train_config, device, train_config.seed + 3)
            eval_seconds = time.perf_counter() - eval_started
            record = {
                "step": done,
                "train_loss": round(train_loss, 5),
                "val_loss": round(val_loss, 5),
                "lr": lr,
                "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1),
                "elapsed_s": elapsed(),
            }
            if ranks.is_main:
                _append_metrics(out_dir / METRICS_FILE, record)
            new_best = val_loss < best_val_loss
            if new_best:
                best_step, best_val_loss = done, val_loss
            reporter.evaluated(record)
            window_start, window_tokens = time.perf_counter(), 0
        else:
            new_best = False
        interrupted = stopping()
        # A new best is saved with the training state first, so a run folder never holds a best model that
        # `--resume` could not continue from.
        if ranks.is_main and (interrupted or new_best or last or done % train_config.save_every == 0):
            save(done)
        if ranks.is_main and new_best:
            checkpoint.save_model(out_dir / checkpoint.BEST_FILE, model,
                                  model_meta(done, val_loss=val_loss, train_loss=train_loss))
        if interrupted:
            reporter.finish()
            distributed.teardown(ranks)
            raise TrainingInterrupted(done, out_dir, saved=True)
        if last:
            break
    reporter.finish()
    if ranks.is_main:
        _plot_losses(out_dir)
    distributed.teardown(ranks)
    return TrainResult(
        out_dir=out_dir,
        step=done,
        val_loss=val_loss,
        train_loss=train_loss,
        best_step=best_step,
        best_val_loss=best_val_loss,
        parameters=model.num_parameters(),
        seconds=time.perf_counter() - started,
    )


_FIXED_ON_RESUME = ({f.name for f in dataclasses.fields(ModelConfig)} - {"attention", "attention_options"}) | {
    "tokenizer", "tokenizer_options", "optimizer", "optimizer_options"
}


def resume_configs(run_dir: Path, overrides: dict[str, Any],
                   plugin_options: dict[str, dict[str, Any]] | None = None) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was started with, updated by the flags given now (a larger ``steps``, another
    ``data``, another attention). Flags that would change what the checkpoint means — the tokenizer and
    its vocabulary, the model's shape, blocks, the optimizer — are refused."""
    run_dir = Path(run_dir)
    state_file = run_dir / checkpoint.STATE_FILE
    if not state_file.is_file():
        checkpoint.load_train_state(run_dir)  # raises the one-line error for a folder that is no run
    meta = checkpoint.read_metadata(state_file)
    if meta.get("kind") != "train_state":
        checkpoint.load_train_state(run_dir)  # the error for a run of an older Anexa
    settings = {**meta["model"]["model_config"], **meta["train_config"]}
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
        flags = ", ".join(f"-o {key.removesuffix('_options')}.…" if key.endswith("_options")
                          else f"--{key.replace('_', '-')}" for key in changed)
        raise AnexaError(
            f"cannot change {flags} when resuming {run_dir}: it would change what the checkpoint means; "
            "start a new run instead (without --resume)"
        )
    configs.merge(settings, given, "flags")
    model_config, train_config = configs.split(settings)
    return dataclasses.replace(model_config, vocab_size=meta["model"]["model_config"]["vocab_size"]), train_config
