"""Benchmarks: every attention backend side by side, training throughput, and KV-cache decoding.

Each function returns a list of JSON-able dicts (one per row) so the CLI can print a table, write JSON
or plot. Times are the median of ``repeats`` runs after ``warmup`` runs: CUDA events on a GPU,
``time.perf_counter`` on a CPU.

Peak memory is ``torch.cuda.max_memory_allocated`` on a GPU. On a CPU it is ``None`` ("n/a"): torch
keeps no allocator statistics there, and the profiler's per-op memory attribution (``profile_memory``)
gave peaks smaller than the score matrix the ``math`` backend provably allocates, so it would be a
number that looks measured but is not.

A backend that cannot run its own kernel here (``triton`` without CUDA) is not timed: its row says
``fallback → sdpa`` and why, instead of showing SDPA's numbers under the kernel's name.

A row is an attention plugin with options, written ``NAME`` or ``NAME:OPTION=VALUE[,OPTION=VALUE]``
(``sdpa:backend=cudnn``; the values go through :mod:`anexa_core.options` as ``-o`` values do) and
labelled as written. On a GPU the default rows add :data:`CUDA_DEFAULT_EXTRAS` beside the plain plugins.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from anexa_core import plugins
from anexa_core.config import BENCH_RUN_NEW_TOKENS, FINETUNE, ModelConfig, TrainConfig, resolve
from anexa_core.device import pick_device, uses_bf16
from anexa_core.errors import AnexaError, choose_one_of
from anexa_core.infer.generation import generate_ids
from anexa_core.io.files import IMAGE_SUFFIXES, JSON_SUFFIXES, PLOT_METADATA, atomic_path, check_output
from anexa_core.io.load import load
from anexa_core.model.gpt import GPT, build_model, decoding_layout
from anexa_core.options import describe
from anexa_core.train.optim import make_optimizer
from anexa_core.train.step import get_batch, train_window
from anexa_core.train.step import make_train_step as training_step

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
REFERENCE = "math"
BENCH_VOCAB = 65  # a character-level vocabulary (tinyshakespeare's); benchmarks need no corpus


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise AnexaError(f"unknown dtype {name!r}: {choose_one_of(name, DTYPES)}")
    return DTYPES[name]


def check_dtype(dtype: torch.dtype, device: torch.device) -> None:
    """Fail with a fix rather than a deep traceback when this device cannot compute in ``dtype``."""
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise AnexaError("this GPU does not support bfloat16: use --dtype float16 or float32")
    try:
        probe = torch.ones(2, 1, 4, 8, dtype=dtype, device=device)
        torch.nn.functional.scaled_dot_product_attention(probe, probe, probe, is_causal=True)
    except RuntimeError as exc:
        name = str(dtype).removeprefix("torch.")
        message = f"{device.type} cannot compute attention in {name} ({exc}): use --dtype float32"
        raise AnexaError(message) from None


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    """Forward FLOPs: QKᵀ and PV, ``2·T·T·D`` each per head; causal work is half of that."""
    flops = 4.0 * batch * heads * seq * seq * head_dim
    return flops / 2 if causal else flops


FWD_BWD_FACTOR = 3.5  # backward counts 2.5× the forward (recomputed S, dP, dV, dK, dQ)


def kernel_fallback(name: str, attention: Callable, q: torch.Tensor) -> str | None:
    """Why backend ``name`` would not run its own kernel on ``q``; ``None`` when it would.

    A backend that can fall back says so through an optional ``fallback_reason(q) -> str | None``
    attribute on the registered callable (see :class:`~anexa_core.interfaces.Attention`).
    """
    probe = getattr(attention, "fallback_reason", None)
    return probe(q) if callable(probe) else None


def fallback_label(attention: Callable) -> str:
    """What a fallback row says; a backend falling back to something else names it in ``fallback_backend``."""
    return f"fallback → {getattr(attention, 'fallback_backend', 'sdpa')}"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_once(run: Callable[[], Any], device: torch.device) -> float:
    """Milliseconds of one call: CUDA events on a GPU, ``time.perf_counter`` on a CPU."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)
    started = time.perf_counter()
    run()
    return (time.perf_counter() - started) * 1e3


def median_ms(run: Callable[[], Any], device: torch.device, repeats: int, warmup: int) -> float:
    """Median wall time of ``run`` in milliseconds after ``warmup`` untimed calls."""
    return interleaved_ms({"run": run}, device, repeats, warmup)["run"]


def interleaved_ms(
    runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int, warmup: int
) -> dict[str, float]:
    """Median milliseconds of each run, timed in alternation (a, b, c, a, b, c, …) so that a shared
    machine's drift hits every run alike and their ratios stay meaningful."""
    for run in runs.values():
        for _ in range(warmup):
            run()
    _sync(device)
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            times[name].append(_time_once(run, device))
    return {name: statistics.median(values) for name, values in times.items()}


def _peak_mb(run: Callable[[], Any], device: torch.device) -> float | None:
    """What one call of ``run`` allocates at its peak beyond what was already allocated (CUDA only)."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    run()
    _sync(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


CUDA_DEFAULT_EXTRAS = ("sdpa:backend=flash", "sdpa:backend=cudnn")
"""Rows ``anexa bench`` adds by default on a GPU, each after its plugin's plain row: SDPA's default backend
(cuDNN attention on Hopper) beside its flash and cuDNN backends pinned, so all of them and ``triton``
are compared in one run. On a CPU the default rows are the plain plugins only."""


def parse_attention(spec: str) -> tuple[str, dict[str, str]]:
    """``"sdpa:backend=cudnn"`` → ``("sdpa", {"backend": "cudnn"})``; a bare name has no options.

    Options are comma-separated ``OPTION=VALUE`` after a colon; the values stay text here and are
    converted (and checked) by :func:`anexa_core.options.create`, as ``-o attention.OPTION=VALUE`` is.
    """
    name, colon, rest = spec.strip().partition(":")
    name, given = name.strip(), {}
    usage = f"bad --attention {spec!r}: use NAME or NAME:OPTION=VALUE[,OPTION=VALUE], e.g. sdpa:backend=cudnn"
    if not name:
        raise AnexaError(usage)
    if colon:
        for part in rest.split(","):
            key, equals, value = part.partition("=")
            if not equals or not key.strip().isidentifier():
                raise AnexaError(usage)
            given[key.strip()] = value.strip()
    return name, given


def select_attention(
    names: Sequence[str] | None, default_extras: Sequence[str] = ()
) -> dict[str, Callable | AnexaError]:
    """The attention rows asked for, keyed by their label (the spec as written, see :func:`parse_attention`),
    in that order; without ``names`` every registered attention with default options, each followed by
    those of ``default_extras`` that name it. Names that clash between two plugins are left out of "all"
    (``anexa plugins`` lists them) and refused by name.

    An unknown name, an unknown option or a bad value is an error (before anything is measured); a
    plugin that fails to build with default options becomes its row's error, and the other rows still run.
    """
    # Why complex: counted in the comprehensions that build "all" (clashing names left out, each default extra
    # after its base) and find the unknown names; the control flow itself is two ifs.
    available = sorted(plugins.registered("attention"))
    if not names:
        clashing = {conflict["name"] for conflict in plugins.conflicts() if conflict["kind"] == "attention"}
        extras = {extra: parse_attention(extra)[0] for extra in default_extras}
        names = [
            label
            for name in available
            if name not in clashing
            for label in (name, *(extra for extra, base in extras.items() if base == name))
        ]
    specs = {spec.strip(): parse_attention(spec) for spec in names}
    unknown = [name for name in dict.fromkeys(name for name, _ in specs.values()) if name not in available]
    if unknown:
        asked = ", ".join(map(repr, unknown))
        raise AnexaError(f"unknown attention {asked}: {choose_one_of(unknown[0], available)} (see `anexa plugins`)")
    return {label: _create_or_error(name, given) for label, (name, given) in specs.items()}


def _create_or_error(name: str, given: dict[str, str] | None = None) -> Callable | AnexaError:
    """A backend with the ``given`` options, or with default options the error that prevents it (the row
    reports it; others still run). With options given, their errors are the user's and propagate."""
    if given:
        return plugins.create("attention", name, given)[0]
    try:
        return plugins.create("attention", name)[0]
    except AnexaError as exc:
        return exc


def reference_of(attention: Callable) -> tuple[Callable, str]:
    """What a backend is checked against: its own declared ``reference`` (an attention that is not exact
    softmax attention by design), else the ``math`` backend. Returns the function and its label."""
    own = getattr(attention, "reference", None)
    if callable(own):
        return own, "own reference"
    return plugins.create("attention", REFERENCE)[0], REFERENCE


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else device.type


def _check_sizes(seqs: Sequence[int], batch: int, heads: int, head_dim: int | Sequence[int], repeats: int) -> list[int]:
    """The head dims as a list, after a one-line error for any size below 1."""
    head_dims = [head_dim] if isinstance(head_dim, int) else list(head_dim)
    if not head_dims or min(head_dims) < 1:
        raise AnexaError("--head-dim must be at least 1 (one value or a comma list, e.g. --head-dim 64,128)")
    sizes = {"--batch": batch, "--heads": heads, "--repeats": repeats}
    for label, value in sizes.items():
        if value < 1:
            raise AnexaError(f"{label} must be at least 1")
    if not seqs or min(seqs) < 1:
        raise AnexaError("--seq must list positive sequence lengths, e.g. --seq 128,256")
    return list(dict.fromkeys(head_dims))


def bench_attention(
    seqs: Sequence[int] = (128, 256, 512),
    batch: int = 4,
    heads: int = 4,
    head_dim: int | Sequence[int] = 64,
    dtype: str = "float32",
    causal: bool = True,
    attention: Sequence[str] | None = None,
    repeats: int = 10,
    warmup: int = 2,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """One row per head dim per sequence length per backend (in that nesting): forward and
    forward+backward time, TFLOP/s, memory, error.

    ``attention`` lists row specs (``sdpa``, ``sdpa:backend=cudnn``, see :func:`parse_attention`);
    without it every plugin runs, plus :data:`CUDA_DEFAULT_EXTRAS` on a GPU. A backend that cannot run
    the inputs (an SDPA backend pinned where PyTorch has no such kernel, a head dim a kernel lacks) gets
    an ``unsupported`` row with the reason. ``head_dim`` is one or several head dimensions.

    The error is the largest absolute difference from the ``math`` backend run in float64 on the same
    inputs; with only ``math`` itself it measures math's own rounding at the input dtype.
    """
    head_dims = _check_sizes(seqs, batch, heads, head_dim, repeats)
    torch_dtype = parse_dtype(dtype)
    where = pick_device(device)
    check_dtype(torch_dtype, where)
    backends = select_attention(attention, CUDA_DEFAULT_EXTRAS if where.type == "cuda" else ())
    rows = []
    for head_dim, seq in ((d, t) for d in head_dims for t in seqs):
        generator = torch.Generator().manual_seed(seq)
        shape = (batch, heads, seq, head_dim)
        q, k, v, grad_out = (torch.randn(shape, generator=generator).to(where, torch_dtype) for _ in range(4))
        flops = attention_flops(batch, heads, seq, head_dim, causal)
        for name, attend in backends.items():
            row: dict[str, Any] = dict(
                attention=name,
                batch=batch,
                heads=heads,
                seq=seq,
                head_dim=head_dim,
                dtype=dtype,
                causal=causal,
                device=_device_name(where),
                status="ok",
                reason=None,
                fwd_ms=None,
                fwd_bwd_ms=None,
                fwd_tflops=None,
                fwd_bwd_tflops=None,
                peak_mem_mb=None,
                max_abs_err=None,
                checked_against=None,
            )
            rows.append(row)
            if isinstance(attend, AnexaError):
                row.update(status="broken", reason=str(attend))
                continue
            reference, row["checked_against"] = reference_of(attend)
            checked_against = row["checked_against"]
            try:
                with torch.no_grad():
                    out = attend(q, k, v, causal=causal)
                    expected = reference(q.double(), k.double(), v.double(), causal=causal)
                row["max_abs_err"] = (out.double() - expected).abs().max().item()
                if checked_against != REFERENCE:
                    row["status"] = "ok, not exact: vs its own reference"
                reason = kernel_fallback(name, attend, q)
                if reason is not None:
                    row.update(status=fallback_label(attend), reason=reason)
                    continue
                row.update(_time_attention(attend, q, k, v, grad_out, causal, where, repeats, warmup))
            except (AnexaError, ValueError) as exc:  # e.g. a kernel without this head_dim: say so, go on
                row.update(status="unsupported", reason=str(exc))
                continue
            except torch.cuda.OutOfMemoryError:
                row["status"] = "out of GPU memory"
                torch.cuda.empty_cache()
                continue
            row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
            row["fwd_bwd_tflops"] = FWD_BWD_FACTOR * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    return rows


def _time_attention(attend, q, k, v, grad_out, causal, device, repeats, warmup) -> dict[str, Any]:
    leaves = [t.detach().requires_grad_() for t in (q, k, v)]

    @torch.no_grad()
    def forward():
        attend(q, k, v, causal=causal)

    def forward_backward():
        torch.autograd.grad(attend(*leaves, causal=causal), leaves, grad_out)

    return dict(
        fwd_ms=median_ms(forward, device, repeats, warmup),
        fwd_bwd_ms=median_ms(forward_backward, device, repeats, warmup),
        peak_mem_mb=_peak_mb(forward_backward, device),
    )


def bench_model(
    preset: str, attention: str, device: torch.device, batch_size: int | None = None, precision: str | None = None
):
    """A randomly initialised ``preset`` model using ``attention`` (a name, or ``NAME:OPTION=VALUE,…`` as
    :func:`parse_attention` reads it), and the preset's training config.

    Benchmarks need no corpus: the vocabulary is :data:`BENCH_VOCAB` and the tokens are random, since
    speed does not depend on the text.
    """
    name, given = parse_attention(attention)
    overrides = dict(attention=name, batch_size=batch_size, precision=precision)
    model_config, train_config = resolve(
        preset, overrides=overrides, plugin_options={"attention": given} if given else None
    )
    with torch.random.fork_rng(devices=[]):  # the same weights every time, the caller's RNG untouched
        torch.manual_seed(train_config.seed)
        model = build_model(dataclasses.replace(model_config, vocab_size=BENCH_VOCAB))
    return model.to(device), train_config


def attention_label(config: ModelConfig) -> str:
    """A model's attention as a row label: ``NAME``, or ``NAME:OPTION=VALUE,…`` with the options that differ
    from the plugin's defaults (the form :func:`parse_attention` reads)."""
    defaults = {option.name: option.default for option in describe(plugins.lookup("attention", config.attention).obj)}
    changed = [f"{key}={value}" for key, value in config.attention_options.items() if defaults.get(key) != value]
    return f"{config.attention}:{','.join(changed)}" if changed else config.attention


def run_model(model: str | os.PathLike[str], attention: str | None, device: torch.device, decoding: bool = True) -> GPT:
    """The model of a run, loaded as ``anexa generate --model`` loads it (:func:`anexa_core.io.load.load`, in
    eval mode on ``device``): ``model`` is a run folder (its best checkpoint) or a ``.safetensors`` file —
    a trained, imported (``anexa import``) or LoRA run (its adapters folded into the base) alike.
    ``attention`` (``NAME`` or ``NAME:OPTION=VALUE,…``) swaps the attention plugin; ``None`` keeps the
    run's own. ``decoding=False`` keeps the weights in training's memory order (see
    :func:`~anexa_core.model.gpt.decoding_layout`).

    Raises :class:`AnexaError` (one line) as :func:`~anexa_core.io.load.load` does: no checkpoint there, a
    foreign or corrupt one, a LoRA run's base missing or changed, a bad attention spec.
    """
    name, given = parse_attention(attention) if attention is not None else (None, {})
    return load(Path(model), device, name, given or None, decoding=decoding).model


def decoding_model(
    preset: str, model: str | os.PathLike[str] | None, attention: str | None, device: torch.device
) -> GPT:
    """The model ``bench generate`` decodes, as ``load`` gives one to ``generate``: a run's (:func:`run_model`;
    ``attention`` ``None`` keeps its own), else ``preset``'s randomly initialised one (``sdpa`` unless
    ``attention`` names another) in eval mode and the :func:`~anexa_core.model.gpt.decoding_layout`."""
    if model is not None:
        return run_model(model, attention, device)
    built, _ = bench_model(preset, attention or "sdpa", device)
    decoding_layout(built.eval())
    return built


def finetune_config(
    model: GPT, batch_size: int | None = None, precision: str | None = None, seq_len: int | None = None
) -> TrainConfig:
    """How ``anexa train --init-from RUN`` trains every weight of ``model``: :data:`~anexa_core.config.FINETUNE`
    (AdamW, batches of 8 windows of 256 tokens — at most the model's context — precision ``auto``), with
    ``batch_size``, ``precision`` and ``seq_len`` (tokens per window) instead where given."""
    given = dict(batch_size=batch_size, precision=precision, seq_len=seq_len)
    config = TrainConfig(**{**FINETUNE, **{key: value for key, value in given.items() if value is not None}})
    if seq_len is None and config.seq_len is not None:
        config = dataclasses.replace(config, seq_len=min(config.seq_len, model.config.block_size))
    return config


def train_model(
    attention: str | None,
    device: torch.device,
    preset: str = "seed",
    model: str | os.PathLike[str] | None = None,
    batch_size: int | None = None,
    precision: str | None = None,
    seq_len: int | None = None,
) -> tuple[GPT, TrainConfig]:
    """The model ``bench train`` times, and how it trains: ``preset``'s random model (:func:`bench_model`)
    with the preset's training config, or — given ``model``, a run (:func:`run_model`) — the run's weights
    trained as a full fine-tune trains them (:func:`finetune_config`). ``attention`` ``None``: ``sdpa`` for a
    preset, the run's own for a run. ``seq_len``: tokens per window (default: the preset's context; for a
    run fine-tuning's 256, at most its context).

    Raises :class:`AnexaError` for an unknown preset, a run that cannot be loaded, or a ``seq_len`` longer
    than the context.
    """
    if model is None:
        built, train_config = bench_model(preset, attention or "sdpa", device, batch_size, precision)
        train_config = dataclasses.replace(train_config, seq_len=seq_len)
    else:
        built = run_model(model, attention, device, decoding=False)
        train_config = finetune_config(built, batch_size, precision, seq_len)
    train_window(built.config.block_size, train_config)
    return built, train_config


def _random_ids(model: GPT, length: int) -> torch.Tensor:
    """``length`` token ids (int64) drawn uniformly from ``model``'s vocabulary, the same every time."""
    return torch.randint(model.config.vocab_size, (length,), generator=torch.Generator().manual_seed(0))


def make_train_step(model: GPT, train_config: TrainConfig, device: torch.device) -> Callable[[], None]:
    """One step of the training loop as ``anexa train`` runs it (:func:`anexa_core.train.step.make_train_step`),
    on random windows (``train_config.seq_len`` tokens, else the model's context) of random token ids from
    the model's vocabulary."""
    window = train_window(model.config.block_size, train_config)
    step = training_step(model, make_optimizer(model, train_config), train_config, device)
    ids = _random_ids(model, window * 20)
    batches = torch.Generator().manual_seed(1)
    model.train()

    def train_step() -> None:
        x, y = get_batch(ids, window, train_config.batch_size, batches)
        step(x.to(device), y.to(device))

    return train_step


PLAIN = "plain loop"
"""The reference row of ``bench train``: nanoGPT's training loop as a user would write it."""


def bench_train(
    preset: str = "seed",
    attention: Sequence[str] | None = None,
    steps: int = 3,
    warmup: int = 2,
    batch_size: int | None = None,
    device: str = "auto",
    reference: bool = True,
    precision: str | None = None,
    compile: bool = False,
    model: str | os.PathLike[str] | None = None,
    seq_len: int | None = None,
) -> list[dict[str, Any]]:
    """Tokens per second of full training steps per attention backend, timed in alternation with a
    reference row: a plain eager nanoGPT-style loop over the same model and batch (float32, AdamW with
    ``foreach=False``, clipping at 1.0, no compile, windows stacked one by one). ``vs_plain`` is each
    row's speed over the reference's, measured side by side in this one run.

    The model is ``preset``'s, randomly initialised, or with ``model`` a run's (a run folder or
    ``.safetensors`` file; imported and LoRA runs too, see :func:`run_model`) trained as ``anexa train
    --init-from RUN`` trains every weight (:func:`finetune_config`); without ``attention`` a run has one
    row, its own attention, rather than one per plugin. Every row holds its own copy of the model with
    its optimizer state (for AdamW 4× the float32 weights: 2.2 GB for 135M parameters).

    Throughput is ``batch_size × seq_len`` tokens over the median step time (``seq_len``: tokens per
    window; default the preset's context, for a run 256 at most its context). Each backend row runs the
    training loop's own step (:func:`anexa_core.train.step.make_train_step`) with the preset's precision
    (``auto``: bf16 where the hardware has it) unless ``precision`` overrides it, compiled with
    ``compile`` (the warm-up steps then include the compilation). Peak memory on CUDA covers weights,
    optimizer state and activations.

    Raises :class:`AnexaError` for ``steps`` below 1, an unknown preset or attention, a run that cannot be
    loaded, or a ``seq_len`` longer than the model's context.
    """
    if steps < 1:
        raise AnexaError("--steps must be at least 1")
    where = pick_device(device)
    backends: dict[str | None, Callable | AnexaError | None] = {None: None}  # a run's own, named once loaded
    if model is None or attention:
        backends = dict(select_attention(attention).items())
    source = dict(preset=None, model=str(model)) if model is not None else dict(preset=preset, model=None)
    rows: list[dict[str, Any]] = []
    runs: dict[str, tuple[dict[str, Any], Callable[[], None]]] = {}
    for spec, attend in backends.items():
        if isinstance(attend, AnexaError):
            rows.append(_train_row(source, str(spec), where, steps, status="broken", reason=str(attend)))
            continue
        built, train_config = train_model(spec, where, preset, model, batch_size, precision, seq_len)
        train_config = dataclasses.replace(train_config, compile=compile)
        config = built.config
        name = spec if spec is not None else attention_label(config)
        if attend is None:
            attend = plugins.create("attention", config.attention, config.attention_options)[0]
        row = _train_row(source, name, where, steps, built, train_config)
        rows.append(row)
        probe = _attention_input(built, row["batch_size"], row["seq_len"], where, train_config.precision)
        reason = kernel_fallback(name, attend, probe)
        if reason is not None:
            row.update(status=fallback_label(attend), reason=reason)
            continue
        runs[name] = (row, make_train_step(built, train_config, where))
    if reference:
        built, train_config = train_model("sdpa", where, preset, model, batch_size, "fp32", seq_len)
        row = _train_row(source, f"{PLAIN} (sdpa)", where, steps, built, train_config, vs_plain=1.0)
        rows.append(row)
        runs[PLAIN] = (row, plain_train_step(built, train_config, where))
    _drop_unrunnable(runs)
    _time_train(runs, where, steps, warmup)
    return rows


def _time_train(
    runs: dict[str, tuple[dict[str, Any], Callable[[], None]]], device: torch.device, steps: int, warmup: int
) -> None:
    """Time the training steps of ``runs`` (label → its row and its step) in alternation and write each
    row's ``step_ms``, ``tokens_per_s`` (``batch_size × seq_len`` over the median step), ``vs_plain``
    and (CUDA) ``peak_mem_mb``; a failure every row shares becomes their status instead."""
    try:
        medians = interleaved_ms({name: step for name, (_, step) in runs.items()}, device, steps, warmup)
    except (AnexaError, ValueError) as exc:  # e.g. a kernel without this head_dim: say so
        for row, _ in runs.values():
            row.update(status="unsupported", reason=str(exc))
        return
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        for row, _ in runs.values():
            row["status"] = "out of GPU memory"
        return
    for name, (row, _) in runs.items():
        row.update(step_ms=medians[name], tokens_per_s=row["batch_size"] * row["seq_len"] / (medians[name] * 1e-3))
        if device.type == "cuda":
            row["peak_mem_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    if PLAIN in medians:
        for row, _ in runs.values():
            row["vs_plain"] = medians[PLAIN] / row["step_ms"]


def _train_row(
    source: dict[str, Any],
    attention: str,
    device: torch.device,
    steps: int,
    model: GPT | None = None,
    train_config: TrainConfig | None = None,
    **values: Any,
) -> dict[str, Any]:
    """A ``bench train`` row before timing: what it measures (``model`` trained with ``train_config``; both
    ``None`` for a row that cannot run), status ``ok``, no numbers yet; ``values`` override."""
    row: dict[str, Any] = dict(
        **source,
        attention=attention,
        device=_device_name(device),
        batch_size=None,
        block_size=None,
        seq_len=None,
        steps=steps,
        status="ok",
        reason=None,
        tokens_per_s=None,
        step_ms=None,
        peak_mem_mb=None,
        parameters=None,
        vs_plain=None,
        precision=None,
    )
    if model is not None and train_config is not None:
        row.update(
            batch_size=train_config.batch_size,
            block_size=model.config.block_size,
            seq_len=train_window(model.config.block_size, train_config),
            parameters=model.num_parameters(),
            precision="bf16" if uses_bf16(device, train_config.precision) else "fp32",
        )
    return {**row, **values}


def _drop_unrunnable(runs: dict[str, tuple[dict[str, Any], Callable[[], None]]]) -> None:
    """Run one step of each row alone and drop the rows that cannot run (a pinned SDPA backend this
    device lacks), marked ``unsupported`` with the reason, so they do not fail the others' timing."""
    for name, (row, step) in list(runs.items()):
        try:
            step()
        except (AnexaError, ValueError) as exc:
            row.update(status="unsupported", reason=str(exc))
            del runs[name]


def plain_train_step(model: GPT, train_config: TrainConfig, device: torch.device) -> Callable[[], None]:
    """nanoGPT's CPU training step, written the plain way: float32, ``AdamW(foreach=False)``, windows
    stacked with a Python loop, gradients clipped at ``grad_clip``. The yardstick of ``bench train``; its
    windows are those of :func:`make_train_step`."""
    window = train_window(model.config.block_size, train_config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=train_config.lr, foreach=False)
    ids = _random_ids(model, window * 20)
    batches = torch.Generator().manual_seed(1)
    model.train()

    def train_step() -> None:
        starts = torch.randint(len(ids) - window - 1, (train_config.batch_size,), generator=batches)
        x = torch.stack([ids[i : i + window] for i in starts]).to(device)
        y = torch.stack([ids[i + 1 : i + 1 + window] for i in starts]).to(device)
        _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), train_config.grad_clip)
        optimizer.step()
        loss.item()

    return train_step


def _attention_input(
    model: GPT, batch: int, length: int, device: torch.device, precision: str = "auto"
) -> torch.Tensor:
    """A query shaped like the ones ``model`` gives its attention, in the dtype autocast gives it."""
    dtype = torch.bfloat16 if uses_bf16(device, precision) else torch.float32
    return torch.empty(batch, model.config.n_head, length, model.config.head_dim, device=device, dtype=dtype)


class _Greedy:
    """Argmax picking: deterministic, and the cheapest possible choice, so decoding cost is the model's."""

    def pick(self, logits, context, generator=None):
        return logits.argmax(dim=-1, keepdim=True)


def bench_generate(
    preset: str = "seed",
    prompt_len: int = 64,
    new_tokens: int | None = None,
    attention: str | None = None,
    repeats: int = 3,
    device: str = "auto",
    model: str | os.PathLike[str] | None = None,
    recompute: bool = True,
) -> list[dict[str, Any]]:
    """Decoding speed of each context policy against recomputing the whole window for every token
    (nanoGPT's ``generate``), on the same random prompt, greedily, with the same model: ``preset``'s,
    randomly initialised, or with ``model`` a run's (a run folder or ``.safetensors`` file, imported and
    LoRA runs too, loaded as ``anexa generate --model`` loads it: :func:`run_model`). The prompt is
    ``prompt_len`` token ids drawn from the model's vocabulary with a fixed seed.

    ``attention`` (``NAME`` or ``NAME:OPTION=VALUE,…``) defaults to ``sdpa`` for a preset and to the run's
    own attention for a run. ``new_tokens`` defaults to twice the model's context, so prompt plus output
    go past it and the context policies (the shift's recompute, the sliding window) are part of what is
    measured; for a run to at most :data:`~anexa_core.config.BENCH_RUN_NEW_TOKENS` (a pretrained model's context is thousands of
    tokens).

    Rows: ``shift`` and ``sliding`` (both with the KV cache, see :mod:`anexa_core.infer.generation`) and
    ``recompute`` unless ``recompute`` is false (it runs the model over the whole window for every token:
    minutes for a 135M model; ``speedup`` and ``same_tokens`` are then ``None``). ``same_tokens`` says
    whether a row produced recompute's tokens: ``sliding`` always must; ``shift`` must while prompt plus
    output fit the context, and past it predicts from a shorter window by design. A backend that would
    fall back here is still measured (the comparison is about the cache) and its rows say what ran.
    Times are seconds per decode (median of ``repeats`` after one warm-up), reported as ``tokens_per_s``
    and ``ms_per_token``.

    Raises :class:`AnexaError` for counts below 1, an unknown preset or attention, or a run that cannot be
    loaded.
    """
    # Why complex: the recompute row is optional and a row names a preset or a run; the rows' fields follow both
    # as conditional expressions, which is most of the count.
    if prompt_len < 1 or (new_tokens is not None and new_tokens < 1) or repeats < 1:
        raise AnexaError("--prompt-len, --new-tokens and --repeats must be at least 1")
    where = pick_device(device)
    built = decoding_model(preset, model, attention, where)
    config = built.config
    if new_tokens is None:
        new_tokens = 2 * config.block_size if model is None else min(2 * config.block_size, BENCH_RUN_NEW_TOKENS)
    label = attention.strip() if attention is not None else attention_label(config)
    attend, _ = plugins.create("attention", config.attention, config.attention_options)
    reason = kernel_fallback(label, attend, _attention_input(built, 1, 1, where))
    prompt = _random_ids(built, prompt_len).tolist()
    modes: dict[str, dict[str, Any]] = {"shift": dict(context="shift"), "sliding": dict(context="sliding")}
    if recompute:
        modes["recompute"] = dict(use_cache=False)
    generated = {}

    def decode(mode: str) -> None:
        generated[mode] = list(generate_ids(built, prompt, new_tokens, _Greedy(), **modes[mode]))

    seconds = {mode: median_ms(functools.partial(decode, mode), where, repeats, warmup=1) / 1e3 for mode in modes}
    return [
        dict(
            mode=mode,
            preset=None if model is not None else preset,
            model=None if model is None else str(model),
            attention=label,
            device=_device_name(where),
            status="ok" if reason is None else fallback_label(attend),
            reason=reason,
            prompt_len=prompt_len,
            new_tokens=new_tokens,
            block_size=config.block_size,
            parameters=built.num_parameters(),
            tokens_per_s=new_tokens / seconds[mode],
            ms_per_token=seconds[mode] / new_tokens * 1e3,
            speedup=seconds["recompute"] / seconds[mode] if recompute else None,
            same_tokens=generated[mode] == generated["recompute"] if recompute else None,
        )
        for mode in modes
    ]


def write_json(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """The rows as a JSON list, atomically; a one-line error when ``path`` may not be written (another suffix
    than .json, an existing file that is not a JSON list or is a run's: :func:`check_output`)."""
    check_output(path, "--json", JSON_SUFFIXES)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")


def require_matplotlib():
    """matplotlib's pyplot, or the one-line fix when it is not installed."""
    from anexa_core.measure.plots import pyplot

    try:
        return pyplot()
    except AnexaError:
        raise AnexaError("--plot needs matplotlib: pip install anexa[plot]") from None


def plot_attention(rows: list[dict[str, Any]], path: str | os.PathLike[str]) -> None:
    """Forward+backward time and TFLOP/s against sequence length, one line per backend that ran; with
    several head dims, one line per backend per head dim (labelled ``NAME D=…``): a colour per backend,
    a line style per head dim. In the format ``path``'s suffix names (.png, .pdf, .svg); a one-line error
    before drawing when ``path`` may not be written (:func:`check_output`)."""
    # Why complex: the comprehensions that group the rows per backend and head dim, and the label, line style and
    # title that change with several head dims or causal rows; one figure, drawn top to bottom.
    image_format = check_output(path, "--plot", IMAGE_SUFFIXES)
    plt = require_matplotlib()
    figure, (time_axis, rate_axis) = plt.subplots(1, 2, figsize=(11, 4))
    head_dims = list(dict.fromkeys(row["head_dim"] for row in rows))
    lines = dict.fromkeys((row["attention"], row["head_dim"]) for row in rows)
    names = list(dict.fromkeys(row["attention"] for row in rows))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for name, head_dim in lines:
        ran = [
            row
            for row in rows
            if row["attention"] == name and row["head_dim"] == head_dim and row["fwd_bwd_ms"] is not None
        ]
        if not ran:
            continue
        label = name if len(head_dims) == 1 else f"{name} D={head_dim}"
        style = dict(marker="o", label=label, color=colors[names.index(name) % len(colors)])
        style["linestyle"] = ("-", "--", ":", "-.")[head_dims.index(head_dim) % 4]
        seqs = [row["seq"] for row in ran]
        time_axis.plot(seqs, [row["fwd_bwd_ms"] for row in ran], **style)
        rate_axis.plot(seqs, [row["fwd_bwd_tflops"] for row in ran], **style)
    first = rows[0]
    shape = f"B={first['batch']} H={first['heads']} D={','.join(map(str, head_dims))} {first['dtype']}"
    shape += " causal" if first["causal"] else ""
    time_axis.set(xlabel="sequence length", ylabel="forward+backward ms", yscale="log", title=shape)
    rate_axis.set(xlabel="sequence length", ylabel="forward+backward TFLOP/s", title=first["device"])
    for axis in (time_axis, rate_axis):
        axis.set_xscale("log", base=2)
        axis.legend()
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format=image_format, metadata=PLOT_METADATA[image_format])
    plt.close(figure)
