"""`anexa import`: Hugging Face folders and hub ids become Anexa runs that compute what transformers computes.

Tiny random models of each family the blocks read (Llama with grouped-query heads and an untied head,
Qwen3 with QK-norm and a head wider than hidden/heads, GPT-2 with the tanh GELU) are saved by transformers'
`save_pretrained` with a real fast tokenizer and a ChatML template, imported, and compared with transformers
in float32: logits within 1e-4 and greedy continuations token for token. The GGUF path and the real
SmolLM2 model are in test_smollm2.py.
"""

import json
import os
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from helpers import user_error

from anexa_core import AnexaError
from anexa_core.infer.generation import generate_ids
from anexa_core.io import checkpoint, generation_config, pretrained
from anexa_core.io.export import export, shareable_model
from anexa_core.io.load import load
from anexa_core.io.pretrained import Origin, import_model, is_hub_id, origin_of

transformers = pytest.importorskip("transformers")

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
FAMILIES = {
    "llama": lambda vocab: transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=96,
        rope_theta=5000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        architectures=["LlamaForCausalLM"],
    ),
    "qwen3": lambda vocab: transformers.Qwen3Config(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=32,
        max_position_embeddings=96,
        rope_theta=20000.0,
        tie_word_embeddings=True,
        architectures=["Qwen3ForCausalLM"],
    ),
    "gpt2": lambda vocab: transformers.GPT2Config(
        vocab_size=vocab,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=96,
        activation_function="gelu_new",
        architectures=["GPT2LMHeadModel"],
    ),
}


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory, sherlock_path):
    """A byte-level BPE trained on Sherlock with ChatML's special tokens, as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([sherlock_path.read_text(encoding="utf-8")[:200_000]], trainer)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|im_start|>", eos_token="<|im_end|>", unk_token="<|endoftext|>"
    )
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="module")
def folders(tmp_path_factory, hf_tokenizer):
    """Each family saved by transformers (float32, random weights) with the tokenizer."""
    made = {}
    for name, make in FAMILIES.items():
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(make(len(hf_tokenizer)), dtype=torch.float32)
        folder = tmp_path_factory.mktemp(f"hf-{name}")
        model.save_pretrained(folder)
        hf_tokenizer.save_pretrained(folder)
        made[name] = (folder, model.eval())
    return made


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_an_imported_model_computes_what_transformers_computes(folders, family, tmp_path, hf_tokenizer):
    folder, reference = folders[family]
    done = import_model(folder, tmp_path / "run")
    assert done.architecture == reference.config.architectures[0]
    loaded = load(tmp_path / "run", "cpu")
    ids = torch.randint(0, len(hf_tokenizer), (2, 90), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = loaded.model(ids)
        theirs = reference(ids).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    prompt = hf_tokenizer("It was a dark night, and Holmes", add_special_tokens=False).input_ids
    assert loaded.tokenizer.encode("It was a dark night, and Holmes") == prompt
    with torch.no_grad():
        expected = reference.generate(
            torch.tensor([prompt]), max_new_tokens=30, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
    greedy = type("Greedy", (), {"pick": lambda self, logits, context, generator=None: logits.argmax(-1, keepdim=True)})
    assert list(generate_ids(loaded.model, prompt, 30, greedy())) == expected
    assert loaded.tokenizer.chat_template == CHATML and loaded.tokenizer.eos_ids == [hf_tokenizer.eos_token_id]
    meta = loaded.meta
    assert meta["imported_from"]["kind"] == "folder" and str(tmp_path) not in json.dumps(meta["imported_from"])


def test_what_cannot_be_imported_is_refused_in_one_line_and_nothing_is_written(folders, tmp_path):
    folder, _ = folders["llama"]
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    config = json.loads((broken / "config.json").read_text())
    (broken / "config.json").write_text(json.dumps({**config, "architectures": ["MambaForCausalLM"]}))
    with pytest.raises(AnexaError) as error:
        import_model(broken, tmp_path / "out")
    assert str(error.value).startswith(
        "unsupported architecture 'MambaForCausalLM': Anexa imports GPT2LMHeadModel "
        "(blocks gpt2), LlamaForCausalLM (blocks llama), Qwen3ForCausalLM (blocks llama)"
    )
    (broken / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(
        AnexaError, match=r"the LlamaForCausalLM weights do not match its config \(missing \['blocks.layers.2"
    ):
        import_model(broken, tmp_path / "out")
    (broken / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3", "factor": 8}}))
    with pytest.raises(AnexaError, match="it uses rotary scaling 'llama3', which Anexa's llama blocks do not compute"):
        import_model(broken, tmp_path / "out")
    (broken / "config.json").write_text(json.dumps(config))
    for weights in broken.glob("*.safetensors"):
        weights.rename(weights.with_suffix(".bin"))
    with pytest.raises(AnexaError, match=r"holds no safetensors weights \(it has model.bin: pickled weights"):
        import_model(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    user_error(["import", str(tmp_path / "nothing-here.gguf")], "does not exist")


def _broken_copy(folder, target, config_changes=None, drop=(), files=None):
    """A copy of an HF ``folder`` with config entries changed (``None`` removes one), tensors dropped and
    files written (name: bytes)."""
    import safetensors.torch

    shutil.copytree(folder, target)
    config = json.loads((target / "config.json").read_text())
    config = {**config, **(config_changes or {})}
    (target / "config.json").write_text(json.dumps({key: value for key, value in config.items() if value is not None}))
    if drop:
        tensors = safetensors.torch.load_file(str(target / "model.safetensors"))
        safetensors.torch.save_file(
            {k: v for k, v in tensors.items() if k not in drop}, str(target / "model.safetensors")
        )
    for name, data in (files or {}).items():
        (target / name).write_bytes(data)
    return target


def test_a_folder_whose_config_weights_or_tokenizer_files_are_wrong_is_one_line(folders, tmp_path):
    """Found by a QA session: a config that disagrees with its weights, a value of the wrong kind or a
    damaged tokenizer file was a KeyError, ValueError or tokenizers' traceback; a layer count of 10**9 built
    a model for minutes. Each is one line, nothing written."""
    llama, gpt2 = folders["llama"][0], folders["gpt2"][0]
    cases = [
        (llama, {"tie_word_embeddings": False}, ["lm_head.weight"], None, "lacks 'lm_head.weight' (its config or"),
        (llama, None, ["model.embed_tokens.weight"], None, "lacks 'model.embed_tokens.weight'"),
        (llama, {"hidden_size": None}, (), None, "the LlamaForCausalLM model lacks 'hidden_size'"),
        (llama, {"rms_norm_eps": "small"}, (), None, "holds a value of the wrong kind (ValueError: "),
        (llama, {"num_hidden_layers": 10**9}, (), None, "says 1000000000 layers but the weights hold"),
        (gpt2, {"n_layer": 3}, (), None, "the GPT2LMHeadModel model lacks 'transformer.h.2.ln_1.weight'"),
        (llama, None, (), {"tokenizer.json": b"{not json"}, "tokenizer.json cannot be read ("),
        (llama, None, (), {"chat_template.jinja": b"\xff\xfe{{"}, "chat_template.jinja cannot be read as UTF-8"),
    ]
    for index, (folder, changes, drop, files, message) in enumerate(cases):
        broken = _broken_copy(folder, tmp_path / f"broken{index}", changes, drop, files)
        with pytest.raises(AnexaError) as error:
            import_model(broken, tmp_path / "out")
        assert message in str(error.value) and "\n" not in str(error.value), (index, str(error.value))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))
    listed = _broken_copy(llama, tmp_path / "listed", files={"tokenizer_config.json": b'{"chat_template": [1, 2]}'})
    import_model(listed, tmp_path / "listed-run")  # a list of non-templates: no template, not a traceback
    alone = _broken_copy(llama, tmp_path / "alone", {"architectures": "LlamaForCausalLM"})
    assert import_model(alone, tmp_path / "alone-run").architecture == "LlamaForCausalLM"  # was "unsupported 'L'"


def test_gpt2_weights_saved_without_the_transformer_prefix_import(folders, tmp_path):
    """OpenAI's GPT-2 weights are saved under the base model's names (``h.0.attn…``, ``wte.weight``), which
    transformers prefixes on loading; Anexa did not (found by a QA session: KeyError 'transformer.wte.weight')."""
    import safetensors.torch

    folder, reference = folders["gpt2"]
    bare = shutil.copytree(folder, tmp_path / "bare")
    tensors = safetensors.torch.load_file(str(bare / "model.safetensors"))
    safetensors.torch.save_file(
        {k.removeprefix("transformer."): v for k, v in tensors.items()}, str(bare / "model.safetensors")
    )
    import_model(bare, tmp_path / "run")
    ids = torch.randint(0, 300, (1, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours, _ = load(tmp_path / "run", "cpu").model(ids)
        assert (ours - reference(ids).logits).abs().max().item() < 1e-4


@pytest.mark.parametrize(
    ("spec", "hub"),
    [
        ("HuggingFaceTB/SmolLM2-135M-Instruct", True),
        ("bartowski/SmolLM2-135M-Instruct-GGUF/SmolLM2-135M-Instruct-Q4_K_M.gguf", True),
        ("runs/smol", False),  # exists here: a local run, never a hub id
        ("org/name/model.safetensors", False),  # a third part is only a GGUF file of the repository
        ("./org/name", False),
        ("~org/name", False),
        ("/org/name", False),
        ("org/name/", False),
        ("org", False),
        ("org/na me", False),
    ],
)
def test_one_rule_tells_a_hub_id_from_a_local_path_for_import_and_for_the_model_card(spec, hub, tmp_path, monkeypatch):
    """``anexa import`` and what the model card shares use the same rule: a hub id is shared as it is, a
    local path only by its last name."""
    (tmp_path / "runs" / "smol").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert is_hub_id(spec) is hub
    assert shareable_model(spec) == (spec if hub else spec.rstrip("/").rsplit("/", 1)[-1])


def test_a_models_origin_is_its_import_or_what_its_fine_tunes_recorded_or_followed(tmp_path, monkeypatch):
    """What a model card says a model came from: an import's record; a fine-tune's ``base_origin``; for a
    fine-tune written before it recorded one, its ``--init-from`` followed through other runs (checkpoint
    metadata stands in a table here). ``direct``: ``--init-from NAME`` starts from those very weights."""
    record = {"kind": "gguf", "name": "Tiny.gguf", "license": "mit"}
    metas = {
        "imp": {"imported_from": record},
        "ft1": {"train_config": {"init_from": "imp"}},
        "ft2": {"train_config": {"init_from": "ft1"}},
        "loop": {"train_config": {"init_from": "loop"}},
        "recorded": {"base_origin": {"source": record, "direct": True}, "train_config": {"init_from": "gone"}},
        "tuned-gguf": {"train_config": {"init_from": "models/b.GGUF"}},
        "tuned-hub": {"train_config": {"init_from": "org/cached"}},
        **{f"ft{n}": {"train_config": {"init_from": f"ft{n - 1}"}} for n in range(3, 11)},  # a long chain
    }

    def read_metadata(path):
        if str(path) not in metas:
            raise AnexaError(f"no checkpoint at {path}")
        return metas[str(path)]

    monkeypatch.setattr(checkpoint, "read_metadata", read_metadata)
    monkeypatch.setattr(pretrained, "_cached", lambda hub_id: hub_id == "org/cached")
    (tmp_path / "HF-Model").mkdir()
    (tmp_path / "HF-Model" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path / "HF-Model")

    def of(**train_config):
        return origin_of({"train_config": train_config})

    assert origin_of(metas["imp"]) == Origin(record, True)
    assert of(init_from="imp") == origin_of(metas["ft1"]) == Origin(record, True)
    assert of(init_from="ft1") == Origin(record, False) and of(init_from="ft2") == Origin(record, False)
    assert origin_of(metas["ft9"]) == Origin(record, False) and origin_of(metas["ft10"]) is None  # nine deep at most
    assert origin_of(metas["recorded"]) == Origin(record, True) and of(init_from="recorded") == Origin(record, False)
    assert origin_of({"train_config": {"init_from": "gone"}, "lora": {"base": {"path": "imp"}}}) == Origin(record, True)
    assert of(init_from="models/a.gguf") == Origin({"kind": "gguf", "name": "a.gguf"}, True)
    assert of(init_from="tuned-gguf") == Origin({"kind": "gguf", "name": "b.GGUF"}, False)
    assert of(init_from=".") == Origin({"kind": "folder", "name": "HF-Model"}, True)  # by its name, not "."
    assert of(init_from="org/cached") == Origin({"kind": "hub", "name": "org/cached"}, True)
    assert of(init_from="tuned-hub") == Origin({"kind": "hub", "name": "org/cached"}, False)
    for nothing in (of(init_from="loop"), of(init_from="org/missing"), of(init_from="gone"), of(), origin_of({})):
        assert nothing is None
    assert [Origin({"kind": kind, "name": "N"}, True).describe() for kind in ("gguf", "folder", "hub")] == [
        "the GGUF file `N`",
        "the Hugging Face model folder `N`",
        "the Hugging Face model `N`",
    ]
    assert Origin(record, False).as_dict() == {"source": record, "direct": False}
    hub_ids = [
        Origin({"kind": "hub", "name": "org/name"}, True),
        Origin({"kind": "hub", "name": "org/name/model-Q8_0.gguf"}, True),  # one file of a repository
        Origin({"kind": "gguf", "name": "x.gguf", "repository": "org/name"}, True),  # the file named its source
    ]
    assert [origin.hub_id() for origin in hub_ids] == ["org/name"] * 3 and Origin(record, True).hub_id() is None


def test_a_hub_id_comes_from_the_huggingface_cache_and_offline_without_it_is_one_line(folders, tmp_path, monkeypatch):
    """huggingface_hub's cache layout (models--ORG--NAME/refs/main → snapshots/COMMIT) filled by hand: the
    import reads it offline; an id not in the cache names the fix."""
    folder, _ = folders["gpt2"]
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--anexa-test--tiny-gpt2"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    import_model("anexa-test/tiny-gpt2", tmp_path / "run")
    meta = load(tmp_path / "run", "cpu").meta
    source = meta["imported_from"]
    assert {key: source[key] for key in ("kind", "name", "revision")} == {
        "kind": "hub",
        "name": "anexa-test/tiny-gpt2",
        "revision": commit,
    }
    assert len(source["sha256"]) == 64
    with pytest.raises(AnexaError) as error:
        import_model("anexa-test/not-downloaded", tmp_path / "other")
    assert str(error.value) == (
        "anexa-test/not-downloaded is not in the Hugging Face cache and HF_HUB_OFFLINE is set: download it once "
        "with network access (HF_HUB_OFFLINE unset), or pass a local folder or GGUF file"
    )
    assert not (tmp_path / "other").exists()
    # ORG/NAME/FILE.gguf: one file of a cached repository, through the same snapshot (it was fetched with
    # hf_hub_download, which retried an unreachable hub five times over 25 s, logging each retry).
    export(tmp_path / "run", tmp_path / "tiny.gguf", format="gguf")
    snapshot = tmp_path / "hub" / "models--anexa-test--tiny-gguf" / "snapshots" / commit
    snapshot.mkdir(parents=True)
    shutil.copy(tmp_path / "tiny.gguf", snapshot / "tiny.gguf")
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text(commit)
    import_model("anexa-test/tiny-gguf/tiny.gguf", tmp_path / "from-gguf")
    assert load(tmp_path / "from-gguf", "cpu").meta["imported_from"]["name"] == "anexa-test/tiny-gguf/tiny.gguf"
    with pytest.raises(AnexaError, match=r"^anexa-test/tiny-gguf/other\.gguf is not in the Hugging Face cache"):
        import_model("anexa-test/tiny-gguf/other.gguf", tmp_path / "other")
    # The newcomer's report: a mistyped local path that looks like ORG/NAME was answered as a hub id only.
    (tmp_path / "runs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(AnexaError) as error:
        import_model("runs/nope", tmp_path / "other")
    assert str(error.value) == (
        "runs/nope does not exist: runs/ holds no nope, and no Hugging Face hub model of that name is cached: "
        "check the path"
    )
    with pytest.raises(AnexaError, match=r"^anexa-test/not-downloaded is not in the Hugging Face cache"):
        import_model("anexa-test/not-downloaded", tmp_path / "other")  # no local anexa-test/: the hub's answer
    assert not (tmp_path / "other").exists()


def test_an_imported_run_is_never_overwritten_without_asking(folders, tmp_path, monkeypatch):
    """--overwrite replaces a run folder whole, so never one holding anything a run did not write (a
    newcomer's `train --out home` then `import … --out home --overwrite` deleted home's files)."""
    folder, _ = folders["gpt2"]
    (tmp_path / "file").write_text("mine")
    with pytest.raises(AnexaError) as error:
        import_model(folder, tmp_path / "file", overwrite=True)
    assert str(error.value) == f"{tmp_path / 'file'} is a file: pass a new folder for the imported run"
    (tmp_path / "file").unlink()
    import_model(folder, tmp_path / "run")
    with pytest.raises(AnexaError, match="already holds a run: pass --overwrite"):
        import_model(folder, tmp_path / "run")
    import_model(folder, tmp_path / "run", overwrite=True)
    assert os.listdir(tmp_path / "run") == ["model.safetensors"]
    (tmp_path / "run" / "notes").mkdir()
    (tmp_path / "run" / "main.py").write_text("mine")
    for overwrite in (False, True):
        with pytest.raises(AnexaError) as error:
            import_model(folder, tmp_path / "run", overwrite=overwrite)
        assert str(error.value) == (
            f"{tmp_path / 'run'} is not empty and holds more than a run (main.py, notes): pass a new or empty "
            "folder for the imported run"
        )
    assert sorted(os.listdir(tmp_path / "run")) == ["main.py", "model.safetensors", "notes"]
    hf = tmp_path / "hf-weights-only"  # a model.safetensors Anexa did not write is someone else's model
    hf.mkdir()
    safetensors.torch.save_file({"w": torch.ones(1)}, hf / "model.safetensors")
    with pytest.raises(AnexaError, match=r"holds more than a run \(model.safetensors\)"):
        import_model(folder, hf, overwrite=True)
    left = tmp_path / "left"  # what a run killed before its first checkpoint leaves: replaced only on request
    left.mkdir()
    (left / "metrics.jsonl").write_text("")
    with pytest.raises(AnexaError, match="holds what a run left: pass --overwrite to replace it"):
        import_model(folder, left)
    import_model(folder, left, overwrite=True)
    assert os.listdir(left) == ["model.safetensors"]
    shutil.rmtree(hf)
    shutil.rmtree(left)
    # `--out .` from inside a run folder: its absolute path is what is replaced (`.` cannot be renamed).
    shutil.rmtree(tmp_path / "run" / "notes")
    (tmp_path / "run" / "main.py").unlink()
    monkeypatch.chdir(tmp_path / "run")
    import_model(folder, Path("."), overwrite=True)
    assert os.listdir(tmp_path / "run") == ["model.safetensors"] and sorted(os.listdir(tmp_path)) == ["run"]


def test_recommended_sampling_is_read_as_transformers_and_llama_cpp_mean_it(caplog, monkeypatch):
    """transformers samples only with `do_sample: true`, then with its defaults for what is left out; llama.cpp's
    `penalty_last_n` is -1 for the whole context, 0 for no penalty, 64 when absent. Both write the record back
    with the meaning they read it with, and values that change nothing make no sampler."""
    assert generation_config.from_hf({"bos_token_id": 1, "eos_token_id": 2}) == {}
    assert generation_config.from_hf({"do_sample": False, "temperature": 0.3}) == {"do_sample": False}
    assert generation_config.from_hf({"do_sample": True, "temperature": 0.6}) == {
        "do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 1.0
    }  # fmt: skip
    assert generation_config.from_hf({"temperature": 0.6, "top_p": 0.9, "top_k": 20.0}) == {
        "temperature": 0.6, "top_p": 0.9, "top_k": 20
    }  # fmt: skip
    bad = {"temperature": -1, "top_k": 2.5, "top_p": 0, "min_p": "0.1", "repetition_penalty": True, "do_sample": None}
    assert generation_config.from_hf(bad) == {}
    assert sorted(record.getMessage().split(": ")[1].split(" = ")[0] for record in caplog.records) == sorted(
        ["temperature", "top_k", "top_p", "min_p", "repetition_penalty"]
    )
    assert caplog.records[0].getMessage() == (
        "generation_config.json: temperature = -1 is not a usable sampling setting; left out"
    )
    # Found by a QA session: beam search, typical sampling and the like vanished from an import without a word.
    caplog.clear()
    neutral = {"num_beams": 1, "typical_p": 1.0, "no_repeat_ngram_size": 0, "max_new_tokens": None}
    assert generation_config.from_hf(neutral) == {} and not caplog.records
    assert generation_config.from_hf({"num_beams": 4, "typical_p": 0.9, "top_p": 0.8, "max_new_tokens": 64}) == {
        "top_p": 0.8
    }  # fmt: skip
    assert [record.getMessage() for record in caplog.records] == [
        "generation_config.json: num_beams = 4, typical_p = 0.9, max_new_tokens = 64 not applied (Anexa samples with "
        "temperature, top_k, top_p, min_p and repetition_penalty; the length is -n or max_tokens)"
    ]
    # A window is GGUF's, not a transformers field; a greedy GGUF file keeps its penalty's window.
    assert generation_config.from_hf({"repetition_penalty": 1.1, "repetition_penalty_window": 8}) == {
        "repetition_penalty": 1.1
    }  # fmt: skip
    greedy_gguf = {
        "general.sampling.top_k": 1,
        "general.sampling.penalty_repeat": 1.5,
        "general.sampling.penalty_last_n": 32,
    }
    assert generation_config.from_gguf(greedy_gguf) == {
        "do_sample": False, "repetition_penalty": 1.5, "repetition_penalty_window": 32
    }  # fmt: skip
    assert generation_config.to_gguf({"do_sample": False, "temperature": 0.5}) == {"top_k": 1}
    caplog.clear()
    odd = {"general.sampling.penalty_last_n": 0, "general.sampling.top_p": 0.0, "general.sampling.temp": 0.5}
    assert generation_config.from_gguf(odd) == {"temperature": 0.5}  # a window of 0 without a penalty: nothing
    assert [record.getMessage() for record in caplog.records] == [
        "general.sampling: top_p = 0.0 is not a usable sampling setting; left out"
    ]
    one = {"general.sampling.penalty_repeat": 1.5, "general.sampling.penalty_last_n": 1}
    assert generation_config.from_gguf(one) == {"repetition_penalty": 1.5, "repetition_penalty_window": 1}
    assert generation_config.from_hf({"temperature": float("nan"), "top_p": 1}) == {"top_p": 1.0}
    gguf = {"general.sampling.temp": 0.699999988079071, "general.sampling.penalty_repeat": 1.100000023841858}
    assert generation_config.from_gguf(gguf) == {
        "temperature": 0.7, "repetition_penalty": 1.1, "repetition_penalty_window": 64
    }  # fmt: skip
    assert generation_config.from_gguf({**gguf, "general.sampling.penalty_last_n": -1}) == {
        "temperature": 0.7, "repetition_penalty": 1.1
    }  # fmt: skip
    assert generation_config.from_gguf({**gguf, "general.sampling.penalty_last_n": 0}) == {"temperature": 0.7}
    assert (
        generation_config.from_gguf({**gguf, "general.sampling.penalty_last_n": 32})["repetition_penalty_window"] == 32
    )
    assert generation_config.from_gguf({"general.name": "x"}) == {}

    def specs(record, context=100):
        found = generation_config.recommended(record, context)
        return None if found is None else found.specs + found.missing

    assert specs({}) is None and specs({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}) is None
    assert specs({"do_sample": False}) == ["greedy"] and specs({"temperature": 0.7, "top_k": 1}) == ["greedy"]
    greedy = generation_config.from_hf({"do_sample": False, "temperature": 0.3, "repetition_penalty": 1.2})
    assert greedy == {"do_sample": False, "repetition_penalty": 1.2}  # transformers' greedy search applies it
    assert specs(greedy) == ["repetition_penalty=1.2", "repetition_penalty.window=100", "greedy"]
    assert generation_config.to_hf(greedy) == greedy
    as_gguf = generation_config.to_gguf(greedy)
    assert as_gguf == {"repetition_penalty": 1.2, "repetition_penalty_window": -1, "top_k": 1}
    back = {generation_config.GGUF_KEYS[field]: value for field, value in as_gguf.items()}
    assert generation_config.from_gguf(back) == greedy
    assert specs({"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 1.0}) == ["temperature=0.6", "top_k=50"]
    assert specs({"temperature": 0.0, "top_p": 0.95, "min_p": 0.05}) == ["temperature=0.0", "top_p=0.95", "min_p=0.05"]
    assert specs({"repetition_penalty": 1.1}) == ["repetition_penalty=1.1", "repetition_penalty.window=100"]
    assert specs({"repetition_penalty": 1.1, "repetition_penalty_window": 64}, 40) == [
        "repetition_penalty=1.1", "repetition_penalty.window=40"
    ]  # fmt: skip
    assert specs({"repetition_penalty": 1.1, "repetition_penalty_window": 32}) == [
        "repetition_penalty=1.1", "repetition_penalty.window=32"
    ]  # fmt: skip
    assert specs({"repetition_penalty": 1.0, "repetition_penalty_window": 64}) is None
    installed = generation_config.plugins.registered
    monkeypatch.setattr(  # a user without the anexa-topk plugin
        generation_config.plugins, "registered", lambda kind: {k: v for k, v in installed(kind).items() if k != "top_k"}
    )
    without = generation_config.recommended({"temperature": 0.6, "top_k": 20, "top_p": 0.95}, 100)
    assert (without.specs, without.missing) == (["temperature=0.6", "top_p=0.95"], ["top_k=20"])
    assert without.describe() == "temperature=0.6 → top_p=0.95 (top_k=20 left out: no top_k sampler is installed)"
    only = generation_config.recommended({"top_k": 20}, 100)
    assert only.describe() == "plain sampling at temperature 1 (top_k=20 left out: no top_k sampler is installed)"
    monkeypatch.setattr(  # and without the built-in repetition penalty
        generation_config.plugins,
        "registered",
        lambda kind: {k: v for k, v in installed(kind).items() if k not in ("top_k", "repetition_penalty")},
    )
    neither = generation_config.recommended({"repetition_penalty": 1.1, "top_k": 20}, 100)
    assert neither.describe() == (
        "plain sampling at temperature 1 (repetition_penalty=1.1, repetition_penalty.window=100, top_k=20 left out: "
        "no repetition_penalty or top_k sampler is installed)"
    )
    monkeypatch.undo()
    hf_record = {"do_sample": True, "temperature": 0.6, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.05}
    assert generation_config.to_hf(hf_record) == hf_record
    assert generation_config.to_hf({"temperature": 0.6}) == {"do_sample": True, "top_k": 0, "temperature": 0.6}
    assert generation_config.to_hf({"do_sample": False}) == {"do_sample": False} and generation_config.to_hf({}) == {}
    assert generation_config.to_gguf(hf_record) == {
        "temperature": 0.6, "top_k": 50, "top_p": 0.9, "repetition_penalty": 1.05, "repetition_penalty_window": -1
    }  # fmt: skip
    assert generation_config.to_gguf({"do_sample": False}) == {"top_k": 1}
    windowed = {"repetition_penalty": 1.1, "repetition_penalty_window": 32}
    assert generation_config.to_gguf(windowed) == windowed
    gguf_back = {
        generation_config.GGUF_KEYS[field]: value for field, value in generation_config.to_gguf(hf_record).items()
    }
    assert specs(generation_config.from_gguf(gguf_back)) == specs(hf_record)


def test_a_models_recommended_sampling_is_used_when_none_is_chosen_and_travels_into_exports(folders, tmp_path):
    """A folder's generation_config.json becomes the run's recommended sampling: `generate` uses it when no
    sampling flag is given (saying so on stderr) and not otherwise; fine-tunes keep it with their origin; both
    exports write it back, and importing the exports gives the same samplers."""
    from typer.testing import CliRunner

    from anexa_cli.main import app
    from anexa_core.io.export import export

    source = tmp_path / "llama"
    shutil.copytree(folders["llama"][0], source)
    settings = json.loads((source / "generation_config.json").read_text())
    recommended = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "repetition_penalty": 1.05}
    (source / "generation_config.json").write_text(json.dumps({**settings, **recommended}))
    done = import_model(source, tmp_path / "run")
    record = {**recommended, "top_k": 50}
    assert checkpoint.read_metadata(tmp_path / "run")["imported_from"]["generation"] == record
    specs = ["repetition_penalty=1.05", "repetition_penalty.window=96", "temperature=0.7", "top_k=50", "top_p=0.8"]
    assert load(tmp_path / "run", "cpu").sampling().specs == done.sampling == specs

    def generate(*flags: str):
        args = ["generate", "It was", "-m", str(tmp_path / "run"), "-n", "24", "--seed", "3", "--device", "cpu"]
        result = CliRunner().invoke(app, [*args, *flags])
        assert result.exit_code == 0, result.output
        return result.stdout, result.stderr

    chat = CliRunner().invoke(app, ["chat", "-m", str(tmp_path / "run"), "--device", "cpu"], input="quit\n")
    assert chat.exit_code == 0 and chat.stdout.startswith(
        f"loaded {tmp_path / 'run' / 'model.safetensors'}: imported from the Hugging Face model folder `llama`; "
        "chatting through its chat template."
    ), chat.output
    text, said = generate()
    assert said.strip() == (
        f"sampling as the model's makers recommend: {' → '.join(specs)}; --temperature or -s choose otherwise"
    )
    assert generate(*(flag for spec in specs for flag in ("-s", spec))) == (text, "")
    assert generate("--temperature", "1")[0] != text and generate("-s", "top_p=0.8")[0] != text

    from anexa_cli.console import count

    export(tmp_path / "run", tmp_path / "hf")
    written = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert (written.do_sample, written.temperature, written.top_k, written.top_p) == (True, 0.7, 50, 0.8)
    assert written.repetition_penalty == 1.05 and written.eos_token_id == settings["eos_token_id"]
    card = (tmp_path / "hf" / "README.md").read_text()
    assert f"| recommended sampling | {' → '.join(f'`{spec}`' for spec in specs)} (its makers'; used when" in card
    export(tmp_path / "run", tmp_path / "model.gguf", format="gguf")
    for exported in (tmp_path / "hf", tmp_path / "model.gguf"):
        result = CliRunner().invoke(app, ["import", str(exported), "--out", str(tmp_path / f"back-{exported.name}")])
        assert result.exit_code == 0, result.output
        assert f"its makers recommend sampling with {' → '.join(specs)}: used when you choose none" in result.stdout
        # counted as everywhere else ("0.11M"), never rounded to "0.0M" (found by a QA session)
        assert f" {count(load(tmp_path / 'run', 'cpu').model.num_parameters())} parameters, " in result.stdout
        assert load(tmp_path / f"back-{exported.name}", "cpu").sampling().specs == specs, exported
    fine_tune = {"base_origin": origin_of(checkpoint.read_metadata(tmp_path / "run")).as_dict()}
    assert origin_of(fine_tune).generation() == record  # what `train --init-from` records keeps it
    plain = tmp_path / "plain"  # a generation_config.json without sampling: nothing recommended, nothing written
    assert import_model(folders["gpt2"][0], plain).sampling == [] and load(plain, "cpu").sampling() is None
    assert not (export(plain, tmp_path / "plain-hf").out / "generation_config.json").exists()
    assert "recommended sampling" not in (tmp_path / "plain-hf" / "README.md").read_text()
