"""The sampling chain: each built-in processor on hand-made logits, chain order, seeding, stop strings."""

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch
from helpers import registered, require_distribution

from anexa_core import AnexaError, hookimpl
from anexa_core.infer.sampling import (
    SamplerChain,
    StopStrings,
    _groups,
    build_chain,
    parse_sampler_options,
    pick_rows,
)
from anexa_plugins.samplers import Greedy, MinP, RepetitionPenalty, Temperature, TopP

NO_CONTEXT = torch.zeros(1, 0, dtype=torch.long)


def kept(logits: torch.Tensor) -> list[list[int]]:
    """Indices of the tokens a processor left alive, per row."""
    return [torch.isfinite(row).nonzero().flatten().tolist() for row in logits]


def log_probs(*probs: float) -> torch.Tensor:
    return torch.tensor([probs]).log()


def require_topk():
    require_distribution("anexa-topk", "./examples/anexa-topk")


# --- each processor -------------------------------------------------------------------------------


def test_top_p_keeps_the_smallest_set_reaching_p():
    logits = log_probs(0.1, 0.5, 0.15, 0.25)
    assert kept(TopP(0.7)(logits, NO_CONTEXT)) == [[1, 3]]  # 0.5 < 0.7 <= 0.5 + 0.25
    assert kept(TopP(0.8)(logits, NO_CONTEXT)) == [[1, 2, 3]]  # 0.75 < 0.8: needs the 0.15 too
    assert kept(TopP(1.0)(logits, NO_CONTEXT)) == [[0, 1, 2, 3]]
    assert kept(TopP(1e-9)(logits, NO_CONTEXT)) == [[1]]  # always at least one


def test_top_p_exact_boundary_stops_at_p():
    logits = torch.zeros(1, 4)  # softmax is exactly 0.25 each
    assert kept(TopP(0.5)(logits, NO_CONTEXT)) == [[0, 1]]  # two tokens reach 0.5 exactly: no third
    assert kept(TopP(0.5 + 1e-6)(logits, NO_CONTEXT)) == [[0, 1, 2]]
    assert kept(TopP(0.25)(logits, NO_CONTEXT)) == [[0]]


def test_top_p_leaves_kept_logits_unchanged():
    logits = log_probs(0.1, 0.5, 0.15, 0.25)
    out = TopP(0.7)(logits, NO_CONTEXT)
    assert torch.equal(out[0, [1, 3]], logits[0, [1, 3]])


def test_min_p_is_relative_to_the_top_probability():
    confident = [0.6, 0.25, 0.1, 0.05]  # threshold 0.2 * 0.6 = 0.12
    unsure = [0.3, 0.3, 0.25, 0.15]  # threshold 0.06: everything passes
    logits = torch.tensor([confident, unsure]).log()
    assert kept(MinP(0.2)(logits, torch.zeros(2, 0, dtype=torch.long))) == [[0, 1], [0, 1, 2, 3]]
    assert kept(MinP(0.0)(logits, torch.zeros(2, 0, dtype=torch.long))) == [[0, 1, 2, 3]] * 2
    assert kept(MinP(1.0)(logits, torch.zeros(2, 0, dtype=torch.long))) == [[0], [0, 1]]
    # Each row against its own top: 0.5 × 0.9 would cut the second row to one token, 0.5 × 0.4 keeps all.
    logits = torch.tensor([[0.9, 0.05, 0.05], [0.4, 0.3, 0.3]]).log()
    assert kept(MinP(0.5)(logits, torch.zeros(2, 0, dtype=torch.long))) == [[0], [0, 1, 2]]


def test_repetition_penalty_divides_positive_multiplies_negative_within_the_window():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5]])
    context = torch.tensor([[2, 0, 1]])  # token 2 is outside a window of 2
    out = RepetitionPenalty(penalty=2.0, window=2)(logits, context)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5]]
    out = RepetitionPenalty(penalty=2.0, window=3)(logits, context)
    assert out.tolist() == [[1.0, -4.0, 0.5, -1.0, 0.5]]


def test_repetition_penalty_per_row_and_with_empty_context():
    logits = torch.ones(2, 3)
    out = RepetitionPenalty(penalty=4.0, window=8)(logits, torch.tensor([[0, 0], [2, 1]]))
    assert out.tolist() == [[0.25, 1.0, 1.0], [1.0, 0.25, 0.25]]
    assert torch.equal(RepetitionPenalty(2.0)(logits, torch.zeros(2, 0, dtype=torch.long)), logits)


def test_greedy_keeps_only_the_argmax_lowest_index_on_ties():
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(0))
    assert kept(Greedy()(logits, NO_CONTEXT)) == [[i] for i in logits.argmax(-1).tolist()]
    assert kept(Greedy()(torch.tensor([[1.0, 3.0, 3.0]]), NO_CONTEXT)) == [[1]]


def test_temperature_scales_and_zero_is_greedy():
    logits = torch.tensor([[1.0, -2.0, 4.0]])
    shifted = logits - logits.max()  # the same distribution, and no value can overflow to +inf
    assert torch.equal(Temperature(0.5)(logits, NO_CONTEXT), shifted * 2)
    assert torch.equal(Temperature(2.0)(logits, NO_CONTEXT), shifted / 2)
    assert kept(Temperature(0)(logits, NO_CONTEXT)) == [[2]]


def test_top_p_breaks_ties_by_the_lowest_index_in_a_long_row():
    """Sorting with many equal probabilities (torch's unstable sort reorders from 17 elements on) still
    keeps the lowest ids, as greedy and top_k do."""
    kept_ids = kept(TopP(0.5)(torch.zeros(2, 40), torch.zeros(2, 0, dtype=torch.long)))
    assert kept_ids == [list(range(20))] * 2


def test_repetition_penalty_takes_context_ids_of_any_integer_dtype():
    logits = torch.ones(1, 5)
    for dtype in (torch.int64, torch.int32, torch.int16, torch.uint8):
        out = RepetitionPenalty(penalty=2.0)(logits, torch.tensor([[1, 2]], dtype=dtype))
        assert out.tolist() == [[1.0, 0.5, 0.5, 1.0, 1.0]], dtype


@pytest.mark.parametrize("penalty", [1e-300, 1e300])
def test_an_extreme_repetition_penalty_keeps_every_logit_finite(penalty):
    """1e300 multiplies negative logits past float32's range, 1e-300 divides positive ones past it: both
    are clamped to finite values, and the penalty's direction holds (seen tokens never gain on unseen)."""
    logits = torch.tensor([[3.0, -3.0, 1.0, -1.0, 0.5]])
    out = RepetitionPenalty(penalty=penalty, window=8)(logits, torch.tensor([[0, 1, 2, 3]]))
    assert torch.isfinite(out).all(), out
    assert out[0, 4] == 0.5  # unseen: unchanged
    if penalty > 1:
        assert (out[0, :4] <= logits[0, :4]).all()
    else:
        assert (out[0, :4] >= logits[0, :4]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_processor_keeps_the_logits_dtype(dtype):
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(3)).to(dtype)
    context = torch.tensor([[1, 2], [3, 3]])
    for processor in (RepetitionPenalty(1.5), Temperature(0.7), Temperature(0), TopP(0.8), MinP(0.1), Greedy()):
        assert processor(logits, context).dtype == dtype, processor


def test_temperature_divides_a_row_whose_top_is_not_finite_without_shifting_it():
    """A +inf from a contract-breaking processor upstream cannot be subtracted: the row is only divided."""
    out = Temperature(0.5)(torch.tensor([[float("inf"), 2.0, float("-inf"), -1.0]]), NO_CONTEXT)
    assert out.tolist() == [[float("inf"), 4.0, float("-inf"), -2.0]]


@pytest.mark.parametrize(
    "sampler, options, message",
    [
        (Temperature, {"value": float("inf")}, "temperature must be >= 0 (0 means greedy), got inf"),
        (Temperature, {"value": -0.5}, "temperature must be >= 0 (0 means greedy), got -0.5"),
        (RepetitionPenalty, {"penalty": float("inf")}, "repetition_penalty must be > 0 (1 = off, e.g. 1.2), got inf"),
        (RepetitionPenalty, {"penalty": 0.0}, "repetition_penalty must be > 0 (1 = off, e.g. 1.2), got 0.0"),
        (RepetitionPenalty, {"window": 0}, "repetition_penalty.window must be at least 1 token, got 0"),
        (TopP, {"p": 0.0}, "top_p must be in (0, 1], got 0.0"),
        (TopP, {"p": 1.5}, "top_p must be in (0, 1], got 1.5"),
        (MinP, {"p": -0.1}, "min_p must be in [0, 1], got -0.1"),
        (MinP, {"p": 1.1}, "min_p must be in [0, 1], got 1.1"),
    ],
)
def test_out_of_range_options_are_refused_by_the_processor_itself(sampler, options, message):
    """Code that builds processors directly (a server, a notebook) gets the same checks as -s; an infinite
    temperature or penalty would turn every logit into 0 or ±inf."""
    with pytest.raises(AnexaError) as error:
        sampler(**options)
    assert str(error.value) == message


def test_boundary_option_values_are_accepted():
    Temperature(0.0), TopP(1.0), MinP(0.0), MinP(1.0), RepetitionPenalty(5e-324, window=1)


# --- the chain ------------------------------------------------------------------------------------


def test_a_batch_mixing_decided_and_open_rows_samples_each_open_row():
    """The pick is the argmax only when every row has one token left: a row with one candidate must not
    make the other rows greedy."""
    rows = 4000
    decided = [float("-inf"), float("-inf"), 0.0]  # only token 2
    open_row = [math.log(0.75), math.log(0.25), float("-inf")]
    logits = torch.tensor([decided, open_row]).repeat(rows // 2, 1)
    picks = SamplerChain().pick(logits, torch.zeros(rows, 0, dtype=torch.long), torch.Generator().manual_seed(0))
    assert picks.shape == (rows, 1)
    assert (picks[0::2] == 2).all()
    assert math.isclose((picks[1::2] == 1).float().mean().item(), 0.25, abs_tol=0.03)


def test_a_batch_where_the_chain_leaves_rows_different_numbers_of_candidates():
    """top_p keeps one token of a confident row and three of a flat one; both kinds sample correctly."""
    confident = [math.log(0.97), math.log(0.01), math.log(0.01), math.log(0.01)]
    flat = [math.log(0.3), math.log(0.3), math.log(0.3), math.log(0.1)]
    rows = 3000
    logits = torch.tensor([confident, flat, flat]).repeat(rows // 3, 1)
    chain = build_chain(["top_p=0.85"])
    assert kept(chain.process(logits[:3], torch.zeros(3, 0, dtype=torch.long))) == [[0], [0, 1, 2], [0, 1, 2]]
    picks = chain.pick(logits, torch.zeros(rows, 0, dtype=torch.long), torch.Generator().manual_seed(1)).flatten()
    assert (picks[0::3] == 0).all()
    flat_picks = torch.cat([picks[1::3], picks[2::3]])
    assert set(flat_picks.tolist()) == {0, 1, 2}
    for token in range(3):
        assert math.isclose((flat_picks == token).float().mean().item(), 1 / 3, abs_tol=0.04)


@dataclass
class CertainOf:
    """Breaks the contract on purpose: +inf for ``tokens[i % len(tokens)]`` in row i (none where empty)."""

    tokens: tuple = ()
    order: ClassVar[int] = 60

    def __call__(self, logits, context):
        out = logits.clone()
        for row in range(out.size(0)):
            out[row, list(self.tokens[row % len(self.tokens)])] = float("inf")
        return out


def test_plus_inf_from_a_processor_makes_those_tokens_the_only_candidates_of_its_row_only():
    rows = 3000
    chain = SamplerChain([CertainOf(tokens=((3,), (1, 4), ()))])
    logits = torch.tensor([[0.0, 5.0, 1.0, -2.0, 0.5, 2.0]]).expand(rows, 6)  # token 1 is the likeliest
    picks = chain.pick(logits, torch.zeros(rows, 0, dtype=torch.long), torch.Generator().manual_seed(2)).flatten()
    assert (picks[0::3] == 3).all()
    both = picks[1::3]
    assert set(both.tolist()) == {1, 4} and math.isclose((both == 4).float().mean().item(), 0.5, abs_tol=0.04)
    free = picks[2::3]
    assert math.isclose((free == 1).float().mean().item(), logits[0].softmax(-1)[1].item(), abs_tol=0.03)
    assert len(set(free.tolist())) == 6
    one_each = SamplerChain([CertainOf(tokens=((2,), (0,)))])  # every row decided: the argmax, no draw
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    assert one_each.pick(torch.zeros(4, 3), torch.zeros(4, 0, dtype=torch.long), generator).flatten().tolist() == [
        2,
        0,
        2,
        0,
    ]
    assert torch.equal(generator.get_state(), state)


@dataclass
class Broken:
    order: ClassVar[int] = 60

    def __call__(self, logits, context):
        return logits * float("nan")


def test_nan_from_a_processor_is_an_error_naming_the_chain():
    with pytest.raises(AnexaError) as error:
        SamplerChain([Temperature(0.5), Broken()]).pick(torch.zeros(1, 3), NO_CONTEXT)
    assert str(error.value) == (
        "the sampling chain Temperature(value=0.5) → Broken() produced NaN: a sampler plugin is broken; leave it out"
    )


def test_the_chain_describes_itself_in_order():
    """`anexa -v generate` prints this, and the NaN error names the chain with it."""
    assert repr(build_chain(["top_p=0.9", "temperature=0.5"])) == "Temperature(value=0.5) → TopP(p=0.9)"
    assert repr(build_chain(["greedy"])) == "Greedy()"
    assert repr(SamplerChain()) == "sample at temperature 1"


def test_chains_are_equal_by_processors_and_options_and_hash_alike():
    """The engine groups rows of equal chains: the same samplers with the same options are equal whatever
    the order given, another option or sampler is not; equal chains hash equal (usable as dict keys)."""
    chain = build_chain(["top_k=40", "temperature=0.8"])
    same = build_chain(["temperature=0.8", "top_k=40"])
    assert chain == same and hash(chain) == hash(same) and {chain: 1}[same] == 1
    assert chain != build_chain(["temperature=0.8", "top_k=41"])
    assert chain != build_chain(["temperature=0.8"]) and chain != "temperature=0.8"


def test_the_chain_names_its_processors_and_breaks_ties_in_order_by_name():
    """Unnamed processors are named by their class; two of the same order run by name, not by the order
    they were given in (nor by comparing the processors, which need not be comparable)."""
    certain, broken = CertainOf(tokens=((0,),)), Broken()  # both order 60
    for given in (
        [("zeta", certain), ("alpha", broken), Temperature(0.5)],
        [Temperature(0.5), ("alpha", broken), ("zeta", certain)],
    ):
        chain = SamplerChain(given)
        assert chain.names == ["Temperature", "alpha", "zeta"]
        assert chain.processors[1] is broken and chain.processors[2] is certain


class _OrderAsText:
    """A sampler whose ``order`` is not an int: the chain could not place it."""

    order = "first"

    def __call__(self, logits, context):
        return logits


class _OrderAsTextPlugin:
    @hookimpl
    def register_samplers(self, register):
        register("order_as_text", _OrderAsText)


def test_a_sampler_without_an_int_order_is_refused_by_name():
    with registered(_OrderAsTextPlugin(), "test-order-as-text"), pytest.raises(AnexaError) as error:
        build_chain(["order_as_text"])
    assert str(error.value) == (
        "sampler 'order_as_text' has no int `order`: fix or uninstall its plugin (see `anexa plugins`)"
    )


def test_chain_runs_in_order_not_command_line_order():
    logits = log_probs(0.5, 0.3, 0.2)
    # temperature 0.25 first sharpens to ~[0.87, 0.11, 0.02], so top_p 0.7 then keeps one token;
    # top_p first would have kept two.
    chain = build_chain(["top_p=0.7", "temperature=0.25"])
    assert [type(p) for p in chain.processors] == [Temperature, TopP]
    assert kept(chain.process(logits, NO_CONTEXT)) == [[0]]
    wrong_order = Temperature(0.25)(TopP(0.7)(logits, NO_CONTEXT), NO_CONTEXT)
    assert kept(wrong_order) == [[0, 1]]


def test_chain_order_with_min_p_after_temperature():
    logits = log_probs(0.5, 0.3, 0.2)  # min_p 0.3 alone keeps all three (0.2 >= 0.15)
    assert kept(build_chain(["min_p=0.3"]).process(logits, NO_CONTEXT)) == [[0, 1, 2]]
    chain = build_chain(["min_p=0.3", "temperature=0.5"])  # sharpened: ~[0.66, 0.24, 0.11]
    assert kept(chain.process(logits, NO_CONTEXT)) == [[0, 1]]


def test_documented_order_of_every_sampler():
    require_topk()
    specs = ["greedy", "min_p=0.1", "top_p=0.9", "top_k=5", "temperature=0.7", "repetition_penalty=1.3"]
    chain = build_chain(specs)
    assert [p.order for p in chain.processors] == [10, 20, 30, 40, 50, 90]
    assert [type(p).__name__ for p in chain.processors] == [
        "RepetitionPenalty",
        "Temperature",
        "TopK",
        "TopP",
        "MinP",
        "Greedy",
    ]


def test_repetition_penalty_runs_before_greedy_in_the_chain():
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    context = torch.tensor([[0]])
    assert build_chain(["greedy"]).pick(logits, context).tolist() == [[0]]
    chain = build_chain(["greedy", "repetition_penalty=2"])  # 3 / 2 = 1.5 < 2: token 1 wins
    assert chain.pick(logits, context).tolist() == [[1]]


def test_temperature_zero_picks_argmax_without_drawing():
    logits = torch.randn(16, 40, generator=torch.Generator().manual_seed(1))
    generator = torch.Generator().manual_seed(5)
    state = generator.get_state()
    for chain in (build_chain(temperature=0), build_chain(["temperature=0"]), build_chain(["greedy"])):
        picks = chain.pick(logits, NO_CONTEXT, generator)
        assert picks.shape == (16, 1) and picks.dtype == torch.long
        assert torch.equal(picks.flatten(), logits.argmax(-1))
    assert torch.equal(generator.get_state(), state)


def test_seeded_picks_are_reproducible_and_depend_on_the_seed():
    chain = build_chain(["top_p=0.95", "temperature=1.5"])
    logits = torch.randn(8, 50, generator=torch.Generator().manual_seed(2))
    context = torch.zeros(8, 0, dtype=torch.long)

    def draws(seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.cat([chain.pick(logits, context, generator) for _ in range(20)], dim=1)

    first = draws(123)
    assert torch.equal(first, draws(123))
    assert not torch.equal(first, draws(124))
    assert len(first.unique()) > 5  # really sampling, not stuck on one token


def test_pick_draws_only_surviving_tokens_in_proportion():
    logits = log_probs(0.1, 0.6, 0.3)
    chain = build_chain(["top_p=0.85"])  # keeps tokens 1 and 2, renormalised to 2/3 and 1/3
    generator = torch.Generator().manual_seed(0)
    picks = chain.pick(logits.expand(4000, 3), torch.zeros(4000, 0, dtype=torch.long), generator).flatten()
    assert set(picks.tolist()) == {1, 2}
    assert math.isclose((picks == 1).float().mean().item(), 2 / 3, abs_tol=0.03)


def test_picking_rows_together_equals_each_rows_own_pick_and_generator_use():
    """The engine's pick_rows: every row's id, and what each generator drew, as its own chain's pick of that
    row alone — chains of every kind side by side, decided rows (temperature 0, +inf) and pick-only chains."""
    logits = torch.randn(7, 50, generator=torch.Generator().manual_seed(3)) * 3
    contexts = [torch.randint(0, 50, (1, n), generator=torch.Generator().manual_seed(n)) for n in range(1, 8)]
    chains = [
        SamplerChain(),
        build_chain(["temperature=0.7", "top_p=0.9"]),
        build_chain(temperature=0),
        build_chain(["repetition_penalty=1.5", "min_p=0.1"]),
        SamplerChain([CertainOf(tokens=((4,),))]),
        build_chain(["temperature=1.3"]),
        SamplerChain([Greedy()]),
    ]
    for seed in range(20):
        alone = [torch.Generator().manual_seed(seed + row) for row in range(7)]
        expected = [int(c.pick(logits[r : r + 1], contexts[r], alone[r])) for r, c in enumerate(chains)]
        together = [torch.Generator().manual_seed(seed + row) for row in range(7)]
        assert pick_rows(chains, logits, contexts, together) == expected
        for one, other in zip(alone, together, strict=True):
            assert torch.equal(one.get_state(), other.get_state())


def test_rows_sharing_a_generator_draw_from_it_in_row_order():
    """Requests without a seed share torch's global generator: rows drawn together take their noise from it
    in row order, as row-by-row picks did, though equal chains are grouped out of that order."""
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(5))
    contexts = [torch.zeros(1, 0, dtype=torch.long)] * 5
    cool, hot = build_chain(["temperature=0.7"]), build_chain(["temperature=1.4"])
    chains = [cool, hot, build_chain(["temperature=0.7"]), hot, cool]  # groups [0, 2, 4] and [1, 3]
    for seed in range(10):
        shared = torch.Generator().manual_seed(seed)
        expected = [int(c.pick(logits[r : r + 1], contexts[r], shared)) for r, c in enumerate(chains)]
        shared = torch.Generator().manual_seed(seed)
        assert pick_rows(chains, logits, contexts, [shared] * 5) == expected


def test_rows_of_equal_chains_are_processed_at_once_with_the_ids_each_would_get_alone():
    """Equal chains (their own objects, as the server builds one per request) process their rows in one call:
    any histories for chains that read none, equally long ones otherwise — and the ids stay each row's own."""
    calls = []

    @dataclass
    class Counted:
        order: ClassVar[int] = 60
        reads_context: ClassVar[bool] = False

        def __call__(self, logits, context):
            calls.append(logits.size(0))
            return logits

    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(4))
    contexts = [torch.randint(0, 40, (1, n), generator=torch.Generator().manual_seed(n)) for n in (3, 9, 9, 4, 9, 3)]
    free = [SamplerChain([Temperature(0.8), Counted()]) for _ in range(6)]
    assert free[0] == free[1] and free[0] != SamplerChain([Temperature(0.9), Counted()])
    reading = [build_chain(["repetition_penalty=1.5", "top_p=0.9"]) for _ in range(6)]
    for chains in (free, reading):
        for seed in range(10):
            alone = [
                int(c.pick(logits[r : r + 1], contexts[r], torch.Generator().manual_seed(seed + r)))
                for r, c in enumerate(chains)
            ]
            calls.clear()
            generators = [torch.Generator().manual_seed(seed + r) for r in range(6)]
            assert pick_rows(chains, logits, contexts, generators) == alone
        if chains is free:
            assert calls == [6]  # one call for the six rows
    assert _groups(reading, contexts) == [[0, 5], [1, 2, 4], [3]]  # histories of 3, 9 and 4 tokens


def test_a_chain_that_fails_rows_processed_together_is_asked_again_row_by_row():
    """Processing equal chains' rows at once raised: each row is processed by its own chain (so in the
    server only the failing request fails), and the ids are those of the rows alone."""

    @dataclass
    class FailsManyRows:
        order: ClassVar[int] = 60
        reads_context: ClassVar[bool] = False

        def __call__(self, logits, context):
            if logits.size(0) > 1:
                raise RuntimeError("one row at a time")
            return logits

    chains = [SamplerChain([FailsManyRows()]) for _ in range(3)]
    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(5))
    contexts = [NO_CONTEXT] * 3
    alone = [int(c.pick(logits[r : r + 1], NO_CONTEXT, torch.Generator().manual_seed(r))) for r, c in enumerate(chains)]
    assert pick_rows(chains, logits, contexts, [torch.Generator().manual_seed(r) for r in range(3)]) == alone


def test_picking_rows_together_leaves_broken_rows_to_their_own_chain():
    """A row its chain breaks raises that chain's own error; a chain with only ``pick`` is asked as it is."""

    class Argmax:
        def pick(self, logits, context, generator=None):
            return logits.argmax(-1, keepdim=True)

    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 1.0, 3.0]])
    contexts = [NO_CONTEXT, NO_CONTEXT]
    assert pick_rows([Argmax(), build_chain(["greedy"])], logits, contexts, [None, None]) == [1, 2]
    with pytest.raises(AnexaError, match="produced NaN"):
        pick_rows([SamplerChain(), SamplerChain([Broken()])], logits, contexts, [None, None])
    # Found by a QA session: a model that trained to NaN was blamed on the sampler plugins.
    broken_model = torch.tensor([[0.0, float("nan"), 1.0], [0.0, 1.0, 3.0]])
    with pytest.raises(AnexaError, match=r"^the model computed NaN logits: its weights are broken"):
        pick_rows([build_chain([]), build_chain([])], broken_model, contexts, [None, None])


def test_a_chain_that_only_picks_is_asked_with_its_own_row_context_and_generator():
    """A chain with only ``pick`` gets its one row (1, V), its own context and its own generator — also when
    no row's chain can be drawn with the others; rows after it whose chains can still are drawn, not asked."""

    class Recorder:
        def __init__(self):
            self.seen = []

        def pick(self, logits, context, generator=None):
            self.seen.append((tuple(logits.shape), context, generator))
            return logits.argmax(-1, keepdim=True)

    class DrawnNotPicked(SamplerChain):
        def pick(self, logits, context, generator=None):
            raise AssertionError("a chain with `process` is drawn with the other rows")

    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(2))
    contexts = [torch.randint(0, 10, (1, n), generator=torch.Generator().manual_seed(n)) for n in (2, 5, 3)]
    generators = [torch.Generator().manual_seed(row) for row in range(3)]
    recorders = [Recorder() for _ in range(3)]
    assert pick_rows(recorders, logits, contexts, generators) == logits.argmax(-1).tolist()
    for row, recorder in enumerate(recorders):
        ((shape, context, generator),) = recorder.seen
        assert shape == (1, 10) and context is contexts[row] and generator is generators[row]
    chains = [Recorder(), DrawnNotPicked([Greedy()]), DrawnNotPicked([Greedy()])]
    assert pick_rows(chains, logits, contexts, generators) == logits.argmax(-1).tolist()


def test_a_chain_that_does_not_say_whether_it_reads_the_context_is_given_it():
    """``reads_context`` defaults to true: such a chain's rows are processed together only when their
    histories are equally long, with the histories stacked; each other row alone with its own."""
    processed = []

    class Reads:
        def __eq__(self, other):
            return isinstance(other, Reads)

        __hash__ = None

        def process(self, logits, context):
            processed.append(context.tolist())
            return torch.full_like(logits, float("-inf")).scatter(-1, logits.argmax(-1, keepdim=True), 0.0)

    logits = torch.randn(3, 10, generator=torch.Generator().manual_seed(3))
    contexts = [torch.tensor([[1, 2]]), torch.tensor([[3, 4, 5, 6]]), torch.tensor([[7, 8]])]
    assert pick_rows([Reads(), Reads(), Reads()], logits, contexts, [None] * 3) == logits.argmax(-1).tolist()
    assert processed == [[[1, 2], [7, 8]], [[3, 4, 5, 6]]]


def test_a_row_left_with_two_candidates_is_drawn_as_the_chain_would_draw_it():
    """Noise is drawn for every row with more than one candidate: two equally likely tokens come out as
    ``SamplerChain.pick`` draws them with the same seed — each of them, over seeds."""
    chain = SamplerChain()
    logits = torch.tensor([[0.0, 0.0, float("-inf"), float("-inf")]])
    drawn = set()
    for seed in range(16):
        expected = int(chain.pick(logits, NO_CONTEXT, torch.Generator().manual_seed(seed)))
        (got,) = pick_rows([chain], logits, [NO_CONTEXT], [torch.Generator().manual_seed(seed)])
        assert got == expected
        drawn.add(got)
    assert drawn == {0, 1}


def test_temperature_flag_is_a_shorthand_and_conflicts_with_s():
    chain = build_chain(temperature=0.5)
    assert chain.processors == [Temperature(0.5)]
    with pytest.raises(AnexaError) as error:
        build_chain(["temperature=0.7"], temperature=0.5)
    assert str(error.value) == "--temperature and -s temperature both set the temperature: give only one"


def test_empty_chain_is_plain_sampling():
    chain = SamplerChain()
    logits = torch.tensor([[0.0, 1.0]])
    assert torch.equal(chain.process(logits, NO_CONTEXT), logits)
    assert build_chain().processors == []


def test_parse_sampler_options_forms():
    parsed = parse_sampler_options(["top_p=0.9", "repetition_penalty.window=32", "greedy", "top_p.p=0.8"])
    assert parsed == {"top_p": {"": "0.9", "p": "0.8"}, "repetition_penalty": {"window": "32"}, "greedy": {}}
    specs = ["top_p.p=0.8", "repetition_penalty.window=32", "repetition_penalty=1.5"]
    chain = build_chain(specs)
    assert chain.processors == [RepetitionPenalty(penalty=1.5, window=32), TopP(0.8)]


@pytest.mark.parametrize(
    "specs, twice",
    [
        (["top_k=3", "top_k=50"], "top_k: its first option"),
        (["top_p.p=0.9", "top_p.p=0.9"], "top_p: p"),  # even the same value: one of the two says nothing
        (["top_p=0.9", "top_p.p=0.8"], "top_p: p"),  # the first option, named and not
        (["top_p.p=0.8", "top_p=0.9"], "top_p: p"),
    ],
)
def test_an_option_given_twice_is_refused_not_overridden(specs, twice):
    with pytest.raises(AnexaError) as error:
        build_chain(specs)
    assert str(error.value) == f"sampler {twice} is given twice: give it once"
    assert build_chain(specs[:1]).processors  # each alone is fine


@pytest.mark.parametrize(
    "specs, message",
    [
        (["top_p=1.5"], r"top_p must be in \(0, 1\], got 1.5"),
        (["top_p=0"], r"top_p must be in \(0, 1\]"),
        (["temperature=-1"], r"temperature must be >= 0"),
        (["min_p=2"], r"min_p must be in \[0, 1\]"),
        (["repetition_penalty=0"], r"repetition_penalty must be > 0"),
        (["repetition_penalty.window=0"], r"window must be at least 1"),
        (["nucleus=0.9"], r"unknown sampler 'nucleus': choose one of .*greedy.*top_p"),
        (["top_p.q=0.9"], r"sampler top_p has no option 'q': choose one of p"),
        (["top_p=abc"], r"sampler top_p option p must be a finite number, got 'abc'"),
        (["repetition_penalty.window=2.5"], r"option window must be an integer"),
        (["greedy=1"], r"sampler greedy takes no options: use -s greedy"),
        (
            ["=3"],
            r"^bad sampler spec '=3': use -s NAME, -s NAME=VALUE or -s NAME\.OPTION=VALUE \(e\.g\. -s top_p=0\.9\)$",
        ),
        (["top_p.=0.9"], r"bad sampler spec"),
        (["top_p="], r"bad sampler spec"),
        (["top_p.p"], r"has no value: use -s top_p.p=VALUE"),
    ],
)
def test_bad_sampler_options_are_one_line_errors(specs, message):
    with pytest.raises(AnexaError, match=message) as error:
        build_chain(specs)
    assert "\n" not in str(error.value)


# --- a sampler from a plugin registered in the test -----------------------------------------------


@dataclass
class Boost:
    """Adds ``amount`` to one token: lets the test see where in the chain it ran."""

    amount: float = 1.0
    token: int = 0
    enabled: bool = True
    label: str = "boost"
    order: ClassVar[int] = 25

    def __call__(self, logits, context):
        if self.enabled:
            logits = logits.clone()
            logits[:, self.token] += self.amount
        return logits


class BoostPlugin:
    @hookimpl
    def register_samplers(self, register):
        register("boost", Boost)


@pytest.fixture
def boost_plugin():
    with registered(BoostPlugin(), "test-boost"):
        yield


def test_plugin_sampler_options_are_converted_to_field_types(boost_plugin):
    chain = build_chain(["boost=2.5", "boost.token=1", "boost.enabled=false", "boost.label=x=y"])
    assert chain.processors == [Boost(amount=2.5, token=1, enabled=False, label="x=y")]
    with pytest.raises(AnexaError, match="option enabled must be true or false"):
        build_chain(["boost.enabled=maybe"])


def test_plugin_sampler_runs_at_its_order(boost_plugin):
    # Boost (25) runs after temperature (20): a boost of 1 at temperature 0.1 must not flip the argmax
    # the way it would if it ran first (then scaled to 10).
    logits = torch.tensor([[0.0, 0.5]])
    chain = build_chain(["boost.amount=1", "temperature=0.1"])
    assert chain.process(logits, NO_CONTEXT)[0].tolist() == pytest.approx([-4.0, 0.0])  # [-5, 0] + [1, 0]


def test_a_plugin_registered_for_a_test_is_gone_after_it():
    """What the boost_plugin fixture relies on, in one test whatever the order the tests run in: the
    sampler exists exactly while the plugin is registered (no stale lookup cache either side)."""
    with pytest.raises(AnexaError, match="unknown sampler 'boost'"):
        build_chain(["boost"])
    with registered(BoostPlugin(), "test-boost"):
        assert build_chain(["boost=2"]).processors == [Boost(amount=2.0)]
    with pytest.raises(AnexaError, match="unknown sampler 'boost'"):
        build_chain(["boost"])


# --- stop strings ---------------------------------------------------------------------------------


def stream_until_stop(pieces, stops):
    """Pieces of text through one :class:`StopStrings`, pulled until it stops (as ``generate_text`` pulls
    tokens): what may be shown of each, then what the end releases."""
    matcher = StopStrings(stops)
    for piece in pieces:
        text = matcher.feed(piece)
        if text or not stops:
            yield text
        if matcher.stopped:
            return
    tail = matcher.flush()
    if tail:
        yield tail


def test_stop_string_across_pieces_is_never_yielded_and_stops_pulling():
    pulled = []

    def pieces():
        for piece in ["Hello, Wo", "rld! ST", "OP and more", "never pulled"]:
            pulled.append(piece)
            yield piece

    out = list(stream_until_stop(pieces(), ["STOP"]))
    assert out == ["Hello, Wo", "rld! "]
    assert pulled == ["Hello, Wo", "rld! ST", "OP and more"]


def test_stop_string_spanning_single_character_tokens():
    out = list(stream_until_stop(iter("say <end> now"), ["<end>"]))
    assert "".join(out) == "say "
    assert all("<" not in piece for piece in out)


def test_partial_match_is_held_back_then_released():
    matcher = StopStrings(["</s>"])
    assert matcher.feed("abc<") == "abc"
    assert matcher.feed("/") == ""
    assert matcher.feed("x") == "</x"
    assert not matcher.stopped
    assert matcher.feed("</") == ""
    assert matcher.flush() == "</"  # the stream ended: it can no longer become a stop string


def test_false_start_prefix_still_finds_the_stop():
    # "ab" + "a" breaks the first attempt, but the second "ab" begins a real "abc".
    assert "".join(stream_until_stop(["ab", "ab", "c", "tail"], ["abc"])) == "ab"
    assert "".join(stream_until_stop(["xaab", "abcz"], ["abc"])) == "xaab"


def test_stop_inside_one_piece_drops_the_rest():
    assert list(stream_until_stop(["fooSTOPbar"], ["STOP"])) == ["foo"]
    assert list(stream_until_stop(["aSTOP"], ["STOP"])) == ["a"]


def test_a_stop_counts_only_after_text_that_is_not_whitespace():
    """Issue 24: a chat reply came back empty because the model wrote the stop string first. A stop at
    the start, or after only whitespace, is text; the next one ends it."""
    chat = ["\n\n", "\nUser:"]
    assert "".join(stream_until_stop(["\n", "\nHolmes", " said.\n\nUser: hi"], chat)) == "\n\nHolmes said."
    assert "".join(stream_until_stop(["\nUser: hi", "\nUser: again"], chat)) == "\nUser: hi"
    assert list(stream_until_stop(["STOP"], ["STOP"])) == ["STOP"]  # the stream ended: it is the text
    assert "".join(stream_until_stop([" ", " STOP", "x STOP y"], ["STOP"])) == "  STOPx "
    matcher = StopStrings(["\n\n"])
    assert matcher.feed("\n\n") == "\n\n" and matcher.feed("a\n") == "a" and matcher.feed("\nb") == ""
    assert matcher.stopped


def test_earliest_of_several_stops_wins_even_when_a_longer_one_finishes_later():
    assert "".join(stream_until_stop(["x\nUs", "er: hi"], ["\nUser:", "hi"])) == "x"
    assert "".join(stream_until_stop(["x\nUs", "ex hi"], ["\nUser:", "hi"])) == "x\nUsex "
    # "en" completes first, but "<end>" began earlier: wait for it before deciding where to cut.
    assert "".join(stream_until_stop(["a<en", "d>"], ["<end>", "en"])) == "a"
    assert "".join(stream_until_stop(["a<en", "x"], ["<end>", "en"])) == "a<"
    assert "".join(stream_until_stop(["a<en"], ["<end>", "en"])) == "a<"


def test_no_stops_yields_pieces_unchanged():
    assert list(stream_until_stop(["a", "", "b"], [])) == ["a", "", "b"]
    matcher = StopStrings()  # the matcher alone, without stops, holds nothing back
    assert matcher.feed("ab") == "ab" and matcher.flush() == "" and matcher.stopped is False


def test_the_first_occurrence_of_a_stop_in_a_piece_cuts_it():
    assert list(stream_until_stop(["aSTOPbSTOPc"], ["STOP"])) == ["a"]
    assert list(stream_until_stop(["xy", "aSTOPbSTOP"], ["STOP"])) == ["xy", "a"]


def test_a_found_stop_is_final_even_if_a_longer_stop_begins_at_the_same_place():
    """ "ab" is a stop; "abc" could still complete from the same index, but it would cut at the same place:
    stop now, without pulling another piece."""
    pulled = []

    def pieces():
        for piece in ["x", "ab", "c", "never"]:
            pulled.append(piece)
            yield piece

    assert list(stream_until_stop(pieces(), ["abc", "ab"])) == ["x"]
    assert pulled == ["x", "ab"]


def test_after_a_stop_nothing_more_is_released():
    matcher = StopStrings(["END"])
    assert matcher.feed("abEN") == "ab" and matcher.stopped is False
    assert matcher.feed("D tail") == "" and matcher.stopped is True
    assert matcher.feed("more") == "" and matcher.flush() == ""


def test_empty_stop_string_is_an_error():
    with pytest.raises(AnexaError) as error:
        StopStrings(["\n", ""])
    assert str(error.value) == "--stop needs a non-empty string"


def test_chain_that_removes_every_token_is_an_error():
    class RemoveAll:
        order = 60

        def __call__(self, logits, context):
            return torch.full_like(logits, float("-inf"))

    with pytest.raises(AnexaError) as error:
        SamplerChain([RemoveAll()]).pick(torch.zeros(2, 3), torch.zeros(2, 0, dtype=torch.long))
    assert str(error.value).startswith("the sampling chain ") and str(error.value).endswith(
        " removed every token: loosen its options"
    )

    class RemoveSecondRow:
        order = 60

        def __call__(self, logits, context):
            return torch.cat([logits[:1], torch.full_like(logits[1:], float("-inf"))])

    with pytest.raises(AnexaError, match="removed every token"):  # one empty row is enough
        SamplerChain([RemoveSecondRow()]).pick(torch.zeros(2, 3), torch.zeros(2, 0, dtype=torch.long))
