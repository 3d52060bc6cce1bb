"""One decoding step of the seed preset: a token through the KV cache against recomputing the window.

The prompt fills 96 of the 128 positions, so recomputing costs 97 positions and the cache one.
"""

import pytest
import torch

from anexa_core.measure import bench
from anexa_core.model.cache import KVCache

PROMPT_LEN = 96


@pytest.fixture(scope="module")
def model():
    return bench.bench_model("seed", "sdpa", torch.device("cpu"))[0].eval()


@pytest.fixture(scope="module")
def prompt():
    return torch.randint(bench.BENCH_VOCAB, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_decode_step_with_cache(benchmark, model, prompt):
    benchmark.group = f"decode one token after {PROMPT_LEN}"
    next_id = prompt[:, -1:]

    def prefilled():  # untimed: each round decodes the first new token after a fresh prefill
        cache = KVCache(model.config.block_size)
        model(prompt, cache=cache)
        return (next_id,), {"cache": cache, "last_only": True}

    logits, _ = benchmark.pedantic(model, setup=prefilled, rounds=50, warmup_rounds=2)
    expected, _ = model(torch.cat([prompt, next_id], dim=1), last_only=True)
    torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_decode_step_recompute(benchmark, model, prompt):
    benchmark.group = f"decode one token after {PROMPT_LEN}"
    window = torch.cat([prompt, prompt[:, -1:]], dim=1)
    logits, _ = benchmark(lambda: model(window, last_only=True))
    assert logits.shape == (1, 1, bench.BENCH_VOCAB)
