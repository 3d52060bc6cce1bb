"""What a run folder's checkpoints record, field by field, after a real training run: everything a later
consumer reads (generate, chat, serve, export, eval, --resume) must be there and mean what it says."""

import dataclasses
import importlib.metadata
import json
import os
import time

import pytest
import safetensors.torch
import torch
from helpers import TINY, ScaledPlugin, loaded_tokenizer, registered, tiny_model

from anexa_core import hookimpl, plugins
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.errors import AnexaError
from anexa_core.io import checkpoint
from anexa_core.train.loop import train
from anexa_core.train.resume import resume_configs

VERSION = importlib.metadata.version("anexa")


def _provenance(name, options):
    return {"name": name, "options": options, "distribution": "anexa", "version": VERSION}


def test_a_run_folder_records_every_field_its_consumers_read(sherlock_path, tmp_path):
    """One short run with a non-default plugin choice of every kind (BPE with a vocabulary size, gpt2 without
    biases, math attention, AdamW with its own weight decay, an untied head), then each of its files.

    One test rather than one per file: mutmut links a test to the code it reaches, and a shared fixture's
    training run would count only for the first test that used it."""
    run = _train_run(sherlock_path, tmp_path)
    _check_latest(run)
    _check_rebuild(run)
    _check_best(run)
    _check_state(run)
    _check_kinds_are_not_mixed_up(run, tmp_path)


def _train_run(sherlock_path, tmp_path):
    text = tmp_path / "holmes.txt"
    text.write_text(sherlock_path.read_text(encoding="utf-8")[:60_000], encoding="utf-8")
    out = tmp_path / "run"
    model_config = ModelConfig(
        n_layer=1,
        n_head=2,
        n_embd=32,
        block_size=32,
        attention="math",
        blocks_options={"bias": False},
        tie_embeddings=False,
    )
    train_config = TrainConfig(
        data=str(text),
        tokenizer="bpe",
        tokenizer_options={"vocab_size": 300},
        optimizer_options={"weight_decay": 0.05},
        steps=6,
        batch_size=4,
        lr=3e-3,
        warmup_steps=1,
        eval_every=3,
        eval_batches=2,
        save_every=100,
        device="cpu",
    )
    started = time.perf_counter()
    result = train(model_config, train_config, out)
    wall_s = time.perf_counter() - started
    metrics = [json.loads(line) for line in (out / checkpoint.METRICS_FILE).read_text().splitlines()]
    return dict(
        out=out, result=result, model_config=model_config, train_config=train_config, metrics=metrics, wall_s=wall_s
    )


def _expected_model_meta(run):
    tokenizer_options = {"vocab_size": 300, "max_train_chars": 100_000_000}
    model_config = dataclasses.replace(
        run["model_config"], vocab_size=300, blocks_options={"bias": False, "gelu": "exact"}
    )
    train_config = dataclasses.replace(
        run["train_config"],
        decay_steps=6,
        tokenizer_options=tokenizer_options,
        optimizer_options={"weight_decay": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8},
    )
    return {
        "format": "anexa/2",
        "anexa_version": VERSION,
        "model_config": dataclasses.asdict(model_config),
        "plugins": {
            "blocks": _provenance("gpt2", {"bias": False, "gelu": "exact"}),
            "attention": _provenance("math", {}),
            "tokenizer": _provenance("bpe", tokenizer_options),
        },
        "train_config": dataclasses.asdict(train_config),
    }, tokenizer_options


def _check_latest(run):
    meta = checkpoint.read_metadata(run["out"] / checkpoint.MODEL_FILE)
    expected, tokenizer_options = _expected_model_meta(run)
    last = run["metrics"][-1]
    assert meta.keys() == {
        *expected,
        "tokenizer",
        "step",
        "val_loss",
        "train_loss",
        "best_step",
        "best_val_loss",
        "elapsed_s",
    }
    for key, value in expected.items():
        assert meta[key] == value, key
    assert meta["tokenizer"]["name"] == "bpe" and meta["tokenizer"]["options"] == tokenizer_options
    assert meta["step"] == 6 == last["step"]
    assert meta["val_loss"] == pytest.approx(last["val_loss"], abs=1e-5) == run["result"].val_loss
    assert meta["train_loss"] == pytest.approx(last["train_loss"], abs=1e-5) == run["result"].train_loss
    best = min(run["metrics"], key=lambda m: m["val_loss"])
    assert meta["best_step"] == best["step"] == run["result"].best_step
    assert meta["best_val_loss"] == pytest.approx(best["val_loss"], abs=1e-5)
    for record in run["metrics"]:  # metrics.jsonl's precision, as the README states it
        assert record.keys() == {"step", "train_loss", "val_loss", "lr", "tokens_per_s", "elapsed_s"}
        assert record["val_loss"] == round(record["val_loss"], 5)
        assert record["train_loss"] == round(record["train_loss"], 5)
        assert record["tokens_per_s"] == round(record["tokens_per_s"], 1)
    # The last save comes after the last evaluation, within the run (saves fsync: their time varies with load).
    assert 0 < last["elapsed_s"] <= meta["elapsed_s"] <= run["wall_s"] + 0.01


def _check_rebuild(run):
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


def _check_best(run):
    best_meta = checkpoint.read_metadata(run["out"] / checkpoint.BEST_FILE)
    expected, _ = _expected_model_meta(run)
    record = next(m for m in run["metrics"] if m["step"] == run["result"].best_step)
    for key, value in expected.items():
        assert best_meta[key] == value, key
    assert best_meta["step"] == record["step"]
    assert best_meta["val_loss"] == pytest.approx(record["val_loss"], abs=1e-5)
    assert best_meta["train_loss"] == pytest.approx(record["train_loss"], abs=1e-5)
    assert checkpoint.checkpoint_file(run["out"]) == run["out"] / checkpoint.BEST_FILE


def _check_state(run):
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
    assert meta["optimizer_plugin"] == _provenance(
        "adamw", {"weight_decay": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    )
    assert meta["aliases"] == {}  # the head is untied: nothing stored once for two names
    weights = safetensors.torch.load_file(run["out"] / checkpoint.MODEL_FILE)
    assert state.weights.keys() == weights.keys()
    # The file's layout is part of its format (a later Anexa reads it): weights under model/, the optimizer's
    # tensors under optimizer., the RNG states under rng/.
    stored = safetensors.torch.load_file(run["out"] / checkpoint.STATE_FILE)
    assert {name.split("/")[0].split(".")[0] for name in stored} == {"model", "optimizer", "rng"}
    assert {name.removeprefix("model/") for name in stored if name.startswith("model/")} == weights.keys()
    assert all(torch.equal(state.weights[name], weights[name]) for name in weights)
    assert state.rng.keys() == {"torch", "batch"}
    moments = state.optimizer_state["state"]
    assert len(moments) == len(weights) and all(entry["step"] == 6 for entry in moments.values())
    model_config, train_config = resume_configs(run["out"], {"steps": 8})
    assert dataclasses.asdict(model_config) == expected["model_config"]
    assert dataclasses.asdict(train_config) == {**expected["train_config"], "steps": 8}


def test_tied_weights_are_stored_once_in_the_training_state_and_restored_as_one(sherlock_path, tmp_path):
    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    train(
        tiny,
        TrainConfig(
            data=str(sherlock_path), steps=2, batch_size=4, eval_every=2, eval_batches=1, save_every=2, device="cpu"
        ),
        tmp_path,
    )
    state = checkpoint.load_train_state(tmp_path)
    assert state.meta["aliases"] == {"lm_head.weight": "wte.weight"}
    stored = safetensors.torch.load_file(tmp_path / checkpoint.STATE_FILE)
    assert "model/lm_head.weight" not in stored and "model/wte.weight" in stored
    assert state.weights["lm_head.weight"] is state.weights["wte.weight"]


def _check_kinds_are_not_mixed_up(run, tmp_path):
    with pytest.raises(AnexaError, match="is a training state, not a model"):
        checkpoint.load_model(run["out"] / checkpoint.STATE_FILE)
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / checkpoint.STATE_FILE).write_bytes((run["out"] / checkpoint.MODEL_FILE).read_bytes())
    with pytest.raises(AnexaError, match=r"trained by anexa 0.1, whose runs cannot be resumed"):
        checkpoint.load_train_state(tmp_path / "copy")


# --- loading what does not fit --------------------------------------------------------------------

CHARS = {"type": "char", "chars": "".join(chr(97 + i) for i in range(TINY.vocab_size))}


def _save(path, model, **changes):
    """``model`` saved with its metadata, changed by ``changes`` (top-level keys, ``model_config`` merged)."""
    tokenizer = loaded_tokenizer("char", CHARS)
    meta = checkpoint.model_metadata(model, tokenizer, "char", {}, step=3, val_loss=2.5)
    meta["model_config"].update(changes.pop("model_config", {}))
    meta.update(changes)
    checkpoint.save_model(path, model, meta)
    return path


def test_weights_of_other_blocks_are_refused_naming_what_does_not_match(tmp_path):
    path = _save(tmp_path / "model.safetensors", tiny_model(), model_config={"blocks": "llama", "blocks_options": {}})
    with pytest.raises(AnexaError) as error:
        checkpoint.load_model(path)
    assert str(error.value) == (
        f"checkpoint {path} does not match the 'llama' blocks (missing ['blocks.layers.0.input_layernorm.weight', "
        "'blocks.layers.0.mlp.down_proj.weight', 'blocks.layers.0.mlp.gate_proj.weight'], unexpected "
        "['blocks.layers.0.attn.proj.bias', 'blocks.layers.0.attn.proj.weight', 'blocks.layers.0.attn.qkv.bias']): "
        "is the right plugin installed?"
    )


def test_a_missing_or_an_extra_tensor_alone_is_refused(tmp_path):
    model = tiny_model()
    tokenizer = loaded_tokenizer("char", CHARS)
    meta = {"anexa": json.dumps(checkpoint.model_metadata(model, tokenizer, "char", {}))}
    weights = {name: t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    safetensors.torch.save_file({**weights, "extra.weight": torch.zeros(2)}, tmp_path / "extra.safetensors", meta)
    with pytest.raises(
        AnexaError,
        match=r"^checkpoint .*extra.safetensors does not match the 'gpt2' blocks \(missing "
        r"\[\], unexpected \['extra.weight'\]\)",
    ):
        checkpoint.load_model(tmp_path / "extra.safetensors")
    weights.pop("blocks.ln_f.bias")
    safetensors.torch.save_file(weights, tmp_path / "missing.safetensors", meta)
    with pytest.raises(AnexaError, match=r"\(missing \['blocks.ln_f.bias'\], unexpected \[\]\)"):
        checkpoint.load_model(tmp_path / "missing.safetensors")


def test_an_untied_checkpoint_without_its_head_is_refused_and_a_tied_one_needs_none(tmp_path):
    model = tiny_model(tie_embeddings=False)
    tokenizer = loaded_tokenizer("char", CHARS)
    meta = {"anexa": json.dumps(checkpoint.model_metadata(model, tokenizer, "char", {}))}
    weights = {name: t.contiguous() for name, t in model.state_dict().items() if name != "lm_head.weight"}
    safetensors.torch.save_file(weights, tmp_path / "headless.safetensors", meta)
    with pytest.raises(AnexaError, match=r"\(missing \['lm_head.weight'\], unexpected \[\]\)"):
        checkpoint.load_model(tmp_path / "headless.safetensors")
    tied = tiny_model()
    meta = {"anexa": json.dumps(checkpoint.model_metadata(tied, tokenizer, "char", {}))}
    weights = {name: t.contiguous() for name, t in tied.state_dict().items() if name != "lm_head.weight"}
    safetensors.torch.save_file(weights, tmp_path / "tied.safetensors", meta)
    loaded, _, _ = checkpoint.load_model(tmp_path / "tied.safetensors")
    assert loaded.lm_head.weight is loaded.wte.weight and torch.equal(loaded.wte.weight, tied.wte.weight)


def test_weights_of_another_shape_are_a_corrupt_checkpoint(tmp_path):
    path = _save(tmp_path / "model.safetensors", tiny_model(), model_config={"n_embd": 64})
    with pytest.raises(AnexaError) as error:
        checkpoint.load_model(path)
    assert str(error.value) == f"checkpoint {path} is corrupt (RuntimeError): retrain or pass another --model"


def test_a_malformed_model_config_names_the_checkpoint(tmp_path):
    path = _save(tmp_path / "model.safetensors", tiny_model(), model_config={"n_head": 5})
    with pytest.raises(
        AnexaError,
        match=rf"^checkpoint {path} has a malformed model config \(n_embd \(32\) must be "
        r"divisible by n_head \(5\)\): retrain or pass another --model$",
    ):
        checkpoint.load_model(path)


def test_another_attention_and_its_options_replace_the_recorded_one(tmp_path):
    model = tiny_model(seed=4)
    path = _save(tmp_path / "model.safetensors", model)
    ids = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    with registered(ScaledPlugin(), "test-scaled"):
        same, _, _ = checkpoint.load_model(path, attention="scaled")
        assert same.config.attention == "scaled" and same.config.attention_options == {"factor": 1.0}
        torch.testing.assert_close(same(ids)[0], model(ids)[0], rtol=1e-5, atol=1e-5)
        sharper, _, meta = checkpoint.load_model(path, attention="scaled", attention_options={"factor": 3.0})
        assert sharper.config.attention_options == {"factor": 3.0}
        assert not torch.allclose(sharper(ids)[0], model(ids)[0], atol=1e-3)
        assert meta["model_config"]["attention"] == "sdpa"  # the metadata still says what it was trained with


# --- checkpoints of anexa 0.1 ---------------------------------------------------------------------


def _anexa_01(path, model, tokenizer_name, tokenizer_state, bias, vocab_size=None):
    """A checkpoint as anexa 0.1 wrote it: ``bias`` in the model config, no plugin options, the tokenizer's
    vocabulary under ``data`` and its plugin under ``tokenizers``."""
    config = {
        key: value
        for key, value in dataclasses.asdict(model.config).items()
        if key not in ("blocks_options", "attention_options")
    }
    config["bias"] = bias
    old = {"name": "x", "distribution": "anexa", "version": "0.1.0"}
    meta = {
        "format": "anexa/1",
        "anexa_version": "0.1.0",
        "model_config": config,
        "step": 9,
        "val_loss": 1.25,
        "tokenizer": {"name": tokenizer_name, "data": tokenizer_state},
        "plugins": {
            "blocks": {**old, "name": config["blocks"]},
            "attention": {**old, "name": "sdpa"},
            "tokenizers": {**old, "name": tokenizer_name},
        },
        "train_config": {"steps": 9, "vocab_size": vocab_size},
    }
    safetensors.torch.save_model(model, str(path), metadata={"anexa": json.dumps(meta)})
    return path


@pytest.mark.parametrize("vocab_size", [None, 512])
def test_an_anexa_01_checkpoint_loads_with_its_settings_as_plugin_options(tmp_path, vocab_size):
    """(anexa 0.1 accepted ``--vocab-size`` with the char tokenizer and ignored it: so does the migration.)"""
    model = tiny_model(seed=2, blocks_options={"bias": False})
    path = _anexa_01(tmp_path / "model.safetensors", model, "char", CHARS, bias=False, vocab_size=vocab_size)
    meta = checkpoint.read_metadata(path)
    assert meta["format"] == "anexa/1" and meta["step"] == 9 and meta["val_loss"] == 1.25
    assert "bias" not in meta["model_config"]
    assert meta["model_config"]["blocks_options"] == {"bias": False}
    assert meta["model_config"]["attention_options"] == {}
    assert meta["tokenizer"] == {"name": "char", "options": {}, "state": CHARS}
    old = {"distribution": "anexa", "version": "0.1.0"}
    assert meta["plugins"] == {
        "blocks": {"name": "gpt2", **old, "options": {"bias": False}},
        "attention": {"name": "sdpa", **old, "options": {}},
        "tokenizer": {"name": "char", **old, "options": {}},
    }
    loaded, tokenizer, _ = checkpoint.load_model(path)
    ids = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(1))
    assert torch.equal(loaded(ids)[0], model(ids)[0])
    assert tokenizer.decode(tokenizer.encode("abc")) == "abc"


def test_an_anexa_01_bpe_checkpoint_gets_the_vocab_size_it_was_trained_with(tmp_path, sherlock_path):
    text = sherlock_path.read_text(encoding="utf-8")[:20_000]
    bpe = plugins.create("tokenizers", "bpe", {"vocab_size": 300})[0]
    bpe.train([text])
    model = tiny_model(vocab_size=bpe.vocab_size)
    path = _anexa_01(tmp_path / "model.safetensors", model, "bpe", bpe.state_dict(), bias=True, vocab_size=300)
    meta = checkpoint.read_metadata(path)
    assert meta["model_config"]["blocks_options"] == {"bias": True}
    assert meta["tokenizer"]["options"] == {"vocab_size": 300} == meta["plugins"]["tokenizer"]["options"]
    _, tokenizer, _ = checkpoint.load_model(path)
    assert tokenizer.encode(text[:500]) == bpe.encode(text[:500])


def test_an_anexa_01_checkpoint_of_other_blocks_gets_no_bias_option(tmp_path):
    model = tiny_model(blocks="llama")
    path = _anexa_01(tmp_path / "model.safetensors", model, "char", CHARS, bias=True)
    meta = checkpoint.read_metadata(path)
    assert meta["model_config"]["blocks_options"] == {} and meta["plugins"]["blocks"]["options"] == {}
    loaded, _, _ = checkpoint.load_model(path)
    assert loaded.config.blocks == "llama"


def test_an_anexa_01_checkpoint_without_a_bias_setting_or_plugin_record_is_gpt2_with_biases(tmp_path):
    """0.1's defaults: ``bias`` absent meant biases; a checkpoint that recorded no plugins still loads."""
    model = tiny_model(seed=4, blocks_options={"bias": True})
    path = _anexa_01(tmp_path / "model.safetensors", model, "char", CHARS, bias=True)
    with safetensors.safe_open(str(path), framework="pt") as handle:
        meta = json.loads(handle.metadata()["anexa"])
    del meta["model_config"]["bias"], meta["plugins"]
    safetensors.torch.save_model(model, str(path), metadata={"anexa": json.dumps(meta)})
    migrated = checkpoint.read_metadata(path)
    assert migrated["model_config"]["blocks_options"] == {"bias": True}
    assert migrated["plugins"] == {
        "blocks": {"options": {"bias": True}},
        "attention": {"options": {}},
        "tokenizer": {"options": {}},
    }
    loaded, _, _ = checkpoint.load_model(path)
    ids = torch.randint(0, TINY.vocab_size, (1, 16), generator=torch.Generator().manual_seed(2))
    assert torch.equal(loaded(ids)[0], model(ids)[0])


def test_an_anexa_01_training_state_is_read_as_it_is_and_cannot_be_resumed(tmp_path):
    old_state = {"format": "anexa/1", "step": 5, "optimizer": "adamw"}
    safetensors.torch.save_file(
        {"x": torch.zeros(1)}, tmp_path / checkpoint.STATE_FILE, metadata={"anexa": json.dumps(old_state)}
    )
    assert checkpoint.read_metadata(tmp_path / checkpoint.STATE_FILE) == old_state
    with pytest.raises(AnexaError) as error:
        checkpoint.load_train_state(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} was trained by anexa 0.1, whose runs cannot be resumed by anexa {VERSION}: "
        "start a new run (its model still loads for generate and chat)"
    )


# --- finding runs ---------------------------------------------------------------------------------


def test_a_folder_holds_a_run_unless_its_only_weights_are_readable_and_not_anexas(tmp_path):
    """A Hugging Face folder (weights without Anexa's metadata) is not a run; Anexa's weights, a damaged
    file, a best model or a training state are: nothing a user trained is replaced on a guess."""
    anexa, foreign, damaged, best, empty = (tmp_path / name for name in ("anexa", "foreign", "damaged", "best", "e"))
    for folder in (anexa, foreign, damaged, best, empty):
        folder.mkdir()
    weights = {"w": torch.ones(4)}
    safetensors.torch.save_file(weights, anexa / checkpoint.MODEL_FILE, metadata={"anexa": "{}"})
    safetensors.torch.save_file(weights, foreign / checkpoint.MODEL_FILE, metadata={"format": "pt"})
    (damaged / checkpoint.MODEL_FILE).write_bytes((anexa / checkpoint.MODEL_FILE).read_bytes()[:20])
    (best / checkpoint.BEST_FILE).write_bytes(b"")
    holds = {folder.name: checkpoint.holds_a_run(folder) for folder in (anexa, foreign, damaged, best, empty)}
    assert holds == {"anexa": True, "foreign": False, "damaged": True, "best": True, "e": False}


def test_the_latest_run_is_the_most_recently_written_model(tmp_path):
    with pytest.raises(AnexaError) as error:
        checkpoint.latest_run(tmp_path)
    assert str(error.value) == f"no trained model under {tmp_path}/: run `anexa train` first or pass --model DIR"
    for age, name in ((30, "old"), (10, "new"), (20, "middle")):
        (tmp_path / name).mkdir()
        _save(tmp_path / name / checkpoint.MODEL_FILE, tiny_model())
        stamp = 1_700_000_000 - age
        os.utime(tmp_path / name / checkpoint.MODEL_FILE, (stamp, stamp))
    (tmp_path / "stray").mkdir()
    (tmp_path / "stray" / "notes.txt").write_text("no model here")
    assert checkpoint.latest_run(tmp_path) == tmp_path / "new"


# --- what a checkpoint says about its plugins reaches the plugins ---------------------------------


@dataclasses.dataclass
class Rotated:
    """A tokenizer whose option changes the ids: character i of the vocabulary is id (i + shift) % size."""

    shift: int = 0

    def train(self, texts):
        self.chars = "".join(sorted(set("".join(texts))))
        self.vocab_size = len(self.chars)

    def encode(self, text):
        return [(self.chars.index(c) + self.shift) % self.vocab_size for c in text]

    def decode(self, ids):
        return "".join(self.chars[(i - self.shift) % self.vocab_size] for i in ids)

    def state_dict(self):
        return {"chars": self.chars}

    def load_state_dict(self, state):
        self.chars, self.vocab_size = state["chars"], len(state["chars"])


class RotatedPlugin:
    @hookimpl
    def register_tokenizers(self, register):
        register("rotated", Rotated)


def test_the_tokenizer_is_rebuilt_with_its_recorded_options(tmp_path):
    with registered(RotatedPlugin(), "test-rotated"):
        tokenizer = Rotated(shift=3)
        tokenizer.train([CHARS["chars"]])
        model = tiny_model()
        meta = checkpoint.model_metadata(model, tokenizer, "rotated", {"shift": 3})
        assert meta["tokenizer"] == {"name": "rotated", "options": {"shift": 3}, "state": {"chars": CHARS["chars"]}}
        checkpoint.save_model(tmp_path / "model.safetensors", model, meta)
        _, loaded, _ = checkpoint.load_model(tmp_path)
        assert loaded.shift == 3 and loaded.encode("abc") == tokenizer.encode("abc") == [3, 4, 5]


@pytest.mark.parametrize(
    "kind, entry, message",
    [
        (
            "tokenizer",
            {"name": "wordpiece", "distribution": "anexa-wordpiece", "version": "2.0"},
            "this model needs tokenizer 'wordpiece' from anexa-wordpiece 2.0: pip install anexa-wordpiece",
        ),
        (
            "blocks",
            {"name": "mamba", "distribution": "anexa-mamba", "version": "0.3"},
            "this model needs blocks 'mamba' from anexa-mamba 0.3: pip install anexa-mamba",
        ),
        (
            "attention",
            {"name": "flash3", "distribution": "anexa-flash", "version": "1.0"},
            "this model needs attention 'flash3' from anexa-flash 1.0: pip install anexa-flash",
        ),
    ],
)
def test_a_checkpoint_of_a_plugin_that_is_not_installed_says_what_to_install(tmp_path, kind, entry, message):
    model = tiny_model()
    tokenizer = loaded_tokenizer("char", CHARS)
    meta = checkpoint.model_metadata(model, tokenizer, "char", {})
    meta["plugins"][kind] = {**entry, "options": {}}
    if kind == "tokenizer":
        meta["tokenizer"]["name"] = entry["name"]
    else:
        meta["model_config"][kind] = entry["name"]
        meta["model_config"][f"{kind}_options"] = {}
    checkpoint.save_model(tmp_path / "model.safetensors", model, meta)
    with pytest.raises(AnexaError) as error:
        checkpoint.load_model(tmp_path)
    assert str(error.value) == message


def test_nested_optimizer_state_round_trips_through_the_training_state_format():
    tensors = {}
    state = {
        "state": {0: {"step": torch.tensor(3.0), "pair": (torch.ones(2), [torch.zeros(1), {"x": torch.eye(2)}])}},
        "param_groups": [{"betas": (0.9, 0.99), "name": None, "flag": True, "params": [0, 1]}],
        7: "seven",
    }
    flat = checkpoint._flatten(state, "optimizer", tensors)
    assert json.loads(json.dumps(flat)) == flat  # plain JSON, the tensors set aside
    assert all(isinstance(t, torch.Tensor) for t in tensors.values()) and len(tensors) == 4
    back = checkpoint._unflatten(json.loads(json.dumps(flat)), tensors)
    assert back.keys() == state.keys() and back[7] == "seven"
    assert back["param_groups"] == state["param_groups"] and isinstance(back["param_groups"][0]["betas"], tuple)
    pair = back["state"][0]["pair"]
    assert isinstance(pair, tuple) and torch.equal(pair[0], torch.ones(2))
    assert torch.equal(pair[1][0], torch.zeros(1)) and torch.equal(pair[1][1]["x"], torch.eye(2))
    assert torch.equal(back["state"][0]["step"], torch.tensor(3.0))
    with pytest.raises(TypeError, match="cannot store set in a training state"):
        checkpoint._flatten({"bad": {1, 2}}, "optimizer", {})


def test_a_folder_without_a_training_state_is_no_run_to_resume(tmp_path):
    with pytest.raises(AnexaError) as error:
        checkpoint.load_train_state(tmp_path)
    assert str(error.value) == (
        f"{tmp_path} holds no train_state.safetensors: pass the folder of an `anexa train` run that saved at least once"
    )
    with pytest.raises(AnexaError) as error:  # a typo in --resume: no such folder, not a folder without state
        checkpoint.load_train_state(tmp_path / "nosuch")
    assert str(error.value) == (
        f"no run at {tmp_path / 'nosuch'}: pass the folder of an `anexa train` run (`anexa runs` lists them)"
    )


def _safetensors_with(path, metadata):
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda d: d / "nothing.safetensors",
            "no checkpoint at {path}: pass the folder of a run (`anexa runs` lists them), or make one with `anexa train` or `anexa import`",
        ),
        (
            lambda d: d,
            "no checkpoint at {path}/model.safetensors: pass the folder of a run (`anexa runs` lists them), or make one with `anexa train` or `anexa import`",
        ),
        (
            lambda d: (d / "README.md").write_text("# notes\n") and d / "README.md",
            "{path} is not a safetensors checkpoint: pass a run folder or a model.safetensors",
        ),
        (
            lambda d: _safetensors_with(d / "m.safetensors", None).write_bytes(b"\x10" * 20) and d / "m.safetensors",
            "checkpoint {path} is corrupt (SafetensorError): retrain or pass another --model",
        ),
        (
            lambda d: _safetensors_with(d / "m.safetensors", None),
            "{path} is not an Anexa checkpoint: pass a model.safetensors written by `anexa train`",
        ),
        (
            lambda d: _safetensors_with(d / "m.safetensors", {"anexa": json.dumps({"format": "other/1"})}),
            "{path} is not an Anexa checkpoint: pass a model.safetensors written by `anexa train`",
        ),
        (
            lambda d: _safetensors_with(d / "m.safetensors", {"anexa": json.dumps(["anexa/2"])}),
            "{path} is not an Anexa checkpoint: pass a model.safetensors written by `anexa train`",
        ),
        (
            lambda d: os.mkfifo(d / "pipe.safetensors") or d / "pipe.safetensors",  # reading it would block
            "{path} is not a file: pass a run folder or a model.safetensors",
        ),
        (
            lambda d: (d / "m.gguf").write_bytes(b"GGUF\x03\x00\x00\x00") and d / "m.gguf",
            "{path} is a GGUF file, not an Anexa run: `anexa import {path} --out runs/NAME` makes it one",
        ),
        (
            lambda d: (d / "config.json").write_text("{}") and _safetensors_with(d / "model.safetensors", None),
            "{path.parent} is a Hugging Face model folder, not an Anexa run: `anexa import {path.parent} --out "
            "runs/NAME` makes it one",
        ),
    ],
    ids=[
        "missing file",
        "folder without a run",
        "not safetensors",
        "truncated",
        "no anexa metadata",
        "another format",
        "metadata not an object",
        "a named pipe",
        "a GGUF file",
        "a Hugging Face folder's weights",
    ],
)
def test_each_kind_of_wrong_file_gets_its_own_one_line_message(tmp_path, make, message):
    path = make(tmp_path)
    with pytest.raises(AnexaError) as error:
        checkpoint.read_metadata(path)
    assert str(error.value) == message.format(path=path)
