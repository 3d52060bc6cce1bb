"""One error type for user mistakes: the CLI prints its message on one line and exits with code 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class AnexaError(Exception):
    """A mistake the user can fix; the message says how."""


def listed(names: list[str], most: int = 3) -> str:
    """``a, b, c, …``: the first ``most`` of ``names``, for a message that must stay one line."""
    return ", ".join(names[:most]) + (", …" if len(names) > most else "")


def choose_one_of(given: object, choices: Iterable[str]) -> str:
    """The end of an "unknown X" message: ``did you mean 'sdpa'? choose one of math, sdpa, triton`` — the
    closest choice when one is close (:func:`difflib.get_close_matches`), then every choice."""
    choices = [str(choice) for choice in choices]
    if not choices:
        return "none is installed"
    close = difflib.get_close_matches(str(given), choices, n=1)
    return (f"did you mean {close[0]!r}? " if close else "") + f"choose one of {', '.join(choices)}"
