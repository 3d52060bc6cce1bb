"""Decoding one prompt, streamed as token ids or text: the single-request face of the engine.

:func:`generate_ids` runs one request through :class:`~anexa_core.infer.engine.Engine` (which holds the
KV cache and the context policies), :func:`decode_stream` turns ids into text pieces as they arrive, and
:func:`generate_text` joins the two with stop strings. A prompt longer than the context is cropped from
the left.
"""

from __future__ import annotations

from collections.abc import Collection, Generator, Iterator, Sequence
from typing import Any

import torch

from anexa_core.data.corpus import normalize_text
from anexa_core.infer.engine import CONTEXT_POLICIES, Engine, Request
from anexa_core.infer.sampling import StopStrings
from anexa_core.model.gpt import GPT

__all__ = [
    "CONTEXT_POLICIES",
    "StoppedText",
    "TextStream",
    "decode_stream",
    "encode_prompt",
    "generate_ids",
    "generate_samples",
    "generate_text",
]

MAX_PENDING_TOKENS = 64
"""Tokens the text stream waits, at most, for the replacement characters (U+FFFD) that end the text so far
to become a character. One unfinished character is at most 3 bytes, but tokens that each end inside the
next character — ``——`` as ``E2 80 | 94 E2 | 80 94 E2 | …`` — keep the text unfinished for as long as
they last; past this many the replacement characters are shown (they are garbage then)."""
PROMPT_CONTEXT = 8
"""Prompt ids a reply's text stream decodes before the reply's own (:class:`TextStream`): enough for a
character the prompt leaves unfinished (at most 3 of its 4 bytes) and the ids before it."""


def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    chain,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    context: str = "shift",
    stop_ids: Collection[int] = (),
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` ids; ``chain.pick(logits, context_ids, generator)`` chooses each one,
    and a pick in ``stop_ids`` (the tokenizer's end of turn) ends the output without being yielded.

    ``context`` is the context policy (see :mod:`anexa_core.infer.engine`). ``use_cache=False`` recomputes
    the whole window for every token: the reference the cache is tested and benchmarked against (equal
    to ``sliding``). Raises :class:`~anexa_core.AnexaError` for an empty prompt or an unknown policy.
    """
    engine = Engine(model, max_rows=1, use_cache=use_cache)
    request = Request(prompt_ids, max_new_tokens, chain, generator=generator, stop_ids=stop_ids, context=context)
    for _, token in engine.run([request]):
        yield token.id


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The UTF-8 bytes ``token_id`` adds to the text: the tokenizer's ``token_bytes`` (a byte-level token may
    hold part of a character), else ``decode([token_id])`` encoded (the Tokenizer contract)."""
    own = getattr(tokenizer, "token_bytes", None)
    return own(token_id) if own is not None else tokenizer.decode([token_id]).encode("utf-8")


class TextStream:
    """Token ids in, new text out, as ids arrive (push-style; :func:`decode_stream` is the pull-style form):
    never a piece of a character, and work linear in the output length.

    Each id decodes a short window, ``tokenizer.decode(ids[prefix:])``. All of that text but the
    replacement characters (U+FFFD) that end it is final — by the Tokenizer contract the only part later
    ids can change is an unfinished character at the end, which decodes to U+FFFD — so :meth:`add` returns
    it at once; the trailing U+FFFD wait until an id completes the character, or follows them with
    something else (then they were garbage and are shown), for at most :data:`MAX_PENDING_TOKENS` ids, or
    until :meth:`flush`. When nothing waits, the window moves on, keeping the last group of ids as context
    (as Hugging Face's text-generation-inference does, for tokenizers whose decoding depends on the id
    before).

    ``prompt``: the ids the text continues. Its last :data:`PROMPT_CONTEXT` are decoded first and not
    returned, so a character the prompt leaves unfinished comes out whole with the id that completes it,
    and the first id is decoded as what follows the prompt (a SentencePiece word keeps its leading space).
    The tokenizer's special tokens (``special_ids``: ``<|im_start|>``, BOS, …) are structure, not text:
    they add nothing. Joined, the pieces are ``tokenizer.decode`` of all the ids added, special ones left out.
    """

    def __init__(self, tokenizer: Any, prompt: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.special = frozenset(getattr(tokenizer, "special_ids", ()) or ())
        self.ids: list[int] = []
        self._prefix = self._read = 0  # the window is ids[prefix:]; the text of ids[:read] was complete
        self._shown = 0  # characters of the window's text already returned
        for token in list(prompt)[-PROMPT_CONTEXT:]:
            self.add(token)

    def add(self, token: int) -> str:
        """The text ``token`` makes final ("" while it only continues an unfinished character, and for a
        special token)."""
        if token in self.special:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids[self._prefix :])
        final = len(text)
        if len(self.ids) - self._read < MAX_PENDING_TOKENS:
            final = len(text.rstrip("\ufffd"))
        piece = text[self._shown : final]
        self._shown = max(self._shown, final)
        if final == len(text):  # nothing waits: the next window starts at this one's last group
            self._prefix, self._read = self._read, len(self.ids)
            self._shown = len(self.tokenizer.decode(self.ids[self._prefix :]))
        return piece

    def flush(self) -> str:
        """What still waits (an unfinished character's U+FFFD), at the end of the output; once (a second
        flush gives ""). Ids added afterwards start a new text."""
        tail = self.tokenizer.decode(self.ids[self._prefix :])[self._shown :]
        self._prefix = self._read = len(self.ids)
        self._shown = 0
        return tail


class StoppedText:
    """A reply's text as its ids arrive: :class:`TextStream`'s pieces (``prompt``: the ids it continues)
    through :class:`~anexa_core.infer.sampling.StopStrings` — never a piece of a character, never a special
    token, nothing from a stop string on. A reply cut inside a character (its token limit) ends before it:
    the bytes that would make it whole were never generated (as vLLM and text-generation-inference end it).
    What :func:`generate_text`, each sample of :func:`generate_samples` and each choice the server streams
    show."""

    def __init__(self, tokenizer: Any, stops: Sequence[str] = (), prompt: Sequence[int] = ()) -> None:
        self._decoder = TextStream(tokenizer, prompt)
        self._stops = StopStrings(stops)

    @property
    def stopped(self) -> bool:
        """Whether a stop string has appeared (nothing more is shown)."""
        return self._stops.stopped

    def add(self, token: int) -> str:
        """The text ``token`` lets be shown (possibly "")."""
        return self._stops.feed(self._decoder.add(token))

    def finish(self) -> str:
        """The output ended: what was held back as a possible stop's start (an unfinished character is
        dropped)."""
        self._decoder.flush()
        return self._stops.flush()


def decode_stream(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces as ``ids`` arrive, each non-empty, through one :class:`TextStream`; joined, they are
    ``tokenizer.decode`` of all the ids (special tokens left out), an unfinished character at the end
    included."""
    stream = TextStream(tokenizer)
    for token in ids:
        piece = stream.add(token)
        if piece:
            yield piece
    tail = stream.flush()
    if tail:
        yield tail


def encode_prompt(tokenizer, prompt: str, bos: bool = True) -> list[int]:
    """The ids fed for ``prompt``: normalised like training text
    (:func:`~anexa_core.data.corpus.normalize_text`), encoded, and — when ``bos`` and the tokenizer asks
    for it (``add_bos``, a pretrained model's) — after its BOS id. A rendered chat template writes its own
    special tokens: encode those with ``bos=False``. Raises the tokenizer's ``AnexaError`` for text it
    cannot encode."""
    ids = tokenizer.encode(normalize_text(prompt))
    bos_id = getattr(tokenizer, "bos_id", None)
    if bos and getattr(tokenizer, "add_bos", False) and bos_id is not None:
        ids = [bos_id, *ids]
    return ids


def generate_text(
    model: GPT,
    tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int,
    chain,
    seed: int | None = None,
    stop: Sequence[str] = (),
    context: str = "shift",
    stop_ids: Collection[int] | None = None,
) -> Generator[str, None, None]:
    """Stream the continuation of ``prompt`` (text, encoded with :func:`encode_prompt`, or ids already
    encoded) as :class:`StoppedText` shows it, ending at ``stop_ids`` (default: the tokenizer's end of turn,
    ``eos_ids``; never shown) or at any ``stop`` string (not included; no more tokens are generated)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    prompt_ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    ends = getattr(tokenizer, "eos_ids", ()) if stop_ids is None else stop_ids
    shown = StoppedText(tokenizer, stop, prompt_ids)
    for token in generate_ids(model, prompt_ids, max_new_tokens, chain, generator, context=context, stop_ids=ends):
        piece = shown.add(token)
        if piece:
            yield piece
        if shown.stopped:
            return
    tail = shown.finish()
    if tail:
        yield tail


def generate_samples(
    model: GPT,
    tokenizer,
    prompt: str | Sequence[int],
    count: int,
    max_new_tokens: int,
    chain,
    seed: int | None = None,
    stop: Sequence[str] = (),
    context: str = "shift",
    rows: int = 8,
) -> list[str]:
    """``count`` continuations of ``prompt`` decoded together as rows of one batch (at most ``rows`` at a
    time), sample ``i`` with seed ``seed + i`` (``None``: torch's global generator) — each the text
    :func:`generate_text` gives alone with that seed: it ends at the tokenizer's end of turn, its length,
    or a ``stop`` string (cut there, by :class:`~anexa_core.infer.sampling.StopStrings`' rule: never before
    the sample's first visible character). A sample's row is freed as soon as its stop string shows."""
    prompt_ids = encode_prompt(tokenizer, prompt) if isinstance(prompt, str) else list(prompt)
    stop_ids = getattr(tokenizer, "eos_ids", ())
    engine = Engine(model, max_rows=rows)
    requests = [
        Request(prompt_ids, max_new_tokens, chain, None if seed is None else seed + i, stop_ids=stop_ids,
                context=context)
        for i in range(count)
    ]  # fmt: skip
    texts: list[list[str]] = [[] for _ in requests]
    shown = [StoppedText(tokenizer, stop, prompt_ids) for _ in requests]
    for index, token in engine.run(requests):
        texts[index].append(shown[index].add(token.id))
        if shown[index].stopped:
            engine.cancel(engine.last_streams[index])
    return ["".join([*text, sample.finish()]) for text, sample in zip(texts, shown, strict=True)]
