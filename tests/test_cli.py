"""The CLI through typer's runner, plus one real subprocess run of `anexa train` → `anexa generate`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from anexa_cli.main import app
from typer.testing import CliRunner

runner = CliRunner()
TINY_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32", "--batch-size", "8"]


@pytest.fixture(scope="module")
def run_dir(sherlock_path, tmp_path_factory):
    """A tiny model trained through the CLI itself."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    result = runner.invoke(
        app, ["train", "--data", str(sherlock_path), *TINY_FLAGS, "--steps", "30", "--eval-every", "15",
              "--out", str(out), "--device", "cpu"]
    )
    assert result.exit_code == 0, result.output
    return out


def _user_error(args, match):
    """Exit code 2 and exactly one line on stderr that names the problem; never a traceback."""
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    return result


def test_train_writes_a_run_folder(run_dir):
    assert {p.name for p in run_dir.iterdir()} == {"model.safetensors", "train_state.safetensors", "metrics.jsonl"}
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [15, 30]


def test_generate_prints_only_the_continuation(run_dir):
    args = ["generate", "Sherlock Holmes", "--model", str(run_dir), "-n", "40", "--seed", "1"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout  # same seed, same text
    assert len(first.stdout) == 41 and first.stdout.endswith("\n")  # 40 characters, nothing else


def test_generate_reads_the_prompt_from_stdin(run_dir):
    result = runner.invoke(app, ["generate", "--model", str(run_dir), "-n", "5", "--temperature", "0"], input="Watson")
    greedy = runner.invoke(app, ["generate", "Watson", "--model", str(run_dir), "-n", "5", "-s", "greedy"])
    assert result.exit_code == 0 and result.stdout == greedy.stdout


def test_generate_stops_at_a_stop_string(run_dir):
    free = runner.invoke(app, ["generate", "The ", "--model", str(run_dir), "-n", "30", "--temperature", "0"]).stdout
    stop = free[3:6]
    stopped = runner.invoke(app, ["generate", "The ", "--model", str(run_dir), "-n", "30", "--temperature", "0",
                                  "--stop", stop]).stdout
    assert stopped == free[: free.index(stop)] + "\n"


def test_chat_streams_responses_until_quit(run_dir):
    result = runner.invoke(app, ["chat", "--model", str(run_dir), "-n", "10", "--seed", "3"], input="Holmes\nquit\n")
    assert result.exit_code == 0, result.output
    assert "Prompt: Response: " in result.stdout and result.stdout.count("Prompt: ") == 2


def test_chat_reports_unseen_characters_and_goes_on(run_dir):
    result = runner.invoke(app, ["chat", "--model", str(run_dir), "-n", "5"], input="日本\nWatson\n")
    assert result.exit_code == 0
    assert "never seen in training ('日', '本')" in result.stdout and result.stdout.count("Response: ") == 2


def test_plugins_json_lists_builtins_with_versions():
    result = runner.invoke(app, ["plugins", "--json"])
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["sdpa"] == {"name": "sdpa", "distribution": "anexa", "version": listed["sdpa"]["version"],
                              "registers": {"attention": ["sdpa"]}}
    assert listed["corpora"]["registers"] == {"datasets": ["sherlock", "tinyshakespeare"]}
    table = runner.invoke(app, ["plugins"]).stdout
    assert "gpt2" in table and "blocks" in table


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--attention", "nope"], "unknown attention 'nope': choose one of"),
        (["train", "--blocks", "nope"], "unknown blocks 'nope'"),
        (["train", "--tokenizer", "nope"], "unknown tokenizers 'nope'"),
        (["train", "--preset", "huge"], "unknown preset 'huge'"),
        (["train", "--steps", "0"], "--steps must be at least 1"),
        (["train", "--n-embd", "30", "--n-head", "4"], "divisible"),
        (["train", "--data", "no-such-corpus"], "neither a dataset"),
        (["train", "--device", "tpu"], "unknown device"),
        (["generate", "x", "--model", "/nonexistent"], "no checkpoint at"),
        (["generate", "x", "-s", "top_p=1.5"], ""),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, match, tmp_path, run_dir, sherlock_path):
    if args[0] == "generate" and "--model" not in args:
        args = [*args, "--model", str(run_dir)]
    if args[0] == "train":
        args = [*args, "--out", str(tmp_path / "run")]
        if "--data" not in args:
            args += ["--data", str(sherlock_path)]
    _user_error(args, match)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_unseen_prompt_characters(run_dir):
    _user_error(["generate", "naïve ☃", "--model", str(run_dir)], "never seen in training")


@pytest.mark.parametrize("content,match", [(b"", "is empty"), (b"  \n\t ", "is empty"),
                                           (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"), (b"caf\xe9 " * 50, "UTF-8")])
def test_bad_corpus(tmp_path, content, match):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    _user_error(["train", "--data", str(corpus), "--out", str(tmp_path / "run")], match)
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint(tmp_path, run_dir):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes((run_dir / "model.safetensors").read_bytes()[:300])
    _user_error(["generate", "x", "--model", str(broken)], "corrupt")


def test_nonsense_flags_exit_2():
    assert runner.invoke(app, ["train", "--steps", "many"]).exit_code == 2
    assert runner.invoke(app, ["generate", "x", "--frobnicate"]).exit_code == 2
    assert runner.invoke(app, ["teleport"]).exit_code == 2


def test_resume_continues_a_run(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    result = runner.invoke(app, ["train", "--resume", str(copy), "--steps", "40", "--eval-every", "10"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [15, 30, 40]


def test_help_does_not_import_torch():
    code = "import sys\nfrom anexa_cli.main import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n" \
           "assert 'torch' not in sys.modules, 'torch imported'\n"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "generate" in result.stdout


def test_real_subprocess_train_then_generate(sherlock_path, tmp_path):
    anexa = Path(sys.executable).with_name("anexa")
    env = {**os.environ, "COLUMNS": "120"}
    trained = subprocess.run(
        [str(anexa), "train", "--data", str(sherlock_path), *TINY_FLAGS, "--steps", "20", "--eval-every", "10",
         "--device", "cpu"], cwd=tmp_path, capture_output=True, text=True, env=env, check=False,
    )
    assert trained.returncode == 0, trained.stderr
    assert "M parameters" in trained.stderr and (tmp_path / "runs" / "sherlock-seed" / "model.safetensors").is_file()
    generated = subprocess.run(  # no --model: the newest run under ./runs
        [str(anexa), "generate", "Holmes", "-n", "25", "--seed", "0"],
        cwd=tmp_path, capture_output=True, text=True, env=env, check=False,
    )
    assert generated.returncode == 0, generated.stderr
    assert len(generated.stdout) == 26 and generated.stderr == ""


def test_bpe_run_generates_from_any_text(sherlock_path, tmp_path):
    out = tmp_path / "bpe"
    trained = runner.invoke(app, ["train", "--data", str(sherlock_path), "--tokenizer", "bpe", "--vocab-size", "300",
                                  *TINY_FLAGS, "--steps", "6", "--eval-every", "6", "--out", str(out)])
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["generate", "naïve ☃ Holmes", "--model", str(out), "-n", "12", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and len(result.stdout) > 1
