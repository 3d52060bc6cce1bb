"""The plugin contract: every built-in passes the conformance kit, lookups fail helpfully, and real
distributions — pip-installed by these tests into a temporary folder, never into the environment — are
discovered, configured, stored in checkpoints, clash, break and get disabled as documented."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY, TINY_MODEL_FLAGS, source_files

from anexa_core import hookimpl, interfaces, plugins, testing
from anexa_core.errors import AnexaError

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures"
BUILTINS = {
    "tokenizers": {"char", "bpe"},
    "attention": {"math", "sdpa", "triton"},
    "samplers": {"temperature", "top_p", "min_p", "repetition_penalty", "greedy"},
    "blocks": {"gpt2", "llama"},
    "datasets": {"sherlock", "tinyshakespeare"},
    "optimizers": {"adamw"},
}
TINY_TRAIN = [
    *TINY_MODEL_FLAGS,
    "--batch-size",
    "4",
    "--steps",
    "4",
    "--eval-every",
    "4",
    "--device",
    "cpu",
]


# --- the built-ins --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_builtins_are_registered_by_the_anexa_distribution(kind):
    entries = plugins.registered(kind)
    assert BUILTINS[kind] <= set(entries)
    for name in BUILTINS[kind]:
        assert entries[name].distribution == "anexa"


CONFORMANCE = [(kind, name) for kind in sorted(BUILTINS) for name in sorted(BUILTINS[kind]) if kind != "tokenizers"]


@pytest.mark.parametrize("kind,name", CONFORMANCE)
def test_builtins_pass_the_conformance_kit(kind, name):
    if kind == "datasets" and name == "tinyshakespeare":
        pytest.skip("downloads; its RemoteText is tested against a local server in test_data.py")
    factory = plugins.get(kind, name)
    testing.CHECKS[kind](factory)
    built, _ = plugins.create(kind, name)
    protocol = {
        "attention": interfaces.Attention,
        "blocks": interfaces.Blocks,
        "samplers": interfaces.Sampler,
        "datasets": interfaces.Dataset,
        "optimizers": interfaces.Optimizer,
    }[kind]
    assert isinstance(built, protocol)


@pytest.mark.parametrize("name,options", [("char", {}), ("bpe", {"vocab_size": 400})])
def test_builtin_tokenizers_pass_the_conformance_kit(name, options, sherlock_path):
    text = sherlock_path.read_text(encoding="utf-8")[:60_000]
    if name == "bpe":
        text += "\nnaïve café — 😀 中文テキスト\n"  # multi-byte characters split across byte tokens
    testing.check_tokenizer(plugins.get("tokenizers", name), text, **options)
    assert isinstance(plugins.create("tokenizers", name, options)[0], interfaces.Tokenizer)


@pytest.mark.parametrize(
    "options",
    [
        {"mlp": "relu2", "qk_norm": True},
        {"mlp": "gelu", "n_kv_head": 1, "zero_init": True},
        {"rope_theta": 500000.0, "mlp_hidden": 48},
    ],
)
def test_llama_passes_the_kit_with_each_architectural_choice(options):
    testing.check_blocks(plugins.get("blocks", "llama"), **options)


def test_llama_options_are_validated():
    with pytest.raises(AnexaError, match="blocks llama option mlp must be one of swiglu, relu2, gelu, got 'tanh'"):
        plugins.create("blocks", "llama", {"mlp": "tanh"})
    family, _ = plugins.create("blocks", "llama", {"n_kv_head": "3"})
    with pytest.raises(AnexaError, match=r"n_head \(4\) must be a multiple of llama n_kv_head \(3\)"):
        family.build(dataclasses.replace(TINY, n_head=4, n_embd=32), None)


def test_the_kit_catches_a_broken_plugin_of_each_kind():
    class NotCausal:
        def __call__(self, q, k, v, *, causal):
            return testing.reference_attention(q, k, v, causal=False).to(q.dtype)

    with pytest.raises(AssertionError, match="causal=True: max error"):
        testing.check_attention(NotCausal)

    class SeesTheFuture:
        def build(self, config, attention):
            return _FutureStack(config)

    with pytest.raises(AssertionError, match="earlier positions see a later token"):
        testing.check_blocks(SeesTheFuture)

    from dataclasses import dataclass
    from typing import ClassVar

    @dataclass
    class Overflows:
        order: ClassVar[int] = 15

        def __call__(self, logits, context):
            return logits * 1e38

    with pytest.raises(AssertionError, match=r"\+inf"):
        testing.check_sampler(Overflows)

    @dataclass
    class OrderIsAnOption:  # a plugin author's report: the docs warn against this, the kit passed it
        order: int = 60

        def __call__(self, logits, context):
            return logits

    with pytest.raises(AssertionError, match="`order` is an option here"):
        testing.check_sampler(OrderIsAnOption)

    class SplitsCharacters:  # one token per UTF-8 byte, no token_bytes: the server's logprobs would be U+FFFD
        vocab_size = 256

        def train(self, texts):
            pass

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode(errors="replace")

        def state_dict(self):
            return {}

        def load_state_dict(self, state):
            pass

    with pytest.raises(AssertionError, match="tokens that split a character need token_bytes"):
        testing.check_tokenizer(SplitsCharacters, "naïve café 😀\n" * 20)
    SplitsCharacters.token_bytes = lambda self, token_id: bytes([token_id])
    testing.check_tokenizer(SplitsCharacters, "naïve café 😀\n" * 20)
    SplitsCharacters.token_bytes = lambda self, token_id: bytes([token_id, token_id])
    with pytest.raises(AssertionError, match="token_bytes is wrong"):
        testing.check_tokenizer(SplitsCharacters, "naïve café 😀\n" * 20)


def test_a_kind_that_does_not_exist_is_one_line_naming_the_kinds():
    with pytest.raises(AnexaError) as error:
        plugins.create("sampler", "top_k")
    kinds = "tokenizers, attention, samplers, blocks, datasets, optimizers"
    assert str(error.value) == f"no plugin kind 'sampler': did you mean 'samplers'? choose one of {kinds}"


class _FutureStack(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.mix = torch.nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, positions, cache=None):
        return self.mix(x + x.mean(dim=1, keepdim=True))  # every position sees the whole sequence


def test_public_namespace_is_all_a_plugin_needs():
    import anexa_core

    for name in (
        "hookimpl",
        "AnexaError",
        "Tokenizer",
        "Attention",
        "Sampler",
        "Blocks",
        "Dataset",
        "Optimizer",
        "KVCache",
        "ModelConfig",
        "RemoteText",
        "LocalText",
    ):
        assert name in anexa_core.__all__ and getattr(anexa_core, name) is not None


def test_builtin_plugins_import_only_the_public_anexa_namespace():
    """Built-ins are written like third-party plugins: `from anexa_core import …`, nothing deeper."""
    paths = sorted(source_files("anexa_plugins"))
    assert len(paths) > 10
    for path in paths:
        for line in path.read_text(encoding="utf-8").splitlines():
            stripped = line.strip()
            if stripped.startswith(("import anexa", "from anexa")):
                module = stripped.split()[1]
                # anexa_core's public names, the kernels, and modules of the plugins' own distribution
                own = module.startswith("anexa_plugins.")
                assert module in ("anexa_core", "anexa_kernels") or own, f"{path.name}: {stripped}"


def test_core_imports_no_concrete_plugin_and_kernels_import_nothing_from_anexa():
    for package, banned in (
        ("anexa_core", ("anexa_plugins", "anexa_cli", "anexa_serve")),
        ("anexa_kernels", ("anexa_core", "anexa_plugins", "anexa_cli", "anexa_serve")),
    ):
        paths = source_files(package)
        assert paths
        for path in paths:
            text = path.read_text(encoding="utf-8")
            for name in banned:
                assert f"import {name}" not in text and f"from {name}" not in text, f"{path} imports {name}"


# --- lookups, options and clashes in-process -------------------------------------------------------


def test_unknown_name_lists_the_choices():
    with pytest.raises(AnexaError, match=r"unknown attention 'flash9': choose one of .*math.*sdpa"):
        plugins.get("attention", "flash9")


def test_options_are_typed_validated_and_all_recorded():
    _, resolved = plugins.create("optimizers", "adamw", {"weight_decay": "0.05"})
    assert resolved == {"weight_decay": 0.05, "beta1": 0.9, "beta2": 0.99, "eps": 1e-8}
    with pytest.raises(AnexaError, match="optimizer adamw option beta1 must be a finite number, got 'nan'"):
        plugins.create("optimizers", "adamw", {"beta1": "nan"})
    with pytest.raises(AnexaError, match=r"adamw beta1 and beta2 must be in \[0, 1\)"):
        plugins.create("optimizers", "adamw", {"beta1": 1.5})
    with pytest.raises(AnexaError, match="optimizer adamw has no option 'momentum': choose one of weight_decay"):
        plugins.create("optimizers", "adamw", {"momentum": 0.9})


def test_a_clash_is_reported_only_when_the_name_is_used(register_plugin):
    class Impostor:
        @hookimpl
        def register_attention(self, register):
            register("sdpa", lambda: None)

    register_plugin(Impostor(), "impostor")
    with pytest.raises(
        AnexaError,
        match=r"attention 'sdpa' is registered by anexa .*\(plugin sdpa\) and plugin "
        r"impostor: disable one, e.g. ANEXA_DISABLE_PLUGINS=impostor",
    ):
        plugins.get("attention", "sdpa")
    assert plugins.get("attention", "math") is not None  # unrelated names still work
    (clash,) = [c for c in plugins.conflicts() if c["name"] == "sdpa"]
    assert clash["kind"] == "attention" and len(clash["providers"]) == 2


def test_registered_plugin_object_is_listed(register_plugin):
    math_attention = plugins.get("attention", "math")

    class Extra:
        @hookimpl
        def register_attention(self, register):
            register("extra", math_attention)

    register_plugin(Extra(), "extra-plugin")
    listed = {p["name"]: p for p in plugins.describe_plugins()}
    assert listed["extra-plugin"]["registers"] == {"attention": ["extra"]}


def test_dataset_plugins_take_options_too(register_plugin, tmp_path):
    from dataclasses import dataclass

    from anexa_core import LocalText
    from anexa_core.config import resolve
    from anexa_core.data.corpus import resolve_corpus

    @dataclass
    class Echo:
        times: int = 1

        def files(self):
            path = tmp_path / f"echo-{self.times}.txt"
            path.write_text("echo\n" * self.times, encoding="utf-8")
            return LocalText(path).files()

        description = "a line, repeated"

    class EchoPlugin:
        @hookimpl
        def register_datasets(self, register):
            register("echo", Echo)

    register_plugin(EchoPlugin(), "echo-plugin")
    _, config = resolve("seed", overrides={"data": "echo"}, plugin_options={"data": {"times": "3"}})
    assert config.data_options == {"times": "3"}
    corpus = resolve_corpus("echo", options=config.data_options)
    assert corpus.files[0].read_text() == "echo\n" * 3
    with pytest.raises(AnexaError, match="dataset echo option times must be an integer"):
        resolve_corpus("echo", options={"times": "many"})
    with pytest.raises(AnexaError, match="--data names no dataset"):
        resolve_corpus(str(corpus.files[0]), options={"times": "2"})


def test_blocks_build_with_the_public_cache_api():
    family, _ = plugins.create("blocks", "gpt2")
    stack = family.build(TINY, plugins.create("attention", "math")[0])
    out = stack(torch.randn(2, 9, TINY.n_embd), torch.arange(9), None)
    assert out.shape == (2, 9, TINY.n_embd)


# --- real distributions, installed into a temporary folder ------------------------------------------


@pytest.fixture(scope="session")
def fixture_site(tmp_path_factory):
    """The fixture distributions under tests/fixtures, pip-installed into a temporary folder (copied first,
    so the build leaves nothing in the repository)."""
    sources = tmp_path_factory.mktemp("fixture-sources")
    folders = []
    for folder in sorted(FIXTURES.glob("anexa-*")):
        target = sources / folder.name
        shutil.copytree(folder, target, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
        folders.append(str(target))
    site = tmp_path_factory.mktemp("site")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            *folders,
        ],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    return site


def run(site, *args, load=None, disable=None, cwd=None, python=False):
    """``anexa ARGS`` (or ``python -c ARGS[0]``) in a fresh process that sees the fixture distributions."""
    env = {k: v for k, v in os.environ.items() if k not in ("ANEXA_LOAD_PLUGINS", "ANEXA_DISABLE_PLUGINS")}
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    if load is not None:
        env["ANEXA_LOAD_PLUGINS"] = load
    if disable is not None:
        env["ANEXA_DISABLE_PLUGINS"] = disable
    command = [sys.executable, "-c", args[0]] if python else [sys.executable, "-m", "anexa_cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cwd, check=False, timeout=300)


def listing(site, **kwargs):
    done = run(site, "plugins", "--json", **kwargs)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    return {p["name"]: p for p in data["plugins"]}, data["conflicts"], done.stderr


def test_installed_distributions_are_discovered_with_their_options(fixture_site):
    listed, _, _ = listing(fixture_site, load="anexa-hello,anexa-bytes,anexa-tinyblocks")
    assert listed["hello"]["distribution"] == "anexa-hello" and listed["hello"]["version"] == "0.3.1"
    assert listed["hello"]["registers"] == {"attention": ["hello"]}
    assert listed["hello"]["options"]["attention"]["hello"][0] == {
        "name": "chunk",
        "type": "int",
        "default": 0,
        "help": "",
    }
    assert listed["bytes"]["options"]["tokenizers"]["bytes"][0]["name"] == "lowercase"
    assert listed["tiny"]["registers"] == {"blocks": ["tiny"]}


def test_installed_plugins_pass_the_kit(fixture_site):
    code = (
        "from anexa_core import plugins, testing\n"
        "testing.check_attention(plugins.get('attention', 'hello'), chunk=2)\n"
        "testing.check_blocks(plugins.get('blocks', 'tiny'), mlp_ratio=3)\n"
        "testing.check_tokenizer(plugins.get('tokenizers', 'bytes'), 'Café au lait 😀\\nline two\\n' * 50)\n"
        "print('conform')\n"
    )
    done = run(fixture_site, code, python=True, load="anexa-hello,anexa-tinyblocks,anexa-bytes")
    assert done.returncode == 0 and done.stdout.strip() == "conform", done.stderr


def test_options_travel_with_the_weights_into_generate_and_resume(fixture_site, sherlock_path, tmp_path):
    load = "anexa-hello,anexa-bytes,anexa-tinyblocks"
    out = tmp_path / "run"
    trained = run(
        fixture_site,
        "train",
        "--data",
        str(sherlock_path),
        *TINY_TRAIN,
        "--out",
        str(out),
        "--attention",
        "hello",
        "-o",
        "attention.chunk=3",
        "--tokenizer",
        "bytes",
        "-o",
        "tokenizer.lowercase=true",
        "--blocks",
        "tiny",
        "-o",
        "blocks.mlp_ratio=3",
        load=load,
    )
    assert trained.returncode == 0, trained.stderr
    meta = json.loads(
        run(
            fixture_site,
            "import json; from anexa_core.io import checkpoint; "
            f"print(json.dumps(checkpoint.read_metadata({str(out)!r})))",
            python=True,
            load=load,
        ).stdout
    )
    assert meta["plugins"]["attention"] == {
        "name": "hello",
        "options": {"chunk": 3},
        "distribution": "anexa-hello",
        "version": "0.3.1",
    }
    assert meta["plugins"]["blocks"]["options"] == {"mlp_ratio": 3}
    assert meta["tokenizer"] == {"name": "bytes", "options": {"lowercase": True}, "state": {"type": "bytes"}}
    generated = run(fixture_site, "generate", "HOLMES", "--model", str(out), "-n", "5", "--seed", "0", load=load)
    assert generated.returncode == 0, generated.stderr
    resumed = run(fixture_site, "train", "--resume", str(out), "--steps", "6", load=load)
    assert resumed.returncode == 0, resumed.stderr
    again = run(
        fixture_site,
        "import json; from anexa_core.io import checkpoint; "
        f"print(json.dumps(checkpoint.read_metadata({str(out / 'model.safetensors')!r})))",
        python=True,
        load=load,
    )
    resumed_meta = json.loads(again.stdout)
    assert resumed_meta["step"] == 6 and resumed_meta["plugins"] == meta["plugins"]
    # Without the distributions, the checkpoint names what to install; installed but left out, it says so.
    missing = run(None, "generate", "x", "--model", str(out))
    assert missing.returncode == 2
    assert missing.stderr.strip() == (
        "error: this model needs blocks 'tiny' from anexa-tinyblocks 0.1.0: pip install anexa-tinyblocks"
    )
    left_out = run(fixture_site, "generate", "x", "--model", str(out), load="anexa-bytes,anexa-tinyblocks")
    assert left_out.returncode == 2
    assert left_out.stderr.strip() == (
        "error: this model needs attention 'hello' from anexa-hello 0.3.1, which is "
        "installed but not loaded: add it to ANEXA_LOAD_PLUGINS or unset it"
    )


def test_a_clash_never_bricks_unrelated_commands_and_names_both_distributions(fixture_site, sherlock_path, tmp_path):
    listed, conflicts, _ = listing(fixture_site, load="anexa-clash")
    assert listed["clash"]["registers"] == {"attention": ["sdpa"]}
    assert conflicts == [
        {
            "kind": "attention",
            "name": "sdpa",
            "providers": [f"anexa {listed['sdpa']['version']} (plugin sdpa)", "anexa-clash 1.0.0 (plugin clash)"],
        }
    ]
    table = run(fixture_site, "plugins", load="anexa-clash")
    assert table.returncode == 0 and "conflict: attention 'sdpa' is registered by" in table.stdout
    works = run(
        fixture_site,
        "train",
        "--data",
        str(sherlock_path),
        *TINY_TRAIN,
        "--attention",
        "math",
        "--out",
        str(tmp_path / "math"),
        load="anexa-clash",
    )
    assert works.returncode == 0, works.stderr
    used = run(
        fixture_site,
        "train",
        "--data",
        str(sherlock_path),
        *TINY_TRAIN,
        "--out",
        str(tmp_path / "x"),
        load="anexa-clash",
    )
    assert used.returncode == 2 and used.stderr.count("\n") == 1
    assert "attention 'sdpa' is registered by anexa" in used.stderr and "anexa-clash 1.0.0" in used.stderr


def test_disabling_a_builtin_lets_a_third_party_plugin_take_its_name(fixture_site):
    listed, conflicts, _ = listing(fixture_site, load="anexa-clash", disable="sdpa")
    assert conflicts == [] and listed["sdpa"]["status"] == "disabled"
    owner = run(
        fixture_site,
        "from anexa_core import plugins; print(plugins.lookup('attention', 'sdpa').owner())",
        python=True,
        load="anexa-clash",
        disable="sdpa",
    )
    assert owner.stdout.strip() == "anexa-clash 1.0.0 (plugin clash)", owner.stderr
    flag = run(fixture_site, "--disable-plugin", "clash", "plugins", "--json", load="anexa-clash")
    assert json.loads(flag.stdout)["conflicts"] == []


def test_a_broken_plugin_is_warned_about_listed_with_its_error_and_its_traceback_on_v(fixture_site):
    listed, _, stderr = listing(fixture_site, load="anexa-broken")
    assert "plugin broken from anexa-broken 9.9 failed to load and was skipped: RuntimeError: boom at import" in stderr
    assert listed["broken"]["status"] == "failed" and listed["broken"]["error"] == "RuntimeError: boom at import"
    assert "traceback" not in listed["broken"]
    assert "sdpa" in listed  # the rest loads
    verbose = run(fixture_site, "-v", "plugins", load="anexa-broken")
    assert verbose.returncode == 0 and "Traceback (most recent call last)" in verbose.stdout
    assert 'raise RuntimeError("boom at import")' in verbose.stdout


def test_an_entry_point_named_like_a_builtin_is_warned_about_not_dropped_silently(fixture_site):
    done = run(fixture_site, "plugins", "--json", load="anexa-dupname")
    assert "plugin samplers from anexa-dupname 0.1.0 was not loaded: its plugin name 'samplers' is taken" in done.stderr
    named = [p for p in json.loads(done.stdout)["plugins"] if p["name"] == "samplers"]
    assert [(p["distribution"], p["status"]) for p in named] == [("anexa", "loaded"), ("anexa-dupname", "skipped")]
    done = run(fixture_site, "plugins", "--json", load="anexa-dupname", disable="anexa:samplers")  # the built-in only
    named = [p for p in json.loads(done.stdout)["plugins"] if p["name"] == "samplers"]
    assert [(p["distribution"], p["status"]) for p in named] == [("anexa-dupname", "loaded"), ("anexa", "disabled")]
    assert named[0]["registers"] == {"samplers": ["shout"]}


def test_a_misspelt_hook_or_a_raising_hook_costs_only_that_plugin(fixture_site):
    done = run(fixture_site, "plugins", "--json", load="anexa-faulty")
    assert done.returncode == 0, done.stderr
    listed = {p["name"]: p for p in json.loads(done.stdout)["plugins"]}
    assert listed["typo"]["status"] == "failed" and "register_sampler" in listed["typo"]["error"]
    assert listed["typo"]["error"].endswith(": did you mean register_samplers?")
    assert "plugin typo from anexa-faulty 0.0.1 was not loaded" in done.stderr
    assert (
        "plugin raising (anexa-faulty 0.0.1) failed in register_attention and registers nothing: "
        "RuntimeError: attention registry exploded" in done.stderr
    )
    # A plugin author's report: a hook that raised was listed "loaded" (a CI check on the status passed it).
    assert (listed["raising"]["status"], listed["raising"]["error"]) == (
        "failed",
        "register_attention raised RuntimeError: attention registry exploded",
    )
    assert {"sdpa", "math"} <= set(listed["sdpa"]["registers"]["attention"] + listed["math"]["registers"]["attention"])


def test_a_name_that_matches_no_installed_plugin_is_warned_about(fixture_site):
    """A typo in --disable-plugin or either variable would otherwise be ignored without a word."""
    done = run(
        fixture_site,
        "--disable-plugin",
        "sdpa_typo",
        "plugins",
        "--json",
        load="anexa-hello,hello_typo",
        disable="anexa-clash:nothing",
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "matches no installed plugin" in line]
    assert warned == [
        "anexa: ANEXA_LOAD_PLUGINS names 'hello_typo', which matches no installed plugin or distribution "
        "(see `anexa plugins`)",
        "anexa: ANEXA_DISABLE_PLUGINS or --disable-plugin names 'anexa-clash:nothing', which matches no installed "
        "plugin or distribution (see `anexa plugins`)",
        "anexa: ANEXA_DISABLE_PLUGINS or --disable-plugin names 'sdpa_typo', which matches no installed plugin or "
        "distribution (see `anexa plugins`)",
    ]
    assert json.loads(done.stdout)["plugins"][0]["status"] == "loaded"  # the rest goes on as asked
    quiet = run(fixture_site, "--disable-plugin", "sdpa", "plugins", load="anexa-hello", disable="anexa-clash,top_k")
    assert "matches no installed plugin" not in quiet.stderr


def test_load_plugins_allow_list():
    only_builtins = run(None, "plugins", "--json", load="")
    names = {p["distribution"] for p in json.loads(only_builtins.stdout)["plugins"]}
    assert names == {"anexa"}, only_builtins.stderr
