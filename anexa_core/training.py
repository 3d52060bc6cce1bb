"""The training loop: random windows of the corpus, AdamW, warmup + cosine LR, periodic eval, checkpoints.

Deterministic under a seed: batches come from a dedicated generator, eval from a fixed one, and both
generators' states travel in ``train_state.safetensors`` so ``--resume`` continues exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from anexa_core import checkpoint, data, distributed, plugins
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.model import GPT, build_model

METRICS_FILE = "metrics.jsonl"


class Reporter(Protocol):
    """Where the loop reports progress; the CLI supplies a rich progress bar."""

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


@dataclass
class TrainResult:
    out_dir: Path
    step: int
    val_loss: float
    train_loss: float
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
    """Linear warmup to ``lr``, then cosine decay to ``min_lr`` at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def make_optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW; matrices decay, biases, norms and (tied) embeddings' 1-D peers do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=config.lr, betas=(config.beta1, config.beta2), fused=device.type == "cuda"
    )


def get_batch(
    ids: torch.Tensor, block_size: int, batch_size: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``block_size`` tokens and the same windows shifted by one."""
    starts = torch.randint(len(ids) - block_size - 1, (batch_size,), generator=generator)
    x = torch.stack([ids[s : s + block_size] for s in starts.tolist()])
    y = torch.stack([ids[s + 1 : s + 1 + block_size] for s in starts.tolist()])
    return x, y


@torch.no_grad()
def estimate_loss(
    model: GPT, ids: torch.Tensor, config: TrainConfig, device: torch.device, seed: int
) -> float:
    """Mean loss over ``eval_batches`` batches drawn from a fixed generator (comparable across steps)."""
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
    """Load the corpus, train (or reuse) the tokenizer, split 90/10 into train and val ids."""
    text, name = data.load_corpus(train_config.data)
    if tokenizer is None:
        tokenizer_cls = plugins.get("tokenizers", train_config.tokenizer)
        tokenizer = tokenizer_cls.train(text, vocab_size=train_config.vocab_size)
    ids = torch.tensor(tokenizer.encode(text), dtype=torch.long)
    split = int(0.9 * len(ids))
    train_ids, val_ids = ids[:split], ids[split:]
    if len(val_ids) <= block_size + 1:
        need = (block_size + 2) * 10
        raise AnexaError(
            f"corpus {train_config.data!r} has {len(ids)} tokens, too few for block_size {block_size}: "
            f"use a text of at least {need} tokens or a smaller --block-size"
        )
    return name, tokenizer, train_ids, val_ids


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint a run resumes from."""
    if path.is_file():
        kept = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= last_step]
        path.write_text("".join(line + "\n" for line in kept))


def _append_metrics(path: Path, record: dict[str, Any]) -> None:
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")


def train(
    model_config: ModelConfig,
    train_config: TrainConfig,
    out_dir: Path,
    reporter: Reporter | None = None,
    resume: bool = False,
) -> TrainResult:
    """Train (or, with ``resume``, continue training) and write checkpoints under ``out_dir``."""
    reporter = reporter or SilentReporter()
    out_dir = Path(out_dir)
    ranks, device = distributed.setup(pick_device(train_config.device))
    if not ranks.is_main:
        reporter = SilentReporter()
    for kind, name in [("tokenizers", train_config.tokenizer), ("blocks", model_config.blocks),
                       ("attention", model_config.attention)]:
        plugins.get(kind, name)  # fail on a misspelt name before spending time on data
    torch.manual_seed(train_config.seed)
    batch_generator = torch.Generator().manual_seed(train_config.seed + 1)
    first_step = 0

    if resume:
        model, tokenizer, _ = checkpoint.load_model(out_dir, device, attention=model_config.attention)
        model_config = model.config
        _, tokenizer, train_ids, val_ids = prepare_data(train_config, model_config.block_size, tokenizer)
    else:
        _, tokenizer, train_ids, val_ids = prepare_data(train_config, model_config.block_size)
        model_config = dataclasses.replace(model_config, vocab_size=tokenizer.vocab_size)
        model = build_model(model_config).to(device)
    optimizer = make_optimizer(model, train_config, device)
    if resume:
        rng, state_meta = checkpoint.load_train_state(out_dir / checkpoint.STATE_FILE, optimizer)
        first_step = state_meta["step"]
        torch.set_rng_state(rng["torch"])
        batch_generator.set_state(rng["batch"])
        if device.type == "cuda" and "cuda" in rng:
            torch.cuda.set_rng_state(rng["cuda"], device)
        if first_step >= train_config.steps:
            raise AnexaError(f"run {out_dir} already reached step {first_step}: pass a larger --steps to continue")
        _truncate_metrics(out_dir / METRICS_FILE, first_step)
    elif ranks.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / METRICS_FILE).unlink(missing_ok=True)
    parallel_model = distributed.wrap(model, ranks, device)

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
        },
    )

    def save(step: int, val_loss: float) -> None:
        checkpoint.save_model(
            out_dir / checkpoint.MODEL_FILE, model, train_config.tokenizer, tokenizer, step=step, val_loss=val_loss, train_config=dataclasses.asdict(train_config),
        )
        rng = {"torch": torch.get_rng_state(), "batch": batch_generator.get_state()}
        if device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(device)
        checkpoint.save_train_state(
            out_dir / checkpoint.STATE_FILE, optimizer, rng, step=step,
            train_config=dataclasses.asdict(train_config),
        )

    model.train()
    started = time.perf_counter()
    window_start, window_tokens = started, 0
    val_loss = train_loss = float("nan")
    step = first_step
    for step in range(first_step, train_config.steps):
        lr = lr_at(step, train_config)
        for group in optimizer.param_groups:
            group["lr"] = lr
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
                "lr": lr,
                "tokens_per_s": round(window_tokens / max(now - window_start, 1e-9), 1),
                "elapsed_s": round(now - started, 2),
            }
            if ranks.is_main:
                _append_metrics(out_dir / METRICS_FILE, record)
            reporter.evaluated(record)
            window_start, window_tokens = time.perf_counter(), 0
        if ranks.is_main and (done % train_config.save_every == 0 or done == train_config.steps):
            save(done, val_loss)
    reporter.finish()
    distributed.teardown(ranks)
    return TrainResult(
        out_dir=out_dir,
        step=train_config.steps,
        val_loss=val_loss,
        train_loss=train_loss,
        parameters=model.num_parameters(),
        seconds=time.perf_counter() - started,
    )


def resume_configs(run_dir: Path, overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was started with, updated by the flags given now (e.g. a larger ``steps``)."""
    run_dir = Path(run_dir)
    state_file = run_dir / checkpoint.STATE_FILE
    if not state_file.is_file():
        raise AnexaError(f"{run_dir} holds no {checkpoint.STATE_FILE}: pass the folder of an `anexa train` run")
    model_meta = checkpoint.read_metadata(run_dir / checkpoint.MODEL_FILE)
    state_meta = checkpoint.read_metadata(state_file)
    model_config = ModelConfig(**model_meta["model_config"])
    given = {k: v for k, v in overrides.items() if v is not None}
    if "attention" in given:
        model_config = dataclasses.replace(model_config, attention=given.pop("attention"))
    fixed = {f.name for f in dataclasses.fields(ModelConfig)} & given.keys()
    if fixed:
        raise AnexaError(f"cannot change {', '.join(sorted(fixed))} when resuming: start a new run instead")
    train_config = TrainConfig(**{**state_meta["train_config"], **given})
    return model_config, train_config
