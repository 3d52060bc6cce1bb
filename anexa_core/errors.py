"""One error type for user mistakes: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AnexaError(Exception):
    """A mistake the user can fix; the message says how."""


def one_line(exc: BaseException, most: int | None = None) -> str:
    """``exc``'s message on one line (its whitespace runs as single spaces), at most ``most`` characters: the
    detail a one-line error quotes from a library's exception."""
    return " ".join(str(exc).split())[:most]


def listed(names: list[str], most: int = 3) -> str:
    """``a, b, c, …``: the first ``most`` of ``names``, for a message that must stay one line."""
    return ", ".join(names[:most]) + (", …" if len(names) > most else "")


def closest(given: str, choices: Iterable[str]) -> str | None:
    """The choice ``given`` most likely misspells, or ``None`` when none is close
    (:func:`difflib.get_close_matches`' ratio of at least 0.6)."""
    close = difflib.get_close_matches(given, list(choices), n=1)
    return close[0] if close else None


def choose_one_of(given: object, choices: Iterable[str]) -> str:
    """The end of an "unknown X" message: ``did you mean 'sdpa'? choose one of math, sdpa, triton`` — the
    closest choice when one is close (:func:`difflib.get_close_matches`), then every choice."""
    choices = [str(choice) for choice in choices]
    if not choices:
        return "none is installed"
    close = closest(str(given), choices)
    return (f"did you mean {close!r}? " if close else "") + f"choose one of {', '.join(choices)}"
