"""Fine-tuning SmolLM2-135M-Instruct on a laptop CPU: bits per character on Sherlock's validation split.

    .venv/bin/python benchmarks/finetune_cpu.py RUN --out DIR [--minutes 5] [--threads N]

RUN is the `anexa import` of SmolLM2-135M-Instruct. In one run, side by side on the same held-out text
(the last 10% of *The Adventures of Sherlock Holmes*, as `anexa train` splits it): the model zero-shot;
after ``--minutes`` of LoRA fine-tuning on the first 90%; after ``--minutes`` of full fine-tuning; and the
`fast` preset trained from scratch for ``--minutes``. Each training runs as the real `anexa train`
command in its own process (peak RSS polled every 0.2 s with psutil), and
reports its tokens/s. Bits per character come from `anexa eval` with its defaults (every token scored
once, in windows of the model's context that overlap by half: 8192 tokens for SmolLM2, 128 for the
`fast` preset). A JSON report is printed and written to DIR/report.json.
"""

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHERLOCK = (
    Path(os.environ.get("ANEXA_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")) / "sherlock.txt"
)


def anexa(*args: str, threads: int) -> tuple[str, float]:
    """Run `anexa ARGS` in a child process; its stdout+stderr and its peak RSS in MB (polled every 0.2 s)."""
    import psutil

    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen([str(Path(sys.executable).with_name("anexa")), *args], stdout=log,
                                   stderr=subprocess.STDOUT, env=env, text=True)  # fmt: skip
        watched, peak = psutil.Process(process.pid), 0
        while process.poll() is None:
            with contextlib.suppress(psutil.Error):
                peak = max(peak, watched.memory_info().rss)
            time.sleep(0.2)
        log.seek(0)
        output = log.read()
    if process.returncode != 0:
        raise RuntimeError(f"anexa {' '.join(args)} failed:\n{output[-2000:]}")
    return output, peak / 2**20


def held_out(text_file: Path, folder: Path) -> Path:
    """The last 10% of the book's characters, as a file (what the runs validate on, by characters), less
    any character the first 90% lacks (one "è"): the scratch model's character vocabulary, learnt from the
    first 90%, cannot encode it, and every row is scored on the same text."""
    text = text_file.read_text(encoding="utf-8")
    split = int(0.9 * len(text))
    seen = set(text[:split])
    path = folder / "sherlock-val.txt"
    path.write_text("".join(c for c in text[split:] if c in seen), encoding="utf-8")
    train = folder / "sherlock-train.txt"
    train.write_text(text[:split], encoding="utf-8")
    return path


def bits_per_char(run: Path, text: Path, threads: int) -> float:
    output, _ = anexa("eval", str(run), "--data", str(text), "--json", threads=threads)
    return json.loads(output[output.index("{") : output.rindex("}") + 1])["bits_per_char"]


def tokens_per_s(run: Path) -> float:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return sum(r["tokens_per_s"] for r in records) / len(records)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--out", required=True)
    parser.add_argument("--minutes", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    folder = Path(args.out)
    folder.mkdir(parents=True, exist_ok=True)
    val = held_out(SHERLOCK, folder)
    train_text = folder / "sherlock-train.txt"
    report: dict = {"minutes": args.minutes, "threads": args.threads, "rows": {}}
    report["rows"]["zero-shot"] = {"bits_per_char": bits_per_char(Path(args.run), val, args.threads)}
    budget = ["--minutes", str(args.minutes), "--eval-every", "25", "--device", "cpu"]
    runs = {
        "LoRA": ["--init-from", args.run, "--lora", "r=16,alpha=32,targets=q_proj,k_proj,v_proj,o_proj"],
        "full": ["--init-from", args.run],
        "fast preset, from scratch": ["--preset", "fast", "--eval-every", "250"],
    }
    for name, flags in runs.items():
        out = folder / re.sub(r"\W+", "-", name)
        extra = budget if name != "fast preset, from scratch" else ["--minutes", str(args.minutes), "--device", "cpu"]
        output, rss = anexa("train", "--data", str(train_text), *flags, *extra, "--out", str(out), "--overwrite",
                            threads=args.threads)  # fmt: skip
        report["rows"][name] = {
            "bits_per_char": bits_per_char(out, val, args.threads), "tokens_per_s": round(tokens_per_s(out), 1),
            "peak_rss_mb": round(rss), "last_line": output.strip().splitlines()[-1],
        }  # fmt: skip
        print(name, report["rows"][name], flush=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
