"""Loss curves as PNG (matplotlib, the ``plot`` extra): train and val loss against steps and wall-clock."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from anexa_core.errors import AnexaError
from anexa_core.io.files import atomic_path


def pyplot():
    """matplotlib's pyplot on a file-only backend, or the one-line fix when it is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise AnexaError("plots need matplotlib: pip install 'anexa[plot]'") from None
    return plt


def read_metrics(run: Path) -> list[dict]:
    """A run folder's evaluations (``metrics.jsonl``), or a one-line error saying what is missing."""
    path = Path(run) / "metrics.jsonl"
    if not path.is_file():
        raise AnexaError(f"{run} holds no metrics.jsonl: pass the folder of an `anexa train` run")
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a killed run
    if not records:
        raise AnexaError(f"{run} has no evaluation yet: train until the first --eval-every step")
    return records


def plot_runs(runs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> Path:
    """One PNG: val (solid) and train (dashed) loss in nats/token against steps (left) and wall-clock
    minutes (right), one colour per run. Written atomically; returns ``out``."""
    plt = pyplot()
    labels = list(labels) if labels else [Path(run).name for run in runs]
    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for run, label, colour in zip(runs, labels, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10, strict=False):
        records = read_metrics(run)
        steps = [r["step"] for r in records]
        minutes = [r["elapsed_s"] / 60 for r in records]
        for axis, x in ((by_step, steps), (by_time, minutes)):
            axis.plot(x, [r["val_loss"] for r in records], color=colour, marker=".", label=f"{label} val")
            axis.plot(
                x, [r["train_loss"] for r in records], color=colour, linestyle="--", alpha=0.6, label=f"{label} train"
            )
    by_step.set(xlabel="step", ylabel="loss (nats/token)", title="loss by step")
    by_time.set(xlabel="wall-clock minutes", title="loss by time")
    for axis in (by_step, by_time):
        axis.grid(alpha=0.3)
    by_time.legend(fontsize="small")
    figure.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format="png", dpi=110)
    plt.close(figure)
    return out
