"""One training step, the batches it eats, the learning-rate schedule, and the loss estimate of evaluation."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from anexa_core.config import TrainConfig
from anexa_core.data.chats import IGNORE, Example
from anexa_core.device import autocast
from anexa_core.errors import AnexaError
from anexa_core.model.gpt import GPT
from anexa_core.train.optim import Optimizers


def lr_at(step: int, config: TrainConfig, time_fraction: float | None = None) -> float:
    """The learning rate of (0-based) ``step``: linear warmup over ``warmup_steps`` to ``lr``, then cosine
    decay reaching ``min_lr`` at ``schedule_steps`` (SGDR, Loshchilov & Hutter 2017), ``min_lr`` after.

    For a schedule in minutes (``decay_minutes``, which ``--minutes`` sets) the decay follows
    ``time_fraction``, the share of that horizon used so far, instead of the step count, so a short run
    still ends at ``min_lr``; past 1 it stays at ``min_lr``, like steps past ``schedule_steps``.
    """
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    if time_fraction is not None:
        progress = min(1.0, max(0.0, time_fraction))
    elif config.schedule_steps is None:
        raise ValueError("a schedule without decay_steps or steps follows the clock: pass time_fraction")
    else:
        span = max(1, config.schedule_steps - config.warmup_steps)
        progress = min(1.0, (step - config.warmup_steps) / span)
    return config.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (config.lr - config.min_lr)


def train_window(block_size: int, train_config: TrainConfig, *, new_model: bool = False) -> int:
    """Tokens per training window: ``train_config.seq_len``, else the model's context ``block_size``.
    Raises :class:`~anexa_core.errors.AnexaError` for a window longer than the context, naming the longest
    window and, for a ``new_model`` (whose context is the user's to choose), the context that fits it."""
    window = train_config.seq_len or block_size
    if window > block_size:
        longer = f", or --block-size {window} or longer" if new_model else ""
        raise AnexaError(
            f"--seq-len {window} is longer than the model's context of {block_size} tokens: "
            f"use --seq-len {block_size} or shorter{longer}"
        )
    return window


def make_train_step(
    model: GPT,
    optimizer: torch.optim.Optimizer | Optimizers,
    config: TrainConfig,
    device: torch.device,
    forward: torch.nn.Module | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """One optimizer step on a batch ``(x, y)`` (B, T) int64 already on ``device``: forward under the
    configured precision (``forward``: ``model`` or its DDP wrapper; compiled with ``config.compile``),
    backward, gradient clipping, the optimizer's step. Returns the loss, a 0-d tensor (nats/token), without
    reading it back to the host (on a GPU that read waits for the step to finish).

    The training loop and ``anexa bench train`` both run exactly this, so the benchmark times the product.
    """
    run: Callable[..., tuple[torch.Tensor, torch.Tensor]] = forward if forward is not None else model
    if config.compile:
        run = torch.compile(run)
    params = [p for p in model.parameters() if p.requires_grad]

    def step(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        with autocast(device, config.precision):
            _, loss = run(x, y)
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


@dataclass(frozen=True)
class Windows:
    """Training examples from a token stream: random windows of ``length`` tokens (:func:`get_batch`)."""

    ids: np.ndarray | torch.Tensor
    length: int

    @property
    def tokens(self) -> int:
        return len(self.ids)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        return get_batch(self.ids, self.length, batch_size, generator)


@dataclass(frozen=True)
class Conversations:
    """Training examples from conversations (:mod:`anexa_core.data.chats`): ``batch_size`` of them drawn at
    random, right-padded to the longest; targets are the next ids where the loss counts them (assistant
    tokens) and -100 elsewhere (``F.cross_entropy``'s ``ignore_index``: prompts and padding)."""

    examples: list[Example]

    @property
    def tokens(self) -> int:
        return sum(len(example.ids) for example in self.examples)

    def batch(self, batch_size: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        picked = [self.examples[i] for i in torch.randint(len(self.examples), (batch_size,), generator=generator)]
        length = max(len(example.ids) for example in picked) - 1
        x = torch.zeros(batch_size, length, dtype=torch.long)
        y = torch.full((batch_size, length), IGNORE, dtype=torch.long)
        for row, example in enumerate(picked):
            ids = torch.tensor(example.ids, dtype=torch.long)
            counted = torch.tensor(example.trained[1:], dtype=torch.bool)
            x[row, : len(ids) - 1] = ids[:-1]
            y[row, : len(ids) - 1] = torch.where(counted, ids[1:], IGNORE)
        return x, y


def estimate_loss(
    model: GPT, data: Windows | Conversations, config: TrainConfig, device: torch.device, seed: int
) -> float:
    """Mean loss (nats/token) over ``eval_batches`` batches drawn from a generator seeded with ``seed``,
    so the same windows are scored at every evaluation and losses are comparable across steps."""
    generator = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    losses: list[torch.Tensor] = []
    for _ in range(config.eval_batches):
        x, y = data.batch(config.batch_size, generator)
        with torch.no_grad(), autocast(device, config.precision):  # a context, not a decorator: see docs/testing.md
            _, loss = model(x.to(device), y.to(device))
        losses.append(loss)
    model.train(was_training)
    values = torch.stack(losses).tolist()  # one read back to the host, not one per batch
    return sum(values) / len(values)
