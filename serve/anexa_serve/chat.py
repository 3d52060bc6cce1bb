"""Which template each served model chats through, and one request's chat prompt.

A model's template is, in order: ``--chat-template FILE.jinja`` (replacing every model's), the model's
own Jinja template (a pretrained chat model's, kept in its ``hf`` tokenizer), or the plain
:class:`~anexa_core.infer.chat.Transcript` for base models (changed server-wide by ``--chat-template
FILE.toml`` and per request by ``anexa.chat_template``). All come from the core's
:func:`~anexa_core.infer.chat.template_for`; Jinja is rendered in its immutable sandbox.

A Jinja template writes its own special tokens, so its prompt is encoded without another BOS. What ends a
reply is the core's :func:`~anexa_core.infer.chat.reply_ends`: any special token (never shown) for a
Jinja template, so no template marker reaches a reply; a transcript's ``stop`` strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from anexa_core.errors import AnexaError
from anexa_core.infer.chat import JinjaTemplate, Template, Transcript, normalize_messages, reply_ends, template_for
from anexa_serve.errors import invalid
from anexa_serve.schemas import MAX_STOP_CHARS, MAX_STOPS

ChatOverride = Transcript | str | None
"""``--chat-template``: a transcript (TOML), Jinja source text, or None."""


def read_override(path: Path) -> Transcript | str:
    """``--chat-template FILE``: ``.jinja`` (or ``.j2``) is Jinja source text, anything else a TOML
    transcript. Raises :class:`AnexaError` for a missing, unreadable or invalid file."""
    if path.suffix.lower() in (".jinja", ".j2"):
        try:
            source = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise AnexaError(f"chat template {path} cannot be read ({exc}): give a UTF-8 Jinja file") from None
        from jinja2 import Environment, TemplateSyntaxError
        from jinja2.ext import loopcontrols

        try:  # parsing runs nothing: a broken template fails at start-up, not at the first request
            Environment(extensions=[loopcontrols]).parse(source)
        except TemplateSyntaxError as exc:
            raise AnexaError(
                f"chat template {path} does not parse (line {exc.lineno}: {exc.message}): fix it or leave --chat-template out"
            ) from None
        return source
    return Transcript.from_toml(path)


def check_override_used(path: Path, override: ChatOverride, tokenizers: Mapping[str, Any]) -> None:
    """``--chat-template FILE.toml`` changes the transcript of the models without a template of their own
    (``tokenizers`` by served name). Raises :class:`AnexaError` when every one has its own, so the file would
    change nothing."""
    own = [name for name, tokenizer in tokenizers.items() if getattr(tokenizer, "chat_template", None)]
    if isinstance(override, Transcript) and len(own) == len(tokenizers):
        raise AnexaError(
            f"--chat-template {path.name} is a transcript for models without a template of their own, and "
            f"{', '.join(own)} {'has' if len(own) == 1 else 'have'} one: give a FILE.jinja to replace it, or "
            "leave --chat-template out"
        )


def model_template(tokenizer: Any, override: ChatOverride) -> Template:
    """The template a model chats through (see the module docstring)."""
    if isinstance(override, str) or getattr(tokenizer, "chat_template", None):
        return template_for(tokenizer, override if isinstance(override, str) else None)
    return template_for(tokenizer, override or Transcript())


@dataclass(frozen=True)
class ChatPrompt:
    """A rendered conversation: the ``text``, the ``user_text`` inside it (to tell whose characters a
    tokenizer refuses), whether to add a BOS id, and what ends the reply."""

    text: str
    user_text: str
    bos: bool
    stops: tuple[str, ...]
    stop_ids: tuple[int, ...]


def render(
    template: Template, tokenizer: Any, messages: Sequence[Mapping[str, str]], changes: dict[str, Any] | None
) -> ChatPrompt:
    """``messages`` (``role``, ``content``) through ``template``, with this request's transcript
    ``changes``. Raises :class:`~anexa_serve.errors.APIError` 400 naming ``anexa.chat_template`` or
    ``messages``."""
    if changes:
        if not isinstance(template, Transcript):
            raise invalid(
                "anexa.chat_template changes the plain transcript, but this model chats through its own "
                "Jinja template: leave anexa.chat_template out",
                param="anexa.chat_template",
                code="invalid_value",
            )
        try:
            template = template.updated(changes)
        except (AnexaError, TypeError) as exc:
            raise invalid(str(exc), param="anexa.chat_template", code="invalid_value") from None
        if "stop" in changes and (
            len(template.stop) > MAX_STOPS or any(len(stop) > MAX_STOP_CHARS for stop in template.stop)
        ):  # checked against every token, as a request's own ``stop``, and bounded alike
            raise invalid(
                f"anexa.chat_template.stop takes at most {MAX_STOPS} strings of at most {MAX_STOP_CHARS} "
                "characters, as stop does: give fewer or shorter",
                param="anexa.chat_template.stop",
            )
    try:
        text = template.render(normalize_messages(messages))
    except AnexaError as exc:
        raise invalid(str(exc), param="messages", code="invalid_value") from None
    user_text = "".join(message["content"] for message in messages)
    stops, stop_ids = reply_ends(template, tokenizer)
    return ChatPrompt(text, user_text, not isinstance(template, JinjaTemplate), stops, stop_ids)
