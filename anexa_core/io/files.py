"""Atomic writes: a temp file (or folder) beside the target, fsync, then rename. Readers never see half of one."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces ``target`` atomically, else it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
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
    removed only then. On an exception the temporary folder is removed and ``target`` is untouched.
    Raises ``FileExistsError`` when ``target`` exists and ``replace`` is false.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
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
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
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
