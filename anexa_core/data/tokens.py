"""A corpus as token ids, tokenized once and read from disk: the token cache.

``anexa train`` and ``anexa eval`` do not hold a corpus in memory. The first run on a corpus reads its
files in bounded pieces (:func:`anexa_core.data.corpus.corpus_pieces`), cuts the text into chunks at line
boundaries (:func:`text_chunks`), trains the tokenizer on those chunks, encodes them in batches
(``encode_batch`` where the tokenizer has it: the BPE tokenizer encodes a batch on every core) and
writes the ids to ``<key>.bin`` — ``uint16`` when the vocabulary fits, else ``uint32`` — with a small
JSON header beside it. Later runs memory-map the file (:class:`numpy.memmap`) after checking it, so they
start without tokenizing, and memory grows with the model, not the corpus.

What lives in ``$ANEXA_CACHE/tokens`` (:func:`tokens_dir`), all written atomically
(:func:`anexa_core.io.files.atomic_path`):

- ``<key>.bin`` / ``<key>.json``: the ids, and their header (count, dtype, CRC-32 of the ``.bin``, the
  number of characters they encode, what they were made from). The key is a SHA-256 of the corpus
  fingerprint and the tokenizer's name, options, plugin version and learned state: change one file or
  the tokenizer and it is another key. A ``.bin`` whose size or CRC-32 disagrees with its header
  (truncated, overwritten, bit rot) is never used: it is tokenized again, with a warning.
- ``<key>.tokenizer.json``: a tokenizer trained on a corpus (keyed by the corpus fingerprint, the
  tokenizer's name, options and plugin version), so a new run on the same data does not retrain it.
- ``files-<id>.json``: per list of files, each file's size, times, inode and SHA-256 (below).
- ``locks/<xx>.lock``: 256 empty files at most that let one process tokenize while others (``torchrun``
  ranks, a second run on the same data) wait for it rather than do the same work.

A process killed while it tokenizes leaves a temp file (``.<key>.bin.<pid>.<random>.tmp``, as large as
the ids written so far); the next process that takes a lock here removes those whose process is gone.

**Fingerprint.** A corpus is identified by the SHA-256 of each file's bytes as stored, in order
(:func:`file_digests`), never by names or times: a moved or copied corpus keeps its cache, and a
changed byte changes the key. Hashing 1 GB takes about a second, so a file's digest is remembered with
its size, modification and change times, inode and device, and reused while all of those are unchanged
*and* the file had not changed for :data:`STABLE_S` seconds when it was hashed (git's "racy clean" rule:
an edit within the timestamps' granularity cannot go unnoticed). Reading the text to tokenize it
re-hashes every file and refuses one that no longer matches, so the cache always holds the text its
key names.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import hashlib
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from anexa_core import plugins
from anexa_core.data import corpus as corpora
from anexa_core.data.corpus import Corpus, ProgressFn
from anexa_core.errors import AnexaError
from anexa_core.io.files import atomic_path, sweep_stale

logger = logging.getLogger("anexa")

FORMAT = "anexa-tokens/1"
TOKENIZER_FORMAT = "anexa-tokenizer-cache/1"
CHUNK_CHARS = 1 << 16
"""Characters per chunk handed to the tokenizer (chunks end at line boundaries: :func:`text_chunks`)."""
BATCH_CHARS = 1 << 21
"""Characters per ``encode_batch`` call: enough for every core, small enough for the encodings' memory."""
STABLE_S = 2.0
"""A remembered digest is trusted only for a file unchanged for this long before it was hashed."""
_VERIFY_BLOCK = 16 << 20
_BOUNDARY = re.compile(r"(?<=\S)[ \t]*\n")
_BOUNDARY_WINDOW = 4096

PHASE_FINGERPRINT = "fingerprinting"
PHASE_LEARN = "learning the vocabulary"
PHASE_TOKENIZE = "tokenizing"
PHASE_CHECK = "checking the token cache"


class TokenizeError(AnexaError):
    """The tokenizer refused the corpus text (a char tokenizer meeting an unseen character)."""


@dataclass(frozen=True)
class TokenStream:
    """A corpus as token ids.

    ``ids``: (N,) ``uint16`` or ``uint32``, a read-only :class:`numpy.memmap` of the cache file;
    ``characters``: the number of characters of the normalised text the N ids encode; ``path``: the
    ``.bin`` file; ``built``: whether this call tokenized (``False``: read from the cache).
    """

    ids: np.ndarray
    characters: int
    path: Path
    built: bool


def tokens_dir() -> Path:
    """``$ANEXA_CACHE/tokens`` (see :func:`anexa_core.data.corpus.cache_dir`)."""
    return corpora.cache_dir() / "tokens"


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _sha(value: Any) -> str:
    return hashlib.sha256(_canonical(value)).hexdigest()


def _report(progress: ProgressFn | None, phase: str, done: int, total: int) -> None:
    if progress is not None:
        progress(phase, done, total)


class _Meter:
    """Counts the bytes of one phase for the progress callback. As a context manager it always ends the
    phase, reporting ``(done, done)`` — what was really read, also when the phase stopped early (BPE's
    cap) or failed — so no progress bar is left open."""

    def __init__(self, progress: ProgressFn | None, phase: str, total: int):
        self.progress, self.phase, self.total, self.done = progress, phase, max(total, 0), 0
        _report(progress, phase, 0, self.total)

    def __call__(self, count: int) -> None:
        self.done += count
        if self.done < self.total:
            _report(self.progress, self.phase, self.done, self.total)

    def __enter__(self) -> _Meter:
        return self

    def __exit__(self, *exc: Any) -> None:
        _report(self.progress, self.phase, self.done, self.done)


@contextlib.contextmanager
def _locked(name: str) -> Iterator[None]:
    """An exclusive lock for the cache entry ``name`` (a hex key), on one of 256 lock files
    ``tokens_dir()/locks/<first two hex digits>.lock`` — so their number never grows — through POSIX
    ``flock`` (no lock where it is missing). Two keys that share a file only wait for each other.

    Temp files of killed writers in the cache are removed first (:func:`anexa_core.io.files.sweep_stale`)."""
    sweep_stale(tokens_dir())
    path = tokens_dir() / "locks" / f"{name[:2]}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # Windows: concurrent builders each write a complete file; the last rename wins
        yield
        return
    with open(path, "a+b") as handle:
        if not _lock_within(handle, LOCK_PATIENCE_S):  # a cached entry is read in far less: no message for it
            logger.info("waiting for another Anexa process preparing the same data (%s)", path.name)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


LOCK_PATIENCE_S = 1.0
"""How long a process waits for a cache entry's lock before saying it waits (torchrun's ranks take turns
reading a cached entry, which is not worth a message)."""


def _lock_within(handle: Any, seconds: float) -> bool:
    """Take ``handle``'s exclusive ``flock`` if it comes within ``seconds``; whether it did."""
    import fcntl

    deadline = time.monotonic() + seconds
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.02)


# --- fingerprints ---------------------------------------------------------------------------------


def _stat(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise AnexaError(f"corpus file {path} not found: pass an existing text file") from None
    except OSError as exc:
        raise AnexaError(f"cannot read corpus {path} ({exc.strerror}): pass a readable text file") from None


def _stat_key(st: os.stat_result) -> list[int]:
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def _memo_path(files: Sequence[Path]) -> Path:
    return tokens_dir() / f"files-{_sha([os.path.abspath(path) for path in files])[:24]}.json"


def _read_json(path: Path) -> Any:
    """The JSON in ``path``; ``None`` when it is missing, unreadable or not JSON (callers treat all alike)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _remembered_digest(entry: Any, st: os.stat_result) -> str | None:
    """The digest a memo ``entry`` remembers for a file now stat'ed as ``st``, if it still vouches for it (the
    same stat, hashed at least :data:`STABLE_S` after the file last changed); else ``None``."""
    if (
        isinstance(entry, dict)
        and entry.get("stat") == _stat_key(st)
        and isinstance(entry.get("sha256"), str)
        and isinstance(entry.get("hashed_at_ns"), int)
        and st.st_ctime_ns < entry["hashed_at_ns"] - int(STABLE_S * 1e9)
    ):
        return entry["sha256"]
    return None


def file_digests(files: Sequence[Path], progress: ProgressFn | None = None) -> list[str]:
    """The SHA-256 (hex) of each file's bytes as stored, reusing remembered digests of unchanged files
    (see the module docstring). Reports phase :data:`PHASE_FINGERPRINT` in bytes when it has to hash.
    Raises :class:`AnexaError` for a missing or unreadable file."""
    memo_path = _memo_path(files)
    read = _read_json(memo_path)
    memo: dict[str, Any] = read if isinstance(read, dict) and read.get("format") == FORMAT else {}
    remembered: dict[str, Any] = memo["files"] if isinstance(memo.get("files"), dict) else {}
    digests: list[str | None] = []
    todo: list[tuple[int, Path, os.stat_result]] = []
    for index, path in enumerate(files):
        st = _stat(path)
        known = _remembered_digest(remembered.get(os.path.abspath(path)), st)
        digests.append(known)
        if known is None:
            todo.append((index, path, st))
    if not todo:
        return digests  # type: ignore[return-value]
    buffer = bytearray(corpora.READ_BLOCK)
    view = memoryview(buffer)
    entries = {
        os.path.abspath(path): remembered[os.path.abspath(path)]
        for path, digest in zip(files, digests, strict=True)
        if digest is not None
    }
    with _Meter(progress, PHASE_FINGERPRINT, sum(st.st_size for _, _, st in todo)) as meter:
        for index, path, st in todo:
            hashed_at = time.time_ns()
            digest = hashlib.sha256()
            with corpora.ReadErrors(path), open(path, "rb") as handle:
                while count := handle.readinto(buffer):
                    digest.update(view[:count])
                    meter(count)
            digests[index] = digest.hexdigest()
            if _stat_key(_stat(path)) == _stat_key(st):  # not rewritten while hashed: worth remembering
                entries[os.path.abspath(path)] = {
                    "stat": _stat_key(st),
                    "sha256": digests[index],
                    "hashed_at_ns": hashed_at,
                }
    with contextlib.suppress(OSError), atomic_path(memo_path) as tmp:
        tmp.write_text(json.dumps({"format": FORMAT, "files": entries}), encoding="utf-8")
    return digests  # type: ignore[return-value]


def forget_digests(files: Sequence[Path]) -> None:
    """Drop the remembered digests of ``files`` (after one turned out stale)."""
    _memo_path(files).unlink(missing_ok=True)


def corpus_fingerprint(digests: Sequence[str]) -> str:
    """The corpus's identity: a SHA-256 over its files' digests in order (and this module's format)."""
    return _sha({"format": FORMAT, "documents": list(digests)})


# --- text chunks ----------------------------------------------------------------------------------


def _cut(text: str, start: int, end: int) -> int:
    """Where a chunk starting at ``start`` ends, at most at ``end`` (< ``len(text)``): before the line end
    (spaces or tabs, then a newline) that follows the last visible character; failing that after the
    last newline; else at ``end``."""
    hi = end
    while hi > start + 1:
        lo = max(start + 1, hi - _BOUNDARY_WINDOW)
        last = collections.deque(_BOUNDARY.finditer(text, lo, hi), maxlen=1)
        if last:
            return last[0].start()
        hi = lo
    newline = text.rfind("\n", start, end)
    return newline + 1 if newline >= start else end


def text_chunks(pieces: Iterable[str], size: int = CHUNK_CHARS) -> Iterator[str]:
    """Re-cut a stream of text pieces into chunks of at most about ``size`` characters, at line ends.

    A chunk ends right after a visible character whose line ends there (the spaces, tabs and newline
    that follow begin the next chunk). GPT-2's pre-tokenizer pattern, which the byte-level BPE uses,
    never joins a visible character with the whitespace after it, so encoding chunk by chunk gives
    exactly the ids of encoding the whole text at once, and training on the chunks learns the same
    merges (tested). Text with no such place within ``size`` characters (one very long line) is cut
    after its last newline, else mid-line; only there can chunked ids differ from whole-text ids.
    """
    buffer = ""
    for piece in pieces:
        buffer = buffer + piece if buffer else piece
        start = 0
        while len(buffer) - start >= 2 * size:
            cut = _cut(buffer, start, start + size)
            yield buffer[start:cut]
            start = cut
        buffer = buffer[start:]
    start = 0
    while len(buffer) - start > size:
        cut = _cut(buffer, start, start + size)
        yield buffer[start:cut]
        start = cut
    if start < len(buffer):
        yield buffer[start:]


def _batches(chunks: Iterable[str], limit: int = BATCH_CHARS) -> Iterator[list[str]]:
    batch, count = [], 0
    for chunk in chunks:
        batch.append(chunk)
        count += len(chunk)
        if count >= limit:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


def _log_notes(notes: list[tuple[Path, str]]) -> None:
    if len(notes) == 1:
        logger.info("%s: %s", notes[0][0].name, notes[0][1])
    elif notes:
        logger.info("trained without the Project Gutenberg licence header and footer of %d files", len(notes))


def _require_text(corpus: Corpus) -> None:
    """An error unless the corpus holds a non-whitespace character (reads only until it finds one)."""
    with contextlib.closing(corpora.corpus_pieces(corpus.files)) as pieces:
        for piece in pieces:
            if not piece.isspace():
                return
    what = f"corpus {corpus.files[0]}" if len(corpus.files) == 1 else f"corpus {corpus.label}"
    raise AnexaError(f"{what} is empty: pass text files with some content")


# --- tokenizers -----------------------------------------------------------------------------------


def trained_tokenizer(
    corpus: Corpus, digests: Sequence[str], name: str, options: dict[str, Any], progress: ProgressFn | None = None
) -> tuple[Any, dict[str, Any]]:
    """The tokenizer plugin ``name`` with ``options``, trained on ``corpus`` — or loaded from the cache
    when the same tokenizer (name, options, plugin version) was trained on the same corpus before.

    Returns ``(tokenizer, every option's value)``. Training reads the corpus as line-bounded chunks
    (:func:`text_chunks`), reporting :data:`PHASE_LEARN` in bytes; a tokenizer may stop reading early
    (BPE's ``max_train_chars``). Raises :class:`AnexaError` for unreadable or empty corpora.
    """
    tokenizer, resolved = plugins.create("tokenizers", name, options)
    provenance = plugins.provenance("tokenizers", name, resolved)
    key = _sha(
        {
            "format": TOKENIZER_FORMAT,
            "corpus": corpus_fingerprint(digests),
            "tokenizer": name,
            "options": resolved,
            "distribution": provenance["distribution"],
            "version": provenance["version"],
        }
    )[:32]
    path = tokens_dir() / f"{key}.tokenizer.json"
    with _locked(key):
        cached = _read_json(path)
        if (
            isinstance(cached, dict)
            and cached.get("format") == TOKENIZER_FORMAT
            and cached.get("key") == key
            and "state" in cached
            and cached.get("state_sha256") == _sha(cached["state"])
        ):
            try:
                tokenizer.load_state_dict(cached["state"])
                return tokenizer, resolved
            except AnexaError as exc:
                logger.warning("cached tokenizer %s does not load (%s): training it again", path.name, exc)
        elif cached is not None or path.exists():
            logger.warning("cached tokenizer %s is damaged: training it again", path.name)
        _require_text(corpus)
        notes: list[tuple[Path, str]] = []
        try:
            with _Meter(progress, PHASE_LEARN, corpus.size) as meter:
                pieces = corpora.corpus_pieces(corpus.files, digests=digests, on_bytes=meter, notes=notes)
                with contextlib.closing(pieces):
                    tokenizer.train(text_chunks(pieces))
        except corpora.ChangedWhileReading:
            forget_digests(corpus.files)
            raise
        _log_notes(notes)
        state = tokenizer.state_dict()
        with atomic_path(path) as tmp:
            cached = {
                "format": TOKENIZER_FORMAT,
                "key": key,
                "tokenizer": name,
                "options": resolved,
                "state": state,
                "state_sha256": _sha(state),
            }
            tmp.write_text(json.dumps(cached), encoding="utf-8")
    return tokenizer, resolved


# --- token ids ------------------------------------------------------------------------------------


def _dtype_for(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _encode(tokenizer: Any, batch: list[str]) -> list[Any]:
    try:
        if hasattr(tokenizer, "encode_batch"):
            return list(tokenizer.encode_batch(batch))
        return [tokenizer.encode(text) for text in batch]
    except TokenizeError:
        raise
    except AnexaError as exc:
        raise TokenizeError(str(exc)) from None


def _valid_header(key: str, progress: ProgressFn | None) -> dict[str, Any] | None:
    """The header of a complete, intact ``<key>.bin``; ``None`` (with a warning if one was damaged)."""
    header_path, bin_path = tokens_dir() / f"{key}.json", tokens_dir() / f"{key}.bin"
    header = _read_json(header_path)
    if header is None:
        if header_path.exists():
            logger.warning("token cache header %s is damaged: tokenizing again", header_path.name)
        return None
    fields = {"tokens": int, "bytes": int, "crc32": int, "characters": int}
    if (
        not isinstance(header, dict)
        or header.get("format") != FORMAT
        or header.get("key") != key
        or header.get("dtype") not in ("uint16", "uint32")
        or any(not isinstance(header.get(name), kind) for name, kind in fields.items())
        or header["bytes"] != header["tokens"] * np.dtype(header["dtype"]).itemsize
    ):
        logger.warning("token cache header %s is damaged: tokenizing again", header_path.name)
        return None
    try:
        size = bin_path.stat().st_size
    except FileNotFoundError:
        return None
    if size != header["bytes"]:
        logger.warning(
            "token cache %s holds %d bytes, its header says %d (truncated?): tokenizing again",
            bin_path.name,
            size,
            header["bytes"],
        )
        return None
    crc = 0
    buffer = bytearray(_VERIFY_BLOCK)
    view = memoryview(buffer)
    with _Meter(progress, PHASE_CHECK, size) as meter, open(bin_path, "rb") as handle:
        while count := handle.readinto(buffer):
            crc = zlib.crc32(view[:count], crc)
            meter(count)
    if crc != header["crc32"]:
        logger.warning(
            "token cache %s is corrupt (CRC-32 %08x, expected %08x): tokenizing again",
            bin_path.name,
            crc,
            header["crc32"],
        )
        return None
    return header


def _open(key: str, header: dict[str, Any], built: bool) -> TokenStream:
    path = tokens_dir() / f"{key}.bin"
    dtype = np.dtype(header["dtype"])
    if header["tokens"] == 0:
        ids = np.zeros(0, dtype)
    else:
        ids = np.memmap(path, dtype=dtype, mode="r", shape=(header["tokens"],))
    return TokenStream(ids, header["characters"], path, built)


def token_key(digests: Sequence[str], tokenizer: Any, name: str, options: dict[str, Any]) -> str:
    """The cache key of ``tokenizer``'s ids for the corpus with these file digests."""
    provenance = plugins.provenance("tokenizers", name, options)
    return _sha(
        {
            "format": FORMAT,
            "corpus": corpus_fingerprint(digests),
            "tokenizer": name,
            "options": options,
            "state": _sha(tokenizer.state_dict()),
            "distribution": provenance["distribution"],
            "version": provenance["version"],
        }
    )[:32]


def encoded(
    corpus: Corpus,
    digests: Sequence[str],
    tokenizer: Any,
    name: str,
    options: dict[str, Any],
    progress: ProgressFn | None = None,
) -> TokenStream:
    """``corpus`` as ids of ``tokenizer`` (plugin ``name`` with resolved ``options``), from the cache when
    an intact copy is there, else encoded now and cached (phase :data:`PHASE_TOKENIZE`, in bytes).

    Raises :class:`TokenizeError` when the tokenizer refuses the text, :class:`AnexaError` for
    unreadable, changed or empty corpora and for a tokenizer that returns ids outside its vocabulary.
    """
    key = token_key(digests, tokenizer, name, options)
    with _locked(key):
        header = _valid_header(key, progress)
        if header is not None:
            return _open(key, header, built=False)
        _require_text(corpus)
        vocab = int(tokenizer.vocab_size)
        dtype = _dtype_for(vocab)
        notes: list[tuple[Path, str]] = []
        count = characters = crc = 0
        bin_path = tokens_dir() / f"{key}.bin"
        try:
            with (
                _Meter(progress, PHASE_TOKENIZE, corpus.size) as meter,
                contextlib.closing(
                    corpora.corpus_pieces(corpus.files, digests=digests, on_bytes=meter, notes=notes)
                ) as pieces,
                atomic_path(bin_path) as tmp,
                open(tmp, "wb") as out,
            ):
                for batch in _batches(text_chunks(pieces)):
                    characters += sum(len(text) for text in batch)
                    for ids in _encode(tokenizer, batch):
                        array = np.asarray(ids)
                        if array.size and (array.min() < 0 or array.max() >= vocab):
                            raise AnexaError(
                                f"tokenizer {name!r} returned id {int(array.max())} outside its "
                                f"vocabulary of {vocab}: the plugin is broken"
                            )
                        array = array.astype(dtype, copy=False)
                        buffer = memoryview(array.data)  # no copy
                        out.write(buffer)
                        crc = zlib.crc32(buffer.cast("B"), crc)
                        count += array.size
        except corpora.ChangedWhileReading:
            forget_digests(corpus.files)
            raise
        _log_notes(notes)
        header = {
            "format": FORMAT,
            "key": key,
            "dtype": dtype.name,
            "tokens": count,
            "bytes": count * dtype.itemsize,
            "crc32": crc,
            "characters": characters,
            "vocab_size": vocab,
            "tokenizer": name,
            "options": options,
            "corpus": corpus_fingerprint(digests),
            "label": corpus.label,
            "file_count": len(corpus.files),
            "files": [str(path) for path in corpus.files[:100]],
            "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        }
        with atomic_path(tokens_dir() / f"{key}.json") as tmp:
            tmp.write_text(json.dumps(header, indent=1), encoding="utf-8")
        return _open(key, header, built=True)


def tokenize(
    corpus: Corpus, tokenizer: Any, name: str, options: dict[str, Any], progress: ProgressFn | None = None
) -> TokenStream:
    """:func:`encoded` with the corpus fingerprinted first (an already-trained ``tokenizer``)."""
    return encoded(corpus, file_digests(corpus.files, progress), tokenizer, name, options, progress)
