"""The one inference engine: ``generate``, ``chat``, ``eval`` and the server all decode through it.

Continuous batching, as llama.cpp's server, vLLM and TGI do it: every running request is a *row* of one
batch; each :meth:`Engine.step` feeds every row its last token in one forward pass (rows at different
lengths: a ragged :class:`~anexa_core.model.cache.KVCache`) and picks each row's next token with that
request's own sampler chain and seeded generator. A finished or cancelled request leaves its row at the
next step and a waiting one takes it, its prompt prefilled on its own and copied in. Memory is bounded:
at most ``max_rows`` rows of at most ``block_size`` positions, ``max_waiting`` requests in line, and —
with ``max_cache_tokens`` — the batch's KV cache at most that many positions (rows × capacity): a request
waits until it fits. The cache holds only the rows running (grown by doubling) and is freed when the
engine falls idle.

Past the context, a row follows its request's *context policy*:

- ``shift`` (default): keep the most recent half of the window, recompute it once, and continue one
  position per token until the window is full again. Each recompute buys ``block_size / 2`` cheap
  tokens. The model sees between half and all of ``block_size`` tokens.
- ``sliding``: nanoGPT's ``generate`` exactly — every token predicted from the last ``block_size``
  tokens, recomputing the window for each token once it is full.

Both equal recomputation until the window first fills; ``use_cache=False`` recomputes always (the
reference the cache is tested and benchmarked against). Models whose blocks cannot decode rows at
different positions (no ``batched``) run their requests one row at a time, correctly.
"""

from __future__ import annotations

import math
import threading
from collections import deque
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from anexa_core.device import autocast, decoding_autocast
from anexa_core.errors import AnexaError, choose_one_of
from anexa_core.infer.sampling import pick_rows
from anexa_core.model.cache import MIN_CAPACITY, KVCache, grown_capacity
from anexa_core.model.gpt import GPT

CONTEXT_POLICIES = ("shift", "sliding")


@dataclass
class Request:
    """One sequence to decode.

    ``prompt_ids``: at least one id (cropped from the left to the context). ``chain``: what picks each
    token, ``chain.pick(logits (1, V), context (1, T), generator) -> (1, 1)`` (a
    :class:`~anexa_core.infer.sampling.SamplerChain`; a chain that also has ``process`` only processes its
    row, drawn with the others': :func:`~anexa_core.infer.sampling.pick_rows`). ``seed``: the request's own generator (``None``:
    torch's global one; ``generator`` gives one explicitly). ``stop_ids``: ids that end the reply (the
    tokenizer's end of turn; not part of the output). ``logprobs``: ``None``, or N ≥ 0 — each generated
    token's log-probability under the model (natural log) and the N most likely alternatives; ``echo``:
    also the prompt's (each token given the ones before it; the first has none).
    """

    prompt_ids: Sequence[int]
    max_new_tokens: int
    chain: Any
    seed: int | None = None
    generator: torch.Generator | None = None
    stop_ids: Collection[int] = ()
    context: str = "shift"
    logprobs: int | None = None
    echo: bool = False


@dataclass(frozen=True)
class Token:
    """A generated token: its id, its log-probability (``None`` unless asked for) and the top alternatives
    ``[(id, logprob), …]`` (most likely first)."""

    id: int
    logprob: float | None = None
    top: list[tuple[int, float]] | None = None


@dataclass(eq=False)  # each stream is itself: rows.remove and `in` must never take an equal-looking other
class Stream:
    """A request while the engine runs it. ``tokens``: generated so far (a stop id is not among them);
    ``finish_reason``: ``None`` while running, then ``"stop"`` (a stop id), ``"length"``
    (``max_new_tokens``) or ``"cancelled"``; ``prompt_tokens``: the prompt as fed (cropped);
    ``prompt_logprobs``: with ``echo``, one per prompt token of the last ``block_size + 1`` (``None`` for the
    first)."""

    request: Request
    prompt: list[int]
    generator: torch.Generator | None
    on_token: Callable[[Token], None] | None = None
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]] | None] | None = None
    history: list[int] = field(default_factory=list)
    row: int | None = None  # its slot in the batch's cache
    _context: torch.Tensor | None = None  # the history as a (1, capacity) tensor, doubled when full
    _filled: int = 0
    cache: KVCache | None = None  # its own, when the engine runs one row at a time
    cancelled: bool = False

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def context(self, device: torch.device) -> torch.Tensor:
        """Every id so far (prompt and generated) as a (1, T) int64 tensor for the samplers, kept in a buffer
        that doubles when full, so each token costs O(1) however long the history."""
        if self._context is None or self._context.size(1) < len(self.history):
            capacity = max(16, 2 * len(self.history))
            grown = torch.empty(1, capacity, dtype=torch.long, device=device)
            grown[0, : self._filled] = self._context[0, : self._filled] if self._context is not None else grown[0, :0]
            self._context = grown
        if self._filled < len(self.history):
            self._context[0, self._filled : len(self.history)] = torch.tensor(
                self.history[self._filled :], device=device
            )
            self._filled = len(self.history)
        return self._context[:, : self._filled]

    @property
    def prompt_tokens(self) -> int:
        return len(self.prompt)


def check_context_policy(context: str) -> None:
    """Raises :class:`AnexaError` naming the closest policy when ``context`` is not one of
    :data:`CONTEXT_POLICIES` — what an interface calls before it loads a model."""
    if context not in CONTEXT_POLICIES:
        raise AnexaError(f"unknown context policy {context!r}: {choose_one_of(context, CONTEXT_POLICIES)}")


class EngineBusy(AnexaError):
    """Every row is taken and the waiting line is full."""


class CacheBudgetExceeded(AnexaError):
    """A request could not fit the engine's KV-cache budget (``max_cache_tokens``) even alone; ``by_prompt``:
    not even with a single new token (its prompt is the cause, not how many tokens it asks for)."""

    def __init__(self, message: str, by_prompt: bool = False) -> None:
        super().__init__(message)
        self.by_prompt = by_prompt


class Engine:
    """Decodes many requests together; see the module docstring.

    ``max_rows``: requests decoded at once (rows of the batch); ``max_waiting``: requests that may wait for
    a row (beyond: :class:`EngineBusy`); ``max_cache_tokens``: the most positions the batch's KV cache may
    hold, rows × capacity (``None``: ``max_rows × block_size``, the most it can need; below the smallest
    cache, ``min(block_size, MIN_CAPACITY)``, :class:`AnexaError`); each running request counts for the
    longest it may get, ``min(block_size, prompt + max_new_tokens)``, rounded up as the cache grows (see
    :meth:`cache_positions`); a request for no new tokens (``echo`` only) takes no cache. ``use_cache=False``
    recomputes the window for every token.
    :meth:`submit` and :meth:`cancel` may be called from any thread; :meth:`step` from one thread at a time.
    """

    def __init__(
        self,
        model: GPT,
        max_rows: int = 8,
        max_waiting: int | None = None,
        use_cache: bool = True,
        max_cache_tokens: int | None = None,
    ):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        if max_cache_tokens is not None and max_cache_tokens < 1:
            raise ValueError("max_cache_tokens must be at least 1")
        self.max_cache_tokens = max_cache_tokens
        self.model = model.eval()
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        smallest = min(self.block_size, MIN_CAPACITY)
        if max_cache_tokens is not None and max_cache_tokens < smallest:
            raise AnexaError(
                f"a KV-cache budget of {max_cache_tokens:,} positions fits no request: the smallest cache holds "
                f"{smallest} (the context or {MIN_CAPACITY}); give at least {smallest}"
            )
        self.max_rows = max_rows if getattr(model, "batched", False) and use_cache else 1
        self.max_waiting = max_waiting
        self.use_cache = use_cache
        self.rows: list[Stream] = []  # running, in row order (row i of the batch cache)
        self.waiting: deque[Stream] = deque()
        self._cache: KVCache | None = None  # the batch's ragged cache, when more than one row
        self._no_context = torch.zeros(1, 0, dtype=torch.long, device=self.device)  # for chains that read none
        self._lock = threading.Lock()
        self.forwards = 0  # forward passes run: one per step, per prefill and per cache probe (benchmarks read it)

    # --- the outside world -------------------------------------------------------------------------

    def submit(self, request: Request, on_token: Callable[[Token], None] | None = None) -> Stream:
        """Queue ``request``; ``on_token`` is called (from the stepping thread) for each generated token.
        Raises :class:`AnexaError` for an empty prompt or an unknown context policy, :class:`EngineBusy`
        when the line is full."""
        if not request.prompt_ids:
            raise AnexaError("the prompt is empty: give at least one character of text")
        check_context_policy(request.context)
        generator = request.generator
        if generator is None and request.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(request.seed)
        prompt = list(request.prompt_ids)[-self.block_size :]
        stream = Stream(request, prompt, generator, on_token, history=list(prompt))
        alone = self._grown(len(prompt), self._longest(stream))  # a fresh cache of one row: the batch drains first
        if self.max_cache_tokens is not None and request.max_new_tokens > 0 and alone > self.max_cache_tokens:
            by_prompt = self._grown(len(prompt), min(self.block_size, len(prompt) + 1)) > self.max_cache_tokens
            raise CacheBudgetExceeded(
                f"this request may need {alone:,} KV-cache positions (its prompt of {len(prompt):,} tokens and "
                f"up to {request.max_new_tokens:,} new ones), more than the engine's {self.max_cache_tokens:,}: "
                + ("shorten the prompt" if by_prompt else "ask for fewer new tokens or a shorter prompt"),
                by_prompt,
            )
        with self._lock:
            if self.max_waiting is not None and len(self.rows) + len(self.waiting) >= self.max_rows + self.max_waiting:
                raise EngineBusy(
                    f"the engine is busy: {len(self.rows)} requests running and {len(self.waiting)} "
                    "waiting; retry shortly"
                )
            self.waiting.append(stream)
        return stream

    def cancel(self, stream: Stream) -> None:
        """Stop ``stream``; its row is freed at the next step."""
        stream.cancelled = True

    @property
    def busy(self) -> bool:
        """Whether any request is running or waiting."""
        return bool(self.rows or self.waiting)

    def run(self, requests: Sequence[Request]) -> Iterator[tuple[int, Token]]:
        """Decode ``requests`` together (at most ``max_rows`` at a time) and yield ``(index, token)`` as
        tokens come; the streams' states are in :attr:`last_streams` afterwards. Closing the iterator
        cancels what is still running."""
        produced: deque[tuple[int, Token]] = deque()

        def collect(index: int) -> Callable[[Token], None]:
            return lambda token: produced.append((index, token))

        self.last_streams = [self.submit(request, collect(index)) for index, request in enumerate(requests)]
        try:
            while self.busy:
                self.step()
                while produced:
                    yield produced.popleft()
        finally:
            for stream in self.last_streams:
                if not stream.done:
                    self.cancel(stream)
            if self.busy:
                self.step()  # frees the rows of what was cancelled

    # --- one step -----------------------------------------------------------------------------------

    def step(self) -> None:
        """One token for every running request: free what finished, admit what waits, recompute alone
        the rows that need it (a new prompt; a full window, by the context policy), feed every other row
        its last token in one forward pass, and pick each row's next token."""
        # Why complex: counted in the one-line comprehensions over the rows (which to recompute, which to
        # feed, which read their context); the step itself runs straight through.
        self._release()
        fresh = self._admit()
        if not self.rows:
            return
        lengths = self._cache.row_lengths() if self._cache is not None else []
        recompute = [s for s in self.rows if s in fresh or not self.use_cache or self._full(s, lengths)]
        computed = {id(s): self._alone(self._window(s, s in fresh)) for s in recompute}
        feed = [s for s in self.rows if id(s) not in computed]
        self._arrange(feed, [(s, computed[id(s)][0]) for s in recompute])
        logits = self._feed(feed) if feed else None
        rows = list(self.rows)
        every = self._in_row_order(rows, computed, logits)
        reads = [getattr(s.request.chain, "reads_context", True) for s in rows]  # else the history is not built
        contexts = [s.context(self.device) if read else self._no_context for s, read in zip(rows, reads, strict=True)]
        picks = pick_rows([s.request.chain for s in rows], every, contexts, [s.generator for s in rows])
        for index, (stream, picked) in enumerate(zip(rows, picks, strict=True)):
            self._accept(stream, picked, every, index)
        self._release()

    def _in_row_order(
        self, rows: list[Stream], computed: dict[int, tuple[KVCache | None, torch.Tensor]], logits: torch.Tensor | None
    ) -> torch.Tensor:
        """The logits (rows, V) of ``rows`` in their order: a recomputed row's own, a fed row's from ``logits``
        by its slot."""
        slots = [s.row or 0 for s in rows]  # one row at a time: row 0
        if logits is not None and not computed and slots == list(range(len(rows))):
            return logits  # the usual step: every row fed, in slot order
        pieces = []
        for stream, slot in zip(rows, slots, strict=True):
            if id(stream) in computed:
                pieces.append(computed[id(stream)][1])
            else:
                assert logits is not None
                pieces.append(logits[slot : slot + 1])
        return torch.cat(pieces)

    def _window(self, stream: Stream, fresh: bool) -> list[int]:
        """The ids to recompute: a new prompt whole; without a cache, or under ``sliding``, the last
        ``block_size`` ids; under ``shift``, the most recent half of the window."""
        if fresh or not self.use_cache or stream.request.context == "sliding":
            return stream.history[-self.block_size :]
        return stream.history[-max(1, self.block_size // 2) :]

    def _full(self, stream: Stream, lengths: list[int]) -> bool:
        """Whether feeding ``stream``'s last token would overflow its window (``lengths``: the batch's rows')."""
        length = len(stream.cache) if stream.cache is not None else lengths[stream.row or 0]
        return length >= self.block_size

    def _alone(self, ids: list[int]) -> tuple[KVCache | None, torch.Tensor]:
        """``ids`` through the model on their own: a fresh cache holding them (``None`` without a cache)
        and the logits (1, V) float32 after the last."""
        cache = KVCache(self.block_size) if self.use_cache else None
        return cache, self._forward(torch.tensor([ids], dtype=torch.long, device=self.device), cache)

    def _arrange(self, feed: list[Stream], recomputed: list[tuple[Stream, KVCache | None]]) -> None:
        """Give the rows to feed the batch's first slots (so one narrowed view covers them) and the
        recomputed rows the slots after, holding their fresh keys and values."""
        if self.max_rows == 1:
            for stream, cache in recomputed:
                stream.cache = cache
            return
        if self._cache is None:  # every row starts recomputed, so the first step has a cache to copy
            assert recomputed[0][1] is not None
            self._cache = KVCache.batch_like(recomputed[0][1], len(self.rows))
        elif self._cache.rows < len(self.rows):
            self._cache.resize_rows(self._rows_for(len(self.rows)))
        batch = self._cache
        free = sorted(
            {s.row for s, _ in recomputed if s.row is not None and s.row < len(feed)}
            | (set(range(len(feed))) - {s.row for s in self.rows if s.row is not None})
        )
        for stream in feed:
            if stream.row is not None and stream.row >= len(feed):
                target = free.pop(0)
                batch.copy_row(target, batch, stream.row)
                stream.row = target
        for slot, (stream, cache) in enumerate(recomputed, start=len(feed)):
            assert cache is not None
            batch.copy_row(slot, cache)
            stream.row = slot

    def _feed(self, feed: list[Stream]) -> torch.Tensor:
        """Logits (rows, V) float32 after feeding each row of ``feed`` its last token: one forward pass."""
        tokens = torch.tensor([[s.history[-1]] for s in sorted(feed, key=lambda s: s.row or 0)], device=self.device)
        if self.max_rows == 1:
            cache = feed[0].cache
        else:
            batch = self._batch
            batch.reserve(len(batch) + 1)  # a narrowed view cannot grow the buffers itself
            cache = batch.narrow(len(feed))
        return self._forward(tokens, cache)

    def _forward(self, ids: torch.Tensor, cache: KVCache | None) -> torch.Tensor:
        """Logits (rows, V) float32 after the last position of ``ids`` (rows, T) int64, through ``cache``;
        counted in :attr:`forwards`. (``no_grad`` as a context, not a decorator, so mutmut mutates callers.)"""
        with torch.no_grad(), decoding_autocast(self.device):
            logits, _ = self.model(ids, cache=cache, last_only=True)
        self.forwards += 1
        return logits[:, -1, :].float()

    def _release(self) -> None:
        for stream in [s for s in self.rows if s.cancelled or s.done]:
            if stream.finish_reason is None:
                stream.finish_reason = "cancelled"
            self.rows.remove(stream)
            if self._cache is not None and stream.row is not None:
                self._cache.free_row(stream.row)
            stream.row, stream.cache = None, None
        with self._lock:
            for stream in [s for s in self.waiting if s.cancelled]:
                self.waiting.remove(stream)
                stream.finish_reason = "cancelled"
        if not self.rows:
            self._cache = None  # idle: the batch's memory goes back (the next request allocates afresh)

    def _admit(self) -> list[Stream]:
        admitted = []
        while len(self.rows) < self.max_rows:
            with self._lock:
                if not self.waiting or not self._fits(self.waiting[0]):
                    break
                stream = self.waiting.popleft()
            if stream.request.echo:
                stream.prompt_logprobs = self._prompt_logprobs(stream)
            if stream.request.max_new_tokens < 1:
                stream.finish_reason = "length"
                continue
            self.rows.append(stream)
            admitted.append(stream)
        return admitted

    def cache_positions(self, rows: int, longest: int, first_prompt: int) -> int:
        """The most positions the batch's KV cache may hold with ``rows`` requests running, the longest of
        which may reach ``longest`` positions: rows as allocated (at least ``rows``: they grow by doubling)
        × the capacity the buffers grow to — from the batch's capacity now or, before there is a batch, from
        what its first prompt (``first_prompt`` positions) allocates (:meth:`_grown`)."""
        start = self._cache.capacity if self._cache is not None else first_prompt
        return max(rows, self._allocated) * self._grown(start, longest)

    def _grown(self, start: int, longest: int) -> int:
        """What a cache of this context whose buffers begin at ``start`` positions grows to for ``longest``
        (:func:`~anexa_core.model.cache.grown_capacity`)."""
        return grown_capacity(start, longest, self.block_size)

    @property
    def _allocated(self) -> int:
        """Rows the batch's cache holds now (0 without one)."""
        return self._cache.rows if self._cache is not None else 0

    def _longest(self, stream: Stream) -> int:
        """Positions ``stream`` may come to hold in the cache: its prompt and every new token, at most the
        context (past it, the context policy recomputes a shorter window)."""
        return min(self.block_size, len(stream.prompt) + stream.request.max_new_tokens)

    def _fits(self, stream: Stream) -> bool:
        """Whether ``stream`` may join the running rows within ``max_cache_tokens`` (always alone, and always
        when it asks for no new tokens: it never takes a row)."""
        if self.max_cache_tokens is None or not self.rows or stream.request.max_new_tokens < 1:
            return True
        longest = max(self._longest(s) for s in [*self.rows, stream])
        positions = self.cache_positions(self._rows_for(len(self.rows) + 1), longest, len(self.rows[0].prompt))
        return positions <= self.max_cache_tokens

    def _rows_for(self, running: int) -> int:
        """Rows to allocate for ``running`` requests: the current allocation, doubled until they fit (at
        most ``max_rows``)."""
        if running <= self._allocated:
            return self._allocated
        return min(self.max_rows, max(running, 2 * self._allocated))

    @property
    def _batch(self) -> KVCache:
        """The batch's ragged cache, made by :meth:`_arrange` from the first recomputed row's."""
        assert self._cache is not None
        return self._cache

    def _accept(self, stream: Stream, picked: int, logits: torch.Tensor, row: int) -> None:
        """``picked`` is the next token of ``stream`` (from ``logits[row]``); it finishes on a stop id or at its
        length."""
        request = stream.request
        token = (
            Token(picked)
            if request.logprobs is None
            else Token(picked, *self._logprobs(logits[row : row + 1], picked, request.logprobs))
        )
        stream.history.append(picked)
        if picked in request.stop_ids:
            stream.finish_reason = "stop"
            return
        stream.tokens.append(token)
        if stream.on_token is not None:
            stream.on_token(token)
        if len(stream.tokens) >= request.max_new_tokens:
            stream.finish_reason = "length"

    @staticmethod
    def _logprobs(logits: torch.Tensor, picked: int, top: int | None) -> tuple[float | None, list | None]:
        if top is None:
            return None, None
        logp = torch.log_softmax(logits.float(), dim=-1)[0]
        best = torch.topk(logp, top) if top else None
        alternatives = list(zip(best.indices.tolist(), best.values.tolist(), strict=True)) if best is not None else []
        return float(logp[picked]), alternatives

    def _prompt_logprobs(self, stream: Stream) -> list[tuple[float, list[tuple[int, float]]] | None]:
        """Each prompt token's log-probability given the ones before it (and the top alternatives), for the
        last ``block_size + 1`` prompt ids: the last one is scored from the ``block_size`` before it."""
        top = stream.request.logprobs or 0
        scored = list(stream.request.prompt_ids)[-(self.block_size + 1) :]
        scores = token_logprobs(self.model, torch.tensor([scored], device=self.device), top)
        self.forwards += 1
        return [None, *scores[0]]


def score(model: GPT, ids: torch.Tensor, precision: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The model's log-probabilities of given tokens — the one scoring pass ``echo``, lm-evaluation-harness's
    loglikelihood requests and ``anexa eval`` all use.

    ``ids`` (B, T) int64: one forward pass over ``ids[:, :-1]`` (so T may be ``block_size + 1``). Returns
    ``(chosen, logp)``: ``chosen`` (B, T − 1) float32, ``log p(ids[t] | ids[:t])`` for t ≥ 1 in nats, and
    ``logp`` (B, T − 1, V) float32, every token's. ``precision``: ``None`` for decoding's (float32 on a CPU,
    bf16 on CUDA), else ``fp32``/``auto``/``bf16`` as training has them."""
    context = decoding_autocast(ids.device) if precision is None else autocast(ids.device, precision)
    with torch.no_grad(), context:
        logits, _ = model(ids[:, :-1])
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, ids[:, 1:, None])[..., 0], logp


def token_logprobs(model: GPT, ids: torch.Tensor, top: int = 0) -> list[list[tuple[float, list[tuple[int, float]]]]]:
    """For each row of ``ids`` (B, T) int64 and each position t ≥ 1: ``(log p(ids[t] | ids[:t]), the top
    alternatives)`` in natural log (:func:`score`). Used for ``echo`` and lm-evaluation-harness's
    loglikelihood requests."""
    if ids.size(1) < 2:
        return [[] for _ in range(ids.size(0))]
    chosen, logp = score(model, ids)
    best = torch.topk(logp, top) if top else None
    rows = []
    for b in range(ids.size(0)):
        row = []
        for t in range(ids.size(1) - 1):
            alternatives = (
                list(zip(best.indices[b, t].tolist(), best.values[b, t].tolist(), strict=True))
                if best is not None
                else []
            )
            row.append((float(chosen[b, t]), alternatives))
        rows.append(row)
    return rows


def nats_to_bits(nats: float) -> float:
    """A log-likelihood in nats as bits."""
    return nats / math.log(2)
