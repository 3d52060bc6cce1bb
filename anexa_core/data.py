"""Corpora: download into a cache (checksummed), read and validate text, resolve ``--data``.

A corpus is a registered dataset name (``sherlock``), a local text file, or an http(s) URL.
Downloads stream into the cache through :func:`anexa_core.files.atomic_path`, so a failed or
corrupt download never leaves a file behind that a later run would trust. Every text — corpus or
prompt — goes through :func:`normalize_text`, so what the model was trained on and what it is asked
agree character for character.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import logging
import lzma
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from anexa_core import plugins
from anexa_core.errors import AnexaError
from anexa_core.files import atomic_path

DOWNLOAD_TIMEOUT_S = 30.0  # per socket operation, not for the whole file
_CHUNK = 1 << 20
_USER_AGENT = "anexa"
OFFLINE_HINT = "you seem to be offline; pass --data FILE with a local text file, or the built-in --data sherlock"
logger = logging.getLogger("anexa")


def cache_dir() -> Path:
    """Where downloads live: ``$ANEXA_CACHE``, else ``~/.cache/anexa``."""
    configured = os.environ.get("ANEXA_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "anexa"


def _safe_name(name: str, fallback: str) -> str:
    """A file or folder name made of harmless characters (URLs can hold anything)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-")
    return cleaned or fallback


def _url_filename(url: str) -> str:
    return _safe_name(Path(urllib.parse.unquote(urllib.parse.urlparse(url).path)).name, "download")


def download_path(url: str, sha256: str | None = None, filename: str | None = None) -> Path:
    """The cache file :func:`download` uses for ``url``: keyed by the expected hash, else by the URL."""
    key = sha256.lower()[:16] if sha256 else hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    name = _safe_name(filename, "download") if filename else _url_filename(url)
    return cache_dir() / "downloads" / f"{key}-{name}"


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download(url: str, sha256: str | None = None, filename: str | None = None) -> Path:
    """The local copy of ``url``, fetched into the cache on first use.

    With ``sha256`` the cached copy is trusted only if its hash matches (a corrupt one is fetched
    again), and a fresh download that does not match is discarded before anything lands in the cache.
    """
    target = download_path(url, sha256, filename)
    expected = sha256.lower() if sha256 else None
    if target.is_file():
        if expected is None or _file_sha256(target) == expected:
            return target
        target.unlink()  # corrupt or truncated by something outside Anexa: fetch again
    request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
    try:
        with atomic_path(target) as tmp:
            digest = hashlib.sha256()
            response = urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S)
            with response, open(tmp, "wb") as out:
                for chunk in iter(lambda: response.read(_CHUNK), b""):
                    digest.update(chunk)
                    out.write(chunk)
            got = digest.hexdigest()
            if expected is not None and got != expected:
                raise AnexaError(
                    f"checksum mismatch for {url}: expected {expected}, got {got}; the download was "
                    "discarded: pass --data FILE with a local copy of the text"
                )
    except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
        if isinstance(exc, urllib.error.HTTPError):
            reason = f"HTTP {exc.code} {exc.reason}"
        elif isinstance(exc, urllib.error.URLError):
            reason = exc.reason
        else:
            reason = exc
        detail = " ".join(str(reason).split()) or type(exc).__name__
        raise AnexaError(f"cannot download {url} ({detail}): {OFFLINE_HINT}") from None
    return target


@dataclass(frozen=True)
class RemoteText:
    """A text corpus on the web, pinned by its SHA-256 so every run trains on the same bytes.

    ``files()`` downloads it once into ``$ANEXA_CACHE`` (see :func:`download`).
    """

    url: str
    sha256: str
    filename: str
    description: str = ""

    def files(self) -> list[Path]:
        return [download(self.url, self.sha256, self.filename)]


@dataclass(frozen=True)
class LocalText:
    """A text file on this machine (plain, ``.xz`` or ``.gz``), optionally pinned by the SHA-256 of its text.

    ``files()`` checks the hash on every use, so a damaged copy is refused rather than trained on.
    """

    path: Path
    sha256: str | None = None
    description: str = ""

    def files(self) -> list[Path]:
        path = Path(self.path)
        if self.sha256 is not None:
            got = hashlib.sha256(read_bytes(path)).hexdigest()
            if got != self.sha256.lower():
                raise AnexaError(
                    f"{path} is damaged (SHA-256 {got[:12]}…, expected {self.sha256[:12]}…): "
                    "reinstall anexa, or pass --data FILE with your own copy of the text"
                )
        return [path]


def read_bytes(path: Path) -> bytes:
    """A file's bytes, decompressed when it ends in ``.xz`` or ``.gz``; one-line errors for the usual faults."""
    path = Path(path)
    try:
        if path.suffix == ".xz":
            return lzma.decompress(path.read_bytes())
        if path.suffix == ".gz":
            return gzip.decompress(path.read_bytes())
        return path.read_bytes()
    except FileNotFoundError:
        raise AnexaError(f"corpus file {path} not found: pass an existing text file") from None
    except IsADirectoryError:
        raise AnexaError(f"corpus {path} is a folder: pass a text file") from None
    except (lzma.LZMAError, gzip.BadGzipFile, EOFError) as exc:
        raise AnexaError(f"corpus {path} is not a valid compressed file ({exc}): pass an intact file") from None
    except OSError as exc:
        raise AnexaError(f"cannot read corpus {path} ({exc.strerror}): pass a readable text file") from None


def normalize_text(text: str) -> str:
    """The one normalisation of corpora and prompts: no byte-order mark, ``\n`` line ends.

    Windows (``\r\n``) and old-Mac (``\r``) line ends would otherwise become separate vocabulary
    entries, and a prompt typed on another system would hold characters the model never saw.
    """
    return text.removeprefix("\ufeff").replace("\r\n", "\n").replace("\r", "\n")


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, str | None]:
    """The book inside Project Gutenberg's ``*** START OF … ***`` / ``*** END OF … ***`` markers, and a
    note saying what was cut; text without the markers comes back unchanged with ``None``."""
    start, end = _GUTENBERG_START.search(text), _GUTENBERG_END.search(text)
    if start is None or end is None or end.start() <= start.end():
        return text, None
    body = text[start.end() : end.start()].strip("\n") + "\n"
    note = (
        f"trained without the Project Gutenberg licence header ({start.end():,} characters) and footer "
        f"({len(text) - end.start():,} characters)"
    )
    return body, note


def read_corpus(path: Path) -> str:
    """The text of a corpus file, normalised, or an error that says what is wrong with it.

    Rejects missing, empty and non-UTF-8 (binary) files; see :func:`normalize_text`. A Project
    Gutenberg book loses its licence header and footer (logged).
    """
    path = Path(path)
    raw = read_bytes(path)
    if b"\x00" in raw:
        raise AnexaError(f"corpus {path} looks binary (it contains NUL bytes): it must be UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise AnexaError(
            f"corpus {path} is not valid UTF-8 (bad byte at offset {exc.start}): it must be UTF-8 text; "
            "convert it, e.g. with iconv"
        ) from None
    text, note = strip_gutenberg(normalize_text(text))
    if note:
        logger.info("%s: %s", path.name, note)
    if not text.strip():
        raise AnexaError(f"corpus {path} is empty: pass a text file with some content")
    return text


def _is_url(spec: str) -> bool:
    return urllib.parse.urlparse(spec).scheme in ("http", "https")


def load_corpus(spec: str) -> tuple[str, str]:
    """``(text, short_name)`` for ``--data``: a dataset name, a local file, or an http(s) URL.

    Dataset names win over same-named files in the current folder (write ``./name`` for the file).
    ``short_name`` is safe to use in a folder name.
    """
    if _is_url(spec):
        return read_corpus(download(spec)), _safe_name(Path(_url_filename(spec)).stem, "data")
    datasets = plugins.registered("datasets")
    if spec in datasets:
        dataset, _ = plugins.create("datasets", spec)
        text = "".join(read_corpus(path) for path in dataset.files())
        return text, _safe_name(spec, "data")
    path = Path(spec).expanduser()
    if path.exists():
        return read_corpus(path), _safe_name(path.stem, "data")
    names = ", ".join(sorted(datasets)) or "none installed"
    raise AnexaError(
        f"--data {spec!r} is neither a dataset ({names}) nor an existing file: "
        "pass a dataset name, a text file, or an http(s) URL"
    )
