"""A rich progress bar for the training loop: loss, tokens/s and ETA."""

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichReporter:
    def __init__(self, console: Console):
        self.console = console
        self.progress = Progress(
            TextColumn("[bold]train"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TextColumn("{task.fields[tok_s]:,.0f} tok/s"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=console,
        )
        self.task = None

    def start(self, total_steps, first_step, info):
        millions = info["parameters"] / 1e6
        self.console.print(
            f"{millions:.2f}M parameters · vocab {info['vocab_size']} · {info['train_tokens']:,} train / "
            f"{info['val_tokens']:,} val tokens · device {info['device']}"
        )
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=first_step, loss=float("nan"), tok_s=0.0)

    def step(self, step, loss, tokens_per_s):
        self.progress.update(self.task, completed=step, loss=loss, tok_s=tokens_per_s)

    def evaluated(self, metrics):
        self.progress.console.print(
            f"step {metrics['step']}: train loss {metrics['train_loss']:.4f}, val loss {metrics['val_loss']:.4f}"
        )

    def finish(self):
        self.progress.stop()
