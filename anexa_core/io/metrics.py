"""A run's metrics, as JSON lines appended while it trains:

- ``metrics.jsonl`` (:data:`METRICS_FILE`): one line per evaluation — ``step``, ``train_loss`` and
  ``val_loss`` (nats/token, the mean over fixed batches), ``lr``, ``tokens_per_s`` since the last
  evaluation, ``elapsed_s``;
- ``steps.jsonl`` (:data:`STEPS_FILE`): one line every ``log_every`` steps — ``step``, ``loss`` (the mean
  training-batch loss of those steps, nats/token), ``lr`` (of the last of them), ``tokens_per_s`` over
  them, ``elapsed_s`` — the curve between evaluations.

A line cut short by a killed process, or damaged (bytes that are not UTF-8), is skipped when read, and a
resumed run first drops the lines written after the checkpoint it continues from (rewriting the file
atomically), so nothing is counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from anexa_core.io.files import atomic_path

METRICS_FILE = "metrics.jsonl"
STEPS_FILE = "steps.jsonl"
RUN_METRICS = (METRICS_FILE, STEPS_FILE)
"""Every metrics file of a run folder."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics file (``[]`` when there is none); a torn or damaged line (not JSON,
    not UTF-8) is dropped."""
    if not path.is_file():
        return []
    records = []
    for line in path.read_bytes().splitlines():
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int):
            records.append(record)
    return records


def truncate_metrics(path: Path, last_step: int) -> None:
    """Drop records written after the checkpoint a run resumes from (a crashed run may have gone further),
    and torn lines; atomically, so a kill during it loses nothing."""
    if path.is_file():
        kept = [record for record in read_metrics(path) if record["step"] <= last_step]
        with atomic_path(path) as tmp:
            tmp.write_text("".join(json.dumps(record) + "\n" for record in kept), encoding="utf-8")


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    """Add one record as a line."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(record) + "\n")
