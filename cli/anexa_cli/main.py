"""``anexa``: parse arguments, call the core, print. Heavy imports (torch) happen inside commands,
so ``anexa --help`` stays fast and torch-free.

The console script is :func:`main`: it runs the typer app and turns every usage mistake (a bad flag, a
value of the wrong type) into one line and exit code 2, like Anexa's own errors.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import click
import typer
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from anexa_cli.bench import bench_app
from anexa_cli.errors import user_errors
from anexa_cli.eval import evaluate
from anexa_cli.export import export
from anexa_cli.imports import import_model
from anexa_cli.plot import plot
from anexa_cli.runs import runs
from anexa_cli.serve import serve
from anexa_cli.threads import Threads, use_threads
from anexa_core.errors import AnexaError

app = typer.Typer(
    help="Train a small GPT on your own text, chat with it, and extend it with plugins.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _shown_type(display_type_rich):
    """Typer's type column, adjusted: flags take no value, so no ``<bool>`` beside them; a repeatable
    parameter shows the type of one value, lower-case as single ones are (``<path>``, not ``<list[Path]>``:
    its help says it repeats)."""

    def shown(self, ctx):
        if getattr(self, "is_flag", False):
            return None
        text = display_type_rich(self, ctx)
        if not isinstance(text, str):
            return text
        return re.sub(r"<list\[(.+)\]>", lambda match: f"<{match[1].lower()}>", text)

    return shown


for _parameter in (TyperOption, TyperArgument):
    if hasattr(_parameter, "display_type_rich"):  # typer 0.29 and later; older ones show no type column
        _parameter.display_type_rich = _shown_type(_parameter.display_type_rich)  # type: ignore[method-assign]


def _folding(format_help):
    """A command's ``--help`` whose help cells fold words longer than their column
    (``r=16,alpha=32,dropout=0.05``, ``benchmarks/RESULTS.md``) onto the next line, where typer would cut
    them with "…" on a narrow terminal. Typer's renderer is imported (with rich) only when help is shown."""

    def shown(self, ctx, formatter):
        from typer import rich_utils

        cell = getattr(rich_utils, "_get_parameter_help", None)  # typer's renderer of one option's help
        if cell is not None and not getattr(cell, "folds", False):

            def folded(*args, **kwargs):
                rendered = cell(*args, **kwargs)
                for item in getattr(rendered, "renderables", ()):
                    if hasattr(item, "overflow"):
                        item.overflow = "fold"
                return rendered

            folded.folds = True
            rich_utils._get_parameter_help = folded
        return format_help(self, ctx, formatter)

    return shown


for _command in (TyperCommand, TyperGroup):
    _command.format_help = _folding(_command.format_help)  # type: ignore[method-assign]

MAX_NEW_TOKENS = 10_000_000
"""The most tokens one generation may ask for: decoding keeps every id of the output in one buffer."""
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed's largest


def _check_seed(value: int | None) -> int | None:
    """A seed torch can use (help shows no upper bound: no one needs to think about it)."""
    if value is not None and value > MAX_SEED:
        raise typer.BadParameter(f"{value} is beyond the largest seed, 2**64 - 1")
    return value


OPTION_HELP = (
    "Plugin option, repeatable: KIND.OPTION=VALUE for the attention, blocks, tokenizer, optimizer or data "
    "(dataset) plugin (-o attention.window=64 -o blocks.rope_theta=500000). `anexa plugins` lists every option."
)
Model = Annotated[
    Path | None,
    typer.Option(
        "--model", "-m", help="Run folder (its best checkpoint) or a .safetensors file; default: newest under ./runs."
    ),
]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", min=1, max=MAX_NEW_TOKENS, help="Tokens to generate.")]
Temperature = Annotated[float | None, typer.Option(help="Sampling temperature; 0 picks the most likely token.")]
Sample = Annotated[list[str] | None, typer.Option("--sample", "-s", help="Sampler, repeatable (see below).")]
Stop = Annotated[
    list[str] | None,
    typer.Option(
        "--stop", help=r"Stop at this string (not printed); repeatable. \n, \t and \\ mean newline, tab, backslash."
    ),
]
Seed = Annotated[int | None, typer.Option(min=0, callback=_check_seed, help="Random seed: same seed, same text.")]
Device = Annotated[str, typer.Option(help="auto (CUDA if present), cpu or cuda.")]
Context = Annotated[
    str,
    typer.Option(
        help="When the context is full: shift (keep the recent half, fast) or sliding (nanoGPT's exact window)."
    ),
]
AttentionSwap = Annotated[str | None, typer.Option(help="Run with another attention plugin (same weights).")]
PluginOption = Annotated[list[str] | None, typer.Option("--option", "-o", help=OPTION_HELP)]
AttentionOption = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-o",
        help="Attention plugin option, repeatable, with --attention NAME: attention.OPTION=VALUE "
        "(-o attention.window=64). Training fixed the model's other options. `anexa plugins` lists every option.",
    ),
]


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        typer.echo(f"anexa {version('anexa')}")
        raise typer.Exit()


LOGGERS = ("anexa", "anexa_kernels")
"""Anexa's loggers (``anexa.serve`` and a plugin's ``anexa.NAME`` are children of the first): INFO, or
DEBUG with ``-v``."""


@app.callback()
def callback(
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Show debug logs (tracebacks of failed plugins, the sampler chain).")
    ] = False,
    disable_plugin: Annotated[
        list[str] | None,
        typer.Option(
            "--disable-plugin",
            metavar="NAME",
            help="Do not load this plugin (NAME, a distribution, or DIST:NAME), built-ins included; repeatable. Same as ANEXA_DISABLE_PLUGINS.",
        ),
    ] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    # Anexa's own loggers say what they do; other libraries only warn (gguf's writer would print every path).
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    for name in LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.INFO)
    if disable_plugin:
        already = [name for name in os.environ.get("ANEXA_DISABLE_PLUGINS", "").split(",") if name]
        os.environ["ANEXA_DISABLE_PLUGINS"] = ",".join(already + list(disable_plugin))


def _default(key: str) -> str:
    """The help's ``[default: …]`` for a setting: the value that will run, preset by preset where they differ,
    and when fine-tuning (``--init-from``, ``--lora``) where that sets it."""
    from anexa_core.config import preset_values

    def shown(value) -> str:
        return "--block-size" if value is None else f"{value:g}" if isinstance(value, float) else str(value)

    by_value: dict[str, list[str]] = {}
    finetune = []
    for name, value in preset_values(key).items():
        if name.startswith("--"):
            finetune.append(f"{shown(value)} with {name}")
        else:
            by_value.setdefault(shown(value), []).append(name)
    if len(by_value) == 1:
        text = next(iter(by_value))
    else:
        text = "by --preset: " + "; ".join(f"{value} ({', '.join(names)})" for value, names in by_value.items())
    return f"\\[default: {text}{'; ' + ', '.join(finetune) if finetune else ''}]"


def _plugin_options(specs: list[str] | None) -> dict[str, dict[str, str]]:
    from anexa_core.options import parse_assignments

    return parse_assignments(specs or [], "-o")


def _default_out(data: str, preset: str, chosen: dict[str, str] | None = None) -> Path:
    """``runs/<data>-<preset>``, followed by each plugin ``chosen`` (blocks, attention, tokenizer,
    optimizer) that differs from the preset's — ``runs/sherlock-seed-llama-muon`` for ``--blocks llama
    --optimizer muon`` — or the first ``-2``, ``-3``, … of that which holds neither a run nor anything else yet. A fine-tuning run
    passes its own label (``smol-lora``) as ``preset`` and nothing ``chosen``."""
    from anexa_core.config import preset_values
    from anexa_core.io.checkpoint import foreign_entries, holds_a_run

    differing = [name for key, name in (chosen or {}).items() if preset_values(key)[preset] != name]
    base = Path("runs") / "-".join([Path(data.rstrip("/")).stem or "data", preset, *differing])
    candidate, number = base, 1
    while holds_a_run(candidate) or foreign_entries(candidate):
        number += 1
        candidate = base.with_name(f"{base.name}-{number}")
    return candidate


class _Interrupts:
    """First Ctrl-C or SIGTERM: finish the step, save, stop. A second Ctrl-C: leave at once."""

    def __init__(self, console):
        self.console = console
        self.signal: int | None = None
        self._previous = {}

    def requested(self) -> bool:
        return self.signal is not None

    def _handle(self, signum, frame):
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signum
        self.console.print("stopping after this step and saving a checkpoint (Ctrl-C again leaves at once)…")

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


@app.command()
@user_errors
def train(
    data: Annotated[
        list[str] | None,
        typer.Option(
            help="Dataset name (sherlock, tinyshakespeare, …), text file, folder (its *.txt and *.md files, recursively) or URL; repeat for several. Tokenized once, then read from the cache. \\[default: sherlock, shipped with Anexa]"
        ),
    ] = None,
    glob: Annotated[
        list[str] | None,
        typer.Option(
            "--glob",
            help="Files a --data folder contributes, repeatable (matched from the right: '*.txt' at any depth). \\[default: *.txt, *.md]",
        ),
    ] = None,
    preset: Annotated[
        str | None,
        typer.Option(
            show_default=False,
            help="seed (~0.8M parameters, GPT-2 blocks), fast (~0.8M, LLaMA blocks + Muon: the most per minute) or small (~10.7M). \\[default: seed]",
        ),
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(help="TOML file overriding the preset (tables \\[model], \\[train], \\[attention], …)."),
    ] = None,
    tokenizer: Annotated[
        str | None, typer.Option(help="Tokenizer plugin: char, bpe, … " + _default("tokenizer"))
    ] = None,
    vocab_size: Annotated[
        int | None, typer.Option(help="Shorthand for -o tokenizer.vocab_size=N (bpe). \\[default: 1024]")
    ] = None,
    attention: Annotated[
        str | None, typer.Option(help="Attention plugin: sdpa, math, triton, … " + _default("attention"))
    ] = None,
    blocks: Annotated[
        str | None, typer.Option(help="Blocks plugin (model family): gpt2, … " + _default("blocks"))
    ] = None,
    optimizer: Annotated[str | None, typer.Option(help="Optimizer plugin: adamw, … " + _default("optimizer"))] = None,
    option: PluginOption = None,
    n_layer: Annotated[int | None, typer.Option(help="Layers. " + _default("n_layer"))] = None,
    n_head: Annotated[int | None, typer.Option(help="Attention heads. " + _default("n_head"))] = None,
    n_embd: Annotated[int | None, typer.Option(help="Width. " + _default("n_embd"))] = None,
    block_size: Annotated[int | None, typer.Option(help="Context length in tokens. " + _default("block_size"))] = None,
    dropout: Annotated[float | None, typer.Option(help="Dropout. " + _default("dropout"))] = None,
    steps: Annotated[
        int | None,
        typer.Option(
            help="Optimizer steps. With --resume, a larger --steps extends the run: the LR decay still ends where the first run set it (its --steps or --decay-steps), and the extra steps run at --min-lr. \\[default: 5000, 300 with --init-from; no limit with --minutes]"
        ),
    ] = None,
    minutes: Annotated[
        float | None,
        typer.Option(
            help="Train for this many minutes of wall-clock (a resumed run's earlier sessions count); the LR decay follows the clock and the run ends with an evaluation and a checkpoint, within the budget. With --resume, a larger --minutes extends the run: the decay still ends at the first run's minutes, and the extra time runs at --min-lr."
        ),
    ] = None,
    precision: Annotated[
        str | None,
        typer.Option(help="auto (bf16 on GPUs and CPUs that have it), fp32 or bf16. " + _default("precision")),
    ] = None,
    compile: Annotated[
        bool | None,
        typer.Option(
            "--compile/--no-compile",
            help="torch.compile the model (slow to start; see benchmarks/RESULTS.md). \\[default: no]",
        ),
    ] = None,
    decay_steps: Annotated[
        int | None,
        typer.Option(
            help="Step at which the cosine LR decay ends (with --minutes too: the decay then follows steps, not the clock). \\[default: --steps of the first run; with --minutes, the first run's minutes on the clock]"
        ),
    ] = None,
    batch_size: Annotated[int | None, typer.Option(help="Sequences per step. " + _default("batch_size"))] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate. " + _default("lr"))] = None,
    min_lr: Annotated[
        float | None, typer.Option(help="Learning rate at the end of the decay. " + _default("min_lr"))
    ] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps. " + _default("warmup_steps"))] = None,
    eval_every: Annotated[int | None, typer.Option(help="Evaluate every N steps. " + _default("eval_every"))] = None,
    log_every: Annotated[
        int | None,
        typer.Option(
            help="Record the training loss, learning rate and tokens/s every N steps in the run's steps.jsonl. "
            + _default("log_every")
        ),
    ] = None,
    save_every: Annotated[int | None, typer.Option(help="Checkpoint every N steps. " + _default("save_every"))] = None,
    out: Annotated[
        Path | None,
        typer.Option(
            help="Run folder. \\[default: runs/<data>-<preset>, then the blocks, attention, tokenizer and optimizer that differ from the preset's (runs/sherlock-seed-llama-muon), with -2, -3… if taken]"
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            help="Continue the run in this folder, bit for bit as if it had not stopped (same thread count); its LR schedule never changes (see --steps and --minutes)."
        ),
    ] = None,
    init_from: Annotated[
        str | None,
        typer.Option(
            help="Fine-tune this model: an Anexa run, a GGUF file, a Hugging Face folder or hub id (its "
            "architecture and tokenizer are kept; the fine-tuning defaults below apply)."
        ),
    ] = None,
    lora: Annotated[
        str | None,
        typer.Option(
            metavar="SPEC",
            help="With --init-from: train LoRA adapters only, r=16,alpha=32,dropout=0.05,targets=q_proj,v_proj "
            "(every key optional; targets default to the attention projections). The run stores only the adapters.",
        ),
    ] = None,
    seq_len: Annotated[
        int | None,
        typer.Option(help="Tokens per training window (at most the model's context). " + _default("seq_len")),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace the run already in --out.")] = False,
    device: Annotated[str | None, typer.Option(help="auto (CUDA if present), cpu or cuda. \\[default: auto]")] = None,
    seed: Annotated[int | None, typer.Option(help="Random seed. " + _default("seed"))] = None,
    threads: Threads = None,
) -> None:
    """Train a GPT on a text corpus and write it into a run folder (model, best model, training state)."""
    # Why long: every option becomes an override (one line each), then resume, fine-tune or a preset picks the
    # configs and out folder, then one call to training with the messages for an interrupted run.
    use_threads(threads)  # before torch loads (a threads key of --config applies when training starts)
    from anexa_cli.console import console as make_console
    from anexa_cli.progress import reporter_for
    from anexa_core import config as configs
    from anexa_core.train import loop as training
    from anexa_core.train.resume import resume_configs

    overrides = dict(
        data=(data[0] if len(data) == 1 else data) if data else None,
        data_glob=glob or None,
        tokenizer=tokenizer,
        vocab_size=vocab_size,
        attention=attention,
        blocks=blocks,
        optimizer=optimizer,
        n_layer=n_layer,
        n_head=n_head,
        n_embd=n_embd,
        block_size=block_size,
        dropout=dropout,
        steps=steps,
        decay_steps=decay_steps,
        batch_size=batch_size,
        lr=lr,
        min_lr=min_lr,
        warmup_steps=warmup_steps,
        eval_every=eval_every,
        log_every=log_every,
        save_every=save_every,
        device=device,
        seed=seed,
        minutes=minutes,
        precision=precision,
        compile=compile,
        lora=lora,
        seq_len=seq_len,
        threads=threads,
    )
    plugin_options = _plugin_options(option)
    base = None
    if init_from is None and config is not None and resume is None:
        init_from = configs.init_from_in(config)  # a file that names a base fine-tunes it
    if resume is not None:
        if config is not None or out is not None or overwrite or init_from is not None or preset is not None:
            raise AnexaError(
                "--resume continues a run as it was: drop --config, --out, --overwrite, --init-from and --preset"
            )
        model_config, train_config = resume_configs(resume, overrides, plugin_options)
        out_dir = resume
    elif init_from is not None:
        from anexa_core.train.finetune import finetune_configs

        if preset is not None:
            raise AnexaError(
                f"--preset {preset} describes a model trained from scratch; --init-from keeps its base's "
                "architecture with the fine-tuning defaults: drop --preset (and set --lr, --batch-size… directly)"
            )

        model_config, train_config, base = finetune_configs(init_from, overrides, plugin_options, config)
        first_data = train_config.data if isinstance(train_config.data, str) else train_config.data[0]
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", Path(init_from.rstrip("/")).stem).strip(".-") or "model"
        out_dir = out or _default_out(first_data, f"{name}-{'lora' if train_config.lora else 'finetune'}")
    else:
        preset = preset or "seed"
        model_config, train_config = configs.resolve(preset, config, overrides, plugin_options)
        first_data = train_config.data if isinstance(train_config.data, str) else train_config.data[0]
        chosen = {
            "blocks": model_config.blocks,
            "attention": model_config.attention,
            "tokenizer": train_config.tokenizer,
            "optimizer": train_config.optimizer,
        }
        out_dir = out or _default_out(first_data, preset, chosen)
    console = make_console(stderr=True)
    with _Interrupts(console) as interrupts:
        try:
            result = training.train(
                model_config,
                train_config,
                out_dir,
                reporter_for(console),
                resume=resume is not None,
                overwrite=overwrite,
                stop_requested=interrupts.requested,
                base=base,
            )
        except training.TrainingInterrupted as stopped:
            console.print(
                f"interrupted at step {stopped.step}; saved {stopped.out_dir}. Continue with:\n"
                f"  anexa train --resume {stopped.out_dir}",
                highlight=False,
            )
            raise typer.Exit(128 + (interrupts.signal or signal.SIGINT)) from None
        except KeyboardInterrupt:
            console.print(
                f"stopped at once; the last checkpoint in {out_dir}, if any, is intact "
                f"(continue with: anexa train --resume {out_dir})",
                highlight=False,
            )
            raise typer.Exit(130) from None
    if os.environ.get("RANK", "0") != "0":
        return  # under torchrun the first rank reports for all
    best = f" · best val loss {result.best_val_loss:.4f} at step {result.best_step}" if result.best_step else ""
    console.print(
        f"saved {result.out_dir} · step {result.step} · val loss {result.val_loss:.4f}{best} · {result.seconds:.0f}s",
        highlight=False,
    )


def _unescape(text: str) -> str:
    r"""``\n``, ``\t`` and ``\\`` as typed in a shell → newline, tab, backslash; anything else stays."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t", "\\": "\\"}[m.group(1)], text)


def _load(
    model: Path | None,
    device: str,
    sample: list[str] | None,
    temperature: float | None,
    option: list[str] | None,
    attention: str | None,
    context: str,
):
    """The model the flags name (:func:`anexa_core.io.load.load`) and the sampler chain they ask for — with
    no sampling flag, the one the model's makers recommend (:meth:`~anexa_core.io.load.Loaded.sampling`), said
    on stderr. The context policy is checked first, so a typo is refused before a model loads."""
    from anexa_core.infer import sampling
    from anexa_core.infer.engine import check_context_policy
    from anexa_core.io.load import load

    check_context_policy(context)  # before the model loads: a typo costs no waiting
    plugin_options = _plugin_options(option)
    unknown = sorted(set(plugin_options) - {"attention"})
    if unknown:
        raise AnexaError(f"-o {unknown[0]}.… cannot change a trained model: only -o attention.OPTION=VALUE works here")
    if "attention" in plugin_options and attention is None:
        raise AnexaError("-o attention.… needs --attention NAME naming the attention it configures")
    loaded = load(model, device, attention, plugin_options.get("attention"))
    recommended = loaded.sampling() if not sample and temperature is None else None
    chain = sampling.build_chain(sample or (recommended.specs if recommended else []), temperature)
    if recommended is not None:
        typer.echo(
            f"sampling as the model's makers recommend: {recommended.describe()}; --temperature or -s choose otherwise",
            err=True,
        )
    logging.getLogger("anexa").debug("sampler chain: %r", chain)
    return loaded, chain


def _sampler_help() -> str:
    """The ``--sample`` help with the samplers actually installed, in chain order (imports the plugins)."""
    from anexa_core import options, plugins

    entries = []
    for name, entry in plugins.registered("samplers").items():
        described = options.describe(entry.obj)
        first = f"={described[0].name.upper()}" if described else ""
        entries.append((getattr(entry.obj, "order", 0), name, f"{name}{first} ({getattr(entry.obj, 'order', '?')})"))
    listed = ", ".join(text for _, _, text in sorted(entries))
    return (
        "Sampler, repeatable: NAME=VALUE sets its main option (-s top_p=0.9), NAME.OPTION=VALUE any other "
        "(-s repetition_penalty.window=64), NAME alone enables it (-s greedy). Installed, in chain order "
        f"(lower runs first; ties by name): {listed}; then the pick."
    )


class _WithSamplers(TyperCommand):
    """Lists the installed samplers in ``--help`` (only when help is asked for: it loads the plugins)."""

    def format_help(self, ctx, formatter):
        for param in self.params:
            if param.name == "sample":
                param.help = _sampler_help()
        return super().format_help(ctx, formatter)


@app.command(cls=_WithSamplers)
@user_errors
def generate(
    prompt: Annotated[
        str | None, typer.Argument(metavar="PROMPT", help="Text to continue; read from stdin when omitted.")
    ] = None,
    model: Model = None,
    max_new_tokens: MaxNew = 200,
    temperature: Temperature = None,
    sample: Sample = None,
    stop: Stop = None,
    seed: Seed = None,
    context: Context = "shift",
    attention: AttentionSwap = None,
    option: AttentionOption = None,
    device: Device = "auto",
    num_samples: Annotated[
        int,
        typer.Option(
            "--num-samples",
            min=1,
            max=1024,
            help="Continuations to write, decoded together as one batch; sample i uses seed + i.",
        ),
    ] = 1,
    threads: Threads = None,
) -> None:
    """Print continuations of PROMPT (only the generated text, for scripts)."""
    use_threads(threads)
    from anexa_core.infer.generation import generate_samples, generate_text

    loaded, chain = _load(model, device, sample, temperature, option, attention, context)
    if prompt is None:
        if sys.stdin.isatty():  # a pipe says nothing; a person at a terminal would wait without a word
            typer.echo(
                "reading the prompt from the terminal: type it, then press Ctrl-D on a new line "
                '(or pass it as an argument: anexa generate "…")',
                err=True,
            )
        prompt = sys.stdin.read()
    stops = [_unescape(text) for text in stop or []]
    if num_samples > 1:
        samples = generate_samples(
            loaded.model, loaded.tokenizer, prompt, num_samples, max_new_tokens, chain, seed, stops, context
        )
        for index, text in enumerate(samples):
            label = "" if seed is None else f", seed {seed + index}"
            separator = "" if index == 0 else "\n"
            sys.stdout.write(f"{separator}=== sample {index + 1} of {num_samples}{label} ===\n{text}\n")
        return
    for piece in generate_text(loaded.model, loaded.tokenizer, prompt, max_new_tokens, chain, seed, stops, context):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


@app.command(cls=_WithSamplers)
@user_errors
def chat(
    model: Model = None,
    system: Annotated[str | None, typer.Option(help="A system message that opens the conversation.")] = None,
    max_new_tokens: MaxNew = 200,
    temperature: Temperature = None,
    sample: Sample = None,
    stop: Stop = None,
    seed: Seed = None,
    context: Context = "shift",
    attention: AttentionSwap = None,
    option: AttentionOption = None,
    device: Device = "auto",
    threads: Threads = None,
) -> None:
    """Chat with a model, streaming its replies; `/reset` starts over, `quit`, `exit`, `/bye` or Ctrl-D ends.

    The conversation is kept (the oldest turns are dropped when it outgrows the context); a pretrained chat
    model gets its own template, other models a User:/Assistant: transcript."""
    use_threads(threads)
    from anexa_core.infer.chat import Conversation, JinjaTemplate, reply_ends, template_for

    loaded, chain = _load(model, device, sample, temperature, option, attention, context)
    template = template_for(loaded.tokenizer)
    bos = not isinstance(template, JinjaTemplate)  # a model's own template writes its special tokens itself
    conversation = Conversation(template)
    if system:
        conversation.add("system", system)
    typer.echo(_greeting(loaded, bos))
    ends, stop_ids = reply_ends(template, loaded.tokenizer)
    stops = [*(_unescape(text) for text in stop or []), *ends]
    history = _line_editing()
    piped = not sys.stdin.isatty()
    turn = 0
    while True:
        prompt = _next_prompt(piped)
        if prompt is None or prompt.strip() in LEAVE:
            break
        if prompt.strip() == "/reset":
            conversation = Conversation(template, conversation.messages[:1] if system else [])
            typer.echo("(a new conversation)")
            continue
        if not prompt:
            continue
        turn_seed = None if seed is None else seed + turn
        _answer(loaded, conversation, prompt, bos, max_new_tokens, chain, turn_seed, (stops, stop_ids), context)
        turn += 1
    if history is not None:
        history()


def _greeting(loaded, bos: bool) -> str:
    """`anexa chat`'s first line: what was loaded — an import by where it came from, a trained model by its
    step and validation loss — how the conversation is rendered, and how to leave."""
    from anexa_core.io.pretrained import origin_of

    meta = loaded.meta
    val = meta.get("val_loss")
    state = f"step {meta.get('step')}" + (f", val loss {val:.4f}" if isinstance(val, float) else "")
    origin = origin_of(meta) if isinstance(meta.get("imported_from"), dict) else None
    if origin is not None:  # an import has no steps of its own to report
        state = f"imported from {origin.describe()}"
    kind = "its chat template" if not bos else "a User:/Assistant: transcript"
    return (
        f"loaded {loaded.path}: {state}; chatting through {kind}. `quit`, `exit`, `/bye` or Ctrl-D to leave; "
        "`/reset` to start over."
    )


LEAVE = ("quit", "exit", "/quit", "/exit", "/bye")
"""Lines that end `anexa chat` (`/bye` as ollama's), never sent to the model."""


def _next_prompt(piped: bool) -> str | None:
    """The user's next line, ``None`` at the end of the input (Ctrl-D, Ctrl-C). A terminal echoes the line
    typed after ``Prompt: ``; a piped line is shown the same way, and the prompt only for a line that comes,
    so a transcript does not end on an unanswered ``Prompt: ``."""
    try:
        if not piped:
            return input("Prompt: ")
        line = sys.stdin.readline()
    except (EOFError, KeyboardInterrupt):
        typer.echo()
        return None
    if not line:
        return None
    prompt = line.removesuffix("\n")
    typer.echo(f"Prompt: {prompt}")
    return prompt


def _answer(
    loaded,
    conversation,
    prompt: str,
    bos: bool,
    max_new_tokens: int,
    chain,
    seed: int | None,
    ends: tuple[list[str], tuple[int, ...]],
    context: str,
) -> None:
    """One turn of `anexa chat`: the user's message joins the conversation, the reply streams to stdout
    and joins it too; ``ends``: the stop strings and stop ids. A prompt the tokenizer refuses is one line,
    before "Response:"."""
    from anexa_core.infer.generation import encode_prompt, generate_text

    tokenizer, block_size = loaded.tokenizer, loaded.model.config.block_size
    conversation.add("user", prompt)
    try:
        ids = conversation.prompt_ids(
            lambda text: encode_prompt(tokenizer, text, bos), block_size, min(max_new_tokens, block_size // 2)
        )
    except AnexaError as exc:
        conversation.messages.pop()
        typer.echo(f"error: {exc}")
        return
    sys.stdout.write("Response: ")
    reply = []
    try:
        stops, stop_ids = ends
        for piece in generate_text(loaded.model, tokenizer, ids, max_new_tokens, chain, seed, stops, context, stop_ids):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except AnexaError as exc:
        sys.stdout.write(f"\nerror: {exc}")
    except KeyboardInterrupt:
        sys.stdout.write(" [interrupted]")
    sys.stdout.write("\n")
    conversation.add("assistant", "".join(reply).strip())


def _line_editing():
    """On a terminal: line editing and a history of what was typed (``$ANEXA_CACHE/chat_history``, 1,000
    lines), through the readline module. Returns the function that saves the history, or ``None``."""
    if not sys.stdin.isatty():
        return None
    try:
        import readline
    except ImportError:  # Windows without pyreadline: input() still works, without history
        return None
    from anexa_core.data.corpus import cache_dir

    path = cache_dir() / "chat_history"
    with contextlib.suppress(OSError):
        readline.read_history_file(path)
    readline.set_history_length(1000)

    def save() -> None:
        with contextlib.suppress(OSError):
            path.parent.mkdir(parents=True, exist_ok=True)
            readline.write_history_file(path)

    return save


def _registrations(plugin: dict[str, Any]) -> str:
    """The "registers (options)" cell of ``anexa plugins``: ``KIND: NAME(OPTION=DEFAULT, …), …; …``."""
    parts = []
    for kind, names in plugin["registers"].items():
        shown = []
        for name in names:
            opts = plugin["options"].get(kind, {}).get(name, [])
            inner = ", ".join(f"{o['name']}={o['default']!r}" for o in opts if "name" in o)
            shown.append(f"{name}({inner})" if inner else name)
        parts.append(f"{kind}: {', '.join(shown)}")
    return "; ".join(parts)


@user_errors
def list_plugins(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List every plugin (loaded, failed, disabled), what it registers with its options, and any name clashes."""
    from anexa_core.plugins import conflicts, describe_plugins

    verbose = logging.getLogger("anexa").isEnabledFor(logging.DEBUG)
    described = describe_plugins()
    clashes = conflicts()
    if as_json:
        for plugin in described:
            if not verbose:
                plugin.pop("traceback")
        typer.echo(json.dumps({"plugins": described, "conflicts": clashes}, indent=2))
        return
    from rich.table import Table

    from anexa_cli.console import console as make_console

    table = Table("plugin", "distribution", "version", "status", "registers (options)")
    for plugin in described:
        status = plugin["status"] if plugin["status"] == "loaded" else f"{plugin['status']}: {plugin['error'] or ''}"
        table.add_row(
            plugin["name"], plugin["distribution"] or "-", plugin["version"] or "-", status, _registrations(plugin)
        )
    console = make_console()
    console.print(table)
    for clash in clashes:
        console.print(
            f"conflict: {clash['kind']} {clash['name']!r} is registered by {' and '.join(clash['providers'])}",
            highlight=False,
        )
    if verbose:
        for plugin in described:
            if plugin["traceback"]:
                console.print(f"traceback of plugin {plugin['name']}:\n{plugin['traceback']}", highlight=False)


# The other commands, after train, generate and chat (decorated above): typer lists them as registered, so
# help reads in the order a user meets them.
for _name, _command in (
    ("eval", evaluate),
    ("export", export),
    ("import", import_model),
    ("serve", serve),
    ("runs", runs),
    ("plot", plot),
    ("plugins", list_plugins),
):
    app.command(_name)(_command)
app.add_typer(bench_app, name="bench")


def _flowed(doc: str | None) -> str | None:
    """A docstring as help text: each paragraph one line, for the terminal to wrap (typer's rich help keeps
    the source's line breaks, which then fall mid-line)."""
    if not doc:
        return doc
    return "\n\n".join(" ".join(paragraph.split()) for paragraph in inspect.cleandoc(doc).split("\n\n"))


for _typer in (app, bench_app):
    for _info in [*_typer.registered_commands, _typer.registered_callback]:
        if _info is not None and _info.help is None and _info.callback is not None:
            _info.help = _flowed(_info.callback.__doc__)

# typer ≥ 0.24 vendors click: its errors derive from typer.TyperException rather than click's classes.
_USAGE_ERRORS = tuple({click.ClickException, getattr(typer, "TyperException", click.ClickException)})
_ABORTS = tuple({click.exceptions.Abort, typer.Abort})


def _options_of(command: Any) -> set[str]:
    """Every spelling of ``command``'s own options (``-v``, ``--verbose``, …)."""
    return {name for param in command.params for name in [*param.opts, *param.secondary_opts]}


def _commands_named(group: Any, argv: list[str]) -> list[tuple[str, Any]]:
    """The commands that the words of ``argv`` name, outermost first: ``("bench", …), ("bench train", …)``."""
    named: list[tuple[str, Any]] = []
    path, current = [], group
    for word in argv:
        sub = getattr(current, "commands", {}).get(word)
        if sub is not None:
            path.append(word)
            current = sub
            named.append((" ".join(path), sub))
    return named


def _command_taking(group: Any, argv: list[str], option: str) -> str | None:
    """The command named in ``argv`` (``generate``, ``bench train``) that takes ``option``, if any."""
    return next((path for path, command in _commands_named(group, argv) if option in _options_of(command)), None)


def main(argv: list[str] | None = None) -> None:
    """The ``anexa`` console script: the app, with usage mistakes as one line and exit code 2."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="anexa", standalone_mode=False)
    except _ABORTS:
        typer.echo("", err=True)
        sys.exit(130)
    except _USAGE_ERRORS as exc:
        exit_code = getattr(exc, "exit_code", 1)
        possibilities: list[str] = getattr(exc, "possibilities", None) or []  # click's near spellings
        possibilities[:] = [option for option in possibilities if option != "--help"]  # never the one meant
        if not exc.format_message():  # `anexa` alone: help was shown, nothing went wrong
            sys.exit(0)
        hint = _usage_hint(command, exc, sys.argv[1:] if argv is None else argv, exit_code)
        typer.echo(f"error: {' '.join(exc.format_message().split())}{hint}", err=True)
        sys.exit(exit_code)
    sys.exit(code if isinstance(code, int) else 0)


def _usage_hint(command: Any, exc: Exception, argv: list[str], exit_code: int) -> str:
    """What follows a usage error: where a misplaced option goes, else which ``--help`` to read."""
    ctx = getattr(exc, "ctx", None)
    if ctx is None:  # click's parser left it out (an option's value missing): the command argv names
        named = _commands_named(command, argv)
        where = f"anexa {named[-1][0]}" if named else "anexa"
        return f" (see `{where} --help`)" if exit_code == 2 else ""
    misplaced = getattr(exc, "option_name", None)
    if ctx.parent is not None and misplaced in _options_of(command):
        program, _, rest = ctx.command_path.partition(" ")
        return f" ({misplaced} is an option of {program} itself: `{program} {misplaced} {rest} …`)"
    taker = _command_taking(command, argv, misplaced) if ctx.parent is None and misplaced else None
    if taker is not None:
        return f" ({misplaced} is an option of the command: `anexa {taker} {misplaced} …`)"
    return f" (see `{ctx.command_path} --help`)" if exit_code == 2 else ""
