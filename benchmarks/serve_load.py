"""Load test for ``anexa serve``: aggregate decode tokens/s and time to first token with 1, 4, 8 and 16
concurrent streaming clients, at ``--threads 1`` and at the default.

    .venv/bin/python benchmarks/serve_load.py                      # trains a seed-preset model briefly
    .venv/bin/python benchmarks/serve_load.py --model runs/sherlock-seed --threads 1,0 --repeat 2
    .venv/bin/python benchmarks/serve_load.py --model runs/smol --tokens 64 --requests 2   # an imported model

For each ``--threads`` value (and each repeat) it starts ``anexa serve`` as a subprocess on 127.0.0.1 (a free
port), then for each concurrency level runs that many clients at once, each sending ``--requests``
streaming ``/v1/completions`` requests one after another ("Sherlock Holmes", ``max_tokens`` = ``--tokens``,
a distinct seed each, ``stream_options.include_usage``). Tokens/s is every completion token of the level
divided by its wall time; "× 1" compares it with one client. Time to first token (TTFT) is from sending
the request to the first chunk with text. The server decodes every running request as a row of one
batch (one forward pass per token for all of them), so more clients should mean more tokens/s.

All traffic stays on the loopback interface and the run is bounded by its request counts. The clients
run in this process, so on a small machine they take some CPU from the server; the numbers include that.
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
    command = [*ANEXA, "train", "--data", data, "--preset", "seed", "--steps", str(steps)]
    command += ["--eval-every", str(steps), "--out", str(out), "--device", "cpu"]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return out


def start_server(
    model: Path, parallel: int, queue: int, threads: int, device: str = "cpu"
) -> tuple[subprocess.Popen, str]:
    """``anexa serve`` on a free port; returns the process and its base URL once ``/health`` answers."""
    command = [*ANEXA, "serve", "--model", str(model), "--port", "0", "--parallel", str(parallel)]
    command += ["--queue", str(queue), "--threads", str(threads), "--max-tokens-cap", "4096", "--device", device]
    env = {key: value for key, value in os.environ.items() if key != "OMP_NUM_THREADS"}
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    assert process.stderr is not None
    line = process.stderr.readline()
    if " on http://" not in line:
        process.kill()
        raise SystemExit(f"server did not start: {line}{process.stderr.read()}")
    url = line.split(" on ")[1].split()[0]
    stderr = process.stderr
    threading.Thread(target=lambda: [None for _ in stderr], daemon=True).start()  # never block on a full pipe
    for _ in range(400):
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


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(fraction * (len(ordered) - 1)))]


async def load(url: str, model: str, clients: int, requests: int, tokens: int) -> dict[str, float]:
    """``clients`` concurrent clients, ``requests`` requests each, after one warm-up request."""
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        await one_request(http, model, 0, tokens)

        async def client(index: int) -> list[tuple[float, float, int]]:
            return [await one_request(http, model, 1000 * index + r, tokens) for r in range(requests)]

        start = time.perf_counter()
        results = [r for per_client in await asyncio.gather(*(client(i) for i in range(clients))) for r in per_client]
        wall = time.perf_counter() - start
    ttft = [r[0] for r in results]
    return {
        "clients": clients,
        "requests": len(results),
        "tokens_per_s": sum(r[2] for r in results) / wall,
        "ttft_p50_ms": 1000 * _percentile(ttft, 0.5),
        "ttft_p95_ms": 1000 * _percentile(ttft, 0.95),
        "latency_p50_ms": 1000 * statistics.median(r[1] for r in results),
    }


def run(model: Path, args: argparse.Namespace) -> list[dict[str, float]]:
    rows = []
    for threads in (int(t) for t in args.threads.split(",")):
        for repeat in range(args.repeat):
            process, url = start_server(model, args.parallel, queue=256, threads=threads, device=args.device)
            try:
                name = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
                for clients in (int(c) for c in args.clients.split(",")):
                    row = asyncio.run(load(url, name, clients, args.requests, args.tokens))
                    rows.append({"threads": threads, "repeat": repeat, **row})
                    print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
            finally:
                process.terminate()
                process.wait(10)
    return rows


def table(rows: list[dict[str, float]]) -> str:
    """Median over the repeats (with the range of tokens/s when there are several)."""
    lines = [
        "| --threads | clients | tokens/s | × 1 client | TTFT p50 ms | TTFT p95 ms | latency p50 ms |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    groups: dict[tuple[float, float], list[dict[str, float]]] = {}
    for row in rows:
        groups.setdefault((row["threads"], row["clients"]), []).append(row)
    for (threads, clients), runs in groups.items():
        speed = [r["tokens_per_s"] for r in runs]
        one = statistics.median(r["tokens_per_s"] for r in groups.get((threads, 1), runs))
        spread = f" ({min(speed):.0f}–{max(speed):.0f})" if len(runs) > 1 else ""
        median = {
            key: statistics.median(r[key] for r in runs) for key in ("ttft_p50_ms", "ttft_p95_ms", "latency_p50_ms")
        }
        lines.append(
            f"| {int(threads) or 'default'} | {int(clients)} | {statistics.median(speed):.0f}{spread} | "
            f"{statistics.median(speed) / one:.2f} | {median['ttft_p50_ms']:.0f} | {median['ttft_p95_ms']:.0f} | "
            f"{median['latency_p50_ms']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="run folder (default: train a seed-preset model briefly)")
    parser.add_argument(
        "--data",
        default=str(REPO.parent / "shared" / "data" / "sherlock.txt"),
        help="training text for the default model",
    )
    parser.add_argument("--train-steps", type=int, default=30)
    parser.add_argument("--clients", default="1,4,8,16", help="concurrency levels, comma-separated")
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--tokens", type=int, default=128, help="max_tokens per request")
    parser.add_argument("--parallel", type=int, default=16, help="anexa serve --parallel (rows)")
    parser.add_argument("--threads", default="1,0", help="anexa serve --threads values, comma-separated (0: default)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of every setting (the table shows medians)")
    parser.add_argument("--device", default="cpu", help="anexa serve --device (cpu, cuda)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or train_seed_model(Path(tmp) / "seed", args.data, args.train_steps)
        load_before = os.getloadavg()
        rows = run(model, args)
        load_after = os.getloadavg()

    import torch

    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"--parallel {args.parallel}, {args.requests} requests per client, max_tokens {args.tokens}, "
        f"load average {load_before[0]:.1f} before, {load_after[0]:.1f} after"
    )
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
