"""Write an English corpus neither preset was tuned on: the documentation of Python's standard library
as ``pydoc`` renders it in plain text (about 2 MB of technical English), for comparing presets.

    .venv/bin/python benchmarks/english_corpus.py /tmp/corpora/pydoc.txt
"""

import pydoc
import sys
import warnings
from pathlib import Path

MODULES = [
    "abc",
    "argparse",
    "array",
    "asyncio",
    "base64",
    "bisect",
    "calendar",
    "collections",
    "concurrent.futures",
    "configparser",
    "contextlib",
    "copy",
    "csv",
    "dataclasses",
    "datetime",
    "decimal",
    "difflib",
    "email",
    "enum",
    "fractions",
    "functools",
    "gettext",
    "glob",
    "gzip",
    "hashlib",
    "heapq",
    "hmac",
    "html",
    "http.client",
    "http.server",
    "imaplib",
    "inspect",
    "io",
    "ipaddress",
    "itertools",
    "json",
    "locale",
    "logging",
    "lzma",
    "mailbox",
    "math",
    "mimetypes",
    "multiprocessing",
    "numbers",
    "operator",
    "os",
    "pathlib",
    "pickle",
    "platform",
    "plistlib",
    "pprint",
    "queue",
    "random",
    "re",
    "sched",
    "secrets",
    "selectors",
    "shelve",
    "shlex",
    "shutil",
    "signal",
    "smtplib",
    "socket",
    "sqlite3",
    "ssl",
    "statistics",
    "string",
    "struct",
    "subprocess",
    "tarfile",
    "tempfile",
    "textwrap",
    "threading",
    "time",
    "timeit",
    "tokenize",
    "tomllib",
    "traceback",
    "typing",
    "unittest",
    "urllib.parse",
    "urllib.request",
    "uuid",
    "warnings",
    "wave",
    "weakref",
    "xml.etree.ElementTree",
    "zipfile",
    "zlib",
]


def main(out: str) -> None:
    warnings.simplefilter("ignore")
    pieces = []
    for name in MODULES:
        try:
            pieces.append(pydoc.render_doc(name, renderer=pydoc.plaintext))
        except Exception:  # a module this Python lacks
            continue
    text = "\n\n".join(pieces)
    Path(out).write_text(text, encoding="utf-8")
    print(f"wrote {out}: {len(text):,} characters from {len(pieces)} modules")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "pydoc.txt")
