"""One HTTP request's generation: its choices submitted as rows of the model's engine, their tokens
handed to the event loop and turned into :class:`~anexa_serve.decoding.Update` s.

The engine's callbacks run on the stepping thread; :class:`Job` passes them into an ``asyncio.Queue``
through the event loop's :class:`Mailbox` (one ``loop.call_soon_threadsafe`` for all the tokens of a step,
not one per token: each call writes to the loop's wake-up pipe, and the stepping thread would pay for
every one), so all text building happens on the event loop. A choice that
ended (a stop string, an end-of-turn id, its length) or a request whose client went away is cancelled
in the engine: its row is freed at the next step.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import weakref
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from anexa_core.infer.engine import CacheBudgetExceeded, EngineBusy, Request, Stream, Token
from anexa_serve.decoding import ChoiceState, Update
from anexa_serve.engine import SEED_RANGE, Decoder
from anexa_serve.errors import APIError, invalid


class Mailbox:
    """Calls handed from other threads to one event loop, run there in order; the loop is woken once per
    batch (the first post after a drain), however many calls the batch holds."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._calls: list[tuple[Callable[[Any], None], Any]] = []
        self._lock = threading.Lock()

    def post(self, call: Callable[[Any], None], argument: Any) -> None:
        """Run ``call(argument)`` on the loop soon; ``RuntimeError`` when the loop is closed."""
        with self._lock:
            self._calls.append((call, argument))
            if len(self._calls) > 1:
                return  # a drain is scheduled already
        self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
        for call, argument in calls:
            call(argument)


_mailboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Mailbox] = weakref.WeakKeyDictionary()


def mailbox(loop: asyncio.AbstractEventLoop) -> Mailbox:
    """The running loop's mailbox (created on first use; called on the loop's own thread)."""
    box = _mailboxes.get(loop)
    if box is None:
        box = _mailboxes[loop] = Mailbox(loop)
    return box


class ClientGone(Exception):
    """The client disconnected: nobody will read the answer."""


class GenerationFailed(Exception):
    """A choice's decoding failed after the request was accepted; ``cause`` is what the engine raised."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause))
        self.cause = cause


@dataclass(frozen=True)
class Options:
    """How every choice of a request decodes: ``max_tokens`` (0 only with ``echo``), the sampler
    ``chain`` (shared: the built-in samplers keep no state), ``seed`` (choice ``i`` gets ``seed + i``; None:
    a random seed each), ``stops`` (strings), ``stop_ids`` (end-of-turn ids), ``logprobs`` (None or the
    number of alternatives per token), ``echo`` (score and return the prompt); ``fields``: the request's
    names for its prompt and its token limit, for the error when it cannot fit the KV cache."""

    max_tokens: int
    chain: Any
    seed: int | None = None
    stops: Sequence[str] = ()
    stop_ids: Sequence[int] = ()
    logprobs: int | None = None
    echo: bool = False
    fields: tuple[str, str] = ("prompt", "max_tokens")


def choice_seed(seed: int | None, index: int) -> int:
    """``seed + index``, wrapped into what torch accepts; a fresh random seed when ``seed`` is None."""
    if seed is None:
        return secrets.randbits(63)
    value = seed + index
    return value - 2**64 if value > SEED_RANGE[1] else value


class Job:
    """The choices of one request: ``n`` per prompt, choice ``p * n + j`` for the ``j``-th of prompt ``p``
    (OpenAI's order). :meth:`start` submits all of them or, when the engine is full, none (429);
    :meth:`updates` yields their updates as tokens arrive; :meth:`cancel` stops what still runs."""

    def __init__(
        self,
        decoder: Decoder,
        tokenizer: Any,
        prompts: Sequence[list[int]],
        n: int,
        options: Options,
        token_bytes: Callable[[int], bytes] | None = None,
    ) -> None:
        self.decoder = decoder
        self.options = options
        self.prompts = prompts
        self.choices = [
            ChoiceState(p * n + j, list(ids), tokenizer, options.stops, options.echo, token_bytes)
            for p, ids in enumerate(prompts)
            for j in range(n)
        ]
        self._queue: asyncio.Queue[tuple[str, int, Any]] = asyncio.Queue()
        self._mailbox = mailbox(asyncio.get_running_loop())
        self._open = len(self.choices)

    def start(self) -> None:
        """Submit every choice; :class:`APIError` 429 (nothing left running) when the engine is full."""
        running, waiting = self.decoder.running, self.decoder.waiting  # before this request's own choices
        try:
            for choice in self.choices:
                request = Request(
                    choice.prompt_ids,
                    self.options.max_tokens,
                    self.options.chain,
                    seed=choice_seed(self.options.seed, choice.index),
                    stop_ids=self.options.stop_ids,
                    logprobs=self.options.logprobs,
                    echo=self.options.echo,
                )
                choice.stream = self.decoder.submit(request, self._on_token(choice.index), self._on_done(choice.index))
        except EngineBusy:
            self.cancel()
            raise APIError(
                429,
                f"the server is busy: {running} rows decoding and {waiting} requests waiting, with room for "
                f"{self.decoder.capacity} (anexa serve --parallel and --queue); retry shortly",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": "1"},
            ) from None
        except CacheBudgetExceeded as exc:
            self.cancel()
            param = self.options.fields[0 if exc.by_prompt else 1]
            raise invalid(str(exc), param=param, code="context_length_exceeded") from None

    def cancel(self) -> None:
        """Stop every choice still decoding (idempotent, from any thread)."""
        for choice in self.choices:
            if choice.stream is not None:
                self.decoder.cancel(choice.stream)

    def client_gone(self) -> None:
        """Called on the event loop when the client disconnected: :meth:`updates` raises :class:`ClientGone`."""
        self.cancel()
        self._queue.put_nowait(("gone", -1, None))

    @property
    def prompt_tokens(self) -> int:
        """Prompt tokens fed to the model, once per prompt (cropped to the context)."""
        block = self.decoder.engine.block_size
        return sum(min(len(ids), block) for ids in self.prompts)

    @property
    def completion_tokens(self) -> int:
        return sum(len(choice.tokens) for choice in self.choices)

    def usage(self) -> dict[str, int]:
        prompt, completion = self.prompt_tokens, self.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    async def batches(self) -> AsyncGenerator[list[Update], None]:
        """The updates of all choices, in the order their tokens arrive, a batch for whatever arrived while
        the loop was busy, until every choice has ended. Raises :class:`ClientGone` after
        :meth:`client_gone`, :class:`GenerationFailed` when decoding failed."""
        while self._open:
            items = [await self._queue.get()]
            while not self._queue.empty():
                items.append(self._queue.get_nowait())
            batch: list[Update] = []
            for kind, index, payload in items:
                batch += self._handle(kind, index, payload)
            if batch:
                yield batch

    async def updates(self) -> AsyncGenerator[Update, None]:
        """:meth:`batches`, one update at a time."""
        async for batch in self.batches():
            for update in batch:
                yield update

    def _handle(self, kind: str, index: int, payload: Any) -> list[Update]:
        if kind == "gone":
            raise ClientGone
        choice = self.choices[index]
        if choice.finish_reason is not None:
            return []  # ended by a stop string: what the engine still delivers is not shown
        echoed = choice.echo_update()
        out = [echoed] if echoed is not None else []
        if kind == "error":
            self.cancel()
            raise GenerationFailed(payload)
        update = choice.add(payload) if kind == "token" else choice.end(payload)
        if update is not None:
            out.append(update)
            if update.finish_reason is not None:
                self._open -= 1
                if choice.stream is not None:
                    self.decoder.cancel(choice.stream)  # a stop string: free the row now
        return out

    def _post(self, item: tuple[str, int, Any]) -> None:
        try:
            self._mailbox.post(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            self.cancel()

    def _on_token(self, index: int) -> Callable[[Token], None]:
        return lambda token: self._post(("token", index, token))

    def _on_done(self, index: int) -> Callable[[Stream, BaseException | None], None]:
        def done(stream: Stream, error: BaseException | None) -> None:
            self._post(("error", index, error) if error is not None else ("done", index, stream.finish_reason))

        return done
