"""Time to import the SmolLM2-135M-Instruct GGUF test model (Q4_1, Q8_0 embedding, 98 MB) with
:func:`anexa_core.io.gguf.read_gguf`, split into its parts, and to write it back as f32.

    .venv/bin/python benchmarks/gguf_import.py [PATH.gguf] [--repeat N]

PATH defaults to the test fixture in $ANEXA_TEST_MODELS (~/.cache/anexa-test-models), which the test suite
fetches. Each time is the best of N runs (default 3), in seconds.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf

from anexa_core.io.gguf import read_gguf, write_gguf

FIXTURE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def best_of(repeat: int, work: Callable[[], Any]) -> tuple[float, Any]:
    times, result = [], None
    for _ in range(repeat):
        start = time.perf_counter()
        result = work()
        times.append(time.perf_counter() - start)
    return min(times), result


def main() -> None:
    folder = Path(os.environ.get("ANEXA_TEST_MODELS", Path.home() / ".cache" / "anexa-test-models"))
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", nargs="?", type=Path, default=folder / FIXTURE)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    if not args.path.is_file():
        raise SystemExit(f"{args.path} is missing: run the GGUF tests once to fetch it, or pass a path")

    parse, reader = best_of(args.repeat, lambda: gguf.GGUFReader(args.path))
    dequantize, _ = best_of(
        args.repeat, lambda: [gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors]
    )
    total, model = best_of(args.repeat, lambda: read_gguf(args.path))
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "f32.gguf"
        write, _ = best_of(
            1, lambda: write_gguf(target, model.hf_config, model.tensors, model.tokenizer, name="benchmark")
        )
        size = target.stat().st_size
    print(f"{args.path.name}: {args.path.stat().st_size / 1e6:.0f} MB, {model.metadata['tensor_types']}")
    rows = [
        ("gguf.GGUFReader (header, metadata, tensor index)", parse),
        ("dequantize every tensor (gguf.quants)", dequantize),
        ("read_gguf, all of it", total),
        (f"write_gguf f32 ({size / 1e6:.0f} MB)", write),
    ]
    for label, seconds in rows:
        print(f"  {label:<50} {seconds:6.2f} s")


if __name__ == "__main__":
    main()
