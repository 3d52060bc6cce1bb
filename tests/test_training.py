"""The training loop on real text: loss falls, runs are deterministic, resume equals an uninterrupted run."""

import json

import pytest
import safetensors.torch
import torch

from anexa_core import checkpoint
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.training import SilentReporter, lr_at, resume_configs, train

SMALL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)


def _train_config(data, **changes):
    values = dict(data=str(data), steps=300, batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=20,
                  eval_every=100, eval_batches=8, save_every=300, device="cpu")
    return TrainConfig(**{**values, **changes})


def test_val_loss_falls_below_bound_on_sherlock(sherlock_path, tmp_path):
    """150 steps of a 0.1M model. On Sherlock a unigram model scores 3.11 nats/char and a bigram model
    2.42 (both measured on the book); under 2.7 means the model already uses context (measured: 2.49)."""
    result = train(SMALL, _train_config(sherlock_path, steps=150, eval_every=50, save_every=150), tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [50, 100, 150]
    assert metrics[0]["val_loss"] > metrics[1]["val_loss"] > metrics[2]["val_loss"]
    assert result.val_loss < 2.7
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "train_state.safetensors").is_file()


class _Interrupt(SilentReporter):
    """Simulates Ctrl-C during the step after ``at``."""

    def __init__(self, at):
        self.at = at

    def step(self, step, loss, tokens_per_s):
        if step > self.at:
            raise KeyboardInterrupt


def test_resume_equals_uninterrupted_run(sherlock_path, tmp_path):
    config = _train_config(sherlock_path, steps=12, eval_every=6, save_every=6, warmup_steps=3)
    model_config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, dropout=0.1)
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(model_config, config, straight)
    with pytest.raises(KeyboardInterrupt):
        train(model_config, config, split, reporter=_Interrupt(at=8))  # last checkpoint: step 6
    resumed_model, resumed_train = resume_configs(split, {})
    assert resumed_train == config and resumed_model.dropout == 0.1
    train(resumed_model, resumed_train, split, resume=True)
    a = safetensors.torch.load_file(straight / "model.safetensors")
    b = safetensors.torch.load_file(split / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert (straight / "metrics.jsonl").read_text().count("\n") == 2
    lines = [json.loads(x) for x in (split / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(x) for x in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["val_loss"]) for m in lines] == [(m["step"], m["val_loss"]) for m in expected]


def test_same_seed_same_weights_other_seed_differs(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    runs = {}
    for name, seed in [("a", 5), ("b", 5), ("c", 6)]:
        train(tiny, _train_config(sherlock_path, steps=4, eval_every=4, save_every=4, seed=seed), tmp_path / name)
        runs[name] = safetensors.torch.load_file(tmp_path / name / "model.safetensors")["blocks.wpe.weight"]
    assert torch.equal(runs["a"], runs["b"]) and not torch.equal(runs["a"], runs["c"])


def test_resume_refuses_architecture_changes(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)
    with pytest.raises(AnexaError, match="cannot change n_layer"):
        resume_configs(tmp_path, {"n_layer": 3})
    with pytest.raises(AnexaError, match="already reached step 2"):
        train(*resume_configs(tmp_path, {}), tmp_path, resume=True)


def test_learning_rate_schedule():
    config = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.55)
    assert lr_at(100, config) == pytest.approx(0.1)
    assert all(lr_at(s, config) >= lr_at(s + 1, config) for s in range(10, 100))


def test_corpus_too_small_for_context(tmp_path):
    small = tmp_path / "tiny.txt"
    small.write_text("hello world, " * 5)
    with pytest.raises(AnexaError, match="too few for block_size 64"):
        train(SMALL, _train_config(small), tmp_path / "run")
    assert not (tmp_path / "run" / checkpoint.MODEL_FILE).exists()
