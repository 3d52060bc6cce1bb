"""`anexa eval`: strided windows score every token once; the numbers equal a computation by hand."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core import AnexaError
from anexa_core.config import ModelConfig, TrainConfig
from anexa_core.data.corpus import read_corpus
from anexa_core.infer import evaluation
from anexa_core.io import checkpoint
from anexa_core.train.loop import train

runner = CliRunner()
BLOCK = 16


@pytest.fixture(scope="module")
def run(sherlock_path, tmp_path_factory):
    """A tiny char model trained a few steps on Sherlock (its cache in a module-wide folder)."""
    out = tmp_path_factory.mktemp("eval") / "run"
    mp = pytest.MonkeyPatch()
    mp.setenv("ANEXA_CACHE", str(tmp_path_factory.mktemp("eval-cache")))
    try:
        train(
            ModelConfig(n_layer=1, n_head=2, n_embd=16, block_size=BLOCK),
            TrainConfig(
                data=str(sherlock_path),
                steps=20,
                eval_every=20,
                save_every=20,
                batch_size=8,
                eval_batches=2,
                device="cpu",
                warmup_steps=2,
            ),
            out,
        )
    finally:
        mp.undo()
    return out


@pytest.fixture
def loaded(run):
    return checkpoint.load_model(run)


@pytest.fixture
def text_file(sherlock_path, tmp_path):
    """Held-out-like text: 16·40 + 1 characters of the book, so (N − 1) is a multiple of the window."""
    text = read_corpus(sherlock_path)[-5000:][: BLOCK * 40 + 1]
    path = tmp_path / "held-out.txt"
    path.write_text(text, encoding="utf-8")
    return path, text


def test_disjoint_windows_give_the_mean_of_per_window_losses(loaded, text_file):
    model, tokenizer, meta = loaded
    path, text = text_file
    ids = tokenizer.encode(text)
    result, described = evaluation.evaluate_text(model, tokenizer, meta, str(path), stride=BLOCK)
    by_hand = []
    with torch.no_grad():
        for start in range(0, len(ids) - 1, BLOCK):
            x = torch.tensor([ids[start : start + BLOCK]])
            y = torch.tensor([ids[start + 1 : start + BLOCK + 1]])
            by_hand.append(model(x, y)[1].item())
    assert result.windows == len(by_hand) == 40 and result.tokens == len(ids) - 1
    assert result.nats_per_token == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-5)
    assert result.perplexity == pytest.approx(math.exp(result.nats_per_token))
    assert result.characters == len(text) - 1  # char model: one character per scored token
    assert result.bits_per_char == pytest.approx(result.nats / math.log(2) / (len(text) - 1))
    assert described["tokenized"] and described["files"] == 1


@pytest.mark.parametrize("stride", [1, 5, BLOCK])
def test_every_token_is_scored_once_with_the_context_its_window_gives(loaded, text_file, stride):
    model, tokenizer, _meta = loaded
    _path, text = text_file
    ids = tokenizer.encode(text)[:150]  # 149 predictions: the last window overlaps the one before
    starts, first, length, _ = evaluation.window_plan(len(ids), BLOCK, stride)
    targets = [s + j + 1 for s, f in zip(starts, first, strict=True) for j in range(f, length)]
    assert targets == list(range(1, len(ids)))  # each token but the first, once, in order
    expected = 0.0
    with torch.no_grad():
        for s, f in zip(starts, first, strict=True):
            logits, _ = model(torch.tensor([ids[s : s + length]]))
            losses = F.cross_entropy(logits[0], torch.tensor(ids[s + 1 : s + length + 1]), reduction="none")
            expected += losses[f:].double().sum().item()
            assert s == 0 or length - f <= stride  # later windows score only their newest tokens
    result = evaluation.evaluate(model, np.array(ids, dtype=np.uint16), len(ids) - 1, stride=stride, batch_size=3)
    assert result.nats == pytest.approx(expected, rel=1e-6)
    assert result.tokens == len(ids) - 1


def test_stride_one_is_full_context_scoring(loaded, text_file):
    model, tokenizer, _ = loaded
    ids = tokenizer.encode(text_file[1])[:60]
    brute = 0.0
    with torch.no_grad():
        for t in range(1, len(ids)):  # each token after as many preceding tokens as the context holds
            logits, _ = model(torch.tensor([ids[max(0, t - BLOCK) : t]]))
            brute -= torch.log_softmax(logits[0, -1], -1)[ids[t]].item()
    result = evaluation.evaluate(model, np.array(ids), len(ids) - 1, stride=1)
    assert result.nats == pytest.approx(brute, rel=1e-5)


def test_short_texts_and_bad_strides(loaded):
    model, _, _ = loaded
    starts, first, length, stride = evaluation.window_plan(5, BLOCK)
    assert length == 4 and starts.tolist() == [0] and first.tolist() == [0] and stride == 2
    result = evaluation.evaluate(model, np.array([1, 2, 3, 4, 5]), 4)
    assert result.tokens == 4 and result.windows == 1
    with pytest.raises(AnexaError, match="at least 2"):
        evaluation.window_plan(1, BLOCK)
    with pytest.raises(AnexaError, match="--stride 17 must be between 1 and the window length 16"):
        evaluation.window_plan(1000, BLOCK, 17)


def test_cli_json_equals_the_core_and_reuses_the_token_cache(run, text_file):
    path, _ = text_file
    first = runner.invoke(app, ["eval", str(run), "--data", str(path), "--device", "cpu", "--json", "--stride", "8"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    model, tokenizer, meta = checkpoint.load_model(run)
    result, _ = evaluation.evaluate_text(model, tokenizer, meta, str(path), stride=8)
    assert report["nats_per_token"] == pytest.approx(result.nats_per_token, rel=1e-6)
    assert report["bits_per_char"] == pytest.approx(result.bits_per_char, rel=1e-6)
    assert report["data"] == [str(path)] and report["step"] == meta["step"] and report["stride"] == 8
    assert report["tokenized"] is True
    again = json.loads(
        runner.invoke(app, ["eval", str(run), "--data", str(path), "--device", "cpu", "--json", "--stride", "8"]).stdout
    )
    assert again["tokenized"] is False and again["nats"] == report["nats"]
    table = runner.invoke(app, ["eval", str(run), "--data", str(path), "--device", "cpu", "--stride", "8"])
    assert table.exit_code == 0 and "bits per character" in table.stdout and "perplexity" in table.stdout
    assert "× 16 tokens, stride 8" in table.stdout
    # A text that fits one window has no stride to speak of (a newcomer saw "1 × 4464 tokens, stride 2232").
    path.write_text(path.read_text(encoding="utf-8")[:12], encoding="utf-8")
    table = runner.invoke(app, ["eval", str(run), "--data", str(path), "--device", "cpu"])
    assert table.exit_code == 0 and "1 × 11 tokens" in table.stdout and "stride" not in table.stdout


@pytest.mark.parametrize("case", ["unseen", "missing-run", "missing-data", "stride"])
def test_cli_errors_are_one_line(run, tmp_path, case):
    unseen = tmp_path / "unseen.txt"
    unseen.write_text("日本語のテキスト\n" * 20, encoding="utf-8")
    plain = tmp_path / "plain.txt"
    plain.write_text("the cat and the hat\n" * 20, encoding="utf-8")
    args, match = {
        "unseen": (["eval", str(run), "--data", str(unseen)], "does not fit this model's tokenizer"),
        "missing-run": (["eval", str(tmp_path / "nope"), "--data", str(unseen)], "no checkpoint at"),
        "missing-data": (["eval", str(run), "--data", str(tmp_path / "absent.txt")], "neither a dataset"),
        "stride": (["eval", str(run), "--data", str(plain), "--stride", "99"], "--stride 99 must be between 1"),
    }[case]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr


def test_bits_per_character_counts_the_characters_of_the_scored_bpe_tokens(sherlock_path, tmp_path):
    from anexa_core import plugins
    from anexa_core.model.gpt import build_model

    text = read_corpus(sherlock_path)[:3000]
    path = tmp_path / "t.txt"
    path.write_text(text, encoding="utf-8")
    tokenizer, options = plugins.create("tokenizers", "bpe", {"vocab_size": 300})
    tokenizer.train([text])
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tokenizer.vocab_size, n_layer=1, n_head=2, n_embd=16, block_size=BLOCK))
    meta = {"tokenizer": {"name": "bpe", "options": options}}
    result, _ = evaluation.evaluate_text(model, tokenizer, meta, str(path), stride=BLOCK)
    ids = tokenizer.encode(text)
    assert result.tokens == len(ids) - 1 and len(ids) < len(text)
    assert result.characters == len(text) - len(tokenizer.decode(ids[:1]))
    assert result.bits_per_char == pytest.approx(result.nats / math.log(2) / result.characters)
    with pytest.raises(AnexaError, match="unknown precision 'fp8'"):
        evaluation.evaluate(model, np.array(ids), 10, precision="fp8")


def test_the_automatic_batch_keeps_the_logits_in_budget_and_a_cpu_batch_small():
    """Windows per forward pass: on a CPU at most 2048 tokens (larger batches were slower there), on a
    GPU up to 64 windows; never more logits than the budget, never fewer than one window."""
    cpu, gpu = "cpu", torch.device("cuda")  # the device only names the rule; nothing runs on it
    assert evaluation.auto_batch_size(256, 65, cpu) == 8 and evaluation.auto_batch_size(128, 65, cpu) == 16
    assert evaluation.auto_batch_size(2048, 65, cpu) == 1 and evaluation.auto_batch_size(1024, 65, cpu) == 2
    assert evaluation.auto_batch_size(256, 65, gpu) == 64
    assert evaluation.auto_batch_size(256, 49152, gpu) == evaluation.LOGITS_BUDGET // (256 * 49152) == 2
    assert evaluation.auto_batch_size(8192, 49152, cpu) == evaluation.auto_batch_size(8192, 49152, gpu) == 1
    assert evaluation.auto_batch_size(4096, 1, cpu) == 1  # a window longer than the CPU's tokens: still one
    assert evaluation.auto_batch_size(256, 65) == 8 and evaluation.auto_batch_size(1, 65, cpu) == 2048  # cpu default
