"""Prompts as token ids, encoded once, checked before anything is decoded.

Text is encoded with the core's :func:`~anexa_core.infer.generation.encode_prompt` (normalised like training
text; a BOS id where the tokenizer asks for one) in a worker thread, so a large prompt never blocks the
event loop. Token ids are checked against the vocabulary. The ids go to the engine as they are: nothing
is encoded twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import anyio

from anexa_core.errors import AnexaError
from anexa_core.infer.generation import encode_prompt
from anexa_serve.chat import ChatPrompt
from anexa_serve.errors import APIError, invalid
from anexa_serve.models import ServedModel


def _encode_all(tokenizer: Any, prompts: Sequence[str | list[int]], vocab: int) -> list[list[int]] | APIError:
    out = []
    for index, prompt in enumerate(prompts):
        param = "prompt" if len(prompts) == 1 else f"prompt[{index}]"
        if isinstance(prompt, str):
            try:
                ids = encode_prompt(tokenizer, prompt)
            except AnexaError as exc:
                return invalid(str(exc), param=param, code="unencodable_prompt")
        else:
            ids = list(prompt)
            wrong = next((i for i in ids if not 0 <= i < vocab), None)
            if wrong is not None:
                return invalid(f"token id {wrong} is outside the vocabulary (0 to {vocab - 1})", param=param)
        if not ids:
            return invalid("the prompt is empty: give at least one character of text", param=param)
        out.append(ids)
    return out


async def completion_prompts(served: ServedModel, prompts: Sequence[str | list[int]]) -> list[list[int]]:
    """The ids of each prompt (text encoded, id lists checked); 400 naming ``prompt`` (or ``prompt[i]`` in
    a batch) for text the tokenizer cannot encode, ids outside the vocabulary, or an empty prompt."""
    vocab = int(served.model.config.vocab_size)
    result = await anyio.to_thread.run_sync(_encode_all, served.tokenizer, prompts, vocab)
    if isinstance(result, APIError):
        raise result
    return result


async def chat_prompt_ids(served: ServedModel, prompt: ChatPrompt) -> list[int]:
    """The rendered conversation's ids; 400 naming ``messages`` when the tokenizer cannot encode it,
    saying whether the template's own text is to blame."""

    def encode() -> list[int] | APIError:
        try:
            ids = encode_prompt(served.tokenizer, prompt.text, bos=prompt.bos)
        except AnexaError as exc:
            hint = ""
            try:
                encode_prompt(served.tokenizer, prompt.user_text, bos=False)
                hint = " (they come from the chat template: change it with anexa.chat_template or --chat-template)"
            except AnexaError:
                pass
            return invalid(f"{exc}{hint}", param="messages", code="unencodable_prompt")
        if not ids:
            return invalid("the conversation is empty: give at least one character of text", param="messages")
        return ids

    result = await anyio.to_thread.run_sync(encode)
    if isinstance(result, APIError):
        raise result
    return result
