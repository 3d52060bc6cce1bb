"""``metrics.jsonl``: one JSON line per evaluation of a run (step, losses, learning rate, tokens/s, time).

Appended as training goes; a line cut short by a killed process is skipped when read, and a resumed run
first drops the lines written after the checkpoint it continues from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` file (``[]`` when there is none); a torn last line is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint a run resumes from (a crashed run may have gone further)."""
    if path.is_file():
        kept = [record for record in read_metrics(path) if record["step"] <= last_step]
        path.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Add one record as a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
