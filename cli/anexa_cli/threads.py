"""``--threads``, the one option every command that runs torch takes (``anexa_core.device.configure_threads``)."""

from __future__ import annotations

from typing import Annotated

import typer

THREADS_HELP = (
    "CPU threads for torch's operations; 0 chooses. \\[default: $ANEXA_THREADS or $OMP_NUM_THREADS if set, "
    "else the cores that other work leaves free when the command starts]"
)

Threads = Annotated[int | None, typer.Option("--threads", help=THREADS_HELP, show_default=False)]


def use_threads(threads: int | None, default: int | None = None) -> int:
    """Apply ``--threads`` before the command runs torch (see ``anexa_core.device.configure_threads``);
    ``default``: the command's own count when neither the flag nor the environment gives one."""
    from anexa_core.device import configure_threads

    return configure_threads(threads, default)
