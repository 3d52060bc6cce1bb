"""Conversations to fine-tune on: a JSONL file of OpenAI-style chats, rendered with the model's template.

Each line is ``{"messages": [{"role": "system" | "user" | "assistant", "content": "…"}, …]}`` with at
least one assistant message. The model's own chat template renders the conversation; the loss counts
only the tokens of the assistant's turns — what the template writes for each assistant message after the
generation prompt that opens it, end-of-turn marker included — so the model learns to answer, not to
write the user's part. A conversation longer than the training window keeps its first ``seq_len`` tokens
(the rest is cut, and counted).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError
from anexa_core.infer.chat import JinjaTemplate, Template, normalize_messages

IGNORE = -100
"""The target of a token the loss does not count (``F.cross_entropy``'s ``ignore_index``)."""


@dataclass(frozen=True)
class Example:
    """One conversation as token ids and, per token, whether the loss counts it (an assistant token)."""

    ids: list[int]
    trained: list[bool]


@dataclass(frozen=True)
class ChatData:
    """A chats file as examples, with what was done to fit them: ``truncated`` conversations cut to the
    window, ``tokens`` in all, ``trained_tokens`` the loss counts."""

    examples: list[Example]
    truncated: int

    @property
    def tokens(self) -> int:
        return sum(len(e.ids) for e in self.examples)

    @property
    def trained_tokens(self) -> int:
        return sum(sum(e.trained) for e in self.examples)


def is_chats_file(spec: str | Sequence[str]) -> bool:
    """Whether ``--data`` names one ``.jsonl`` file (conversations) rather than text."""
    return isinstance(spec, str) and spec.lower().endswith(".jsonl") and Path(spec).expanduser().is_file()


def read_conversations(path: Path) -> list[list[dict[str, str]]]:
    """The conversations of a JSONL file; a malformed line is one :class:`AnexaError` naming its number."""
    conversations = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                raise AnexaError(
                    f'{path.name} line {number} is not JSON ({exc.msg}): one {{"messages": [...]}} object per line'
                ) from None
            messages = record.get("messages") if isinstance(record, dict) else None
            if not isinstance(messages, list) or not messages:
                raise AnexaError(
                    f'{path.name} line {number} has no "messages" list: one {{"messages": [...]}} object per line'
                )
            try:
                normalized = normalize_messages(messages)
            except AnexaError as exc:
                raise AnexaError(f"{path.name} line {number}: {exc}") from None
            if not any(message["role"] == "assistant" for message in normalized):
                raise AnexaError(f"{path.name} line {number} has no assistant message: nothing to learn from it")
            conversations.append(normalized)
    if not conversations:
        raise AnexaError(f'{path.name} holds no conversations: one {{"messages": [...]}} object per line')
    return conversations


def assistant_spans(template: Template, messages: Sequence[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of its assistant turns: for each assistant
    message, what rendering it adds after the generation prompt of the conversation before it."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        opened = template.render(messages[:index], add_generation_prompt=True)
        closed = template.render(messages[: index + 1], add_generation_prompt=False)
        if not (closed.startswith(opened) and text.startswith(closed)):
            raise AnexaError(
                "the model's chat template does not render a conversation as the sum of its turns: "
                "its assistant tokens cannot be told apart"
            )
        spans.append((len(opened), len(closed)))
    return text, spans


def encode_conversation(template: Template, tokenizer: Any, messages: Sequence[dict[str, str]]) -> Example:
    """Ids and loss mask: the rendering encoded piece by piece at the assistant spans' edges, so every
    token belongs wholly to an assistant turn or not."""
    text, spans = assistant_spans(template, messages)
    ids: list[int] = []
    trained: list[bool] = []
    position = 0
    for start, end in [*spans, (len(text), len(text))]:
        for piece, is_assistant in ((text[position:start], False), (text[start:end], True)):
            if piece:
                piece_ids = tokenizer.encode(piece)
                ids += piece_ids
                trained += [is_assistant] * len(piece_ids)
        position = end
    return Example(ids, trained)


def load_chats(path: Path, tokenizer: Any, seq_len: int) -> ChatData:
    """Every conversation of ``path`` encoded with the model's template (``tokenizer.chat_template``) and cut
    to ``seq_len`` + 1 tokens. Raises :class:`AnexaError` for a model without a chat template."""
    source = getattr(tokenizer, "chat_template", None)
    if not source:
        raise AnexaError(
            "conversations need the model's chat template, and this model has none: fine-tune a chat "
            "model (anexa import), or pass plain text with --data"
        )
    template = JinjaTemplate(source, getattr(tokenizer, "special_tokens", None))
    examples, truncated = [], 0
    for messages in read_conversations(Path(path)):
        example = encode_conversation(template, tokenizer, messages)
        if len(example.ids) > seq_len + 1:
            truncated += 1
            example = Example(example.ids[: seq_len + 1], example.trained[: seq_len + 1])
        if any(example.trained[1:]):
            examples.append(example)
    return ChatData(examples, truncated)
