"""Load test for ``anexa serve``: requests/s and time to first token with 1 and 8 concurrent streaming clients.

    .venv/bin/python benchmarks/serve_load.py                      # trains a seed-preset model briefly
    .venv/bin/python benchmarks/serve_load.py --model runs/sherlock-seed --parallel 8

It starts ``anexa serve`` as a subprocess on 127.0.0.1 (a free port), then for each concurrency level
runs that many clients at once, each sending ``--requests`` streaming ``/v1/completions`` requests one
after another (``max_tokens`` = ``--tokens``, a distinct seed each). Time to first token (TTFT) is
from sending the request to receiving the first chunk with text. All traffic stays on the loopback
interface and the run is bounded by its request counts. The clients run in this process, so on a
small machine they take some CPU from the server; the numbers include that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
ANEXA = [sys.executable, "-m", "anexa_cli"]


def train_seed_model(out: Path, data: str, steps: int) -> Path:
    """A seed-preset model (4 layers, width 128, context 128, char tokenizer), trained ``steps`` steps."""
    subprocess.run(
        [
            *ANEXA,
            "train",
            "--data",
            data,
            "--preset",
            "seed",
            "--steps",
            str(steps),
            "--eval-every",
            str(steps),
            "--out",
            str(out),
            "--device",
            "cpu",
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return out


def start_server(model: Path, parallel: int, queue: int, threads: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [
            *ANEXA,
            "serve",
            "--model",
            str(model),
            "--port",
            "0",
            "--parallel",
            str(parallel),
            "--queue",
            str(queue),
            "--threads",
            str(threads),
            "--device",
            "cpu",
        ],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
    )
    line = process.stderr.readline()
    if " on http://" not in line:
        process.kill()
        raise SystemExit(f"server did not start: {line}{process.stderr.read()}")
    url = line.split(" on ")[1].split()[0]
    # Keep draining the server's log so it never blocks on a full pipe.
    threading.Thread(target=lambda: [None for _ in process.stderr], daemon=True).start()
    for _ in range(200):
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.05)
    process.kill()
    raise SystemExit("server did not answer /health")


async def one_request(http: httpx.AsyncClient, model: str, seed: int, tokens: int) -> tuple[float, float, int]:
    """(TTFT seconds, total seconds, completion tokens) of one streaming completion."""
    body = {
        "model": model,
        "prompt": "Sherlock Holmes",
        "max_tokens": tokens,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    first = None
    used = 0
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk["choices"] and chunk["choices"][0]["text"]:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                used = chunk["usage"]["completion_tokens"]
    return first if first is not None else float("nan"), time.perf_counter() - start, used


async def load(url: str, model: str, clients: int, requests: int, tokens: int) -> dict[str, float]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=clients)) as http:
        await one_request(http, model, 0, tokens)  # warm-up

        async def client(index: int) -> list[tuple[float, float, int]]:
            return [await one_request(http, model, 1000 * index + r, tokens) for r in range(requests)]

        start = time.perf_counter()
        results = [r for per_client in await asyncio.gather(*(client(i) for i in range(clients))) for r in per_client]
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    return {
        "clients": clients,
        "requests": len(results),
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_median_ms": 1000 * statistics.median(ttft),
        "ttft_p90_ms": 1000 * ttft[min(len(ttft) - 1, int(0.9 * len(ttft)))],
        "latency_median_ms": 1000 * statistics.median(r[1] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="run folder (default: train a seed-preset model briefly)")
    parser.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "sherlock.txt"),
        help="training text for the default model",
    )
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--clients", default="1,8", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=8, help="requests per client")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--parallel", type=int, default=8, help="anexa serve --parallel")
    parser.add_argument("--threads", type=int, default=1, help="anexa serve --threads (0: torch's default)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or train_seed_model(Path(tmp) / "seed", args.data, args.train_steps)
        process, url = start_server(model, args.parallel, queue=64, threads=args.threads)
        try:
            name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            rows = [asyncio.run(load(url, name, int(c), args.requests, args.tokens)) for c in args.clients.split(",")]
        finally:
            process.terminate()
            process.wait(10)

    import torch

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"--parallel {args.parallel} --threads {args.threads}, {args.requests} requests per client, max_tokens {args.tokens}"
    )
    print("| clients | requests | requests/s | tokens/s | TTFT median ms | TTFT p90 ms | latency median ms |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['clients']} | {row['requests']} | {row['requests_per_s']:.2f} | {row['tokens_per_s']:.0f} | "
            f"{row['ttft_median_ms']:.1f} | {row['ttft_p90_ms']:.1f} | {row['latency_median_ms']:.0f} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
