"""CPU threads: the wall-clock of a seed run with Anexa's default thread count against explicit counts,
on an idle machine and beside a busy process.

    .venv/bin/python benchmarks/threads.py                      # 300 steps, idle and busy, every row
    .venv/bin/python benchmarks/threads.py --steps 100 --conditions busy --json out.json

Each row is one fresh ``anexa train --steps N`` process (the seed preset on the packaged Sherlock, a
token cache made once beforehand so no row tokenizes), timed from its start to its exit: what a user
waits for. Rows: the default (no ``--threads``), ``--threads 1`` … ``--threads C`` for the C usable
cores, and ``--threads C`` with libgomp's own spin-waiting (``GOMP_SPINCOUNT=300000``, its default when
``OMP_WAIT_POLICY`` is unset), which is what Anexa 0.2 ran by default. "busy" runs one process that
spins on a core (``while True: pass``) from before the row starts until it ends. The rows of a
condition run in turn, ``--repeats`` rounds. On a shared machine other work comes and goes, so each round
also measures the cores other processes kept busy while it ran (the machine's CPU time from /proc/stat
less the run's own, from ``wait4``); the table takes each row's median over the rounds whose other work
fits the condition (about none idle, about the spinner's one core busy) and shows that ratio to the
fastest explicit count, listing every round's measured other work.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ANEXA = [sys.executable, "-m", "anexa_cli"]
SPINNING = {"GOMP_SPINCOUNT": "300000"}
"""libgomp's spin count when OMP_WAIT_POLICY is unset: what an Anexa 0.2 run waited with."""


def rows(cores: int) -> dict[str, tuple[list[str], dict[str, str]]]:
    """Label → (extra flags, extra environment) of each row."""
    made: dict[str, tuple[list[str], dict[str, str]]] = {"default": ([], {})}
    for count in range(1, cores + 1):
        made[f"--threads {count}"] = (["--threads", str(count)], {})
    made[f"--threads {cores}, spinning (0.2's default)"] = (["--threads", str(cores)], SPINNING)
    return made


def _machine_busy_s() -> float:
    """CPU seconds every process of the machine has used since boot (/proc/stat: all but idle and iowait)."""
    fields = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def run_once(
    steps: int, flags: list[str], env: dict[str, str], workdir: Path, timeout_s: float
) -> tuple[float | None, float]:
    """``(seconds from starting anexa train to its exit, or None past timeout_s; the cores other work kept
    busy meanwhile on average)`` — the machine's CPU time over the run less the run's own (``wait4``)."""
    out = Path(tempfile.mkdtemp(dir=workdir)) / "run"
    command = [*ANEXA, "train", "--steps", str(steps), "--device", "cpu", "--out", str(out), *flags]
    environment = {**os.environ, **env}
    for name in ("ANEXA_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY"):
        if name not in env:
            environment.pop(name, None)
    machine, started = _machine_busy_s(), time.perf_counter()
    process = subprocess.Popen(command, env=environment, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = started + timeout_s
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            process.kill()
            process.wait()
            return None, 0.0
        time.sleep(0.05)
    seconds = time.perf_counter() - started
    other = (_machine_busy_s() - machine - usage.ru_utime - usage.ru_stime) / seconds
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{process.stderr.read()[-2000:].decode()}")
    return seconds, max(0.0, other)


def measure(args: argparse.Namespace) -> list[dict]:
    """Every round's record; the runs and their token cache live in a temporary folder removed at the end."""
    with tempfile.TemporaryDirectory(prefix="anexa-threads-") as workdir:
        return _measure(args, Path(workdir))


def _measure(args: argparse.Namespace, workdir: Path) -> list[dict]:
    from anexa_core.device import busy_cores, usable_cores

    cores = usable_cores()
    os.environ["ANEXA_CACHE"] = str(workdir / "cache")
    run_once(1, ["--threads", "1"], {}, workdir, 600)  # the token cache, once
    results = []
    for condition in args.conditions:
        for round_ in range(args.repeats):
            for label, (flags, env) in rows(cores).items():
                spinner = None
                if condition == "busy":
                    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                    time.sleep(0.5)
                load, seen = os.getloadavg()[0], busy_cores()
                try:
                    seconds, other = run_once(args.steps, flags, env, workdir, args.timeout)
                finally:
                    if spinner is not None:
                        spinner.kill()
                        spinner.wait()
                result = {
                    "condition": condition,
                    "row": label,
                    "round": round_,
                    "seconds": seconds,
                    "load_1min": round(load, 2),
                    "busy_cores_seen": round(seen, 2),
                    "other_cores_during": round(other, 2),
                }
                print(json.dumps(result), flush=True)
                results.append(result)
    return results


CLEAN = {"idle": (0.0, 0.15), "busy": (0.85, 1.25)}
"""The other work (cores kept busy on average) a row of each condition may have had to count: none when
idle; the spinning process, about one core, when busy. Rows outside are listed but not counted."""


def _clean(record: dict) -> bool:
    low, high = CLEAN[record["condition"]]
    return record["seconds"] is not None and low <= record.get("other_cores_during", 0.0) <= high


def table(results: list[dict], steps: int) -> str:
    """Each row's median seconds over its undisturbed rounds (see :data:`CLEAN`), its ratio to the fastest
    explicit ``--threads`` count, and the other work measured during each round (disturbed ones marked *)."""
    lines = [
        f"| condition | row | seconds ({steps} steps, median of undisturbed) | × the best explicit count "
        "| other work during each round (cores; * disturbed) |",
        "|---|---|---:|---:|---|",
    ]
    for condition in dict.fromkeys(r["condition"] for r in results):
        mine = [r for r in results if r["condition"] == condition]
        medians = {}
        for label in dict.fromkeys(r["row"] for r in mine):
            times = [r["seconds"] for r in mine if r["row"] == label and _clean(r)]
            medians[label] = statistics.median(times) if times else None
        explicit = [s for label, s in medians.items() if label.startswith("--threads") and "," not in label and s]
        best = min(explicit) if explicit else None
        for label, seconds in medians.items():
            rounds = ", ".join(
                f"{r.get('other_cores_during', float('nan')):.2f}{'' if _clean(r) else '*'}"
                for r in mine
                if r["row"] == label
            )
            shown = "—" if seconds is None else f"{seconds:.1f}"
            ratio = "—" if seconds is None or best is None else f"{seconds / best:.2f}"
            lines.append(f"| {condition} | {label} | {shown} | {ratio} | {rounds} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", type=Path, nargs="+", help="print the table of earlier --json files instead")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--conditions", nargs="+", choices=("idle", "busy"), default=["idle", "busy"])
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds before a row counts as timed out")
    parser.add_argument("--json", type=Path, help="also write every measurement here")
    args = parser.parse_args()
    if args.table:
        results = [row for path in args.table for row in json.loads(path.read_text(encoding="utf-8"))]
        print(table(results, args.steps))
        return
    results = measure(args)
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}")
    print(table(results, args.steps))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
