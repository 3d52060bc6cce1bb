"""The batched engine: rows at different lengths decode together exactly as each would alone.

Continuous batching (more requests than rows: finished ones leave, waiting ones take their row), both
context policies past the window, greedy and seeded sampling, blocks and attention plugins that cannot
batch (run one row at a time), stop ids, cancellation, a bounded queue, and log-probabilities equal to the
model's own log-softmax.
"""

import dataclasses

import pytest
import torch
from helpers import TINY, Greedy, Scaled, ScaledPlugin, registered, tiny_model

from anexa_core.errors import AnexaError
from anexa_core.infer.engine import Engine, EngineBusy, Request, score, token_logprobs
from anexa_core.infer.generation import generate_ids
from anexa_core.infer.sampling import build_chain


def _prompts(count: int, seed: int = 0) -> list[list[int]]:
    generator = torch.Generator().manual_seed(seed)
    lengths = [1, 5, 9, 14, 16, 20, 3, 7, 11, 2, 13, 6, 8, 4, 15, 10][:count]
    return [torch.randint(0, TINY.vocab_size, (n,), generator=generator).tolist() for n in lengths]


def _run(engine: Engine, requests: list[Request]) -> list[list[int]]:
    out: list[list[int]] = [[] for _ in requests]
    for index, token in engine.run(requests):
        out[index].append(token.id)
    return out


def _alone(model, request: Request, seed: int | None) -> list[int]:
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    return list(
        generate_ids(
            model, request.prompt_ids, request.max_new_tokens, request.chain, generator, context=request.context
        )
    )


@pytest.mark.parametrize("blocks", ["gpt2", "llama"])
@pytest.mark.parametrize("sampler", [[], ["temperature=0"]])
def test_rows_at_different_lengths_decode_as_each_would_alone(blocks, sampler):
    """Eight requests (prompts of 1–20 tokens, 18–40 new ones, past the 16-token window under both policies)
    on three rows, so rows leave and join while others run: the same tokens, and the same log-probabilities
    as one row at a time — a tiny random model's picks barely depend on the context, so only its
    probabilities show a row that lost its cache."""
    model = tiny_model(seed=3, blocks=blocks)
    requests = [
        Request(
            p, 18 + 7 * i % 23, build_chain(sampler), seed=100 + i, context="shift" if i % 2 else "sliding", logprobs=0
        )
        for i, p in enumerate(_prompts(8))
    ]
    engine = Engine(model, max_rows=3)
    together = _run(engine, requests)
    assert together == [_alone(model, r, 100 + i) for i, r in enumerate(requests)]
    assert engine.max_rows == 3 and not engine.busy
    single = Engine(model, max_rows=1)
    _run(single, requests)
    for batched, alone in zip(engine.last_streams, single.last_streams, strict=True):
        torch.testing.assert_close([t.logprob for t in batched.tokens], [t.logprob for t in alone.tokens])


def test_a_seeded_request_gives_the_same_tokens_alone_or_beside_fifteen_others():
    model = tiny_model(seed=4, blocks="llama")
    requests = [Request(p, 25, build_chain(["top_p=0.9"]), seed=7 + i) for i, p in enumerate(_prompts(16, seed=1))]
    together = _run(Engine(model, max_rows=16), requests)
    for index, request in enumerate(requests):
        assert _run(Engine(model, max_rows=16), [request]) == [together[index]]


def test_plugins_that_cannot_batch_run_one_row_at_a_time_correctly(register_plugin):
    """The reference blocks have no `batched`: the engine runs their requests one row at a time. The `scaled`
    attention declares neither grouped-query nor ragged support: the model repeats its key/value heads and
    attends row by row over each row's own keys."""
    reference = tiny_model(seed=5, blocks="reference", n_layer=1)
    engine = Engine(reference, max_rows=4)
    assert engine.max_rows == 1
    requests = [Request(p, 6, Greedy()) for p in _prompts(3)]
    assert _run(engine, requests) == [_alone(reference, r, None) for r in requests]
    with registered(ScaledPlugin(), "scaled-test"):
        model = tiny_model(seed=6, blocks="llama", attention="scaled", blocks_options={"n_kv_head": 1})
        exact = tiny_model(seed=6, blocks="llama", blocks_options={"n_kv_head": 1})
        requests = [Request(p, 20, Greedy()) for p in _prompts(5)]
        assert _run(Engine(model, max_rows=3), requests) == _run(Engine(exact, max_rows=3), requests)
        assert not hasattr(Scaled, "ragged")


def test_a_misspelt_context_policy_is_refused_with_the_closest_one():
    engine = Engine(tiny_model())
    with pytest.raises(AnexaError, match=r"^unknown context policy 'slidng': did you mean 'sliding'\? choose one of"):
        engine.submit(Request([1, 2], 3, Greedy(), context="slidng"))
    assert not engine.busy


def test_a_stop_id_ends_the_reply_and_is_not_part_of_it():
    model = tiny_model(seed=7)
    free = _run(Engine(model), [Request([1, 2, 3], 30, Greedy())])[0]
    stop = free[5]
    engine = Engine(model)
    tokens = _run(engine, [Request([1, 2, 3], 30, Greedy(), stop_ids={stop})])[0]
    assert tokens == free[: free.index(stop)] and engine.last_streams[0].finish_reason == "stop"
    assert _run(Engine(model), [Request([1, 2, 3], 0, Greedy())]) == [[]]


def test_cancelled_requests_free_their_row_and_the_queue_is_bounded():
    model = tiny_model(seed=8)
    engine = Engine(model, max_rows=2, max_waiting=1)
    first, second = (engine.submit(Request([1, 2], 50, Greedy())) for _ in range(2))
    engine.step()
    assert len(engine.rows) == 2
    waiting = engine.submit(Request([3], 5, Greedy()))
    with pytest.raises(EngineBusy, match="the engine is busy: 2 requests running and 1 waiting"):
        engine.submit(Request([4], 5, Greedy()))
    engine.cancel(first)
    engine.step()
    assert first.finish_reason == "cancelled" and waiting in engine.rows and second in engine.rows
    while engine.busy:
        engine.step()
    assert (second.finish_reason, waiting.finish_reason) == ("length", "length")
    assert len(second.tokens) == 50 and len(waiting.tokens) == 5


def test_logprobs_are_the_models_log_softmax_and_echo_scores_the_prompt():
    model = tiny_model(seed=9, blocks="llama")
    prompt = _prompts(1, seed=3)[0] + [5, 6, 7]
    engine = Engine(model)
    list(engine.run([Request(prompt, 4, Greedy(), logprobs=3, echo=True)]))
    stream = engine.last_streams[0]
    ids = torch.tensor([prompt + [t.id for t in stream.tokens]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids)[0].double(), -1)[0]
    for step, token in enumerate(stream.tokens):
        position = len(prompt) - 1 + step
        assert token.logprob == pytest.approx(float(logp[position, token.id]), abs=1e-4)
        assert [i for i, _ in token.top] == logp[position].topk(3).indices.tolist()
    assert stream.prompt_logprobs[0] is None and len(stream.prompt_logprobs) == len(prompt)
    for t, entry in enumerate(stream.prompt_logprobs[1:], start=1):
        assert entry[0] == pytest.approx(float(logp[t - 1, prompt[t]]), abs=1e-4)
        assert [i for i, _ in entry[1]] == logp[t - 1].topk(3).indices.tolist()  # the prompt's alternatives too
    scores = token_logprobs(model, torch.tensor([prompt]))
    assert [s for s, _ in scores[0]] == pytest.approx([e[0] for e in stream.prompt_logprobs[1:]], abs=1e-6)
    assert all(alternatives == [] for _, alternatives in scores[0])  # no alternatives unless asked for


def test_echo_of_a_prompt_longer_than_the_context_scores_its_last_block_size_plus_one_tokens():
    """lm-evaluation-harness's rolling loglikelihood sends windows of block_size + 1 tokens: the last
    block_size + 1 ids are scored (the first from nothing, each other from the ids before it), in one
    forward pass; ``logprobs: 0`` gives no alternatives."""
    model = tiny_model(seed=4)
    block = model.config.block_size
    prompt = [(7 * i) % 36 + 1 for i in range(block + 7)]
    engine = Engine(model)
    list(engine.run([Request(prompt, 0, Greedy(), logprobs=0, echo=True)]))
    scored = engine.last_streams[0].prompt_logprobs
    assert engine.forwards == 1 and len(scored) == block + 1 and scored[0] is None
    assert engine.last_streams[0].finish_reason == "length" and not engine.last_streams[0].tokens
    last = torch.tensor([prompt[-(block + 1) :]])
    with torch.no_grad():
        logp = torch.log_softmax(model(last[:, :-1])[0].double(), -1)[0]
    assert [entry[0] for entry in scored[1:]] == pytest.approx(
        logp.gather(1, last[0, 1:, None])[:, 0].tolist(), abs=1e-5
    )
    assert all(entry[1] == [] for entry in scored[1:])
    list(engine.run([Request(prompt[:9], 0, Greedy(), logprobs=0, echo=True)]))
    assert engine.forwards == 2  # the counter benchmarks read: one more pass for the next echo


def test_a_ragged_batch_equals_each_row_through_sdpa_and_math():
    """The same ragged step through the two built-in attentions that take `lengths` natively."""
    for attention in ("sdpa", "math"):
        model = tiny_model(seed=10, blocks="llama", attention=attention, blocks_options={"n_kv_head": 2})
        requests = [Request(p, 12, Greedy()) for p in _prompts(6, seed=5)]
        assert _run(Engine(model, max_rows=6), requests) == [_alone(model, r, None) for r in requests]


def test_tiny_config_is_what_the_tests_assume():
    assert dataclasses.replace(TINY).block_size == 16


def test_num_samples_are_the_single_seed_texts_decoded_as_one_batch(sherlock_path):
    """`anexa generate --num-samples N`: sample i is what generate_text gives alone with seed + i, stop
    strings cut each sample where it appears."""
    from helpers import trained_tokenizer

    from anexa_core.infer.generation import generate_samples, generate_text

    tokenizer = trained_tokenizer("char", sherlock_path.read_text(encoding="utf-8")[:20_000])
    model = tiny_model(seed=11, vocab_size=tokenizer.vocab_size, blocks="llama")
    chain = build_chain(["temperature=1.5"])
    samples = generate_samples(model, tokenizer, "Holmes", 5, 30, chain, seed=40, stop=["e "])
    alone = ["".join(generate_text(model, tokenizer, "Holmes", 30, chain, 40 + i, ["e "])) for i in range(5)]
    assert samples == alone and len(set(samples)) > 1


def test_the_cache_grows_as_rows_lengthen_and_a_narrowed_view_cannot_grow():
    """Buffers start at what the prompts need (64 positions at least) and double up to the context, so a
    long context costs memory only when used; decoding across the doublings equals recomputation."""
    from anexa_core.model.cache import MIN_CAPACITY, KVCache

    model = tiny_model(seed=12, blocks="llama", block_size=300)
    requests = [Request(p, 150, Greedy()) for p in _prompts(3, seed=7)]
    engine = Engine(model, max_rows=3)
    out: list[list[int]] = [[] for _ in requests]
    capacities = set()
    for index, token in engine.run(requests):
        out[index].append(token.id)
        capacities.add(engine._cache.capacity if engine._cache is not None else 0)
    assert out == [_alone(model, r, None) for r in requests]
    assert MIN_CAPACITY in capacities and MIN_CAPACITY < max(capacities) <= 300
    assert engine._cache is None  # idle: the batch's memory is given back
    cache = KVCache(300)
    model(torch.tensor([[1, 2, 3]]), cache=cache)
    assert cache.capacity == MIN_CAPACITY
    batch = KVCache.batch_like(cache, 2)
    batch.copy_row(0, cache)
    view = batch.narrow(1)
    with pytest.raises(
        ValueError, match=r"^a narrowed KV cache cannot grow: reserve\(\) on the cache it was narrowed from$"
    ):
        view.update(0, torch.zeros(1, 4, 70, 8), torch.zeros(1, 4, 70, 8))


class _Recording:
    """Greedy, recording the context each pick is given."""

    def __init__(self):
        self.contexts = []

    def pick(self, logits, context, generator=None):
        self.contexts.append(context.tolist())
        return logits.argmax(dim=-1, keepdim=True)


def test_the_samplers_see_the_whole_history_as_one_row_however_long_it_grows():
    """Repetition penalties read the context: each pick gets (1, T) — the prompt and every token so far,
    past the context window and the buffer's doublings."""
    model = tiny_model(seed=6)
    chains = [_Recording(), _Recording()]
    prompts = [[3, 1, 4], [2, 7]]
    engine = Engine(model, max_rows=2)
    list(engine.run([Request(p, 40, chain) for p, chain in zip(prompts, chains, strict=True)]))
    for prompt, chain, stream in zip(prompts, chains, engine.last_streams, strict=True):
        generated = [t.id for t in stream.tokens]
        assert chain.contexts == [[prompt + generated[:n]] for n in range(40)]


def test_closing_the_run_early_cancels_what_still_runs_and_frees_its_rows():
    model = tiny_model(seed=2)
    engine = Engine(model, max_rows=2)
    tokens = engine.run([Request([1, 2], 30, Greedy()), Request([3], 30, Greedy()), Request([4], 30, Greedy())])
    next(tokens)
    tokens.close()
    assert [s.finish_reason for s in engine.last_streams] == ["cancelled"] * 3
    assert not engine.busy and not engine.rows and not engine.waiting


def test_token_logprobs_score_every_token_after_the_first():
    model = tiny_model(seed=1)
    assert token_logprobs(model, torch.tensor([[5], [6], [7]])) == [[], [], []]  # nothing to score
    two = token_logprobs(model, torch.tensor([[5, 9], [6, 2]]), top=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([[5], [6]]))[0].double(), -1)[:, 0]
    for row, (target, scores) in enumerate(zip((9, 2), two, strict=True)):
        assert len(scores) == 1 and scores[0][0] == pytest.approx(float(logp[row, target]), abs=1e-5)
        assert [i for i, _ in scores[0][1]] == logp[row].topk(2).indices.tolist()


def test_score_computes_in_the_precision_asked_for():
    """``anexa eval --precision`` scores as training evaluates: fp32 is exact, bf16 rounds."""
    model = tiny_model(seed=3)
    ids = torch.tensor([[(5 * i) % 37 for i in range(16)]])
    with torch.no_grad():
        exact = torch.log_softmax(model.double()(ids[:, :-1])[0], -1).gather(-1, ids[:, 1:, None])[..., 0]
    model.float()
    fp32, _ = score(model, ids, "fp32")
    bf16, _ = score(model, ids, "bf16")
    assert (fp32.double() - exact).abs().max().item() < 1e-5
    assert 1e-4 < (bf16.double() - exact).abs().max().item() < 0.1


def test_a_request_cancelled_while_waiting_never_runs_and_each_token_costs_one_forward_pass():
    model = tiny_model(seed=5)
    engine = Engine(model, max_rows=1)
    first = engine.submit(Request([1, 2, 3], 6, Greedy()))
    waiting = engine.submit(Request([4], 6, Greedy()))
    third = engine.submit(Request([5, 6], 6, Greedy()))
    engine.cancel(waiting)
    engine.step()
    assert waiting.finish_reason == "cancelled" and waiting not in engine.waiting and not waiting.tokens
    while engine.busy:
        engine.step()
    assert [len(first.tokens), len(waiting.tokens), len(third.tokens)] == [6, 0, 6]
    assert engine.forwards == 12  # per request: one prefill, then one pass per further token


def test_the_kv_cache_budget_bounds_the_batch_and_what_waits_gets_its_turn():
    """With ``max_cache_tokens`` the batch's cache never holds more positions (rows × capacity) than the
    budget: requests wait for room, in order, and decode what they decode alone; a request that could not
    fit even alone is refused at once, in one line. Without a budget every row may run."""
    model = tiny_model(seed=3, blocks="llama", block_size=256)
    requests = [Request(p, 40, Greedy()) for p in _prompts(5, seed=2)]  # each may reach < 64 positions
    expected = [_alone(model, r, None) for r in requests]
    for budget, most_rows in ((2 * 64, 2), (4 * 64, 4), (None, 5)):
        engine = Engine(model, max_rows=5, max_cache_tokens=budget)
        out: list[list[int]] = [[] for _ in requests]
        rows, held = set(), set()
        for index, token in engine.run(requests):
            out[index].append(token.id)
            rows.add(len(engine.rows))
            cache = engine._cache
            held.add(0 if cache is None else cache.rows * cache.capacity)
        assert out == expected and max(rows) == most_rows, (budget, rows)
        assert budget is None or max(held) <= budget
    engine = Engine(model, max_rows=5, max_cache_tokens=2 * 64 - 1)
    assert engine.cache_positions(2, 40, 10) == 128 and engine.cache_positions(1, 40, 10) == 64
    assert engine.cache_positions(1, 65, 10) == 128 and engine.cache_positions(1, 150, 100) == 200  # doubled once
    assert engine.cache_positions(1, 250, 100) == 256  # at most the context
    engine.submit(requests[0])
    with pytest.raises(AnexaError, match="may need 128 KV-cache positions") as asked:  # 10 + 100: 64, doubled to 128
        Engine(model, max_rows=5, max_cache_tokens=127).submit(Request(list(range(1, 11)), 100, Greedy()))
    assert str(asked.value).endswith(": ask for fewer new tokens or a shorter prompt") and not asked.value.by_prompt
    Engine(model, max_rows=5, max_cache_tokens=128).submit(Request(list(range(1, 11)), 100, Greedy()))
    with pytest.raises(AnexaError, match=r"may need 256 KV-cache positions .* more than the engine's 255") as caught:
        Engine(model, max_rows=5, max_cache_tokens=255).submit(Request(list(range(1, 200)), 57, Greedy()))
    # 199 prompt tokens need 256 positions with a single new one: the prompt is the cause
    assert "\n" not in str(caught.value) and str(caught.value).endswith(": shorten the prompt")
    assert caught.value.by_prompt
    with pytest.raises(AnexaError, match="may need 256 KV-cache positions"):  # one new token needs a cache too
        Engine(model, max_cache_tokens=127).submit(Request(list(range(1, 37)) * 5, 1, Greedy()))
    with pytest.raises(ValueError, match=r"^max_cache_tokens must be at least 1$"):
        Engine(model, max_cache_tokens=0)
    with pytest.raises(ValueError, match=r"^max_rows must be at least 1$"):
        Engine(model, max_rows=0)
    for budget in (1, 2, 63):
        with pytest.raises(
            AnexaError, match=rf"a KV-cache budget of {budget} positions fits no request: .* at least 64"
        ):
            Engine(model, max_cache_tokens=budget)
    scored = Engine(model, max_cache_tokens=64)  # a prompt only scored (echo) takes no cache, whatever its length
    list(scored.run([Request(list(range(1, 37)) * 5, 0, Greedy(), echo=True)]))
    assert len(scored.last_streams[0].prompt_logprobs or []) == 180
    # Whether a request fits alone does not depend on the rows the batch holds now: it waits for them.
    busy = Engine(model, max_rows=4, max_cache_tokens=4 * 64)
    running = [busy.submit(r) for r in requests[:4]]
    busy.step()
    assert busy._cache is not None and busy._cache.rows == 4
    later = busy.submit(Request(list(range(1, 11)), 110, Greedy()))  # alone: 64 doubled to 128 < 4 × 64
    busy.step()
    assert later not in busy.rows and busy._cache.capacity == 64
    while len(later.tokens) < 60:  # 10 + 60 positions: `later` has grown the cache past 64
        busy.step()
    assert busy._cache.capacity == 128 and busy.cache_positions(1, 10, 1) == busy._cache.rows * 128
    while busy.busy:
        busy.step()
    assert all(s.finish_reason == "length" for s in [*running, later])
    # Even one new token needs a row's cache: beside a row of 128 positions it waits within 128.
    tight = Engine(model, max_rows=4, max_cache_tokens=128)
    long = tight.submit(Request(list(range(1, 11)), 110, Greedy()))
    tight.step()
    one = tight.submit(Request(list(range(1, 11)), 1, Greedy()))
    tight.step()
    assert not one.done and one in tight.waiting and tight.rows == [long]
    while tight.busy:
        tight.step()
    assert one.finish_reason == long.finish_reason == "length" and len(one.tokens) == 1


def test_requests_joining_a_running_batch_grow_its_rows_without_touching_the_running_ones():
    """The batch's cache holds only the rows running: a request arriving mid-decode grows it (1 → 2 → 4
    rows), and the rows already decoding keep their keys and values — every output is its own alone. (Weights
    scaled up: the small random model's greedy output would not depend on its context, so not on its cache.)"""
    model = tiny_model(seed=5, block_size=128)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.mul_(10)
    assert len(set(_alone(model, Request(_prompts(1, seed=9)[0], 30, Greedy()), None))) > 3
    requests = [Request(p, 30, Greedy()) for p in _prompts(4, seed=9)]
    engine = Engine(model, max_rows=4)
    streams = [engine.submit(requests[0])]
    for _ in range(5):
        engine.step()
    assert engine._cache is not None and engine._cache.rows == 1
    assert engine._rows_for(1) == 1 and engine._rows_for(2) == 2 and engine._rows_for(3) == 3
    streams.append(engine.submit(requests[1]))
    engine.step()
    assert engine._cache.rows == 2
    for _ in range(3):
        engine.step()
    streams += [engine.submit(r) for r in requests[2:]]
    engine.step()
    assert engine._cache.rows == 4
    # What is allocated counts, however few rows or positions the question is about: 4 rows of 64 positions.
    assert engine._cache.capacity == 64
    assert engine._rows_for(2) == 4 and engine.cache_positions(1, 10, 1) == 4 * 64
    while engine.busy:
        engine.step()
    assert [[t.id for t in s.tokens] for s in streams] == [_alone(model, r, None) for r in requests]
