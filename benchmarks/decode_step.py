"""Where one batch-1 decoding step goes: the weights' matrix-vector products, the rest of the model's
forward pass, and the engine around it, beside what this machine's memory can stream.

    .venv/bin/python benchmarks/decode_step.py --preset small [--threads 1]
    .venv/bin/python benchmarks/decode_step.py RUN --prompt 512 [--threads 1]      # an imported model

The model is decoded as ``generate`` decodes it (``load``'s float32 CPU layout, greedy, a KV cache). Four
numbers, each the best of ``--repeats``:

- **step**: ms per generated token through the engine, ``--new`` tokens after a ``--prompt``-token
  prompt, the prompt's prefill subtracted (a run of 16 tokens timed apart);
- **forward**: the model's forward pass alone for one token at that position, with the KV cache;
- **linears**: every ``nn.Linear`` of the model applied once to a random vector, in the model's order, its
  weights as stored (what a step must read: their bytes over this time is the GB/s shown);
- **read bandwidth**: summing a 512 MB tensor — the rate at which one thread can read memory at all.

``step − forward`` is the engine (picking, bookkeeping), ``forward − linears`` the attention, norms,
activations, Python and dispatch. ``weights / read bandwidth`` bounds a step from below however little
else it did.
"""

import argparse
import json
import time

import torch
import torch.nn.functional as F


def best_seconds(function, repeats: int) -> float:
    function()
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - started)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?")
    parser.add_argument("--preset")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args()
    if bool(args.run) == bool(args.preset):
        parser.error("give a RUN or --preset, not both")
    if args.threads:
        torch.set_num_threads(args.threads)
    from anexa_core.infer.generation import generate_ids
    from anexa_core.measure.bench import _Greedy as Greedy
    from anexa_core.measure.bench import decoding_model
    from anexa_core.model.cache import KVCache

    model = decoding_model(args.preset, args.run, None, torch.device("cpu"))
    vocab = model.config.vocab_size
    if args.prompt + 16 + args.new > model.config.block_size:
        parser.error(f"--prompt + 16 + --new must fit the context ({model.config.block_size}): no context shift")
    prompt = torch.randint(vocab, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    def decode(new: int):
        return lambda: list(generate_ids(model, prompt, new, Greedy()))

    short, long = best_seconds(decode(16), args.repeats), best_seconds(decode(16 + args.new), args.repeats)
    step_ms = (long - short) / args.new * 1e3

    cache = KVCache(model.config.block_size)
    token = torch.tensor([[prompt[-1]]])
    with torch.no_grad():
        model(torch.tensor([prompt]), cache=cache, last_only=True)

        def forward():
            for _ in range(10):
                model(token, cache=cache, last_only=True)

        forward_ms = best_seconds(forward, 1) / 10 * 1e3  # 20 positions past the prompt, no more
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
        inputs = [torch.randn(1, m.in_features) for m in linears]

        def apply_linears():
            for module, x in zip(linears, inputs, strict=True):
                F.linear(x, module.weight, module.bias)

        linears_ms = best_seconds(apply_linears, args.repeats) * 1e3
    weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in linears)
    big = torch.ones(512 * 1024 * 1024 // 4)
    read_gb_s = big.numel() * 4 / best_seconds(big.sum, args.repeats) / 1e9
    result = {
        "model": args.preset or args.run,
        "threads": torch.get_num_threads(),
        "prompt": args.prompt,
        "step_ms": round(step_ms, 2),
        "tokens_per_s": round(1e3 / step_ms, 1),
        "forward_ms": round(forward_ms, 2),
        "linears_ms": round(linears_ms, 2),
        "linear_weights_mb": round(weight_bytes / 1e6, 1),
        "linears_gb_s": round(weight_bytes / linears_ms / 1e6, 1),
        "read_gb_s": round(read_gb_s, 1),
        "engine_ms": round(step_ms - forward_ms, 2),
        "forward_besides_linears_ms": round(forward_ms - linears_ms, 2),
        "bound_tokens_per_s": round(read_gb_s * 1e9 / weight_bytes, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
