"""A run with a pretrained model's architecture, tokenizer and chat template but random weights, for speed.

The GPU machine takes at most 64 MiB of files and reaches no network, while SmolLM2-135M is a 98 MB GGUF
file (541 MB once imported). Tokens/s of training and decoding do not depend on the weights' values, so
``gpu_check.sh`` carries only what a run holds besides its tensors and rebuilds those at random:

    python benchmarks/random_weights.py describe runs/smol .gpudata/smol.json   # here: metadata + shapes
    python3 benchmarks/random_weights.py build .gpudata/smol.json /tmp/smol      # there: a loadable run

Norm gains are ones, every other tensor N(0, 0.02²) from seed 0, in the dtype the run stored. Loss values
and generated text of such a run mean nothing; only its speed does.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

WEIGHTS = "model.safetensors"


def describe(run: Path, out: Path) -> None:
    """Write the run's safetensors metadata and each tensor's shape and dtype to ``out`` (JSON)."""
    with safe_open(str(run / WEIGHTS), "pt") as weights:
        tensors = {}
        for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
            sliced = weights.get_slice(name)
            tensors[name] = {"shape": list(sliced.get_shape()), "dtype": sliced.get_dtype()}
        record = {"metadata": weights.metadata(), "tensors": tensors}
    out.write_text(json.dumps(record))
    print(f"wrote {out}: {len(tensors)} tensors, {out.stat().st_size / 1e6:.1f} MB")


_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}


def build(description: Path, run: Path) -> None:
    """A run folder ``run`` from ``describe``'s file: the same metadata, random tensors of the same shapes."""
    record = json.loads(description.read_text())
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for name, spec in record["tensors"].items():
        dtype = _DTYPES[spec["dtype"]]
        if "norm" in name:
            tensors[name] = torch.ones(spec["shape"], dtype=dtype)
        else:
            tensors[name] = (torch.randn(spec["shape"], generator=generator) * 0.02).to(dtype)
    run.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(run / WEIGHTS), metadata=record["metadata"])
    print(f"built {run / WEIGHTS}: {sum(t.numel() for t in tensors.values()) / 1e6:.1f}M random parameters")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["describe", "build"])
    parser.add_argument("source", type=Path, help="describe: a run folder; build: describe's JSON")
    parser.add_argument("target", type=Path, help="describe: the JSON to write; build: the run folder")
    args = parser.parse_args()
    (describe if args.action == "describe" else build)(args.source, args.target)


if __name__ == "__main__":
    main()
