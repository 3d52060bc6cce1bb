"""Training progress: a rich bar on a terminal, plain lines at a steady interval in a log or a pipe."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from anexa_cli.console import count

PLAIN_INTERVAL_S = 10.0
"""How often a non-terminal stderr gets a progress line."""


def _header(console: Console, first_step: int, info: dict) -> None:
    if info.get("resumed_from") is not None:
        console.print(f"resuming {info['out_dir']} from step {info['resumed_from']}")
    console.print(
        f"{count(info['parameters'])} parameters · vocab {info['vocab_size']} · {info['train_tokens']:,} train / "
        f"{info['val_tokens']:,} val tokens · device {info['device']}"
    )


def _evaluated(console: Console, metrics: dict) -> None:
    console.print(f"step {metrics['step']}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}")


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
        self.data_progress = DataProgress(console)

    def start(self, total_steps, first_step, info):
        self.data_progress.close()  # never two live displays at once
        _header(self.console, first_step, info)
        self.clock = _Clock(info)
        self.progress.start()
        total, done = (self.clock.budget, self.clock.elapsed()) if self.clock.budget else (total_steps, first_step)
        self.task = self.progress.add_task("train", total=total, completed=done, loss="—", tok_s="—")

    def step(self, step, loss, tokens_per_s):
        completed = self.clock.elapsed() if self.clock.budget else step
        self.progress.update(self.task, completed=completed, loss=f"{loss:.4f}", tok_s=f"{tokens_per_s:,.0f}")

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
        self.data_progress = DataProgress(console, interval_s)

    def start(self, total_steps, first_step, info):
        _header(self.console, first_step, info)
        self.total, self.first = total_steps, first_step
        self.clock = _Clock(info)
        self.started = self.last = time.monotonic()

    def step(self, step, loss, tokens_per_s):
        now = time.monotonic()
        if now - self.last < self.interval_s and step != self.total:
            return
        self.last = now
        if self.clock.budget:
            where = f"step {step} · {_duration(self.clock.elapsed())} of {_duration(self.clock.budget)}"
            eta = self.clock.budget - self.clock.elapsed()
        else:
            where = f"step {step}/{self.total}"
            rate = (step - self.first) / max(now - self.started, 1e-9)
            eta = (self.total - step) / rate if rate > 0 else float("inf")
        self.console.print(
            f"{where} · loss {loss:.4f} · {tokens_per_s:,.0f} tok/s · ETA {_duration(eta)}", highlight=False
        )

    def evaluated(self, metrics):
        _evaluated(self.console, metrics)

    def finish(self):
        pass


class _Clock:
    """Wall-clock progress of a run with a time budget (``--minutes``), resumed runs included."""

    def __init__(self, info: dict):
        self.budget = info["minutes"] * 60 if info.get("minutes") else None
        self.before = info.get("elapsed_s") or 0.0
        self.started = time.monotonic()

    def elapsed(self) -> float:
        return self.before + time.monotonic() - self.started


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = max(0.0, seconds)
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _amount(count: float, unit: str) -> str:
    if unit != "bytes":
        return f"{count:,.0f} {unit}"
    for scale, name in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if count >= scale:
            return f"{count / scale:.1f} {name}"
    return f"{count:.0f} B"


class DataProgress:
    """``progress(phase, done, total, unit="bytes")`` for preparing data (fingerprinting, learning the
    vocabulary, tokenizing, checking the token cache) and for ``anexa eval`` (windows).

    On a terminal, a transient bar per phase; elsewhere a line every ``interval_s`` while a phase runs.
    Either way a phase that took :data:`MIN_REPORT_S` or longer leaves one summary line (size, time,
    rate), and quick ones leave nothing, so small corpora print as before.
    """

    MIN_REPORT_S = 2.0

    def __init__(self, console: Console, interval_s: float = PLAIN_INTERVAL_S):
        self.console, self.interval_s = console, interval_s
        self.phase: str | None = None
        self.unit, self.done, self.total = "bytes", 0, 0
        self.started = self.last = 0.0
        self.bar: Progress | None = None
        self.task: TaskID | None = None

    def __call__(self, phase: str, done: int, total: int, unit: str = "bytes") -> None:
        now = time.monotonic()
        if phase != self.phase:
            self._end(now)
            self.phase, self.unit, self.total, self.started, self.last = phase, unit, total, now, now
            if self.console.is_terminal:
                amount = (DownloadColumn(), TransferSpeedColumn()) if unit == "bytes" else (MofNCompleteColumn(),)
                self.bar = Progress(
                    TextColumn(f"[bold]{phase}"),
                    BarColumn(),
                    *amount,
                    TimeElapsedColumn(),
                    TextColumn("ETA"),
                    TimeRemainingColumn(),
                    console=self.console,
                    transient=True,
                )
                self.bar.start()
                self.task = self.bar.add_task(phase, total=max(total, 1))
        self.done, self.total = done, total
        if self.bar is not None and self.task is not None:
            self.bar.update(self.task, completed=done, total=max(total, 1))
        elif now - self.last >= self.interval_s:
            self.last = now
            share = f" ({100 * done / total:.0f}%)" if total else ""
            done_text = _amount(done, unit) if unit == "bytes" else f"{done:,}"
            self.console.print(f"{phase}: {done_text} of {_amount(total, unit)}{share}", highlight=False)
        if done >= total:
            self._end(now)

    def close(self) -> None:
        """End the phase in progress, if any (its bar disappears)."""
        self._end(time.monotonic())

    def _end(self, now: float) -> None:
        if self.phase is None:
            return
        if self.bar is not None:
            self.bar.stop()
            self.bar = None
        seconds = now - self.started
        if seconds >= self.MIN_REPORT_S:
            rate = _amount(self.done / max(seconds, 1e-9), self.unit) + "/s"
            self.console.print(
                f"{self.phase}: {_amount(self.done, self.unit)} in {seconds:.1f}s ({rate})", highlight=False
            )
        self.phase = None


def reporter_for(console: Console):
    """A bar when stderr is a terminal, plain lines otherwise."""
    return RichReporter(console) if console.is_terminal else PlainReporter(console)
