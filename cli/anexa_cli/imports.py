"""``anexa import SOURCE``: a pretrained model as an Anexa run (``anexa_core.io.pretrained``)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

import typer

from anexa_cli.console import count
from anexa_cli.errors import user_errors
from anexa_cli.threads import Threads, use_threads


def _default_out(source: str) -> Path:
    """``runs/<model name>``: the file's or folder's name, or the hub id's last part."""
    name = Path(source.rstrip("/")).name
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    return Path("runs") / (re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-") or "imported")


@user_errors
def import_model(
    source: Annotated[
        str,
        typer.Argument(
            metavar="SOURCE",
            help="A GGUF file, a Hugging Face model folder (config.json, safetensors, tokenizer.json), a hub id "
            "(ORG/NAME, from the Hugging Face cache; HF_HUB_OFFLINE=1 keeps it offline) or ORG/NAME/FILE.gguf.",
        ),
    ],
    out: Annotated[Path | None, typer.Option(help="Run folder to write. \\[default: runs/<model name>]")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out.")] = False,
    threads: Threads = None,
) -> None:
    """Import a pretrained model (GPT-2, Llama or Qwen3 family) with its tokenizer and chat template as a run."""
    use_threads(threads)
    from anexa_core.io.pretrained import import_model as run_import

    target = out or _default_out(source)
    done = run_import(source, target, overwrite)
    typer.echo(
        f"imported {source} into {done.out}: {done.architecture} as blocks {done.blocks}, "
        f"{count(done.parameters)} parameters, {done.seconds:.1f} s\n  chat with it: anexa chat -m {done.out}"
    )
    if done.sampling:
        typer.echo(f"  its makers recommend sampling with {' → '.join(done.sampling)}: used when you choose none")
