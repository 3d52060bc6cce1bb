"""Chat messages → one prompt for a base model.

Anexa models are *base* models: they were trained only to continue text, never to follow
instructions or to take turns. "Chat" therefore means: the conversation is written out as a plain
transcript, the assistant's next line is opened, and the model continues it; stop strings end the
reply where the transcript would move on. The default transcript is::

    {system content}

    User: {user content}
    Assistant: {assistant content}
    User: {user content}
    Assistant:

and the reply stops at a blank line or where the model starts writing the next ``User:`` /
``Assistant:`` line. Every piece is overridable (server-wide with ``anexa serve --chat-template
FILE.toml``, per request with ``"anexa": {"chat_template": {...}}``), using the keys of
:class:`ChatTemplate`. ``{content}`` in a role's template is replaced by the message text (a plain
text replacement: braces in messages are never interpreted).
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError

PLACEHOLDER = "{content}"
ROLES = ("system", "user", "assistant")
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


@dataclass(frozen=True)
class ChatTemplate:
    """How each message is written into the prompt, what opens the reply, and where the reply ends.

    ``system``/``user``/``assistant``: text with one ``{content}`` placeholder, written per message in
    order. ``generation_prompt``: appended after the last message (the opened assistant line).
    ``stop``: strings that end the reply (not included), added to the request's own ``stop``.
    """

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

    def render(self, messages: Iterable[tuple[str, str]]) -> str:
        """``(role, content)`` pairs (roles already normalised to :data:`ROLES`) → the prompt text."""
        parts = [getattr(self, role).replace(PLACEHOLDER, content) for role, content in messages]
        return "".join(parts) + self.generation_prompt

    def updated(self, changes: Mapping[str, Any]) -> ChatTemplate:
        """This template with some keys replaced; unknown keys or bad values raise :class:`AnexaError`."""
        names = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - names)
        if unknown:
            raise AnexaError(f"unknown chat template key {unknown[0]!r}: use {', '.join(sorted(names))}")
        values = dict(changes)
        if "stop" in values and isinstance(values["stop"], list):
            values["stop"] = tuple(values["stop"])
        return dataclasses.replace(self, **values)

    @classmethod
    def from_toml(cls, path: Path) -> ChatTemplate:
        """The default template with the keys of a TOML file replaced (see :class:`ChatTemplate`)."""
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise AnexaError(f"chat template {path} does not exist") from None
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise AnexaError(f"chat template {path} is not a readable TOML file: {exc}") from None
        return cls().updated(data)
