"""``anexa bench``: attention backends side by side (the default), ``bench train`` and ``bench generate``.

Parses options, calls :mod:`anexa_core.measure.bench`, prints a table and optionally writes JSON or a plot.
torch is imported inside the commands so ``anexa --help`` stays torch-free.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from anexa_cli.errors import user_errors
from anexa_cli.threads import Threads, use_threads
from anexa_core.config import BENCH_RUN_NEW_TOKENS
from anexa_core.errors import AnexaError
from anexa_core.io.files import IMAGE_SUFFIXES, JSON_SUFFIXES, check_output

bench_app = typer.Typer(
    help="Measure this machine. Without a subcommand: time every attention plugin (forward, "
    "forward+backward) and check it against `math`; its options go before a subcommand.",
    invoke_without_command=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

Attention = Annotated[
    list[str] | None,
    typer.Option(
        "--attention",
        "-a",
        help="Only these attention plugins, NAME or NAME:OPTION=VALUE[,…]; repeatable. \\[default: all; with "
        "--model the run's own]",
    ),
]
RowAttention = Annotated[
    list[str] | None,
    typer.Option(
        "--attention",
        "-a",
        help="Only these attention rows; repeatable. NAME or NAME:OPTION=VALUE[,OPTION=VALUE] with the "
        "plugin's options (e.g. sdpa:backend=cudnn), each row labelled as written. \\[default: every "
        "plugin; on CUDA also sdpa:backend=flash and sdpa:backend=cudnn]",
    ),
]
Json = Annotated[
    Path | None, typer.Option("--json", dir_okay=False, help="Also write the rows as JSON to this .json file.")
]
Device = Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")]
Preset = Annotated[
    str | None, typer.Option(help="A randomly initialised model of this size: seed or small. \\[default: seed]")
]
RunModel = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="Measure this run instead of a --preset model: a run folder (its best checkpoint) or a "
        ".safetensors file, as `anexa generate --model` takes it (imported and LoRA runs too).",
    ),
]


def parse_ints(values: list[str], flag: str = "--seq", example: str = "128,256,512") -> list[int]:
    """``--seq 128 --seq 256,512`` → ``[128, 256, 512]`` (the same for ``--head-dim``)."""
    numbers = []
    for value in values:
        for part in value.split(","):
            try:
                numbers.append(int(part))
            except ValueError:
                message = f"{flag} {value!r} is not a list of integers: use e.g. {flag} {example}"
                raise AnexaError(message) from None
    return numbers


def parse_seqs(values: list[str]) -> list[int]:
    """``--seq 128 --seq 256,512`` → ``[128, 256, 512]``."""
    return parse_ints(values, "--seq", "128,256,512")


def _number(key: str, spec: str, scale: float = 1.0):
    """A column cell: the row's ``key`` (times ``scale``) formatted, or a dash where nothing was measured."""
    return lambda row: "—" if row[key] is None else format(row[key] * scale, spec)


def _print_table(title: str, columns: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """``columns`` maps a header to a row key (printed as is) or to a function of the row."""
    from rich.table import Table

    from anexa_cli.console import console as make_console

    table = Table(title=title)
    for header, cell in columns.items():
        text = isinstance(cell, str)
        table.add_column(header, justify="left" if text else "right", no_wrap=text)
    for row in rows:
        table.add_row(*(str(row[cell]) if isinstance(cell, str) else cell(row) for cell in columns.values()))
    make_console().print(table)


def _fallback_ran(row: dict[str, Any]) -> bool:
    """The row was not timed, yet something else ran in the backend's place and was checked."""
    return bool(row["reason"]) and row.get("max_abs_err") is not None


def _print_notes(rows: list[dict[str, Any]]) -> None:
    """Why a backend was not timed, once per backend rather than once per row."""
    notes = {}
    for row in rows:
        if row["reason"]:
            notes[row["attention"]] = row["reason"] + (
                "; * is the error of what ran instead" if _fallback_ran(row) else ""
            )
    for name, note in notes.items():
        typer.echo(f"{name}: not timed, {note}")


def _check_outputs(json_path: Path | None, plot: Path | None = None) -> None:
    """Refuse, before minutes of measuring, a --json or --plot path the rows may not be written to: another
    suffix, or an existing file of another kind or of a run (:func:`~anexa_core.io.files.check_output`)."""
    if json_path is not None:
        check_output(json_path, "--json", JSON_SUFFIXES)
    if plot is not None:
        check_output(plot, "--plot", IMAGE_SUFFIXES)


def _write_json(rows: list[dict[str, Any]], path: Path | None) -> None:
    if path is not None:
        from anexa_core.measure.bench import write_json

        write_json(rows, path)
        typer.echo(f"wrote {path}", err=True)


@bench_app.callback()
@user_errors
def attention_bench(
    ctx: typer.Context,
    seq: Annotated[list[str] | None, typer.Option(help="Sequence lengths; repeatable or comma list.")] = None,
    head_dim: Annotated[
        list[str] | None, typer.Option(help="Head dimensions D; repeatable or comma list. \\[default: 64]")
    ] = None,
    batch: Annotated[int, typer.Option(help="Batch size B.")] = 4,
    heads: Annotated[int, typer.Option(help="Heads H.")] = 4,
    dtype: Annotated[str, typer.Option(help="float32, float16 or bfloat16.")] = "float32",
    causal: Annotated[bool, typer.Option("--causal/--no-causal", help="Causal mask.")] = True,
    attention: RowAttention = None,
    repeats: Annotated[int, typer.Option(help="Timed runs per measurement (the median is reported).")] = 10,
    device: Device = "auto",
    json_path: Json = None,
    plot: Annotated[
        Path | None,
        typer.Option(dir_okay=False, help="Also plot time and FLOP/s against length to this .png, .pdf or .svg file."),
    ] = None,
    threads: Threads = None,
) -> None:
    """Time every attention plugin (forward, forward+backward) and check it against `math`."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"threads": threads}  # `anexa bench --threads 1 train`: the subcommand's unless it has its own
        return
    _check_outputs(json_path, plot)
    use_threads(threads)
    from anexa_core.measure import bench

    if plot is not None:
        bench.require_matplotlib()  # before minutes of measuring, not after
    rows = bench.bench_attention(
        seqs=parse_seqs(seq or ["128,256,512"]),
        batch=batch,
        heads=heads,
        head_dim=parse_ints(head_dim or ["64"], "--head-dim", "64,128"),
        dtype=dtype,
        causal=causal,
        attention=attention,
        repeats=repeats,
        device=device,
    )
    if plot is not None:
        bench.plot_attention(rows, plot)
        typer.echo(f"wrote {plot}", err=True)
    first = rows[0]
    on_cpu = first["device"] == "cpu"
    unit, scale = ("GFLOP/s", 1e3) if on_cpu else ("TFLOP/s", 1.0)  # a CPU reaches GFLOP/s
    head_dims = list(dict.fromkeys(row["head_dim"] for row in rows))
    columns = {
        "attention": "attention",
        "D": "head_dim",
        "T": "seq",
        "fwd ms": _number("fwd_ms", ".3g"),
        "fwd+bwd ms": _number("fwd_bwd_ms", ".3g"),
        f"fwd {unit}": _number("fwd_tflops", ".3g", scale),
        f"fwd+bwd {unit}": _number("fwd_bwd_tflops", ".3g", scale),
        "peak MB": _number("peak_mem_mb", ".1f"),
        "max err vs math": lambda row: _number("max_abs_err", ".1e")(row) + ("*" if _fallback_ran(row) else ""),
        "status": "status",
    }
    if on_cpu:
        del columns["peak MB"]
    if len(head_dims) == 1:
        del columns["D"]
    _print_table(
        f"attention on {first['device']} · B={first['batch']} H={first['heads']} D={','.join(map(str, head_dims))} · "
        f"{first['dtype']} · {'causal' if first['causal'] else 'not causal'}",
        columns,
        rows,
    )
    if on_cpu:
        typer.echo("peak memory: not measured on CPU (torch keeps no allocator statistics there)")
    _print_notes(rows)
    _write_json(rows, json_path)


def _source(preset: str | None, model: Path | None) -> str:
    """What a table's title says it measured; a one-line error when both ``--preset`` and ``--model`` are given."""
    if preset is not None and model is not None:
        raise AnexaError(
            f"--preset {preset} and --model {model} both name the model to measure: give one "
            "(--model for a run, --preset for a random model)"
        )
    return f"model {model}" if model is not None else f"preset {preset or 'seed'}"


def _threads(ctx: typer.Context, threads: int | None) -> int | None:
    """A subcommand's ``--threads``, else the one given before it (``anexa bench --threads 1 train``)."""
    return threads if threads is not None else (ctx.obj or {}).get("threads")


@bench_app.command()
@user_errors
def train(
    ctx: typer.Context,
    preset: Preset = None,
    model: RunModel = None,
    attention: Attention = None,
    steps: Annotated[int, typer.Option(help="Timed training steps per row (the median is reported).")] = 3,
    batch_size: Annotated[
        int | None, typer.Option(help="Windows per step. \\[default: the preset's; with --model 8, as fine-tuning]")
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tokens per window, at most the context. \\[default: the preset's context; with --model 256, "
            "as fine-tuning, or the run's context if shorter]",
        ),
    ] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16 (default: the preset's, auto).")] = None,
    reference: Annotated[
        bool, typer.Option("--reference/--no-reference", help="Time a plain nanoGPT-style loop beside.")
    ] = True,
    compile: Annotated[
        bool, typer.Option("--compile", help="torch.compile the step (warm-up includes compiling).")
    ] = False,
    device: Device = "auto",
    json_path: Json = None,
    threads: Threads = None,
) -> None:
    """Tokens/s of full training steps per attention plugin, side by side with a plain eager loop.

    With --model: the run trained as `anexa train --init-from RUN` trains every weight (AdamW, fine-tuning's sizes).

    Each row holds its own weights and optimizer state: with AdamW 4x the float32 weights (2.2 GB for 135M)."""
    source = _source(preset, model)
    _check_outputs(json_path)
    use_threads(_threads(ctx, threads))
    from anexa_core.measure import bench

    rows = bench.bench_train(
        preset=preset or "seed",
        model=model,
        seq_len=seq_len,
        attention=attention,
        steps=steps,
        batch_size=batch_size,
        device=device,
        reference=reference,
        precision=precision,
        compile=compile,
    )
    first = next((row for row in rows if row["batch_size"] is not None), rows[0])
    tokens = f"{first['batch_size']}×{first['seq_len']} tokens"
    _print_table(
        f"training steps · {source} · {tokens} · {first['device']} · {steps} steps each, alternating",
        {
            "row": "attention",
            "precision": lambda row: row["precision"] or "—",
            "tokens/s": _number("tokens_per_s", ",.0f"),
            "step ms": _number("step_ms", ".1f"),
            "vs plain": _number("vs_plain", ".2f"),
            "peak MB": _number("peak_mem_mb", ".1f"),
            "status": "status",
        },
        rows,
    )
    _print_notes(rows)
    _write_json(rows, json_path)


@bench_app.command()
@user_errors
def generate(
    ctx: typer.Context,
    preset: Preset = None,
    model: RunModel = None,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (random ids from the model's vocabulary).")] = 64,
    new_tokens: Annotated[
        int | None,
        typer.Option(
            help="Tokens to decode. \\[default: twice the context, so decoding goes past it and the context "
            f"policy is measured; with --model at most {BENCH_RUN_NEW_TOKENS}]"
        ),
    ] = None,
    attention: Annotated[
        str | None,
        typer.Option(
            help="Attention plugin, NAME or NAME:OPTION=VALUE[,…]. \\[default: sdpa; with --model the run's own]"
        ),
    ] = None,
    recompute: Annotated[
        bool,
        typer.Option(
            "--recompute/--no-recompute",
            help="Also time recomputing the whole window for every token (the reference of speedup and same "
            "tokens; minutes for a 135M model).",
        ),
    ] = True,
    repeats: Annotated[int, typer.Option(help="Timed decodes per mode (the median is reported).")] = 3,
    device: Device = "auto",
    json_path: Json = None,
    threads: Threads = None,
) -> None:
    """Decode tokens/s with the KV cache against recomputing the whole context for every token.

    With --model: that run, decoding greedily after a random prompt from its vocabulary."""
    source = _source(preset, model)
    _check_outputs(json_path)
    use_threads(_threads(ctx, threads))
    from anexa_core.measure import bench

    rows = bench.bench_generate(
        preset=preset or "seed",
        model=model,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        attention=attention,
        recompute=recompute,
        repeats=repeats,
        device=device,
    )
    first = rows[0]
    if model is not None:
        source += f" ({first['parameters'] / 1e6:.1f}M parameters)"
    lengths = f"prompt {prompt_len} + {first['new_tokens']} new, context {first['block_size']}"
    _print_table(
        f"decoding · {source} · {lengths} · {first['attention']} · {first['device']}",
        {
            "mode": "mode",
            "tokens/s": _number("tokens_per_s", ",.1f"),
            "ms/token": _number("ms_per_token", ".2f"),
            "speedup": _number("speedup", ".2f"),
            "same tokens": lambda row: "—" if row["same_tokens"] is None else str(row["same_tokens"]),
        },
        rows,
    )
    if first["reason"]:
        typer.echo(f"{first['attention']}: measured its {first['status']}, because {first['reason']}")
    _write_json(rows, json_path)
