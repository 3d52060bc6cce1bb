"""``anexa plot RUN [RUN…]``: train/val loss of one or more runs, by step and by wall-clock, as a PNG, PDF or SVG."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from anexa_cli.errors import user_errors


@user_errors
def plot(
    runs: Annotated[list[Path], typer.Argument(metavar="RUNS", help="Run folders (each holds a metrics.jsonl).")],
    out: Annotated[
        Path, typer.Option("--out", "-o", dir_okay=False, help="The plot to write: .png, .pdf or .svg.")
    ] = Path("loss.png"),
    label: Annotated[list[str] | None, typer.Option(help="A label per run, in order (default: folder names).")] = None,
) -> None:
    """Plot train and val loss against steps and wall-clock minutes, one line per run."""
    from anexa_core.errors import AnexaError
    from anexa_core.measure.plots import plot_runs

    if label and len(label) != len(runs):
        raise AnexaError(f"{len(label)} --label values for {len(runs)} runs: give one per run or none")
    typer.echo(f"wrote {plot_runs(runs, out, label)}", err=True)
