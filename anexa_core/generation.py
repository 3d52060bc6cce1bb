"""Incremental decoding with a KV cache, streamed as token ids or text.

The prompt is cropped from the left to the context length. While the context fits, each new token
costs one position through the model; once it is full, the window slides and is recomputed, exactly
as recomputing the last ``block_size`` tokens each step would (learned positions cannot be shifted).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from anexa_core.errors import AnexaError
from anexa_core.model import GPT, KVCache
from anexa_core.sampling import stream_until_stop
from anexa_core.training import autocast


@torch.no_grad()
def generate_ids(
    model: GPT,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    chain,
    generator: torch.Generator | None = None,
    use_cache: bool = True,
) -> Iterator[int]:
    """Yield ``max_new_tokens`` ids; ``chain.pick(logits, context, generator)`` chooses each one.

    ``use_cache=False`` recomputes the whole window for every token: the reference the cache is
    tested (and benchmarked) against.
    """
    if not prompt_ids:
        raise AnexaError("the prompt is empty: give at least one character of text")
    model.eval()
    block_size = model.config.block_size
    device = next(model.parameters()).device
    history = torch.tensor([list(prompt_ids)[-block_size:]], dtype=torch.long, device=device)
    cache = None

    def forward_window() -> torch.Tensor:
        nonlocal cache
        cache = KVCache(block_size) if use_cache else None
        with autocast(device):
            logits, _ = model(history[:, -block_size:], cache=cache, last_only=True)
        return logits[:, -1, :].float()

    def forward_next(token: torch.Tensor) -> torch.Tensor:
        if cache is None or cache.pos >= block_size:
            return forward_window()
        with autocast(device):
            logits, _ = model(token, cache=cache, last_only=True)
        return logits[:, -1, :].float()

    logits = forward_window()
    for produced in range(1, max_new_tokens + 1):
        next_id = chain.pick(logits, history, generator).view(1, 1).to(device)
        history = torch.cat([history, next_id], dim=1)
        yield int(next_id)
        if produced < max_new_tokens:  # no forward pass for a token nobody asked for
            logits = forward_next(next_id)


def decode_stream(tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text pieces as ids arrive; holds back bytes of a character that is not complete yet."""
    generated: list[int] = []
    emitted = ""
    for token in ids:
        generated.append(token)
        text = tokenizer.decode(generated)
        if text.endswith("\ufffd"):
            continue  # a multi-byte character split across tokens: wait for the rest
        if len(text) > len(emitted):
            yield text[len(emitted) :]
            emitted = text
    text = tokenizer.decode(generated)
    if len(text) > len(emitted):
        yield text[len(emitted) :]


def generate_text(
    model: GPT,
    tokenizer,
    prompt: str,
    max_new_tokens: int,
    chain,
    seed: int | None = None,
    stop: Sequence[str] = (),
) -> Iterator[str]:
    """Stream the continuation of ``prompt`` as text, ending early at any ``stop`` string (not included)."""
    generator = None
    if seed is not None:
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    ids = generate_ids(model, tokenizer.encode(prompt), max_new_tokens, chain, generator)
    yield from stream_until_stop(decode_stream(tokenizer, ids), stop)
