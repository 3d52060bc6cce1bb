"""Loss curves as PNG, PDF or SVG (matplotlib, the ``plot`` extra): the training loss every few steps with
the validation points, against steps and wall-clock, and the learning rate and throughput beside them."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError
from anexa_core.io.files import IMAGE_SUFFIXES, PLOT_METADATA, atomic_path, check_output
from anexa_core.io.metrics import METRICS_FILE, STEPS_FILE
from anexa_core.io.metrics import read_metrics as read_lines


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
    path = Path(run) / METRICS_FILE
    if not path.is_file():
        missing = "does not exist" if not Path(run).exists() else f"holds no {METRICS_FILE}"
        raise AnexaError(f"{run} {missing}: pass the folder of an `anexa train` run")
    records = read_lines(path)
    if not records:
        raise AnexaError(f"{run} has no evaluation yet: train until the first --eval-every step")
    return records


def read_steps(run: Path) -> list[dict[str, Any]]:
    """A run folder's training-loss records (``steps.jsonl``); ``[]`` for runs of Anexa 0.2, which had none."""
    return read_lines(Path(run) / STEPS_FILE)


def plot_runs(runs: Sequence[Path], out: Path, labels: Sequence[str] | None = None) -> Path:
    """One figure, in the format ``out``'s suffix names (.png, .pdf, .svg), one colour per run: loss
    (nats/token) by step and by wall-clock minutes — the training loss every ``log_every`` steps as a line
    (runs without ``steps.jsonl``: the evaluations' train loss, dashed) and the validation loss as points —
    and the learning rate by step with tokens/s (dotted, right axis). Written atomically; returns ``out``.
    Raises :class:`AnexaError` before reading a run when ``out`` may not be written
    (:func:`~anexa_core.io.files.check_output`: another suffix, an existing file of another kind, a path in a
    run folder — but the ``loss.png`` of the one run drawn, which this redraws)."""
    # Why complex: runs with and without steps.jsonl are drawn by one loop, their differences (loss key, line
    # style) as conditional expressions, on two x axes (step, minutes); one figure, drawn top to bottom.
    image_format = check_output(out, "--out", IMAGE_SUFFIXES, own_plot_of=runs[0] if len(runs) == 1 else None)
    plt = pyplot()
    labels = list(labels) if labels else [Path(run).name for run in runs]
    figure, (by_step, by_time, schedule) = plt.subplots(1, 3, figsize=(17, 4.5))
    by_time.sharey(by_step)
    throughput = schedule.twinx()
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"] * 10
    for run, label, colour in zip(runs, labels, colours, strict=False):
        evaluations, steps = read_metrics(run), read_steps(run)
        trained = steps or evaluations
        loss_key = "loss" if steps else "train_loss"
        for axis, unit in ((by_step, None), (by_time, 60.0)):

            def x(records, unit=unit):
                return [r["step"] if unit is None else r["elapsed_s"] / unit for r in records]

            axis.plot(
                x(trained),
                [r[loss_key] for r in trained],
                color=colour,
                linestyle="-" if steps else "--",
                alpha=0.6,
                linewidth=1,
                label=f"{label} train",
            )
            axis.plot(
                x(evaluations),
                [r["val_loss"] for r in evaluations],
                color=colour,
                marker="o",
                markersize=4,
                linestyle="none" if steps else "-",
                label=f"{label} val",
            )
        schedule.plot([r["step"] for r in trained], [r["lr"] for r in trained], color=colour, label=f"{label} lr")
        rates = [r for r in trained if r.get("tokens_per_s")]
        throughput.plot(
            [r["step"] for r in rates], [r["tokens_per_s"] for r in rates], color=colour, linestyle=":", alpha=0.7
        )
    by_step.set(xlabel="step", ylabel="loss (nats/token)", title="loss by step")
    by_time.set(xlabel="wall-clock minutes", title="loss by time")
    schedule.set(xlabel="step", ylabel="learning rate", title="learning rate (solid), tokens/s (dotted)")
    throughput.set_ylabel("tokens/s")
    for axis in (by_step, by_time, schedule):
        axis.grid(alpha=0.3)
    by_time.legend(fontsize="small")
    figure.tight_layout()
    out = Path(out)
    with atomic_path(out) as tmp:
        figure.savefig(tmp, format=image_format, dpi=110, metadata=PLOT_METADATA[image_format])
    plt.close(figure)
    return out
