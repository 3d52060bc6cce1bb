"""OpenAI's response shapes: whole answers, streamed chunks, log-probabilities, usage.

Log-probabilities are natural logs, as the model's own ``log_softmax`` gives them. ``/v1/completions``
has OpenAI's legacy shape ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``: each
``top_logprobs`` entry maps the ``logprobs`` most likely tokens' text to their log-probability, plus the
chosen token (so up to ``logprobs + 1`` entries); the first token of an echoed prompt has ``null`` for
both. ``/v1/chat/completions`` has ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token",
"logprob", "bytes"}, …]}]}``. A token's ``bytes`` are the UTF-8 bytes it adds to the text (part of a
character for a byte-level token that splits one); its text is those bytes read as UTF-8, where bytes that
form no whole character are written ``\\xNN`` (as DeepSeek's API does), so tokens that split a character
keep texts of their own instead of sharing U+FFFD. ``text_offset`` counts the characters of the text
before a token: a token that continues a character starts where that character does.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Sequence
from typing import Any

from anexa_core.infer.engine import Token
from anexa_core.infer.generation import token_bytes
from anexa_serve.decoding import Update


class TokenText:
    """Each token's bytes (:func:`~anexa_core.infer.generation.token_bytes`) and text, remembered per id."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._known: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        data = self._known.get(token_id)
        if data is None:
            data = self._known[token_id] = token_bytes(self.tokenizer, token_id)
        return data

    def __call__(self, token_id: int) -> str:
        return self.bytes_of(token_id).decode("utf-8", errors="backslashreplace")


def head(chat: bool, model: str, stream: bool) -> dict[str, Any]:
    """The fields every answer (or chunk) of one request shares."""
    kind = ("chat.completion.chunk" if stream else "chat.completion") if chat else "text_completion"
    prefix = "chatcmpl-" if chat else "cmpl-"
    return {"id": prefix + secrets.token_hex(12), "object": kind, "created": int(time.time()), "model": model}


def completion_logprobs(tokens: Sequence[Token], text: TokenText, offsets: list[int]) -> dict[str, Any]:
    """The legacy ``logprobs`` object for ``tokens`` starting at the characters ``offsets``."""
    texts = [text(token.id) for token in tokens]
    tops: list[dict[str, float] | None] = []
    for token, piece in zip(tokens, texts, strict=True):
        if token.top is None:
            tops.append(None)
            continue
        top: dict[str, float] = {}
        for token_id, logprob in token.top:
            top.setdefault(text(token_id), logprob)
        if token.logprob is not None:
            top.setdefault(piece, token.logprob)
        tops.append(top)
    return {
        "tokens": texts,
        "token_logprobs": [token.logprob for token in tokens],
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(tokens: Sequence[Token], text: TokenText) -> dict[str, Any]:
    """The chat ``logprobs`` object: one entry per token with its alternatives."""

    def entry(token_id: int, logprob: float | None) -> dict[str, Any]:
        piece = text(token_id)
        return {"token": piece, "logprob": logprob, "bytes": list(text.bytes_of(token_id))}

    content = [
        {**entry(token.id, token.logprob), "top_logprobs": [entry(i, lp) for i, lp in token.top or []]}
        for token in tokens
    ]
    return {"content": content, "refusal": None}


def logprobs_of(chat: bool, update: Update, text: TokenText | None) -> dict[str, Any] | None:
    """``update``'s tokens as the endpoint's ``logprobs`` object; None when logprobs were not asked for."""
    if text is None:
        return None
    if chat:
        return chat_logprobs(update.tokens, text)
    return completion_logprobs(update.tokens, text, update.offsets)


def choice(chat: bool, index: int, text: str, finish: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """One choice of a whole (non-streamed) answer."""
    if chat:
        message = {"role": "assistant", "content": text}
        return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}


def chunk(
    first: dict[str, Any],
    chat: bool,
    index: int,
    text: str | None = None,
    finish: str | None = None,
    logprobs: dict[str, Any] | None = None,
    role: bool = False,
) -> dict[str, Any]:
    """One streamed chunk of choice ``index``: a piece of text, the opening role (chat), or the closing
    ``finish_reason``."""
    if chat:
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        entry = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
    else:
        entry = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
    return {**first, "choices": [entry]}


def chunks_of(first: dict[str, Any], chat: bool, update: Update, text: TokenText | None) -> list[dict[str, Any]]:
    """The chunks one update becomes: its text (with its tokens' logprobs), then its finish reason (with
    the tokens that formed no text, e.g. a stop string's, when logprobs were asked for)."""
    out = []
    logprobs = logprobs_of(chat, update, text)
    if update.text:
        out.append(chunk(first, chat, update.index, update.text, logprobs=logprobs))
        logprobs = None
    if update.finish_reason is not None:
        tokens_left = logprobs is not None and bool(update.tokens)
        out.append(chunk(first, chat, update.index, None, update.finish_reason, logprobs if tokens_left else None))
    return out


def sse(payload: dict[str, Any] | str) -> str:
    """One server-sent event: ``data: <json>`` (or ``data: [DONE]``) and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return f"data: {data}\n\n"
