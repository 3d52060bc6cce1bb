"""Request bodies of the OpenAI endpoints, validated strictly (a string is not a number).

Every field is honoured or refused with a 400 naming it. Unknown fields are refused. So are known fields
Anexa cannot honour, when set to anything but their neutral value: ``best_of`` > 1, ``suffix``,
``logit_bias``, ``presence_penalty``/``frequency_penalty`` (use ``repetition_penalty``), ``tools``,
``functions``, a ``tool_choice`` that asks for a call, a ``response_format`` other than text, ``store:
true``, ``modalities`` other than text, ``anexa.chat_template`` on ``/v1/completions`` (no template there).
So are fields that only mean something beside another and would be dropped: ``stream_options`` without
``stream: true`` (as OpenAI), ``top_logprobs`` without ``logprobs: true``, and chat's ``max_tokens`` and
``max_completion_tokens`` (one limit, two names) when both are given and differ. A few fields that clients
send and that change nothing here are accepted: ``user``, ``stream_options.include_obfuscation``, and for
chat ``metadata``, ``safety_identifier``, ``prompt_cache_key`` and ``parallel_tool_calls`` (no completions
are stored, no prompt cache is shared, no tools are called). Anexa's own options go in the ``anexa``
extension object.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from anexa_serve.engine import SEED_RANGE

MAX_LOGPROBS = 20
"""Most alternatives per token (``logprobs`` of completions, ``top_logprobs`` of chat), as OpenAI's chat API."""
MAX_STOPS = 16
"""Most ``stop`` strings a request may give (OpenAI allows 4; lm-evaluation-harness may send more). Every
token of every choice is checked against each, so their number and length are bounded."""
MAX_STOP_CHARS = 256
"""Longest ``stop`` string, in characters."""

NonEmpty = Annotated[str, StringConstraints(min_length=1)]
Stop = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]
TokenIds = Annotated[list[int], Field(min_length=1)]
Refusal = tuple[str, str]
"""``(param, message)``: why a request is refused."""


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")


class StreamOptions(_Strict):
    """``include_usage``: send a last chunk with ``usage`` (and no choices) before ``[DONE]``.
    ``include_obfuscation`` (padding against length side channels over TLS) changes nothing here: the
    server speaks plain HTTP (TLS is a proxy's). Only with ``stream: true``."""

    include_usage: bool = False
    include_obfuscation: bool | None = None


class AnexaOptions(_Strict):
    """The ``anexa`` extension field.

    ``samplers``: the CLI's ``-s`` specs, e.g. ``["top_k=40", "repetition_penalty=1.2"]`` (any installed
    sampler plugin). ``chat_template``: keys of :class:`anexa_core.infer.chat.Transcript` to change for
    this request (chat with a model that has no template of its own).
    """

    samplers: list[str] = Field(default_factory=list)
    chat_template: dict[str, Any] | None = None


class GenerationRequest(_Strict):
    """The fields both generation endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOPS)] | None = None
    seed: Annotated[int, Field(ge=SEED_RANGE[0], le=SEED_RANGE[1])] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1)] | None = 1
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    anexa: AnexaOptions = Field(default_factory=AnexaOptions)

    def refusal(self) -> Refusal | None:
        """``(param, reason)`` for the first field Anexa cannot honour, else None."""
        if self.stream_options is not None and not self.stream:
            return (
                "stream_options",
                "stream_options is only allowed with stream: true: set stream: true or leave stream_options out",
            )
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                return name, f'{name} is not supported: use "anexa": {{"samplers": ["repetition_penalty=1.2"]}}'
        if self.logit_bias:
            return "logit_bias", "logit_bias is not supported: leave it out"
        return None

    def limit(self) -> tuple[str, int | None]:
        """``(field, value)``: the completion-token limit asked for (None: the server's default) and the
        field it came from, for errors that name it."""
        return "max_tokens", self.max_tokens

    def stops(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def choices(self) -> int:
        return self.n or 1

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(GenerationRequest):
    """``POST /v1/completions``. ``prompt``: a string, a list of token ids, or a list of either (a batch:
    ``n`` choices per prompt). ``logprobs``: 0 to :data:`MAX_LOGPROBS` alternatives per token. ``echo``: the
    prompt comes back before the completion, with its tokens' log-probabilities; ``max_tokens`` may then be 0."""

    prompt: str | TokenIds | Annotated[list[str | TokenIds], Field(min_length=1)]
    echo: bool | None = False
    logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    best_of: int | None = None
    suffix: str | None = None

    def refusal(self) -> Refusal | None:
        if self.anexa.chat_template:
            return (
                "anexa.chat_template",
                "anexa.chat_template changes chat prompts: use /v1/chat/completions or leave it out",
            )
        if self.best_of not in (None, 1):
            return "best_of", "best_of must be 1: ask for n choices and pick among them yourself"
        if self.suffix:
            return "suffix", "suffix (fill-in-the-middle) is not supported by these left-to-right models"
        return super().refusal()

    def prompt_list(self) -> list[str | list[int]]:
        """The prompts of the batch: one for a string or a list of ids."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        ids = [item for item in self.prompt if isinstance(item, int)]
        return [ids] if ids else [item for item in self.prompt if not isinstance(item, int)]


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    """One chat message: ``content`` (required) is a string or a non-empty list of ``{"type": "text",
    "text": ...}`` parts; ``developer`` is OpenAI's newer name for ``system``."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str | Annotated[list[TextPart], Field(min_length=1)]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(GenerationRequest):
    """``POST /v1/chat/completions``: ``messages`` become the prompt through the model's chat template.
    ``logprobs: true`` returns each token's log-probability, ``top_logprobs`` (0 to :data:`MAX_LOGPROBS`)
    that many alternatives. ``max_completion_tokens`` is OpenAI's newer name for ``max_tokens``: either
    gives the limit; both, only with the same value (neither silently wins)."""

    messages: Annotated[list[Message], Field(min_length=1)]
    max_completion_tokens: int | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    modalities: list[str] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None

    def refusal(self) -> Refusal | None:
        calls = "asks for a function call: these models make none"
        limits = (self.max_tokens, self.max_completion_tokens)
        checks = [
            (
                "max_completion_tokens",
                None not in limits and limits[0] != limits[1],
                f"max_tokens ({limits[0]}) and max_completion_tokens ({limits[1]}) disagree: they are one limit "
                "(max_completion_tokens is OpenAI's newer name); give one of them, or the same value in both",
            ),
            ("tools", bool(self.tools), "tools (function calling) are not supported by these models"),
            ("functions", bool(self.functions), "functions (function calling) are not supported by these models"),
            (
                "tool_choice",
                self.tool_choice not in (None, "none", "auto"),
                f"tool_choice {self.tool_choice!r} {calls}",
            ),
            ("function_call", self.function_call not in (None, "none", "auto"), f"function_call {calls}"),
            (
                "response_format",
                self.response_format not in (None, {"type": "text"}),
                'response_format must be {"type": "text"}: these models cannot be held to JSON',
            ),
            (
                "modalities",
                self.modalities not in (None, ["text"]),
                'modalities must be ["text"]: these models write text',
            ),
            ("store", bool(self.store), "store is not supported: this server keeps no completions"),
            ("top_logprobs", self.top_logprobs is not None and not self.logprobs, "top_logprobs needs logprobs: true"),
        ]
        refused = next(((param, message) for param, wrong, message in checks if wrong), None)
        return refused or super().refusal()

    def limit(self) -> tuple[str, int | None]:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            return "max_completion_tokens", self.max_completion_tokens
        return super().limit()

    def top(self) -> int | None:
        """Alternatives per token for the engine: None without ``logprobs``."""
        return (self.top_logprobs or 0) if self.logprobs else None


class TokenizeRequest(_Strict):
    """``POST /tokenize`` (vLLM's shape): the ids of ``prompt``; ``add_special_tokens`` adds the BOS id
    where the tokenizer asks for one."""

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True


class DetokenizeRequest(_Strict):
    """``POST /detokenize`` (vLLM's shape): the text of ``tokens``."""

    model: str | None = None
    tokens: list[int]
