"""The first hour on a fresh machine, and nothing a user trained is ever lost (docs/reliability.md).

Real `anexa` processes: offline with an empty cache; interrupted with Ctrl-C and SIGTERM; killed with
SIGKILL at random moments, some in the middle of a save.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import TINY_MODEL_FLAGS

from anexa_core.errors import AnexaError
from anexa_core.io import checkpoint

TINY = [
    *TINY_MODEL_FLAGS,
    "--batch-size",
    "4",
    "--device",
    "cpu",
]
CLOSED_PORT_PROXY = "http://127.0.0.1:9"  # the discard port: nothing listens, connections are refused


def anexa_env(tmp_path, **extra):
    env = {k: v for k, v in os.environ.items() if not k.lower().endswith("_proxy")}
    env.update(ANEXA_CACHE=str(tmp_path / "empty-cache"), OMP_NUM_THREADS="1", COLUMNS="120", **extra)
    return env


def anexa(*args, cwd, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "anexa_cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=timeout,
    )


def test_the_default_job_runs_offline_on_a_fresh_machine_and_never_reuses_a_run_folder(tmp_path):
    """`anexa train` with no --data: the shipped Sherlock, no network, an empty cache. Proxies point at a
    closed port, so any download would fail."""
    offline = dict.fromkeys(
        ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy", "ALL_PROXY", "all_proxy"), CLOSED_PORT_PROXY
    )
    env = anexa_env(tmp_path, **offline)
    probe = subprocess.run(
        [sys.executable, "-c", "import urllib.request as u; u.urlopen('https://example.com', timeout=5)"],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert probe.returncode != 0, "the network must be unusable for this test to mean anything"

    first = anexa("train", "--steps", "3", "--eval-every", "3", cwd=tmp_path, env=env)
    assert first.returncode == 0, first.stderr
    run = tmp_path / "runs" / "sherlock-seed"
    meta = checkpoint.read_metadata(run / checkpoint.MODEL_FILE)
    assert meta["step"] == 3 and meta["model_config"]["n_layer"] == 4 and meta["model_config"]["vocab_size"] > 80
    assert not (tmp_path / "empty-cache").exists() or not any((tmp_path / "empty-cache").rglob("*.txt"))
    before = (run / checkpoint.MODEL_FILE).read_bytes()

    again = anexa("train", "--steps", "2", "--eval-every", "2", *TINY, cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr
    assert (run / checkpoint.MODEL_FILE).read_bytes() == before, "a finished run must never be overwritten"
    assert checkpoint.read_metadata(tmp_path / "runs" / "sherlock-seed-2")["step"] == 2
    assert "saved runs/sherlock-seed-2" in again.stderr


def test_progress_is_plain_lines_in_a_log_and_resumed_runs_say_so(sherlock_path, tmp_path):
    env = anexa_env(tmp_path)
    out = tmp_path / "run"
    first = anexa(
        "train",
        "--data",
        str(sherlock_path),
        *TINY,
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--out",
        str(out),
        cwd=tmp_path,
        env=env,
    )
    assert first.returncode == 0, first.stderr
    assert "step 4/4 · loss " in first.stderr and " tok/s · ETA " in first.stderr
    assert "nan" not in first.stderr.lower()
    resumed = anexa("train", "--resume", str(out), "--steps", "6", cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stderr.startswith(f"resuming {out} from step 4")


def _start(args, env, cwd):
    return subprocess.Popen(
        [sys.executable, "-m", "anexa_cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for_training(process, timeout=120):
    """Read stderr until the run's header line: from then on steps are running."""
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            break
        seen.append(line)
        if "parameters ·" in line:
            return seen
    raise AssertionError("training never started: " + "".join(seen))


def _start_endless_training(sherlock_path, out, env, cwd):
    """A run of the tiny model that would go on for 100,000 steps, saving and evaluating never, once steps run."""
    never = "100000"
    args = ["train", "--data", str(sherlock_path), *TINY, "--steps", never, "--eval-every", never]
    process = _start([*args, "--save-every", never, "--out", str(out)], env, cwd)
    _wait_for_training(process)
    return process


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_finish_the_step_save_and_print_the_resume_command(sherlock_path, tmp_path, signum, code):
    env = anexa_env(tmp_path)
    out = tmp_path / "run"
    process = _start_endless_training(sherlock_path, out, env, tmp_path)
    time.sleep(0.5)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr
    step = checkpoint.load_train_state(out).step
    assert step >= 1 and checkpoint.read_metadata(out / checkpoint.MODEL_FILE)["step"] == step
    assert f"interrupted at step {step}; saved {out}. Continue with:\n  anexa train --resume {out}" in stderr
    resumed = anexa("train", "--resume", str(out), "--steps", str(step + 2), cwd=tmp_path, env=env)
    assert resumed.returncode == 0, resumed.stderr
    assert checkpoint.read_metadata(out / checkpoint.MODEL_FILE)["step"] == step + 2


def test_a_second_ctrl_c_leaves_at_once_without_damaging_a_file(sherlock_path, tmp_path):
    """The first Ctrl-C starts a save that a test delay keeps busy; the second one lands inside it."""
    env = anexa_env(tmp_path, ANEXA_TEST_SAVE_DELAY="3")
    out = tmp_path / "run"
    process = _start_endless_training(sherlock_path, out, env, tmp_path)
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    time.sleep(1.0)  # inside the save's delay: the training state is written, the model not yet
    started = time.monotonic()
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert time.monotonic() - started < 1.5, "a second Ctrl-C must leave at once"
    assert process.returncode == 130 and "stopped at once" in stderr, stderr
    step = _every_file_loads(out)
    assert step >= 1 and not (out / checkpoint.MODEL_FILE).exists(), "the second Ctrl-C came between the two files"
    assert not list(out.glob(".*.tmp")), "no temp file may be left behind"
    resumed = anexa("train", "--resume", str(out), "--steps", str(step + 2), cwd=tmp_path, env=anexa_env(tmp_path))
    assert resumed.returncode == 0, resumed.stderr


def _every_file_loads(out: Path) -> int | None:
    """Every checkpoint in the folder loads; returns the training state's step (None before the first save)."""
    if (out / checkpoint.MODEL_FILE).exists():
        checkpoint.load_model(out / checkpoint.MODEL_FILE)
    if (out / checkpoint.BEST_FILE).exists():
        checkpoint.load_model(out / checkpoint.BEST_FILE)
        assert (out / checkpoint.STATE_FILE).exists(), "a best model without a training state cannot be resumed"
    for line in (out / "metrics.jsonl").read_text().splitlines()[:-1] if (out / "metrics.jsonl").exists() else []:
        json.loads(line)  # only the last line may be cut short by a kill
    if not (out / checkpoint.STATE_FILE).exists():
        return None
    state = checkpoint.load_train_state(out)
    if (out / checkpoint.MODEL_FILE).exists():
        model_step = checkpoint.read_metadata(out / checkpoint.MODEL_FILE)["step"]
        assert model_step <= state.step, "the training state is written first, so the model never gets ahead of it"
    return state.step


def test_sigkill_at_random_moments_never_loses_or_mixes_a_run(sherlock_path, tmp_path):
    """At least 10 SIGKILLs, many during saves (each save sleeps 0.3 s between its two files); after each,
    every file loads and --resume continues; the run ends at the configured step."""
    steps = 300
    env = anexa_env(tmp_path, ANEXA_TEST_SAVE_DELAY="0.3")
    out = tmp_path / "run"
    config = tmp_path / "frequent.toml"
    config.write_text("eval_every = 5\nsave_every = 5\neval_batches = 2\n", encoding="utf-8")
    fresh = [
        "train",
        "--data",
        str(sherlock_path),
        *TINY,
        "--steps",
        str(steps),
        "--config",
        str(config),
        "--out",
        str(out),
    ]
    rng = random.Random(7)
    kills, steps_seen = 0, []
    while kills < 10:
        state_step = _every_file_loads(out) if out.exists() else None
        args = ["train", "--resume", str(out)] if state_step is not None else fresh
        process = _start(args, env, tmp_path)
        _wait_for_training(process)
        time.sleep(rng.uniform(0.05, 1.2))
        if process.poll() is not None:
            pytest.fail(f"the run finished before it could be killed ({kills} kills so far)")
        process.kill()
        process.communicate(timeout=60)
        kills += 1
        steps_seen.append(_every_file_loads(out))
    finished = anexa("train", "--resume", str(out), cwd=tmp_path, env=anexa_env(tmp_path))
    assert finished.returncode == 0, finished.stderr
    assert _every_file_loads(out) == steps
    assert checkpoint.read_metadata(out / checkpoint.MODEL_FILE)["step"] == steps
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(5, steps + 1, 5)), "metrics: each eval once, in order"
    assert any(s is not None and s > 0 for s in steps_seen), steps_seen


# --- SIGKILL while tokenizing and exporting: nothing lost, nothing left to trip over or to pile up ----

SLOW_TOKENIZE = r"""
import sys, time
from pathlib import Path
from anexa_core import hookimpl, plugins
from anexa_core.data import corpus, tokens
from anexa_plugins.char_tokenizer import CharTokenizer

class Slow(CharTokenizer):
    def encode_batch(self, texts):
        time.sleep(0.3)  # a big corpus, in short: SIGKILL lands while the ids are being written
        return super().encode_batch(texts)

class Plugin:
    @hookimpl
    def register_tokenizers(self, register):
        register("slow", Slow)

plugins.plugin_manager().register(Plugin(), name="slow")
data = corpus.resolve_corpus(sys.argv[1])
tokenizer, options = tokens.trained_tokenizer(data, tokens.file_digests(data.files), "slow", {})
print("tokenizing", flush=True)
tokens.tokenize(data, tokenizer, "slow", options)
"""


def test_sigkill_while_tokenizing_leaves_nothing_a_later_run_trips_over_or_that_piles_up(tmp_path, sherlock_path):
    """Each kill lands while the ids are written: its temp file (as large as what was written) is
    removed by the next process that uses the cache, which then tokenizes the corpus whole."""
    text = sherlock_path.read_text(encoding="utf-8")
    corpus_file = tmp_path / "big.txt"
    corpus_file.write_text(text * 12, encoding="utf-8")  # about 7 MB: several batches
    env = anexa_env(tmp_path)
    cache = Path(env["ANEXA_CACHE"]) / "tokens"
    for _ in range(3):
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_TOKENIZE, str(corpus_file)], env=env, stdout=subprocess.PIPE, text=True
        )
        assert process.stdout.readline().strip() == "tokenizing"
        deadline = time.monotonic() + 60
        while not list(cache.glob(".*.bin.*.tmp")) and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.2)
        process.kill()
        process.wait()
        assert len(list(cache.glob(".*.bin.*.tmp"))) == 1, "the killed writer's temp file, and only it"
        assert not list(cache.glob("*.bin")), "no half-written cache entry under a real name"
    from anexa_core.data import corpus, tokens

    os.environ["ANEXA_CACHE"] = env["ANEXA_CACHE"]  # the autouse fixture restores it
    data = corpus.resolve_corpus(str(corpus_file))
    tokenizer, options = tokens.trained_tokenizer(data, tokens.file_digests(data.files), "char", {})
    stream = tokens.tokenize(data, tokenizer, "char", options)
    assert stream.built and len(stream.ids) == len(text * 12)
    assert not [p for p in cache.rglob(".*") if p.name.endswith((".tmp", ".old"))], "stale temp files removed"
    assert len(list((cache / "locks").iterdir())) <= 256 and not list(cache.glob("*.lock"))


KILLED_BETWEEN_RENAMES = r"""
import os, signal, sys
from anexa_core.io import export, pretrained
real_rename = os.rename

def rename(source, destination):
    real_rename(source, destination)
    if str(destination).endswith("folder"):  # OUT moved aside, the new folder not yet in
        os.kill(os.getpid(), signal.SIGKILL)

os.rename = rename
if sys.argv[1] == "export":
    export.export(sys.argv[2], sys.argv[3], overwrite=True)
else:
    pretrained.import_model(sys.argv[2], sys.argv[3], overwrite=True)
"""


def test_sigkill_between_an_exports_two_renames_loses_nothing(tmp_path, sherlock_path):
    """`--overwrite` moves the old OUT aside, then the new one in. Killed between the two, OUT is gone
    for a moment; the next export (or anything writing OUT) puts the old one back first, so the earlier
    export is never lost, and no temp folder stays."""
    from anexa_core.io.export import export

    env = anexa_env(tmp_path)
    run = tmp_path / "run"
    done = anexa("train", "--data", str(sherlock_path), *TINY, "--steps", "2", "--out", str(run), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    out = tmp_path / "hf"
    export(run, out)
    earlier = (out / "README.md").read_text(encoding="utf-8") + "the earlier export's"  # still Anexa's card
    (out / "README.md").write_text(earlier, encoding="utf-8")
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, "export", str(run), str(out)], env=env, check=False
    )
    assert killed.returncode == -signal.SIGKILL
    assert not out.exists() and len([p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]) == 2
    with pytest.raises(Exception, match="holds an earlier export: pass --overwrite"):
        export(run, out)  # the old folder is back, and still refused without --overwrite
    assert (out / "README.md").read_text(encoding="utf-8") == earlier
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]
    export(run, out, overwrite=True)
    assert (out / "config.json").is_file() and (out / "README.md").read_text(encoding="utf-8") != earlier


def test_sigkill_between_an_imports_two_renames_loses_nothing(tmp_path, sherlock_path):
    """The same for `anexa import --overwrite` over a run it imported before: killed between the two
    renames, the next import puts the old run back first (and refuses it without --overwrite)."""
    from anexa_core.io.export import export
    from anexa_core.io.pretrained import import_model

    env = anexa_env(tmp_path)
    run = tmp_path / "run"
    done = anexa("train", "--data", str(sherlock_path), *TINY, "--steps", "2", "--out", str(run), cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    export(run, tmp_path / "hf")
    out = tmp_path / "imported"
    import_model(tmp_path / "hf", out)
    before = (out / "model.safetensors").read_bytes()
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_BETWEEN_RENAMES, "import", str(tmp_path / "hf"), str(out)], env=env, check=False
    )
    assert killed.returncode == -signal.SIGKILL and not out.exists()
    with pytest.raises(AnexaError, match="already holds a run: pass --overwrite"):
        import_model(tmp_path / "hf", out)
    assert (out / "model.safetensors").read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".imported.")]
    import_model(tmp_path / "hf", out, overwrite=True)
    assert (out / "model.safetensors").is_file()


KILLED_WRITE = r"""
import os, signal, sys
from anexa_core.io.files import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"half")
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_every_atomic_writer_removes_what_killed_writers_in_its_folder_left(tmp_path):
    """The mechanism the token cache, checkpoints, downloads and exports (and any later command) share:
    temp names carry the writer's pid; the next writer into the folder removes those of dead processes,
    whatever their target (the newcomer's report: a killed GGUF export's 540 MB temp file stayed until
    that same file was exported again), never a live one's nor a stranger's look-alike."""
    from anexa_core.io.files import atomic_path, sweep_stale

    target = tmp_path / "data.bin"
    for _ in range(3):
        killed = subprocess.run([sys.executable, "-c", KILLED_WRITE, str(target)], check=False)
        assert killed.returncode == -signal.SIGKILL
    # Each killed writer removed its killed predecessor's: one left, never a pile.
    assert len(list(tmp_path.glob(".data.bin.*.tmp"))) == 1 and not target.exists()
    alive = tmp_path / f".data.bin.{os.getpid()}.abcd1234.tmp"  # a writer still at work
    alive.write_bytes(b"busy")
    strangers = [tmp_path / ".notes.txt.1.backup.tmp", tmp_path / ".notes.txt.999999999.abcd123.tmp"]
    for stranger in strangers:  # not tempfile's 8 characters after a pid: not an Anexa writer's
        stranger.write_text("someone else's")
    with atomic_path(tmp_path / "other.bin") as tmp:  # another target in the same folder
        tmp.write_bytes(b"whole")
    assert (tmp_path / "other.bin").read_bytes() == b"whole"
    assert sorted(p.name for p in tmp_path.glob(".*")) == sorted(p.name for p in [alive, *strangers])
    assert sweep_stale(tmp_path) == [] and alive.exists()
