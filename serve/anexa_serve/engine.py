"""One core :class:`~anexa_core.infer.engine.Engine` per served model, stepped by one background thread.

Every request of a model becomes one or more rows of that model's engine (continuous batching: each
:meth:`Engine.step <anexa_core.infer.engine.Engine.step>` is one forward pass for every running row), so
concurrent clients share forward passes instead of fighting for the cores. The stepping thread sleeps
while nothing runs and is woken by :meth:`Decoder.submit` and :meth:`Decoder.cancel`.

Tokens leave the stepping thread through the request's ``on_token`` callback and the end of a row
through ``on_done``; both run on the stepping thread, so callers hand them to their event loop
(``loop.call_soon_threadsafe``). Memory is bounded: ``rows`` rows decode at once and ``waiting`` more
wait; beyond that :meth:`Decoder.submit` raises :class:`~anexa_core.infer.engine.EngineBusy`.

A sampler chain that raises fails only its own request (:class:`_Isolated`); a failing forward pass fails
the rows that were running. Neither stops the thread.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from anexa_core.errors import AnexaError
from anexa_core.infer.engine import Engine, EngineBusy, Request, Stream, Token

logger = logging.getLogger("anexa.serve")

SEED_RANGE = (-(2**63), 2**64 - 1)
"""Seeds ``torch.Generator.manual_seed`` accepts."""

OnToken = Callable[[Token], None]
OnDone = Callable[[Stream, BaseException | None], None]
"""Called once when a row ends: the stream (its ``finish_reason`` set) and the error that ended it, if any."""


@dataclass
class Stats:
    """Counters for logs, tests and benchmarks; written by the stepping thread (plus ``requests_rejected``
    by submitters), read from anywhere. ``peak_rows``: the most rows one step decoded."""

    tokens_generated: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    requests_rejected: int = 0
    requests_failed: int = 0
    steps: int = 0
    peak_rows: int = 0


class _Isolated:
    """A request's sampler chain whose failure is its own: the error is kept (the row is then cancelled)
    and the argmax stands in for the pick, so the rest of the batch decodes on.

    The engine processes the rows of equal chains at once and draws every row together
    (:func:`~anexa_core.infer.sampling.pick_rows`), so this compares and processes as its chain (the
    server's are :class:`~anexa_core.infer.sampling.SamplerChain`). Processing other requests' rows too,
    it lets an error through: the engine then processes each row alone, and only the failing one's is kept.
    """

    def __init__(self, chain: Any) -> None:
        self.chain = chain
        self.error: BaseException | None = None
        self.reads_context = getattr(chain, "reads_context", True)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Isolated) and self.chain == other.chain

    def __hash__(self) -> int:
        return hash(self.chain)

    def process(self, logits, context):
        try:
            return self.chain.process(logits, context)
        except Exception as exc:
            if logits.size(0) > 1:
                raise  # other requests' rows: each is processed alone next
            self.error = self.error or exc
            return torch.full_like(logits, float("-inf")).scatter_(-1, logits.argmax(-1, keepdim=True), 0.0)

    def pick(self, logits, context, generator=None):
        try:
            return self.chain.pick(logits, context, generator)
        except Exception as exc:
            self.error = self.error or exc
            return logits.argmax(-1, keepdim=True)


class Decoder:
    """The engine of one served model and the thread that steps it.

    ``rows``: requests decoded at once (``--parallel``); ``waiting``: requests that may wait for a row
    (``--queue``); ``threads``: torch CPU threads of the stepping thread (0 keeps torch's default);
    ``max_cache_tokens``: the batch's KV-cache budget in positions (``--max-cache-tokens``). The thread
    starts at the first :meth:`submit` and ends at :meth:`close`.
    """

    def __init__(
        self,
        model: Any,
        rows: int,
        waiting: int,
        threads: int = 0,
        name: str = "model",
        max_cache_tokens: int | None = None,
    ) -> None:
        self.engine = Engine(model, max_rows=rows, max_waiting=waiting, max_cache_tokens=max_cache_tokens)
        self.name = name
        self.threads = threads
        self.stats = Stats()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._watched: dict[int, tuple[Stream, OnDone, _Isolated]] = {}
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def capacity(self) -> int:
        """Rows plus waiting places: the most requests this decoder holds at once."""
        return self.engine.max_rows + (self.engine.max_waiting or 0)

    @property
    def running(self) -> int:
        return len(self.engine.rows)

    @property
    def waiting(self) -> int:
        return len(self.engine.waiting)

    @property
    def held(self) -> int:
        """Requests submitted and not yet ended (``on_done`` not yet called)."""
        return len(self._watched)

    def submit(self, request: Request, on_token: OnToken, on_done: OnDone) -> Stream:
        """Queue ``request`` (its ``chain`` is wrapped, see :class:`_Isolated`). Raises :class:`EngineBusy`
        when every row and waiting place is taken, :class:`~anexa_core.infer.engine.CacheBudgetExceeded` for a
        request that could not fit the KV-cache budget even alone, :class:`~anexa_core.errors.AnexaError` for an
        empty prompt."""
        guard = _Isolated(request.chain)
        request.chain = guard

        def counted(token: Token) -> None:
            self.stats.tokens_generated += 1
            if guard.error is None:
                on_token(token)

        self._start()
        try:
            stream = self.engine.submit(request, counted)
        except EngineBusy:
            self.stats.requests_rejected += 1
            raise
        with self._lock:
            self._watched[id(stream)] = (stream, on_done, guard)
        self._wake.set()
        return stream

    def cancel(self, stream: Stream) -> None:
        """Stop ``stream``: its row is freed at the next step (from any thread; idempotent)."""
        if not stream.done:
            self.engine.cancel(stream)
            self._wake.set()

    def close(self) -> None:
        """Cancel everything and stop the thread."""
        self._closed = True
        for stream, _, _ in list(self._watched.values()):
            self.engine.cancel(stream)
        self._wake.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)

    def _start(self) -> None:
        with self._lock:
            if self._thread is None and not self._closed:
                self._thread = threading.Thread(target=self._loop, name=f"anexa-engine-{self.name}", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        if self.threads:
            import torch

            torch.set_num_threads(self.threads)  # per thread under OpenMP: set it on the thread that computes
        while not self._closed:
            self._wake.clear()  # before looking: a submit from now on wakes the wait below
            self._report()
            if not self.engine.busy:
                self._wake.wait()
                continue
            try:
                self.engine.step()
            except Exception as exc:
                self._fail_running(exc)
            self.stats.steps += 1
            self.stats.peak_rows = max(self.stats.peak_rows, len(self.engine.rows))
        self._report()

    def _report(self) -> None:
        """``on_done`` for every watched stream that ended; a row whose sampler failed is cancelled first."""
        for key, (stream, on_done, guard) in list(self._watched.items()):
            if guard.error is not None and not stream.done:
                self.engine.cancel(stream)
                continue  # freed, and reported, after the next step
            if not stream.done:
                continue
            with self._lock:
                del self._watched[key]
            if guard.error is not None:
                self.stats.requests_failed += 1
            elif stream.finish_reason == "cancelled":
                self.stats.requests_cancelled += 1
            else:
                self.stats.requests_finished += 1
            on_done(stream, guard.error)

    def _fail_running(self, exc: Exception) -> None:
        """A step raised: every watched request that had left the waiting line ends with ``exc``."""
        if not isinstance(exc, AnexaError):
            logger.error("decoding failed for model %s", self.name, exc_info=exc)
        waiting = {id(stream) for stream in list(self.engine.waiting)}
        rows = {id(stream) for stream in self.engine.rows}
        for key, (stream, _, guard) in list(self._watched.items()):
            if key in waiting or stream.done:
                continue
            guard.error = guard.error or exc
            self.engine.cancel(stream)
            if key not in rows:  # taken from the line by the failed step and never given a row
                stream.finish_reason = "cancelled"
