"""The training loop, read top to bottom: :func:`train` = :func:`prepare` → :func:`fit` → checkpoints.

Random windows of the corpus (:mod:`.step`), an optimizer plugin (:mod:`.optim`), warmup + cosine LR,
periodic evaluation, checkpoints that survive interruption. Deterministic under a seed: batches come from
a dedicated generator, evaluation from fixed ones, and the generators' states travel in
``train_state.safetensors`` so ``--resume`` continues bit for bit. What a run folder holds is described in
:mod:`anexa_core.io.checkpoint`; the guarantees (nothing a user trained is overwritten or lost to Ctrl-C,
SIGTERM or SIGKILL) in ``docs/reliability.md``.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

import torch

from anexa_core import plugins
from anexa_core.config import SHORTHANDS, ModelConfig, TrainConfig
from anexa_core.data.corpus import check_sources
from anexa_core.data.prepare import prepare_data
from anexa_core.device import configure_threads, pick_device
from anexa_core.errors import AnexaError, listed
from anexa_core.interfaces import Tokenizer
from anexa_core.io import checkpoint
from anexa_core.io.load import Base, base_of, load_base
from anexa_core.io.metrics import METRICS_FILE, RUN_METRICS, STEPS_FILE, append_metrics, truncate_metrics
from anexa_core.io.pretrained import origin_of
from anexa_core.kinds import SETTINGS
from anexa_core.model.gpt import GPT, build_model
from anexa_core.model.lora import LoraSpec, apply_lora, load_adapter, trainable_parameters
from anexa_core.options import describe
from anexa_core.train import distributed
from anexa_core.train.optim import make_optimizer
from anexa_core.train.step import Conversations, Windows, estimate_loss, lr_at, make_train_step, train_window

logger = logging.getLogger("anexa")


class Reporter(Protocol):
    """Where the loop reports progress; the CLI supplies a progress bar or plain log lines.

    A reporter may also have ``data_progress(phase, done, total)``, told how preparing the data advances
    (fingerprinting, training the tokenizer, tokenizing: bytes; see :func:`prepare_data`).
    """

    def start(self, total_steps: int | None, first_step: int, info: dict[str, Any]) -> None:
        """Training begins at ``first_step``; ``total_steps`` is where it ends, ``None`` when only the time
        budget (``info["minutes"]``) ends it."""

    def step(self, step: int, loss: float, tokens_per_s: float) -> None: ...

    def evaluated(self, metrics: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class SilentReporter:
    """A reporter that reports nothing (library use, and every rank but the first)."""

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
    """How a run ended: its folder, last step, last losses (nats/token), the best validation loss and its
    step, unique parameters and the seconds this call trained."""

    out_dir: Path
    step: int
    val_loss: float
    train_loss: float
    best_step: int | None
    best_val_loss: float
    parameters: int
    seconds: float


@dataclass
class TrainingRun:
    """Everything a run holds while it trains: what :func:`prepare` built and :func:`fit` advances."""

    model: GPT
    tokenizer: Tokenizer
    optimizer: Any
    train_config: TrainConfig
    train_data: Windows | Conversations
    val_data: Windows | Conversations
    out_dir: Path
    device: torch.device
    ranks: distributed.Ranks
    batch_generator: torch.Generator
    resumed: bool = False
    first_step: int = 0
    best_step: int | None = None
    best_val_loss: float = float("inf")
    val_loss: float = float("nan")
    train_loss: float = float("nan")
    elapsed_before: float = 0.0
    started: float = dataclasses.field(default_factory=time.perf_counter)
    lora: dict[str, Any] | None = None  # a LoRA run's adapters and base: what its checkpoints record
    base_origin: dict[str, Any] | None = None  # a fine-tune's pretrained origin (pretrained.origin_of)
    threads: int = 1  # CPU threads torch computes with in this session

    def elapsed(self) -> float:
        """Seconds of training, earlier sessions of a resumed run included (to 0.01 s)."""
        return round(self.elapsed_before + time.perf_counter() - self.started, 2)


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    reporter: Reporter | None = None,
    resume: bool = False,
    overwrite: bool = False,
    stop_requested: Callable[[], bool] | None = None,
    base: Base | None = None,
) -> TrainResult:
    """Train (or, with ``resume``, continue training) and write checkpoints under ``out_dir``.

    ``out_dir`` holding a run is refused unless ``resume`` or ``overwrite``. ``stop_requested`` is polled
    after every step; when it returns true the step's checkpoint is written and
    :class:`TrainingInterrupted` is raised. ``base``: the model of ``train_config.init_from`` when the caller
    has loaded it already (:func:`anexa_core.train.finetune.finetune_configs`). Raises :class:`AnexaError` (one line) for every mistake a user
    can make, before any time is spent on the data where it can be found out earlier.

    Sets this process's CPU threads (``train_config.threads``; see
    :func:`~anexa_core.device.configure_threads`) first.
    """
    threads = configure_threads(train_config.threads)
    ranks, device = distributed.setup(pick_device(train_config.device))
    reporter = (reporter or SilentReporter()) if ranks.is_main else SilentReporter()
    try:
        run = prepare(
            model_config, train_config, Path(out_dir), ranks, device, resume, overwrite, reporter, base, threads
        )
        reporter.start(run.train_config.steps, run.first_step, _start_info(run))
        try:
            result = fit(run, reporter, stop_requested)
        finally:
            reporter.finish()
        if ranks.is_main:
            _plot_losses(run.out_dir)
        return result
    finally:
        distributed.teardown(ranks)


# --- prepare ----------------------------------------------------------------------------------------


def prepare(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    ranks: distributed.Ranks,
    device: torch.device,
    resume: bool,
    overwrite: bool,
    reporter: Reporter,
    base: Base | None,
    threads: int,
) -> TrainingRun:
    """The model, tokenizer, data and optimizer of a new run (from scratch, or fine-tuning ``base`` / the
    model of ``train_config.init_from``), or of the run in ``out_dir`` with ``resume`` (weights, optimizer
    state, random generators and progress restored), and a run folder ready for it."""
    # Why long: the run's three origins (resumed, fine-tuned, from scratch) each change how the model, tokenizer,
    # data, LoRA record and run folder are made; one function keeps the order of those steps readable once.
    if not resume:
        _check_new_run_folder(Path(out_dir), train_config.init_from, overwrite)
    state = checkpoint.load_train_state(out_dir) if resume else None
    optimizer_options = _check_plugins(model_config, train_config, state)
    check_sources(train_config.data)  # before a model is loaded or built: a missing file is the one line
    if state is None and train_config.init_from is not None and base is None:
        base = load_base(train_config.init_from)
    torch.manual_seed(train_config.seed)
    batch_generator = torch.Generator().manual_seed(train_config.seed + 1)
    model, tokenizer, tokenizer_options, train_data, val_data = _model_and_data(
        model_config, train_config, state, base, out_dir, getattr(reporter, "data_progress", None)
    )
    if state is None:
        train_config = train_config.with_schedule()  # a new run fixes where its LR decay ends, once
    model.to(device)
    train_config = dataclasses.replace(
        train_config, tokenizer_options=tokenizer_options, optimizer_options=optimizer_options
    )
    run = TrainingRun(
        model,
        tokenizer,
        make_optimizer(model, train_config),
        train_config,
        train_data,
        val_data,
        out_dir,
        device,
        ranks,
        batch_generator,
        resumed=state is not None,
        threads=threads,
    )
    if state is not None:
        run.base_origin = state.meta["model"].get("base_origin")
    elif base is not None and (origin := origin_of(base.meta, depth=1)) is not None:
        run.base_origin = origin.as_dict()  # kept, so the model card names it when the base is gone
    if train_config.lora is not None and state is not None:
        run.lora = state.meta["model"]["lora"]
    elif train_config.lora is not None:
        assert base is not None  # TrainConfig refuses --lora without --init-from, whose base is loaded above
        run.lora = {"spec": LoraSpec.parse(train_config.lora).as_dict(), "base": base.reference}
    if state is not None:
        _restore(run, state)
    if ranks.is_main:
        checkpoint.remove_stale_temp_files(out_dir)
        if resume:
            for name in RUN_METRICS:
                truncate_metrics(out_dir / name, run.first_step)
        elif out_dir.is_dir():
            checkpoint.clear_run(out_dir)
    return run


def _check_new_run_folder(out_dir: Path, init_from: str | None, overwrite: bool) -> None:
    """Refuse an ``out_dir`` a new run would write over: a run (unless ``overwrite``), a model Anexa did not
    write (a Hugging Face folder's ``model.safetensors``; never replaced, even with ``overwrite``), or the
    model being fine-tuned itself, a file, or a folder holding no run but other things (the user's files,
    the current directory, the folder of all runs; not even with ``overwrite``)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AnexaError(f"--out {out_dir} is a file: pass a folder for the run")
    if checkpoint.holds_foreign_weights(out_dir):
        raise AnexaError(
            f"{out_dir} holds a {checkpoint.MODEL_FILE} that Anexa did not write (a Hugging Face model?): "
            "a run never replaces it; pass another --out"
        )
    if init_from is not None and Path(init_from).expanduser().resolve() == out_dir.expanduser().resolve():
        raise AnexaError(
            f"--out {out_dir} is the model of --init-from: fine-tune it into another folder with --out NEW_RUN"
        )
    if not checkpoint.holds_a_run(out_dir):
        if others := checkpoint.foreign_entries(out_dir):
            raise AnexaError(
                f"--out {out_dir} is not empty and holds no run ({listed(others)}): pass a new or empty folder"
            )
        return
    if overwrite:
        return
    if not (out_dir / checkpoint.STATE_FILE).exists():  # an import: nothing to resume
        raise AnexaError(
            f"{out_dir} already holds a model: fine-tune it into another folder with `anexa train "
            f"--init-from {out_dir} --out NEW_RUN`, replace it with --overwrite, or pass another --out"
        )
    raise AnexaError(
        f"{out_dir} already holds a trained run: continue it with `anexa train --resume {out_dir}`, "
        "replace it with --overwrite, or pass another --out"
    )


def _model_and_data(
    model_config: ModelConfig,
    train_config: TrainConfig,
    state: checkpoint.TrainState | None,
    base: Base | None,
    out_dir: Path,
    progress: Any,
) -> tuple[GPT, Any, dict[str, Any], Windows | Conversations, Windows | Conversations]:
    """The run's model and tokenizer — resumed from ``state``, fine-tuned from ``base``, or new — and its
    data (:func:`prepare_data`): tokenizer options, training and validation windows or conversations. The
    windows' length is checked first; a new model is built once the data has trained its tokenizer."""
    model: GPT | None = None
    tokenizer = None
    if state is not None:
        model, tokenizer = _resumed_model(state, model_config, out_dir)
    elif base is not None:
        model, tokenizer = _finetuned_model(base, model_config, train_config)
    window = train_window(model_config.block_size, train_config, new_model=model is None)
    _, tokenizer, tokenizer_options, train_data, val_data = prepare_data(train_config, window, tokenizer, progress)
    if model is None:
        model = build_model(dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size))
    elif state is None and train_config.lora is not None:  # said once the data fits: a refusal stays one line
        trainable = trainable_parameters(model)
        logger.info("LoRA: %s trainable parameters of %s", f"{trainable:,}", f"{model.num_parameters():,}")
    return model, tokenizer, tokenizer_options, train_data, val_data


def _finetuned_model(base: Base, model_config: ModelConfig, train_config: TrainConfig) -> tuple[GPT, Any]:
    """``base``'s weights in a model of ``model_config`` (the base's, with the attention and dropout asked
    for), with LoRA adapters when ``train_config.lora``; the tokenizer is the base's."""
    model = build_model(model_config)
    _load_base_weights(model, base, shared=train_config.lora is not None)
    if train_config.lora is not None:
        apply_lora(model, LoraSpec.parse(train_config.lora))
    return model, base.tokenizer


def _load_base_weights(model: GPT, base: Base, shared: bool) -> None:
    """``base``'s weights into ``model``: copies, or with ``shared`` (LoRA, which never changes them) the
    base's own tensors, so the run holds one copy of the model's weights, not two (540 MB for a 135M
    model). ``base.model`` is left as it was either way."""
    if not shared:
        model.load_state_dict(base.model.state_dict())
        return
    model.load_state_dict(base.model.state_dict(), assign=True)  # new Parameters over the same storage
    if model.config.tie_embeddings:
        model.lm_head.weight = model.wte.weight  # `assign` made two parameters of the tied matrix: one again


def _resumed_model(state: checkpoint.TrainState, model_config: ModelConfig, out_dir: Path) -> tuple[GPT, Any]:
    """The model and tokenizer of a training state: every weight, or a LoRA run's base and adapters."""
    meta = state.meta["model"]
    model, tokenizer = checkpoint.rebuild(
        meta, out_dir / checkpoint.STATE_FILE, model_config.attention, model_config.attention_options
    )
    if "lora" not in meta:
        model.load_state_dict(state.weights)
        return model, tokenizer
    base = base_of(meta["lora"]["base"])
    _load_base_weights(model, base, shared=True)
    apply_lora(model, LoraSpec.from_dict(meta["lora"]["spec"]))
    load_adapter(model, state.weights)
    return model, base.tokenizer


def _check_plugins(
    model_config: ModelConfig, train_config: TrainConfig, state: checkpoint.TrainState | None
) -> dict[str, Any]:
    """Fail on a misspelt plugin, a missing one or a bad option before spending time on data; returns
    every option of the optimizer (defaults included)."""
    recorded = state.meta["model"].get("plugins", {}) if state else {}
    _create("tokenizer", train_config.tokenizer, train_config.tokenizer_options, recorded.get("tokenizer"))
    _create("blocks", model_config.blocks, model_config.blocks_options, recorded.get("blocks"))
    stored_attention = recorded.get("attention") or {}
    _create(
        "attention",
        model_config.attention,
        model_config.attention_options,
        stored_attention if stored_attention.get("name") == model_config.attention else None,
    )
    _, optimizer_options = _create(
        "optimizer",
        train_config.optimizer,
        train_config.optimizer_options,
        state.meta.get("optimizer_plugin") if state else None,
    )
    return optimizer_options


def _create(setting: str, name: str, given: dict[str, Any], recorded: dict[str, Any] | None) -> tuple[Any, dict]:
    """:func:`plugins.create` for a run's ``setting`` (``tokenizer``, ``blocks``…); an option the plugin
    lacks that came from a shorthand (``vocab_size``, ``--vocab-size``, for ``--tokenizer char``) is named as
    the setting the user gave, not as the plugin's option."""
    kind = SETTINGS[setting].name
    entry = plugins.registered(kind).get(name)  # a missing or clashing plugin: plugins.create says what to do
    if entry is not None:
        known = {option.name for option in describe(entry.obj)}
        for key, owner in SHORTHANDS.items():
            if owner == setting and key in given and key not in known:
                raise AnexaError(
                    f"{key} does not apply to {setting} {name}, which has no such option: drop it from the "
                    "command line or the config file"
                )
    return plugins.create(kind, name, given, recorded)


def _restore(run: TrainingRun, state: checkpoint.TrainState) -> None:
    """Where a resumed run was: optimizer state, step, best loss, time used, random generators."""
    config = run.train_config
    try:
        run.optimizer.load_state_dict(state.optimizer_state)
    except (ValueError, KeyError) as exc:
        raise AnexaError(
            f"the optimizer state in {run.out_dir} does not fit optimizer {config.optimizer!r} ({exc}): start a new run"
        ) from None
    run.first_step = state.step
    run.best_step = state.meta.get("best_step")
    if run.best_step is not None:
        run.best_val_loss = state.meta["best_val_loss"]
    run.elapsed_before = state.meta.get("elapsed_s", 0.0)
    trained_with = state.meta.get("threads")
    if run.device.type == "cpu" and isinstance(trained_with, int) and trained_with != run.threads:
        logger.info(
            "computing with %d CPU threads where %s was trained with %d: sums add up in another order, so the "
            "result may differ from an uninterrupted run in the last bits (--threads %d matches it)",
            run.threads,
            run.out_dir,
            trained_with,
            trained_with,
        )
    torch.set_rng_state(state.rng["torch"])
    run.batch_generator.set_state(state.rng["batch"])
    if run.device.type == "cuda" and "cuda" in state.rng:
        torch.cuda.set_rng_state(state.rng["cuda"], run.device)
    if config.steps is not None and run.first_step >= config.steps:
        raise AnexaError(f"run {run.out_dir} already reached step {run.first_step}: pass a larger --steps to continue")
    if config.minutes is not None and run.elapsed_before >= config.minutes * 60:
        raise AnexaError(  # the minutes given now may be less than the run's own budget: name both numbers
            f"run {run.out_dir} has trained {run.elapsed_before / 60:.3g} minutes already, not less than "
            f"--minutes {config.minutes:g}: pass a larger --minutes to continue"
        )


def _start_info(run: TrainingRun) -> dict[str, Any]:
    """What the reporter shows when training starts."""
    return {
        "parameters": run.model.num_parameters(),
        "device": str(run.device),
        "vocab_size": run.model.config.vocab_size,
        "train_tokens": run.train_data.tokens,
        "val_tokens": run.val_data.tokens,
        "resumed_from": run.first_step if run.resumed else None,
        "out_dir": str(run.out_dir),
        "minutes": run.train_config.minutes,
        "elapsed_s": run.elapsed_before,
    }


# --- fit --------------------------------------------------------------------------------------------


def fit(run: TrainingRun, reporter: Reporter, stop_requested: Callable[[], bool] | None = None) -> TrainResult:
    """Steps from ``run.first_step`` to ``train_config.steps`` (or until the ``--minutes`` budget, less the
    time of one final evaluation, is used): each sets the scheduled learning rate, trains on a fresh batch,
    evaluates every ``eval_every`` steps and at the end, and checkpoints (see :func:`save`). Every
    ``log_every`` steps (and at the end) a line of ``steps.jsonl`` records the mean training loss of
    those steps, the learning rate and their tokens/s (:mod:`anexa_core.io.metrics`).

    The schedule follows the step count up to ``schedule_steps``, or, for a run whose horizon is in
    minutes (``decay_minutes``), the share of that horizon the run has used, earlier sessions included."""
    # Why complex: each step decides in order whether to log, evaluate, save, stop on the time budget or on a
    # signal, all across ranks and sharing the loop's counters; split up, that order would be hidden.
    model, config, ranks, device = run.model, run.train_config, run.ranks, run.device
    model.train()
    train_step = make_train_step(model, run.optimizer, config, device, distributed.wrap(model, ranks, device))
    each_step = _reads_each_step(device)
    tokens_per_step = config.batch_size * train_window(model.config.block_size, config) * ranks.world_size
    budget_s = config.minutes * 60 if config.minutes is not None else None
    horizon_s = config.decay_minutes * 60 if config.decay_minutes is not None else None
    eval_seconds: float | None = None  # the last evaluation's duration, so a budget ends with its final one on time
    save_seconds: float | None = None  # the last checkpoint's, likewise
    log = _StepLog(run.out_dir / STEPS_FILE if ranks.is_main else None, tokens_per_step)
    run.started = time.perf_counter()
    done = run.first_step
    steps = range(run.first_step, config.steps) if config.steps is not None else itertools.count(run.first_step)
    for step in steps:
        lr = lr_at(step, config, None if horizon_s is None else run.elapsed() / horizon_s)
        factor = lr / config.lr
        for group in run.optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        x, y = run.train_data.batch(config.batch_size * ranks.world_size, run.batch_generator)
        step_started = time.perf_counter()
        loss = train_step(_to_device(ranks.shard(x), device), _to_device(ranks.shard(y), device))
        step_seconds = time.perf_counter() - step_started
        done = step + 1
        log.add(loss)
        # Stop when one more step (as long as this one), the final evaluation and checkpoint would not fit
        # (estimated only under a budget: the estimates read every parameter until they are measured).
        time_up = budget_s is not None and distributed.any_rank(
            run.elapsed()
            + step_seconds
            + _evaluation_seconds(run, done, eval_seconds)
            + _save_seconds(run, save_seconds)
            > budget_s,
            ranks,
            device,
        )
        last = done == config.steps or time_up
        interrupted = distributed.any_rank(bool(stop_requested and stop_requested()), ranks, device)
        if each_step or done % config.log_every == 0 or done % config.eval_every == 0 or last or interrupted:
            log.read(done, reporter)
        if done % config.log_every == 0 or last:
            log.write(done, lr, run.elapsed())
        new_best = False
        if done % config.eval_every == 0 or last:
            new_best, eval_seconds = _timed(evaluate, run, done, lr, log.tokens_per_s, reporter)
            log.pause(eval_seconds, new_window=True)
        if ranks.is_main and (interrupted or new_best or last or done % config.save_every == 0):
            _, save_seconds = _timed(save, run, done, best=new_best)
            log.pause(save_seconds)
        if interrupted:
            raise TrainingInterrupted(done, run.out_dir, saved=True)
        if last:
            break
    return TrainResult(
        out_dir=run.out_dir,
        step=done,
        val_loss=run.val_loss,
        train_loss=run.train_loss,
        best_step=run.best_step,
        best_val_loss=run.best_val_loss,
        parameters=model.num_parameters(),
        seconds=time.perf_counter() - run.started,
    )


T = TypeVar("T")


def _timed(call: Callable[..., T], *args: Any, **kwargs: Any) -> tuple[T, float]:
    """``call(*args, **kwargs)``'s result and how long it took, in seconds."""
    started = time.perf_counter()
    return call(*args, **kwargs), time.perf_counter() - started


def _to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``batch`` on ``device``. To a GPU through page-locked memory (PyTorch caches those buffers), so the
    copy is queued behind the running steps instead of waiting for them."""
    if device.type == "cuda":
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def _reads_each_step(device: torch.device) -> bool:
    """Whether the loop reads each step's loss back to the host at once. A read waits for the device: on
    a GPU the losses are read every ``log_every`` steps (and at evaluations, the end and an interruption),
    so the host queues the next steps meanwhile; a CPU computes synchronously anyway."""
    return device.type == "cpu"


def _evaluation_seconds(run: TrainingRun, done: int, measured: float | None) -> float:
    """How long the final evaluation will take: the last one's ``measured`` duration, or before any, an
    estimate from this session's training steps. An evaluation runs ``eval_batches`` forward passes of one
    batch for each of :func:`_evaluated_splits`; a forward pass is about a third of a training step, whose
    backward pass costs about twice its forward (2N against 4N FLOPs per token for N parameters: Kaplan et
    al. 2020, "Scaling Laws for Neural Language Models", section 2.1). Without the estimate a ``--minutes``
    run too short to evaluate before its end overran its budget by that evaluation (a 1-minute LoRA
    fine-tune of a 135M model by 40 s)."""
    if measured is not None:
        return measured
    step_seconds = (time.perf_counter() - run.started) / (done - run.first_step)
    return len(_evaluated_splits(run)) * run.train_config.eval_batches * step_seconds / _forwards_per_step(run)


def _forwards_per_step(run: TrainingRun) -> float:
    """A training step's cost in forward passes: the forward (2N FLOPs per token), the gradients of the
    activations (2N) and those of the trainable weights (2N times their share of the N parameters; Kaplan
    et al. 2020, section 2.1) — 3 when every weight trains, about 2 for LoRA, whose base is frozen (a
    1-minute LoRA fine-tune of SmolLM2 predicted 36 s for an evaluation that took 53 s with 3)."""
    parameters = list(run.model.parameters())
    share = sum(p.numel() for p in parameters if p.requires_grad) / max(sum(p.numel() for p in parameters), 1)
    return 2 + share


WRITE_BYTES_PER_S = 100e6
"""What a checkpoint's first write is assumed to take, before one is timed: 100 MB/s, written and synced
(this project's 2-core VM wrote a full fine-tune of SmolLM2's 2.7 GB in 29 s)."""


def _save_seconds(run: TrainingRun, measured: float | None) -> float:
    """How long the final checkpoint will take: the last one's ``measured`` duration, or before any, its
    bytes at :data:`WRITE_BYTES_PER_S` — the trainable weights in float32 five times over (the latest and
    the best model, and the training state: the weights and AdamW's two moments). Without it a 1-minute
    full fine-tune of a 135M model ended 29 s past its budget, writing."""
    if measured is not None:
        return measured
    trainable = sum(p.numel() * p.element_size() for p in run.model.parameters() if p.requires_grad)
    return 5 * trainable / WRITE_BYTES_PER_S


class _StepLog:
    """The lines of ``steps.jsonl``: the steps' losses since the last line, and their throughput (the time
    of evaluations left out). ``path`` ``None``: record nothing (every rank but the first).

    Losses arrive as 0-d tensors (:meth:`add`) and are read back to the host together (:meth:`read`)."""

    def __init__(self, path: Path | None, tokens_per_step: int):
        self.path, self.tokens_per_step = path, tokens_per_step
        self.window_start, self.window_tokens = time.perf_counter(), 0  # the progress line's throughput
        self.tokens_per_s = 0.0
        self.unread: list[torch.Tensor] = []
        self.losses: list[float] = []
        self.started = time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.unread.append(loss)

    def read(self, step: int, reporter: Reporter) -> None:
        """Read the losses of the steps up to ``step`` in one transfer and report each step, in order. The
        loop reads right after a step, so at least that step's loss is waiting. A loss that is not a finite
        number (the run diverged: too large a learning rate) raises :class:`AnexaError` before anything is
        saved, so the run's last checkpoint stays the last good model."""
        values = torch.stack(self.unread).tolist()
        self.window_tokens += self.tokens_per_step * len(values)
        self.tokens_per_s = tokens_per_s = self.window_tokens / max(time.perf_counter() - self.window_start, 1e-9)
        for at, value in enumerate(values, start=step - len(values) + 1):
            if not math.isfinite(value):
                raise AnexaError(
                    f"the training loss became {value} at step {at}: the run diverged (too large a learning "
                    "rate?); nothing was saved after it. Lower --lr, or raise --warmup-steps, and train again"
                )
            reporter.step(at, value, tokens_per_s)
        self.losses += values
        self.unread = []

    def pause(self, seconds: float, new_window: bool = False) -> None:
        """``seconds`` spent on something else (an evaluation, a checkpoint): not the steps' time.
        ``new_window``: the progress line's throughput starts afresh (after an evaluation)."""
        self.started += seconds
        self.window_start += seconds
        if new_window:
            self.window_start, self.window_tokens = time.perf_counter(), 0

    def write(self, step: int, lr: float, elapsed_s: float) -> None:
        if self.path is not None and self.losses:
            seconds = max(time.perf_counter() - self.started, 1e-9)
            record = {
                "step": step,
                "loss": round(sum(self.losses) / len(self.losses), 5),
                "lr": lr,
                "tokens_per_s": round(len(self.losses) * self.tokens_per_step / seconds, 1),
                "elapsed_s": elapsed_s,
            }
            append_metrics(self.path, record)
        self.losses, self.started = [], time.perf_counter()


def evaluate(run: TrainingRun, step: int, lr: float, tokens_per_s: float, reporter: Reporter) -> bool:
    """Train and validation loss on fixed batches, appended to ``metrics.jsonl`` and reported; returns
    whether the validation loss is a new best (a tie keeps the earlier one)."""
    config = run.train_config
    run.train_loss, run.val_loss = (
        estimate_loss(run.model, data, config, run.device, seed) for data, seed in _evaluated_splits(run)
    )
    record = {
        "step": step,
        "train_loss": round(run.train_loss, 5),
        "val_loss": round(run.val_loss, 5),
        "lr": lr,
        "tokens_per_s": round(tokens_per_s, 1),
        "elapsed_s": run.elapsed(),
    }
    if run.ranks.is_main:
        append_metrics(run.out_dir / METRICS_FILE, record)
    new_best = run.val_loss < run.best_val_loss
    if new_best:
        run.best_step, run.best_val_loss = step, run.val_loss
    # The reporter gets the losses unrounded, so what it prints rounds once, as the final summary does
    # (2.51104999 printed as 2.5110 there and, rounded to 2.51105 first, as 2.5111 here: seen by a newcomer).
    reporter.evaluated({**record, "train_loss": run.train_loss, "val_loss": run.val_loss})
    return new_best


def _evaluated_splits(run: TrainingRun) -> tuple[tuple[Windows | Conversations, int], ...]:
    """What an evaluation scores, in order: the training and the validation windows, each with the seed of
    the generator that draws the same batches every time."""
    seed = run.train_config.seed
    return ((run.train_data, seed + 2), (run.val_data, seed + 3))


# --- checkpoints ------------------------------------------------------------------------------------


def save(run: TrainingRun, step: int, best: bool) -> None:
    """The training state, then ``model.safetensors`` (and ``best.safetensors`` for a new best), each
    written atomically. The training state comes first: it alone is what ``--resume`` reads, so the pair can
    never disagree, and a run folder never holds a best model that ``--resume`` could not continue from."""
    config, model = run.train_config, run.model
    best_loss = None if run.best_step is None else run.best_val_loss
    meta = _model_meta(
        run,
        step,
        val_loss=_number(run.val_loss),
        train_loss=_number(run.train_loss),
        best_step=run.best_step,
        best_val_loss=best_loss,
    )
    rng = {"torch": torch.get_rng_state(), "batch": run.batch_generator.get_state()}
    if run.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(run.device)
    checkpoint.save_train_state(
        run.out_dir / checkpoint.STATE_FILE,
        model,
        run.optimizer,
        rng,
        meta,
        step=step,
        train_config=dataclasses.asdict(config),
        best_step=run.best_step,
        best_val_loss=best_loss,
        elapsed_s=meta["elapsed_s"],  # one reading of the clock for both files
        threads=run.threads,
        optimizer_plugin=plugins.provenance("optimizers", config.optimizer, config.optimizer_options),
    )
    delay = _save_delay()
    if delay:
        time.sleep(delay)
    checkpoint.save_model(run.out_dir / checkpoint.MODEL_FILE, model, meta)
    if best:
        checkpoint.save_model(
            run.out_dir / checkpoint.BEST_FILE,
            model,
            _model_meta(run, step, val_loss=run.val_loss, train_loss=run.train_loss),
        )


def _model_meta(run: TrainingRun, step: int, **info: Any) -> dict[str, Any]:
    config = run.train_config
    if config.lora is not None:
        info["lora"] = run.lora
    if run.base_origin is not None:
        info["base_origin"] = run.base_origin
    return checkpoint.model_metadata(
        run.model,
        run.tokenizer,
        config.tokenizer,
        config.tokenizer_options,
        step=step,
        **info,
        train_config=dataclasses.asdict(config),
        elapsed_s=run.elapsed(),
    )


def _number(value: float) -> float | None:
    """A loss for JSON metadata: ``None`` before the first evaluation rather than a non-standard NaN."""
    return None if value != value else value


def _plot_losses(out_dir: Path) -> None:
    """``loss.png`` beside the metrics, when matplotlib is installed (the ``plot`` extra)."""
    from anexa_core.measure import plots

    try:
        plots.plot_runs([out_dir], out_dir / checkpoint.PLOT_FILE)
    except AnexaError as exc:
        logger.info("no loss.png: %s", exc)


def _save_delay() -> float:
    """Test hook: seconds to sleep inside each save (``ANEXA_TEST_SAVE_DELAY``), to kill a run mid-save."""
    return float(os.environ.get("ANEXA_TEST_SAVE_DELAY", "0") or 0)
