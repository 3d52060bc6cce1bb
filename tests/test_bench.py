"""`anexa bench`: rows per backend and shape, honest fallback rows, JSON/plot output, cache vs recompute."""

import importlib.util
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from helpers import tiny_model, trained_tokenizer
from typer.testing import CliRunner

from anexa_cli.bench import bench_app
from anexa_core import hookimpl, plugins
from anexa_core.errors import AnexaError
from anexa_core.io import checkpoint
from anexa_core.io.load import load
from anexa_core.io.pretrained import file_sha256
from anexa_core.measure import bench
from anexa_core.model.lora import LoraSpec, apply_lora

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
        exact = row["checked_against"] == "math"
        assert row["status"] == ("ok" if exact else "ok, not exact: vs its own reference"), row
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


@dataclass
class AlwaysCausal:
    """Ignores ``causal=False``: the bench must catch it by checking against the matching reference."""

    def __call__(self, q, k, v, *, causal):
        return plugins.create("attention", "sdpa")[0](q, k, v, causal=True)


@dataclass
class Banded:
    """Not exact by design (each query sees the last 4 keys) and says so with a reference."""

    window: int = 4

    def __call__(self, q, k, v, *, causal):
        return self.reference(q, k, v, causal=causal).to(q.dtype)

    def reference(self, q, k, v, *, causal):
        t_q, t_k = q.size(-2), k.size(-2)
        rows = torch.arange(t_q).unsqueeze(1) + (t_k - t_q)
        keys = torch.arange(t_k).unsqueeze(0)
        visible = (keys > rows - self.window) & (keys <= rows if causal else True)
        scores = (q @ k.transpose(-2, -1)) / q.size(-1) ** 0.5
        return scores.masked_fill(~visible, float("-inf")).softmax(-1) @ v


class ExtraAttention:
    @hookimpl
    def register_attention(self, register):
        register("always_causal", AlwaysCausal)
        register("banded", Banded)


@pytest.fixture
def extra_attention():
    manager = plugins.plugin_manager()
    plugin = ExtraAttention()
    manager.register(plugin, name="test-extra-attention")
    yield
    manager.unregister(plugin)


def test_non_causal_is_checked_against_a_non_causal_reference(extra_attention):
    (honest,) = bench.bench_attention(seqs=(16,), attention=["sdpa"], causal=False, **TINY)
    assert honest["max_abs_err"] < 1e-4 and honest["causal"] is False
    causal, full = (
        bench.bench_attention(seqs=(16,), attention=["always_causal"], causal=c, **TINY)[0] for c in (True, False)
    )
    assert causal["max_abs_err"] < 1e-4
    assert full["max_abs_err"] > 1e-2, "a backend that ignores causal=False must show a large error"


def test_an_attention_that_is_not_exact_is_labelled_and_checked_against_its_reference(extra_attention):
    (row,) = bench.bench_attention(seqs=(16,), attention=["banded"], **TINY)
    assert row["status"] == "ok, not exact: vs its own reference" and row["checked_against"] == "own reference"
    assert row["max_abs_err"] < 1e-4
    exact = bench.reference_of(plugins.create("attention", "sdpa")[0])[1]
    assert exact == "math"


def test_cli_prints_every_backend_and_writes_json(no_interpreter, tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--head-dim", "16", "--batch", "1", "--heads", "2", "--repeats", "1", "--device", "cpu"]
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
    args = [
        "--seq",
        "16,32",
        "--head-dim",
        "16",
        "--batch",
        "1",
        "--heads",
        "1",
        "--repeats",
        "1",
        "-a",
        "sdpa",
        "-a",
        "math",
        "--device",
        "cpu",
        "--plot",
    ]
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
        (["--head-dim", "16,x"], "--head-dim '16,x' is not a list of integers"),
        (["--attention", "sdpa:backend=fast"], "attention sdpa option backend must be one of auto, flash"),
        (
            ["--attention", "sdpa:bakend=flash"],
            "attention sdpa has no option 'bakend': did you mean 'backend'? choose one of backend",
        ),
        (["--attention", "sdpa:backend"], "bad --attention 'sdpa:backend': use NAME or NAME:OPTION=VALUE"),
        (["--attention", "math:backend=flash"], "attention math takes no options"),
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


def test_train_reports_tokens_per_second_fallback_and_the_plain_loop(no_interpreter, one_thread):
    rows = bench.bench_train(attention=["sdpa", "triton"], steps=2, warmup=0, batch_size=2, device="cpu")
    sdpa, triton, plain = rows
    assert sdpa["status"] == "ok" and sdpa["tokens_per_s"] > 0 and sdpa["parameters"] > 0
    assert sdpa["tokens_per_s"] == pytest.approx(2 * sdpa["block_size"] / (sdpa["step_ms"] * 1e-3))
    assert triton["status"] == "fallback → sdpa" and triton["tokens_per_s"] is None
    assert plain["attention"] == "plain loop (sdpa)" and plain["precision"] == "fp32" and plain["vs_plain"] == 1.0
    assert sdpa["vs_plain"] == pytest.approx(plain["step_ms"] / sdpa["step_ms"])
    assert plain["parameters"] == sdpa["parameters"]  # the same architecture


def _speedups_are_against_recompute(rows):
    """Each row's ``speedup`` is its tokens/s over recomputing's. (Which mode is faster is timed by
    ``benchmarks/test_bench_generate.py`` and RESULTS.md, not here: on a busy machine a stall decides it.)"""
    for row in rows.values():
        assert row["status"] == "ok" and row["tokens_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["tokens_per_s"] / rows["recompute"]["tokens_per_s"])


def test_bench_generate_decodes_every_mode_and_a_prompt_within_the_context_gives_one_answer(one_thread, tmp_path):
    out = tmp_path / "generate.json"
    args = ["generate", "--prompt-len", "112", "--new-tokens", "8", "--repeats", "3", "--device", "cpu", "--json"]
    result = CliRunner().invoke(bench_app, [*args, str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["mode"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["shift", "sliding", "recompute"]
    assert all(row["same_tokens"] for row in rows.values())  # 112 + 8 fit the 128-token context
    _speedups_are_against_recompute(rows)
    assert "shift" in result.output and "speedup" in result.output


def test_past_the_context_sliding_still_equals_recompute_and_shift_does_not(one_thread):
    rows = {row["mode"]: row for row in bench.bench_generate(prompt_len=64, new_tokens=160, repeats=1, device="cpu")}
    assert rows["sliding"]["same_tokens"] and rows["recompute"]["same_tokens"]
    assert rows["shift"]["same_tokens"] is False  # shifting keeps half the context: another answer, by design
    _speedups_are_against_recompute(rows)


def test_help_does_not_import_torch():
    code = "import sys; from anexa_cli.bench import bench_app; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_a_backend_can_say_when_it_falls_back():
    def attend(q, k, v, *, causal):
        return q

    attend.fallback_reason = lambda q: None if q.dtype == torch.float64 else "only float64 here"
    assert bench.kernel_fallback("any", attend, torch.zeros(1)) == "only float64 here"
    assert bench.kernel_fallback("any", attend, torch.zeros(1, dtype=torch.float64)) is None
    assert bench.kernel_fallback("sdpa", plugins.create("attention", "sdpa")[0], torch.zeros(1)) is None


def test_generate_decodes_past_the_context_by_default(one_thread, tmp_path):
    """Issue 24: the defaults (64 + 64 tokens in a 128-token context) never measured the context shift."""
    out = tmp_path / "rows.json"
    result = CliRunner().invoke(bench_app, ["generate", "--repeats", "1", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert all(row["prompt_len"] + row["new_tokens"] > row["block_size"] for row in rows)
    assert rows[0]["new_tokens"] == 2 * rows[0]["block_size"]


def test_attention_specs_become_rows_labelled_as_written_with_their_options():
    assert bench.parse_attention("sdpa") == ("sdpa", {})
    assert bench.parse_attention(" sdpa:backend=cudnn ") == ("sdpa", {"backend": "cudnn"})
    rows = bench.select_attention(["sdpa", "sdpa:backend=flash", "sdpa: backend = math", "math"])
    assert list(rows) == ["sdpa", "sdpa:backend=flash", "sdpa: backend = math", "math"]
    assert [getattr(rows[label], "backend", None) for label in rows] == ["auto", "flash", "math", None]


def test_on_a_gpu_the_default_rows_add_sdpa_flash_and_cudnn_after_sdpa():
    plain = list(bench.select_attention(None))
    assert not any(":" in label for label in plain)  # the CPU default: plain plugins only
    with_extras = list(bench.select_attention(None, bench.CUDA_DEFAULT_EXTRAS))
    after = plain.index("sdpa") + 1
    assert with_extras == [*plain[:after], "sdpa:backend=flash", "sdpa:backend=cudnn", *plain[after:]]


def test_an_sdpa_backend_cpu_lacks_is_a_fallback_row_and_the_others_run(caplog):
    """A pinned backend that cannot run is labelled as the triton plugin's fallback is (PyTorch's reason,
    no timing); a model that pins it runs PyTorch's choice instead, the same numbers, logged once."""
    rows = bench.bench_attention(seqs=(16,), attention=["sdpa:backend=cudnn", "sdpa:backend=math", "sdpa"], **TINY)
    cudnn, math, default = rows
    assert cudnn["attention"] == "sdpa:backend=cudnn" and cudnn["status"] == "fallback → sdpa (PyTorch's choice)"
    assert "SDPA backend cudnn cannot run cpu float32" in cudnn["reason"] and cudnn["fwd_ms"] is None
    for row in (math, default):
        assert row["status"] == "ok" and row["fwd_bwd_ms"] > 0 and row["max_abs_err"] < 1e-4, row
    pinned, auto = (plugins.create("attention", "sdpa", options)[0] for options in ({"backend": "efficient"}, {}))
    q, k, v = torch.randn(3, 1, 2, 4, 8, generator=torch.Generator().manual_seed(0))
    caplog.clear()
    with caplog.at_level("WARNING", logger="anexa"):
        for _ in range(2):
            assert torch.equal(pinned(q, k, v, causal=True), auto(q, k, v, causal=True))
    assert [record.getMessage() for record in caplog.records] == [
        "SDPA backend efficient cannot run cpu float32 D=8: PyTorch's CPU SDPA has only the flash and math "
        "backends: PyTorch's choice runs instead"
    ]


def test_cli_head_dims_as_a_comma_list_give_rows_for_each_and_plot(tmp_path):
    out, target = tmp_path / "rows.json", tmp_path / "attention.png"
    args = ["--seq", "16", "--head-dim", "16,32", "--batch", "1", "--heads", "1", "--repeats", "1", "--device"]
    result = CliRunner().invoke(
        bench_app, [*args, "cpu", "-a", "sdpa", "-a", "sdpa:backend=math", "--json", str(out), "--plot", str(target)]
    )
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [(row["head_dim"], row["attention"]) for row in rows] == [
        (16, "sdpa"),
        (16, "sdpa:backend=math"),
        (32, "sdpa"),
        (32, "sdpa:backend=math"),
    ]
    assert all(row["status"] == "ok" for row in rows)
    assert "D=16,32" in result.output and "sdpa:backend=math" in result.output
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_pinned_sdpa_backend_reports_pytorchs_reasons_for_it_alone():
    """The warnings torch 2.11 gave on an H200 for ``sdpa:backend=flash`` with float32 inputs."""
    from anexa_plugins.sdpa_attention import _reasons

    at = " (Triggered internally at /pytorch/aten/src/ATen/native/transformers/cuda/sdp_utils.cpp:988.)"
    dtype = "Expected query, key and value to all be of dtype: {Half, BFloat16}. Got Query dtype: float"
    messages = [
        "Memory efficient kernel not used because:" + at,
        "Memory Efficient attention has been runtime disabled." + at,
        "Flash attention kernel not used because:" + at,
        dtype + at,
        "cuDNN attention kernel not used because:" + at,
        "cuDNN attention has been runtime disabled." + at,
    ]
    assert _reasons("flash", messages) == [dtype]
    assert _reasons("cudnn", messages) == []
    assert _reasons("efficient", ["only this" + at]) == ["only this"]
    many = [f"reason {i}" for i in range(5)]
    assert _reasons("flash", ["Flash attention kernel not used because:", *many]) == many[:3]  # three at most
    assert _reasons("flash", many) == many[:3]


def test_a_pinned_backend_sees_the_rows_lengths_and_a_real_error_is_not_a_fallback(caplog):
    """Ragged rows reach a pinned backend (math and flash compute them on a CPU; memory-efficient attention
    has no CPU kernel, so PyTorch's choice runs them, the mask named in the reason), and an error that is not "no kernel"
    (mismatched shapes) stays the error it is, with no fallback logged."""
    from anexa_plugins.sdpa_attention import Unavailable

    math, flash, efficient, auto = (
        plugins.create("attention", "sdpa", {"backend": b})[0] for b in ("math", "flash", "efficient", "auto")
    )
    q, k, v = torch.randn(3, 2, 2, 6, 8, generator=torch.Generator().manual_seed(0)).unbind(0)
    q = q[:, :, -2:]
    lengths = torch.tensor([3, 6])
    ragged = auto(q, k, v, causal=True, lengths=lengths)
    assert not torch.allclose(ragged, auto(q, k, v, causal=True))  # the lengths matter for these rows
    for pinned in (math, flash):
        assert torch.allclose(pinned(q, k, v, causal=True, lengths=lengths), ragged, atol=1e-6)
        assert torch.allclose(pinned._pinned(q, k, v, True, lengths), ragged, atol=1e-6)  # not a fallback
    with pytest.raises(Unavailable, match=r"^SDPA backend efficient cannot run cpu float32 D=8 with a mask: \S"):
        efficient._pinned(q, k, v, True, lengths)
    assert torch.allclose(efficient(q, k, v, causal=True, lengths=lengths), ragged, atol=1e-6)
    caplog.clear()
    with caplog.at_level("WARNING", logger="anexa"), pytest.raises(RuntimeError) as raised:
        math(q, k[:, :, :, :4], v, causal=True)
    assert not isinstance(raised.value, Unavailable) and not caplog.records


def test_a_refusal_is_explained_by_pytorchs_warnings_about_the_pinned_backend(monkeypatch):
    """What PyTorch warns when it refuses (on a GPU) becomes the reason: the lines about the pinned
    backend, not the other backends' nor the "runtime disabled" lines pinning causes."""
    import warnings

    from anexa_plugins import sdpa_attention as plugin

    def refusing(*args, **kwargs):
        for message in (
            "Flash attention kernel not used because:",
            "Expected query, key and value to all be of dtype: {Half, BFloat16}.",
            "Flash attention does not support a mask.",
            "cuDNN attention kernel not used because:",
            "cuDNN attention has been runtime disabled.",
        ):
            warnings.warn(message, UserWarning, stacklevel=1)
        raise RuntimeError("No available kernel. Aborting execution.")

    monkeypatch.setattr(plugin, "sdpa_attention", refusing)
    flash = plugin.SDPA(backend="flash")
    q = torch.zeros(1, 1, 2, 8)
    assert flash.fallback_reason(q) == (
        "SDPA backend flash cannot run cpu float32 D=8: Expected query, key and value to all be of dtype: "
        "{Half, BFloat16}.; Flash attention does not support a mask."
    )


RUN_CONTEXT = 32


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A run folder as `anexa train` leaves one: a tiny GPT-2-style model (32-token context) with a char
    tokenizer (its vocabulary: the characters below), saved with its metadata."""
    folder = tmp_path_factory.mktemp("bench-run") / "run"
    folder.mkdir()
    tokenizer = trained_tokenizer("char", "The quick brown fox jumps over the lazy dog, 1234567890.")
    model = tiny_model(seed=3, vocab_size=tokenizer.vocab_size, block_size=RUN_CONTEXT)
    meta = checkpoint.model_metadata(model, tokenizer, "char", {}, step=1, val_loss=3.0)
    checkpoint.save_model(folder / "model.safetensors", model, meta)
    return folder


@pytest.fixture(scope="module")
def lora_run(run):
    """A LoRA run on ``run``: adapters only (nonzero, so they change the weights) and a hashed reference
    to the base, as `anexa train --init-from RUN --lora` stores them."""
    folder = run.parent / "lora"
    folder.mkdir()
    loaded = load(run, "cpu", decoding=False)
    spec = LoraSpec(r=2, alpha=4, dropout=0.0)
    apply_lora(loaded.model, spec)
    with torch.no_grad():
        for name, parameter in loaded.model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(1)))
    base = {"init_from": str(run), "path": str(run.resolve()), "sha256": file_sha256(loaded.path)}
    meta = checkpoint.model_metadata(loaded.model, loaded.tokenizer, "char", {}, step=1)
    meta["lora"] = {"spec": spec.as_dict(), "base": base}
    checkpoint.save_model(folder / "model.safetensors", loaded.model, meta)
    return folder


def test_generate_measures_a_run_given_with_model(run, one_thread, tmp_path):
    """`bench generate --model RUN` decodes the run's own model (its vocabulary, context and attention),
    past its context by default, and sliding still equals recomputing."""
    out = tmp_path / "rows.json"
    args = ["generate", "--model", str(run), "--prompt-len", "8", "--repeats", "1", "--device", "cpu"]
    result = CliRunner().invoke(bench_app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = {row["mode"]: row for row in json.loads(out.read_text())}
    assert list(rows) == ["shift", "sliding", "recompute"]
    for row in rows.values():
        assert row["model"] == str(run) and row["preset"] is None and row["attention"] == "sdpa"
        assert row["block_size"] == RUN_CONTEXT and row["new_tokens"] == 2 * RUN_CONTEXT  # under 256: twice
        assert row["parameters"] == load(run, "cpu").model.num_parameters() and row["tokens_per_s"] > 0
    assert rows["sliding"]["same_tokens"] is True and rows["recompute"]["speedup"] == 1.0
    assert f"model {run}" in result.output and "sliding" in result.output and "recompute" in result.output


def test_generate_without_recompute_has_no_reference_to_compare(run, one_thread, tmp_path):
    out = tmp_path / "rows.json"
    args = ["generate", "-m", str(run), "--no-recompute", "--new-tokens", "4", "--repeats", "1", "--device", "cpu"]
    result = CliRunner().invoke(bench_app, [*args, "--json", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert [row["mode"] for row in rows] == ["shift", "sliding"]
    assert all(row["speedup"] is None and row["same_tokens"] is None and row["new_tokens"] == 4 for row in rows)
    assert "recompute" not in result.output and "—" in result.output


def test_a_long_context_run_decodes_at_most_256_tokens_by_default(tmp_path, one_thread):
    """Twice a pretrained model's context would take hours on a CPU: a run decodes 256 tokens by default
    (a 512-token context here), and `--help` says so."""
    tokenizer = trained_tokenizer("char", "The quick brown fox jumps over the lazy dog.")
    model = tiny_model(seed=1, vocab_size=tokenizer.vocab_size, block_size=512)
    checkpoint.save_model(
        tmp_path / "model.safetensors", model, checkpoint.model_metadata(model, tokenizer, "char", {})
    )
    rows = bench.bench_generate(model=tmp_path / "model.safetensors", prompt_len=8, repeats=1, recompute=False)
    assert {row["new_tokens"] for row in rows} == {256}
    assert "with --model at most 256" in " ".join(
        CliRunner().invoke(bench_app, ["generate", "--help"], env={"COLUMNS": "400"}).output.split()
    )


@pytest.mark.parametrize("command", ["generate", "train"])
def test_preset_and_model_together_are_one_line_and_exit_2(run, command):
    result = CliRunner().invoke(bench_app, [command, "--preset", "seed", "--model", str(run)])
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert result.output == (
        f"error: --preset seed and --model {run} both name the model to measure: give one "
        "(--model for a run, --preset for a random model)\n"
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--model", "no/such/run"], "no checkpoint at no/such/run"),
        (
            ["train", "--seq-len", "64"],
            "--seq-len 64 is longer than the model's context of 32 tokens: use --seq-len 32 or shorter\n",
        ),  # a trained run's context: no --block-size
    ],
)
def test_a_run_that_cannot_be_measured_is_one_line_and_exit_2(run, args, message):
    if args[0] == "train":
        args = [*args, "--model", str(run), "--device", "cpu"]
    result = CliRunner().invoke(bench_app, args)
    assert result.exit_code == 2 and result.output.count("\n") == 1, result.output
    assert result.output.startswith("error: ") and message in result.output


@pytest.mark.parametrize("which", ["run", "lora_run"])
def test_train_times_a_run_as_a_full_fine_tune_trains_it(which, request, one_thread):
    """Fine-tuning's sizes (8 windows of 256 tokens, at most the context) and AdamW over every weight; a LoRA
    run is measured as its merged model: the base's architecture, the adapters folded in."""
    path = request.getfixturevalue(which)
    own, plain = bench.bench_train(model=path, steps=1, warmup=0, device="cpu")
    parameters = load(path, "cpu").model.num_parameters()
    assert own["attention"] == "sdpa" and plain["attention"] == "plain loop (sdpa)"
    for row in (own, plain):
        assert row["model"] == str(path) and row["status"] == "ok" and row["parameters"] == parameters
        assert (row["batch_size"], row["seq_len"], row["block_size"]) == (8, RUN_CONTEXT, RUN_CONTEXT)
    assert own["tokens_per_s"] == pytest.approx(8 * RUN_CONTEXT / (own["step_ms"] * 1e-3))


def test_train_cli_measures_a_run_with_the_windows_asked_for(run, one_thread, tmp_path):
    out = tmp_path / "rows.json"
    args = ["train", "-m", str(run), "-a", "math", "--batch-size", "2", "--seq-len", "16", "--steps", "1"]
    result = CliRunner().invoke(bench_app, [*args, "--no-reference", "--device", "cpu", "--json", str(out)])
    assert result.exit_code == 0, result.output
    (row,) = json.loads(out.read_text())
    assert (row["attention"], row["batch_size"], row["seq_len"], row["status"]) == ("math", 2, 16, "ok")
    assert f"model {run} · 2×16 tokens" in result.output
