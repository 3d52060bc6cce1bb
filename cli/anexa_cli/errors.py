"""User mistakes become one line on stderr and exit code 2, never a traceback."""

import functools

import typer

from anexa_core.errors import AnexaError


def user_errors(command):
    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except AnexaError as exc:
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None

    return wrapper
