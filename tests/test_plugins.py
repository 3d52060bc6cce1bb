"""The plugin contract: built-ins conform to their hooks, lookups fail helpfully, entry points are really used."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from helpers import TINY, require_distribution

from anexa_core import hookimpl, interfaces, plugins
from anexa_core.errors import AnexaError

BUILTINS = {
    "tokenizers": {"char", "bpe"},
    "attention": {"math", "sdpa", "triton"},
    "samplers": {"temperature", "top_p", "min_p", "repetition_penalty", "greedy"},
    "blocks": {"gpt2"},
    "datasets": {"sherlock", "tinyshakespeare"},
}


@pytest.fixture
def register_plugin():
    """Register plugin objects on the live manager for one test, then remove them."""
    manager = plugins.plugin_manager()
    added = []

    def register(obj, name):
        manager.register(obj, name=name)
        added.append(obj)

    yield register
    for obj in added:
        manager.unregister(obj)


@pytest.mark.parametrize("kind", sorted(BUILTINS))
def test_builtins_are_registered_by_the_anexa_distribution(kind):
    entries = plugins.registered(kind)
    assert BUILTINS[kind] <= set(entries)
    owners = {p["name"]: p["distribution"] for p in plugins.describe_plugins()}
    for name in BUILTINS[kind]:
        assert owners[entries[name].plugin] == "anexa"


@pytest.mark.parametrize("name", sorted(BUILTINS["tokenizers"]))
def test_tokenizers_conform(name):
    cls = plugins.get("tokenizers", name)
    tokenizer = cls.train("the quick brown fox jumps over the lazy dog " * 50)
    assert isinstance(tokenizer, interfaces.Tokenizer)
    assert cls.from_dict(json.loads(json.dumps(tokenizer.to_dict()))).encode("the fox") == tokenizer.encode("the fox")


@pytest.mark.parametrize("name", sorted(BUILTINS["attention"]))
def test_attention_conforms(name):
    attention = plugins.get("attention", name)
    assert isinstance(attention, interfaces.Attention)
    q, k, v = (torch.randn(1, 2, 5, 16) for _ in range(3))
    reference = plugins.get("attention", "math")(q, k, v, causal=True)
    torch.testing.assert_close(attention(q, k, v, causal=True), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(BUILTINS["samplers"]))
def test_samplers_conform(name):
    sampler = plugins.get("samplers", name)()
    assert isinstance(sampler, interfaces.Sampler) and isinstance(sampler.order, int)
    logits = torch.randn(2, 11)
    out = sampler(logits.clone(), torch.randint(0, 11, (2, 4)))
    assert out.shape == logits.shape
    assert torch.equal(out.argmax(-1), logits.argmax(-1)) or name == "repetition_penalty"


def test_blocks_conform():
    build = plugins.get("blocks", "gpt2")
    assert isinstance(build, interfaces.Blocks)
    stack = build(TINY, plugins.get("attention", "math"))
    assert stack(torch.randn(2, 9, TINY.n_embd)).shape == (2, 9, TINY.n_embd)


@pytest.mark.parametrize("name", sorted(BUILTINS["datasets"]))
def test_datasets_conform(name):
    dataset = plugins.get("datasets", name)
    assert isinstance(dataset, interfaces.Dataset)
    assert dataset.url.startswith("https://") and len(dataset.sha256) == 64


def test_unknown_name_lists_the_choices():
    with pytest.raises(AnexaError, match=r"unknown attention 'flash9': choose one of .*math.*sdpa"):
        plugins.get("attention", "flash9")


def test_name_clash_names_both_plugins(register_plugin):
    class Impostor:
        @hookimpl
        def register_attention(self, register):
            register("sdpa", lambda q, k, v, *, causal: q)

    register_plugin(Impostor(), "impostor")
    with pytest.raises(AnexaError, match=r"'sdpa' is registered by both plugin '(sdpa|impostor)' and plugin '(impostor|sdpa)'"):
        plugins.registered("attention")


def test_registered_plugin_object_is_listed(register_plugin):
    math_attention = plugins.get("attention", "math")

    class Extra:
        @hookimpl
        def register_attention(self, register):
            register("extra", math_attention)

    register_plugin(Extra(), "extra-plugin")
    listed = {p["name"]: p for p in plugins.describe_plugins()}
    assert listed["extra-plugin"]["registers"] == {"attention": ["extra"]}


def _run_python(code, env_extra=None, pythonpath=None):
    env = {**os.environ, **(env_extra or {})}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([str(pythonpath), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False)


LIST_PLUGINS = "import json; from anexa_core.plugins import describe_plugins; print(json.dumps(describe_plugins()))"


def test_installed_distribution_is_discovered_through_its_entry_point():
    """tests/fixtures/anexa-hello is pip-installed by the setup command: found via importlib.metadata."""
    require_distribution("anexa-hello", "./tests/fixtures/anexa-hello")
    result = _run_python(LIST_PLUGINS)
    assert result.returncode == 0, result.stderr
    listed = {p["name"]: p for p in json.loads(result.stdout)}
    assert listed["hello"]["distribution"] == "anexa-hello"
    assert listed["hello"]["version"] == "0.3.1"
    assert listed["hello"]["registers"] == {"attention": ["hello"]}


def test_load_plugins_allow_list():
    only_builtins = _run_python(LIST_PLUGINS, {"ANEXA_LOAD_PLUGINS": ""})
    names = {p["distribution"] for p in json.loads(only_builtins.stdout)}
    assert names == {"anexa"}, only_builtins.stderr


def test_broken_third_party_plugin_is_named_in_a_warning_and_the_rest_loads(tmp_path):
    dist_info = tmp_path / "anexa_broken-9.9.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: anexa-broken\nVersion: 9.9\n")
    (dist_info / "entry_points.txt").write_text("[anexa]\nbroken = anexa_broken_mod\n")
    (tmp_path / "anexa_broken_mod.py").write_text("raise RuntimeError('boom at import')\n")
    code = textwrap.dedent(
        """
        import logging; logging.basicConfig()
        from anexa_core import plugins
        print(sorted(plugins.registered("attention")))
        """
    )
    result = _run_python(code, pythonpath=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "anexa-broken 9.9 failed to load" in result.stderr and "boom at import" in result.stderr
    assert "'sdpa'" in result.stdout
