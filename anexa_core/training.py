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
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from anexa_core import checkpoint, config as configs, data, distributed, plugins
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.model import GPT, build_model

METRICS_FILE = checkpoint.METRICS_FILE


class Reporter(Protocol):
    """Where the loop reports progress; the CLI supplies a progress bar or plain log lines."""

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


def autocast(device: torch.device):
    """bf16 autocast on CUDA; full precision elsewhere."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def lr_at(step: int, config: TrainConfig) -> float:
    """The learning rate of (0-based) ``step``: linear warmup over ``warmup_steps`` to ``lr``, then cosine
    decay reaching ``min_lr`` at ``schedule_steps`` (SGDR, Loshchilov & Hutter 2017), ``min_lr`` after."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.schedule_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: GPT, config: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer plugin ``config.optimizer`` built over ``model``; each group remembers its peak LR."""
    factory, _ = plugins.create("optimizers", config.optimizer, config.optimizer_options)
    optimizer = factory.build(model, config)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])  # the peak; the schedule scales it
    return optimizer


def get_batch(
    ids: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``block_size`` tokens (B, T) int64 and the same windows shifted by one."""
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def estimate_loss(
    model: GPT, ids: torch.Tensor, config: TrainConfig, device: torch.device, seed: int
) -> float:
    """Mean loss (nats/token) over ``eval_batches`` batches drawn from a generator seeded with ``seed``,
    so the same windows are scored at every evaluation and losses are comparable across steps."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    losses = []
    for _ in range(config.eval_batches):
        x, y = get_batch(ids, model.config.block_size, config.batch_size, generator)
        with autocast(device):
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss.item())
    model.train(was_training)
    return sum(losses) / len(losses)


def prepare_data(train_config: TrainConfig, block_size: int, tokenizer=None):
    """Load the corpus, train the tokenizer (unless given), split 90/10 into train and val ids.

    Returns ``(short name, tokenizer, tokenizer options, train ids, val ids)``; ids are int64 tensors.
    """
    text, name = data.load_corpus(train_config.data)
    options = train_config.tokenizer_options
    if tokenizer is None:
        tokenizer, options = plugins.create("tokenizers", train_config.tokenizer, train_config.tokenizer_options)
        tokenizer.train([text])
        ids = tokenizer.encode(text)
    else:
        try:
            ids = tokenizer.encode(text)
        except AnexaError as exc:
            raise AnexaError(f"--data {train_config.data!r} does not fit this run's tokenizer: {exc}") from None
    ids = torch.tensor(ids, dtype=torch.long)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    if len(val_ids) <= block_size + 1:
        need = (block_size + 2) * 10
        raise AnexaError(
            f"corpus {train_config.data!r} has {len(ids)} tokens, too few for block_size {block_size}: "
            f"use a text of at least {need} tokens or a smaller --block-size"
        )
    return name, tokenizer, options, train_ids, val_ids


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
    # Fail on a misspelt plugin or a bad option before spending time on data.
    plugins.create("tokenizers", train_config.tokenizer, train_config.tokenizer_options)
    plugins.create("blocks", model_config.blocks, model_config.blocks_options)
    plugins.create("attention", model_config.attention, model_config.attention_options)
    _, optimizer_options = plugins.create("optimizers", train_config.optimizer, train_config.optimizer_options)
    torch.manual_seed(train_config.seed)
    batch_generator = torch.Generator().manual_seed(train_config.seed + 1)
    first_step, best_step, best_val_loss, elapsed_before = 0, None, float("inf"), 0.0

    state = None
    if resume:
        state = checkpoint.load_train_state(out_dir)
        model, tokenizer = checkpoint.rebuild(state.meta["model"], out_dir / checkpoint.STATE_FILE,
                                              model_config.attention, model_config.attention_options)
        model.load_state_dict(state.weights)
        model.to(device)
        _, _, tokenizer_options, train_ids, val_ids = prepare_data(train_config, model.config.block_size, tokenizer)
    else:
        _, tokenizer, tokenizer_options, train_ids, val_ids = prepare_data(train_config, model_config.block_size)
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
        )
        if delay:
            time.sleep(delay)
        checkpoint.save_model(out_dir / checkpoint.MODEL_FILE, model, meta)

    def stopping() -> bool:
        wanted = bool(stop_requested and stop_requested())
        return distributed.any_rank(wanted, ranks, device)

    model.train()
    window_start, window_tokens = time.perf_counter(), 0
    val_loss = train_loss = float("nan")
    step = done = first_step
    for step in range(first_step, train_config.steps):
        factor = lr_at(step, train_config) / train_config.lr
        for group in optimizer.param_groups:
            group["lr"] = group["initial_lr"] * factor
        x, y = get_batch(
            train_ids, model_config.block_size, train_config.batch_size * ranks.world_size, batch_generator
        )
        x, y = ranks.shard(x).to(device, non_blocking=True), ranks.shard(y).to(device, non_blocking=True)
        with autocast(device):
            _, loss = parallel_model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if train_config.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()

        done = step + 1
        window_tokens += tokens_per_step
        now = time.perf_counter()
        reporter.step(done, loss.item(), window_tokens / max(now - window_start, 1e-9))
        if done % train_config.eval_every == 0 or done == train_config.steps:
            train_loss = estimate_loss(model, train_ids, train_config, device, train_config.seed + 2)
            val_loss = estimate_loss(model, val_ids, train_config, device, train_config.seed + 3)
            record = {
                "step": done,
                "train_loss": round(train_loss, 5),
                "val_loss": round(val_loss, 5),
                "lr": lr_at(step, train_config),
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
        if ranks.is_main and (interrupted or new_best or done % train_config.save_every == 0
                              or done == train_config.steps):
            save(done)
        if ranks.is_main and new_best:
            checkpoint.save_model(out_dir / checkpoint.BEST_FILE, model,
                                  model_meta(done, val_loss=val_loss, train_loss=train_loss))
        if interrupted:
            reporter.finish()
            distributed.teardown(ranks)
            raise TrainingInterrupted(done, out_dir, saved=True)
    reporter.finish()
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
        flags = ", ".join(f"--{key.replace('_', '-')}" for key in changed)
        raise AnexaError(
            f"cannot change {flags} when resuming {run_dir}: it would change what the checkpoint means; "
            "start a new run instead (without --resume)"
        )
    configs.merge(settings, given, "flags")
    model_config, train_config = configs.split(settings)
    return dataclasses.replace(model_config, vocab_size=meta["model"]["model_config"]["vocab_size"]), train_config
