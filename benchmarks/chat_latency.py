"""How soon `anexa chat` is ready to type in, and how soon the first token of an answer appears.

    .venv/bin/python benchmarks/chat_latency.py RUN [--repeats 5]

Starts the real command in a subprocess with pipes, and times (wall-clock, from the process start) the
first "Prompt: ", then — after a prompt is sent — the first character after "Response: ". Reports the
medians of ``--repeats`` fresh processes.
"""

import argparse
import os
import select
import statistics
import subprocess
import sys
import time
from pathlib import Path


def read_until(process, marker: bytes, seen: bytearray, deadline: float) -> float:
    """Read stdout until ``marker`` has appeared and at least one byte follows it (if ``marker`` ends
    with a space, the byte after it is the first token); returns the time it arrived."""
    fd = process.stdout.fileno()
    while time.perf_counter() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.05)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise RuntimeError(f"chat exited: {seen.decode(errors='replace')}")
            seen.extend(chunk)
        index = seen.find(marker)
        if index >= 0 and (marker == b"Prompt: " or len(seen) > index + len(marker)):
            return time.perf_counter()
    raise TimeoutError(seen.decode(errors="replace"))


def once(run: str, prompt: str) -> tuple[float, float]:
    anexa = Path(sys.executable).with_name("anexa")
    started = time.perf_counter()
    process = subprocess.Popen(
        [str(anexa), "chat", "--model", run, "-n", "20", "--seed", "0"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    seen = bytearray()
    ready = read_until(process, b"Prompt: ", seen, started + 60) - started
    sent = time.perf_counter()
    process.stdin.write(prompt.encode() + b"\n")
    process.stdin.flush()
    del seen[:]
    first = read_until(process, b"Response: ", seen, sent + 60) - sent
    process.stdin.write(b"quit\n")
    process.stdin.flush()
    process.wait(timeout=60)
    return ready, first


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prompt", default="Sherlock Holmes said")
    args = parser.parse_args()
    results = [once(args.run, args.prompt) for _ in range(args.repeats)]
    ready = statistics.median(r[0] for r in results)
    first = statistics.median(r[1] for r in results)
    print(f"ready to type: {ready:.2f} s (median of {args.repeats}); first token after a prompt: {first * 1e3:.0f} ms")
    print("all:", [(round(a, 2), round(b * 1e3)) for a, b in results])


if __name__ == "__main__":
    main()
