"""Shared fixtures. Real books from ../shared/data (or $ANEXA_DATA_DIR) when present; made-up text otherwise."""

import os
from pathlib import Path

# The Triton interpreter must be chosen before any @triton.jit runs: on a machine without CUDA the
# kernel tests run the real kernels on CPU tensors through it.
if os.environ.get("ANEXA_TEST_CUDA") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

REPO = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("ANEXA_DATA_DIR", REPO.parent / "shared" / "data"))


def _book(name: str, tmp_path_factory) -> Path:
    path = DATA_DIR / name
    if path.is_file():
        return path
    if os.environ.get("CI"):
        pytest.fail(f"CI must test on the real books, but {path} is missing")
    # A fresh clone without ../shared: a small made-up corpus with the same flavour.
    made = tmp_path_factory.mktemp("data") / name
    sentences = [
        "Sherlock Holmes looked at me with a smile.",
        "\"You have been in Afghanistan, I perceive,\" said he.",
        "The fog rolled down Baker Street, thick and yellow.",
        "Watson, come at once if convenient; if inconvenient, come all the same.",
        "It is a capital mistake to theorize before one has data.",
    ]
    made.write_text("\n".join(sentences[i % len(sentences)] for i in range(4000)) + "\n", encoding="utf-8")
    return made


@pytest.fixture(scope="session")
def sherlock_path(tmp_path_factory) -> Path:
    """The Adventures of Sherlock Holmes, or a stand-in where ../shared is absent."""
    return _book("sherlock.txt", tmp_path_factory)


@pytest.fixture(scope="session")
def shakespeare_path(tmp_path_factory) -> Path:
    """tinyshakespeare, or a stand-in where ../shared is absent."""
    return _book("tinyshakespeare.txt", tmp_path_factory)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """No test touches the user's download cache."""
    monkeypatch.setenv("ANEXA_CACHE", str(tmp_path / "cache"))
