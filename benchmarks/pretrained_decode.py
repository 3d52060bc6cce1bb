"""Decoding a pretrained 135M model at batch 1: Anexa vs transformers' `generate` on the same weights.

    .venv/bin/python benchmarks/pretrained_decode.py RUN GGUF [--prompt 512] [--new 256] [--repeats 3] [--threads N]

RUN is the `anexa import` of GGUF (SmolLM2-135M-Instruct); transformers loads the same GGUF file. Both
decode greedily in float32 with a KV cache, ``--new`` tokens after a ``--prompt``-token prompt, the
same number of threads, timed alternately (Anexa, transformers, Anexa, …; the median of ``--repeats``).
The time to the first token (the prompt's forward pass) is measured apart, and decode tokens/s are the
other ``--new`` − 1 tokens over the rest of the time.
Also reported: the memory-bandwidth bound — the weight bytes a decoding step reads (every parameter
once, float32; the tied embedding counts once, as the head) divided by this machine's measured copy
bandwidth — and each side's tokens/s as a fraction of it.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

import torch


def copy_bandwidth(megabytes: int = 256, repeats: int = 5) -> float:
    """Bytes/s of a large tensor copy (read + write), the best of ``repeats``."""
    source = torch.empty(megabytes * 1024 * 1024 // 4)
    target = torch.empty_like(source)
    best = float("inf")
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        best = min(best, time.perf_counter() - started)
    return 2 * source.numel() * 4 / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("gguf")
    parser.add_argument("--prompt", type=int, default=512)
    parser.add_argument("--new", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads; 0: torch's default")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    from anexa_core.infer.generation import generate_ids
    from anexa_core.io.load import load

    loaded = load(args.run, "cpu")
    gguf = Path(args.gguf).resolve()
    started = time.perf_counter()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=str(gguf),
        dtype=torch.float32,  # absolute: a bare name is looked up in the cwd first
    ).eval()
    reference_load_s = time.perf_counter() - started
    prompt = torch.randint(100, 40000, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()

    class Greedy:
        def pick(self, logits, context, generator=None):
            return logits.argmax(-1, keepdim=True)

    def anexa(new: int) -> list[int]:
        return list(generate_ids(loaded.model, prompt, new, Greedy()))

    def hf(new: int) -> list[int]:
        with torch.no_grad():
            out = reference.generate(
                torch.tensor([prompt]), max_new_tokens=new, min_new_tokens=new, do_sample=False,
                eos_token_id=None, pad_token_id=0,
            )  # fmt: skip
        return out[0, len(prompt) :].tolist()

    times: dict[str, list[float]] = {"anexa": [], "transformers": []}
    first: dict[str, list[float]] = {"anexa": [], "transformers": []}
    outputs = {}
    for _ in range(args.repeats):
        for name, run in (("anexa", anexa), ("transformers", hf)):
            started = time.perf_counter()
            run(1)  # the prompt's forward pass and the first token
            first[name].append(time.perf_counter() - started)
            started = time.perf_counter()
            outputs[name] = run(args.new)
            times[name].append(time.perf_counter() - started)
    parameters = loaded.model.num_parameters()
    bandwidth = copy_bandwidth()
    bound = bandwidth / (parameters * 4)  # tokens/s if each step only streamed the float32 weights once
    rows = {}
    for name, seconds in times.items():
        median, prefill = statistics.median(seconds), statistics.median(first[name])
        decode_rate = (args.new - 1) / max(median - prefill, 1e-9)  # tokens/s after the first
        rows[name] = {"seconds": round(median, 2), "first_token_s": round(prefill, 2),
                      "decode_tokens_per_s": round(decode_rate, 1), "end_to_end_tokens_per_s": round(args.new / median, 1),
                      "decode_of_bandwidth_bound": round(decode_rate / bound, 3)}  # fmt: skip
    report = {
        "threads": torch.get_num_threads(), "prompt_tokens": args.prompt, "new_tokens": args.new,
        "parameters": parameters, "copy_bandwidth_gb_s": round(bandwidth / 1e9, 1),
        "bandwidth_bound_tokens_per_s": round(bound, 1), "rows": rows,
        "decode_ratio_anexa_over_transformers": round(
            rows["anexa"]["decode_tokens_per_s"] / rows["transformers"]["decode_tokens_per_s"], 2),
        "same_tokens": outputs["anexa"] == outputs["transformers"], "transformers_load_s": round(reference_load_s, 1),
    }  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
