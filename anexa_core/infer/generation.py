"""Incremental decoding with a KV cache, streamed as token ids or text.

A prompt longer than the context is cropped from the left. While the context has room, each new token
costs one position through the model. What happens when it is full is the *context policy*:

- ``shift`` (default): keep the most recent half of the window, recompute it once into a fresh cache,
  and continue one position per token until the window is full again. Each recompute buys
  ``block_size / 2`` cheap tokens, so long outputs cost little more than short ones. The model sees a
  window of between half and all of ``block_size`` tokens.
- ``sliding``: nanoGPT's ``generate`` exactly — every token is predicted from the last ``block_size``
  tokens, which means recomputing the whole window for each token once it is full (learned positions
  cannot be shifted inside a cache). Identical output to recomputation, at recomputation's cost.

Both are identical to recomputation until the window first fills.
"""

from __future__ import annotations

from collections.abc import Generator, Iterator, Sequence

import torch

from anexa_core.data.corpus import normalize_text
from anexa_core.device import decoding_autocast
from anexa_core.errors import AnexaError
from anexa_core.infer.sampling import stream_until_stop
from anexa_core.model.cache import KVCache
from anexa_core.model.gpt import GPT

CONTEXT_POLICIES = ("shift", "sliding")


MAX_PENDING_TOKENS = 64
"""Tokens the text stream waits, at most, for the replacement characters (U+FFFD) that end the text so far
to become a character. One unfinished character is at most 3 bytes, but tokens that each end inside the
next character — ``——`` as ``E2 80 | 94 E2 | 80 94 E2 | …`` — keep the text unfinished for as long as
they last; past this many the replacement characters are shown (they are garbage then)."""


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    chain,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
    context: str = "shift",
) -> Iterator[int]:
    """Yield ``max_new_tokens`` ids; ``chain.pick(logits, context_ids, generator)`` chooses each one.

    ``context`` is the context policy (see the module docstring). ``use_cache=False`` recomputes the
    whole window for every token: the reference the cache is tested and benchmarked against (equal to
    ``sliding``).
    """
    if not prompt_ids:
        raise AnexaError("the prompt is empty: give at least one character of text")
    if context not in CONTEXT_POLICIES:
        raise AnexaError(f"unknown context policy {context!r}: use one of {', '.join(CONTEXT_POLICIES)}")
    model.eval()
    block_size = model.config.block_size
    keep = max(1, block_size // 2) if context == "shift" else block_size
    device = next(model.parameters()).device
    prompt = list(prompt_ids)[-block_size:]
    # Every id so far, for the samplers (a repetition penalty looks back): a buffer that doubles when
    # full, so appending stays O(1) per token; ``history`` is the filled part.
    buffer = torch.empty(1, max(16, 2 * (len(prompt) + max_new_tokens // 8)), dtype=torch.long, device=device)
    buffer[0, : len(prompt)] = torch.tensor(prompt, dtype=torch.long)
    history = buffer[:, : len(prompt)]
    cache = None

    def forward_window(length: int) -> torch.Tensor:
        """Logits after the last ``length`` tokens, recomputed into a fresh cache."""
        nonlocal cache
        cache = KVCache(block_size) if use_cache else None
        with decoding_autocast(device):
            logits, _ = model(history[:, -length:], cache=cache, last_only=True)
        return logits[:, -1, :].float()

    def forward_next(token: torch.Tensor) -> torch.Tensor:
        if cache is None:
            return forward_window(block_size)
        if len(cache) >= block_size:
            return forward_window(keep)
        with decoding_autocast(device):
            logits, _ = model(token, cache=cache, last_only=True)
        return logits[:, -1, :].float()

    logits = forward_window(block_size)
    for produced in range(1, max_new_tokens + 1):
        next_id = chain.pick(logits, history, generator).view(1, 1).to(device)
        length = history.size(1)
        if length == buffer.size(1):
            buffer = torch.cat([buffer, torch.empty_like(buffer)], dim=1)
        buffer[:, length] = next_id[:, 0]
        history = buffer[:, : length + 1]
        yield int(next_id)
        if produced < max_new_tokens:  # no forward pass for a token nobody asked for
            logits = forward_next(next_id)


def decode_stream(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces as ids arrive: never a piece of a character, and work linear in the output length.

    Each id decodes a short window, ``tokenizer.decode(ids[prefix:])``. All of that text but the
    replacement characters (U+FFFD) that end it is final — by the Tokenizer contract the only part later
    ids can change is an unfinished character at the end, which decodes to U+FFFD — so it is yielded at
    once; the trailing U+FFFD wait until an id completes the character, or follows them with something
    else (then they were garbage and are shown), for at most :data:`MAX_PENDING_TOKENS` ids, or until the
    stream ends. When nothing waits, the window moves on, keeping the last group of ids as context (as
    Hugging Face's text-generation-inference does, for tokenizers whose decoding depends on the id
    before). Joined, the pieces are ``tokenizer.decode`` of all the ids.
    """
    generated: list[int] = []
    prefix = read = 0  # the window is generated[prefix:]; the text of generated[:read] was complete
    shown = 0  # characters of the window's text already yielded
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated[prefix:])
        final = len(text)
        if len(generated) - read < MAX_PENDING_TOKENS:
            final = len(text.rstrip("\ufffd"))
        if final > shown:
            yield text[shown:final]
            shown = final
        if final == len(text):  # nothing waits: the next window starts at this one's last group
            prefix, read = read, len(generated)
            shown = len(tokenizer.decode(generated[prefix:]))
    tail = tokenizer.decode(generated[prefix:])[shown:]
    if tail:
        yield tail


def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """The ids ``generate_text`` feeds for ``prompt``: normalised like training text
    (:func:`~anexa_core.data.corpus.normalize_text`), then encoded. Raises the tokenizer's ``AnexaError`` for text
    it cannot encode."""
    return tokenizer.encode(normalize_text(prompt))


def generate_text(
    model: GPT,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    chain,
    seed: int | None = None,
    stop: Sequence[str] = (),
    context: str = "shift",
) -> Generator[str, None, None]:
    """Stream the continuation of ``prompt`` as text, ending early at any ``stop`` string (not included).

    The prompt goes through the same normalisation as training text (:func:`~anexa_core.data.corpus.normalize_text`).
    """
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = generate_ids(model, encode_prompt(tokenizer, prompt), max_new_tokens, chain, generator, context=context)
    yield from stream_until_stop(decode_stream(tokenizer, ids), stop)
