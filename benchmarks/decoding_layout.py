"""Decoding with the weights as `load` stores them on a CPU (`decoding_layout`) against the usual row-major
order, side by side in one process on the same weights.

    .venv/bin/python benchmarks/decoding_layout.py RUN [--rows 1,8] [--prompt 64] [--new 128] [--repeats 3] [--threads N]
    .venv/bin/python benchmarks/decoding_layout.py --preset small ...

RUN is an Anexa run (`anexa import` of SmolLM2-135M-Instruct, say); ``--preset`` takes a randomly
initialised preset instead (vocabulary of `anexa bench`). For each row count the engine decodes that many
requests together, greedily, ``--new`` tokens after different random ``--prompt``-token prompts, once
with each layout, alternately (column-major, row-major, column-major, …; the median of ``--repeats``).
Reported: tokens/s of each layout and their ratio, and whether both produced the same tokens.
"""

import argparse
import copy
import json
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?")
    parser.add_argument("--preset")
    parser.add_argument("--rows", default="1,8")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args()
    if bool(args.run) == bool(args.preset):
        parser.error("give a RUN or --preset, not both")
    if args.threads:
        torch.set_num_threads(args.threads)
    from anexa_core.infer.engine import Engine, Request
    from anexa_core.measure.bench import _Greedy as Greedy  # argmax only: `anexa bench generate`'s picker
    from anexa_core.measure.bench import decoding_model

    columns = decoding_model(args.preset, args.run, None, torch.device("cpu"))
    vocab = columns.config.vocab_size
    rows = copy.deepcopy(columns)  # the same tensors, tied head included, then every one row-major again
    with torch.no_grad():
        for parameter in rows.parameters():
            parameter.data = parameter.data.contiguous()
    moved = sum(not p.is_contiguous() for p in columns.parameters())
    generator = torch.Generator().manual_seed(0)

    def decode(model, n_rows: int) -> tuple[float, list[list[int]]]:
        prompts = [torch.randint(vocab, (args.prompt,), generator=generator).tolist() for _ in range(n_rows)]
        started = time.perf_counter()
        out: list[list[int]] = [[] for _ in range(n_rows)]
        for index, token in Engine(model, max_rows=n_rows).run([Request(p, args.new, Greedy()) for p in prompts]):
            out[index].append(token.id)
        return time.perf_counter() - started, out

    report = {"threads": torch.get_num_threads(), "column_major_weights": moved, "levels": []}
    for n_rows in [int(n) for n in args.rows.split(",")]:
        seconds: dict[str, list[float]] = {"columns": [], "rows": []}
        same = True
        for _ in range(args.repeats):
            generator.manual_seed(n_rows)
            took, first = decode(columns, n_rows)
            seconds["columns"].append(took)
            generator.manual_seed(n_rows)
            took, second = decode(rows, n_rows)
            seconds["rows"].append(took)
            same = same and first == second
        rate = {name: n_rows * args.new / statistics.median(s) for name, s in seconds.items()}
        report["levels"].append({
            "rows": n_rows, "tokens_per_s_column_major": round(rate["columns"], 1),
            "tokens_per_s_row_major": round(rate["rows"], 1),
            "ratio": round(rate["columns"] / rate["rows"], 2), "same_tokens": same,
        })  # fmt: skip
        print(json.dumps(report["levels"][-1]), flush=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
