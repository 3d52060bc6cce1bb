"""Data at scale: tokenize a generated 1 GB corpus (char and BPE), then time a second run to its first step.

    .venv/bin/python benchmarks/data_scale.py                    # 1 GB in 16 files, in a temporary folder
    .venv/bin/python benchmarks/data_scale.py --size-mb 100 --json out.json

The corpus is made up: sentences of the books in ``../shared/data`` (or ``$ANEXA_DATA_DIR``) drawn at
random (seeded) into paragraphs, written as ``--files`` files of a folder; nothing is committed. For each
tokenizer it runs ``anexa_core.train.loop.train`` (seed preset, one step) twice in fresh processes with an
empty token cache the first time:

- the first run fingerprints the files, learns the vocabulary (BPE: from its first 100M characters),
  tokenizes everything into the cache; reported: each phase's seconds and MB/s of corpus bytes, and the
  process's peak RSS (``ru_maxrss`` from ``os.wait4``, the whole process: Python, torch, the model);
- the second run, on the same folder into a new run folder, must find everything cached; reported: the
  seconds from starting the process to the end of its first optimizer step, and its peak RSS.

The corpus is read from the page cache (it was just written), so MB/s measure Anexa, not the disk.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("ANEXA_DATA_DIR", REPO.parent / "shared" / "data"))
MB = 1e6


def generate(folder: Path, size_bytes: int, files: int, seed: int = 0) -> int:
    """Write ``files`` files of made-up paragraphs totalling about ``size_bytes``; returns the bytes written."""
    import numpy as np

    sentences: list[str] = []
    for book in sorted(DATA_DIR.glob("*.txt")):
        text = " ".join(book.read_text(encoding="utf-8").split())
        sentences += [s for s in re.split(r"(?<=[.!?])\s+", text) if 20 <= len(s) <= 400]
    if not sentences:
        raise SystemExit(f"no books in {DATA_DIR}: set ANEXA_DATA_DIR to a folder of .txt files")
    encoded = [s.encode("utf-8") for s in sentences]
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per_file, written = size_bytes // files, 0
    for index in range(files):
        parts, size = [], 0
        while size < per_file:
            picks = rng.integers(0, len(encoded), 4096)
            lengths = rng.integers(2, 9, 4096)
            at = 0
            for length in lengths:
                paragraph = b" ".join(encoded[i] for i in picks[at : at + length]) + b"\n\n"
                at = (at + length) % 4000
                parts.append(paragraph)
                size += len(paragraph)
                if size >= per_file:
                    break
        (folder / f"part-{index:03d}.txt").write_bytes(b"".join(parts))
        written += size
    return written


def child(args: argparse.Namespace) -> None:
    """One ``train`` of one step, timing the data phases and the first step; prints JSON."""
    from anexa_core import config as configs
    from anexa_core.train import loop as training

    imported = time.time()
    phases: dict[str, dict[str, float]] = {}
    timing: dict[str, float] = {}
    prepare = training.prepare_data

    def timed_prepare(*args, **kwargs):
        started = time.time()
        result = prepare(*args, **kwargs)
        timing["prepare_data_s"] = time.time() - started
        return result

    training.prepare_data = timed_prepare

    class Reporter(training.SilentReporter):
        def data_progress(self, phase, done, total, unit="bytes"):
            now = time.time()
            entry = phases.setdefault(phase, {"start": now, "end": now, "bytes": 0})
            entry["end"], entry["bytes"] = now, max(entry["bytes"], done)

        def start(self, total_steps, first_step, info):
            self.info = info
            self.ready = time.time()

        def step(self, step, loss, tokens_per_s):
            if step == 1:
                self.first_step = time.time()

    reporter = Reporter()
    overrides = dict(data=args.data, tokenizer=args.tokenizer, steps=1, eval_every=1, eval_batches=1, device="cpu")
    model_config, train_config = configs.resolve("seed", overrides=overrides)
    training.train(model_config, train_config, Path(args.out), reporter)
    print(
        json.dumps(
            {
                "import_s": imported - args.spawned,
                "prepare_data_s": timing["prepare_data_s"],
                "data_ready_s": reporter.ready - args.spawned,
                "first_step_s": reporter.first_step - args.spawned,
                "phases": {name: {"seconds": e["end"] - e["start"], "bytes": e["bytes"]} for name, e in phases.items()},
                "train_tokens": reporter.info["train_tokens"],
                "val_tokens": reporter.info["val_tokens"],
                "vocab_size": reporter.info["vocab_size"],
            }
        )
    )


def run_child(tokenizer: str, data: Path, out: Path, cache: Path) -> dict:
    env = {**os.environ, "ANEXA_CACHE": str(cache), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    spawned = time.time()
    process = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--child",
            "--data",
            str(data),
            "--tokenizer",
            tokenizer,
            "--out",
            str(out),
            "--spawned",
            repr(spawned),
        ],
        stdout=subprocess.PIPE,
        env=env,
    )
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {tokenizer} run failed")
    result = json.loads(stdout.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = usage.ru_maxrss * 1024 / MB  # Linux: kilobytes
    result["wall_s"] = time.time() - spawned
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mb", type=float, default=1024, help="corpus size (MB of UTF-8 text)")
    parser.add_argument("--files", type=int, default=16, help="files the corpus is split into")
    parser.add_argument("--tokenizers", default="char,bpe")
    parser.add_argument("--second-runs", type=int, default=3, help="second runs per tokenizer (the median is shown)")
    parser.add_argument(
        "--second-only",
        action="store_true",
        help="only the second runs, on the caches a previous run left in --workdir",
    )
    parser.add_argument("--workdir", type=Path, help="keep the corpus and caches here (default: a temp folder)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--spawned", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return

    work = args.workdir or Path(tempfile.mkdtemp(prefix="anexa-data-scale-"))
    corpus = work / "corpus"
    try:
        started = time.time()
        if not corpus.is_dir():
            size = generate(corpus, int(args.size_mb * MB), args.files)
            print(f"generated {size / MB:.0f} MB in {args.files} files in {time.time() - started:.0f}s", flush=True)
        size = sum(p.stat().st_size for p in corpus.iterdir())
        rows = {
            "corpus_mb": size / MB,
            "files": args.files,
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "runs": {},
        }
        for tokenizer in args.tokenizers.split(","):
            cache = work / f"cache-{tokenizer}"
            shutil.rmtree(work / "runs", ignore_errors=True)
            if args.second_only:
                first = None
            else:
                shutil.rmtree(cache, ignore_errors=True)
                first = run_child(tokenizer, corpus, work / f"runs/{tokenizer}-1", cache)
                print(f"{tokenizer} first run: {json.dumps(first)}", flush=True)
            seconds = []
            for repeat in range(args.second_runs):
                seconds.append(run_child(tokenizer, corpus, work / f"runs/{tokenizer}-2-{repeat}", cache))
                print(f"{tokenizer} second run: {json.dumps(seconds[-1])}", flush=True)
            second = sorted(seconds, key=lambda run: run["first_step_s"])[len(seconds) // 2]
            cache_mb = sum(p.stat().st_size for p in (cache / "tokens").glob("*.bin")) / MB
            rows["runs"][tokenizer] = {"first": first, "second": second, "second_runs": seconds, "cache_mb": cache_mb}
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2), encoding="utf-8")
        if args.second_only:
            print("| tokenizer | prepare_data s | s to loop start | s to first step done | import s | peak RSS MB |")
            print("|---|---:|---:|---:|---:|---:|")
            for tokenizer, run in rows["runs"].items():
                for second in run["second_runs"]:
                    print(
                        f"| {tokenizer} | {second['prepare_data_s']:.2f} | {second['data_ready_s']:.2f} | "
                        f"{second['first_step_s']:.2f} | {second['import_s']:.2f} | {second['peak_rss_mb']:.0f} |"
                    )
            return
        print()
        print("| tokenizer | phase (first run) | seconds | MB/s |")
        print("|---|---|---:|---:|")
        for tokenizer, run in rows["runs"].items():
            for phase, entry in run["first"]["phases"].items():
                rate = entry["bytes"] / MB / entry["seconds"] if entry["seconds"] else float("nan")
                print(f"| {tokenizer} | {phase} | {entry['seconds']:.1f} | {rate:.1f} |")
        print()
        print(
            "| tokenizer | tokens | token cache MB | 1st run: peak RSS MB | 1st run: prepare_data s "
            "| 2nd run: prepare_data s | 2nd run: s to loop start / first step done (import s) "
            "| 2nd run: peak RSS MB |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for tokenizer, run in rows["runs"].items():
            first, second = run["first"], run["second"]
            tokens = first["train_tokens"] + first["val_tokens"]
            print(
                f"| {tokenizer} | {tokens:,} | {run['cache_mb']:.0f} | {first['peak_rss_mb']:.0f} | "
                f"{first['prepare_data_s']:.1f} | {second['prepare_data_s']:.2f} | "
                f"{second['data_ready_s']:.1f} / {second['first_step_s']:.1f} ({second['import_s']:.1f}) | "
                f"{second['peak_rss_mb']:.0f} |"
            )
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
