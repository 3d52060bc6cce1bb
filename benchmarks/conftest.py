"""Shared setup for ``pytest benchmarks/ --benchmark-only -n0``: CPU-friendly shapes, every attention plugin.

Compare runs with ``--benchmark-autosave`` then ``pytest-benchmark compare``; groups put the backends
of one measurement side by side.
"""

import pytest
import torch

from anexa_core import plugins
from anexa_core.measure import bench


def pytest_configure(config):
    """The root addopts disable benchmarks so the unit tests skip them; this folder exists to run them."""
    config.option.benchmark_enable = True


def pytest_generate_tests(metafunc):
    """``attention_name`` runs once per registered attention plugin, built-in or third-party."""
    if "attention_name" in metafunc.fixturenames:
        metafunc.parametrize("attention_name", sorted(plugins.registered("attention")))


@pytest.fixture
def attention_fn(attention_name):
    attention, _ = plugins.create("attention", attention_name, {})  # an instance, as models call it
    return attention


@pytest.fixture
def skip_if_fallback(attention_name, attention_fn):
    """Call with the inputs: a backend that would only run its fallback on them is skipped, not timed."""

    def check(q):
        reason = bench.kernel_fallback(attention_name, attention_fn, q)
        if reason is not None:
            pytest.skip(f"{bench.fallback_label(attention_fn)}: {reason}")

    return check


@pytest.fixture(autouse=True)
def _fixed_seed():
    torch.manual_seed(0)
