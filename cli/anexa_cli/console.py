"""The rich consoles the commands print through."""

from rich.console import Console

PIPE_WIDTH = 160
"""Columns for output that is not a terminal (a pipe, a log): rich's default 80 squeezes tables to '…'."""


def console(stderr: bool = False) -> Console:
    """A console on stdout (or stderr); wider than 80 columns when it is not a terminal."""
    probe = Console(stderr=stderr)
    return probe if probe.is_terminal else Console(stderr=stderr, width=PIPE_WIDTH, soft_wrap=True)


def count(number: int) -> str:
    """A count read at a glance, never rounded to nothing: 10,651,008 → ``10.65M``, 820,992 → ``0.82M``,
    4,864 → ``4,864`` (the reference model's; ``0.00M`` said nothing)."""
    return f"{number / 1e6:.2f}M" if number >= 100_000 else f"{number:,}"
