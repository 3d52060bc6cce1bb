"""Built-in corpora: two public-domain books, pinned by SHA-256 and downloaded on first use.

The hashes are those of the copies the project tests on. Sherlock's copy has the Project Gutenberg
header and footer removed; should the file served upstream differ, the download is refused with a
checksum error that tells the user to pass ``--data FILE`` instead of training on unknown bytes.
"""

from anexa_core import hookimpl
from anexa_core.data import RemoteText

SHERLOCK = RemoteText(
    url="https://www.gutenberg.org/cache/epub/1661/pg1661.txt",
    sha256="e21895308fe6da6919abc53e2cf77d81f914887897546153cc5d49b2eadefe50",
    filename="sherlock.txt",
    description="The Adventures of Sherlock Holmes, Arthur Conan Doyle (Project Gutenberg #1661), ~0.6 MB",
)

TINYSHAKESPEARE = RemoteText(
    url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    filename="tinyshakespeare.txt",
    description="tinyshakespeare from char-rnn: 40,000 lines of Shakespeare plays, ~1.1 MB",
)


@hookimpl
def register_datasets(register):
    register("sherlock", SHERLOCK)
    register("tinyshakespeare", TINYSHAKESPEARE)
