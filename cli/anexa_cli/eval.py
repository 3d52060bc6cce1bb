"""``anexa eval RUN --data TEXT``: parse, call :mod:`anexa_core.infer.evaluation`, print a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from anexa_cli.errors import user_errors
from anexa_cli.threads import Threads, use_threads


@user_errors
def evaluate(
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="Run folder (its best checkpoint) or a .safetensors file.")
    ],
    data: Annotated[
        list[str],
        typer.Option(
            help="Text to score: dataset name, file, folder (its *.txt and *.md files, recursively) or URL; repeat for several. Tokenized once with the model's tokenizer, then read from the cache."
        ),
    ],
    glob: Annotated[
        list[str] | None,
        typer.Option("--glob", help="Files a --data folder contributes, repeatable. \\[default: *.txt, *.md]"),
    ] = None,
    stride: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Tokens between window starts; each scored token sees at least (context - stride) tokens before it. \\[default: half the model's context]",
        ),
    ] = None,
    batch_size: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Windows per forward pass. \\[default: as many as fit 128 MiB of logits, at most 64]",
        ),
    ] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")] = "auto",
    precision: Annotated[
        str,
        typer.Option(
            help="fp32 (the same numbers on every machine), or auto/bf16: bf16 autocast where supported, faster."
        ),
    ] = "fp32",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    threads: Threads = None,
) -> None:
    """Score a model on a text: bits per character (comparable across tokenizers), nats/token, perplexity.

    Every token is scored once, in strided windows over the whole text. Use it on text the model has not
    seen, and to compare runs on the same text.
    """
    use_threads(threads)
    from anexa_cli.console import console as make_console
    from anexa_cli.progress import DataProgress
    from anexa_core.data import corpus as corpora
    from anexa_core.infer import evaluation
    from anexa_core.io.load import load

    console = make_console(stderr=True)
    loaded = load(run, device, decoding=False)  # whole windows: matrix products, same speed in either layout
    model, tokenizer, meta, torch_device = loaded.model, loaded.tokenizer, loaded.meta, loaded.device
    result, described = evaluation.evaluate_text(
        model,
        tokenizer,
        meta,
        data,
        glob or corpora.DEFAULT_GLOBS,
        stride,
        batch_size,
        torch_device,
        DataProgress(console),
        precision,
    )
    report = {
        "model": meta["path"],
        "step": meta.get("step"),
        "data": list(data),
        "files": described["files"],
        "tokenized": described["tokenized"],
        "device": str(torch_device),
        "precision": precision,
        **result.as_dict(),
    }
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    from rich.table import Table

    table = Table("metric", "value", title=f"{meta['path']} (step {meta.get('step')}) on {described['label']}")
    table.add_row("bits per character", f"{result.bits_per_char:.4f}")
    table.add_row("nats per token", f"{result.nats_per_token:.4f}")
    table.add_row("perplexity", f"{result.perplexity:.3f}")
    table.add_row("tokens scored", f"{result.tokens:,}")
    table.add_row("characters", f"{result.characters:,}")
    stride_shown = f", stride {result.stride}" if result.windows > 1 else ""  # one window has none
    table.add_row("windows", f"{result.windows:,} × {result.window} tokens{stride_shown}")
    table.add_row("files", f"{described['files']:,}")
    make_console().print(table)
