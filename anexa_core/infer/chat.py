"""Chat: a conversation written as one prompt, through the model's own template or a plain transcript.

A pretrained chat model comes with a Jinja template (``tokenizer_config.json`` or GGUF metadata, kept in
its ``hf`` tokenizer's state): :class:`JinjaTemplate` renders it in Jinja's immutable sandbox, as
transformers' ``apply_chat_template`` does (``trim_blocks``, ``lstrip_blocks``, ``tojson``,
``raise_exception``, ``strftime_now``), so a template from the hub cannot reach Python. Replies end at any
special token (:func:`reply_ends`), which is never shown.

Anexa's own models are *base* models, trained only to continue text: for them chat means continuing a
plain transcript (:class:`Transcript`)::

    {system content}

    User: {user content}
    Assistant: {assistant content}
    User: {user content}
    Assistant:

and the reply stops at a blank line or where the model starts the next ``User:``/``Assistant:`` line.

:class:`Conversation` keeps a multi-turn chat within the model's context: when the next prompt would
not leave room for the reply, the oldest turns are dropped (the system message stays), whole turns at a
time.
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from anexa_core.errors import AnexaError

PLACEHOLDER = "{content}"
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role
Message = Mapping[str, str]
"""``{"role": "system" | "user" | "assistant", "content": text}``, as the OpenAI API and templates have it."""


class Template(Protocol):
    """What renders a conversation: ``render(messages, add_generation_prompt)`` → prompt text; ``stop``:
    text that ends a reply (besides the tokenizer's end-of-turn ids)."""

    @property
    def stop(self) -> tuple[str, ...]: ...

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str: ...


@dataclass(frozen=True)
class Transcript:
    """The plain transcript for base models: each message written with its role's text (one ``{content}``
    placeholder, replaced as plain text: braces in messages are never interpreted), then
    ``generation_prompt`` opens the reply; ``stop`` strings end it (not included)."""

    system: str = "{content}\n\n"
    user: str = "User: {content}\n"
    assistant: str = "Assistant: {content}\n"
    generation_prompt: str = "Assistant:"
    stop: tuple[str, ...] = ("\n\n", "\nUser:", "\nAssistant:")

    def __post_init__(self) -> None:
        for role in ROLES:
            value = getattr(self, role)
            if not isinstance(value, str) or PLACEHOLDER not in value:
                raise AnexaError(f"chat template {role!r} must be text containing {PLACEHOLDER}, got {value!r}")
        if not isinstance(self.generation_prompt, str):
            raise AnexaError("chat template 'generation_prompt' must be text")
        if isinstance(self.stop, str) or not all(isinstance(s, str) and s for s in self.stop):
            raise AnexaError("chat template 'stop' must be a list of non-empty strings")
        object.__setattr__(self, "stop", tuple(self.stop))

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        parts = [getattr(self, message["role"]).replace(PLACEHOLDER, message["content"]) for message in messages]
        return "".join(parts) + (self.generation_prompt if add_generation_prompt else "")

    def updated(self, changes: Mapping[str, Any]) -> Transcript:
        """This transcript with some keys replaced; unknown keys or bad values raise :class:`AnexaError`."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise AnexaError(f"unknown chat template key {unknown[0]!r}: use {', '.join(sorted(names))}")
        values = dict(changes)
        if "stop" in values and isinstance(values["stop"], list):
            values["stop"] = tuple(values["stop"])
        return dataclasses.replace(self, **values)

    @classmethod
    def from_toml(cls, path: Path) -> Transcript:
        """The default transcript with the keys of a TOML file replaced."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AnexaError(f"chat template {path} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise AnexaError(f"chat template {path} is not a readable TOML file: {exc}") from None
        return cls().updated(data)


class JinjaTemplate:
    """A model's own chat template (Jinja), rendered in an immutable sandbox with the variables transformers
    gives templates: ``messages``, ``add_generation_prompt``, the special tokens (``bos_token``,
    ``eos_token``, …), ``tools`` (None) and the helpers ``raise_exception``, ``strftime_now``, ``tojson``."""

    stop: tuple[str, ...] = ()

    def __init__(self, source: str, special_tokens: Mapping[str, str | None] | None = None):
        from jinja2 import TemplateError
        from jinja2.ext import loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        environment = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
        environment.filters["tojson"] = _tojson
        environment.globals["raise_exception"] = _raise
        environment.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
        try:
            self._template = environment.from_string(source)
        except TemplateError as exc:
            raise AnexaError(
                f"the model's chat template does not parse ({exc}): pass another with --chat-template"
            ) from None
        self.source = source
        self.special_tokens = {key: value for key, value in (special_tokens or {}).items() if value is not None}

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True) -> str:
        """The prompt text; :class:`AnexaError` when the template refuses the conversation."""
        from jinja2 import TemplateError

        try:
            return self._template.render(
                messages=[dict(message) for message in messages],
                add_generation_prompt=add_generation_prompt,
                tools=None,
                documents=None,
                **self.special_tokens,
            )
        except TemplateError as exc:
            raise AnexaError(f"the model's chat template refused the conversation: {exc}") from None


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | None = None, separators=None, sort_keys: bool = False
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise(message: str) -> None:
    from jinja2 import TemplateError

    raise TemplateError(message)


def template_for(tokenizer: Any, override: Transcript | str | None = None) -> Template:
    """How to chat with a model: ``override`` (a transcript, or Jinja text), else the tokenizer's own
    ``chat_template``, else the default :class:`Transcript`."""
    if isinstance(override, Transcript):
        return override
    special = getattr(tokenizer, "special_tokens", None) or {}
    if isinstance(override, str):
        return JinjaTemplate(override, special)
    own = getattr(tokenizer, "chat_template", None)
    return JinjaTemplate(own, special) if own else Transcript()


def reply_ends(template: Template, tokenizer: Any) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """What ends a chat reply, ``(stop strings, stop ids)``. Through a model's own template: every special
    token (the tokenizer's ``eos_ids`` first, then its other ``special_ids``: a model that writes
    ``<|im_start|>`` is opening the next turn) and the text of those the template names, should the model
    spell one out — so no template marker reaches a reply. Through a transcript: its ``stop`` strings and
    the tokenizer's end-of-turn ids. A reply that a special token ends at once is empty, as in transformers
    and llama.cpp; stop strings follow :class:`~anexa_core.infer.sampling.StopStrings`' rule."""
    eos = tuple(getattr(tokenizer, "eos_ids", ()) or ())
    if isinstance(template, JinjaTemplate):
        special = sorted(set(getattr(tokenizer, "special_ids", ()) or ()) - set(eos))
        markers = tuple(dict.fromkeys(value for value in template.special_tokens.values() if value))
        return markers, (*eos, *special)
    return tuple(template.stop), eos


def normalize_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    """Messages with OpenAI's roles mapped onto the template's (``developer`` is ``system``); an unknown role
    or non-text content raises :class:`AnexaError` naming the message."""
    normalized = []
    for index, message in enumerate(messages):
        role = ROLE_ALIASES.get(message.get("role", ""), message.get("role"))
        if role not in ROLES:
            raise AnexaError(
                f"messages[{index}].role {message.get('role')!r} is not supported: use system, user or assistant"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise AnexaError(f"messages[{index}].content must be text")
        normalized.append({"role": role, "content": content})
    return normalized


@dataclass
class Conversation:
    """A multi-turn chat: the messages so far, kept within the model's context.

    ``prompt_ids(tokenizer, context, reserve)`` renders the conversation with the template's generation
    prompt and encodes it; while that leaves fewer than ``reserve`` positions of ``context`` for the reply,
    the oldest turn (a user message and the replies after it) is dropped — never the system message nor
    the newest user message. ``dropped`` counts the turns dropped so far.
    """

    template: Template
    messages: list[dict[str, str]] = dataclasses.field(default_factory=list)
    dropped: int = 0

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def prompt_ids(self, encode: Any, context: int, reserve: int) -> list[int]:
        """``encode(text) -> ids``: the tokenizer's prompt encoding. Raises :class:`AnexaError` when even the
        newest message alone leaves no room."""
        while True:
            ids = encode(self.template.render(self.messages))
            if len(ids) + reserve <= context:
                return ids
            first = 1 if self.messages and self.messages[0]["role"] == "system" else 0
            users = [i for i, message in enumerate(self.messages) if message["role"] == "user" and i > first]
            if not users:
                if len(ids) < context:
                    return ids  # the reply gets what is left
                raise AnexaError(
                    f"the message is {len(ids)} tokens, more than the model's context of {context}: shorten it"
                )
            del self.messages[first : users[0]]
            self.dropped += 1
