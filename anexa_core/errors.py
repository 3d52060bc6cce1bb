"""One error type for user mistakes: the CLI prints its message on one line and exits with code 2."""


class AnexaError(Exception):
    """A mistake the user can fix; the message says how."""


def listed(names: list[str], most: int = 3) -> str:
    """``a, b, c, …``: the first ``most`` of ``names``, for a message that must stay one line."""
    return ", ".join(names[:most]) + (", …" if len(names) > most else "")
