"""The version changes whenever what Anexa writes or promises to plugins changes.

A checkpoint written by one version must mean the same to every later reader of that version, and a
plugin written against one version's contract must keep working until the version changes. So each
version records the checkpoint format, the token cache's formats and a fingerprint of the plugin
contract (hook names and arguments, the interfaces' members, the plugin kinds); changing any of them
without a new version (and a CHANGELOG entry) fails here.
"""

import hashlib
import importlib.metadata
import inspect
import json
import re

from helpers import REPO

from anexa_core import hookspecs, interfaces
from anexa_core.kinds import KINDS

RELEASED = {
    # version: checkpoint format, token cache formats, plugin contract fingerprint
    "0.2.0": {
        "checkpoint": "anexa/2",
        "tokens": "anexa-tokens/1",
        "tokenizer_cache": "anexa-tokenizer-cache/1",
        "contract": "36dabbc958356f4c",
    },
    "0.3.0": {
        "checkpoint": "anexa/2",
        "tokens": "anexa-tokens/1",
        "tokenizer_cache": "anexa-tokenizer-cache/1",
        "contract": "22972e76b308b2d1",
    },
    "0.4.0": {
        "checkpoint": "anexa/2",
        "tokens": "anexa-tokens/1",
        "tokenizer_cache": "anexa-tokenizer-cache/1",
        "contract": "dbacfd4a93b9e850",
    },
    "0.5.0": {
        "checkpoint": "anexa/2",
        "tokens": "anexa-tokens/1",
        "tokenizer_cache": "anexa-tokenizer-cache/1",
        "contract": "32e631cf76813232",
    },
    "0.6.0": {
        "checkpoint": "anexa/2",
        "tokens": "anexa-tokens/1",
        "tokenizer_cache": "anexa-tokenizer-cache/1",
        "contract": "2875ccf39eba08cf",
    },
}


def contract_fingerprint() -> str:
    """SHA-256 (first 16 hex digits) of the hook specs' names and arguments, each interface's public
    members with their signatures, the optional members each kind may offer, and the table of kinds."""
    hooks = {
        name: list(inspect.signature(fn).parameters)
        for name, fn in vars(hookspecs).items()
        if name.startswith("register_")
    }
    protocols = {}
    for name in ("Tokenizer", "Attention", "Sampler", "Blocks", "Dataset", "Optimizer"):
        protocol = getattr(interfaces, name)
        members = {}
        own = set(inspect.get_annotations(protocol)) | set(protocol.__dict__)
        for member in sorted(name for name in own if not name.startswith("_") or name == "__call__"):
            value = protocol.__dict__.get(member)
            members[member] = str(inspect.signature(value)) if callable(value) else "attribute"
        protocols[name] = members
    kinds = {kind.name: [kind.hook, kind.singular, kind.setting, kind.config] for kind in KINDS.values()}
    optional = {name: list(members) for name, members in interfaces.OPTIONAL_MEMBERS.items()}
    text = json.dumps({"hooks": hooks, "protocols": protocols, "optional": optional, "kinds": kinds}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def current() -> dict:
    from anexa_core.data import tokens
    from anexa_core.io import checkpoint

    return {
        "checkpoint": checkpoint.FORMAT,
        "tokens": tokens.FORMAT,
        "tokenizer_cache": tokens.TOKENIZER_FORMAT,
        "contract": contract_fingerprint(),
    }


def test_formats_and_the_plugin_contract_change_only_with_the_version():
    version = importlib.metadata.version("anexa")
    assert version in RELEASED, (
        f"anexa {version} has no entry in RELEASED: add one with {current()} (and a CHANGELOG section)"
    )
    assert RELEASED[version] == current(), (
        f"anexa {version} recorded {RELEASED[version]}, but the code now has {current()}: a checkpoint or "
        "token-cache format or the plugin contract changed; bump the version in pyproject.toml, add a "
        "CHANGELOG section saying how to migrate, and a RELEASED entry"
    )


def test_every_version_has_a_changelog_section_and_anexa_version_prints_it():
    version = importlib.metadata.version("anexa")
    changelog = (REPO / "CHANGELOG.md").read_text(encoding="utf-8")
    assert re.search(rf"^## \[{re.escape(version)}\] - \d{{4}}-\d\d-\d\d$", changelog, re.M), version
    from typer.testing import CliRunner

    from anexa_cli.main import app

    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout.strip() == f"anexa {version}"
