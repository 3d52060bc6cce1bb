"""Presets, then a TOML file, then flags — in that order; mistakes are one-line errors."""

from pathlib import Path

import pytest
from helpers import PACKAGES, TINY_MODEL_FLAGS, source_files

from anexa_core.config import resolve
from anexa_core.errors import AnexaError

REPO = Path(__file__).resolve().parent.parent


def test_presets():
    seed_model, seed_train = resolve("seed")
    assert (seed_model.n_layer, seed_model.n_head, seed_model.n_embd, seed_model.block_size) == (4, 4, 128, 128)
    assert seed_train.steps == 5000
    small_model, small_train = resolve("small")
    assert (small_model.n_layer, small_model.n_head, small_model.n_embd, small_model.block_size) == (6, 6, 384, 256)
    assert small_train.batch_size == 64


def test_toml_overrides_preset_and_flags_override_toml(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('lr = 3e-4\n[model]\nn_layer = 2\nattention = "math"\n[train]\nsteps = 70\nbatch_size = 8\n')
    model, train = resolve("small", config, {"steps": 90, "n_embd": None})
    assert (model.n_layer, model.n_embd, model.attention) == (2, 384, "math")  # TOML over preset
    assert (train.lr, train.batch_size) == (3e-4, 8)
    assert train.steps == 90  # flag over TOML; None means "not given"


@pytest.mark.parametrize(
    "text,match",
    [
        ("n_layers = 3\n", "unknown setting 'n_layers'"),
        ("steps = \n", "not valid TOML"),
        ("n_embd = 100\nn_head = 3\n", "divisible"),
        ("dropout = 1.5\n", "dropout must be in"),
        ("lr = 0.1\nmin_lr = 0.5\n", "learning rates"),
        ("lr = inf\n", r"lr \(--lr\) must be a finite number, got inf"),
        ("lr = 1e30\n", "--lr 1e\\+30 would make any model diverge: give at most 10"),
        # Found by a QA session: a setting given twice in one file lost one of its values without a word.
        ("steps = 5\n[train]\nsteps = 3\n", r"sets steps twice \(at the top and in \[train\]\): keep one of them"),
        (
            '[attention]\nname = "sliding"\nwindow = 8\n[model]\nattention_options = { window = 4 }\n',
            r"sets attention_options twice \(as the \[attention\] table and in \[model\]\)",
        ),
        (
            '[model]\nattention = "math"\n[attention]\nname = "sdpa"\n',
            r"sets attention twice \(in \[model\] and as name",
        ),
        ("[train]\nsteps = 3\nsteps = 4\n", r"bad.toml sets a key twice \(at line 3, column \d+\): keep one of them"),
        # ... and a shorthand beside its plugin's own option lost one of the two.
        ("bias = false\n[blocks]\nbias = true\n", r"bad.toml sets bias twice \(as bias and in \[blocks\]\): keep one"),
        ("weight_decay = 0.0\n[optimizer]\nweight_decay = 0.3\n", r"sets weight_decay twice \(as weight_decay and"),
    ],
)
def test_bad_config_file(tmp_path, text, match):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    with pytest.raises(AnexaError, match=match):
        resolve("seed", config)


def test_a_config_file_names_plugins_at_the_top_or_in_their_tables_and_its_errors_are_one_line(tmp_path):
    config = tmp_path / "plugins.toml"
    config.write_text('attention = "math"\n[blocks]\nbias = false\n')
    model, _ = resolve("seed", config)
    assert model.attention == "math" and model.blocks_options["bias"] is False
    config.write_text('bias = false\n[blocks]\ngelu = "tanh"\n')  # a shorthand beside another option is fine
    assert resolve("seed", config)[0].blocks_options == {"bias": False, "gelu": "tanh"}
    with pytest.raises(AnexaError, match=f"^config {tmp_path} is a folder: pass a TOML file$"):
        resolve("seed", tmp_path)
    config.write_text("steps = \n")
    with pytest.raises(AnexaError) as error:
        resolve("seed", config)
    assert (
        str(error.value)
        == f"config file {config} is not valid TOML (Invalid value (at line 1, column 9)): fix the file"
    )


def test_missing_config_file_and_unknown_preset(tmp_path):
    with pytest.raises(AnexaError, match="not found"):
        resolve("seed", tmp_path / "nope.toml")
    with pytest.raises(AnexaError, match="unknown preset 'tiny': choose one of seed, fast, small"):
        resolve("tiny")


def test_nothing_loads_or_saves_with_pickle():
    """Checkpoints are safetensors only: no torch.load, no pickle in the product's code."""
    sources = [path for package in PACKAGES for path in source_files(package)]
    assert sources
    for path in sources:
        text = path.read_text(encoding="utf-8")
        for banned in ("torch.load(", "import pickle", "pickle.load", "torch.save("):
            assert banned not in text, f"{banned} in {path}"


def test_plugin_options_a_user_gives_are_never_dropped(tmp_path, sherlock_path):
    """Issue 24: `--blocks llama --config my.toml` with `[blocks]` holding `rope_theta = 5000.0` (no name)
    trained with rope_theta 10000: naming the plugin on the command line dropped the file's options."""
    from helpers import user_error

    from anexa_core.io import checkpoint

    config = tmp_path / "my.toml"
    config.write_text("[blocks]\nrope_theta = 5000.0\n", encoding="utf-8")
    model, _ = resolve("seed", config, {"blocks": "llama"})
    assert (model.blocks, model.blocks_options) == ("llama", {"rope_theta": 5000.0})
    # The preset's options belong to the preset's plugin: --blocks gpt2 on `fast` drops llama's.
    assert resolve("fast", None, {"blocks": "gpt2"})[0].blocks_options == {}
    assert resolve("fast", config)[0].blocks_options == {
        "mlp": "swiglu",
        "qk_norm": True,
        "zero_init": True,
        "rope_theta": 5000.0,
    }
    # Through the CLI, to the checkpoint.
    from typer.testing import CliRunner

    from anexa_cli.main import app

    args = ["train", "--data", str(sherlock_path), *TINY_MODEL_FLAGS, "--batch-size", "4", "--steps", "2"]
    args += ["--eval-every", "2", "--device", "cpu"]
    result = CliRunner().invoke(
        app, [*args, "--blocks", "llama", "--config", str(config), "--out", str(tmp_path / "r")]
    )
    assert result.exit_code == 0, result.output
    assert checkpoint.read_metadata(tmp_path / "r")["model_config"]["blocks_options"]["rope_theta"] == 5000.0
    # Options the chosen plugin does not take are refused in one line, never dropped.
    config.write_text('[attention]\nname = "sliding"\nwindow = 64\n', encoding="utf-8")
    user_error(
        [*args, "--attention", "sdpa", "--config", str(config), "--out", str(tmp_path / "s")],
        "attention sdpa has no option 'window': choose one of backend",
    )
    user_error(
        [
            *args,
            "--config",
            str(config),
            "--blocks",
            "gpt2",
            "-o",
            "blocks.rope_theta=1e4",
            "--out",
            str(tmp_path / "t"),
        ],
        "has no option 'rope_theta'",
    )
