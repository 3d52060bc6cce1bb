"""Fine-tuning with `anexa train --init-from`: full and LoRA, on text and on conversations.

A tiny llama run with a BPE tokenizer is the base; LoRA lowers the loss on new text, stores only the
adapters with a hashed reference to its base, resumes bit for bit, merges into plain weights that
transformers reads back (HF and GGUF) with equal logits; conversations train only on the assistant's
tokens — checked against the real SmolLM2 template's rendered spans.
"""

import dataclasses
import json
import re
import shlex
import shutil

import pytest
import safetensors
import torch
from helpers import Watching, transformers_model, user_error
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core import AnexaError
from anexa_core.config import TrainConfig
from anexa_core.data.chats import IGNORE, assistant_spans, encode_conversation, load_chats
from anexa_core.infer.chat import template_for
from anexa_core.io import checkpoint
from anexa_core.io.load import load
from anexa_core.io.pretrained import import_model
from anexa_core.io.runs import _lora, summarize
from anexa_core.model.lora import LoraSpec
from anexa_core.train.finetune import finetune_configs
from anexa_core.train.loop import TrainingInterrupted, train
from anexa_core.train.resume import resume_configs
from anexa_core.train.step import Conversations

runner = CliRunner()
SMALL = ["--steps", "8", "--eval-every", "4", "--batch-size", "4", "--seq-len", "32", "--device", "cpu"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, sherlock_path):
    """A tiny llama run (grouped-query, untied head) with a BPE tokenizer, trained briefly on Sherlock."""
    folder = tmp_path_factory.mktemp("base")
    (folder / "text.txt").write_text(sherlock_path.read_text(encoding="utf-8")[:150_000], encoding="utf-8")
    (folder / "base.toml").write_text("tie_embeddings = false\neval_batches = 2\n", encoding="utf-8")
    result = runner.invoke(app, [
        "train", "--data", str(folder / "text.txt"), "--blocks", "llama", "-o", "blocks.n_kv_head=1",
        "--tokenizer", "bpe", "--vocab-size", "320", "--n-layer", "2", "--n-head", "2", "--n-embd", "32",
        "--block-size", "64", "--batch-size", "8", "--steps", "40", "--eval-every", "20", "--lr", "3e-3",
        "--config", str(folder / "base.toml"), "--out", str(folder / "run"), "--device", "cpu",
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    return folder


def _finetune(base, out, *flags, data=None):
    text = data or str(base / "text.txt")
    result = runner.invoke(app, ["train", "--init-from", str(base / "run"), "--data", text, *SMALL,
                                 "--config", str(base / "base.toml"), "--out", str(out), *flags])  # fmt: skip
    assert result.exit_code == 0, result.output
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_lora_lowers_the_loss_and_stores_only_its_adapters_and_its_base(base, tmp_path):
    metrics = _finetune(
        base, tmp_path / "lora", "--lora", "r=4,alpha=8,dropout=0,targets=q_proj,v_proj", "--lr", "1e-2"
    )
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] or metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    with safetensors.safe_open(str(tmp_path / "lora" / "model.safetensors"), framework="pt") as handle:
        names = sorted(handle.keys())
    assert names and all(".lora_A." in name or ".lora_B." in name for name in names)
    assert {name.split(".")[-3] for name in names} == {"q_proj", "v_proj"} and len(names) == 2 * 2 * 2
    meta = checkpoint.read_metadata(tmp_path / "lora")
    assert meta["lora"]["spec"] == {"r": 4, "alpha": 8, "dropout": 0.0, "targets": ["q_proj", "v_proj"]}
    assert meta["lora"]["base"]["sha256"] == checkpoint_sha256(base / "run")
    assert meta["tokenizer"]["name"] == "bpe" and meta["train_config"]["init_from"] == str(base / "run")
    merged = load(tmp_path / "lora", "cpu").model
    plain = load(base / "run", "cpu").model
    assert set(merged.state_dict()) == set(plain.state_dict())  # adapters folded in: the base's own names
    moved = [n for n, p in merged.state_dict().items() if not torch.equal(p, plain.state_dict()[n])]
    assert moved and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in moved)
    listed = runner.invoke(app, ["runs", str(tmp_path), "--json"])  # `anexa runs` says what it stores
    (run,) = json.loads(listed.stdout)["runs"]
    assert run["lora"] == {"r": 4, "base": str(base / "run"), "base_missing": False}
    assert run["architecture"].endswith(f" + LoRA r=4 on {base / 'run'}")
    moved_base = {"init_from": "runs/smol", "path": str(tmp_path / "gone"), "sha256": "0" * 64}  # deleted since
    for reference, missing in ((moved_base, True), ({"init_from": "org/name", "sha256": None}, False)):
        summary = dataclasses.replace(
            summarize(tmp_path / "lora"), lora=_lora({"lora": {"spec": {"r": 2}, "base": reference}})
        )
        assert summary.lora == {"r": 2, "base": reference["init_from"], "base_missing": missing}
        assert summary.architecture().endswith(
            f"+ LoRA r=2 on {reference['init_from']}"
            + (" (base missing: put it back to use this run)" if missing else "")
        )
    with safetensors.safe_open(str(tmp_path / "lora" / "model.safetensors"), framework="pt") as handle:
        assert run["parameters"] == sum(handle.get_tensor(name).numel() for name in names)
    table = runner.invoke(app, ["runs", str(tmp_path)]).stdout.splitlines()
    assert f"{run['parameters']:,} LoRA" in table[1], table


def checkpoint_sha256(run):
    from anexa_core.io.pretrained import file_sha256

    return file_sha256(checkpoint.checkpoint_file(run))


def test_full_fine_tuning_keeps_the_model_and_its_tokenizer(base, tmp_path):
    metrics = _finetune(base, tmp_path / "full", "--lr", "3e-3")
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] + 0.05
    tuned, original = checkpoint.read_metadata(tmp_path / "full"), checkpoint.read_metadata(base / "run")
    assert tuned["tokenizer"] == original["tokenizer"] and tuned["model_config"] == original["model_config"]
    assert "lora" not in tuned and tuned["train_config"]["seq_len"] == 32


def test_fine_tuning_defaults_are_full_or_lora_and_a_files_settings_name_the_file(base, tmp_path):
    """Defaults: FINETUNE's for a full fine-tune, LORA's (a larger learning rate) with --lora, and windows of
    256 tokens cut to the base's context of 64 (only the default is cut). A setting a file gets wrong is
    refused naming that file."""
    from anexa_core.config import FINETUNE, LORA

    _, full, _ = finetune_configs(str(base / "run"), {})
    _, lora, _ = finetune_configs(str(base / "run"), {"lora": "r=2"})
    assert (full.lr, full.min_lr, full.seq_len) == (FINETUNE["lr"], FINETUNE["min_lr"], 64)
    assert (lora.lr, lora.min_lr, lora.seq_len) == (LORA["lr"], LORA["min_lr"], 64) and lora.lr != full.lr
    # Found by a QA session: with --init-from, a file naming another base trained this one and recorded that one.
    (tmp_path / "other.toml").write_text('init_from = "runs/elsewhere"\n', encoding="utf-8")
    _, flagged, _ = finetune_configs(str(base / "run"), {}, config_file=tmp_path / "other.toml")
    assert flagged.init_from == str(base / "run")
    for text, message in [
        ("n_embd = 64\n", "--n-embd in {} contradicts the model of --init-from"),
        ("learning_rate = 3\n", "unknown setting 'learning_rate' in {}: choose one of"),
    ]:
        (tmp_path / "my.toml").write_text(text, encoding="utf-8")
        with pytest.raises(AnexaError, match="^" + re.escape(message.format(tmp_path / "my.toml"))):
            finetune_configs(str(base / "run"), {}, config_file=tmp_path / "my.toml")


def test_a_base_trains_in_its_stored_layout_not_the_decoding_one(base):
    """Found by a QA session: a LoRA fine-tune of SmolLM2 died with SIGFPE (exit 136, no message) in the
    backward of its column-major head — PyTorch 2.13's bfloat16 CPU matrix product on AMX, at 32 tokens a
    batch. A base for training keeps its weights row-major (contiguous), as stored; inference's load does not."""
    from anexa_core.io.load import load, load_base

    trained = load_base(str(base / "run")).model
    assert all(parameter.is_contiguous() for parameter in trained.parameters())
    decoding = load(base / "run", "cpu").model
    assert not all(parameter.is_contiguous() for parameter in decoding.parameters()), (
        "the layout test would pass anyway"
    )


def test_a_config_file_that_names_the_base_fine_tunes_as_the_flags_do(base, tmp_path):
    """Found by a QA session: `init_from` (with or without `lora`) in a --config file was a traceback
    ("vocab_size must be set from the tokenizer"): the command line alone chose between a fine-tune and a
    run from scratch. A file's base fine-tunes, with LoRA's defaults when the file asks for LoRA."""
    from anexa_core.config import LORA

    (tmp_path / "ft.toml").write_text(
        f'init_from = "{base / "run"}"\nlora = "r=2"\neval_batches = 2\n', encoding="utf-8"
    )
    result = runner.invoke(app, ["train", "--data", str(base / "text.txt"), *SMALL, "--config", str(tmp_path / "ft.toml"),
                                 "--out", str(tmp_path / "run")])  # fmt: skip
    assert result.exit_code == 0, result.output
    state = checkpoint.read_train_state_metadata(tmp_path / "run")
    assert state["train_config"]["init_from"] == str(base / "run") and state["train_config"]["lora"] == "r=2"
    assert state["train_config"]["lr"] == LORA["lr"]
    (tmp_path / "bad.toml").write_text("init_from = 3\n", encoding="utf-8")
    refused = runner.invoke(app, ["train", "--config", str(tmp_path / "bad.toml"), "--out", str(tmp_path / "bad")])
    assert refused.exit_code == 2 and "init_from in" in refused.output and not (tmp_path / "bad").exists()


def test_export_outtype_stores_q8_0_or_f16_matrices_and_refuses_the_rest(base, tmp_path, monkeypatch):
    """`anexa export … --format gguf --outtype q8_0`: llama.cpp's 8-bit blocks for the matrices (rows of whole
    32-value blocks here; test_gguf.py has the f16 fallback), f32 norms, about a quarter of the f32 file; read
    back by transformers near the float32 logits. A type the writer lacks, or --outtype with hf: one line,
    nothing written."""
    pytest.importorskip("transformers")
    from gguf import GGUFReader

    run = base / "run"
    sizes = {}
    for outtype in ("f32", "f16", "q8_0"):
        out = tmp_path / f"{outtype}.gguf"
        result = runner.invoke(app, ["export", str(run), str(out), "--format", "gguf", "--outtype", outtype])
        assert result.exit_code == 0 and f"{outtype} matrices" in result.output, result.output
        types = {tensor.name: tensor.tensor_type.name for tensor in GGUFReader(out).tensors}
        matrices = {types[name] for name in types if not name.endswith(("norm.weight", ".bias"))}
        assert {types[name] for name in types if name.endswith("norm.weight")} == {"F32"}
        assert matrices == {"f32": {"F32"}, "f16": {"F16"}, "q8_0": {"Q8_0"}}[outtype], types
        sizes[outtype] = out.stat().st_size
    assert sizes["q8_0"] < 0.4 * sizes["f32"] and sizes["f16"] < 0.6 * sizes["f32"]
    model = load(run, "cpu").model
    ids = torch.randint(0, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    decoys = tmp_path / "cwd"  # files of the same names where the command runs are never read instead
    decoys.mkdir()
    for outtype in ("f16", "q8_0"):
        (decoys / f"{outtype}.gguf").write_bytes(b"not a GGUF file")
    monkeypatch.chdir(decoys)
    with torch.no_grad():
        ours = model(ids)[0]
        for outtype, tolerance in (("f16", 1e-3), ("q8_0", 2e-2)):
            error = (transformers_model(tmp_path, f"{outtype}.gguf")(ids).logits - ours).abs().max().item()
            assert 0 < error < tolerance, (outtype, error)
    user_error(["export", str(run), str(tmp_path / "x.gguf"), "-f", "gguf", "--outtype", "q4_k"],
               "unknown --outtype 'q4_k': choose one of f32, f16, q8_0")  # fmt: skip
    user_error(["export", str(run), str(tmp_path / "hf"), "--outtype", "f16"], "--outtype f16 applies to --format gguf")
    user_error(
        ["export", str(run), str(tmp_path / "model.GGUF")],
        f"{tmp_path / 'model.GGUF'} names a GGUF file, but --format hf writes a folder: add --format gguf",
    )
    assert not (tmp_path / "model.GGUF").exists()
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "hf").exists()


def test_a_changed_or_missing_base_is_one_line(base, tmp_path):
    _finetune(base, tmp_path / "lora", "--lora", "r=2")
    moved = tmp_path / "elsewhere"
    shutil.copytree(base / "run", moved)
    spec = checkpoint.read_metadata(tmp_path / "lora")["lora"]
    shutil.rmtree(base / "run.bak", ignore_errors=True)
    (base / "run").rename(base / "run.bak")
    try:
        user_error(["generate", "x", "-m", str(tmp_path / "lora"), "-n", "2"], "this LoRA run's base")
    finally:
        (base / "run.bak").rename(base / "run")
    assert spec["base"]["path"] == str((base / "run").resolve())
    best = base / "run" / "best.safetensors"
    saved = best.read_bytes()
    try:
        model, _, meta = checkpoint.load_model(base / "run")
        with torch.no_grad():
            model.wte.weight[0, 0] += 1
        checkpoint.save_model(best, model, {key: value for key, value in meta.items() if key != "path"})
        user_error(["generate", "x", "-m", str(tmp_path / "lora"), "-n", "2"], "has changed since it was trained")
    finally:
        best.write_bytes(saved)


def test_lora_resume_is_bit_identical(base, tmp_path):
    model_config, train_config, loaded = finetune_configs(
        str(base / "run"), {"lora": "r=4,dropout=0.1", "steps": 6, "eval_every": 3, "batch_size": 4, "seq_len": 32,
                            "data": str(base / "text.txt"), "device": "cpu", "eval_batches": 2},
    )  # fmt: skip
    train(model_config, train_config, tmp_path / "whole", base=loaded)
    calls = []

    def stop_after_two():
        calls.append(1)
        return len(calls) == 2

    with pytest.raises(TrainingInterrupted):
        train(model_config, train_config, tmp_path / "split", base=loaded, stop_requested=stop_after_two)
    train(*resume_configs(tmp_path / "split", {}), tmp_path / "split", resume=True)
    for name in ("model.safetensors", "train_state.safetensors"):
        whole = safetensors.torch.load_file(str(tmp_path / "whole" / name))
        split = safetensors.torch.load_file(str(tmp_path / "split" / name))
        assert whole.keys() == split.keys() and all(torch.equal(whole[k], split[k]) for k in whole), name


def test_an_export_never_replaces_the_base_a_lora_run_needs_nor_lands_in_a_run(base, tmp_path):
    """Found by a QA session: `anexa export LORA BASE.gguf --overwrite` replaced the file the LoRA run loads
    its model from (the run was lost for good), an export landed inside a run folder, and --overwrite
    replaced a folder transformers' save_pretrained wrote (the names an export writes, not its card)."""
    from anexa_core.io.export import export

    export(base / "run", tmp_path / "base.gguf", "gguf")
    result = runner.invoke(app, ["train", "--init-from", str(tmp_path / "base.gguf"), "--data", str(base / "text.txt"),
                                 *SMALL, "--steps", "1", "--config", str(base / "base.toml"), "--out",
                                 str(tmp_path / "lora"), "--lora", "r=2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    before = (tmp_path / "base.gguf").read_bytes()
    with pytest.raises(AnexaError, match=r"base.gguf is the base the LoRA run .*lora loads its model from: exporting"):
        export(tmp_path / "lora", tmp_path / "base.gguf", "gguf", overwrite=True)
    assert (tmp_path / "base.gguf").read_bytes() == before
    with pytest.raises(AnexaError, match=r"^OUT .*lora/hf is inside the run in .*lora: write it outside the run$"):
        export(tmp_path / "lora", tmp_path / "lora" / "hf", "hf")
    export(tmp_path / "lora", tmp_path / "hf", "hf")
    export(tmp_path / "lora", tmp_path / "hf", "hf", overwrite=True)  # an earlier export of ours: replaced
    (tmp_path / "hf" / "README.md").write_text("# my model\n", encoding="utf-8")  # as save_pretrained leaves it
    with pytest.raises(AnexaError, match=r"is not empty and not an earlier export \(it holds config.json, "):
        export(tmp_path / "lora", tmp_path / "hf", "hf", overwrite=True)


def test_a_merged_lora_run_exports_to_transformers_and_gguf_with_equal_logits(base, tmp_path):
    transformers = pytest.importorskip("transformers")
    from anexa_core.io.export import export

    _finetune(base, tmp_path / "lora", "--lora", "r=4,targets=q_proj,k_proj,v_proj,o_proj,down_proj", "--lr", "1e-2")
    merged = load(tmp_path / "lora", "cpu").model
    ids = torch.randint(0, merged.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = merged(ids)[0]
    export(tmp_path / "lora", tmp_path / "hf", "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    export(tmp_path / "lora", tmp_path / "lora.gguf", "gguf")
    gguf = transformers_model(tmp_path, "lora.gguf")
    with torch.no_grad():
        assert (hf(ids).logits - ours).abs().max().item() < 1e-4
        assert (gguf(ids).logits - ours).abs().max().item() < 1e-4
    # The card retrains it as it was trained: from its base (by name, not the local path), as LoRA.
    card = (tmp_path / "hf" / "README.md").read_text(encoding="utf-8")
    args = shlex.split(re.search(r"## How it was trained\n\n```sh\n(.+)\n```", card).group(1))
    assert args[args.index("--init-from") + 1] == "run" and args[args.index("--lora") + 1].startswith("r=4,")
    assert not {"--n-layer", "--blocks", "--tokenizer"} & set(args) and str(tmp_path) not in card
    assert "fine-tuned from `run` with Anexa" in card and "its LoRA adapters (`--lora r=4," in card
    assert "trained from scratch" not in card and "Anexa trained it on windows of 32 tokens." in card


def test_the_card_of_an_import_and_of_its_fine_tune_names_the_pretrained_model(base, tmp_path):
    """Found by a newcomer: an imported model's card said "trained from scratch", with steps 0 and data `?`,
    and its fine-tunes' cards neither named the pretrained model nor its licence, and retrained them from a
    local run's name. Now an import is said to be one, and a fine-tune names the model it started from —
    as `--init-from` takes it — and its licence."""
    from anexa_core.io.export import export

    model, _, meta = checkpoint.load_model(base / "run")
    trained = ("path", "train_config", "val_loss", "train_loss", "elapsed_s")
    record = {"kind": "gguf", "name": "Tiny-Chat.Q8_0.gguf", "sha256": "0" * 64, "license": "apache-2.0"}
    imported = {**{key: value for key, value in meta.items() if key not in trained}, "step": 0, "imported_from": record}
    (tmp_path / "imported").mkdir()
    checkpoint.save_model(tmp_path / "imported" / "model.safetensors", model, imported)
    export(tmp_path / "imported", tmp_path / "hf-imported", "hf")
    card = (tmp_path / "hf-imported" / "README.md").read_text(encoding="utf-8")
    assert "imported into Anexa" in card and "from the GGUF file `Tiny-Chat.Q8_0.gguf`" in card
    assert f"| its SHA-256 | `{'0' * 64}` |" in card
    assert "\nlicense: apache-2.0\n" in card and "| licence | apache-2.0" in card
    for absent in ("| steps |", "| data |", "| val loss |", "## How it was trained", "trained from scratch"):
        assert absent not in card, absent
    # A GGUF export carries the licence and the pretrained model too (llama.cpp's general.* keys).
    hub = {"kind": "hub", "name": "org/tiny-chat", "sha256": "1" * 64, "license": "mit", "model_name": "Tiny Chat"}
    (tmp_path / "imported-hub").mkdir()
    checkpoint.save_model(tmp_path / "imported-hub" / "model.safetensors", model, {**imported, "imported_from": hub})
    export(tmp_path / "imported-hub", tmp_path / "hub.gguf", "gguf")
    assert _general(tmp_path / "hub.gguf") == {
        "general.name": "hub",
        "general.license": "mit",
        "general.base_model.count": 1,
        "general.base_model.0.name": "Tiny Chat",
        "general.base_model.0.repo_url": "https://huggingface.co/org/tiny-chat",
    }
    # ... and importing that file again keeps the repository: the card links it as the base model.
    import_model(tmp_path / "hub.gguf", tmp_path / "reimported")
    assert checkpoint.read_metadata(tmp_path / "reimported")["imported_from"]["repository"] == "org/tiny-chat"
    export(tmp_path / "reimported", tmp_path / "hf-reimported", "hf")
    card = (tmp_path / "hf-reimported" / "README.md").read_text(encoding="utf-8")
    assert "\nlicense: mit\nbase_model: org/tiny-chat\n" in card and "the GGUF file `hub.gguf`" in card
    for lora in ([], ["--lora", "r=2"]):
        out = tmp_path / f"tuned{len(lora)}"
        result = runner.invoke(app, ["train", "--init-from", str(tmp_path / "imported"), "--data", str(base / "text.txt"),
                                     *SMALL, "--steps", "2", "--config", str(base / "base.toml"), "--out", str(out), *lora])  # fmt: skip
        assert result.exit_code == 0, result.output
        export(out, tmp_path / f"hf-{out.name}", "hf")
        card = (tmp_path / f"hf-{out.name}" / "README.md").read_text(encoding="utf-8")
        assert "fine-tuned from the GGUF file `Tiny-Chat.Q8_0.gguf` with Anexa" in card, card
        assert "\nlicense: apache-2.0\n" in card and "| base model | the GGUF file `Tiny-Chat.Q8_0.gguf` |" in card
        assert f"| its SHA-256 | `{'0' * 64}` |" in card  # the file's: whoever retrains it can check their copy
        args = shlex.split(re.search(r"## How it was trained\n\n```sh\n(.+)\n```", card).group(1))
        assert args[args.index("--init-from") + 1] == "Tiny-Chat.Q8_0.gguf" and str(tmp_path) not in card
    # The fine-tune recorded where its base came from: with the imported run gone (a full fine-tune needs
    # it no more), its card still names the GGUF file and its licence; a fine-tune of it names them too, and
    # retrains from the fine-tune it started from, not the GGUF file.
    assert checkpoint.read_metadata(tmp_path / "tuned0")["base_origin"] == {"source": record, "direct": True}
    shutil.rmtree(tmp_path / "imported")
    again = tmp_path / "again"
    result = runner.invoke(app, ["train", "--init-from", str(tmp_path / "tuned0"), "--data", str(base / "text.txt"),
                                 *SMALL, "--steps", "1", "--config", str(base / "base.toml"), "--out", str(again)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert checkpoint.read_metadata(again)["base_origin"] == {"source": record, "direct": False}
    result = runner.invoke(app, ["train", "--resume", str(again), "--steps", "2"])  # a resume keeps the record
    assert result.exit_code == 0, result.output
    assert checkpoint.read_metadata(again)["base_origin"] == {"source": record, "direct": False}
    for run, init_from in ((tmp_path / "tuned0", "Tiny-Chat.Q8_0.gguf"), (again, "tuned0")):
        export(run, tmp_path / f"hf-{run.name}-alone", "hf")
        card = (tmp_path / f"hf-{run.name}-alone" / "README.md").read_text(encoding="utf-8")
        assert "\nlicense: apache-2.0\n" in card and "| base model | the GGUF file `Tiny-Chat.Q8_0.gguf` |" in card
        assert f"| its SHA-256 | `{'0' * 64}` |" in card  # the file's: whoever retrains it can check their copy
        args = shlex.split(re.search(r"## How it was trained\n\n```sh\n(.+)\n```", card).group(1))
        assert args[args.index("--init-from") + 1] == init_from, card
        export(run, tmp_path / f"{run.name}.gguf", "gguf")
        assert _general(tmp_path / f"{run.name}.gguf") == {
            "general.name": run.name,
            "general.license": "apache-2.0",
            "general.base_model.count": 1,
            "general.base_model.0.name": "Tiny-Chat.Q8_0.gguf",
        }
    export(base / "run", tmp_path / "scratch.gguf", "gguf")  # trained from scratch: no licence to state
    assert _general(tmp_path / "scratch.gguf") == {"general.name": "scratch"}


def _general(path):
    """A GGUF file's name, licence and base-model keys."""
    import gguf

    fields = gguf.GGUFReader(path).fields
    wanted = ("general.name", "general.license", "general.base_model")
    return {key: field.contents() for key, field in fields.items() if key.startswith(wanted)}


def test_a_text_too_short_for_the_windows_asks_for_the_flag_a_fine_tune_can_change(base, tmp_path, caplog):
    """The newcomers' reports: a short notes file was refused with "… or a smaller --block-size", which a
    fine-tune then refused as contradicting its base; then with "a shorter --seq-len", which did not say how
    short, after LoRA's parameter count (two lines). Now one line names the longest window that fits, and
    following it trains, where one token more is refused."""
    notes = tmp_path / "notes.txt"
    notes.write_text((base / "text.txt").read_text(encoding="utf-8")[:700], encoding="utf-8")
    init = ["train", "--init-from", str(base / "run"), "--data", str(notes), "--steps", "1", "--batch-size", "2",
            "--device", "cpu", "--lora", "r=2"]  # fmt: skip
    message = user_error([*init, "--out", str(tmp_path / "x")], "too few for training windows of 64 ")
    longest = int(re.fullmatch(r".* or --seq-len (\d+) or shorter", message).group(1))
    assert 4 < longest < 62 and not (tmp_path / "x").exists()
    assert not [record for record in caplog.records if record.getMessage().startswith("LoRA:")]
    user_error(
        [*init, "--seq-len", str(longest + 1), "--out", str(tmp_path / "x")], f"training windows of {longest + 1} "
    )
    result = runner.invoke(app, [*init, "--seq-len", str(longest), "--out", str(tmp_path / "y")])
    assert result.exit_code == 0, result.output
    assert [record.getMessage() for record in caplog.records if record.getMessage().startswith("LoRA:")] == [
        "LoRA: 896 trainable parameters of 46,112"
    ]
    caplog.clear()
    full = [*init[: init.index("--lora")], "--seq-len", str(longest), "--out", str(tmp_path / "full")]
    assert runner.invoke(app, full).exit_code == 0  # a full fine-tune trains every parameter: no LoRA line
    assert not [record for record in caplog.records if record.getMessage().startswith("LoRA:")]


def test_what_fine_tuning_refuses_is_one_line(base, tmp_path):
    init = ["train", "--init-from", str(base / "run"), "--data", str(base / "text.txt"), "--out", str(tmp_path / "x")]
    user_error([*init, "--n-embd", "64"], "--n-embd in flags contradicts the model of --init-from")
    user_error([*init, "--tokenizer", "char"], "--tokenizer in flags contradicts the model of --init-from")
    user_error([*init, "--vocab-size", "500"], "--vocab-size in flags: fine-tuning keeps the model's tokenizer")
    user_error([*init, "-o", "blocks.rope_theta=5"], "-o blocks.… in flags contradicts the model of --init-from")
    user_error(
        [*init, "--lora", "targets=c_attn"],
        "--lora targets c_attn match no linear layer of this model: "
        "choose one of down_proj, gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj",
    )
    user_error([*init, "--lora", "rank=4"], "--lora has no key 'rank': use r, alpha, dropout and targets")
    # Checked before the base loads (seconds for a pretrained model): with a base that cannot load, the
    # typo is still what is named.
    missing = ["train", "--init-from", str(tmp_path / "nobase"), "--out", str(tmp_path / "x")]
    user_error([*missing, "--lora", "rank=4"], "--lora has no key 'rank'")
    user_error([*missing, "--data", str(tmp_path / "nonotes.txt")], f"--data '{tmp_path / 'nonotes.txt'}' is neither")
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n', encoding="utf-8")
    user_error([*missing, "--data", str(tmp_path / "bad.jsonl")], 'bad.jsonl line 1 has no "messages" list')
    # A fine-tune's context is its base's: the refusal names the longest window, and no --block-size.
    longer = user_error([*init, "--seq-len", "65"], "--seq-len 65 is longer than the model's context of 64 tokens")
    assert longer == "error: --seq-len 65 is longer than the model's context of 64 tokens: use --seq-len 64 or shorter"
    (tmp_path / "long.toml").write_text("seq_len = 65\n", encoding="utf-8")  # from a file: refused, never clamped
    assert user_error([*init, "--config", str(tmp_path / "long.toml")], "--seq-len 65 is longer") == longer
    user_error(["train", "--lora", "r=4", "--out", str(tmp_path / "y")], "--lora trains adapters on a pretrained model")
    chats = tmp_path / "chats.jsonl"
    chats.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n')
    user_error([*init[:3], "--data", str(chats), "--out", str(tmp_path / "z")],
               "conversations need the model's chat template, and this model has none")  # fmt: skip
    assert not (tmp_path / "x").exists() and not (tmp_path / "z").exists()


def test_missing_data_is_the_one_line_before_the_model_is_built(base, tmp_path, caplog, monkeypatch):
    """The newcomer's report: `anexa train --init-from runs/smol --lora r=16,alpha=32 --data notes.txt`
    without a notes.txt logged "LoRA: 1,843,200 trainable parameters…", then the data error."""
    from anexa_core.train import loop

    def built(*args, **kwargs):
        raise AssertionError("the fine-tuned model was built before --data was checked")

    monkeypatch.setattr(loop, "_finetuned_model", built)
    missing = tmp_path / "notes.txt"
    for lora in ([], ["--lora", "r=4"]):
        caplog.clear()
        user_error(
            ["train", "--init-from", str(base / "run"), "--data", str(missing), *lora, "--out", str(tmp_path / "x")],
            f"--data {str(missing)!r} is neither a dataset",
        )
        assert not caplog.records
    user_error(
        ["train", "--resume", str(base / "run"), "--data", str(missing), "--steps", "50"], "cannot change --data"
    )
    assert not (tmp_path / "x").exists()


# --- conversations ----------------------------------------------------------------------------------

CHATS = [
    [{"role": "system", "content": "Answer in one line."}, {"role": "user", "content": "Who is Holmes?"},
     {"role": "assistant", "content": "Indeed: a detective."}],
    [{"role": "user", "content": "Where does he live?"}, {"role": "assistant", "content": "Indeed: Baker Street."},
     {"role": "user", "content": "And Watson?"}, {"role": "assistant", "content": "Indeed: with him, at first."}],
]  # fmt: skip


def test_the_loss_counts_exactly_the_assistant_tokens_of_the_template(smollm2):
    tokenizer = smollm2.tokenizer
    template = template_for(tokenizer)
    for messages in CHATS:
        text, spans = assistant_spans(template, messages)
        example = encode_conversation(template, tokenizer, messages)
        assert tokenizer.decode(example.ids) == text
        trained = tokenizer.decode([i for i, t in zip(example.ids, example.trained, strict=True) if t])
        assert trained == "".join(text[start:end] for start, end in spans)
        assert all(text[start:end].startswith("Indeed:") and text[start:end].endswith("<|im_end|>\n")
                   for start, end in spans)  # fmt: skip
    x, y = Conversations([encode_conversation(template, tokenizer, m) for m in CHATS]).batch(
        4, torch.Generator().manual_seed(0))  # fmt: skip
    assert x.shape == y.shape and (y == IGNORE).any() and (y != IGNORE).any()


def test_conversations_fine_tune_with_malformed_lines_and_long_ones_named(smollm2, smollm2_run, tmp_path):
    chats = tmp_path / "chats.jsonl"
    chats.write_text("\n".join(json.dumps({"messages": m}) for m in CHATS * 3) + "\n")
    loaded = load_chats(chats, smollm2.tokenizer, 24)
    assert loaded.truncated == 6 and all(len(e.ids) == 25 for e in loaded.examples)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHATS[0]}) + "\n{oops\n")
    with pytest.raises(AnexaError, match=r"^bad.jsonl line 2 is not JSON \("):
        load_chats(bad, smollm2.tokenizer, 64)
    bad.write_text(json.dumps({"messages": [{"role": "user", "content": "x"}]}) + "\n")
    with pytest.raises(AnexaError, match=r"bad\.jsonl line 1 has no assistant message"):
        load_chats(bad, smollm2.tokenizer, 64)
    config = TrainConfig(data=str(chats), init_from=str(smollm2_run), lora="r=2", steps=2, eval_every=2,
                         eval_batches=1, batch_size=2, seq_len=48, device="cpu")  # fmt: skip
    result = train(smollm2.model.config, config, tmp_path / "run")
    assert result.step == 2 and (tmp_path / "run" / "model.safetensors").is_file()
    assert LoraSpec.parse("r=2").r == 2


@pytest.mark.parametrize("lora", [True, False])
def test_a_lora_run_shares_the_frozen_base_weights_and_a_full_one_copies_them(lora):
    """LoRA never changes the base's weights, so its model holds the base's own tensors (one copy, not
    two) with the head still tied; full fine-tuning trains every weight, so it copies and the base stays."""
    import types

    from helpers import TINY, tiny_model

    from anexa_core.train.loop import _finetuned_model

    base = types.SimpleNamespace(model=tiny_model(seed=1), tokenizer=None)
    before = {name: tensor.clone() for name, tensor in base.model.state_dict().items()}
    config = TrainConfig(init_from="base", lora="r=2,targets=qkv" if lora else None)
    model, _ = _finetuned_model(base, TINY, config)
    assert model.lm_head.weight is model.wte.weight
    shared = model.wte.weight.data_ptr() == base.model.wte.weight.data_ptr()
    assert shared == lora
    for name, tensor in base.model.state_dict().items():
        mine = model.state_dict()[name.replace(".qkv.", ".qkv.base_layer.") if lora else name]
        assert torch.equal(mine, tensor) and (mine.data_ptr() == tensor.data_ptr()) == lora, name
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    ids = torch.randint(TINY.vocab_size, (2, 8))
    model.train()
    model(ids, ids)[1].backward()
    optimizer.step()
    assert all(torch.equal(base.model.state_dict()[name], tensor) for name, tensor in before.items())


def test_a_lora_fine_tune_keeps_what_training_promises(base, tmp_path):
    """Everything training promises holds for a fine-tune: the best checkpoint kept beside the latest (both
    adapters only), the curve plotted, a run folder never overwritten without --overwrite (nothing changed),
    and --minutes ending a run early on a saved checkpoint."""
    _finetune(base, tmp_path / "lora", "--lora", "r=2,dropout=0")
    folder = tmp_path / "lora"
    assert {"model.safetensors", "best.safetensors", "train_state.safetensors", "loss.png"} <= {
        p.name for p in folder.iterdir()
    }
    best = checkpoint.read_metadata(folder / "best.safetensors")
    evaluated = [json.loads(line)["val_loss"] for line in (folder / "metrics.jsonl").read_text().splitlines()]
    assert "lora" in best and best["val_loss"] == pytest.approx(min(evaluated), abs=1e-4)  # metrics: 4 decimals
    before = {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}
    user_error(
        ["train", "--init-from", str(base / "run"), "--data", str(base / "text.txt"), *SMALL, "--lora", "r=2",
         "--config", str(base / "base.toml"), "--out", str(folder)],
        "--overwrite",
    )  # fmt: skip
    assert {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()} == before
    result = runner.invoke(app, [
        "train", "--init-from", str(base / "run"), "--data", str(base / "text.txt"), "--lora", "r=2",
        "--minutes", "0.005", "--steps", "1000", "--eval-every", "1000", "--batch-size", "4", "--seq-len", "32", "--device", "cpu",
        "--config", str(base / "base.toml"), "--out", str(tmp_path / "timed"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    timed = checkpoint.read_metadata(tmp_path / "timed")
    assert 1 <= timed["step"] < 1000 and "lora" in timed  # stopped by the clock, saved, still an adapter run


def test_a_time_budget_alone_sets_no_step_limit_as_for_a_run_from_scratch(base):
    """Found by a newcomer: `--init-from … --minutes 30` stopped at the 300 steps of fine-tuning's default,
    where a run from scratch with `--minutes` has no step limit. A step count given beside it still counts."""
    common = {"data": str(base / "text.txt"), "device": "cpu"}
    for lora in (None, "r=2"):
        _, timed, _ = finetune_configs(str(base / "run"), {**common, "lora": lora, "minutes": 30.0})
        assert timed.steps is None and timed.minutes == 30.0
        _, both, _ = finetune_configs(str(base / "run"), {**common, "lora": lora, "minutes": 30.0, "steps": 40})
        assert both.steps == 40
        _, counted, _ = finetune_configs(str(base / "run"), {**common, "lora": lora})
        assert counted.steps == 300 and counted.minutes is None


def test_a_fine_tune_reports_its_data_progress_and_steps_as_a_new_run_does(base, tmp_path, caplog):
    """The reporter hears a fine-tune's data being read and tokenized with the base's own tokenizer (so no
    vocabulary is learnt), then every step, as a run from scratch is heard (test_training.py); the log says
    how many of the model's parameters LoRA trains."""
    overrides = {"data": str(base / "text.txt"), "steps": 3, "eval_every": 3, "eval_batches": 1,
                 "batch_size": 2, "seq_len": 32, "device": "cpu", "lora": "r=2"}  # fmt: skip
    model_config, train_config, loaded = finetune_configs(str(base / "run"), overrides)
    heard = Watching()
    with caplog.at_level("INFO", logger="anexa"):
        train(model_config, train_config, tmp_path / "lora", reporter=heard, base=loaded)
    assert heard.phases == {"fingerprinting", "tokenizing"} and heard.steps == [1, 2, 3]
    with safetensors.safe_open(str(tmp_path / "lora" / "model.safetensors"), framework="pt") as handle:
        names = handle.keys()  # a safetensors handle is not iterable
        adapters = sum(handle.get_tensor(name).numel() for name in names)
    total = loaded.model.num_parameters() + adapters
    assert f"LoRA: {adapters:,} trainable parameters of {total:,}" in caplog.messages


def test_a_resumed_lora_run_holds_one_copy_of_its_base(base, tmp_path, monkeypatch):
    """Resuming a LoRA run loads its base once and builds the model over the base's own tensors, as the
    fine-tune that started it did (test_a_lora_run_shares_the_frozen_base_weights_and_a_full_one_copies_them)."""
    from anexa_core.train import loop

    _finetune(base, tmp_path / "lora", "--lora", "r=2,dropout=0")
    bases = []
    base_of = loop.base_of
    monkeypatch.setattr(loop, "base_of", lambda reference: bases.append(base_of(reference)) or bases[-1])
    model_config, _ = resume_configs(tmp_path / "lora", {})
    model, _ = loop._resumed_model(checkpoint.load_train_state(tmp_path / "lora"), model_config, tmp_path / "lora")
    ((loaded,),) = (bases,)
    mine = model.state_dict()
    for name, tensor in loaded.model.state_dict().items():
        module, _, field = name.rpartition(".")
        shared = mine.get(name, mine.get(f"{module}.base_layer.{field}"))  # an adapted layer's frozen weight
        assert shared is not None and shared.data_ptr() == tensor.data_ptr(), name


def test_a_lora_fine_tune_under_torchrun_matches_one_process_with_double_batch(base, tmp_path):
    """Two data-parallel ranks (torchrun, gloo) with batch B train the adapters as one process with 2B."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import safetensors.torch

    flags = ["--init-from", str(base / "run"), "--data", str(base / "text.txt"), "--lora", "r=4,dropout=0",
             "--steps", "4", "--eval-every", "4", "--seq-len", "32", "--precision", "fp32", "--device", "cpu",
             "--config", str(base / "base.toml")]  # fmt: skip
    anexa = Path(sys.executable).with_name("anexa")
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(anexa), "train",
         *flags, "--batch-size", "2", "--out", str(tmp_path / "ddp")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = runner.invoke(app, ["train", *flags, "--batch-size", "4", "--out", str(tmp_path / "one")])
    assert result.exit_code == 0, result.output
    ddp = safetensors.torch.load_file(tmp_path / "ddp" / "model.safetensors")
    one = safetensors.torch.load_file(tmp_path / "one" / "model.safetensors")
    assert set(ddp) == set(one) and all(".lora_" in name for name in one)
    for name in one:
        torch.testing.assert_close(ddp[name], one[name], rtol=1e-4, atol=1e-5, msg=name)
