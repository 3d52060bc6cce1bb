"""What a run folder's checkpoints record, field by field, after a real training run: everything a later
consumer reads (generate, chat, serve, export, eval, --resume) must be there and mean what it says."""

import dataclasses
import importlib.metadata
import json

import pytest
import safetensors.torch
import torch

from anexa_core import checkpoint
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.training import resume_configs, train

VERSION = importlib.metadata.version("anexa")


def _provenance(name, options):
    return {"name": name, "options": options, "distribution": "anexa", "version": VERSION}


@pytest.fixture(scope="module")
def run(sherlock_path, tmp_path_factory):
    """A short run with a non-default plugin choice of every kind: BPE with a vocabulary size, gpt2 without
    biases, math attention, AdamW with its own weight decay, untied head."""
    text = tmp_path_factory.mktemp("data") / "holmes.txt"
    text.write_text(sherlock_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = tmp_path_factory.mktemp("run") / "run"
    model_config = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32, attention="math",
                               blocks_options={"bias": False}, tie_embeddings=False)
    train_config = TrainConfig(data=str(text), tokenizer="bpe", tokenizer_options={"vocab_size": 300},
                               optimizer_options={"weight_decay": 0.05}, steps=6, batch_size=4, lr=3e-3,
                               warmup_steps=1, eval_every=3, eval_batches=2, save_every=100, device="cpu")
    result = train(model_config, train_config, out)
    metrics = [json.loads(line) for line in (out / checkpoint.METRICS_FILE).read_text().splitlines()]
    return dict(out=out, result=result, model_config=model_config, train_config=train_config, metrics=metrics)


def _expected_model_meta(run):
    tokenizer_options = {"vocab_size": 300, "max_train_chars": 100_000_000}
    model_config = dataclasses.replace(run["model_config"], vocab_size=300, blocks_options={"bias": False})
    train_config = dataclasses.replace(run["train_config"], decay_steps=6, tokenizer_options=tokenizer_options,
                                       optimizer_options={"weight_decay": 0.05, "beta1": 0.9, "beta2": 0.99,
                                                          "eps": 1e-8})
    return {
        "format": "anexa/2",
        "anexa_version": VERSION,
        "model_config": dataclasses.asdict(model_config),
        "plugins": {"blocks": _provenance("gpt2", {"bias": False}), "attention": _provenance("math", {}),
                    "tokenizer": _provenance("bpe", tokenizer_options)},
        "train_config": dataclasses.asdict(train_config),
    }, tokenizer_options


def test_the_latest_checkpoint_records_every_field_a_consumer_reads(run):
    meta = checkpoint.read_metadata(run["out"] / checkpoint.MODEL_FILE)
    expected, tokenizer_options = _expected_model_meta(run)
    last = run["metrics"][-1]
    assert meta.keys() == {*expected, "tokenizer", "step", "val_loss", "train_loss", "best_step", "best_val_loss",
                           "elapsed_s"}
    for key, value in expected.items():
        assert meta[key] == value, key
    assert meta["tokenizer"]["name"] == "bpe" and meta["tokenizer"]["options"] == tokenizer_options
    assert meta["step"] == 6 == last["step"]
    assert meta["val_loss"] == pytest.approx(last["val_loss"], abs=1e-5) == run["result"].val_loss
    assert meta["train_loss"] == pytest.approx(last["train_loss"], abs=1e-5) == run["result"].train_loss
    best = min(run["metrics"], key=lambda m: m["val_loss"])
    assert meta["best_step"] == best["step"] == run["result"].best_step
    assert meta["best_val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    assert 0 < meta["elapsed_s"] <= last["elapsed_s"] + 1


def test_the_tokenizer_and_model_rebuild_from_the_metadata_alone(run):
    model, tokenizer, meta = checkpoint.load_model(run["out"] / checkpoint.MODEL_FILE)
    assert meta["path"] == str(run["out"] / checkpoint.MODEL_FILE)
    assert tokenizer.state_dict() == meta["tokenizer"]["state"] and tokenizer.vocab_size == 300
    text = "Holmes said: naïve ☃"  # byte-level BPE encodes anything
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert model.config == ModelConfig(**meta["model_config"])
    assert model.lm_head.weight is not model.wte.weight
    weights = safetensors.torch.load_file(run["out"] / checkpoint.MODEL_FILE)
    assert weights.keys() == model.state_dict().keys()
    assert not any(name.endswith(".bias") for name in weights)  # bias=False reached the blocks
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name


def test_the_best_checkpoint_records_its_own_step_and_losses(run):
    best_meta = checkpoint.read_metadata(run["out"] / checkpoint.BEST_FILE)
    expected, _ = _expected_model_meta(run)
    record = next(m for m in run["metrics"] if m["step"] == run["result"].best_step)
    for key, value in expected.items():
        assert best_meta[key] == value, key
    assert best_meta["step"] == record["step"]
    assert best_meta["val_loss"] == pytest.approx(record["val_loss"], abs=1e-5)
    assert best_meta["train_loss"] == pytest.approx(record["train_loss"], abs=1e-5)
    assert checkpoint.checkpoint_file(run["out"]) == run["out"] / checkpoint.BEST_FILE


def test_the_training_state_holds_what_resume_reads(run):
    state = checkpoint.load_train_state(run["out"])
    meta = state.meta
    model_meta = checkpoint.read_metadata(run["out"] / checkpoint.MODEL_FILE)
    expected, _ = _expected_model_meta(run)
    assert meta["format"] == "anexa/2" and meta["kind"] == "train_state"
    assert meta["model"] == model_meta  # written from the same metadata, in the same save
    assert state.step == meta["step"] == 6
    assert meta["train_config"] == expected["train_config"]
    assert meta["best_step"] == model_meta["best_step"] and meta["best_val_loss"] == model_meta["best_val_loss"]
    assert meta["elapsed_s"] == model_meta["elapsed_s"]
    assert meta["optimizer_plugin"] == _provenance("adamw", {"weight_decay": 0.05, "beta1": 0.9, "beta2": 0.99,
                                                             "eps": 1e-8})
    assert meta["aliases"] == {}  # the head is untied: nothing stored once for two names
    weights = safetensors.torch.load_file(run["out"] / checkpoint.MODEL_FILE)
    assert state.weights.keys() == weights.keys()
    assert all(torch.equal(state.weights[name], weights[name]) for name in weights)
    assert state.rng.keys() == {"torch", "batch"}
    moments = state.optimizer_state["state"]
    assert len(moments) == len(weights) and all(entry["step"] == 6 for entry in moments.values())
    model_config, train_config = resume_configs(run["out"], {"steps": 8})
    assert dataclasses.asdict(model_config) == expected["model_config"]
    assert dataclasses.asdict(train_config) == {**expected["train_config"], "steps": 8}


def test_tied_weights_are_stored_once_in_the_training_state_and_restored_as_one(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(tiny, TrainConfig(data=str(sherlock_path), steps=2, batch_size=4, eval_every=2, eval_batches=1,
                            save_every=2, device="cpu"), tmp_path)
    state = checkpoint.load_train_state(tmp_path)
    assert state.meta["aliases"] == {"lm_head.weight": "wte.weight"}
    stored = safetensors.torch.load_file(tmp_path / checkpoint.STATE_FILE)
    assert "model/lm_head.weight" not in stored and "model/wte.weight" in stored
    assert state.weights["lm_head.weight"] is state.weights["wte.weight"]


def test_a_model_file_is_no_training_state_and_a_state_is_no_model(run, tmp_path):
    with pytest.raises(AnexaError, match="is a training state, not a model"):
        checkpoint.load_model(run["out"] / checkpoint.STATE_FILE)
    (tmp_path / checkpoint.STATE_FILE).write_bytes((run["out"] / checkpoint.MODEL_FILE).read_bytes())
    with pytest.raises(AnexaError, match="trained by anexa 0.1, whose runs cannot be resumed"):
        checkpoint.load_train_state(tmp_path)
