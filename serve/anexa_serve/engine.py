"""Admission, worker threads and one request's generation; the model work itself is the core's.

* :class:`Engine.admit` is the queue: at most ``parallel`` generations run and at most ``queue`` more
  wait (first come, first served); one more request gets HTTP 429 at once instead of waiting without
  bound.
* Generation is CPU-bound torch code, so each token is pulled from the core's lazy
  :func:`anexa_core.infer.generation.generate_text` in a worker thread (``anyio.to_thread`` with a
  ``parallel``-sized limiter), never on the event loop. A request that stops being read (client gone)
  stops pulling, which stops the generation: nothing runs ahead of the client.
* Every request gets its own sampler chain and its own seeded ``torch.Generator`` (a random seed when
  the request gives none), so nothing random is shared between threads; see :mod:`anexa_serve.models`
  for why sharing the model is safe.
"""

from __future__ import annotations

import secrets
import threading
from collections.abc import AsyncGenerator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio

from anexa_serve.errors import APIError
from anexa_serve.models import ServedModel

SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds ``torch.Generator.manual_seed`` accepts."""


@dataclass
class Stats:
    """Counters for logs and tests; ``tokens_generated`` is updated from worker threads under a lock."""

    tokens_generated: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    peak_running: int = 0

    def __post_init__(self) -> None:
        self._lock = threading.Lock()

    def add_token(self) -> None:
        with self._lock:
            self.tokens_generated += 1


class _CountingChain:
    """The request's :class:`~anexa_core.infer.sampling.SamplerChain`, unchanged, watching what it is given.

    The core calls ``pick(logits, context, generator)`` exactly once per generated token, with
    ``context`` the ids fed so far (B=1, T). So ``ids`` are the generated tokens (including those of a
    stop string, which were generated before the stop was seen) and the first call's ``context`` is the
    prompt as the model was fed it: after the core's own normalisation and cropping to the context.
    """

    def __init__(self, chain: Any, stats: Stats) -> None:
        self.chain = chain
        self.stats = stats
        self.ids: list[int] = []
        self.prompt_tokens: int | None = None

    def pick(self, logits, context, generator=None):
        if self.prompt_tokens is None:
            self.prompt_tokens = int(context.size(-1))
        picked = self.chain.pick(logits, context, generator)
        self.ids.append(int(picked.view(-1)[0]))
        self.stats.add_token()
        return picked

    def __repr__(self) -> str:
        return repr(self.chain)


class Generation:
    """One request's continuation: a lazy core generator plus what ``usage`` and ``finish_reason`` need.

    ``prompt_ids`` are the prompt's token ids (already checked to be encodable and non-empty).
    ``prompt_tokens`` is how many tokens the model was fed as the prompt (cropped from the left to the
    context length). ``seed`` None draws a fresh random seed, so even unseeded requests share no
    random state.
    """

    def __init__(
        self,
        served: ServedModel,
        prompt: str,
        prompt_ids: Sequence[int],
        max_tokens: int,
        chain: Any,
        seed: int | None,
        stop: Sequence[str],
        stats: Stats,
    ) -> None:
        from anexa_core.infer.generation import generate_text

        self.served = served
        self.max_tokens = max_tokens
        self.stops = tuple(stop)
        self._prompt_ids = len(prompt_ids)
        self.seed = secrets.randbits(63) if seed is None else seed
        self._text: list[str] = []
        self._chain = _CountingChain(chain, stats)
        self._pieces = generate_text(served.model, served.tokenizer, prompt, max_tokens, self._chain, self.seed, stop)
        self.done = False

    @property
    def text(self) -> str:
        """The text generated so far (stop strings removed)."""
        return "".join(self._text)

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens fed to the model (seen at the first pick; before it, the cropped encoding)."""
        seen = self._chain.prompt_tokens
        return seen if seen is not None else min(self._prompt_ids, self.served.context_length)

    @property
    def completion_tokens(self) -> int:
        """Tokens generated so far."""
        return len(self._chain.ids)

    @property
    def finish_reason(self) -> str:
        """``stop`` when a stop string ended the text, ``length`` when ``max_tokens`` did."""
        if self.completion_tokens < self.max_tokens:
            return "stop"
        if not self.stops:
            return "length"
        # All tokens were generated: a stop string may still have cut the last piece.
        return "stop" if self.text != self.served.tokenizer.decode(self._chain.ids) else "length"

    def usage(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }

    def next_piece(self) -> str | None:
        """The next piece of text, or None at the end. Blocking torch work: call it in a worker thread."""
        piece = next(self._pieces, None)
        if piece is None:
            self.done = True
        else:
            self._text.append(piece)
        return piece

    def close(self) -> None:
        """Stop generating (closes the core's generator); safe to call twice."""
        self._pieces.close()


class Ticket:
    """A request's place in the engine: counted from :meth:`Engine.admit` until :meth:`release`."""

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._released = False

    def release(self) -> None:
        """Give the place back; idempotent, so every exit path may call it."""
        if not self._released:
            self._released = True
            self._engine.admitted -= 1


class Engine:
    """Runs generations in at most ``parallel`` worker threads with at most ``queue`` waiting requests.

    All counters except :attr:`Stats.tokens_generated` are touched only on the event loop thread.
    """

    def __init__(self, parallel: int, queue: int) -> None:
        if parallel < 1 or queue < 0:
            raise ValueError("parallel must be >= 1 and queue >= 0")
        self.parallel = parallel
        self.queue = queue
        self.admitted = 0
        self.running = 0
        self.stats = Stats()
        self._slots: anyio.Semaphore | None = None
        self._limiter: anyio.CapacityLimiter | None = None

    @property
    def waiting(self) -> int:
        return self.admitted - self.running

    def admit(self) -> Ticket:
        """A place for one request, or :class:`APIError` 429 when ``parallel + queue`` are taken."""
        if self.admitted >= self.parallel + self.queue:
            self.stats.requests_rejected += 1
            raise APIError(
                429,
                f"the server is busy: {self.running} generations running and {self.waiting} waiting "
                f"(queue length {self.queue}); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            )
        self.admitted += 1
        return Ticket(self)

    @asynccontextmanager
    async def _slot(self):
        if self._slots is None:  # anyio primitives belong to the running event loop: create them there
            self._slots = anyio.Semaphore(self.parallel)
            self._limiter = anyio.CapacityLimiter(self.parallel)
        async with self._slots:
            self.running += 1
            self.stats.peak_running = max(self.stats.peak_running, self.running)
            try:
                yield
            finally:
                self.running -= 1

    async def stream(self, ticket: Ticket, generation: Generation) -> AsyncGenerator[str, None]:
        """Wait for a slot, then yield text pieces as the worker thread produces them.

        Leaving early (the caller stops iterating or is cancelled, e.g. the client disconnected)
        stops the generation and frees the slot; callers must close this iterator (``aclosing``).
        """
        try:
            async with self._slot():
                while True:
                    piece = await anyio.to_thread.run_sync(generation.next_piece, limiter=self._limiter)
                    if piece is None:
                        break
                    yield piece
        finally:
            generation.close()
            ticket.release()
            if generation.done:
                self.stats.requests_finished += 1
            else:
                self.stats.requests_cancelled += 1
