"""CPU threads: every command that runs torch takes --threads, and the default leaves busy cores alone.

The speed itself is measured by ``benchmarks/threads.py`` (numbers in ``benchmarks/RESULTS.md``); these
tests check the choice and that every command applies it.
"""

import subprocess
import sys

import pytest
import torch
from helpers import user_error
from typer.testing import CliRunner

from anexa_cli.main import app
from anexa_core import device
from anexa_core.config import resolve
from anexa_core.errors import AnexaError

runner = CliRunner()
TORCH_COMMANDS = [
    ["train"],
    ["generate"],
    ["chat"],
    ["eval"],
    ["export"],
    ["serve"],
    ["bench"],
    ["bench", "train"],
    ["bench", "generate"],
]


@pytest.fixture
def restore_threads(monkeypatch):
    """Each test chooses afresh and leaves torch's thread count as it found it."""
    before = torch.get_num_threads()
    for name in ("ANEXA_THREADS", "OMP_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(device, "_auto_threads", None)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("command", TORCH_COMMANDS, ids=" ".join)
def test_every_command_that_runs_torch_takes_threads(command):
    helped = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300"})
    assert helped.exit_code == 0, helped.output
    assert "--threads" in helped.stdout, f"anexa {' '.join(command)} has no --threads"


@pytest.mark.parametrize(
    "cores,busy,expected",
    [(2, 0.0, 2), (2, 0.2, 2), (2, 0.3, 1), (2, 1.0, 1), (2, 2.0, 1), (8, 3.0, 5), (1, 0.0, 1)],
)
def test_the_default_counts_the_cores_other_work_leaves_free(monkeypatch, cores, busy, expected):
    monkeypatch.setattr(device, "usable_cores", lambda: cores)
    monkeypatch.setattr(device, "busy_cores", lambda interval_s=0.25: busy)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert device.default_threads() == expected
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # torchrun: each local rank gets its share
    assert device.default_threads() == max(1, cores // 2)


def test_busy_cores_sees_a_spinning_process():
    """One process spinning on a core is seen as (at least) one busy core; other work only adds to it."""
    if not hasattr(__import__("os"), "sched_getaffinity"):
        pytest.skip("busy_cores reads Linux's /proc/stat")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        assert device.busy_cores(0.5) >= 0.7
    finally:
        spinner.kill()
        spinner.wait()


def test_explicit_counts_win_then_the_environment_then_the_choice(restore_threads, monkeypatch):
    monkeypatch.setattr(device, "default_threads", lambda: 3)
    assert device.resolve_threads(None) == (3, "chosen")
    assert device.resolve_threads(0) == (3, "chosen")
    assert device.resolve_threads(None, default=1) == (1, "the command's default")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert device.resolve_threads(None, default=1) == (2, "the environment")
    monkeypatch.setenv("ANEXA_THREADS", "4")
    assert device.resolve_threads(None) == (4, "the environment")
    assert device.resolve_threads(1) == (1, "--threads")
    monkeypatch.setenv("ANEXA_THREADS", "many")
    with pytest.raises(AnexaError, match="ANEXA_THREADS='many' is not a number of threads"):
        device.resolve_threads(None)
    with pytest.raises(AnexaError, match="--threads must be 0"):
        device.resolve_threads(-1)


def test_a_thread_count_far_beyond_the_cores_is_one_line_not_a_crash(restore_threads, monkeypatch):
    """Found by a QA session: `--threads 100000` crashed OpenMP (exit 139, no message). More than 4 threads per
    core (at least 64) is refused, from the flag and from the environment alike; up to that is allowed."""
    monkeypatch.setattr(device.os, "cpu_count", lambda: 20)
    assert device.resolve_threads(80) == (80, "--threads")
    with pytest.raises(AnexaError, match=r"^--threads asks for 81 CPU threads on 20 cores: give at most 80$"):
        device.resolve_threads(81)
    monkeypatch.setattr(device.os, "cpu_count", lambda: 2)
    assert device.resolve_threads(64) == (64, "--threads")
    monkeypatch.setenv("ANEXA_THREADS", "100000")
    with pytest.raises(AnexaError, match=r"^the environment.s thread count asks for 100000 CPU threads"):
        device.resolve_threads(None)
    result = CliRunner().invoke(app, ["generate", "--threads", "100000", "Holmes"])
    assert result.exit_code == 2 and "give at most" in result.output


def test_the_choice_is_made_once_per_process(restore_threads, monkeypatch):
    calls = []
    monkeypatch.setattr(device, "default_threads", lambda: calls.append(1) or 1)
    assert device.configure_threads() == device.configure_threads(0) == 1 == torch.get_num_threads()
    assert calls == [1]


def test_generate_computes_with_the_threads_it_is_given(restore_threads, tmp_path, monkeypatch):
    """The flag reaches torch (the model is missing, so the command fails after applying it)."""
    torch.set_num_threads(2)
    user_error(["generate", "x", "--model", str(tmp_path), "--threads", "1"], "no checkpoint at")
    assert torch.get_num_threads() == 1


def test_threads_is_a_setting_of_the_config_file_and_is_validated(tmp_path):
    config = tmp_path / "my.toml"
    config.write_text("[train]\nthreads = 1\n", encoding="utf-8")
    _, train_config = resolve("seed", config)
    assert train_config.threads == 1
    config.write_text("threads = -2\n", encoding="utf-8")
    with pytest.raises(AnexaError, match="--threads must be 0"):
        resolve("seed", config)


def test_a_run_records_its_threads_and_training_applies_the_setting(restore_threads, sherlock_path, tmp_path):
    from anexa_core.config import ModelConfig, TrainConfig
    from anexa_core.io import checkpoint
    from anexa_core.train.loop import train

    tiny = ModelConfig(n_layer=1, n_head=2, n_embd=32, block_size=32)
    config = TrainConfig(data=str(sherlock_path), steps=2, batch_size=4, eval_every=2, eval_batches=1, threads=1)
    torch.set_num_threads(2)
    train(tiny, config, tmp_path)
    assert torch.get_num_threads() == 1
    assert checkpoint.load_train_state(tmp_path).meta["threads"] == 1


def test_threads_given_before_a_bench_subcommand_reach_it(restore_threads):
    torch.set_num_threads(2)
    args = ["bench", "--threads", "1", "generate", "--prompt-len", "4", "--new-tokens", "2", "--repeats", "1"]
    result = runner.invoke(app, [*args, "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
