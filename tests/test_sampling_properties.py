"""Property tests of the sampling chain (hypothesis): no option value the validators accept, in any
combination, on any logits, may produce NaN, a crash or an invalid token, and a chain that should be
greedy picks the argmax."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from anexa_core import plugins
from anexa_core.infer.sampling import SamplerChain, build_chain

EXTREME_POSITIVE = st.sampled_from([5e-324, 1e-300, 1e-45, 1e-40, 1e-10, 0.5, 1.0, 2.0, 1e10, 1e38, 1e300])
FRACTION = st.one_of(st.sampled_from([1e-300, 1e-9, 0.5, 1.0]), st.floats(1e-6, 1.0))


@st.composite
def logits_and_context(draw):
    batch, vocab = draw(st.integers(1, 4)), draw(st.integers(1, 40))
    values = st.one_of(
        st.floats(-1e30, 1e30, allow_subnormal=False).map(lambda v: float(torch.tensor(v, dtype=torch.float32))),
        st.sampled_from([0.0, -3e38, 3e38, float("-inf")]),
    )
    rows = [[draw(values) for _ in range(vocab)] for _ in range(batch)]
    for row in rows:  # the model never gives a row with nothing possible
        if all(v == float("-inf") for v in row):
            row[draw(st.integers(0, vocab - 1))] = draw(st.floats(-10, 10))
    length = draw(st.integers(0, 12))
    context = torch.tensor(
        [[draw(st.integers(0, vocab - 1)) for _ in range(length)] for _ in range(batch)], dtype=torch.long
    ).view(batch, length)
    return torch.tensor(rows, dtype=torch.float32), context


@st.composite
def chains(draw):
    specs = {}
    if draw(st.booleans()):
        specs["repetition_penalty"] = [
            f"repetition_penalty={draw(EXTREME_POSITIVE)!r}",
            f"repetition_penalty.window={draw(st.integers(1, 100))}",
        ]
    if draw(st.booleans()):
        specs["temperature"] = [f"temperature={draw(st.one_of(st.just(0.0), EXTREME_POSITIVE))!r}"]
    if draw(st.booleans()) and "top_k" in plugins.registered("samplers"):
        specs["top_k"] = [f"top_k={draw(st.integers(1, 60))}"]
    if draw(st.booleans()):
        specs["top_p"] = [f"top_p={draw(FRACTION)!r}"]
    if draw(st.booleans()):
        specs["min_p"] = [f"min_p={draw(st.one_of(st.just(0.0), FRACTION))!r}"]
    if draw(st.booleans()):
        specs["greedy"] = ["greedy"]
    return specs


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(logits_and_context(), chains(), st.integers(0, 2**32))
def test_any_accepted_options_give_a_valid_token_and_greedy_chains_pick_the_argmax(data, specs, seed):
    logits, context = data
    chain = build_chain([spec for group in specs.values() for spec in group])
    processed = chain.process(logits, context)
    assert not torch.isnan(processed).any() and not (processed == float("inf")).any(), (specs, logits)
    picks = chain.pick(logits, context, torch.Generator().manual_seed(seed))
    assert picks.shape == (logits.size(0), 1) and picks.dtype == torch.long
    assert ((picks >= 0) & (picks < logits.size(1))).all()
    assert torch.isfinite(processed.gather(1, picks)).all(), "the pick is a token the chain kept"
    greedy_at = min((p.order for p in chain.processors if _makes_greedy(p)), default=None)
    if greedy_at is not None:  # the argmax of what the processors before the greedy one left
        before = SamplerChain([p for p in chain.processors if p.order < greedy_at]).process(logits, context)
        assert torch.equal(picks, before.argmax(-1, keepdim=True)), "greedy picks the argmax, ties the lowest id"


def _makes_greedy(processor) -> bool:
    return (
        (type(processor).__name__ == "Temperature" and processor.value == 0)
        or type(processor).__name__ == "Greedy"
        or (type(processor).__name__ == "TopK" and processor.k == 1)
    )


@pytest.mark.parametrize("temperature", [1e-40, 1e-300, 5e-324])
def test_a_tiny_temperature_is_nearly_greedy_not_a_crash(temperature):
    """The README's failing case: --temperature 1e-40 ended in `probability tensor contains … nan`."""
    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    picks = build_chain(temperature=temperature).pick(
        logits, torch.zeros(2, 0, dtype=torch.long), torch.Generator().manual_seed(0)
    )
    assert picks.flatten().tolist() == [1, 0]
