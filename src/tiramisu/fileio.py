"""Atomic file writes: every file the project writes goes through ``atomic_write`` (or its
variants for writers that need a file name, ``atomic_write_from``, or stream, ``atomic_open``).

A writer first fills a uniquely named temporary file in the destination folder, fsyncs it, and
only then renames it over the destination. A crash, a SIGKILL or a second process writing the
same file at once therefore leaves either the old file or the new one, never a mixture or a
truncated file. Temporary names start with ``.NAME.`` and end with ``.tmp`` so that
``remove_stale_temp_files`` can clean up after a killed writer.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO

TEMP_SUFFIX = ".tmp"


def _default_file_mode() -> int:
    # mkstemp creates 0600 files; a published artefact must be readable like any other file
    # the user creates, so apply the process umask to 0666 instead.
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write(path: str | Path, fill: Callable[[BinaryIO], None]) -> Path:
    """Write ``path`` atomically: ``fill`` receives a binary file object to write into."""

    def write_to(tmp: str) -> None:
        with open(tmp, "wb") as f:
            fill(f)

    return atomic_write_from(path, write_to)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_from(path: str | Path, write_to: Callable[[str], None]) -> Path:
    """For libraries that only write to a file name (safetensors, matplotlib, PIL, onnx):
    ``write_to(tmp_name)`` writes the temporary file, which is then fsynced and renamed."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        write_to(tmp)
        _commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def atomic_open(path: str | Path) -> Iterator[BinaryIO]:
    """A binary file object for writers that stream (row by row): ``path`` appears, complete,
    only when the ``with`` block ends without an exception."""
    path = Path(path)
    tmp = _temp_beside(path)
    try:
        with open(tmp, "wb") as f:
            yield f
        _commit(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _temp_beside(path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    os.close(fd)
    return tmp


def _commit(tmp: str, path: Path) -> None:
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.chmod(tmp, _default_file_mode())
    os.replace(tmp, path)


def remove_stale_temp_files(folder: str | Path, older_than_s: float = 0.0) -> list[Path]:
    """Delete temporary files a killed writer left in ``folder`` (not recursive).

    Call it only while holding the folder's lock, so no live writer's file is removed.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return []
    now, removed = time.time(), []
    for p in folder.iterdir():
        if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file():
            try:
                if now - p.stat().st_mtime >= older_than_s:
                    p.unlink()
                    removed.append(p)
            except FileNotFoundError:
                continue
    return removed
