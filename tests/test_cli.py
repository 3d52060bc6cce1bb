"""The CLI through typer's runner, plus one real subprocess run of `anexa train` → `anexa generate`."""

import importlib.metadata
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import TINY_FLAGS, train_tiny_through_cli, user_error
from typer.testing import CliRunner

from anexa_cli.main import app

runner = CliRunner()
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def run_dir(sherlock_path, tmp_path_factory):
    """A tiny model trained through the CLI itself."""
    out = tmp_path_factory.mktemp("run") / "tiny"
    return train_tiny_through_cli(sherlock_path, out)


def test_train_writes_a_run_folder(run_dir):
    assert {p.name for p in run_dir.iterdir()} == {
        "model.safetensors",
        "best.safetensors",
        "train_state.safetensors",
        "metrics.jsonl",
        "steps.jsonl",
        "loss.png",
    }
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [15, 30]


def test_generate_prints_only_the_continuation(run_dir):
    args = ["generate", "Sherlock Holmes", "--model", str(run_dir), "-n", "40", "--seed", "1"]
    first, second = runner.invoke(app, args), runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.stdout == second.stdout  # same seed, same text
    assert len(first.stdout) == 41 and first.stdout.endswith("\n")  # 40 characters, nothing else


def test_generate_reads_the_prompt_from_stdin(run_dir):
    result = runner.invoke(app, ["generate", "--model", str(run_dir), "-n", "5", "--temperature", "0"], input="Watson")
    greedy = runner.invoke(app, ["generate", "Watson", "--model", str(run_dir), "-n", "5", "-s", "greedy"])
    assert result.exit_code == 0 and result.stdout == greedy.stdout


def test_generate_stops_at_a_stop_string(run_dir):
    args = ["generate", "The ", "--model", str(run_dir), "-n", "60", "--seed", "2"]
    free = runner.invoke(app, args).stdout
    visible = next(i for i, char in enumerate(free) if not char.isspace())
    stop = free[visible + 3 : visible + 6]
    assert len(stop) == 3, "the sampled text should go on after its first visible character"
    stopped = runner.invoke(app, [*args, "--stop", stop]).stdout
    assert stopped == free[: free.index(stop, visible + 1)] + "\n"


def test_a_reply_is_never_empty_because_the_stop_string_came_first(run_dir):
    """Issue 24: chat returned an empty reply for some seeds because the model wrote the stop string
    first. A stop counts only after some text that is not whitespace (docs/serve.md, StopStrings)."""
    args = ["chat", "--model", str(run_dir), "-n", "12", "--seed", "4"]
    reply = runner.invoke(app, args, input="Holmes\nquit\n").stdout.split("Response: ")[1].split("\nPrompt: ")[0]
    assert reply.strip(), "the free reply should hold some text for this test to mean anything"
    for stop in (reply[:1], reply[:2], reply[: reply.index(reply.strip()[0]) + 1]):
        stopped = runner.invoke(app, [*args, "--stop", stop], input="Holmes\nquit\n").stdout
        answer = stopped.split("Response: ")[1].split("\nPrompt: ")[0]
        assert answer.strip() and reply.startswith(answer), (stop, answer)


def test_chat_streams_responses_until_quit(run_dir):
    result = runner.invoke(app, ["chat", "--model", str(run_dir), "-n", "10", "--seed", "3"], input="Holmes\nquit\n")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert out.splitlines()[1] == "Prompt: Holmes", "a piped line is shown after the prompt, as a terminal echoes it"
    reply = out.split("\nResponse: ", 1)[1]  # the model's text may hold line breaks of its own
    assert reply.endswith("\nPrompt: quit\n") and len(reply) > len("\nPrompt: quit\n"), "quit ends on a fresh line"
    ended = runner.invoke(app, ["chat", "--model", str(run_dir), "-n", "10", "--seed", "3"], input="Holmes\n").stdout
    assert ended == out.removesuffix("Prompt: quit\n"), "the end of piped input ends the chat, no prompt left open"
    for leave in ("exit", "/quit", "/exit", " /bye "):  # a newcomer's `/exit` was sent to a char model as text
        left = runner.invoke(
            app, ["chat", "--model", str(run_dir), "-n", "10", "--seed", "3"], input=f"Holmes\n{leave}\n"
        )
        assert left.exit_code == 0 and left.stdout == out.replace("Prompt: quit\n", f"Prompt: {leave}\n"), leave


def test_chat_checks_the_prompt_before_responding_and_goes_on(run_dir):
    result = runner.invoke(app, ["chat", "--model", str(run_dir), "-n", "5"], input="日本\nWatson\nquit\n")
    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    assert lines[1] == "Prompt: 日本"
    assert lines[2].startswith("error: the text contains characters never seen in training ('日', '本')")
    assert lines[3] == "Prompt: Watson" and lines[4].startswith("Response: ")
    assert result.stdout.count("Response: ") == 1 and result.stdout.endswith("\nPrompt: quit\n")


def test_chat_says_which_checkpoint_it_loaded(run_dir):
    result = runner.invoke(app, ["chat", "--model", str(run_dir), "-n", "5"], input="quit\n")
    best = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert result.stdout.startswith(f"loaded {run_dir / 'best.safetensors'}: step {best['step']}, val loss ")


def test_prompts_get_the_corpus_normalisation(run_dir):
    crlf = runner.invoke(app, ["generate", "\ufeffHolmes\r\nsaid", "--model", str(run_dir), "-n", "8", "-s", "greedy"])
    plain = runner.invoke(app, ["generate", "Holmes\nsaid", "--model", str(run_dir), "-n", "8", "-s", "greedy"])
    assert crlf.exit_code == 0, crlf.output
    assert crlf.stdout == plain.stdout


def test_plugins_json_lists_builtins_with_versions():
    result = runner.invoke(app, ["plugins", "--json"])
    listed = {p["name"]: p for p in json.loads(result.stdout)["plugins"]}
    assert listed["sdpa"] == {
        "name": "sdpa",
        "distribution": "anexa",
        "version": listed["sdpa"]["version"],
        "status": "loaded",
        "error": None,
        "registers": {"attention": ["sdpa"]},
        "options": listed["sdpa"]["options"],
    }
    [backend] = listed["sdpa"]["options"]["attention"]["sdpa"]
    assert {key: backend[key] for key in ("name", "type", "default")} == {
        "name": "backend",
        "type": "'auto' | 'flash' | 'efficient' | 'cudnn' | 'math'",
        "default": "auto",
    }
    assert listed["gpt2"]["options"]["blocks"]["gpt2"] == [
        {"name": "bias", "type": "bool", "default": True, "help": "biases in linear layers and LayerNorms"},
        {
            "name": "gelu",
            "type": "'exact' | 'tanh'",
            "default": "exact",
            "help": "GELU exactly (erf), or its tanh approximation (OpenAI's GPT-2)",
        },
    ]
    assert listed["corpora"]["registers"] == {"datasets": ["sherlock", "tinyshakespeare"]}
    table = runner.invoke(app, ["plugins"]).stdout
    assert "gpt2" in table and "blocks" in table


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--attention", "nope"], "unknown attention 'nope': choose one of"),
        (["train", "--attention", "sdap"], "unknown attention 'sdap': did you mean 'sdpa'? choose one of"),
        (["train", "--preset", "smal"], "unknown preset 'smal': did you mean 'small'? choose one of seed, fast, small"),
        (["train", "-o", "blocks.biass=true"], "blocks gpt2 has no option 'biass': did you mean 'bias'? choose one of"),
        (["train", "--blocks", "nope"], "unknown blocks 'nope'"),
        (["train", "--tokenizer", "nope"], "unknown tokenizer 'nope'"),
        (["train", "--optimizer", "nope"], "unknown optimizer 'nope'"),
        (["train", "-o", "attention.window=3"], "attention sdpa has no option 'window': choose one of backend"),
        (["train", "-o", "blocks.bias=maybe"], "blocks gpt2 option bias must be true or false, got 'maybe'"),
        (["train", "-o", "window=3"], "bad -o 'window=3': use -o KIND.OPTION=VALUE"),
        (["train", "-o", "sampler.p=3"], "'sampler' is not a plugin setting"),
        (["train", "--vocab-size", "100", "--tokenizer", "bpe"], "does not fit byte-level BPE"),
        (["train", "--out", "/dev/null"], "--out /dev/null is a file: pass a folder for the run"),
        (["train", "--vocab-size", "300"], "vocab_size does not apply to tokenizer char, which has no such option: "),
        (["train", "--steps", "99999999999999999999999"], "beyond the largest supported value"),
        (["train", "--seed", "-3"], "--seed must be between 0 and"),
        (["train", "--config", "."], "is a folder: pass a TOML file"),
        (["train", "--preset", "huge"], "unknown preset 'huge'"),
        # Found by a QA session: the same setting twice on the command line kept one value without a word.
        (
            ["train", "--tokenizer", "bpe", "--vocab-size", "300", "-o", "tokenizer.vocab_size=400"],
            "--vocab-size and -o tokenizer.vocab_size both set vocab_size: keep one of them",
        ),
        (["train", "-o", "blocks.gelu=tanh", "-o", "blocks.gelu=exact"], "-o blocks.gelu is given twice: give it once"),
        # Found by a QA session: a preset beside --resume or --init-from was silently ignored.
        (
            ["train", "--resume", "runs/x", "--preset", "small"],
            "drop --config, --out, --overwrite, --init-from and --preset",
        ),
        (
            ["train", "--init-from", "runs/x", "--preset", "small"],
            "--preset small describes a model trained from scratch",
        ),
        (["train", "--steps", "0"], "--steps must be at least 1"),
        (["train", "--n-embd", "30", "--n-head", "4"], "divisible"),
        (["train", "--data", "no-such-corpus"], "neither a dataset"),
        (["train", "--glob", "*.rst"], "--glob '*.rst' picks the files of a --data folder, but --data"),
        (["train", "--minutes", "1e308"], "--minutes must be a positive number of minutes that fits in seconds"),
        (["train", "--device", "tpu"], "unknown device"),
        (["generate", "x", "--model", "/nonexistent"], "no checkpoint at"),
        (["generate", "x", "-s", "top_p=1.5"], "top_p must be in (0, 1], got 1.5"),
        (["generate", "x", "--temperature", "inf"], "must be a finite number, got 'inf'"),
        (["generate", "x", "-o", "blocks.bias=false"], "cannot change a trained model"),
        (["generate", "x", "--context", "wrap"], "unknown context policy 'wrap'"),
        (["chat", "--context", "shfit"], "unknown context policy 'shfit': did you mean 'shift'?"),
        (["generate", "x", "--model", "README.md"], "is not a safetensors checkpoint"),
        (["generate", "x", "--model", "tests"], "no checkpoint at tests/model.safetensors"),
        # Found by a newcomer: what a wrong path is, and what to pass instead.
        (["plot", "/nonexistent/run"], "/nonexistent/run does not exist: pass the folder of an `anexa train` run"),
        (
            ["import", "README.md", "--out", "/nonexistent/x"],
            "README.md is neither a GGUF file nor a Hugging Face "
            "folder (config.json and safetensors): pass a model's .gguf file, its folder, or a hub id ORG/NAME",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, match, tmp_path, run_dir, sherlock_path, monkeypatch):
    if args[0] in ("generate", "chat") and "--model" not in args:
        args = [*args, "--model", str(run_dir)]
    if "--model" in args:  # relative paths are the repository's
        monkeypatch.chdir(REPO)
    if args[0] == "train":
        args = args if "--out" in args or "--resume" in args else [*args, "--out", str(tmp_path / "run")]
        if "--data" not in args:
            args += ["--data", str(sherlock_path)]
    user_error(args, match)
    assert not (tmp_path / "run" / "model.safetensors").exists()


def test_unseen_prompt_characters(run_dir):
    user_error(["generate", "naïve ☃", "--model", str(run_dir)], "never seen in training")


@pytest.mark.parametrize(
    "content,match",
    [
        (b"", "is empty"),
        (b"  \n\t ", "is empty"),
        (b"\x89PNG\r\n\x1a\n\x00\x00", "binary"),
        (b"caf\xe9 " * 50, "UTF-8"),
    ],
)
def test_bad_corpus(tmp_path, content, match):
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(content)
    user_error(["train", "--data", str(corpus), "--out", str(tmp_path / "run")], match)
    assert not (tmp_path / "run").exists()


def test_corrupt_checkpoint(tmp_path, run_dir):
    broken = tmp_path / "model.safetensors"
    broken.write_bytes((run_dir / "model.safetensors").read_bytes()[:300])
    user_error(["generate", "x", "--model", str(broken)], "corrupt")


@pytest.mark.parametrize(
    "args,match",
    [
        (["train", "--steps", "many"], "Invalid value for '--steps'"),
        (["generate", "x", "--frobnicate"], "No such option: --frobnicate"),
        (["teleport"], "No such command 'teleport'"),
        (["generate", "x", "--seed", "-1"], "Invalid value for '--seed'"),
        (["generate", "x", "-n", "1e30"], "Invalid value for '--max-new-tokens'"),
        # a folder where a file is written: refused before minutes of measuring, not after
        (["bench", "--seq", "64", "--json", "."], "Invalid value for '--json': file '.' is a directory"),
        (["bench", "--plot", "."], "Invalid value for '--plot': file '.' is a directory"),
        (["bench", "generate", "--json", "."], "Invalid value for '--json': file '.' is a directory"),
        (["plot", "runs/x", "-o", "."], "Invalid value for '--out' / '-o': file '.' is a directory"),
    ],
)
def test_usage_mistakes_are_one_line_and_exit_2_through_the_console_script(args, match):
    """The real entry point (not typer's runner, which would print click's multi-line box)."""
    result = subprocess.run([sys.executable, "-m", "anexa_cli", *args], capture_output=True, text=True, check=False)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "--help" in lines[0]


def test_anexa_errors_exit_2_not_1_through_the_console_script(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "anexa_cli", "generate", "x", "--model", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2 and result.stderr.startswith("error: no checkpoint at"), result.stderr


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["generate", "x", "-v"], "(-v is an option of anexa itself: `anexa -v generate …`)"),
        (["bench", "train", "--verbose"], "(--verbose is an option of anexa itself: `anexa --verbose bench train …`)"),
        (["generate", "x", "-z"], "(see `anexa generate --help`)"),  # a near miss: not an option of anexa
        (["--threads", "0", "generate"], "(--threads is an option of the command: `anexa generate --threads …`)"),
        (["--steps", "1", "bench", "train"], "(--steps is an option of the command: `anexa bench train --steps …`)"),
        (["--steps", "1", "generate"], "(see `anexa --help`)"),  # a near miss: generate takes no --steps
        (["-z"], "(see `anexa --help`)"),
        (["eval", "--model", "runs/x"], "(see `anexa eval --help`)"),  # not "(Possible options: --help)"
    ],
)
def test_an_option_on_the_wrong_side_of_the_command_says_where_it_goes(argv, hint, capsys):
    """The first-week report: `anexa generate … -v` answered only "No such option: -v"; the newcomer's:
    `anexa --threads 0 generate` only "No such option: --threads"."""
    from anexa_cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    option = next(arg for arg in (argv if argv[0] in app_commands() else argv[:1]) if arg.startswith("-"))
    assert capsys.readouterr().err == f"error: No such option: {option} {hint}\n"


@pytest.mark.parametrize(
    ("argv", "command"),
    [(["chat", "-m", "runs/x", "--system"], "chat"), (["-v", "bench", "train", "--steps"], "bench train")],
)
def test_an_options_missing_value_names_the_help_to_read(argv, command, capsys):
    """The newcomer's report: `anexa chat -m runs/smol --system` said only "Option '--system' requires an
    argument." — click's parser raises it without the command, so the words of argv name it."""
    from anexa_cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2
    expected = f"error: Option {argv[-1]!r} requires an argument. (see `anexa {command} --help`)\n"
    assert capsys.readouterr().err == expected


def app_commands() -> set[str]:
    import typer

    return set(typer.main.get_command(app).commands)


def test_every_commands_usage_line_names_its_arguments_in_capitals():
    """The first-week report: usage lines read `{RUN}`, `{runs}...` and `[prompt]` side by side."""
    import typer

    def commands(group, path):
        for name, command in getattr(group, "commands", {}).items():
            yield f"{path} {name}", command
            yield from commands(command, f"{path} {name}")

    seen, walked = {}, set()
    for path, command in commands(typer.main.get_command(app), "anexa"):
        walked.add(path)
        for param in command.params:
            if param.param_type_name == "argument":
                seen[f"{path} {param.name}"] = param.metavar
    assert "anexa bench generate" in walked  # the walk reaches the commands of a group too
    assert len(seen) >= 7 and "anexa generate prompt" in seen
    assert {where: metavar for where, metavar in seen.items() if metavar is None or metavar != metavar.upper()} == {}


def test_version_and_help_defaults():
    version = runner.invoke(app, ["--version"])
    assert version.exit_code == 0 and version.stdout.strip() == f"anexa {importlib.metadata.version('anexa')}"
    helped = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert "<bool>" not in helped.stdout
    shown = " ".join(helped.stdout.replace("│", " ").split())
    for default in (
        "[default: seed]",
        "[default: 5000, 300 with --init-from; no limit with --minutes]",
        "[default: sherlock, shipped with Anexa]",
        "[default: 1337]",
        # what will run, preset by preset, where the presets differ (issue 20)
        "[default: by --preset: 0.001 (seed, small); 0.005 (fast); 0.0001 with --init-from, 0.001 with --lora]",
        "[default: --block-size; 256 with --init-from, 256 with --lora]",
        "[default: by --preset: adamw (seed, small); muon (fast)]",
        "[default: by --preset: gpt2 (seed, small); llama (fast)]",
    ):
        assert default in shown, default
    assert "--overwrite" in helped.stdout


def test_help_lists_the_commands_in_the_order_a_user_meets_them_and_wraps_paragraphs_itself():
    listed = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    order = ["train", "generate", "chat", "eval", "export", "import", "serve", "runs", "plot", "plugins", "bench"]
    found = re.findall(r"^│ (\w+) ", listed.split("Commands")[1], flags=re.MULTILINE)
    assert found == order
    for command in (["eval"], ["chat"], ["bench", "generate"]):
        helped = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300"}).stdout
        intro = helped.split("╭")[0]
        lines = [line.strip() for line in intro.splitlines() if line.strip()]
        # at 300 columns every paragraph of the docstring is one line: no break the source put mid-sentence
        assert all(line.endswith(".") for line in lines if not line.startswith("Usage")), lines


@pytest.mark.parametrize(
    "command", [["train"], ["generate"], ["chat"], ["eval"], ["serve"], ["plot"], ["bench"], ["bench", "train"]]
)
def test_help_types_name_one_value_of_a_repeatable_parameter_and_none_for_flags(command):
    helped = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "200"})
    assert helped.exit_code == 0
    assert "list[" not in helped.stdout and "<bool>" not in helped.stdout
    assert re.search(r"<(str|path)>", helped.stdout), helped.stdout  # the type column is still there


HELPED = [["train"], ["generate"], ["chat"], ["eval"], ["serve"], ["export"], ["import"], ["runs"], ["plot"],
          ["bench", "train"], ["bench", "generate"]]  # fmt: skip


@pytest.mark.parametrize("command", HELPED, ids=" ".join)
def test_help_on_an_80_column_terminal_shows_every_word_of_every_options_help(command):
    """Typer cut words longer than the help column with "…" (`--lora`'s `r=16,alpha=32,dropo…` at 80
    columns, also what piped help gets); now they fold onto the next line. Every word of each option's help
    must be there once the whitespace and box lines are taken away (a folded word's two halves then join)."""
    helped = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "80"})
    assert helped.exit_code == 0
    squashed = re.sub(r"[\s│─╭╮╰╯]", "", helped.stdout)
    words = [word for param in _params(command) for word in _help_of(param).split()]
    assert len(words) > 10 and [word for word in words if word.replace("\\[", "[") not in squashed] == []


def _params(command):
    import typer

    click_command = typer.main.get_command(app)
    for name in command:
        click_command = click_command.commands[name]
    return click_command.params


def _help_of(param):
    """An option's help as shown: generate's and chat's --sample list the installed samplers."""
    from anexa_cli.main import _sampler_help

    return _sampler_help() if param.name == "sample" else getattr(param, "help", None) or ""


@pytest.mark.parametrize("command", [["generate"], ["chat"]])
def test_generate_and_chat_help_offers_only_the_plugin_options_they_take(command, run_dir):
    """The help of `-o` promised `-o blocks.rope_theta=500000`, which these commands refuse (training fixed
    the model): it names attention's options only, and its example is taken."""
    option = next(_help_of(param) for param in _params(command) if param.name == "option")
    assert re.findall(r"-o (\w+)\.", option) == ["attention"] and "blocks" not in option
    example = re.search(r"-o (attention\.\w+=\w+)", option)[1]
    taken = runner.invoke(app, ["generate", "Holmes", "-m", str(run_dir), "-n", "3", "--attention", "sliding",
                                "-o", example])  # fmt: skip
    assert taken.exit_code == 0, taken.output


def test_export_help_names_every_outtype_the_gguf_writer_takes():
    """The CLI spells the choices by hand (importing the writer would load torch for --help): keep them equal."""
    from anexa_core.io.gguf import WRITE_DTYPES

    helped = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "400"})
    text = " ".join(re.sub("[│─╭╮╰╯]", " ", helped.stdout).split())
    outtype = text.split("--outtype")[1].split("--")[0]
    named = re.findall(r"\b(f32|f16|bf16|q\d_\d|q\d_k)\b", outtype)
    assert sorted(set(named)) == sorted(WRITE_DTYPES), outtype


def test_generate_help_lists_the_installed_samplers_in_chain_order():
    helped = runner.invoke(app, ["generate", "--help"], env={"COLUMNS": "400"})
    text = " ".join(re.sub("[│─╭╮╰╯]", " ", helped.stdout).split())
    names = [name for name in ("repetition_penalty", "temperature", "top_p", "min_p", "greedy") if name in text]
    assert names == ["repetition_penalty", "temperature", "top_p", "min_p", "greedy"]
    assert text.index("temperature=VALUE (20)") < text.index("top_p=P (40)") < text.index("greedy (90)")


def test_verbose_prints_the_sampler_chain(run_dir):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "anexa_cli",
            "-v",
            "generate",
            "x",
            "--model",
            str(run_dir),
            "-n",
            "2",
            "-s",
            "top_p=0.9",
            "-s",
            "temperature=0.5",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "sampler chain: Temperature(value=0.5) → TopP(p=0.9)" in result.stderr


@pytest.mark.parametrize("typed,meaning", [(r"\n\n", "\n\n"), (r"\t", "\t"), (r"a\\n", "a\\n"), (r"\x", r"\x")])
def test_stop_strings_understand_shell_escapes(typed, meaning):
    from anexa_cli.main import _unescape

    assert _unescape(typed) == meaning


def test_stop_at_a_blank_line_as_the_readme_says(run_dir):
    args = ["generate", "The ", "--model", str(run_dir), "-n", "600", "--seed", "0"]
    free = runner.invoke(app, args).stdout
    stopped = runner.invoke(app, [*args, "--stop", r"\n"]).stdout
    assert "\n" in free[:-1], "the sampled text should contain a newline for this test to mean anything"
    assert stopped == free[: free.index("\n")] + "\n"


def test_resume_continues_a_run(run_dir, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in run_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    result = runner.invoke(app, ["train", "--resume", str(copy), "--steps", "40", "--eval-every", "10"])
    assert result.exit_code == 0, result.output
    steps = [json.loads(line)["step"] for line in (copy / "metrics.jsonl").read_text().splitlines()]
    assert steps == [15, 30, 40]


def test_help_does_not_import_torch():
    code = (
        "import sys\nfrom anexa_cli.main import app\ntry:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    assert "train" in result.stdout and "generate" in result.stdout


def test_real_subprocess_train_then_generate(sherlock_path, tmp_path):
    anexa = Path(sys.executable).with_name("anexa")
    env = {**os.environ, "COLUMNS": "120"}
    trained = subprocess.run(
        [
            str(anexa),
            "train",
            "--data",
            str(sherlock_path),
            *TINY_FLAGS,
            "--steps",
            "20",
            "--eval-every",
            "10",
            "--device",
            "cpu",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert trained.returncode == 0, trained.stderr
    parameters = checkpoint_parameters(tmp_path / "runs" / "sherlock-seed")
    assert f"{parameters:,} parameters" in trained.stderr, "a count under 0.1M in full, never 0.00M"
    generated = subprocess.run(  # no --model: the newest run under ./runs
        [str(anexa), "generate", "Holmes", "-n", "25", "--seed", "0"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    assert generated.returncode == 0, generated.stderr
    assert len(generated.stdout) == 26 and generated.stderr == ""


def test_bpe_run_generates_from_any_text(sherlock_path, tmp_path):
    out = tmp_path / "bpe"
    trained = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(sherlock_path),
            "--tokenizer",
            "bpe",
            "--vocab-size",
            "300",
            *TINY_FLAGS,
            "--steps",
            "6",
            "--eval-every",
            "6",
            "--out",
            str(out),
        ],
    )
    assert trained.exit_code == 0, trained.output
    result = runner.invoke(app, ["generate", "naïve ☃ Holmes", "--model", str(out), "-n", "12", "--seed", "0"])
    assert result.exit_code == 0, result.output
    assert result.stdout.endswith("\n") and len(result.stdout) > 1


@pytest.mark.parametrize(
    "command",
    [["train"], ["generate"], ["chat"], ["eval"], ["export"], ["serve"], ["bench"], ["bench", "train"], ["plot"]],
    ids=" ".join,
)
def test_no_help_shows_the_json_integer_limit_as_a_range(command):
    """Issue 24: `[1<=x<=9007199254740992]` in --help read as a number that means something."""
    text = runner.invoke(app, [*command, "--help"], env={"COLUMNS": "300"}).stdout
    assert text and str(2**53) not in text


def test_generate_without_a_prompt_says_so_on_a_terminal_and_not_in_a_pipe(run_dir):
    """Issue 24: `anexa generate` without a prompt, on a terminal, waited for stdin without a word."""
    import pty
    import select

    args = [sys.executable, "-m", "anexa_cli", "generate", "--model", str(run_dir), "-n", "5", "-s", "greedy"]
    master, terminal = pty.openpty()
    process = subprocess.Popen(args, stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(terminal)
    said = b""
    try:
        while b"Ctrl-D" not in said and select.select([process.stderr], [], [], 120)[0]:
            chunk = os.read(process.stderr.fileno(), 4096)
            if not chunk:
                break
            said += chunk
        assert said.decode().startswith("reading the prompt from the terminal"), said
        os.write(master, b"Watson\n\x04")  # a line, then Ctrl-D on the next
        out, err = process.communicate(timeout=120)
    finally:
        process.kill()
        os.close(master)
    assert process.returncode == 0, err
    piped = runner.invoke(app, args[3:], input="Watson\n")
    assert out.decode() == piped.stdout and "reading the prompt" not in piped.stderr


def checkpoint_parameters(run):
    from anexa_core.io import checkpoint

    return checkpoint.load_model(run)[0].num_parameters()


def test_a_runs_default_name_says_what_it_is(sherlock_path, tmp_path, monkeypatch):
    """Issue 24: a `--blocks llama --optimizer muon` run was named sherlock-seed-2. A folder holding someone
    else's model (a Hugging Face folder) or the user's files is passed over like a run."""
    import safetensors.torch
    import torch

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "sherlock-seed-2").mkdir(parents=True)
    safetensors.torch.save_file({"w": torch.ones(1)}, tmp_path / "runs" / "sherlock-seed-2" / "model.safetensors")
    (tmp_path / "runs" / "sherlock-seed-3").mkdir()
    (tmp_path / "runs" / "sherlock-seed-3" / "notes.txt").write_text("mine")
    args = ["train", "--data", str(sherlock_path), *TINY_FLAGS, "--steps", "1", "--eval-every", "1", "--device", "cpu"]
    for flags, name in [
        ([], "sherlock-seed"),
        (["--blocks", "llama", "--optimizer", "muon"], "sherlock-seed-llama-muon"),
        (["--preset", "fast"], "sherlock-fast"),
        (["--preset", "fast", "--blocks", "gpt2", "--optimizer", "adamw"], "sherlock-fast-gpt2-adamw"),
        (["--tokenizer", "bpe", "--vocab-size", "300"], "sherlock-seed-bpe"),
        ([], "sherlock-seed-4"),
    ]:
        result = runner.invoke(app, [*args, *flags])
        assert result.exit_code == 0, result.output
        assert (tmp_path / "runs" / name / "model.safetensors").is_file(), sorted(
            p.name for p in (tmp_path / "runs").iterdir()
        )


def test_the_header_counts_parameters_without_rounding_them_away():
    from anexa_cli.console import count

    assert (count(4_864), count(99_999), count(820_992), count(10_651_008)) == ("4,864", "99,999", "0.82M", "10.65M")


def test_runs_lists_the_runs_newest_first_like_ollama_list(run_dir, tmp_path):
    """Issue 24: `anexa runs` — architecture, parameters, steps, best validation loss, size, date; --json."""
    import shutil
    import time

    from anexa_core.io import checkpoint

    folder = tmp_path / "runs"
    shutil.copytree(run_dir, folder / "older")
    shutil.copytree(run_dir, folder / "newer")
    (folder / "notes").mkdir()  # not a run: not listed
    (folder / "broken").mkdir()
    (folder / "broken" / "model.safetensors").write_bytes(b"\x00" * 4)
    now = time.time()
    os.utime(folder / "older" / "model.safetensors", (now - 3 * 86400, now - 3 * 86400))
    listed = runner.invoke(app, ["runs", str(folder), "--json"])
    assert listed.exit_code == 0, listed.output
    report = json.loads(listed.stdout)
    assert [run["name"] for run in report["runs"]] == ["newer", "older"]
    assert [Path(entry["path"]).name for entry in report["unreadable"]] == ["broken"]
    run = report["runs"][0]
    meta = checkpoint.read_metadata(run_dir / "model.safetensors")
    best = checkpoint.read_metadata(run_dir / "best.safetensors")
    assert run["step"] == meta["step"] and run["best_val_loss"] == best["val_loss"] and run["best_step"] == best["step"]
    assert run["parameters"] == checkpoint_parameters(run_dir)
    assert run["size_bytes"] == sum(p.stat().st_size for p in run_dir.iterdir())
    assert run["architecture"] == f"gpt2 1×32 · char {meta['model_config']['vocab_size']}"
    table = runner.invoke(app, ["runs", str(folder)])
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "NAME",
        "ARCHITECTURE",
        "PARAMETERS",
        "STEPS",
        "BEST",
        "VAL",
        "LOSS",
        "SIZE",
        "MODIFIED",
    ]
    assert lines[1].startswith("newer") and lines[1].endswith("just now") and lines[2].endswith("3 days ago")
    assert f"{run['best_val_loss']:.4f} @ {run['best_step']}" in lines[1] and "skipped" in table.stderr
    (tmp_path / "empty").mkdir()
    empty = runner.invoke(app, ["runs", str(tmp_path / "empty")])
    assert empty.exit_code == 0 and empty.stdout == "" and "no runs under" in empty.stderr


def test_runs_of_a_folder_that_is_not_there_is_an_error_unless_it_is_the_default(tmp_path, monkeypatch):
    """The newcomer's report: `anexa runs /nonexistent/dir` said "no runs under …" and exited 0. The default
    ./runs before a first run has no runs (exit 0); a folder named on the command line must exist."""
    monkeypatch.chdir(tmp_path)
    first = runner.invoke(app, ["runs"])
    assert first.exit_code == 0 and first.stderr == "no runs under runs/: train one with `anexa train`\n"
    (tmp_path / "a-file").write_text("x")
    for given, what in (("missing", "does not exist"), ("a-file", "is not a folder")):
        result = runner.invoke(app, ["runs", given])
        assert result.exit_code == 2 and result.stdout == ""
        assert result.stderr == f"error: {given} {what}: pass the folder that holds your run folders\n"
