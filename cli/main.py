"""``anexa``: parse arguments, call the core, print. Heavy imports (torch) happen inside commands,
so ``anexa --help`` stays fast and torch-free."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from anexa_cli.bench import bench_app
from anexa_cli.errors import user_errors

from anexa_core.errors import AnexaError

app = typer.Typer(
    help="Train a small GPT on your own text, chat with it, and extend it with plugins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

app.add_typer(bench_app, name="bench")

SAMPLE_HELP = (
    "Sampler option, repeatable: NAME=VALUE sets a sampler's main option (-s top_p=0.9), "
    "NAME.OPTION=VALUE any other (-s repetition_penalty.window=64), NAME alone enables it (-s greedy). "
    "Any installed sampler plugin works; `anexa plugins` lists them. "
    "Chain order: repetition_penalty, temperature, top_k, top_p, min_p, greedy, then the pick."
)

Model = Annotated[Optional[Path], typer.Option("--model", "-m", help="Run folder or model.safetensors (default: newest under ./runs).")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, help="Tokens to generate.")]
Temperature = Annotated[Optional[float], typer.Option(help="Sampling temperature; 0 picks the most likely token.")]
Sample = Annotated[Optional[list[str]], typer.Option("--sample", "-s", help=SAMPLE_HELP)]
Stop = Annotated[Optional[list[str]], typer.Option("--stop", help="Stop at this string (not printed); repeatable.")]
Seed = Annotated[Optional[int], typer.Option(help="Random seed: same seed, same text.")]
Device = Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")]


@app.callback()
def main(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="Show debug logs.")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(name)s: %(message)s")


@app.command()
@user_errors
def train(
    data: Annotated[Optional[str], typer.Option(help="Dataset name (sherlock, tinyshakespeare, …), text file or URL.")] = None,
    preset: Annotated[str, typer.Option(help="Model size: seed (~0.8M) or small (~10.7M).")] = "seed",
    config: Annotated[Optional[Path], typer.Option(help="TOML file overriding the preset.")] = None,
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer plugin: char, bpe, …")] = None,
    vocab_size: Annotated[Optional[int], typer.Option(help="Vocabulary size for trainable tokenizers (bpe).")] = None,
    attention: Annotated[Optional[str], typer.Option(help="Attention plugin: sdpa, math, triton, …")] = None,
    blocks: Annotated[Optional[str], typer.Option(help="Blocks plugin (model family): gpt2, …")] = None,
    n_layer: Annotated[Optional[int], typer.Option(help="Override the preset's layers.")] = None,
    n_head: Annotated[Optional[int], typer.Option(help="Override the preset's heads.")] = None,
    n_embd: Annotated[Optional[int], typer.Option(help="Override the preset's width.")] = None,
    block_size: Annotated[Optional[int], typer.Option(help="Override the preset's context length.")] = None,
    dropout: Annotated[Optional[float], typer.Option(help="Override the preset's dropout.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Optimizer steps (default 5000).")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Sequences per step.")] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate.")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="Evaluate every N steps.")] = None,
    save_every: Annotated[Optional[int], typer.Option(help="Checkpoint every N steps.")] = None,
    out: Annotated[Optional[Path], typer.Option(help="Run folder (default runs/<data>-<preset>).")] = None,
    resume: Annotated[Optional[Path], typer.Option(help="Continue the run in this folder.")] = None,
    device: Annotated[Optional[str], typer.Option(help="auto (CUDA if present), cpu or cuda.")] = None,
    seed: Annotated[Optional[int], typer.Option(help="Random seed.")] = None,
) -> None:
    """Train a GPT on a text corpus and write model.safetensors into a run folder."""
    from anexa_cli.progress import RichReporter
    from rich.console import Console

    from anexa_core import config as configs
    from anexa_core import training

    overrides = dict(
        data=data, tokenizer=tokenizer, vocab_size=vocab_size, attention=attention, blocks=blocks,
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, block_size=block_size, dropout=dropout,
        steps=steps, batch_size=batch_size, lr=lr, eval_every=eval_every, save_every=save_every,
        device=device, seed=seed,
    )
    if resume is not None:
        if config is not None or out is not None:
            raise AnexaError("--resume continues a run as it was: drop --config and --out")
        model_config, train_config = training.resume_configs(resume, overrides)
        out_dir = resume
    else:
        model_config, train_config = configs.resolve(preset, config, overrides)
        out_dir = out or Path("runs") / f"{Path(train_config.data.rstrip('/')).stem}-{preset}"
    console = Console(stderr=True)
    result = training.train(model_config, train_config, out_dir, RichReporter(console), resume=resume is not None)
    console.print(
        f"saved {result.out_dir / 'model.safetensors'} · step {result.step} · val loss {result.val_loss:.4f} · "
        f"{result.seconds:.0f}s"
    )


def _load(model: Optional[Path], device: str, sample: Optional[list[str]], temperature: Optional[float]):
    """The model, tokenizer and checkpoint metadata, and the sampler chain the flags ask for."""
    from anexa_core import checkpoint, sampling, training

    path = model if model is not None else checkpoint.latest_run(Path("runs"))
    loaded, tokenizer, meta = checkpoint.load_model(path, training.pick_device(device))
    return loaded, tokenizer, meta, sampling.build_chain(sample or [], temperature)


@app.command()
@user_errors
def generate(
    prompt: Annotated[Optional[str], typer.Argument(help="Text to continue; read from stdin when omitted.")] = None,
    model: Model = None,
    max_new_tokens: MaxNew = 200,
    temperature: Temperature = None,
    sample: Sample = None,
    stop: Stop = None,
    seed: Seed = None,
    device: Device = "auto",
) -> None:
    """Print one continuation of PROMPT (only the generated text, for scripts)."""
    from anexa_core.generation import generate_text

    loaded, tokenizer, _, chain = _load(model, device, sample, temperature)
    if prompt is None:
        prompt = sys.stdin.read()
    for piece in generate_text(loaded, tokenizer, prompt, max_new_tokens, chain, seed, stop or []):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command()
@user_errors
def chat(
    model: Model = None,
    max_new_tokens: MaxNew = 200,
    temperature: Temperature = None,
    sample: Sample = None,
    stop: Stop = None,
    seed: Seed = None,
    device: Device = "auto",
) -> None:
    """Continue prompts interactively, streaming tokens; `quit`, `exit` or Ctrl-D ends."""
    from anexa_core.generation import generate_text

    loaded, tokenizer, meta, chain = _load(model, device, sample, temperature)
    typer.echo(f"model: step {meta.get('step')}, val loss {meta.get('val_loss', float('nan')):.4f}. `quit` to leave.")
    turn = 0
    while True:
        try:
            prompt = input("Prompt: ")
        except (EOFError, KeyboardInterrupt):
            typer.echo()
            return
        if prompt.strip() in ("quit", "exit"):
            return
        if not prompt:
            continue
        sys.stdout.write("Response: ")
        try:
            turn_seed = None if seed is None else seed + turn
            for piece in generate_text(loaded, tokenizer, prompt, max_new_tokens, chain, turn_seed, stop or []):
                sys.stdout.write(piece)
                sys.stdout.flush()
        except AnexaError as exc:  # e.g. unseen characters: report and keep chatting
            sys.stdout.write(f"\nerror: {exc}")
        sys.stdout.write("\n")
        turn += 1


@app.command("plugins")
@user_errors
def list_plugins(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List every plugin, its distribution and version, and the names it registers per hook."""
    from anexa_core.plugins import describe_plugins

    described = describe_plugins()
    if as_json:
        typer.echo(json.dumps(described, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("plugin", "distribution", "version", "registers")
    for plugin in described:
        registers = "; ".join(f"{kind}: {', '.join(names)}" for kind, names in plugin["registers"].items())
        table.add_row(plugin["name"], plugin["distribution"] or "-", plugin["version"] or "-", registers)
    Console().print(table)
