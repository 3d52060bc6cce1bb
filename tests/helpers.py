"""Small builders shared by tests."""

import contextlib
import dataclasses
import os
import threading
import time
from pathlib import Path

import torch

from anexa_core import hookimpl
from anexa_core.config import ModelConfig
from anexa_core.model.gpt import build_model
from anexa_core.train.loop import SilentReporter

REPO = Path(__file__).resolve().parent.parent


def strict() -> bool:
    """Whether a missing test dependency (the SmolLM2 fixture, transformers, an example plugin's
    distribution) fails the run instead of skipping it: in CI — the runner's ``CI``, or
    ``ANEXA_STRICT_TESTS=1``, which ``.ci/run`` sets so that a skipped pretrained-model test cannot pass
    for green there."""
    return bool(os.environ.get("CI")) or os.environ.get("ANEXA_STRICT_TESTS") == "1"


PACKAGES = {
    "anexa_core": REPO / "anexa_core",
    "anexa_plugins": REPO / "plugins" / "anexa_plugins",
    "anexa_kernels": REPO / "kernels" / "anexa_kernels",
    "anexa_cli": REPO / "cli" / "anexa_cli",
    "anexa_serve": REPO / "serve" / "anexa_serve",
}
"""Each import name and its folder: every top-level folder holds its package under the import name."""


def source_files(package: str) -> list[Path]:
    """The ``.py`` files of one of Anexa's packages (see :data:`PACKAGES`)."""
    return sorted(PACKAGES[package].rglob("*.py"))


TINY = ModelConfig(vocab_size=37, n_layer=2, n_head=2, n_embd=32, block_size=16)

TINY_MODEL_FLAGS = ["--n-layer", "1", "--n-head", "2", "--n-embd", "32", "--block-size", "32"]
"""``anexa train`` flags of the tests' smallest trained model (one layer, width 32, context 32)."""
TINY_FLAGS = [*TINY_MODEL_FLAGS, "--batch-size", "8"]
""":data:`TINY_MODEL_FLAGS` with batches of 8: what most CLI tests train with."""


def train_tiny_through_cli(data: Path, out: Path) -> Path:
    """``out``, where the CLI itself (``anexa train``, in process) trained the tiny model on ``data`` for 30
    steps, evaluating at step 15: the run most CLI and server tests read."""
    from typer.testing import CliRunner

    from anexa_cli.main import app

    args = ["train", "--data", str(data), *TINY_FLAGS, "--steps", "30", "--eval-every", "15"]
    result = CliRunner().invoke(app, [*args, "--out", str(out), "--device", "cpu"])
    assert result.exit_code == 0, result.output
    return out


def tiny_model(seed: int = 0, **changes) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(dataclasses.replace(TINY, **changes)).eval()


def attention(name: str, **options):
    """An attention plugin's callable, created with ``options``."""
    from anexa_core import plugins

    return plugins.create("attention", name, options)[0]


def trained_tokenizer(name: str, text: str, **options):
    """A tokenizer plugin created with ``options`` and trained on ``text``."""
    from anexa_core import plugins

    tokenizer, _ = plugins.create("tokenizers", name, options)
    tokenizer.train([text])
    return tokenizer


def loaded_tokenizer(name: str, state, **options):
    """A tokenizer plugin restored from ``state`` (what ``state_dict`` returned)."""
    from anexa_core import plugins

    tokenizer, _ = plugins.create("tokenizers", name, options)
    tokenizer.load_state_dict(state)
    return tokenizer


class Greedy:
    """A minimal chain: argmax, so generation is deterministic without the sampler plugins."""

    def pick(self, logits, context, generator=None):
        return logits.argmax(dim=-1, keepdim=True)


def require_distribution(name: str, folder: str) -> None:
    """Skip when a plugin distribution the set-up command installs is missing; in CI, fail instead."""
    import importlib.metadata

    import pytest

    try:
        importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        message = f"{name} is not installed: .venv/bin/pip install {folder}"
        if strict():
            pytest.fail(message)
        pytest.skip(message)


def user_error(args, match: str) -> str:
    """Run the CLI with ``args``: exit code 2 and exactly one line on stderr, starting ``error:`` and
    naming the problem (``match``); never a traceback. Returns the line."""
    from typer.testing import CliRunner

    from anexa_cli.main import app

    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    return lines[0]


@contextlib.contextmanager
def registered(plugin, name: str):
    """``plugin`` (an object with ``@hookimpl`` methods) registered on the live plugin manager for the
    ``with`` block only."""
    from anexa_core import plugins

    manager = plugins.plugin_manager()
    manager.register(plugin, name=name)
    try:
        yield plugin
    finally:
        manager.unregister(plugin)


@dataclasses.dataclass
class Scaled:
    """Attention ``scaled``: exact attention of ``factor``·q — an attention with an option that changes
    the output, to see options travel."""

    factor: float = 1.0

    def __call__(self, q, k, v, *, causal):
        from anexa_core.testing import reference_attention

        return reference_attention(q * self.factor, k, v, causal=causal).to(q.dtype)


class ScaledPlugin:
    """Registers :class:`Scaled` (use with :func:`registered`)."""

    @hookimpl
    def register_attention(self, register):
        register("scaled", Scaled)


@contextlib.contextmanager
def running(app):
    """Serve the FastAPI ``app`` with uvicorn in a thread on a free loopback port; yields the base URL
    (``http://127.0.0.1:PORT``) and on exit stops the server and closes the app's engines."""
    from anexa_serve.server import listen, uvicorn_server  # the serve extra: only tests that serve need it

    sock = listen("127.0.0.1", 0)
    server = uvicorn_server(app, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        app.state.server.close()


def gguf_folder(gguf_file: Path, folder: Path) -> Path:
    """A folder holding ``gguf_file`` (a link), as ``from_pretrained(folder, gguf_file=name)`` wants."""
    import shutil

    folder.mkdir(parents=True, exist_ok=True)
    link = folder / gguf_file.name
    if not link.exists():
        try:
            link.symlink_to(gguf_file.resolve())
        except OSError:
            shutil.copyfile(gguf_file, link)
    return folder


def transformers_model(folder: Path, name: str) -> torch.nn.Module:
    """transformers' causal LM of the GGUF file ``name`` in ``folder``, float32, in eval mode.

    The file goes by its absolute path: given a bare name, transformers 5.25's ``from_pretrained`` reads the
    weights of a file of that name in the current directory when there is one (a newcomer's ``anexa export
    … lora.gguf`` in the repository root failed two tests), and the config from ``folder``."""
    import transformers

    path = str((Path(folder) / name).resolve())
    return transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=path, dtype=torch.float32).eval()


def transformers_tokenizer(folder: Path, name: str):
    """transformers' tokenizer of the GGUF file ``name`` in ``folder`` (by its absolute path, as above)."""
    import transformers

    return transformers.AutoTokenizer.from_pretrained(folder, gguf_file=str((Path(folder) / name).resolve()))


class Watching(SilentReporter):
    """Records what the training loop tells a reporter (``anexa_core.train.loop.Reporter``)."""

    def __init__(self):
        self.phases, self.started, self.steps, self.evaluations, self.finished = set(), [], [], [], 0

    def data_progress(self, phase, done, total):
        self.phases.add(phase)

    def start(self, total_steps, first_step, info):
        self.started.append((total_steps, first_step, info))

    def step(self, step, loss, tokens_per_s):
        self.steps.append(step)
        self.rates = [*getattr(self, "rates", []), tokens_per_s]

    def evaluated(self, metrics):
        self.evaluations.append(metrics["step"])

    def finish(self):
        self.finished += 1


def assert_error(response, status, param=None, code=None):
    """``response`` (an ``httpx`` response from ``anexa serve``) is the refusal asked for: that status, a JSON body
    in OpenAI's shape ``{"error": {"message", "type", "param", "code"}}`` with no traceback, and — when given —
    that ``param`` and ``code``. Returns the error object."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error
