"""``python -m anexa_cli``: the same as the ``anexa`` command."""

from anexa_cli.main import main

main()
