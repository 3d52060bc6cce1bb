"""The example third-party attention distribution ``anexa-sliding``, installed (not imported from examples/):
it passes the conformance kit, the bench labels it "not exact", and a model trained with it through the
CLI keeps its window in the checkpoint for generate and --resume."""

import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_FLAGS, require_distribution
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core import AnexaError, options, plugins, testing
from anexa_core.io import checkpoint
from anexa_core.measure.bench import bench_attention

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "anexa-sliding"
runner = CliRunner()


@pytest.fixture(scope="module")
def sliding():
    """The registration of ``sliding``, from the installed distribution."""
    require_distribution("anexa-sliding", "./examples/anexa-sliding")
    return plugins.lookup("attention", "sliding")


def start(*args, disable=None):
    """``anexa ARGS`` started in a fresh process: the plugin is found through its installed entry point."""
    env = {k: v for k, v in os.environ.items() if k not in ("ANEXA_LOAD_PLUGINS", "ANEXA_DISABLE_PLUGINS")}
    if disable is not None:
        env["ANEXA_DISABLE_PLUGINS"] = disable
    return subprocess.Popen(
        [sys.executable, "-m", "anexa_cli", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def finish(process):
    stdout, stderr = process.communicate(timeout=300)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def anexa(*args, disable=None):
    return finish(start(*args, disable=disable))


def test_the_installed_distribution_registers_sliding_with_a_typed_window(sliding):
    assert sliding.distribution == "anexa-sliding"
    assert sliding.version == importlib.metadata.version("anexa-sliding")
    module_file = Path(sys.modules[sliding.obj.__module__].__file__).resolve()
    assert EXAMPLE not in module_file.parents, f"imported from the source folder: {module_file}"
    (window,) = options.describe(sliding.obj)
    assert (window.name, window.type, window.default) == ("window", int, 64)


@pytest.mark.parametrize("window", [1, 3, 64])
def test_passes_the_conformance_kit(sliding, window):
    testing.check_attention(sliding.obj, window=window)


def test_its_reference_is_the_sliding_window(sliding):
    """The kit checks the plugin against its own reference, so the reference itself is checked here."""
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, generator=generator, dtype=torch.float64) for _ in range(3))
    wide = plugins.create("attention", "sliding", {"window": "10"})[0]
    for causal in (True, False):  # a window covering every key is exact attention
        exact = testing.reference_attention(q, k, v, causal=causal)
        assert torch.allclose(wide.reference(q, k, v, causal=causal), exact)
    one = plugins.create("attention", "sliding", {"window": "1"})[0]
    assert torch.allclose(one.reference(q, k, v, causal=True), v)  # each query sees only itself
    attend = plugins.create("attention", "sliding", {"window": "3"})[0]
    full = attend.reference(q, k, v, causal=True)
    # Query 5 sees keys 3, 4, 5 only: exact attention over those three.
    assert torch.allclose(
        full[..., 5:6, :], testing.reference_attention(q[..., 5:6, :], k[..., 3:6, :], v[..., 3:6, :], causal=False)
    )
    # Fewer queries than keys (decoding with a KV cache): the queries are the last positions.
    assert torch.allclose(attend.reference(q[..., -2:, :], k, v, causal=True), full[..., -2:, :])
    assert torch.allclose(
        attend(q[..., -2:, :].float(), k.float(), v.float(), causal=True).double(), full[..., -2:, :], atol=1e-5
    )


@pytest.mark.parametrize(
    "value,message",
    [
        ("0", "sliding window must be at least 1, got 0"),
        ("2.5", "attention sliding option window must be an integer, got '2.5'"),
    ],
)
def test_a_bad_window_is_a_one_line_error(sliding, value, message):
    with pytest.raises(AnexaError, match=message):
        plugins.create("attention", "sliding", {"window": value})


def test_bench_labels_it_not_exact_and_checks_it_against_its_own_reference(sliding):
    (row,) = bench_attention(seqs=(80,), batch=1, heads=2, head_dim=16, attention=["sliding"], repeats=1, device="cpu")
    assert row["status"] == "ok, not exact: vs its own reference"
    assert row["checked_against"] == "own reference" and row["max_abs_err"] < 1e-4  # window 64 < 80 keys


@pytest.fixture(scope="module")
def sliding_run(sliding, sherlock_path, tmp_path_factory):
    """A tiny model trained with ``anexa train --attention sliding -o attention.window=8`` in a fresh process."""
    out = tmp_path_factory.mktemp("sliding") / "run"
    done = anexa(
        "train",
        "--data",
        str(sherlock_path),
        *TINY_FLAGS,
        "--steps",
        "6",
        "--eval-every",
        "3",
        "--device",
        "cpu",
        "--out",
        str(out),
        "--attention",
        "sliding",
        "-o",
        "attention.window=8",
    )
    assert done.returncode == 0, done.stderr
    return out


def test_the_checkpoint_records_the_plugin_its_options_and_its_distribution(sliding_run):
    expected = {
        "name": "sliding",
        "options": {"window": 8},
        "distribution": "anexa-sliding",
        "version": importlib.metadata.version("anexa-sliding"),
    }
    for name in ("model.safetensors", "best.safetensors"):
        meta = checkpoint.read_metadata(sliding_run / name)
        assert meta["plugins"]["attention"] == expected
        assert meta["model_config"]["attention"] == "sliding"
        assert meta["model_config"]["attention_options"] == {"window": 8}


def _logits(model, ids):
    with torch.no_grad():
        return model(ids)[0]


def test_loading_restores_window_8(sliding_run, sherlock_path):
    restored, tokenizer, _ = checkpoint.load_model(sliding_run)
    assert restored.config.attention == "sliding" and restored.config.attention_options == {"window": 8}
    ids = torch.tensor([tokenizer.encode(sherlock_path.read_text(encoding="utf-8")[5000:5032])])
    explicit_8, _, _ = checkpoint.load_model(sliding_run, attention="sliding", attention_options={"window": "8"})
    explicit_2, _, _ = checkpoint.load_model(sliding_run, attention="sliding", attention_options={"window": "2"})
    assert torch.equal(_logits(restored, ids), _logits(explicit_8, ids))
    # Same weights, another window: a different model from the third position on.
    difference = (_logits(restored, ids) - _logits(explicit_2, ids)).abs()
    assert difference[:, :2].max() < 1e-6 and difference[:, 2:].max() > 1e-2


def test_generate_uses_the_stored_window(sliding_run):
    """`anexa generate` loads through checkpoint.load_model (above); the text agrees with window 8. (A model
    this small and short-trained writes nearly the same text with any window: the logits above prove the
    difference, the text would not.)"""

    def generate(*extra):
        result = runner.invoke(
            app,
            [
                "generate",
                "Sherlock Holmes was",
                "--model",
                str(sliding_run),
                "-n",
                "40",
                "--seed",
                "0",
                "--device",
                "cpu",
                *extra,
            ],
        )
        assert result.exit_code == 0, result.output
        return result.stdout

    assert generate() == generate("--attention", "sliding", "-o", "attention.window=8")


def test_resume_keeps_the_window_and_a_missing_plugin_names_its_distribution(sliding_run):
    before = checkpoint.read_metadata(sliding_run / "model.safetensors")
    # Both at once (saves are atomic): generate fails on the metadata, before any weights are read.
    without_plugin = start("generate", "x", "--model", str(sliding_run), disable="anexa-sliding")
    # Found by a QA session: a resume could change the window (or drop it), so the model card's command lied.
    for swap in (["-o", "attention.window=4"], ["--attention", "sdpa"]):
        refused = anexa("train", "--resume", str(sliding_run), "--steps", "8", *swap)
        assert refused.returncode == 2 and refused.stderr.strip() == (
            f"error: cannot change --attention or -o attention.… when resuming {sliding_run} (it has --attention "
            "sliding with window=8): it computes something other than exact softmax attention, so the model the "
            f"steps so far trained would change; start a new run from it: --init-from {sliding_run}"
        ), swap
    done = anexa("train", "--resume", str(sliding_run), "--steps", "8", "-o", "attention.window=8")
    assert done.returncode == 0, done.stderr
    after = checkpoint.read_metadata(sliding_run / "model.safetensors")
    assert after["step"] == 8 and after["plugins"] == before["plugins"]
    assert after["model_config"]["attention_options"] == {"window": 8}
    state = checkpoint.read_metadata(sliding_run / "train_state.safetensors")
    assert state["model"]["plugins"]["attention"] == before["plugins"]["attention"]
    missing = finish(without_plugin)
    version = importlib.metadata.version("anexa-sliding")
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines()[-1] == (
        f"error: this model needs attention 'sliding' from anexa-sliding {version}, which is installed but disabled: "
        "ANEXA_DISABLE_PLUGINS or --disable-plugin names it"
    )
