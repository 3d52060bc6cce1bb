"""The training loop on real text: loss falls, runs are deterministic, resume equals an uninterrupted run."""

import dataclasses
import itertools
import json
import math

import pytest
import safetensors.torch
import torch
from helpers import TINY_FLAGS, Watching
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.data.prepare import prepare_data
from anexa_core.errors import AnexaError
from anexa_core.io import checkpoint
from anexa_core.train.finetune import finetune_configs
from anexa_core.train.loop import SilentReporter, TrainingInterrupted, train
from anexa_core.train.resume import resume_configs
from anexa_core.train.step import Windows, estimate_loss, get_batch, lr_at

ADAMW_DEFAULTS = {"weight_decay": 0.1, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}

SMALL = ModelConfig(n_layer=2, n_head=4, n_embd=64, block_size=64)


def _train_config(data, **changes):
    values = dict(
        data=str(data),
        steps=300,
        batch_size=16,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=20,
        eval_every=100,
        eval_batches=8,
        save_every=300,
        device="cpu",
    )
    return TrainConfig(**{**values, **changes})


def test_val_loss_falls_below_bound_on_sherlock(sherlock_path, tmp_path):
    """150 steps of a 0.1M model. On Sherlock a unigram model scores 3.11 nats/char and a bigram model
    2.42 (both measured on the book). This seed reaches 2.487 (bf16 autocast on a 2-core AVX512-BF16 CPU;
    2.488 in fp32); seeds 1-7 reach 2.47-2.51. Regressions measured on the same seed: half the learning
    rate 2.53, no gradient clipping 2.88, post-LayerNorm blocks 3.11 — all above the bound."""
    result = train(SMALL, _train_config(sherlock_path, steps=150, eval_every=50, save_every=150), tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [50, 100, 150]
    assert metrics[0]["val_loss"] > metrics[1]["val_loss"] > metrics[2]["val_loss"]
    assert result.val_loss < 2.52
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
    assert resumed_train == dataclasses.replace(config, decay_steps=12, optimizer_options=ADAMW_DEFAULTS)
    assert resumed_model.dropout == 0.1
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


@pytest.mark.parametrize(
    "flags,options,named",
    [
        ({"n_layer": 3}, {}, "--n-layer"),
        ({"tokenizer": "bpe"}, {}, "--tokenizer"),
        ({"vocab_size": 512}, {}, "--vocab-size"),
        ({"blocks": "other"}, {}, "--blocks"),
        ({"block_size": 64}, {}, "--block-size"),
        ({"optimizer": "other"}, {}, "--optimizer"),
        ({"weight_decay": 0.0}, {}, "--weight-decay"),
        ({"bias": False}, {}, "--bias"),
        ({}, {"blocks": {"bias": "false"}}, "-o blocks.…"),
        ({}, {"optimizer": {"weight_decay": "0"}}, "-o optimizer.…"),
        ({"n_layer": 2, "tokenizer": "bpe"}, {}, "--n-layer, --tokenizer"),
    ],
)
def test_resume_refuses_what_would_change_the_checkpoints_meaning(sherlock_path, tmp_path, flags, options, named):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)
    with pytest.raises(AnexaError) as caught:
        resume_configs(tmp_path, flags, options)
    assert str(caught.value) == (
        f"cannot change {named} when resuming {tmp_path}: it would change what the "
        "checkpoint means; start a new run instead (without --resume)"
    )


@pytest.mark.parametrize(
    "flags,named",
    [
        ({"lr": 0.005}, "--lr 0.003"),
        ({"batch_size": 8}, "--batch-size 4"),
        ({"seq_len": 16}, "--seq-len 32"),  # no --seq-len: windows of the whole context
        ({"seed": 5}, "--seed 1"),
        ({"min_lr": 1e-5, "warmup_steps": 7}, "--min-lr 0.0003, --warmup-steps 0"),
    ],
)
def test_resume_refuses_settings_that_would_change_the_steps_already_run(sherlock_path, tmp_path, flags, named):
    """Found by a QA session: a resume took a new --lr, --batch-size, --seq-len, --seed or --min-lr without
    a word, and the model card's command then claimed the whole run was trained with them. A resume
    continues the run bit for bit; other settings are a new run from it."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=2, eval_every=2, save_every=2, batch_size=4, warmup_steps=0, seed=1)
    train(tiny, config, tmp_path)
    with pytest.raises(AnexaError) as caught:
        resume_configs(tmp_path, flags)
    typed = ", ".join(part.split(" ")[0] for part in named.split(", "))
    assert str(caught.value) == (
        f"cannot change {typed} when resuming {tmp_path} (it has {named}): a resume continues the run bit for "
        f"bit, and its model card's command must stay true; to train on with other settings, start a new run "
        f"from it: --init-from {tmp_path}"
    )
    same = {key: getattr(config, key) for key in flags}
    assert resume_configs(tmp_path, same)[1].lr == config.lr  # the run's own values are no change
    assert resume_configs(tmp_path, {"seq_len": 32})[1].lr == config.lr  # nor the context it trained on


def test_resume_allows_what_does_not_change_the_meaning(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)
    same = resume_configs(tmp_path, {"n_layer": 1, "steps": 4, "attention": "math", "tokenizer": "char"})
    assert same[0].attention == "math" and same[1].steps == 4
    # Shorthands for plugin options are compared with the option recorded for the plugin.
    unchanged = resume_configs(tmp_path, {"weight_decay": 0.1, "beta2": 0.99, "bias": True, "n_head": None})
    assert unchanged[1].optimizer_options == ADAMW_DEFAULTS and unchanged[0].blocks_options == {
        "bias": True,
        "gelu": "exact",
    }
    assert unchanged[0].n_head == 2  # a flag not given (None) changes nothing
    other = resume_configs(tmp_path, {"attention": "sdpa"}, {"attention": {}})
    assert other[0].attention == "sdpa" and other[0].attention_options == {"backend": "auto"}
    with pytest.raises(AnexaError, match=r"^unknown setting 'frobnicate' in flags: choose one of "):
        resume_configs(tmp_path, {"frobnicate": 1})
    with pytest.raises(AnexaError, match="already reached step 2"):
        train(*resume_configs(tmp_path, {}), tmp_path, resume=True)


def test_the_same_data_or_base_is_the_same_text_or_the_same_file(tmp_path, monkeypatch):
    from anexa_core.train.resume import _same

    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("notes")
    (tmp_path / "other.txt").write_text("notes")
    for key in ("data", "init_from"):
        assert _same(key, "sherlock", "sherlock") and _same(key, ["a.txt", "b"], ["a.txt", "b"])  # no such files
        assert _same(key, "./notes.txt", "notes.txt") and _same(key, str(tmp_path / "notes.txt"), "notes.txt")
        assert not _same(key, "other.txt", "notes.txt") and not _same(key, "sherlock", "tinyshakespeare")
        assert not _same(key, ["notes.txt"], ["notes.txt", "other.txt"]) and not _same(key, "notes.txt", None)
    assert not _same("lr", "./notes.txt", "notes.txt") and _same("lr", 0.001, "0.001")  # other keys: as text


def test_resume_refuses_other_data_but_takes_the_same_files_named_another_way(sherlock_path, tmp_path):
    """Found by a QA session: a resume on other text made the model card's data and command false (it named
    the new text for every step); other data is a new run from this one."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path / "run")
    other = tmp_path / "other.txt"
    other.write_text(sherlock_path.read_text(encoding="utf-8"), encoding="utf-8")
    for given in ({"data": str(other)}, {"data": [str(sherlock_path), str(other)]}, {"data_glob": ["*.md"]}):
        with pytest.raises(AnexaError) as refused:
            resume_configs(tmp_path / "run", {**given, "steps": 4})
        flag = "--data" if "data" in given else "--glob"
        assert str(refused.value).startswith(f"cannot change {flag} when resuming {tmp_path / 'run'} (it has {flag} ")
        assert str(refused.value).endswith(f"start a new run from it: --init-from {tmp_path / 'run'}")
    (tmp_path / "link.txt").symlink_to(sherlock_path)
    for same in (
        str(tmp_path / "link.txt"),
        str(sherlock_path.parent / "." / sherlock_path.name),
        [str(sherlock_path)],
    ):
        assert resume_configs(tmp_path / "run", {"data": same, "steps": 4})[1].steps == 4, same


def test_learning_rate_schedule_at_every_boundary():
    config = TrainConfig(steps=100, lr=1.0, min_lr=0.1, warmup_steps=10)
    assert lr_at(0, config) == pytest.approx(0.1)  # first step: 1/10 of the way up
    assert lr_at(8, config) == pytest.approx(0.9)
    assert lr_at(9, config) == 1.0  # last warmup step reaches the peak
    assert lr_at(10, config) == 1.0  # first decay step: still the peak, never above
    assert lr_at(55, config) == pytest.approx(0.55)  # halfway through the decay: the midpoint
    assert lr_at(99, config) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 89 / 90)))  # last step
    assert lr_at(100, config) == pytest.approx(0.1)  # end of the decay: min_lr
    assert lr_at(101, config) == lr_at(5000, config) == pytest.approx(0.1)  # after the horizon: min_lr
    values = [lr_at(step, config) for step in range(0, 200)]
    assert max(values) == 1.0 and min(values) == pytest.approx(0.1)
    assert all(a <= b for a, b in itertools.pairwise(values[:11]))  # warmup rises
    assert all(a >= b for a, b in itertools.pairwise(values[10:]))  # then it only falls
    clock = TrainConfig(steps=None, minutes=1.0, lr=1.0, min_lr=0.0, warmup_steps=10)
    assert lr_at(3, clock) == pytest.approx(0.4) and lr_at(10, clock, time_fraction=0.5) == pytest.approx(0.5)
    with pytest.raises(
        ValueError, match=r"^a schedule without decay_steps or steps follows the clock: pass time_fraction$"
    ):
        lr_at(10, clock)  # past the warmup, a schedule by the clock needs to know the time


def test_schedule_horizon_is_decay_steps_and_no_warmup_starts_at_the_peak():
    config = TrainConfig(steps=50, decay_steps=20, lr=2.0, min_lr=0.0, warmup_steps=0)
    assert lr_at(0, config) == 2.0
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(20, config) == lr_at(49, config) == 0.0


def test_a_one_step_decay_after_warmup_goes_from_the_peak_to_min_lr():
    config = TrainConfig(steps=4, decay_steps=4, lr=1.0, min_lr=0.25, warmup_steps=3)
    assert [lr_at(step, config) for step in range(5)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0, 1.0, 0.25]


def test_extending_steps_on_resume_equals_a_run_with_that_many_steps_and_the_same_decay(sherlock_path, tmp_path):
    """README: `--resume RUN --steps N` continues past the first run's schedule at min_lr, exactly as one
    uninterrupted run of N steps whose decay ended where the first run's did."""
    model_config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    first = _train_config(sherlock_path, steps=8, eval_every=4, save_every=4, warmup_steps=2)
    train(model_config, first, tmp_path / "extended")
    train(*resume_configs(tmp_path / "extended", {"steps": 12}), tmp_path / "extended", resume=True)
    straight = dataclasses.replace(first, steps=12, decay_steps=8)
    train(model_config, straight, tmp_path / "straight")
    a = safetensors.torch.load_file(tmp_path / "straight" / "model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "extended" / "model.safetensors")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    lrs = [json.loads(line)["lr"] for line in (tmp_path / "extended" / "metrics.jsonl").read_text().splitlines()]
    assert lrs[-1] == pytest.approx(first.min_lr)  # no jump back up when the horizon would have moved


def test_a_run_folder_is_never_overwritten_without_overwrite(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=4, eval_every=4, save_every=4), tmp_path)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(AnexaError) as error:
        train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)
    assert str(error.value) == (
        f"{tmp_path} already holds a trained run: continue it with `anexa train --resume "
        f"{tmp_path}`, replace it with --overwrite, or pass another --out"
    )
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    # A model without a training state (what `anexa import` writes) has nothing to resume: the advice is a
    # fine-tune, which the newcomer's `--resume` was refused with "holds no train_state.safetensors".
    imported = tmp_path.parent / f"{tmp_path.name}-imported"
    imported.mkdir()
    (imported / "model.safetensors").write_bytes(before["model.safetensors"])
    with pytest.raises(AnexaError) as error:
        train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), imported)
    assert str(error.value) == (
        f"{imported} already holds a model: fine-tune it into another folder with `anexa train --init-from "
        f"{imported} --out NEW_RUN`, replace it with --overwrite, or pass another --out"
    )
    with pytest.raises(AnexaError) as error:
        checkpoint.load_train_state(imported)
    assert str(error.value) == (
        f"{imported} holds a model but no train_state.safetensors (an imported model has none): train it further "
        f"with `anexa train --init-from {imported} --out NEW_RUN`"
    )
    assert sorted(p.name for p in imported.iterdir()) == ["model.safetensors"]
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path, overwrite=True)
    assert checkpoint.read_metadata(tmp_path / "model.safetensors")["step"] == 2
    assert [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [2]


def test_a_shorthand_the_chosen_plugin_lacks_is_named_as_the_setting_the_user_gave(sherlock_path, tmp_path):
    """`--vocab-size 300` with the char tokenizer said "tokenizer char takes no options"."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    cases = [
        (tiny, {"tokenizer": "char", "tokenizer_options": {"vocab_size": 300}}, "vocab_size", "tokenizer char"),
        (dataclasses.replace(tiny, blocks="llama", blocks_options={"bias": True}), {}, "bias", "blocks llama"),
    ]
    for model_config, changes, key, plugin in cases:
        with pytest.raises(AnexaError) as error:
            train(model_config, _train_config(sherlock_path, steps=1, **changes), tmp_path / "run")
        assert str(error.value) == (
            f"{key} does not apply to {plugin}, which has no such option: drop it from the command line or the "
            "config file"
        )
    # A near miss: an option the plugin has is no shorthand mistake, and a misspelt one is the plugin's error.
    with pytest.raises(AnexaError) as error:
        train(tiny, _train_config(sherlock_path, steps=1, tokenizer_options={"vocab_sise": 3}), tmp_path / "run")
    assert str(error.value) == "tokenizer char takes no options, got 'vocab_sise'"
    assert not (tmp_path / "run").exists()


def test_a_new_run_never_replaces_a_model_anexa_did_not_write_nor_its_own_base(sherlock_path, tmp_path):
    """A Hugging Face folder (its model.safetensors has no Anexa metadata) and the model being fine-tuned
    are refused as --out even with --overwrite: a run there would replace them."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    hf = tmp_path / "hf"
    hf.mkdir()
    safetensors.torch.save_file({"lm_head.weight": torch.ones(2, 2)}, hf / "model.safetensors")
    (hf / "config.json").write_text("{}")
    before = {p.name: p.read_bytes() for p in hf.iterdir()}
    for overwrite in (False, True):
        with pytest.raises(AnexaError) as error:
            train(tiny, _train_config(sherlock_path, steps=2), hf, overwrite=overwrite)
        assert str(error.value) == (
            f"{hf} holds a model.safetensors that Anexa did not write (a Hugging Face model?): "
            "a run never replaces it; pass another --out"
        )
        assert {p.name: p.read_bytes() for p in hf.iterdir()} == before
    run = tmp_path / "run"
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    spelled_otherwise = tmp_path / "hf" / ".." / "run"
    with pytest.raises(AnexaError) as error:
        train(tiny, _train_config(sherlock_path, steps=2, init_from=str(spelled_otherwise)), run, overwrite=True)
    assert (
        str(error.value)
        == f"--out {run} is the model of --init-from: fine-tune it into another folder with --out NEW_RUN"
    )
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # A folder holding no run but other things — the user's, the folder of all runs — even with --overwrite.
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    (home / "notes.txt").write_text("mine")
    (home / "loss.png").write_bytes(b"a plot of my own")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(AnexaError) as error:
        train(tiny, _train_config(sherlock_path, steps=2), tmp_path / "file", overwrite=True)
    assert str(error.value) == f"--out {tmp_path / 'file'} is a file: pass a folder for the run"
    for overwrite in (False, True):
        with pytest.raises(AnexaError) as error:
            train(tiny, _train_config(sherlock_path, steps=2), home, overwrite=overwrite)
        assert str(error.value) == (
            f"--out {home} is not empty and holds no run (notes.txt, project): pass a new or empty folder"
        )
    assert sorted(p.name for p in home.iterdir()) == ["loss.png", "notes.txt", "project"]
    # Near misses: a folder holding only what a run writes (metrics of a run killed before its first
    # checkpoint, a killed writer's temp file), a folder beside the base, and a run of Anexa's own with
    # --overwrite, are written.
    early = tmp_path / "early"
    early.mkdir()
    (early / "metrics.jsonl").write_text("")
    (early / ".model.safetensors.99999999.abcdefgh.tmp").write_bytes(b"")
    (early / ".early.99999999.abcdefgh.old").mkdir()  # an atomic folder's old copy: a writer's, not the user's
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), early)
    assert checkpoint.holds_a_run(early)
    model_config, tune_config, base = finetune_configs(str(run), {"data": str(sherlock_path), "steps": 2})
    train(model_config, dataclasses.replace(tune_config, eval_every=2, eval_batches=2), tmp_path / "tuned", base=base)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), run, overwrite=True)
    assert checkpoint.holds_a_run(tmp_path / "tuned") and not checkpoint.holds_foreign_weights(run)


def test_stop_request_saves_the_step_and_resume_equals_an_uninterrupted_run(sherlock_path, tmp_path):
    model_config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=10, eval_every=5, save_every=100, warmup_steps=2)
    calls = []

    def stop_at_step_3():
        calls.append(1)
        return len(calls) == 3

    with pytest.raises(TrainingInterrupted) as stopped:
        train(model_config, config, tmp_path / "stopped", stop_requested=stop_at_step_3)
    assert stopped.value.step == 3 and stopped.value.saved and stopped.value.out_dir == tmp_path / "stopped"
    assert str(stopped.value) == "interrupted at step 3"
    assert checkpoint.load_train_state(tmp_path / "stopped").step == 3
    train(*resume_configs(tmp_path / "stopped", {}), tmp_path / "stopped", resume=True)
    train(model_config, config, tmp_path / "straight")
    a = safetensors.torch.load_file(tmp_path / "straight" / "model.safetensors")
    b = safetensors.torch.load_file(tmp_path / "stopped" / "model.safetensors")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_the_best_checkpoint_is_kept_and_loaded_by_default(sherlock_path, tmp_path):
    """With a learning rate that first helps then diverges, the best step is not the last."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=60, eval_every=10, save_every=60, lr=3e-3, min_lr=3e-3, warmup_steps=0)
    result = train(tiny, config, tmp_path)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    best = min(metrics, key=lambda m: m["val_loss"])
    assert result.best_step == best["step"]
    best_meta = checkpoint.read_metadata(tmp_path / "best.safetensors")
    assert best_meta["step"] == best["step"] and best_meta["val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert checkpoint.read_metadata(tmp_path / "model.safetensors")["step"] == 60
    _, _, loaded = checkpoint.load_model(tmp_path)
    assert loaded["path"].endswith("best.safetensors") and loaded["step"] == best["step"]


def test_corpus_too_small_for_context(tmp_path):
    small = tmp_path / "tiny.txt"
    small.write_text("hello world, " * 5)
    with pytest.raises(AnexaError, match="too few for training windows of 64 "):
        train(SMALL, _train_config(small), tmp_path / "run")
    assert not (tmp_path / "run" / checkpoint.MODEL_FILE).exists()


def test_the_smallest_corpus_the_message_asks_for_trains_and_one_window_less_is_refused(tmp_path):
    """The validation split needs block_size + 2 tokens (one window and its next token, drawn at random);
    the error asks for 10 × that, since validation is the last tenth."""
    enough, short = tmp_path / "enough.txt", tmp_path / "short.txt"
    enough.write_text(("abcdefghij" * 100)[:660])  # 594 train / 66 val tokens for block_size 64
    short.write_text(("abcdefghij" * 100)[:650])  # 585 / 65
    train(SMALL, _train_config(enough, steps=2, eval_every=2, save_every=2), tmp_path / "enough")
    with pytest.raises(AnexaError) as error:
        train(SMALL, _train_config(short, steps=2, eval_every=2, save_every=2), tmp_path / "short")
    assert str(error.value) == (
        f"corpus {str(short)!r} has 650 tokens, too few for training windows of 64 (the last tenth is kept for "
        "validation): use a text of at least 660 tokens or --seq-len 63 or shorter"
    )


# --- which data each part of the loop reads -------------------------------------------------------


def test_the_logged_losses_are_each_splits_loss_recomputed_from_the_saved_model(sherlock_path, tmp_path):
    """val_loss is the model's loss on the validation split (the last 10% of the ids), train_loss on the
    training split, each over its own fixed windows: recomputing them from model.safetensors gives the
    logged numbers, and scoring the other split does not."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=20, eval_every=20, save_every=20, warmup_steps=2)
    train(tiny, config, tmp_path)
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    meta = checkpoint.read_metadata(tmp_path / "model.safetensors")
    model, tokenizer, _ = checkpoint.load_model(tmp_path / "model.safetensors")
    _, _, _, train_ids, val_ids = prepare_data(config, 32, tokenizer)
    cpu = torch.device("cpu")
    val = estimate_loss(model, val_ids, config, cpu, config.seed + 3)
    training = estimate_loss(model, train_ids, config, cpu, config.seed + 2)
    assert val == pytest.approx(logged["val_loss"], abs=1e-5) and val == pytest.approx(meta["val_loss"], abs=1e-6)
    assert training == pytest.approx(logged["train_loss"], abs=1e-5)
    for wrong in (
        estimate_loss(model, train_ids, config, cpu, config.seed + 3),
        estimate_loss(model, val_ids, config, cpu, config.seed + 2),
    ):
        assert abs(wrong - logged["val_loss"]) > 1e-3 and abs(wrong - logged["train_loss"]) > 1e-3


def test_the_split_is_the_first_90_percent_of_the_token_stream_and_the_rest(tmp_path):
    text = "".join(f"line {i}: the quick brown fox\n" for i in range(400))
    (tmp_path / "corpus.txt").write_text(text, encoding="utf-8")
    config = TrainConfig(data=str(tmp_path / "corpus.txt"))
    name, tokenizer, options, train_data, val_data = prepare_data(config, 32)
    train_ids, val_ids = train_data.ids, val_data.ids
    assert train_data.length == val_data.length == 32
    ids = tokenizer.encode(text)
    assert name == "corpus" and options == {}
    assert len(train_ids) == int(0.9 * len(ids))
    assert train_ids.tolist() == ids[: len(train_ids)] and val_ids.tolist() == ids[len(train_ids) :]


def test_batches_are_windows_and_their_next_tokens_anywhere_in_the_ids():
    """x is block_size consecutive ids, y the same window one later; every start that leaves room for y
    is drawn, the last one included."""
    ids = torch.arange(20, dtype=torch.int32) * 3  # values tell the positions apart
    generator = torch.Generator().manual_seed(0)
    starts = set()
    for _ in range(200):
        x, y = get_batch(ids.numpy(), 16, 4, generator)
        assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y[:, -1], x[:, -1] + 3)
        assert torch.equal(x, x[:, :1] + 3 * torch.arange(16))
        starts |= set((x[:, 0] // 3).tolist())
    assert starts == {0, 1, 2}  # 20 ids, windows of 16 + 1: starts 0..3 would leave y no last id at 3


def test_evaluation_is_the_mean_over_fixed_batches_and_leaves_the_mode_alone():
    from helpers import TINY, tiny_model

    model = tiny_model(seed=2, dropout=0.5).train()
    ids = torch.randint(0, TINY.vocab_size, (500,), generator=torch.Generator().manual_seed(1))
    config = TrainConfig(batch_size=3, eval_batches=4, precision="fp32")
    generator = torch.Generator().manual_seed(9)
    expected = []
    for _ in range(4):
        x, y = get_batch(ids, TINY.block_size, 3, generator)
        model.eval()
        expected.append(model(x, y)[1].item())
    model.train()
    windows = Windows(ids, TINY.block_size)
    loss = estimate_loss(model, windows, config, torch.device("cpu"), seed=9)
    assert loss == pytest.approx(sum(expected) / 4, rel=1e-6)
    assert model.training  # dropout back on for the next step
    assert estimate_loss(model.eval(), windows, config, torch.device("cpu"), seed=9) == loss and not model.training
    assert estimate_loss(model, windows, config, torch.device("cpu"), seed=10) != loss


# --- several optimizers as one --------------------------------------------------------------------


def _two_optimizers():
    from anexa_core.train.optim import Optimizers

    first, second = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(3))
    return Optimizers([torch.optim.SGD([first], lr=0.1), torch.optim.AdamW([second], lr=0.1)]), first, second


def test_optimizers_step_and_zero_every_part_like_one_torch_optimizer():
    optimizers, first, second = _two_optimizers()
    assert [len(group["params"]) for group in optimizers.param_groups] == [1, 1]
    (first.sum() + second.sum()).backward()
    optimizers.step()
    assert torch.allclose(first, torch.full((2,), 0.9)) and (second < 1).all()
    optimizers.zero_grad()  # torch's default: gradients become None, not zeros
    assert first.grad is None and second.grad is None
    (first.sum() + second.sum()).backward()
    optimizers.zero_grad(set_to_none=False)
    assert torch.equal(first.grad, torch.zeros(2)) and torch.equal(second.grad, torch.zeros(3))


def test_optimizers_state_round_trips_and_a_wrong_state_is_refused():
    optimizers, first, second = _two_optimizers()
    (first.sum() + second.sum()).backward()
    optimizers.step()
    state = optimizers.state_dict()
    again, _, _ = _two_optimizers()
    again.load_state_dict(state)
    assert again.state_dict()["optimizers"][1]["state"][0]["step"] == 1
    for wrong in ({"optimizers": state["optimizers"][:1]}, {"optimizers": "x"}, {}, [state]):
        with pytest.raises(ValueError) as error:
            again.load_state_dict(wrong)
        assert str(error.value) == "expected the state of 2 optimizers"


def test_metrics_lines_that_do_not_parse_are_skipped_not_fatal(tmp_path):
    from anexa_core.io.metrics import read_metrics as _read_metrics
    from anexa_core.io.metrics import truncate_metrics as _truncate_metrics

    path = tmp_path / "metrics.jsonl"
    assert _read_metrics(path) == []
    path.write_text('{"step": 1}\n{"step": 2, "val_lo\n{"step": 3}\n{"step": 4}\n{"step": 5', encoding="utf-8")
    assert _read_metrics(path) == [{"step": 1}, {"step": 3}, {"step": 4}]
    _truncate_metrics(path, 3)
    assert path.read_text(encoding="utf-8") == '{"step": 1}\n{"step": 3}\n'


def test_resume_of_a_folder_that_holds_no_run_or_an_anexa_01_run_says_so(tmp_path):
    with pytest.raises(AnexaError) as error:
        resume_configs(tmp_path, {})
    assert str(error.value) == (
        f"{tmp_path} holds no train_state.safetensors: pass the folder of an `anexa train` run that saved at least once"
    )
    safetensors.torch.save_file(
        {"x": torch.zeros(1)},
        tmp_path / checkpoint.STATE_FILE,
        metadata={"anexa": json.dumps({"format": "anexa/1", "step": 5})},
    )
    with pytest.raises(AnexaError, match=rf"^{tmp_path} was trained by anexa 0.1, whose runs cannot be resumed"):
        resume_configs(tmp_path, {})


# --- one training step ----------------------------------------------------------------------------


def _step_setup(**changes):
    from helpers import TINY, tiny_model

    from anexa_core.train.optim import make_optimizer

    model = tiny_model(seed=3).train()
    config = TrainConfig(lr=1e-2, warmup_steps=0, device="cpu", **changes)
    ids = torch.randint(0, TINY.vocab_size, (4, TINY.block_size + 1), generator=torch.Generator().manual_seed(4))
    return model, make_optimizer(model, config), config, ids[:, :-1], ids[:, 1:]


def _manual_step(clip, precision):
    """The step written out: forward at ``precision``, backward, optional clipping, AdamW."""
    from anexa_core.device import autocast

    model, optimizer, _, x, y = _step_setup()
    with autocast(torch.device("cpu"), precision):
        _, loss = model(x, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip:
        torch.nn.utils.clip_grad_norm_(list(model.parameters()), clip)
    optimizer.step()
    return loss.detach(), model


@pytest.mark.parametrize("grad_clip, precision", [(1.0, "fp32"), (0.0, "fp32"), (1e-3, "fp32"), (1.0, "bf16")])
def test_a_train_step_is_forward_backward_clip_and_step(grad_clip, precision):
    """grad_clip 0 means no clipping (not clipping to 0); the step runs at the configured precision."""
    from anexa_core.train.step import make_train_step

    model, optimizer, config, x, y = _step_setup(grad_clip=grad_clip, precision=precision)
    loss = make_train_step(model, optimizer, config, torch.device("cpu"))(x, y)
    want_loss, want_model = _manual_step(grad_clip, precision)
    assert loss.requires_grad is False and torch.equal(loss, want_loss)
    for (name, got), want in zip(model.named_parameters(), want_model.parameters(), strict=True):
        assert torch.equal(got, want), name
    if precision == "bf16":  # and bf16 is not fp32 here, or the comparison above proves nothing
        assert not torch.equal(want_loss, _manual_step(grad_clip, "fp32")[0])
    if grad_clip == 0.0:
        _, clipped = _manual_step(1e-3, precision)
        assert not torch.equal(want_model.wte.weight, clipped.wte.weight)


def test_a_train_step_runs_the_given_forward_and_compiles_it_when_asked(monkeypatch):
    from anexa_core.train.step import make_train_step

    model, optimizer, config, x, y = _step_setup()
    calls = []

    class Wrapper(torch.nn.Module):  # as DistributedDataParallel wraps the model
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args):
            calls.append("wrapper")
            return self.inner(*args)

    wrapper = Wrapper(model)
    make_train_step(model, optimizer, config, torch.device("cpu"), wrapper)(x, y)
    assert calls == ["wrapper"]
    compiled = []
    monkeypatch.setattr(torch, "compile", lambda module: compiled.append(module) or Wrapper(module))
    compiled_config = dataclasses.replace(config, compile=True)
    make_train_step(model, optimizer, compiled_config, torch.device("cpu"), wrapper)(x, y)
    assert compiled == [wrapper] and calls == ["wrapper"] * 3
    make_train_step(model, optimizer, compiled_config, torch.device("cpu"))(x, y)
    assert compiled[-1] is model


def test_bf16_is_detected_from_either_instruction_set(monkeypatch):
    from anexa_core.device import cpu_has_bf16

    for capabilities, expected in (
        ({"avx512_bf16": True}, True),
        ({"amx_bf16": True}, True),
        ({"avx512_bf16": False, "amx_bf16": False}, False),
        ({}, False),
    ):
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda c=capabilities: c)
        assert cpu_has_bf16() is expected, capabilities
    monkeypatch.delattr(torch.cpu, "get_capabilities")  # an older torch
    assert cpu_has_bf16() is False


# --- the run folder around the loop ---------------------------------------------------------------


def test_a_checkpoint_saved_before_the_first_evaluation_records_no_loss_rather_than_nan(sherlock_path, tmp_path):
    """Ctrl-C at step 1 (the first evaluation is at step 100): the losses are JSON null, not NaN."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    with pytest.raises(TrainingInterrupted):
        train(tiny, _train_config(sherlock_path, steps=10), tmp_path, stop_requested=lambda: True)
    raw = (tmp_path / "model.safetensors").read_bytes()
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])["__metadata__"]["anexa"]
    assert "NaN" not in header
    meta = json.loads(header)
    assert meta["step"] == 1 and meta["val_loss"] is None and meta["train_loss"] is None
    assert meta["best_step"] is None and meta["best_val_loss"] is None


def test_metrics_go_to_a_new_nested_folder_and_stale_temp_files_are_removed(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    out = tmp_path / "a" / "b" / "run"
    config = _train_config(sherlock_path, steps=2, eval_every=1, save_every=2)
    train(tiny, config, out)  # the first evaluation comes before the first save creates the folder
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    (out / ".model.safetensors.4d2f.tmp").write_bytes(b"half a save")  # a save killed by SIGKILL
    (out / "notes.tmp").write_text("not ours")
    train(*resume_configs(out, {"steps": 3}), out, resume=True)
    assert not (out / ".model.safetensors.4d2f.tmp").exists() and (out / "notes.tmp").exists()


def test_a_missing_plotting_library_is_logged_not_fatal(monkeypatch, caplog, tmp_path):
    from anexa_core.measure import plots
    from anexa_core.train.loop import _plot_losses

    def no_matplotlib(runs, out):
        raise AnexaError("plotting needs matplotlib")

    monkeypatch.setattr(plots, "plot_runs", no_matplotlib)
    with caplog.at_level("INFO", logger="anexa"):
        _plot_losses(tmp_path)
    assert [r.getMessage() for r in caplog.records] == ["no loss.png: plotting needs matplotlib"]


def test_the_save_delay_test_hook(monkeypatch):
    from anexa_core.train.loop import _save_delay

    monkeypatch.delenv("ANEXA_TEST_SAVE_DELAY", raising=False)
    assert _save_delay() == 0.0
    monkeypatch.setenv("ANEXA_TEST_SAVE_DELAY", "")
    assert _save_delay() == 0.0
    monkeypatch.setenv("ANEXA_TEST_SAVE_DELAY", "0.25")
    assert _save_delay() == 0.25


# --- plugins are checked before any data is read --------------------------------------------------


@pytest.mark.parametrize(
    "model_changes, train_changes, message",
    [
        ({"blocks_options": {"bias": "maybe"}}, {}, "blocks gpt2 option bias must be true or false, got 'maybe'"),
        ({"attention_options": {"window": 3}}, {}, "attention sdpa has no option 'window': choose one of backend"),
        (
            {},
            {"tokenizer": "bpe", "tokenizer_options": {"vocab_size": 5}},
            "--vocab-size 5 does not fit byte-level BPE",
        ),
        (
            {},
            {"optimizer_options": {"beta1": "high"}},
            "optimizer adamw option beta1 must be a finite number, got 'high'",
        ),
        ({"blocks": "nope"}, {}, "unknown blocks 'nope': choose one of"),
    ],
)
def test_a_bad_plugin_choice_fails_before_the_data_is_looked_at(tmp_path, model_changes, train_changes, message):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, **model_changes)
    config = _train_config(tmp_path / "no-such-corpus.txt", **train_changes)
    with pytest.raises(AnexaError) as error:
        train(tiny, config, tmp_path / "run")
    assert str(error.value).startswith(message), str(error.value)
    assert not (tmp_path / "run").exists()


def _edit_training_state(run_dir, change):
    """Rewrite the metadata of ``run_dir``'s training state with ``change(meta)``, tensors unchanged."""
    path = run_dir / checkpoint.STATE_FILE
    meta = checkpoint.read_metadata(path)
    change(meta)
    safetensors.torch.save_file(safetensors.torch.load_file(path), path, metadata={"anexa": json.dumps(meta)})


@pytest.mark.parametrize(
    "kind, setting, entry, message",
    [
        (
            "blocks",
            "model_config",
            {"name": "mamba", "distribution": "anexa-mamba", "version": "0.3"},
            "this model needs blocks 'mamba' from anexa-mamba 0.3: pip install anexa-mamba",
        ),
        (
            "attention",
            "model_config",
            {"name": "flash3", "distribution": "anexa-flash", "version": "1.0"},
            "this model needs attention 'flash3' from anexa-flash 1.0: pip install anexa-flash",
        ),
        (
            "tokenizer",
            "train_config",
            {"name": "wordpiece", "distribution": "anexa-wordpiece", "version": "2.0"},
            "this model needs tokenizer 'wordpiece' from anexa-wordpiece 2.0: pip install anexa-wordpiece",
        ),
        (
            "optimizer",
            "train_config",
            {"name": "lion", "distribution": "anexa-lion", "version": "1.1"},
            "this model needs optimizer 'lion' from anexa-lion 1.1: pip install anexa-lion",
        ),
    ],
)
def test_resuming_a_run_whose_plugin_is_gone_says_what_to_install(
    sherlock_path, tmp_path, kind, setting, entry, message
):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)

    def uninstall(meta):
        recorded = {**entry, "options": {}}
        if kind == "optimizer":
            meta["optimizer_plugin"] = recorded
        else:
            meta["model"]["plugins"][kind] = recorded
        config = meta["model"]["model_config"] if setting == "model_config" else meta["train_config"]
        config[kind], config[f"{kind}_options"] = entry["name"], {}

    _edit_training_state(tmp_path, uninstall)
    with pytest.raises(AnexaError) as error:
        train(*resume_configs(tmp_path, {"steps": 4}), tmp_path, resume=True)
    assert str(error.value) == message
    if kind == "attention":  # another attention may be chosen on resume: the recorded one no longer matters
        with pytest.raises(AnexaError, match=r"^unknown attention 'nope': choose one of"):
            train(*resume_configs(tmp_path, {"steps": 4, "attention": "nope"}), tmp_path, resume=True)
        train(*resume_configs(tmp_path, {"steps": 4, "attention": "sdpa"}), tmp_path, resume=True)
        assert checkpoint.load_train_state(tmp_path).step == 4


def test_resume_keeps_the_best_so_far_and_the_time_spent(sherlock_path, tmp_path):
    """A resumed run remembers its best evaluation: continued on text no model can predict (its loss at
    least ln(vocabulary)), its worse evaluations are no new best, and best.safetensors stays the model of the
    first part. Its clock goes on from where it stopped."""
    import random

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    run, text = tmp_path / "run", tmp_path / "text.txt"
    text.write_text(sherlock_path.read_text(encoding="utf-8"), encoding="utf-8")
    first = train(tiny, _train_config(text, steps=20, eval_every=10, save_every=20), run)
    assert first.best_step == 20
    kept = safetensors.torch.load_file(run / "model.safetensors")
    before = checkpoint.read_metadata(run / "model.safetensors")["elapsed_s"]
    chars = sorted(set(sherlock_path.read_text(encoding="utf-8")))
    text.write_text("".join(random.Random(0).choices(chars, k=40_000)), encoding="utf-8")  # the same file, noise now
    resumed = train(*resume_configs(run, {"steps": 30}), run, resume=True)
    assert resumed.val_loss > first.best_val_loss + 0.5, "the second part should be much worse"
    assert (resumed.best_step, resumed.best_val_loss) == (20, first.best_val_loss)
    best = safetensors.torch.load_file(run / "best.safetensors")
    assert checkpoint.read_metadata(run / "best.safetensors")["step"] == 20
    assert all(torch.equal(best[name], kept[name]) for name in kept)
    assert checkpoint.read_metadata(run / "model.safetensors")["best_step"] == 20
    elapsed = [json.loads(line)["elapsed_s"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert elapsed == sorted(elapsed) and elapsed[-1] > before > 0
    assert checkpoint.read_metadata(run / "model.safetensors")["elapsed_s"] >= elapsed[-1]


def test_resume_with_another_thread_count_says_the_last_bits_may_differ(sherlock_path, tmp_path, caplog):
    """On a CPU, sums add up in another order with another number of threads: resuming so is allowed, and
    logged with the flag that matches the run's last session; resuming with that count says nothing."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    before = torch.get_num_threads()
    try:
        train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2, threads=1), tmp_path)
        notes = []
        for steps, threads in ((3, 2), (4, 2)):
            caplog.clear()
            with caplog.at_level("INFO", logger="anexa"):
                train(*resume_configs(tmp_path, {"steps": steps, "threads": threads}), tmp_path, resume=True)
            notes.append([r.getMessage() for r in caplog.records if "threads" in r.getMessage()])
        # The count is each session's own choice: a resume without --threads chooses afresh ($ANEXA_THREADS, …)
        assert resume_configs(tmp_path, {})[1].threads is None
    finally:
        torch.set_num_threads(before)
    assert notes == [
        [
            f"computing with 2 CPU threads where {tmp_path} was trained with 1: sums add up in another order, so "
            "the result may differ from an uninterrupted run in the last bits (--threads 1 matches it)"
        ],
        [],
    ]


def test_seq_len_may_be_the_whole_context_and_no_more(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=1, eval_every=1, save_every=1, seq_len=32), tmp_path / "a")
    with pytest.raises(AnexaError) as error:
        train(tiny, _train_config(sherlock_path, steps=1, seq_len=33), tmp_path / "b")
    assert str(error.value) == (
        "--seq-len 33 is longer than the model's context of 32 tokens: "
        "use --seq-len 32 or shorter, or --block-size 33 or longer"  # a new model's context is the user's to choose
    )
    # The newcomer's report: on the command line the model's size line came first; now the one line is all.
    result = CliRunner().invoke(app, ["train", "--data", str(sherlock_path), *TINY_FLAGS, "--seq-len", "33",
                                      "--steps", "1", "--out", str(tmp_path / "c")])  # fmt: skip
    assert (result.exit_code, result.stdout, result.stderr) == (2, "", f"error: {error.value}\n")
    assert not (tmp_path / "c").exists()


def test_resume_keeps_the_runs_glob(sherlock_path, tmp_path):
    """The run's --glob picked its files; the same --data again keeps it, another --glob is refused."""
    books = tmp_path / "books"
    books.mkdir()
    (books / "sherlock.md").write_text(sherlock_path.read_text(encoding="utf-8")[:30_000], encoding="utf-8")
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    run = tmp_path / "run"
    train(tiny, _train_config(books, steps=2, eval_every=2, save_every=2, data_glob=["*.md"]), run)
    assert resume_configs(run, {"steps": 3})[1].data_glob == ["*.md"]
    assert resume_configs(run, {"steps": 3, "data": str(books)})[1].data_glob == ["*.md"]
    assert resume_configs(run, {"steps": 3, "data_glob": ["*.md"]})[1].data_glob == ["*.md"]
    with pytest.raises(AnexaError, match=r"^cannot change --glob when resuming .* \(it has --glob \['\*\.md'\]\)"):
        resume_configs(run, {"data": str(books), "data_glob": ["*.txt"]})


def test_a_time_budgeted_run_of_anexa_02_resumes_in_todays_terms(sherlock_path, tmp_path):
    """0.2 stored "no step limit" as 2**53 steps and decayed over each session's budget; today a minutes run
    has no step limit and decays over the minutes it was started with. Today's runs are left as they are."""
    from anexa_core.config import MAX_INT

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)

    def as_02(meta):
        meta["train_config"].update(minutes=2.0, steps=MAX_INT, decay_steps=MAX_INT)
        del meta["train_config"]["decay_minutes"]

    _edit_training_state(tmp_path, as_02)
    old = resume_configs(tmp_path, {})[1]
    assert (old.steps, old.decay_steps, old.decay_minutes, old.minutes) == (None, None, 2.0, 2.0)

    def extended_today(meta):  # resumed once with a larger --minutes: the decay keeps the first budget
        meta["train_config"].update(minutes=3.0, steps=None, decay_steps=None, decay_minutes=1.0)

    _edit_training_state(tmp_path, extended_today)
    today = resume_configs(tmp_path, {})[1]
    assert (today.steps, today.decay_steps, today.decay_minutes, today.minutes) == (None, None, 1.0, 3.0)


def test_a_training_state_cut_short_is_one_line_naming_the_fix_for_a_resume(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)
    path = tmp_path / checkpoint.STATE_FILE
    data = path.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    path.write_bytes(data[: header + 16])  # the header whole, the tensors cut
    for resuming in (checkpoint.load_train_state, lambda run: resume_configs(run, {"steps": 3})):
        with pytest.raises(AnexaError) as error:
            resuming(tmp_path)
        # resuming needs a new run, not another --model (the remedy for a damaged model file)
        assert str(error.value) == f"checkpoint {path} is corrupt (SafetensorError): start a new run"


def test_a_training_state_whose_tensors_cannot_be_read_is_one_line_naming_the_fix(sherlock_path, tmp_path, monkeypatch):
    """The header reads, then the tensors do not (a disk error, a file replaced in between): one line."""
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)

    def unreadable(path):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(checkpoint.safetensors.torch, "load_file", unreadable)
    with pytest.raises(AnexaError) as error:
        checkpoint.load_train_state(tmp_path)
    path = tmp_path / checkpoint.STATE_FILE
    assert str(error.value) == f"training state {path} is corrupt (OSError): start a new run"


def test_resume_with_another_attention_and_its_options(sherlock_path, tmp_path):
    from helpers import ScaledPlugin, registered

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)
    with registered(ScaledPlugin(), "test-scaled"):
        # Found by a QA session: a resume could swap in an attention that computes something else, and the
        # model card's command named it for every step. Judged by what it computes (factor 1 is exact).
        with pytest.raises(AnexaError, match=r"^cannot change --attention or -o attention.… when resuming .*: the "
                           r"new one computes something other than exact softmax attention"):  # fmt: skip
            resume_configs(tmp_path, {"steps": 3, "attention": "scaled"}, {"attention": {"factor": "0.5"}})
        train(
            *resume_configs(tmp_path, {"steps": 3, "attention": "scaled"}, {"attention": {"factor": "1.0"}}),
            tmp_path,
            resume=True,
        )
        meta = checkpoint.read_metadata(tmp_path / "model.safetensors")
    assert meta["step"] == 3
    assert meta["model_config"]["attention"] == "scaled" and meta["model_config"]["attention_options"] == {
        "factor": 1.0
    }
    assert meta["plugins"]["attention"]["options"] == {"factor": 1.0}


def test_an_optimizer_state_that_does_not_fit_is_refused_on_resume(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=2, eval_every=2, save_every=2), tmp_path)

    def no_groups(meta):
        meta["optimizer_state"] = {"__dict__": [["state", {"__dict__": []}], ["param_groups", []]]}

    _edit_training_state(tmp_path, no_groups)
    with pytest.raises(AnexaError) as error:
        train(*resume_configs(tmp_path, {"steps": 4}), tmp_path, resume=True)
    assert str(error.value) == (
        f"the optimizer state in {tmp_path} does not fit optimizer 'adamw' (loaded state "
        "dict has a different number of parameter groups): start a new run"
    )


def test_the_reporter_hears_about_the_data_the_steps_and_the_evaluations(sherlock_path, tmp_path):
    import time

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    fresh = Watching()
    started = time.perf_counter()
    result = train(tiny, _train_config(sherlock_path, steps=4, eval_every=2, save_every=4), tmp_path, reporter=fresh)
    wall = time.perf_counter() - started
    assert fresh.phases == {"fingerprinting", "learning the vocabulary", "tokenizing"}
    assert fresh.steps == [1, 2, 3, 4] and fresh.evaluations == [2, 4] and fresh.finished == 1
    assert result.out_dir == tmp_path and 0 < result.seconds <= wall
    ((total, first, info),) = fresh.started
    tokens = info["train_tokens"] + info["val_tokens"]
    assert (total, first) == (4, 0) and info == {
        "parameters": result.parameters,
        "device": "cpu",
        "vocab_size": len(set(sherlock_path.read_text())),
        "train_tokens": int(0.9 * tokens),
        "val_tokens": tokens - int(0.9 * tokens),
        "resumed_from": None,
        "out_dir": str(tmp_path),
        "minutes": None,
        "elapsed_s": 0.0,
    }
    # At least one batch of 16 windows of 32 tokens per step, within the call's wall time.
    assert all(rate >= 16 * 32 / wall for rate in fresh.rates), (fresh.rates, wall)
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(m["tokens_per_s"] >= 16 * 32 / wall and round(m["elapsed_s"], 2) == m["elapsed_s"] for m in metrics)
    spent = checkpoint.load_train_state(tmp_path).meta["elapsed_s"]
    resumed = Watching()
    train(*resume_configs(tmp_path, {"steps": 6, "minutes": 30}), tmp_path, reporter=resumed, resume=True)
    assert resumed.phases == {"checking the token cache"}  # the same files and tokenizer: nothing to tokenize
    assert resumed.steps == [5, 6] and resumed.evaluations == [6]
    ((total, first, info),) = resumed.started
    assert (total, first, info["resumed_from"], info["minutes"], info["elapsed_s"]) == (6, 4, 4, 30, spent)
    assert spent > 0


def test_the_save_delay_hook_sleeps_between_the_two_files_of_each_save(sherlock_path, tmp_path, monkeypatch):
    """The reliability tests kill a run inside a save through ANEXA_TEST_SAVE_DELAY."""
    import time
    import types

    from anexa_core.train import loop as training

    sleeps = []
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=time.perf_counter, sleep=sleeps.append))
    monkeypatch.setenv("ANEXA_TEST_SAVE_DELAY", "0.25")
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=4, eval_every=4, save_every=2), tmp_path)
    assert sleeps == [0.25, 0.25]  # the saves of steps 2 and 4
    monkeypatch.delenv("ANEXA_TEST_SAVE_DELAY")
    train(*resume_configs(tmp_path, {"steps": 6}), tmp_path, resume=True)
    assert sleeps == [0.25, 0.25]


def test_training_batches_are_not_the_windows_the_losses_are_measured_on(sherlock_path, tmp_path, monkeypatch):
    from anexa_core.train import step

    drawn = []
    real = step.get_batch

    def recording(ids, block_size, batch_size, generator):
        x, y = real(ids, block_size, batch_size, generator)
        drawn.append(x)
        return x, y

    monkeypatch.setattr(step, "get_batch", recording)  # training and evaluation batches both come from it
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, _train_config(sherlock_path, steps=1, eval_every=1, save_every=1, eval_batches=1), tmp_path)
    first_batch, train_eval, val_eval = drawn
    assert not torch.equal(first_batch, train_eval) and not torch.equal(first_batch, val_eval)
    # Batches come from their own generator (seeded seed + 1), not torch's global one that dropout draws from.
    _, _, _, train_data, _ = prepare_data(_train_config(sherlock_path), 32)
    expected, _ = real(train_data.ids, 32, 16, torch.Generator().manual_seed(1337 + 1))
    assert torch.equal(first_batch, expected)


# --- a time budget, on a clock the test controls --------------------------------------------------


def test_a_time_budget_stops_after_the_last_step_that_leaves_time_for_the_final_evaluation(
    sherlock_path, tmp_path, monkeypatch
):
    """Each step takes 1 s and each loss estimate 0.5 s (an evaluation 1 s) on a fake clock; the budget is
    10 s. The LR follows the share of the budget used when each step starts; throughput is tokens over the
    time since the last evaluation; the run stops once the time used, one more step and the last
    evaluation's duration would pass the budget (after step 8 at 9 s), evaluates, saves at 10 s, and refuses
    to resume from there. (One batch per loss estimate: the first evaluation is expected to take 2 × 1
    forward passes at a third of a step, not the 2 × 8 of the default that would end the run at step 4.)"""
    clock = _fake_clock(monkeypatch)
    reports = []

    class Rates(SilentReporter):
        def step(self, step, loss, tokens_per_s):
            reports.append((step, type(loss), tokens_per_s))

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(
        sherlock_path,
        steps=10**6,
        eval_every=4,
        eval_batches=1,
        save_every=10**6,
        warmup_steps=0,
        lr=1.0,
        min_lr=0.1,
        minutes=10 / 60,
    )
    result = train(tiny, config, tmp_path, reporter=Rates())
    assert result.step == 8
    assert reports == [(step, float, 16 * 32 / 1.0) for step in range(1, 9)]  # one batch per (fake) second
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(m["step"], m["elapsed_s"], m["tokens_per_s"]) for m in metrics] == [(4, 5.0, 512.0), (8, 10.0, 512.0)]
    # Step 4 started at 3 s, step 8 at 8 s (7 s of steps and 1 s of evaluation): 30% and 80% of the budget.
    assert [m["lr"] for m in metrics] == [lr_at(3, config, 0.3), lr_at(7, config, 0.8)]
    assert metrics[1]["lr"] == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.8)))
    state = checkpoint.load_train_state(tmp_path)
    assert state.meta["elapsed_s"] == 10.0
    assert {group["lr"] for group in state.optimizer_state["param_groups"]} == {metrics[1]["lr"]}
    with pytest.raises(AnexaError) as error:
        train(*resume_configs(tmp_path, {}), tmp_path, resume=True)
    assert str(error.value) == (
        f"run {tmp_path} has trained 0.167 minutes already, not less than --minutes 0.166667: pass a larger "
        "--minutes to continue"
    )
    with pytest.raises(AnexaError, match=r"trained 0\.167 minutes already, not less than --minutes 0\.05: pass"):
        train(*resume_configs(tmp_path, {"minutes": 0.05}), tmp_path, resume=True)  # a QA session's case
    clock[0] = 0.0
    assert train(*resume_configs(tmp_path, {"minutes": 12 / 60}), tmp_path, resume=True).step > 8


def test_a_budget_too_short_for_an_evaluation_before_its_end_still_ends_on_time(sherlock_path, tmp_path, monkeypatch):
    """The first-week report: a 1-minute LoRA fine-tune evaluated only at its end and overran the budget
    by that evaluation (40 s). Before any evaluation its time is estimated from the steps: 2 × eval_batches
    forward passes at a third of a step each. Steps of 1.5 s and 3 batches: 3 s expected (and taken, 1.5 s
    per loss estimate); a 12 s budget stops after step 6 (9 s + 3 s) and saves at 12 s, where it took 15."""
    _fake_clock(monkeypatch, step_s=1.5, estimate_s=1.5)
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=10**6, eval_every=10**6, eval_batches=3, minutes=12 / 60)
    assert train(tiny, config, tmp_path).step == 6
    assert checkpoint.load_train_state(tmp_path).meta["elapsed_s"] == 12.0
    # Resumed to 24 minutes' worth of seconds: estimated again from the new session's own steps.
    assert train(*resume_configs(tmp_path, {"minutes": 24 / 60}), tmp_path, resume=True).step == 12
    assert checkpoint.load_train_state(tmp_path).meta["elapsed_s"] == 24.0


def test_a_budget_leaves_room_for_the_next_step_or_stops_before_it(sherlock_path, tmp_path, monkeypatch):
    """The 1-minute LoRA fine-tune ran 3 s over: its last step began with time left for the evaluation but
    not for the step itself. Steps of 1.5 s, an evaluation of 3 s (estimated as 3 s too), an 11 s budget:
    after step 5 (7.5 s) a sixth step and the evaluation would end at 12 s, so the run stops there and
    saves at 10.5 s (it took 12 when only the evaluation was counted)."""
    _fake_clock(monkeypatch, step_s=1.5, estimate_s=1.5)
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=10**6, eval_every=10**6, eval_batches=3, minutes=11 / 60)
    assert train(tiny, config, tmp_path).step == 5
    assert checkpoint.load_train_state(tmp_path).meta["elapsed_s"] == 10.5


def test_a_diverged_run_stops_at_the_first_non_finite_loss_and_keeps_its_last_good_checkpoint(
    sherlock_path, tmp_path, monkeypatch
):
    """Found by a QA session: `--lr 1e308` trained to NaN and saved the NaN weights over the run without a
    word (then `generate` blamed a sampler). A learning rate above MAX_LR or not finite is refused; a loss
    that stops being a number ends the run at once, saving nothing after the last good checkpoint."""
    from anexa_core.config import MAX_LR
    from anexa_core.train import loop as training

    real = training.make_train_step

    def diverging(*args, **kwargs):
        step, calls = real(*args, **kwargs), []

        def one(x, y):
            calls.append(1)
            loss = step(x, y)
            return loss * float("nan") if len(calls) == 3 else loss

        return one

    monkeypatch.setattr(training, "make_train_step", diverging)
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    with pytest.raises(AnexaError) as caught:
        train(tiny, _train_config(sherlock_path, steps=6, eval_every=2, save_every=2), tmp_path)
    assert str(caught.value) == (
        "the training loss became nan at step 3: the run diverged (too large a learning rate?); nothing was "
        "saved after it. Lower --lr, or raise --warmup-steps, and train again"
    )
    assert checkpoint.read_metadata(tmp_path / "model.safetensors")["step"] == 2
    for lr in (MAX_LR * 2, float("inf")):
        with pytest.raises(AnexaError, match="--lr"):
            _train_config(sherlock_path, lr=lr)


def test_a_budget_leaves_room_for_the_final_checkpoint(sherlock_path, tmp_path, monkeypatch):
    """A newcomer's 1-minute full fine-tune of SmolLM2 ended 29 s past its budget, writing 2.7 GB. Steps of
    1.5 s, evaluations of 3 s, checkpoints of 2 s, both every 2 steps, a 16 s budget: step 2's are timed
    (3 s → 6 → 8), and after step 4 (11 s) a step, the evaluation and a checkpoint would end at 17.5 s: the
    run stops, evaluates and saves by 16 s (without the checkpoint's time it went on to step 5 and ended at
    22.5). Before any checkpoint is timed, its bytes at the assumed write rate count: at 1 byte/s the run
    stops after its first step; with nothing to write, after step 6 as without checkpoints."""
    from anexa_core.train import loop as training

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    _fake_clock(monkeypatch, step_s=1.5, estimate_s=1.5, save_s=2.0)
    config = _train_config(sherlock_path, steps=10**6, eval_every=2, eval_batches=3, minutes=16 / 60, save_every=2)
    assert train(tiny, config, tmp_path / "timed").step == 4
    assert checkpoint.load_train_state(tmp_path / "timed").meta["elapsed_s"] == 14.0
    config = dataclasses.replace(config, eval_every=10**6, save_every=10**6, minutes=12 / 60)
    _fake_clock(monkeypatch, step_s=1.5, estimate_s=1.5, write_rate=1.0)
    assert train(tiny, config, tmp_path / "slow").step == 1
    _fake_clock(monkeypatch, step_s=1.5, estimate_s=1.5)
    assert train(tiny, config, tmp_path / "instant").step == 6
    monkeypatch.setattr(training, "WRITE_BYTES_PER_S", 100.0)
    assert training._forwards_per_step(_stub_run(trainable=1, frozen=0)) == 3.0
    assert training._forwards_per_step(_stub_run(trainable=1, frozen=3)) == 2.25  # LoRA-like: the base frozen
    assert training._save_seconds(_stub_run(trainable=10, frozen=90), None) == 2.0  # 5 × 10 float32 at 100 B/s
    assert training._save_seconds(_stub_run(trainable=10, frozen=90), 7.5) == 7.5


def _stub_run(trainable: int, frozen: int):
    """What :func:`_forwards_per_step` and :func:`_save_seconds` read of a run: a model of float32
    parameters, ``trainable`` of them trained and ``frozen`` not."""
    import types

    model = torch.nn.Module()
    model.trained = torch.nn.Parameter(torch.zeros(trainable))
    model.frozen = torch.nn.Parameter(torch.zeros(frozen), requires_grad=False)
    return types.SimpleNamespace(model=model)


def test_throughput_leaves_the_evaluations_out_and_is_written_to_one_decimal(sherlock_path, tmp_path, monkeypatch):
    """On a fake clock (a step 0.7 s, an evaluation 1 s, a checkpoint 0.9 s), every throughput written —
    ``steps.jsonl``'s and ``metrics.jsonl``'s — is 3 steps × 512 tokens over 2.1 s = 731.43 tokens/s, to one
    decimal: the evaluation and the checkpoint at step 3 fall inside the second line's time but are not
    counted in it (a QA session saw the checkpoints' time lower the line after each)."""
    _fake_clock(monkeypatch, step_s=0.7, save_s=0.9)
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=6, eval_every=3, log_every=3, save_every=3)
    train(tiny, config, tmp_path)
    steps = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    metrics = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(line["step"], line["tokens_per_s"]) for line in steps] == [(3, 731.4), (6, 731.4)]
    assert [(line["step"], line["tokens_per_s"]) for line in metrics] == [(3, 731.4), (6, 731.4)]


def test_the_reporter_hears_the_losses_unrounded_and_metrics_keep_five_decimals(tmp_path, monkeypatch):
    """A newcomer saw `val loss 2.5111` after an evaluation and `val loss 2.5110` in the summary of the same
    run: the reporter was handed the loss rounded to 5 decimals (2.51105), then printed to 4."""
    import types

    from anexa_core.train import loop

    monkeypatch.setattr(loop, "estimate_loss", lambda model, data, config, device, seed: 2.511049999)
    ranks = types.SimpleNamespace(is_main=True)
    run = types.SimpleNamespace(train_config=types.SimpleNamespace(seed=1), model=None, train_data=None,
                                val_data=None, device="cpu", ranks=ranks, out_dir=tmp_path,
                                best_val_loss=float("inf"), best_step=None, elapsed=lambda: 1.0)  # fmt: skip
    heard = []

    class Heard(SilentReporter):
        def evaluated(self, record):
            heard.append(record)

    loop.evaluate(run, 5, 0.1, 10.0, Heard())
    assert heard[0]["val_loss"] == heard[0]["train_loss"] == run.val_loss == 2.511049999
    assert f"{heard[0]['val_loss']:.4f}" == f"{run.val_loss:.4f}" == "2.5110"
    (written,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert written["val_loss"] == written["train_loss"] == 2.51105


def test_a_rank_other_than_the_first_writes_no_metrics_and_no_steps(tmp_path, monkeypatch):
    """Under torchrun every rank evaluates and counts its steps, but only the first writes: another rank's
    evaluation still reports and keeps the best loss, and its step log takes its losses and writes nothing."""
    import types

    from anexa_core.train import loop

    monkeypatch.setattr(loop, "estimate_loss", lambda model, data, config, device, seed: 2.0 + seed % 2)
    run = types.SimpleNamespace(
        train_config=types.SimpleNamespace(seed=1),
        model=None,
        train_data=None,
        val_data=None,
        device="cpu",
        ranks=types.SimpleNamespace(is_main=False),
        out_dir=tmp_path,
        best_val_loss=float("inf"),
        best_step=None,
        elapsed=lambda: 1.0,
    )
    heard = []

    class Heard(SilentReporter):
        def evaluated(self, record):
            heard.append(record)

    assert loop.evaluate(run, 5, 0.1, 123.45, Heard()) is True
    assert (run.train_loss, run.val_loss, run.best_step, run.best_val_loss) == (3.0, 2.0, 5, 2.0)
    assert heard == [
        {"step": 5, "train_loss": 3.0, "val_loss": 2.0, "lr": 0.1, "tokens_per_s": 123.5, "elapsed_s": 1.0}
    ]
    log = loop._StepLog(None, tokens_per_step=10)
    log.add(torch.tensor(1.5))
    log.read(1, SilentReporter())
    log.write(1, 0.1, 1.0)
    assert log.losses == [] and list(tmp_path.iterdir()) == []
    run.ranks.is_main = True
    assert loop.evaluate(run, 6, 0.1, 123.45, Heard()) is False  # a tie keeps the earlier best
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [6]


def test_the_device_is_cuda_when_present_else_the_cpu_and_a_missing_gpu_is_a_one_line_error(monkeypatch):
    from anexa_core.device import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu") == pick_device("cpu")
    for name in ("cuda", "cuda:1"):
        with pytest.raises(AnexaError) as error:
            pick_device(name)
        assert str(error.value) == "--device cuda but no CUDA GPU is visible: use --device cpu"
    with pytest.raises(AnexaError) as error:
        pick_device("gpu")
    assert str(error.value) == "unknown device 'gpu': use auto, cpu or cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto") == torch.device("cuda")
    assert pick_device("cuda:1") == torch.device("cuda", 1)


def test_precision_flags_force_or_follow_the_hardware(monkeypatch):
    """fp32 and bf16 force their precision; auto follows the CPU's bf16 instructions or the GPU's support."""
    from anexa_core import device as precision

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    for has_bf16 in (True, False):
        monkeypatch.setattr(precision, "cpu_has_bf16", lambda has=has_bf16: has)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda has=has_bf16: has)
        for device in (cpu, cuda):
            assert precision.uses_bf16(device, "fp32") is False
            assert precision.uses_bf16(device, "bf16") is True
            assert precision.uses_bf16(device, "auto") is has_bf16
        with precision.autocast(cpu, "bf16"):
            assert torch.get_autocast_dtype("cpu") == torch.bfloat16 and torch.is_autocast_enabled("cpu")
        with precision.autocast(cpu, "fp32"):
            assert not torch.is_autocast_enabled("cpu")


def test_one_optimizer_stays_itself_and_several_step_as_one():
    from anexa_core.train.optim import Optimizers, combine

    first = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    second = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    assert combine(first) is first and combine([first]) is first and combine((first,)) is first
    both = combine([first, second])
    assert isinstance(both, Optimizers) and both.optimizers == [first, second]


def test_the_optimizer_plugin_gets_its_options():
    from anexa_core.model.gpt import build_model
    from anexa_core.train.optim import make_optimizer

    model = build_model(dataclasses.replace(SMALL, vocab_size=50))
    config = TrainConfig(optimizer="adamw", optimizer_options={"weight_decay": 0.25, "beta1": 0.8}, lr=2e-3)
    optimizer = make_optimizer(model, config)
    decays = sorted({group["weight_decay"] for group in optimizer.param_groups})
    assert decays == [0.0, 0.25]  # no decay on biases and norms
    assert all(group["betas"][0] == 0.8 and group["initial_lr"] == 2e-3 for group in optimizer.param_groups)


def test_a_tie_in_val_loss_keeps_the_earlier_best(sherlock_path, tmp_path, monkeypatch):
    """Only a strictly lower val loss is a new best: a plateau does not move best.safetensors forward."""
    from anexa_core.train import loop as training

    monkeypatch.setattr(training, "estimate_loss", lambda *args, **kwargs: 2.0)
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    result = train(tiny, _train_config(sherlock_path, steps=4, eval_every=2, save_every=4), tmp_path)
    assert result.best_step == 2 and result.best_val_loss == 2.0
    assert checkpoint.read_metadata(tmp_path / checkpoint.BEST_FILE)["step"] == 2


def _fake_clock(
    monkeypatch, step_s: float = 1.0, estimate_s: float = 0.5, save_s: float = 0.0, write_rate: float = float("inf")
) -> list[float]:
    """Training on a clock the test controls: each step takes ``step_s``, each loss estimate ``estimate_s``,
    each checkpoint ``save_s``; a checkpoint not yet timed is estimated at ``write_rate`` bytes/s."""
    import types

    from anexa_core.train import loop as training

    clock = [0.0]
    monkeypatch.setattr(training, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=lambda s: None))
    monkeypatch.setattr(training, "WRITE_BYTES_PER_S", write_rate)
    real_make_train_step, real_estimate_loss, real_save = (
        training.make_train_step,
        training.estimate_loss,
        training.save,
    )

    def timed_save(*args, **kwargs):
        real_save(*args, **kwargs)
        clock[0] += save_s

    monkeypatch.setattr(training, "save", timed_save)

    def timed_steps(*args, **kwargs):
        step = real_make_train_step(*args, **kwargs)

        def one(x, y):
            clock[0] += step_s
            # The tests' budgets are seconds: a run past ten fake minutes ignores its budget (and would go on
            # for its 10**6 steps), so it fails now rather than at mutmut's timeout.
            assert clock[0] < 600, "the run went past ten (fake) minutes: its --minutes budget did not end it"
            return step(x, y)

        return one

    def timed_estimate(*args, **kwargs):
        clock[0] += estimate_s
        return real_estimate_loss(*args, **kwargs)

    monkeypatch.setattr(training, "make_train_step", timed_steps)
    monkeypatch.setattr(training, "estimate_loss", timed_estimate)
    return clock


@pytest.mark.parametrize("written_by", ["this version", "anexa 0.2"])
def test_a_larger_minutes_on_resume_continues_at_min_lr_instead_of_restarting_the_decay(
    sherlock_path, tmp_path, monkeypatch, written_by
):
    """Issue 24: a 10 s run resumed with a 20 s budget went from min_lr back up the cosine. The decay ends
    where the first run's budget did, whatever later budgets say, as a larger --steps keeps --decay-steps;
    runs of anexa 0.2 (steps stored as 2**53, no decay_minutes) are read the same way."""
    clock = _fake_clock(monkeypatch, step_s=1.0, estimate_s=0.0)
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(
        sherlock_path, steps=None, eval_every=1, save_every=10**6, warmup_steps=0, lr=1.0, min_lr=0.1, minutes=10 / 60
    )
    train(tiny, config, tmp_path)
    state = checkpoint.load_train_state(tmp_path).meta["train_config"]
    assert (state["steps"], state["decay_steps"], state["decay_minutes"]) == (None, None, 10 / 60)
    if written_by == "anexa 0.2":

        def as_before(meta):
            for section in (meta["train_config"], meta["model"]["train_config"]):
                section.update(steps=2**53, decay_steps=2**53)
                del section["decay_minutes"]

        _edit_training_state(tmp_path, as_before)
    first = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert first[-1]["lr"] < 0.2 and all(a["lr"] > b["lr"] for a, b in itertools.pairwise(first))
    clock[0] = 0.0
    result = train(*resume_configs(tmp_path, {"minutes": 20 / 60}), tmp_path, resume=True)
    assert result.step > len(first)
    resumed = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][len(first) :]
    assert resumed and {record["lr"] for record in resumed} == {0.1}, [r["lr"] for r in resumed]


def test_the_training_loss_lr_and_throughput_are_logged_every_few_steps(sherlock_path, tmp_path):
    """Issue 24: loss curves had a point every 250 steps only. steps.jsonl has a line every --log-every
    steps: the mean of those steps' batch losses, the LR of the last one, their tokens/s; a resumed run
    drops what a killed run wrote past its checkpoint, so no step is logged twice."""

    class Losses(SilentReporter):
        def __init__(self):
            self.losses = []

        def step(self, step, loss, tokens_per_s):
            self.losses.append(loss)

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=5, log_every=2, eval_every=3, save_every=4, warmup_steps=3)
    heard = Losses()
    train(tiny, config, tmp_path, reporter=heard)
    lines = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5]  # and the last step
    means = [sum(heard.losses[0:2]) / 2, sum(heard.losses[2:4]) / 2, heard.losses[4]]
    assert [line["loss"] for line in lines] == [round(mean, 5) for mean in means]
    stored = checkpoint.load_train_state(tmp_path).meta["train_config"]
    assert [line["lr"] for line in lines] == [lr_at(s - 1, TrainConfig(**stored)) for s in (2, 4, 5)]
    assert all(line["tokens_per_s"] > 0 and line["elapsed_s"] > 0 for line in lines)
    # tokens/s of each line's steps (16 windows of 32 tokens each): at least their tokens over the whole
    # run's clock so far (their own time is less; the clock is rounded to 0.01 s), to 0.1
    for line, steps in zip(lines, (2, 2, 1), strict=True):
        assert isinstance(line["tokens_per_s"], float) and line["tokens_per_s"] == round(line["tokens_per_s"], 1)
        assert steps * 16 * 32 / (line["elapsed_s"] + 0.05) <= line["tokens_per_s"] < 1e8
    # A killed run had logged step 6 past its last checkpoint (step 5): the resumed run logs it once.
    with (tmp_path / "steps.jsonl").open("a") as handle:
        handle.write(json.dumps({"step": 6, "loss": 9.9, "lr": 0.1, "tokens_per_s": 1.0, "elapsed_s": 1.0}) + "\n")
        handle.write('{"step": 7, "lo')  # cut short by SIGKILL
    train(*resume_configs(tmp_path, {"steps": 8}), tmp_path, resume=True)
    lines = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [2, 4, 5, 6, 8] and lines[3]["loss"] != 9.9


def test_a_batch_of_conversations_pads_right_and_targets_only_the_assistant_tokens():
    """Each row is one conversation drawn at random, right-padded (id 0) to the longest less one; its
    targets are the next ids where that next token is the assistant's and -100 (ignored) elsewhere,
    padding included — the mask `chats.jsonl` training relies on."""
    from anexa_core.data.chats import IGNORE, Example
    from anexa_core.train.step import Conversations

    short = Example([5, 6, 7], [False, True, True])
    long = Example([1, 2, 3, 4, 8, 9], [False, False, True, True, False, True])
    data = Conversations([short, long])
    assert data.tokens == 9
    generator = torch.Generator().manual_seed(0)
    x, y = data.batch(6, generator)
    drawn = torch.randint(2, (6,), generator=torch.Generator().manual_seed(0)).tolist()
    assert x.shape == y.shape == (6, 5) and x.dtype == y.dtype == torch.long
    rows = {0: ([5, 6, 0, 0, 0], [6, 7, IGNORE, IGNORE, IGNORE]), 1: ([1, 2, 3, 4, 8], [IGNORE, 3, 4, IGNORE, 9])}
    for row, which in enumerate(drawn):
        assert (x[row].tolist(), y[row].tolist()) == rows[which]
    assert set(drawn) == {0, 1}


def test_losses_read_back_in_batches_report_every_step_in_order(sherlock_path, tmp_path, monkeypatch):
    """On a GPU the loop reads losses back every --log-every steps instead of after every step (a read waits
    for the device). Forced here on the CPU: the reporter still hears every step once, in order, with the
    same losses, and steps.jsonl and metrics.jsonl say what a step-by-step run says. A CPU run itself reports
    each step as soon as it is done (the progress bar moves every step): a CPU computes synchronously, so the
    read costs nothing there."""
    from anexa_core.train import loop

    taken = [0]  # training steps run so far, counted where the loop runs them
    make_train_step = loop.make_train_step

    def counting(*args, **kwargs):
        step = make_train_step(*args, **kwargs)

        def counted(x, y):
            taken[0] += 1
            return step(x, y)

        return counted

    monkeypatch.setattr(loop, "make_train_step", counting)
    _fake_clock(monkeypatch, step_s=1.0)  # a step 1 s: 16 windows of 32 tokens make 512 tokens/s, read late or not

    class Heard(SilentReporter):
        def __init__(self):
            self.steps, self.taken_when_heard, self.rates = [], [], set()

        def step(self, step, loss, tokens_per_s):
            self.steps.append((step, loss))
            self.taken_when_heard.append(taken[0])
            self.rates.add(tokens_per_s)

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = _train_config(sherlock_path, steps=11, log_every=4, eval_every=6, save_every=11, warmup_steps=3)
    one_by_one, batched = Heard(), Heard()
    train(tiny, config, tmp_path / "a", reporter=one_by_one)
    assert one_by_one.taken_when_heard == list(range(1, 12))  # each step heard before the next one runs
    taken[0] = 0
    monkeypatch.setattr(loop, "_reads_each_step", lambda device: False)
    train(tiny, config, tmp_path / "b", reporter=batched)
    assert [step for step, _ in batched.steps] == list(range(1, 12))
    assert batched.steps == one_by_one.steps
    # read at --log-every 4, the evaluation at 6, --log-every 8, the end at 11
    assert batched.taken_when_heard == [4] * 4 + [6] * 2 + [8] * 2 + [11] * 3

    def records(run, name, keys):
        lines = (tmp_path / run / name).read_text().splitlines()
        return [{key: json.loads(line)[key] for key in keys} for line in lines]

    assert records("b", "steps.jsonl", ("step", "loss", "lr")) == records("a", "steps.jsonl", ("step", "loss", "lr"))
    assert batched.rates == one_by_one.rates == {512.0}  # the steps read together count as many steps' tokens
    assert {record["tokens_per_s"] for record in records("b", "steps.jsonl", ("tokens_per_s",))} == {512.0}
    assert records("b", "metrics.jsonl", ("step", "val_loss")) == records("a", "metrics.jsonl", ("step", "val_loss"))
