"""Dataset plugin ``corpora``: two public-domain books.

``sherlock`` ships inside the package (xz-compressed, ~180 kB), so the default job needs no network;
its text is checked against its SHA-256 on every use. It is Project Gutenberg eBook #1661 with the
Gutenberg licence header and footer removed. ``tinyshakespeare`` (char-rnn's, 1.1 MB) is downloaded on
first use into ``$ANEXA_CACHE`` and pinned by the SHA-256 of the file that URL serves.
"""

from pathlib import Path

from anexa_core import LocalText, RemoteText, hookimpl

_DATA = Path(__file__).resolve().parent / "data"


def sherlock() -> LocalText:
    """The Adventures of Sherlock Holmes, Arthur Conan Doyle (Project Gutenberg #1661), 576 kB of text."""
    return LocalText(
        _DATA / "sherlock.txt.xz",
        sha256="e21895308fe6da6919abc53e2cf77d81f914887897546153cc5d49b2eadefe50",
        description=sherlock.__doc__,
    )


def tinyshakespeare() -> RemoteText:
    """tinyshakespeare from char-rnn: 40,000 lines of Shakespeare's plays, 1.1 MB (downloaded once)."""
    return RemoteText(
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        filename="tinyshakespeare.txt",
        description=tinyshakespeare.__doc__,
    )


@hookimpl
def register_datasets(register):
    register("sherlock", sherlock)
    register("tinyshakespeare", tinyshakespeare)
