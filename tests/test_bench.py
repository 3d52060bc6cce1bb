"""`anexa bench`: rows per backend and shape, honest fallback rows, JSON/plot output, cache vs recompute."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from anexa_cli.bench import bench_app
from typer.testing import CliRunner

from anexa_core import bench, plugins
from anexa_core.errors import AnexaError

TINY = dict(batch=1, heads=2, head_dim=16, repeats=1, warmup=0, device="cpu")


@pytest.fixture
def no_interpreter(monkeypatch):
    """This CPU as a user sees it: without TRITON_INTERPRET the Triton kernel cannot run here.

    Plugins load first, while tests/conftest.py's TRITON_INTERPRET=1 still holds, so the kernels are
    built the way the kernel tests in this session expect.
    """
    plugins.registered("attention")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture
def one_thread():
    """Two threads on two shared cores mostly wait for each other; one thread gives stable ratios."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_attention_flops_counts_two_matmuls_and_halves_for_causal():
    assert bench.attention_flops(batch=2, heads=3, seq=4, head_dim=5, causal=False) == 4 * 2 * 3 * 4 * 4 * 5
    assert bench.attention_flops(2, 3, 4, 5, causal=True) == 2 * 2 * 3 * 4 * 4 * 5


def test_every_backend_is_timed_and_checked_against_math(no_interpreter):
    rows = bench.bench_attention(seqs=(16, 32), **TINY)
    names = sorted(plugins.registered("attention"))
    expected = [(seq, name) for seq in (16, 32) for name in names]
    assert [(row["seq"], row["attention"]) for row in rows] == expected
    for row in rows:
        assert row["max_abs_err"] < 1e-4, row
        if row["attention"] == "triton":
            assert row["status"] == "fallback → sdpa" and row["reason"]
            assert row["fwd_ms"] is row["fwd_bwd_ms"] is row["fwd_tflops"] is None
            continue
        assert row["status"] == "ok", row
        assert row["fwd_ms"] > 0 and row["fwd_tflops"] > 0 and row["fwd_bwd_tflops"] > 0
        assert row["peak_mem_mb"] is None  # not measured on CPU rather than made up
    math_16 = next(row for row in rows if row["attention"] == "math" and row["seq"] == 16)
    rate = bench.attention_flops(1, 2, 16, 16, causal=True) / (math_16["fwd_ms"] * 1e-3) / 1e12
    assert math_16["fwd_tflops"] == pytest.approx(rate)


def test_triton_row_is_timed_when_the_kernel_runs():
    """With TRITON_INTERPRET=1 (set for the test session) or a GPU the kernel itself runs and gets numbers."""
    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("neither TRITON_INTERPRET=1 nor a GPU")
    (row,) = bench.bench_attention(seqs=(16,), attention=["triton"], **{**TINY, "device": "auto"})
    assert row["status"] == "ok" and row["fwd_bwd_ms"] > 0
    assert row["max_abs_err"] < 1e-4


def test_non_causal_differs_from_causal():
    (causal,) = bench.bench_attention(seqs=(16,), attention=["sdpa"], causal=True, **TINY)
    (full,) = bench.bench_attention(seqs=(16,), attention=["sdpa"], causal=False, **TINY)
    assert full["max_abs_err"] < 1e-4 and full["causal"] is False and causal["causal"] is True


def test_cli_prints_every_backend_and_writes_json(no_interpreter, tmp_path):
    out = tmp_path / "bench.json"
    tiny = "--head-dim 16 --batch 1 --heads 2 --repeats 1 --device cpu".split()
    result = CliRunner().invoke(bench_app, ["--seq", "16", "--seq", "24,32", *tiny, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    names = plugins.registered("attention")
    assert len(rows) == 3 * len(names) and {row["seq"] for row in rows} == {16, 24, 32}
    for name in names:
        assert name in result.output
    assert "fallback → sdpa" in result.output and "triton: not timed, " in result.output


def test_cli_plot_writes_a_png(tmp_path):
    target = tmp_path / "attention.png"
    args = "--seq 16,32 --head-dim 16 --batch 1 --heads 1 --repeats 1 -a sdpa -a math --device cpu --plot".split()
    result = CliRunner().invoke(bench_app, [*args, str(target)])
    assert result.exit_code == 0, result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_without_matplotlib_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` raise ImportError
    with pytest.raises(AnexaError, match=r"pip install anexa\[plot\]"):
        bench.require_matplotlib()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dtype", "float8"], "unknown dtype 'float8'"),
        (["--attention", "nope"], "unknown attention 'nope'"),
        (["--seq", "12x"], "--seq '12x' is not a list of integers"),
        (["--batch", "0"], "--batch must be at least 1"),
        (["train", "--preset", "huge"], "unknown preset 'huge'"),
        (["generate", "--attention", "nope"], "unknown attention 'nope'"),
    ],
)
def test_user_mistakes_are_one_line_and_exit_2(args, message):
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 2
    assert result.output.startswith("error: ") and message in result.output
    assert result.output.count("\n") == 1


def test_train_reports_tokens_per_second_and_fallback(no_interpreter, one_thread):
    rows = bench.bench_train(attention=["sdpa", "triton"], steps=1, warmup=0, batch_size=2, device="cpu")
    sdpa, triton = rows
    assert sdpa["status"] == "ok" and sdpa["tokens_per_s"] > 0 and sdpa["parameters"] > 0
    assert sdpa["tokens_per_s"] == pytest.approx(2 * sdpa["block_size"] / (sdpa["step_ms"] * 1e-3))
    assert triton["status"] == "fallback → sdpa" and triton["tokens_per_s"] is None


def test_kv_cache_beats_recomputing_a_long_prompt(one_thread, tmp_path):
    out = tmp_path / "generate.json"
    args = "generate --prompt-len 112 --new-tokens 8 --repeats 3 --device cpu --json".split()
    result = CliRunner().invoke(bench_app, [*args, str(out)])
    assert result.exit_code == 0, result.output
    cache, recompute = json.loads(out.read_text())
    assert (cache["mode"], recompute["mode"]) == ("kv cache", "recompute") and cache["status"] == "ok"
    assert cache["same_tokens"] and recompute["same_tokens"]
    assert cache["tokens_per_s"] > recompute["tokens_per_s"] and cache["speedup"] > 1
    assert "kv cache" in result.output and "speedup" in result.output


def test_help_does_not_import_torch():
    code = "import sys; from anexa_cli.bench import bench_app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_backend_can_say_when_it_falls_back():
    def attend(q, k, v, *, causal):
        return q

    attend.fallback_reason = lambda q: None if q.dtype == torch.float64 else "only float64 here"
    assert bench.kernel_fallback("any", attend, torch.zeros(1)) == "only float64 here"
    assert bench.kernel_fallback("any", attend, torch.zeros(1, dtype=torch.float64)) is None
    assert bench.kernel_fallback("sdpa", plugins.get("attention", "sdpa"), torch.zeros(1)) is None
