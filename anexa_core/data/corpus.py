"""Corpora: download into a cache (checksummed), read and validate text, resolve ``--data``.

A corpus is one or more sources — registered dataset names (``sherlock``), local text files, folders
(searched recursively for :data:`DEFAULT_GLOBS`), http(s) URLs — resolved by :func:`resolve_corpus`
into a fixed, ordered list of files, each one *document*. Downloads stream into the cache through
:func:`anexa_core.io.files.atomic_path`, so a failed or corrupt download never leaves a file behind that
a later run would trust. Every text — corpus or prompt — goes through :func:`normalize_text`, so what
the model was trained on and what it is asked agree character for character. :func:`iter_text` reads a
file of any size in bounded memory; :mod:`anexa_core.data.tokens` turns a corpus into cached token ids.
"""

from __future__ import annotations

import codecs
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
import zlib
from collections.abc import Callable, Generator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO, cast

from anexa_core import plugins
from anexa_core.errors import AnexaError
from anexa_core.io.files import atomic_path

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
        reason: object
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


@dataclass(frozen=True)
class Collection:
    """A dataset made of several others (``RemoteText``, ``LocalText``, …): ``files()`` is theirs, in order.

    Each file is one document of the corpus (see :func:`corpus_pieces`)::

        Collection((RemoteText(url_a, sha_a, "a.txt"), RemoteText(url_b, sha_b, "b.txt")), "two books")
    """

    parts: tuple = ()
    description: str = ""

    def files(self) -> list[Path]:
        return [path for part in self.parts for path in part.files()]


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
    text = text.removeprefix("\ufeff")
    return text.replace("\r\n", "\n").replace("\r", "\n") if "\r" in text else text


def hf_normalizer():
    """:func:`normalize_text` as a Hugging Face ``tokenizers`` normalizer (for exported tokenizers, which
    must turn text into the ids Anexa would): a byte-order mark at the very start removed (``\\A`` anchors
    at the start of the text, not of each line), then ``\\r\\n`` and ``\\r`` replaced by ``\\n``, in
    that order."""
    from tokenizers import Regex, normalizers

    return normalizers.Sequence(
        [
            normalizers.Replace(Regex("\\A\ufeff"), ""),
            normalizers.Replace("\r\n", "\n"),
            normalizers.Replace("\r", "\n"),
        ]
    )


_GUTENBERG_START = re.compile(r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.I | re.M)
_GUTENBERG_END = re.compile(r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG E(?:BOOK|TEXT)\b.*$", re.I | re.M)


def strip_gutenberg(text: str) -> tuple[str, str | None]:
    """The book inside Project Gutenberg's ``*** START OF … ***`` / ``*** END OF … ***`` markers, and a
    note saying what was cut; text without the markers comes back unchanged with ``None``."""
    if "***" not in text:  # both markers start with it; a plain search is far quicker than the regexes
        return text, None
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
    text, note = _decode_whole(read_bytes(path), path)
    if note:
        logger.info("%s: %s", path.name, note)
    if not text.strip():
        raise AnexaError(f"corpus {path} is empty: pass a text file with some content")
    return text


def _binary_error(path: Path) -> AnexaError:
    return AnexaError(f"corpus {path} looks binary (it contains NUL bytes): it must be UTF-8 text")


def _utf8_error(path: Path, offset: int) -> AnexaError:
    return AnexaError(
        f"corpus {path} is not valid UTF-8 (bad byte at offset {offset}): it must be UTF-8 text; "
        "convert it, e.g. with iconv"
    )


def _decode_whole(raw: bytes, path: Path) -> tuple[str, str | None]:
    """A whole file's bytes → its normalised text without a Gutenberg header/footer, and the note on that."""
    if b"\x00" in raw:
        raise _binary_error(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _utf8_error(path, exc.start) from None
    return strip_gutenberg(normalize_text(text))


def _is_url(spec: str) -> bool:
    return urllib.parse.urlparse(spec).scheme in ("http", "https")


DEFAULT_GLOBS = ("*.txt", "*.md")
"""What a folder given to ``--data`` contributes unless ``--glob`` says otherwise."""

READ_BLOCK = 8 << 20
"""Bytes read (and decoded) at a time from a large file."""

WHOLE_FILE_LIMIT = 32 << 20
"""Files (decompressed) up to this size are read whole, exactly as :func:`read_corpus` reads them, Project
Gutenberg stripping included; larger ones are streamed in :data:`READ_BLOCK` pieces and not searched for
Gutenberg markers (no book is that large), so memory stays bounded whatever the file size."""


@dataclass(frozen=True)
class Corpus:
    """What ``--data`` resolved to: the files, in the order their text is read, and names for messages.

    ``files``: every file once (a file reached twice, say through a folder and by name, keeps its first
    place); ``name``: short and safe in a folder name; ``label``: the ``--data`` value(s) as given.
    """

    files: tuple[Path, ...]
    name: str
    label: str
    sizes: tuple[int, ...] = field(default=(), compare=False)

    @property
    def size(self) -> int:
        """Bytes on disk, all files together (compressed files count compressed)."""
        return sum(self.sizes)


def data_specs(data: str | Sequence[str]) -> list[str]:
    """``--data`` as a list: one value (a string) or several."""
    return [data] if isinstance(data, str) else list(data)


def data_label(data: str | Sequence[str]) -> str:
    """How messages quote ``--data``: ``'notes.txt'``, or ``'a.txt', 'b/'`` for several values."""
    return ", ".join(repr(spec) for spec in data_specs(data))


def folder_files(folder: Path, globs: Sequence[str] = DEFAULT_GLOBS) -> list[Path]:
    """The files under ``folder`` (recursively) matching any of ``globs``, sorted by relative path.

    A pattern is matched against the path relative to ``folder`` from the right, like
    :meth:`pathlib.PurePath.match`: ``*.txt`` matches at any depth, ``notes/*.md`` the ``.md`` files
    directly inside any folder named ``notes``. Hidden files and folders (a name starting with ``.``)
    are skipped, and symbolic links to folders are not followed. A folder with no match is an error
    saying how many other files it holds.
    """
    folder = Path(folder)
    found: list[tuple[str, Path]] = []
    others = 0

    def refuse(exc: OSError) -> None:
        raise AnexaError(f"cannot read folder {exc.filename} ({exc.strerror}): pass a readable folder")

    for root, dirs, names in os.walk(folder, onerror=refuse):
        dirs[:] = sorted(name for name in dirs if not name.startswith("."))
        for name in names:
            if name.startswith("."):
                continue
            path = Path(root, name)
            relative = path.relative_to(folder).as_posix()
            if any(PurePosixPath(relative).match(pattern) for pattern in globs):
                found.append((relative, path))
            else:
                others += 1
    if not found:
        patterns = ", ".join(globs)
        raise AnexaError(
            f"folder {folder} holds no files matching {patterns} ({others} other file{'' if others == 1 else 's'}): "
            "pass --glob PATTERN to choose which files to read"
        )
    return [path for _, path in sorted(found)]


def _source_kind(spec: str) -> str | None:
    """What one ``--data`` value names: ``"url"``, ``"dataset"`` (a name wins over a same-named file),
    ``"folder"`` or ``"file"``; ``None`` for nothing. Reads and downloads nothing."""
    if _is_url(spec):
        return "url"
    if spec in plugins.registered("datasets"):
        return "dataset"
    path = Path(spec).expanduser()
    if path.is_dir():
        return "folder"
    return "file" if path.exists() else None


def _spec_files(spec: str, globs: Sequence[str], options: dict | None = None) -> tuple[list[Path], str]:
    """The files of one ``--data`` value and its short name (``options``: a dataset plugin's)."""
    kind, path = _source_kind(spec), Path(spec).expanduser()
    if kind == "url":
        return [download(spec)], _safe_name(Path(_url_filename(spec)).stem, "data")
    if kind == "dataset":
        dataset, _ = plugins.create("datasets", spec, options or {})
        files = [Path(file) for file in dataset.files()]
        if not files:
            raise AnexaError(f"dataset {spec!r} returned no files: its plugin is broken; pass --data FILE instead")
        return files, _safe_name(spec, "data")
    if kind == "folder":
        return folder_files(path, globs), _safe_name(path.resolve().name, "data")
    if kind == "file":
        return [path], _safe_name(path.stem, "data")
    raise _names_nothing(spec)


def check_sources(data: str | Sequence[str]) -> None:
    """Raise :func:`resolve_corpus`'s one-line :class:`AnexaError` for a ``--data`` value that is no URL, no
    dataset and no existing file or folder, without reading or downloading anything: a run checks its data
    before it loads or builds a model."""
    for spec in data_specs(data):
        if _source_kind(spec) is None:
            raise _names_nothing(spec)


def _names_nothing(spec: str) -> AnexaError:
    names = ", ".join(sorted(plugins.registered("datasets"))) or "none installed"
    return AnexaError(
        f"--data {spec!r} is neither a dataset ({names}) nor an existing file or folder: "
        "pass a dataset name, a text file, a folder, or an http(s) URL"
    )


def resolve_corpus(
    data: str | Sequence[str], globs: Sequence[str] = DEFAULT_GLOBS, options: dict | None = None
) -> Corpus:
    """The files of ``--data`` (one value or several, each a dataset name, file, folder or http(s) URL).

    Dataset names win over same-named files in the current folder (write ``./name`` for the file). URLs
    and datasets are downloaded once into the cache. ``options`` (``-o data.OPTION=VALUE``) go to every
    dataset plugin named. Raises :class:`AnexaError` (one line) for a value that is none of these, a
    folder without matching files (see :func:`folder_files`), a failed download, options with no
    dataset to take them, or ``globs`` other than the default with no folder to apply them to.
    """
    specs = data_specs(data)
    if not specs:
        raise AnexaError("--data is empty: pass a dataset name, a text file, a folder, or an http(s) URL")
    if options and not set(specs) & set(plugins.registered("datasets")):
        raise AnexaError("-o data.… sets a dataset plugin's options, but --data names no dataset: drop it")
    if tuple(globs) != DEFAULT_GLOBS and not any(_source_kind(spec) == "folder" for spec in specs):
        patterns = ", ".join(repr(glob) for glob in globs)
        raise AnexaError(
            f"--glob {patterns} picks the files of a --data folder, but --data {data_label(specs)} names no "
            "folder: drop --glob or pass a folder"
        )
    files: list[Path] = []
    seen: set[str] = set()
    names = []
    for spec in specs:
        found, name = _spec_files(spec, globs, options)
        names.append(name)
        for path in found:
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    sizes = []
    for path in files:
        try:
            sizes.append(path.stat().st_size)
        except FileNotFoundError:
            raise AnexaError(f"corpus file {path} not found: pass an existing text file") from None
        except OSError as exc:
            raise AnexaError(f"cannot read corpus {path} ({exc.strerror}): pass a readable text file") from None
    name = names[0] if len(names) == 1 else f"{names[0]}-and-{len(names) - 1}-more"
    return Corpus(tuple(files), name, data_label(specs), tuple(sizes))


class _CountingReader:
    """A raw binary file that counts (and optionally hashes) the bytes read through it."""

    def __init__(self, handle, digest=None):
        self.handle, self.digest, self.count = handle, digest, 0

    def read(self, size: int = -1) -> bytes:
        data = self.handle.read(size)
        self.count += len(data)
        if self.digest is not None:
            self.digest.update(data)
        return data

    def readinto(self, buffer) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        pass

    @property
    def closed(self) -> bool:
        return False

    def drain(self) -> None:
        """Read to the end, so the count and hash cover the whole file."""
        while self.read(READ_BLOCK):
            pass


class ReadErrors:
    """Maps the usual faults of reading a corpus file to the one-line errors of :func:`read_bytes`."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        path = self.path
        if kind is None or not issubclass(kind, (OSError, lzma.LZMAError, zlib.error, EOFError)):
            return False
        if isinstance(exc, FileNotFoundError):
            raise AnexaError(f"corpus file {path} not found: pass an existing text file") from None
        if isinstance(exc, IsADirectoryError):
            raise AnexaError(f"corpus {path} is a folder: pass a text file") from None
        if isinstance(exc, (lzma.LZMAError, gzip.BadGzipFile, zlib.error, EOFError)):
            raise AnexaError(f"corpus {path} is not a valid compressed file ({exc}): pass an intact file") from None
        raise AnexaError(f"cannot read corpus {path} ({exc.strerror or exc}): pass a readable text file") from None


def iter_text(
    path: Path, block_size: int = READ_BLOCK, digest=None, notes: list[tuple[Path, str]] | None = None
) -> Iterator[tuple[str, int]]:
    """One file's normalised text in pieces, each with the number of bytes (on disk) read for it.

    The pieces join to exactly what :func:`read_corpus` returns (see :data:`WHOLE_FILE_LIMIT` for the one
    difference in files over 32 MiB), except that an empty file yields ``""`` rather than an error.
    Memory stays within a few times :data:`READ_BLOCK` whatever the file size. ``digest`` (a ``hashlib``
    object) is updated with every byte of the file as stored; a Gutenberg note is appended to
    ``notes``. Raises :class:`AnexaError` naming the file when it is missing, unreadable, a damaged
    ``.xz``/``.gz``, binary (NUL bytes) or not UTF-8.
    """
    path = Path(path)
    with ReadErrors(path):
        handle = open(path, "rb")  # noqa: SIM115 - opened alone so that only opening maps to the errors above
    with handle:
        raw = _CountingReader(handle, digest)
        readable = cast(BinaryIO, raw)  # a raw binary reader, duck-typed
        stream: BinaryIO | lzma.LZMAFile | gzip.GzipFile
        if path.suffix == ".xz":
            stream = lzma.LZMAFile(readable)  # noqa: SIM115 - closed with the file below
        elif path.suffix == ".gz":
            stream = gzip.GzipFile(fileobj=readable)
        else:
            stream = readable
        reported = 0

        def consumed() -> int:
            nonlocal reported
            delta, reported = raw.count - reported, raw.count
            return delta

        with ReadErrors(path):
            data = stream.read(WHOLE_FILE_LIMIT + 1)
        if len(data) <= WHOLE_FILE_LIMIT:
            with ReadErrors(path):
                raw.drain()
            text, note = _decode_whole(data, path)
            if note and notes is not None:
                notes.append((path, note))
            yield text, consumed()
            return
        for text in _normalized_blocks(stream, path, data, block_size):
            yield text, consumed()


def _normalized_blocks(stream: Any, path: Path, data: bytes, block_size: int) -> Iterator[str]:
    """A large file's text block by block from ``data`` (its first block) on, normalised as
    :func:`normalize_text` would the whole (BOM, ``\\r\\n`` split between two blocks); the last piece may
    be empty. Raises the one-line errors of binary and non-UTF-8 files with the byte offset."""
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    decoded_bytes, first, carry_cr = 0, True, False
    while True:
        final = not data
        if b"\x00" in data:
            raise _binary_error(path)
        try:
            text = decoder.decode(data, final)
        except UnicodeDecodeError as exc:
            buffered = len(exc.object) - len(data)
            raise _utf8_error(path, decoded_bytes - buffered + exc.start) from None
        decoded_bytes += len(data)
        if text and first:
            text, first = text.removeprefix("\ufeff"), False
        if text and carry_cr:  # a \r\n split between two blocks: the \r already became \n
            carry_cr = False
            if text[0] == "\n":
                text = text[1:]
        if text:
            carry_cr = text[-1] == "\r"
            if "\r" in text:
                text = text.replace("\r\n", "\n").replace("\r", "\n")
        if final or text:
            yield text
        if final:
            return
        with ReadErrors(path):
            data = stream.read(block_size)


ProgressFn = Callable[..., None]
"""``progress(phase, done, total, unit="bytes")``: called as work advances; ``done == total`` ends a phase."""


def corpus_pieces(
    files: Sequence[Path],
    block_size: int = READ_BLOCK,
    digests: Sequence[str] | None = None,
    on_bytes: Callable[[int], None] | None = None,
    notes: list[tuple[Path, str]] | None = None,
) -> Generator[str, None, None]:
    """The corpus as one text, in pieces: each file's text (:func:`iter_text`) in order, with a ``"\n"``
    between two files when the first does not end in one (a single file's text is therefore unchanged).

    With ``digests`` (the SHA-256 of each file as stored, from :func:`anexa_core.data.tokens.file_digests`)
    a file whose bytes differ from its digest — rewritten after it was fingerprinted — raises an
    :class:`AnexaError`, so a cache keyed by the digests never holds other text. ``on_bytes`` receives
    the bytes read as reading advances (for progress bars).
    """
    last = ""
    for index, path in enumerate(files):
        digest = hashlib.sha256() if digests is not None else None
        started = False
        for piece, read in iter_text(path, block_size, digest, notes):
            if on_bytes is not None and read:
                on_bytes(read)
            if not piece:
                continue
            if not started:
                started = True
                if last and last != "\n":
                    yield "\n"
            last = piece[-1]
            yield piece
        if digest is not None and digests is not None and digest.hexdigest() != digests[index]:
            raise ChangedWhileReading(path)


class ChangedWhileReading(AnexaError):
    """A corpus file's bytes differ from the digest it was fingerprinted with."""

    def __init__(self, path: Path):
        super().__init__(
            f"corpus file {path} changed while Anexa was reading it: run again once nothing is writing to it"
        )
        self.path = path


def load_corpus(spec: str | Sequence[str], globs: Sequence[str] = DEFAULT_GLOBS) -> tuple[str, str]:
    """``(text, short_name)`` for ``--data`` read whole into memory (small corpora and tests; training
    streams through :mod:`anexa_core.data.tokens` instead). See :func:`resolve_corpus` and :func:`corpus_pieces`.
    """
    corpus = resolve_corpus(spec, globs)
    notes: list[tuple[Path, str]] = []
    text = "".join(corpus_pieces(corpus.files, notes=notes))
    for path, note in notes:
        logger.info("%s: %s", path.name, note)
    if not text.strip():
        what = f"corpus {corpus.files[0]}" if len(corpus.files) == 1 else f"corpus {corpus.label}"
        raise AnexaError(f"{what} is empty: pass a text file with some content")
    return text, corpus.name
