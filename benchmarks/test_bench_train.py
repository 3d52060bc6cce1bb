"""One full training step (forward, backward, clipping, AdamW) of the seed preset, per attention backend.

The seed preset's model at batch size 8 rather than 32, so a round stays well under a second on CPU.
"""

import torch

from anexa_core.measure import bench

BATCH_SIZE = 8


def test_train_step(benchmark, attention_name, skip_if_fallback):
    benchmark.group = f"train step (seed preset, batch {BATCH_SIZE})"
    device = torch.device("cpu")
    model, train_config = bench.bench_model("seed", attention_name, device, batch_size=BATCH_SIZE)
    config = model.config
    skip_if_fallback(torch.empty(BATCH_SIZE, config.n_head, config.block_size, config.head_dim))
    before = model.wte.weight.detach().clone()
    benchmark.pedantic(bench.make_train_step(model, train_config, device), rounds=5, warmup_rounds=1)
    assert not torch.equal(before, model.wte.weight), "the optimizer did not update the weights"
