"""One error type for user mistakes: the CLI prints its message on one line and exits with code 2."""


class AnexaError(Exception):
    """A mistake the user can fix; the message says how."""
