"""The example third-party distribution ``anexa-topk``, installed (not imported from examples/)."""

import importlib.metadata
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import require_distribution

from anexa_core import AnexaError
from anexa_core.infer.sampling import build_chain
from anexa_core.plugins import registered

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "anexa-topk"
NO_CONTEXT = torch.zeros(1, 0, dtype=torch.long)

LIST_SAMPLERS = """
import json
from anexa_core import plugins
print(json.dumps({"samplers": sorted(plugins.registered("samplers")), "plugins": plugins.describe_plugins()}))
"""


@pytest.fixture
def topk_installed():
    require_distribution("anexa-topk", "./examples/anexa-topk")


def list_samplers(load_plugins: str | None) -> dict:
    env = {key: value for key, value in os.environ.items() if key != "ANEXA_LOAD_PLUGINS"}
    if load_plugins is not None:
        env["ANEXA_LOAD_PLUGINS"] = load_plugins
    done = subprocess.run([sys.executable, "-c", LIST_SAMPLERS], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_entry_point_makes_top_k_available_in_a_fresh_process(topk_installed):
    found = list_samplers(None)
    assert {"top_k", "top_p", "temperature", "greedy"} <= set(found["samplers"])
    (owner,) = [p for p in found["plugins"] if "top_k" in p["registers"].get("samplers", [])]
    assert owner["distribution"] == "anexa-topk"
    assert owner["registers"] == {"samplers": ["top_k"]}
    assert owner["version"] == importlib.metadata.version("anexa-topk")


def test_load_plugins_allow_list_can_leave_it_out(topk_installed):
    found = list_samplers("")  # built-ins only
    assert "top_k" not in found["samplers"]
    assert "top_p" in found["samplers"]


def test_installed_copy_not_the_example_folder(topk_installed):
    top_k = registered("samplers")["top_k"].obj
    module_file = Path(sys.modules[top_k.__module__].__file__).resolve()
    assert EXAMPLE not in module_file.parents


def test_top_k_keeps_exactly_k_under_ties(topk_installed):
    chain = build_chain(["top_k=2"])
    logits = torch.tensor([[1.0, 2.0, 2.0, 2.0, 0.0]])
    survivors = torch.isfinite(chain.process(logits, NO_CONTEXT)).nonzero()[:, 1].tolist()
    assert len(survivors) == 2 and set(survivors) <= {1, 2, 3}
    flat = build_chain(["top_k.k=4"]).process(torch.zeros(3, 10), torch.zeros(3, 0, dtype=torch.long))
    assert torch.isfinite(flat).sum(-1).tolist() == [4, 4, 4]


def test_top_k_keeps_the_largest_and_their_values(topk_installed):
    logits = torch.tensor([[0.3, -1.0, 2.0, 0.7, 0.1]])
    out = build_chain(["top_k=3"]).process(logits, NO_CONTEXT)
    assert torch.isfinite(out).nonzero()[:, 1].tolist() == [0, 2, 3]
    assert torch.equal(out[0, [0, 2, 3]], logits[0, [0, 2, 3]])
    everything = build_chain(["top_k=1000"]).process(logits, NO_CONTEXT)
    assert torch.equal(everything, logits)


def test_top_k_one_is_greedy(topk_installed):
    logits = torch.randn(6, 30, generator=torch.Generator().manual_seed(3))
    picks = build_chain(["top_k=1"]).pick(logits, torch.zeros(6, 0, dtype=torch.long), torch.Generator())
    assert torch.equal(picks.flatten(), logits.argmax(-1))


@pytest.mark.parametrize(
    "spec, message", [("top_k=0", "top_k must be at least 1, got 0"), ("top_k=4.5", "must be an integer")]
)
def test_bad_k_is_an_error(topk_installed, spec, message):
    with pytest.raises(AnexaError, match=message):
        build_chain([spec])


@pytest.mark.parametrize("k", [1, 3, 40])
def test_top_k_passes_the_conformance_kit(topk_installed, k):
    from anexa_core import testing

    testing.check_sampler(registered("samplers")["top_k"].obj, k=k)
