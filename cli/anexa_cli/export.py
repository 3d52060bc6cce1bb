"""``anexa export``: write a trained model in another library's format (``anexa_core.io.export``).

torch and safetensors are imported inside the command, so ``anexa --help`` stays fast.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Annotated

import typer

from anexa_cli.errors import user_errors
from anexa_cli.threads import Threads, use_threads


@user_errors
def export(
    run: Annotated[
        Path, typer.Argument(metavar="RUN", help="Run folder (its best checkpoint) or a .safetensors checkpoint.")
    ],
    out: Annotated[
        Path,
        typer.Argument(metavar="OUT", help="Folder to write (hf: new or empty, unless --overwrite), or FILE.gguf."),
    ],
    format: Annotated[
        str,
        typer.Option(
            "--format",
            "-f",
            help="hf: a folder Hugging Face transformers loads; gguf: one file for llama.cpp and ollama.",
        ),
    ] = "hf",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a non-empty OUT (never an Anexa run).")
    ] = False,
    outtype: Annotated[
        str,
        typer.Option(
            "--outtype",
            help="gguf: how the weight matrices are stored: f32 (exact), f16, or q8_0 (llama.cpp's 8-bit "
            "blocks, about 0.27 of f32's bytes); norms and biases stay f32.",
        ),
    ] = "f32",
    threads: Threads = None,
) -> None:
    """Export a trained model: `--format hf` writes config.json, model.safetensors, tokenizer files and a model card."""
    use_threads(threads)
    from anexa_core.io.export import UPLOAD_COMMAND
    from anexa_core.io.export import export as export_model

    done = export_model(run, out, format, overwrite, outtype)
    val = f", val loss {done.val_loss:.4f}" if isinstance(done.val_loss, (int, float)) else ""
    quoted = shlex.quote(str(done.out))
    if format == "gguf":
        typer.echo(
            f"exported {done.source} (step {done.step}{val}) to {done.out}: {done.architecture}, "
            f"{done.parameters:,} parameters, {outtype} matrices\n"
            f"  run it: llama-cli -m {quoted}, or ollama: echo 'FROM {quoted}' > Modelfile && ollama create NAME"
        )
        for note in done.notes:
            typer.echo(f"  note: {note}")
        return
    typer.echo(
        f"exported {done.source} (step {done.step}{val}) to {done.out}: {done.architecture}, "
        f"{done.parameters:,} parameters, {', '.join(done.files)}\n"
        f"  load:   AutoModelForCausalLM.from_pretrained({str(done.out)!r}), AutoTokenizer.from_pretrained(…)\n"
        f"  upload: {UPLOAD_COMMAND.format(out=quoted)}   (after `hf auth login`)"
    )
