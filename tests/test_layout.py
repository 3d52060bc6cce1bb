"""No folder of the repository shadows an installed distribution.

``python -m pytest`` and any ``python`` started in the repository root put the root first on
``sys.path`` (pytest adds ``tests/`` too), so a folder there that is a package — or a module file — with
the import name of an installed distribution would be imported instead of it. transformers 5.25 needs
the distribution ``kernels``; our ``kernels/`` folder used to be a package and broke it. Every top-level
folder now holds its package under the import name (``kernels/anexa_kernels``), so only ``anexa_*``
names are importable from the root.
"""

import importlib.metadata
import os
import subprocess
import sys

import pytest
from helpers import PACKAGES, REPO, strict

OURS = set(PACKAGES)


def _importable_names(folder):
    """The top-level import names a ``sys.path`` entry ``folder`` offers: packages and modules."""
    names = set()
    for entry in folder.iterdir():
        if entry.is_dir() and (entry / "__init__.py").is_file():
            names.add(entry.name)
        elif entry.suffix == ".py":
            names.add(entry.stem)
    return names


def test_only_anexa_packages_are_importable_from_the_repository_root():
    assert _importable_names(REPO) == {"anexa_core"}
    for name, folder in PACKAGES.items():
        assert folder.name == name and (folder / "__init__.py").is_file()


def test_no_folder_on_the_test_path_holds_the_import_name_of_an_installed_distribution():
    """The root and the folders pytest puts on ``sys.path`` (``tests/``, ``benchmarks/``): none of their
    importable names belongs to a distribution installed here, other than Anexa itself."""
    installed = importlib.metadata.packages_distributions()
    for folder in (REPO, REPO / "tests", REPO / "benchmarks"):
        for name in sorted(_importable_names(folder)):
            others = [d for d in installed.get(name, []) if not d.lower().startswith("anexa")]
            assert not others, f"{folder.name}/{name} shadows the installed distribution {others}"


def test_the_real_kernels_distribution_wins_from_the_repository_root():
    """In a Python started in the root, ``import kernels`` is the installed distribution and transformers'
    models import (they import it)."""
    try:
        importlib.metadata.distribution("kernels")
    except importlib.metadata.PackageNotFoundError:
        message = "the `kernels` distribution is not installed: the dev extra installs it"
        if strict():
            pytest.fail(message)
        pytest.skip(message)
    script = (
        "import kernels, transformers; transformers.GPT2LMHeadModel; transformers.LlamaForCausalLM; "
        "print(kernels.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert not done.stdout.strip().startswith(str(REPO) + os.sep + "kernels"), done.stdout
    assert "site-packages" in done.stdout or "dist-packages" in done.stdout, done.stdout


def test_ci_fails_a_missing_test_dependency_where_elsewhere_it_skips(monkeypatch):
    """`.ci/run` sets ANEXA_STRICT_TESTS=1 (a CI runner may set CI): a missing SmolLM2 fixture or example
    plugin then fails the run; on a laptop, without either, the tests that need it skip."""
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("ANEXA_STRICT_TESTS", raising=False)
    assert not strict()
    monkeypatch.setenv("ANEXA_STRICT_TESTS", "0")
    assert not strict()
    monkeypatch.setenv("ANEXA_STRICT_TESTS", "1")
    assert strict()
    monkeypatch.delenv("ANEXA_STRICT_TESTS")
    monkeypatch.setenv("CI", "true")
    assert strict()
    assert "ANEXA_STRICT_TESTS=1 .venv/bin/python -m pytest" in (REPO / ".ci" / "run").read_text()


def _function_sizes_check(*paths):
    """``tools/function_sizes.py --check`` run as CI would, from the repository root."""
    command = [sys.executable, "tools/function_sizes.py", "--check", *map(str, paths)]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_every_long_or_complex_function_says_why():
    """Issue 20's rule: no function of anexa_core, the CLI or the server above 60 body lines or complexity 15
    without a ``# Why long:`` or ``# Why complex:`` comment giving the reason."""
    done = _function_sizes_check()
    assert done.returncode == 0, done.stdout + done.stderr


def _source(body_lines=0, branches=0, why="", parameters=0):
    """A function whose body (after the docstring) has ``body_lines`` lines, or ``branches`` ifs (complexity
    ``branches + 1``), with ``why`` as its first line and ``parameters`` lines of parameters."""
    lines = ["def f(", *(f"    p{i}: int = {i}," for i in range(parameters)), "    x: int = 0,", ") -> int:"]
    lines += ['    """A docstring, which does not count."""', *([f"    {why}"] if why else [])]
    lines += [f"    if x == {i}:\n        x += 1" for i in range(branches)]
    lines += [f"    x += {i}" for i in range(body_lines - 2 * branches - 1)]
    return "\n".join([*lines, "    return x", ""])


@pytest.mark.parametrize(
    ("source", "flagged"),
    [
        (_source(body_lines=60), False),
        (_source(body_lines=60, parameters=30), False),  # a typer command's options are not its body
        (_source(body_lines=61), True),
        (_source(body_lines=61, why="# Why long: the steps of one recipe, in the order they run"), False),
        (_source(body_lines=61, why="# Why long:"), True),  # a tag without a reason
        (_source(branches=14, body_lines=30), False),
        (_source(branches=15, body_lines=31), True),
        (_source(branches=15, body_lines=31, why="# Why complex: one branch per case of the format"), False),
    ],
)
def test_the_function_size_check_flags_what_breaks_the_rule(tmp_path, source, flagged):
    (tmp_path / "near_miss.py").write_text(source, encoding="utf-8")
    done = _function_sizes_check(tmp_path)
    assert done.returncode == (1 if flagged else 0), done.stdout + done.stderr
    assert ("near_miss.py:f:" in done.stdout) == flagged, done.stdout
