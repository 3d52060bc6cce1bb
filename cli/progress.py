"""Training progress: a rich bar on a terminal, plain lines at a steady interval in a log or a pipe."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

PLAIN_INTERVAL_S = 10.0
"""How often a non-terminal stderr gets a progress line."""


def _header(console: Console, first_step: int, info: dict) -> None:
    millions = info["parameters"] / 1e6
    if info.get("resumed_from") is not None:
        console.print(f"resuming {info['out_dir']} from step {info['resumed_from']}")
    console.print(
        f"{millions:.2f}M parameters · vocab {info['vocab_size']} · {info['train_tokens']:,} train / "
        f"{info['val_tokens']:,} val tokens · device {info['device']}"
    )


def _evaluated(console: Console, metrics: dict) -> None:
    console.print(
        f"step {metrics['step']}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}"
    )


class RichReporter:
    """A progress bar with loss, tokens/s and ETA; shows dashes until the first step has a loss."""

    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[tok_s]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def start(self, total_steps, first_step, info):
        _header(self.console, first_step, info)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=first_step, loss="—", tok_s="—")

    def step(self, step, loss, tokens_per_s):
        self.progress.update(self.task, completed=step, loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

    def evaluated(self, metrics):
        _evaluated(self.progress.console, metrics)

    def finish(self):
        self.progress.stop()


class PlainReporter:
    """One line every :data:`PLAIN_INTERVAL_S` seconds (step, loss, tokens/s, ETA) for logs and pipes."""

    def __init__(self, console: Console, interval_s: float = PLAIN_INTERVAL_S):
        self.console = console
        self.interval_s = interval_s
        self.total = 0
        self.first = 0
        self.started = self.last = 0.0

    def start(self, total_steps, first_step, info):
        _header(self.console, first_step, info)
        self.total, self.first = total_steps, first_step
        self.started = self.last = time.monotonic()

    def step(self, step, loss, tokens_per_s):
        now = time.monotonic()
        if now - self.last < self.interval_s and step != self.total:
            return
        self.last = now
        rate = (step - self.first) / max(now - self.started, 1e-9)
        eta = (self.total - step) / rate if rate > 0 else float("inf")
        self.console.print(
            f"step {step}/{self.total} · loss {loss:.4f} · {tokens_per_s:,.0f} tok/s · ETA {_duration(eta)}",
            highlight=False,
        )

    def evaluated(self, metrics):
        _evaluated(self.console, metrics)

    def finish(self):
        pass


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def reporter_for(console: Console):
    """A bar when stderr is a terminal, plain lines otherwise."""
    return RichReporter(console) if console.is_terminal else PlainReporter(console)
