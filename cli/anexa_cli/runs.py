"""``anexa runs``: the runs under ./runs (or another folder), newest first, as ``ollama list`` lists models."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from anexa_cli.console import count
from anexa_cli.errors import user_errors

if TYPE_CHECKING:
    from anexa_core.io.runs import RunSummary

COLUMNS = ("NAME", "ARCHITECTURE", "PARAMETERS", "STEPS", "BEST VAL LOSS", "SIZE", "MODIFIED")


def _size(size_bytes: int) -> str:
    for scale, unit in ((1e9, "GB"), (1e6, "MB"), (1e3, "kB")):
        if size_bytes >= scale:
            return f"{size_bytes / scale:.1f} {unit}"
    return f"{size_bytes} B"


def _ago(seconds: float) -> str:
    """``just now``, ``5 minutes ago``, ``3 hours ago``, ``2 days ago``, ``7 weeks ago``."""
    seconds = max(0.0, seconds)
    for span, unit in ((7 * 86400, "week"), (86400, "day"), (3600, "hour"), (60, "minute")):
        if seconds >= span:
            number = int(seconds // span)
            return f"{number} {unit}{'' if number == 1 else 's'} ago"
    return "just now"


def _row(run: RunSummary, now: float) -> tuple[str, ...]:
    """One run's line of the table, under :data:`COLUMNS`."""
    return (
        run.name,
        run.architecture(),
        count(run.parameters) + (" LoRA" if run.lora is not None else ""),
        "—" if run.step is None else f"{run.step:,}",
        "—" if run.best_val_loss is None else f"{run.best_val_loss:.4f} @ {run.best_step:,}",
        _size(run.size_bytes),
        _ago(now - run.modified),
    )


@user_errors
def runs(
    folder: Annotated[
        Path | None, typer.Argument(metavar="FOLDER", help="The folder holding run folders. \\[default: runs]")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (sizes in bytes, times in UTC).")] = False,
) -> None:
    """List the runs in FOLDER, newest first: architecture, parameters, steps, best validation loss, size, date."""
    from anexa_core.io.runs import list_runs

    where = folder or Path("runs")
    found, unreadable = list_runs(where, missing_ok=folder is None)
    if as_json:
        listed = [run.as_dict() for run in found]
        skipped = [{"path": str(path), "error": error} for path, error in unreadable]
        typer.echo(json.dumps({"runs": listed, "unreadable": skipped}, indent=2))
        return
    now = time.time()
    rows = [_row(run, now) for run in found]
    for path, error in unreadable:
        typer.echo(f"skipped {path}: {error}", err=True)
    if not found:
        typer.echo(f"no runs under {where}/: train one with `anexa train`", err=True)
        return
    widths = [max(len(text) for text in column) for column in zip(COLUMNS, *rows, strict=True)]
    for row in (COLUMNS, *rows):
        typer.echo("   ".join(text.ljust(width) for text, width in zip(row, widths, strict=True)).rstrip())
