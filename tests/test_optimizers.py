"""Optimizer plugins, precision, the time budget (--minutes) and the loss plot."""

import dataclasses
import json
import time

import pytest
import safetensors.torch
import torch
from helpers import tiny_model

from anexa_core import plugins, testing
from anexa_core.config import ModelConfig, TrainConfig, resolve
from anexa_core.device import uses_bf16
from anexa_core.io import checkpoint
from anexa_core.train.loop import SilentReporter, train
from anexa_core.train.optim import make_optimizer
from anexa_core.train.resume import resume_configs
from anexa_core.train.step import lr_at

SMALL = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)


def _config(data, **changes):
    values = dict(
        data=str(data),
        steps=8,
        batch_size=4,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=2,
        eval_every=4,
        eval_batches=2,
        save_every=4,
        device="cpu",
    )
    return TrainConfig(**{**values, **changes})


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_optimizers_conform(name):
    testing.check_optimizer(plugins.get("optimizers", name))


@pytest.mark.parametrize("blocks", ["gpt2", "llama"])
def test_muon_takes_exactly_the_hidden_matrices(blocks):
    model = tiny_model(blocks=blocks, tie_embeddings=False)
    optimizer = make_optimizer(model, TrainConfig(optimizer="muon"))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    names = {id(p): n for n, p in model.named_parameters()}
    in_muon = {names[id(p)] for group in muon.param_groups for p in group["params"]}
    in_adamw = {names[id(p)] for group in adamw.param_groups for p in group["params"]}
    expected = {n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2 and "wpe" not in n}
    assert in_muon == expected and in_muon
    assert {"wte.weight", "lm_head.weight"} <= in_adamw and not in_muon & in_adamw
    assert all(p.dim() == 2 for group in muon.param_groups for p in group["params"])


def test_muon_trains_resumes_bit_for_bit_and_lowers_the_loss(sherlock_path, tmp_path):
    config = _config(sherlock_path, optimizer="muon", steps=8)
    straight = train(SMALL, config, tmp_path / "straight")
    metrics = [json.loads(x) for x in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] and straight.step == 8
    train(SMALL, _config(sherlock_path, optimizer="muon", steps=4, decay_steps=8), tmp_path / "split")
    train(*resume_configs(tmp_path / "split", {"steps": 8}), tmp_path / "split", resume=True)
    a = safetensors.torch.load_file(tmp_path / "straight" / "model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "split" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_precision_auto_uses_bf16_only_where_the_hardware_has_it(monkeypatch):
    cpu = torch.device("cpu")
    assert not uses_bf16(cpu, "fp32") and uses_bf16(cpu, "bf16")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": False, "amx_bf16": False})
    assert not uses_bf16(cpu, "auto")
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    assert uses_bf16(cpu, "auto")


def test_bf16_training_follows_the_fp32_loss_curve(sherlock_path, tmp_path):
    """Autocast keeps weights, optimizer state and the loss in float32: 40 steps land within noise."""
    config = _config(sherlock_path, steps=40, eval_every=40, eval_batches=8, save_every=40)
    fp32 = train(SMALL, dataclasses.replace(config, precision="fp32"), tmp_path / "fp32")
    bf16 = train(SMALL, dataclasses.replace(config, precision="bf16"), tmp_path / "bf16")
    assert bf16.val_loss == pytest.approx(fp32.val_loss, abs=0.03), (fp32.val_loss, bf16.val_loss)


def test_the_schedule_follows_the_time_budget():
    config = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, minutes=5)
    assert lr_at(5, config, time_fraction=0.0) == pytest.approx(0.6)  # warmup still counts steps
    assert lr_at(500, config, time_fraction=0.0) == 1.0
    assert lr_at(500, config, time_fraction=0.5) == pytest.approx(0.55)
    assert lr_at(500, config, time_fraction=1.0) == lr_at(9000, config, time_fraction=1.7) == pytest.approx(0.1)
    _model, train_config = resolve("seed", overrides=dict(minutes=5))
    assert train_config.steps is None, "a budget without --steps runs until the clock says stop"
    assert resolve("seed", overrides=dict(minutes=5, steps=10))[1].steps == 10


class StepClock(SilentReporter):
    """Records when each step and each evaluation ended, in seconds since training started."""

    def start(self, total_steps, first_step, info):
        self.started, self.ends, self.evaluations = time.perf_counter(), [], []

    def step(self, step, loss, tokens_per_s):
        self.ends.append(time.perf_counter() - self.started)

    def evaluated(self, metrics):
        self.evaluations.append(time.perf_counter() - self.started)


def test_minutes_ends_on_time_with_a_final_evaluation_and_checkpoint(sherlock_path, tmp_path):
    """The run stops at the last step after which one more and the final evaluation would not fit the budget,
    then evaluates and saves, on time. (On a busy machine steps and the evaluation's estimate grow, so the
    last step may end well before the budget: "on time" is judged by the steps' own clock, with slack.)"""
    budget_s = 3.0
    config = _config(
        sherlock_path, minutes=budget_s / 60, steps=None, eval_every=10**9, save_every=10**9, warmup_steps=0
    )
    clock = StepClock()
    result = train(SMALL, config, tmp_path, reporter=clock)
    assert len(clock.ends) == result.step >= 2 and len(clock.evaluations) == 1
    step_s = clock.ends[-1] - clock.ends[-2]
    assert clock.ends[-2] < budget_s and clock.ends[-1] >= budget_s / 2, clock.ends[-3:]  # neither late nor quitting
    evaluated = clock.evaluations[0]  # the final evaluation, within the budget (the checkpoint and plot follow)
    assert evaluated < budget_s + max(0.25, 2 * step_s), (evaluated, clock.ends[-3:])
    meta = checkpoint.read_metadata(tmp_path / "model.safetensors")
    assert meta["step"] == result.step and meta["val_loss"] == pytest.approx(result.val_loss)
    (record,) = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == result.step and record["lr"] < config.lr  # the decay followed the clock
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_anexa_plot_draws_several_runs(sherlock_path, tmp_path):
    from typer.testing import CliRunner

    from anexa_cli.main import app

    for name in ("a", "b"):
        train(SMALL, _config(sherlock_path, steps=4, eval_every=2), tmp_path / name)
    out = tmp_path / "both.png"
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    missing = CliRunner().invoke(app, ["plot", str(tmp_path / "nothing")])
    assert missing.exit_code == 2 and f"{tmp_path / 'nothing'} does not exist: pass the folder" in missing.output
    (tmp_path / "empty").mkdir()
    empty = CliRunner().invoke(app, ["plot", str(tmp_path / "empty")])
    assert empty.exit_code == 2 and f"{tmp_path / 'empty'} holds no metrics.jsonl: pass the folder" in empty.output
