"""The pure-Python reference model (plugins/anexa_plugins/reference_gpt.py) is an oracle for the torch gpt2 blocks.

Same weights, float64 on both sides: the loss and every parameter's gradient agree within 1e-9, so
does one SGD and one AdamW step; the ``reference`` blocks plugin runs the same functions inside the
core (conformance kit, ``anexa train --blocks reference``), and its weights are gpt2's.
"""

import ast
import dataclasses
import json
from pathlib import Path

import pytest
import torch
from helpers import PACKAGES
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core import plugins, testing
from anexa_core.config import ModelConfig
from anexa_core.errors import AnexaError
from anexa_core.io import checkpoint
from anexa_core.model.gpt import GPT, build_model
from anexa_plugins import reference_gpt as ref

REPO = Path(__file__).resolve().parent.parent
CONFIG = ModelConfig(vocab_size=11, n_layer=2, n_head=2, n_embd=8, block_size=6, attention="math")
TOLERANCE = 1e-9


def _gpt2(config=CONFIG, seed=0):
    """A torch gpt2 model in float64 with every weight moved off its initial value (biases non-zero,
    LayerNorm gains not one), so no term of the gradient hides behind a zero."""
    torch.manual_seed(seed)
    model = build_model(dataclasses.replace(config, blocks="gpt2")).double()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return model


def _lists(model):
    """The model's parameters as the reference takes them: nested lists under the same names."""
    tied = model.config.tie_embeddings
    return {name: t.tolist() for name, t in model.state_dict().items() if not (tied and name == "lm_head.weight")}


def _batch(config=CONFIG, batch=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (
        torch.randint(0, config.vocab_size, (batch, config.block_size), generator=generator),
        torch.randint(0, config.vocab_size, (batch, config.block_size), generator=generator),
    )


def _worst_gradient_error(model, grads):
    assert set(grads) == {name for name, _ in model.named_parameters()}
    return max(
        (torch.tensor(grads[name], dtype=torch.float64) - p.grad).abs().max().item()
        for name, p in model.named_parameters()
    )


@pytest.mark.parametrize("tie", [True, False])
def test_reference_loss_and_every_gradient_match_torch_gpt2(tie):
    model = _gpt2(dataclasses.replace(CONFIG, tie_embeddings=tie))
    ids, targets = _batch()
    _, loss = model(ids, targets)
    loss.backward()
    ref_loss, grads = ref.loss_and_gradients(_lists(model), CONFIG.n_head, ids.tolist(), targets.tolist())
    assert abs(ref_loss - loss.item()) < TOLERANCE
    assert _worst_gradient_error(model, grads) < TOLERANCE


def test_reference_logits_match_at_later_positions_and_refuse_beyond_the_context():
    model = _gpt2()
    ids, _ = _batch()
    logits, _ = ref.forward(_lists(model), CONFIG.n_head, ids[:, :4].tolist(), positions=[2, 3, 4, 5])
    hidden = model.blocks(model.wte(ids[:, :4]), torch.arange(2, 6), None)
    expected = model.lm_head(hidden).reshape(-1, CONFIG.vocab_size)
    assert (torch.tensor(logits, dtype=torch.float64) - expected).abs().max().item() < TOLERANCE
    with pytest.raises(ValueError, match="beyond block_size 6"):
        ref.forward(_lists(model), CONFIG.n_head, ids.tolist(), positions=[1, 2, 3, 4, 5, 6])


def test_sgd_and_adamw_steps_match_torch():
    ids, targets = _batch()
    for build, step in [
        (lambda params: torch.optim.SGD(params, lr=0.1), lambda p, g, s: ref.sgd_step(p, g, lr=0.1)),
        (
            lambda params: torch.optim.AdamW(params, lr=0.01, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
            lambda p, g, s: ref.adam_step(p, g, s, lr=0.01, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1),
        ),
    ]:
        model = _gpt2()
        params, state = _lists(model), {}
        optimizer = build(model.parameters())
        for _ in range(3):  # a few steps, so Adam's moments and bias corrections are exercised
            _, grads = ref.loss_and_gradients(params, CONFIG.n_head, ids.tolist(), targets.tolist())
            step(params, grads, state)
            optimizer.zero_grad()
            model(ids, targets)[1].backward()
            optimizer.step()
        worst = max(
            (torch.tensor(params[name], dtype=torch.float64) - p).abs().max().item()
            for name, p in model.named_parameters()
        )
        assert worst < TOLERANCE, f"{type(optimizer).__name__}: {worst:.2e}"


def test_reference_file_uses_only_the_standard_library_math():
    tree = ast.parse((PACKAGES["anexa_plugins"] / "reference_gpt.py").read_text(encoding="utf-8"))
    imported = {
        alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names
    }
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert imported == {"math", "random"}


def test_the_demo_learns(capsys):
    ref._demo(steps=10)
    lines = capsys.readouterr().out.splitlines()
    losses = [float(line.split()[-1]) for line in lines if line.startswith("step")]
    assert len(losses) == 2 and losses[-1] < losses[0]
    assert lines[-1].startswith("greedy continuation:")


# --- the plugin: the same functions inside the core -------------------------------------------------


def test_reference_blocks_pass_the_conformance_kit():
    testing.check_blocks(plugins.get("blocks", "reference"))  # includes: cached decoding = recomputation


def test_reference_blocks_in_the_core_match_gpt2_blocks_with_the_same_weights():
    torch.manual_seed(0)
    reference = build_model(dataclasses.replace(CONFIG, blocks="reference")).double()
    gpt2 = build_model(dataclasses.replace(CONFIG, blocks="gpt2")).double()
    assert [n for n, _ in reference.named_parameters()] == [n for n, _ in gpt2.named_parameters()]
    with torch.no_grad():
        for param in reference.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    gpt2.load_state_dict(reference.state_dict())
    ids, targets = _batch()
    losses = []
    for model in (reference, gpt2):
        _, loss = model(ids, targets)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < TOLERANCE
    grads = {name: p.grad.tolist() for name, p in reference.named_parameters()}
    assert _worst_gradient_error(gpt2, grads) < TOLERANCE


def test_reference_blocks_have_no_dropout():
    with pytest.raises(AnexaError, match="no dropout"):
        build_model(dataclasses.replace(CONFIG, blocks="reference", dropout=0.1))


def test_anexa_train_runs_the_reference_and_its_weights_are_gpt2_weights(tmp_path, sherlock_path):
    out = tmp_path / "ref"
    flags = [
        "--blocks",
        "reference",
        "--n-layer",
        "1",
        "--n-head",
        "2",
        "--n-embd",
        "16",
        "--block-size",
        "16",
        "--batch-size",
        "4",
        "--steps",
        "20",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "0",
        "--eval-every",
        "10",
        "--data",
        str(sherlock_path),
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    result = CliRunner().invoke(app, ["train", *flags])
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["val_loss"] < metrics[0]["val_loss"] < 4.6  # it learns (ln 88 ≈ 4.48 at the start)
    model, tokenizer, _meta = checkpoint.load_model(out)
    config = dataclasses.replace(model.config, blocks="gpt2", blocks_options={}, attention="math")
    gpt2 = GPT(config, plugins.create("blocks", "gpt2")[0].build(config, plugins.create("attention", "math")[0]))
    gpt2.load_state_dict(model.state_dict())
    ids = torch.tensor([tokenizer.encode("Sherlock Holmes")])
    with torch.no_grad():
        assert (model(ids)[0] - gpt2(ids)[0]).abs().max().item() < 1e-5  # float32 weights, float64 arithmetic
