"""Atomic writes: a temp file (or folder) beside the target, fsync, then rename. Readers never see half of one.

A process killed while writing (SIGKILL, a power cut) leaves its temp file or folder behind. Their names
say whose they are — ``.<target>.<pid>.<random>.tmp`` (and ``….old`` for a folder :func:`atomic_folder`
had moved aside) — so the next writer into the same folder, whatever its target, removes those of
processes that are gone, and puts back a folder that a kill left moved aside. Nothing a killed write
leaves behind is ever read as data, and nothing accumulates.

:func:`check_output` says, before any work, whether an output file (a plot, benchmark rows) may be written
to a path: one of its own format's, never over a run's files or a file of another kind.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from anexa_core.errors import AnexaError, choose_one_of

_TEMP = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<random>[a-z0-9_]{8})\.(?P<kind>tmp|old)$")
"""A writer's temp entry: ``tempfile``'s 8 random characters after the pid, so a stranger's file rarely matches."""
_UNOWNED = re.compile(r"^\.(?P<target>.+)\.(?P<random>[^.]+)\.tmp$")  # Anexa 0.2's names, without a pid
UNOWNED_STALE_S = 24 * 3600.0
"""A temp file without a process id (written by Anexa 0.2) counts as left behind once this old."""


def _prefix(target: Path) -> str:
    return f".{target.name}.{os.getpid()}."


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` atomically, else it is removed.

    Temp files that killed writers left in ``target``'s folder are removed first (:func:`sweep_stale`).
    Raises :class:`AnexaError` before writing anything when ``target`` is a folder or lies under a file."""
    target = Path(target)
    _check_file_target(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(target.parent, target.name)
    fd, tmp_name = tempfile.mkstemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        tmp.chmod(0o666 & ~_umask())  # mkstemp's file is private (0600); the result is an ordinary file
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


IMAGE_SUFFIXES = (".png", ".pdf", ".svg")
"""The plots ``anexa plot -o`` and ``anexa bench --plot`` write, by suffix: of matplotlib's formats, those its
own backends write (no Pillow codec) and whose files can be told apart by their first bytes."""
JSON_SUFFIXES = (".json",)
"""The rows ``anexa bench --json`` writes."""
PLOT_MARK = "Anexa"
"""What every plot Anexa draws carries in its metadata (:data:`PLOT_METADATA`): an existing image is replaced
only when it has it, so a plot is redrawn but a user's picture of the same name is never overwritten."""
PLOT_METADATA = {"png": {"Software": PLOT_MARK}, "pdf": {"Creator": PLOT_MARK}, "svg": {"Creator": PLOT_MARK}}
"""matplotlib's ``savefig(metadata=…)`` per format: PNG's ``tEXt`` chunk, the PDF info and SVG's ``dc:creator``."""
BENCH_ROW_KEYS = frozenset({"attention", "device", "status"})
"""Keys every row of ``anexa bench --json`` has: a JSON list of objects holding them is rows Anexa wrote."""
_MARKED_MAX_BYTES = 64 << 20
"""A larger existing file is not read for the mark (plots and rows are far smaller): never Anexa's."""
_MARK = PLOT_MARK.encode()


def _json_rows(data: bytes) -> bool:
    import json

    try:
        rows = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return False
    return isinstance(rows, list) and all(isinstance(row, dict) and row.keys() >= BENCH_ROW_KEYS for row in rows)


_KINDS: dict[str, tuple[str, Callable[[bytes], bool]]] = {
    ".png": (
        "a PNG",
        lambda data: data.startswith(b"\x89PNG\r\n\x1a\n") and b"tEXtSoftware\x00" + _MARK in data[:4096],
    ),
    ".pdf": ("a PDF", lambda data: data.startswith(b"%PDF-") and b"/Creator (" + _MARK + b")" in data),
    ".svg": ("an SVG", lambda data: b"<svg" in data[:4096] and b"<dc:title>" + _MARK + b"</dc:title>" in data[:4096]),
    ".json": ("a JSON list of bench rows", _json_rows),
}
"""An output suffix's kind of file: its name in messages, and whether a file's bytes are one Anexa wrote
(:data:`PLOT_MARK`, :data:`BENCH_ROW_KEYS`)."""

RUN_FILES = ("model.safetensors", "best.safetensors", "train_state.safetensors")
"""The files that mark a run folder (``checkpoint.MODEL_FILE``, ``BEST_FILE``, ``STATE_FILE``; a test keeps them
equal), looked for before :func:`~anexa_core.io.checkpoint.holds_a_run` (which loads torch) is asked."""


def check_output(
    target: str | os.PathLike[str],
    flag: str,
    suffixes: Sequence[str],
    own_plot_of: str | os.PathLike[str] | None = None,
) -> str:
    """The format (``png``, ``json``, …) an output file — a plot, bench rows — is written in, named by the
    suffix of ``target``; call it before any work. Raises :class:`AnexaError` naming ``flag`` when ``target``
    does not end in one of ``suffixes`` (case aside), is a folder or lies under a file, lies in a run folder
    (but the ``loss.png`` of ``own_plot_of``, the one run a plot draws, which ``anexa plot`` redraws as
    training does), or exists and is not a file of that kind that Anexa wrote (:data:`_KINDS`; an empty file
    is replaced). So an output never lands among a run's files nor replaces a file of the user's."""
    target = Path(target)
    suffix = target.suffix.lower()
    if suffix not in suffixes:
        example = target.with_name(f"{target.stem or target.name}{suffixes[0]}")
        fix = f"end it in {suffixes[0]}" if len(suffixes) == 1 else choose_one_of(suffix or "none", suffixes)
        raise AnexaError(f"{flag} {target}: the suffix names the format; {fix} (e.g. {flag} {example})")
    _check_file_target(target)
    own = check_outside_runs(target, flag, own_plot_of)
    if target.exists():
        _check_replaceable(target, flag, suffix, own)
    return suffix.lstrip(".")


def check_outside_runs(target: Path, flag: str, own_plot_of: str | os.PathLike[str] | None = None) -> bool:
    """Raises :class:`AnexaError` for an output ``target`` (a file or a folder) in a run folder or below one,
    but the ``loss.png`` of the run ``own_plot_of``, which that run's plot redraws whatever it holds: returns
    whether ``target`` is that one."""
    parent = Path(target).parent.resolve()
    for folder in (parent, *parent.parents):
        if not any((folder / name).exists() for name in RUN_FILES):
            continue
        from anexa_core.io import checkpoint  # loads torch: only for a folder that may be a run

        if not checkpoint.holds_a_run(folder):
            continue
        own = own_plot_of is not None and Path(own_plot_of).resolve() == folder == parent
        if own and target.name == checkpoint.PLOT_FILE:
            return True
        note = (
            " (only `anexa plot` of that run alone redraws its loss.png)"
            if target.suffix.lower() in IMAGE_SUFFIXES
            else ""
        )
        raise AnexaError(
            f"{flag} {target} is inside the run in {_as_given(folder, target)}: write it outside the run{note}"
        )
    return False


def _as_given(folder: Path, target: Path) -> Path:
    """``folder`` (resolved) as ``target`` names it, when it does."""
    return next((given for given in (target.parent, *target.parent.parents) if given.resolve() == folder), folder)


def _check_replaceable(target: Path, flag: str, suffix: str, own: bool = False) -> None:
    """A one-line error for an existing ``target`` an output may not replace: not a regular file, or (unless
    it is a run's ``own`` plot) not a file of the kind ``suffix`` names that Anexa wrote."""
    kind, written_by_anexa = _KINDS[suffix]
    if not target.is_file():  # a pipe or a device: never read, never replaced
        raise AnexaError(f"{flag} {target} is not a regular file: pass the path of a file to write")
    if own or target.stat().st_size == 0:  # the run's plot, or nothing to lose
        return
    try:
        with target.open("rb") as handle:
            data = handle.read(_MARKED_MAX_BYTES + 1)
    except OSError as exc:
        raise AnexaError(f"{flag} {target} cannot be read ({exc.strerror}): pass another path") from None
    if len(data) > _MARKED_MAX_BYTES or not written_by_anexa(data):
        raise AnexaError(f"{flag} {target} exists and is not {kind} Anexa wrote: pass a new name, or remove it first")


def _check_file_target(target: Path) -> None:
    """A one-line error for a file path that cannot be one: an existing folder, or a path under a file."""
    if target.is_dir():
        raise AnexaError(f"{target} is a folder: pass the path of a file to write")
    for parent in target.parents:
        if parent.exists():
            if not parent.is_dir():
                raise AnexaError(f"{parent} is a file, so {target} cannot be written: pass another path")
            return


def _umask() -> int:
    """The process's umask, read by setting it and putting it back (Python has no getter): new files get
    ``0o666 & ~umask``, new folders ``0o777 & ~umask``."""
    umask = os.umask(0o22)
    os.umask(umask)
    return umask


def _fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_folder(target: str | os.PathLike[str], replace: bool = False) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``target`` to fill; on success it becomes ``target``.

    Readers see either no ``target`` (or, with ``replace``, the old one) or the complete new folder,
    never a half-written one: the old folder is renamed aside, the new one renamed in, and the old one
    removed only then. On an exception the temporary folder is removed and ``target`` is untouched; after
    a kill, the next :func:`sweep_stale` (which this runs first) puts an old folder left aside back.
    Raises ``FileExistsError`` when ``target`` exists and ``replace`` is false.
    """
    target = Path(os.path.abspath(target))  # `.` or `..` cannot be renamed; their absolute paths can
    target.parent.mkdir(parents=True, exist_ok=True)
    put_back(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".tmp", dir=target.parent))
    umask = _umask()
    try:
        yield tmp
        for path in tmp.rglob("*"):
            if path.is_file():
                path.chmod(0o666 & ~umask)  # temp files are private (0600); the result is an ordinary file
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
        tmp.chmod(0o777 & ~umask)  # and an ordinary folder (mkdtemp's is 0700)
        if not target.exists():
            os.rename(tmp, target)
        elif not replace:
            raise FileExistsError(f"{target} exists")
        else:
            old = Path(tempfile.mkdtemp(prefix=_prefix(target), suffix=".old", dir=target.parent))
            try:
                os.rename(target, old / "folder")
            except OSError:
                old.rmdir()
                raise
            try:
                os.rename(tmp, target)
            except OSError:
                os.rename(old / "folder", target)  # put the old one back
                raise
            shutil.rmtree(old, ignore_errors=True)
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (a reused pid counts as alive: its files wait)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: leave its files
    return True


def put_back(target: str | os.PathLike[str]) -> None:
    """Clean ``target``'s folder after killed writers (:func:`sweep_stale`), putting back a ``target`` that
    an ``--overwrite`` killed between its two renames had moved aside — call it before looking at
    ``target``. By its absolute path: ``.`` has no name of its own in its parent."""
    absolute = Path(os.path.abspath(target))
    sweep_stale(absolute.parent, absolute.name)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` is an atomic writer's temp entry (``.<target>.<pid>.<random>.tmp`` or ``….old``)."""
    return _TEMP.match(name) is not None or _UNOWNED.match(name) is not None


def sweep_stale(folder: str | os.PathLike[str], target: str | None = None) -> list[Path]:
    """Clean up after writers in ``folder`` that were killed: remove their temp files and folders, whatever
    their target, and put a folder :func:`atomic_folder` had moved aside back where it was when nothing took
    its place. Entries of live processes are left alone. Anexa 0.2's temp files (no process id in the name,
    a looser pattern) go once :data:`UNOWNED_STALE_S` old, and only those of ``target`` when it is given
    (a folder that is not Anexa's own). Returns what was removed or restored.
    """
    # Why complex: two kinds of leftover entry (a writer's temp with its process id, an unowned Anexa 0.2 temp)
    # each with its own test of whose it is and whether it is stale, plus putting a moved-aside folder back.
    folder = Path(folder)
    handled: list[Path] = []
    try:
        entries = [entry for entry in folder.iterdir() if entry.name.startswith(".")]
    except OSError:
        return handled
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match is not None:
            if _alive(int(match["pid"])):
                continue
            original = folder / match["target"]
            aside = entry / "folder"
            with contextlib.suppress(OSError):
                if match["kind"] == "old" and aside.is_dir() and not original.exists():
                    os.rename(aside, original)  # killed between the two renames: the old folder comes back
                _remove(entry)
                handled.append(entry)
            continue
        unowned = _UNOWNED.match(entry.name)
        if unowned is not None and (target is None or unowned["target"] == target):
            with contextlib.suppress(OSError):
                if time.time() - entry.lstat().st_mtime > UNOWNED_STALE_S:
                    _remove(entry)
                    handled.append(entry)
    return handled


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)
