"""torchrun data parallelism on CPU (gloo): two ranks with batch B follow one process with batch 2B."""

import json
import os
import subprocess
import sys
from pathlib import Path

import safetensors.torch
import torch
from helpers import TINY_MODEL_FLAGS

from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.train.loop import train

# float32: under bf16 autocast a batch split over two ranks rounds differently from one batch of both.
TINY = [
    *TINY_MODEL_FLAGS,
    "--dropout",
    "0",
    "--precision",
    "fp32",
]


def test_two_ranks_match_one_process_with_double_batch(sherlock_path, tmp_path):
    anexa = Path(sys.executable).with_name("anexa")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(anexa),
            "train",
            "--data",
            str(sherlock_path),
            *TINY,
            "--batch-size",
            "4",
            "--steps",
            "6",
            "--eval-every",
            "6",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "ddp"),
        ],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr.count("parameters ·") == 1  # only rank 0 reports
    assert result.stderr.count("saved ") == 1  # and says where it saved, once
    # Its throughput counts both ranks' tokens (6 steps × 2 ranks × 4 windows × 32 tokens) over the steps'
    # seconds; elapsed_s is rounded to 0.01 s, so the bounds allow that rounding (and 5%), not a factor 2.
    lines = (tmp_path / "ddp" / "steps.jsonl").read_text().splitlines()
    assert len(lines) == 1  # written by rank 0 alone
    line = json.loads(lines[0])
    seconds, per_s, tokens = line["elapsed_s"], line["tokens_per_s"], 6 * 2 * 4 * 32
    assert seconds > 0 and per_s * (seconds - 0.005) * 0.95 <= tokens <= per_s * (seconds + 0.005) * 1.05, line

    single = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.0)
    train(
        single,
        TrainConfig(data=str(sherlock_path), batch_size=8, steps=6, eval_every=6, device="cpu", precision="fp32"),
        tmp_path / "single",
    )
    ddp = safetensors.torch.load_file(tmp_path / "ddp" / "model.safetensors")
    one = safetensors.torch.load_file(tmp_path / "single" / "model.safetensors")
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
