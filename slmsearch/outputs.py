"""Where a command may write, checked before it loads or computes anything: an output file that is
not a folder, an output folder that is new or empty, in a place this process can write.

Writability is tried, not inferred from permission bits (root ignores those, a read-only mount
does not): a temporary file is created in the folder and removed at once.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from slmsearch.errors import SlmsearchError


def _nearest_existing(path: Path) -> Path:
    current = path
    while not current.exists() and current != current.parent:
        current = current.parent
    return current


def write_error(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (or in its nearest existing ancestor, where its
    missing parents would be made), or None when it can."""
    base = _nearest_existing(Path(folder).absolute())
    if not base.is_dir():
        return f"{str(base)!r} is a file, not a folder"
    try:
        fd, tmp = tempfile.mkstemp(prefix=".slmsearch-write-check-", dir=base)
    except OSError as exc:
        return f"{str(base)!r} is not writable ({exc.strerror or type(exc).__name__})"
    os.close(fd)
    with contextlib.suppress(OSError):
        os.unlink(tmp)
    return None


def check_output_file(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a file this process can write (created or replaced later)."""
    target = Path(path)
    if str(path) == "" or target.is_dir():
        raise SlmsearchError(f"{flag} {str(path)!r} is a folder; pass a file path, e.g. {str(target / 'out.json')!r}")
    problem = write_error(target.parent)
    if problem:
        raise SlmsearchError(f"{flag} {str(path)!r} cannot be written: {problem}; pass a writable path")
    return target


def check_output_dir(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a new (or empty) folder this process can create."""
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise SlmsearchError(f"{flag} {str(path)!r} is a file; pass a new folder path")
    if target.is_dir() and any(target.iterdir()):
        raise SlmsearchError(f"output folder {str(path)!r} exists and is not empty; choose a new {flag}")
    problem = write_error(target if target.is_dir() else target.parent)
    if problem:
        raise SlmsearchError(f"{flag} {str(path)!r} cannot be written: {problem}; pass a writable path")
    return target


def check_output_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a folder this process can write into, new or existing (``report`` replaces its
    files, ``export`` keeps the complete trial folders already there)."""
    target = Path(path)
    if str(path) == "":
        raise SlmsearchError(f"{flag} is empty; pass a folder path")
    if target.exists() and not target.is_dir():
        raise SlmsearchError(f"{flag} {str(path)!r} is a file; pass a folder path")
    problem = write_error(target)
    if problem:
        raise SlmsearchError(f"{flag} {str(path)!r} cannot be written: {problem}; pass a writable path")
    return target


def check_writable_dir(folder: Path, what: str) -> Path:
    """``folder`` (``what`` names it in the message, e.g. the cache's variable) can be written."""
    problem = write_error(folder)
    if problem:
        raise SlmsearchError(f"{what} {str(folder)!r} cannot be written: {problem}; point it at a writable folder")
    return folder
