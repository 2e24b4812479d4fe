"""Cache folder location, atomic writes (a folder is either complete or absent), and the temporary
folders this process owns: named after their owner, removed when it ends, swept once it is gone.

A temporary folder's name holds its owner's tag ``<pid>@<host>`` (:func:`owner_tag`). The process
removes the folders it owns when it exits normally or by an exception (``atexit``) and when it is
stopped by SIGINT or SIGTERM (:mod:`slmsearch.interrupt` calls :func:`remove_owned`); a process
killed outright (SIGKILL, power loss) leaves them, and :func:`sweep_stale` removes those of a dead
owner on this host the next time a folder is opened. A folder of a live process, or of a process on
another host sharing the cache (a many-worker PostgreSQL study), is never touched.
Files and folders are created with the user's umask (0644/0755 under umask 022), not the private
0600/0700 of ``mkstemp``/``mkdtemp``, so that exports and caches can be shared.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ENV_CACHE = "SLMSEARCH_CACHE"
STALE_UNOWNED_S = 24 * 3600  # a temporary folder of an older version (no owner tag) is swept after a day
_OWNER = re.compile(r"-(\d+)@([0-9a-f]{8})-")
_LEGACY_TMP = re.compile(r"^\.(?:[^/@]+\.tmp-|trash-)[^@]*$")  # `.<name>.tmp-XXXX`, `.trash-...`: before owner tags
_OWNED: set[Path] = set()
_OWNED_LOCK = threading.Lock()
_UMASK_LOCK = threading.Lock()


def cache_dir(sub: str = "") -> Path:
    """``$SLMSEARCH_CACHE`` (default ``~/.cache/slmsearch``), or a sub-folder of it, created."""
    root = Path(os.environ.get(ENV_CACHE) or Path.home() / ".cache" / "slmsearch").expanduser()
    path = root / sub if sub else root
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from slmsearch.errors import SlmsearchError

        raise SlmsearchError(
            f"cache folder {str(path)!r} cannot be created ({exc.strerror or type(exc).__name__}); "
            f"point {ENV_CACHE} at a writable folder"
        ) from None
    return path


def current_umask() -> int:
    """The process's umask (read by setting it and putting it back, under a lock)."""
    with _UMASK_LOCK:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def owner_tag(pid: int | None = None) -> str:
    """``<pid>@<host hash>``: which process on which machine owns a temporary folder."""
    return f"{os.getpid() if pid is None else pid}@{_host()}"


def owner_of(name: str) -> tuple[int, str] | None:
    """(pid, host hash) from a temporary folder's name, or None when it carries no owner tag."""
    match = _OWNER.search(name)
    return (int(match.group(1)), match.group(2)) if match else None


def pid_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine (or cannot be signalled by us)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def owned_tmp_dir(prefix: str, parent: Path | str | None = None) -> Path:
    """A fresh folder ``<prefix><pid>@<host>-<random>`` in ``parent`` (default: the system's
    temporary folder), owned by this process: removed at exit unless :func:`release` d first."""
    if parent is not None:
        Path(parent).mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f"{prefix}{owner_tag()}-", dir=parent))
    os.chmod(path, 0o777 & ~current_umask())
    with _OWNED_LOCK:
        _OWNED.add(path)
    return path


def release(path: Path) -> None:
    """No longer remove ``path`` at exit (it was renamed into place, or removed already)."""
    with _OWNED_LOCK:
        _OWNED.discard(Path(path))


def remove_owned() -> list[Path]:
    """Remove every temporary folder this process still owns (at exit, and on SIGINT/SIGTERM)."""
    with _OWNED_LOCK:
        owned = list(_OWNED)
        _OWNED.clear()
    for path in owned:
        shutil.rmtree(path, ignore_errors=True)
    return owned


atexit.register(remove_owned)


def is_stale(entry: Path) -> bool:
    """A temporary folder whose owner is gone: its pid is dead on this host, or (a name without an
    owner tag, from an older version) it has not changed for :data:`STALE_UNOWNED_S`."""
    owner = owner_of(entry.name)
    if owner is not None:
        pid, host = owner
        return host == _host() and pid != os.getpid() and not pid_alive(pid)
    if _LEGACY_TMP.match(entry.name):
        with contextlib.suppress(OSError):
            return time.time() - entry.stat().st_mtime > STALE_UNOWNED_S
    return False


def sweep_stale(folder: Path | str | None = None, prefixes: tuple[str, ...] = (".",)) -> list[Path]:
    """Remove the temporary folders in ``folder`` (default: the system's temporary folder) whose
    names start with one of ``prefixes`` and whose owner is gone (:func:`is_stale`)."""
    root = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    removed = []
    try:
        entries = list(root.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if entry.name.startswith(prefixes) and is_stale(entry):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling folder; on success rename it to ``final``, else remove it.

    If another process created ``final`` meanwhile, its copy wins and ours is discarded. The
    temporary folder is named ``.<final>.tmp-<pid>@<host>-<random>`` and removed at exit if this
    process stops before the rename.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = owned_tmp_dir(f".{final.name}.tmp-", final.parent)
    try:
        yield tmp
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.exists():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        release(tmp)


@contextlib.contextmanager
def atomic_file(path: Path) -> Iterator[Path]:
    """Yield a temporary sibling path to write ``path``'s new content to; on success it replaces
    ``path`` by an atomic rename (which also replaces a hard link instead of writing into the
    inode it shares with another folder), mode as the umask allows; on failure it is removed."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    """Write text through :func:`atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write JSON through a temporary file and an atomic rename (parent folders created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


CHECKSUM_KEY = "_sha256"


def _payload_sha(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def write_json_checked(path: Path, payload: dict[str, Any]) -> None:
    """A cached JSON file that carries the sha256 of its own content (see :func:`read_json_checked`)."""
    write_json_atomic(path, {**payload, CHECKSUM_KEY: _payload_sha(payload)})


def read_json_checked(path: Path) -> dict[str, Any] | None:
    """The content of a :func:`write_json_checked` file, or None (and the file removed) when it is
    missing, unreadable or changed since it was written: the caller recomputes it."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        stored = data.pop(CHECKSUM_KEY)
        if not isinstance(data, dict) or stored != _payload_sha(data):
            raise ValueError("checksum mismatch")
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        with contextlib.suppress(OSError):
            Path(path).unlink()
        return None
    return data
