"""Request bodies of the OpenAI endpoints, validated strictly (a string is not a number).

Unknown top-level OpenAI fields are accepted and ignored, except those whose meaning Anexa cannot
honour (``n`` > 1, ``best_of`` > 1, ``echo``, ``logprobs``, ``suffix``, ``tools``, non-zero
``presence_penalty``/``frequency_penalty``): those are refused rather than silently dropped.
Anexa's own options go in the ``anexa`` extension object.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from anexa_serve.engine import SEED_RANGE

NonEmpty = Annotated[str, StringConstraints(min_length=1)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    """``include_usage``: send a last chunk with ``usage`` (and no choices) before ``[DONE]``."""

    include_usage: bool = False


class AnexaOptions(_Strict):
    """The ``anexa`` extension field.

    ``samplers``: the CLI's ``-s`` specs, e.g. ``["top_k=40", "repetition_penalty=1.2"]`` (any
    installed sampler plugin). ``chat_template``: keys of :class:`anexa_serve.chat.ChatTemplate` to
    change for this request (chat endpoint only).
    """

    samplers: list[str] = Field(default_factory=list)
    chat_template: dict[str, Any] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: NonEmpty | list[NonEmpty] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    user: str | None = None
    anexa: AnexaOptions = Field(default_factory=AnexaOptions)

    def unsupported(self) -> tuple[str, str] | None:
        """``(param, reason)`` for the first option Anexa cannot honour, else None."""
        if self.n != 1:
            return "n", "n must be 1: send several requests (with different seeds) for several completions"
        if self.logprobs not in (None, False):
            return "logprobs", "logprobs are not supported"
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) != 0:
                return name, f'{name} is not supported: use "anexa": {{"samplers": ["repetition_penalty=1.2"]}}'
        return None

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionRequest(_Common):
    """``POST /v1/completions``: ``prompt`` is a string (or a list holding exactly one string)."""

    prompt: str | list[str]
    echo: bool = False
    best_of: int = 1
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if isinstance(self.prompt, list) and len(self.prompt) != 1:
            return "prompt", "prompt must be a string or a list of exactly one string (no batches)"
        if self.echo:
            return "echo", "echo is not supported"
        if self.best_of != 1:
            return "best_of", "best_of must be 1"
        if self.suffix:
            return "suffix", "suffix (fill-in-the-middle) is not supported by these left-to-right models"
        return super().unsupported()

    def prompt_text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")

    type: Literal["text"]
    text: str


class Message(BaseModel):
    """One chat message: ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(_Common):
    """``POST /v1/chat/completions``: ``messages`` become the prompt through the chat template."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None
    tools: Any = None

    @model_validator(mode="after")
    def _one_max(self) -> ChatRequest:
        if self.max_tokens is None:
            self.max_tokens = self.max_completion_tokens
        return self

    def unsupported(self) -> tuple[str, str] | None:
        if self.tools:
            return "tools", "tools (function calling) are not supported by these base models"
        return super().unsupported()
