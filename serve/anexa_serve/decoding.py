"""One choice's text, built as its tokens arrive: incremental decoding, then stop strings.

The engine pushes tokens (one per step), so the text is built push-style by the core's
:class:`~anexa_core.infer.generation.StoppedText` (incremental decoding, then stop strings: what
``anexa generate`` shows too). :class:`ChoiceState` hands out :class:`Update` s: text that may be shown,
the tokens that came with it, and the finish reason once the choice has ended.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from anexa_core.infer.engine import Stream, Token
from anexa_core.infer.generation import StoppedText


@dataclass
class Update:
    """What one choice has new: ``text`` that may be shown (possibly ""), the ``tokens`` that came with it
    (with ``offsets``, each one's character offset in the prompt and the choice's text, when logprobs were
    asked for: :class:`Offsets`), and ``finish_reason`` once the choice has ended (``stop``: a stop string
    or an end-of-turn id; ``length``: ``max_tokens``)."""

    index: int
    text: str
    tokens: list[Token]
    offsets: list[int]
    finish_reason: str | None = None


class Offsets:
    """Character offsets of tokens as they come, from their bytes (``token_bytes(id)``): a token starts
    after the characters its predecessors completed, so every token of a character split over several
    starts where the character does. The prompt's tokens come first (echoed or not), then the choice's,
    whose ``special`` ids add no text."""

    def __init__(self, token_bytes: Callable[[int], bytes], special: frozenset[int] = frozenset()) -> None:
        self.token_bytes = token_bytes
        self.special = special
        self.offset = 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def __call__(self, tokens: Sequence[Token], generated: bool = True) -> list[int]:
        offsets = []
        for token in tokens:
            offsets.append(self.offset)
            if not (generated and token.id in self.special):
                self.offset += len(self._utf8.decode(self.token_bytes(token.id)))
        return offsets


@dataclass
class ChoiceState:
    """One choice of a request: its prompt ids, its stream in the engine, the text and tokens so far.

    ``token_bytes(id)`` gives the bytes of one token (for offsets; only called when logprobs are asked for).
    ``tokens`` counts every generated token consumed, those that formed a stop string included (they
    were generated before the stop was seen); tokens the engine delivers after the choice ended are
    ignored.
    """

    index: int
    prompt_ids: list[int]
    tokenizer: Any
    stops: Sequence[str]
    echo: bool = False
    token_bytes: Callable[[int], bytes] | None = None
    stream: Stream | None = None
    text: list[str] = field(default_factory=list)
    tokens: list[Token] = field(default_factory=list)
    finish_reason: str | None = None

    def __post_init__(self) -> None:
        self._text = StoppedText(self.tokenizer, self.stops, self.prompt_ids)
        self._unsent = 0
        self._offsets: Offsets | None = None
        if self.token_bytes is not None:
            self._offsets = Offsets(self.token_bytes, frozenset(getattr(self.tokenizer, "special_ids", ()) or ()))
            if not self.echo:  # the choice's offsets count from the prompt's end
                self._offsets([Token(token_id) for token_id in self.prompt_ids], generated=False)
        self._echoed = not self.echo

    def echo_update(self) -> Update | None:
        """The echoed prompt (text and scored tokens, the first without a log-probability), once: call it
        when the stream has its ``prompt_logprobs`` (at its first token or its end)."""
        if self._echoed:
            return None
        self._echoed = True
        assert self.stream is not None
        scores = self.stream.prompt_logprobs or []
        ids = self.prompt_ids[-len(scores) :] if scores else []
        tokens = [
            Token(token_id) if score is None else Token(token_id, score[0], score[1])
            for token_id, score in zip(ids, scores, strict=True)
        ]
        offsets = self._offsets(tokens, generated=False) if self._offsets is not None else []
        return Update(self.index, self.prompt_text(), tokens, offsets)

    def add(self, token: Token) -> Update | None:
        """Consume a generated token: an update when there is text to show or the choice just ended."""
        if self.finish_reason is not None:
            return None
        self.tokens.append(token)
        text = self._text.add(token.id)
        if self._text.stopped:
            self.finish_reason = "stop"
        if not text and self.finish_reason is None:
            return None
        return self._update(text)

    def end(self, engine_reason: str | None) -> Update | None:
        """The engine ended the stream (``stop``: an end-of-turn id; ``length``; ``cancelled``): the final update."""
        if self.finish_reason is not None:
            return None
        text = self._text.finish()
        self.finish_reason = "stop" if self._text.stopped or engine_reason == "stop" else "length"
        return self._update(text)

    def prompt_text(self) -> str:
        """The prompt as text, but for a character it leaves unfinished: that one is the choice's (its
        text shows it once a token completes it; a choice that never does drops it)."""
        text = self.tokenizer.decode(self.prompt_ids)
        return text[: len(text.rstrip("\ufffd"))]

    def _update(self, text: str) -> Update:
        self.text.append(text)
        tokens = self.tokens[self._unsent :]
        self._unsent = len(self.tokens)
        offsets = self._offsets(tokens) if self._offsets is not None else []
        return Update(self.index, text, tokens, offsets, self.finish_reason)
