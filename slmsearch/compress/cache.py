"""The stage cache: one checkpoint folder per (base model, plan prefix, calibration) key.

An entry is written through :func:`slmsearch.fsutil.atomic_dir` (complete or absent) with a
``MANIFEST.json`` of every file's size and sha256, verified on read: a corrupt or half-written
entry is deleted and rebuilt, never loaded. The cache is bounded in bytes, least recently used
first (a hit touches the entry). Several processes may share the folder: entries appear by
atomic rename, and eviction first renames an entry to a private trash name, so two processes
never delete the same entry and no reader sees a half-deleted one under its key.

Temporary folders in the cache root (an entry being written, ``.<key>.tmp-<pid>@<host>-*``; an
entry being deleted, ``.trash-<pid>@<host>-*``) count against ``max_bytes`` while they exist; those
of a process that is gone (killed during a write) are swept when a cache is opened
(:func:`slmsearch.fsutil.sweep_stale`), never those of a live process sharing the folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from slmsearch.fsutil import atomic_dir, cache_dir, owner_tag, sweep_stale, write_text_atomic

MANIFEST = "MANIFEST.json"
LAST_USED = ".last_used"
DEFAULT_MAX_BYTES = 20 * 10**9  # 20 GB (1e9 bytes, as a study's cache_gb): about 33 fp32 SmolLM2-135M checkpoints
# Bump when what a stage writes changes, so entries from older code are never reused.
# 3: a quantized embedding's 16-bit scales and packed codes (checkpoint.PACKED_EMBEDDING_FILE);
# 4: EoRA adapters fitted by compress/eora.py in float32 (were gptqmodel's, in bf16)
CACHE_FORMAT = 4


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def entry_key(base_fingerprint: str, plan_prefix: dict[str, Any], calib_key: dict[str, Any]) -> str:
    """sha256 of the base model fingerprint, the plan prefix and the calibration settings."""
    payload = json.dumps(
        {"format": CACHE_FORMAT, "base": base_fingerprint, "plan": plan_prefix, "calib": calib_key}, sort_keys=True
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in (MANIFEST, LAST_USED))


def write_manifest(folder: Path) -> int:
    """Record size and sha256 of every file under ``folder``; return the total bytes."""
    files = {str(p.relative_to(folder)): {"size": p.stat().st_size, "sha256": file_sha256(p)} for p in _files(folder)}
    total = sum(f["size"] for f in files.values())
    write_text_atomic(folder / MANIFEST, json.dumps({"files": files, "bytes": total}, indent=1, sort_keys=True))
    return total


def check_manifest(folder: Path) -> int | None:
    """The folder's bytes when every file matches its ``MANIFEST.json`` (no file missing, changed
    or added), else None. Reads every byte; changes nothing."""
    try:
        data = json.loads((folder / MANIFEST).read_text())
        files = data["files"]
        actual = {str(p.relative_to(folder)) for p in _files(folder)}
        ok = actual == set(files) and all(
            (folder / name).stat().st_size == info["size"] and file_sha256(folder / name) == info["sha256"]
            for name, info in files.items()
        )
        return int(data.get("bytes", 0)) if ok else None
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


def folder_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (0 when it vanished meanwhile)."""
    total = 0
    for path in Path(folder).rglob("*"):
        with contextlib.suppress(OSError):
            if path.is_file() and not path.is_symlink():
                total += path.stat().st_size
    return total


class StageCache:
    """Checkpoint folders keyed by :func:`entry_key`, LRU-bounded to ``max_bytes``."""

    def __init__(self, root: Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self.root = Path(root) if root is not None else cache_dir("stages")
        self.root.mkdir(parents=True, exist_ok=True)
        self.max_bytes = int(max_bytes)
        self._verified: dict[str, tuple[float, int]] = {}  # key -> (manifest mtime, bytes)
        self.swept = sweep_stale(self.root)  # left by a process killed during a write

    def path(self, key: str) -> Path:
        return self.root / key

    def score_dir(self) -> Path:
        path = self.root.parent / "scores" if self.root.name == "stages" else self.root / "_scores"
        path.mkdir(parents=True, exist_ok=True)
        return path

    # reading -----------------------------------------------------------------------------------
    def verify(self, key: str) -> bool:
        """True when the entry exists and every file matches its manifest (else it is deleted)."""
        folder = self.path(key)
        manifest = folder / MANIFEST
        if not manifest.is_file():
            if folder.exists():
                self._discard(folder)
            return False
        stamp = manifest.stat().st_mtime
        if self._verified.get(key, (None, 0))[0] == stamp:
            return True
        size = check_manifest(folder)
        if size is None:
            self._discard(folder)
            self._verified.pop(key, None)
            return False
        self._verified[key] = (stamp, size)
        return True

    def get(self, key: str) -> Path | None:
        """The verified entry folder (touched as recently used), or None."""
        if not self.verify(key):
            return None
        self.touch(key)
        return self.path(key)

    def touch(self, key: str) -> None:
        with contextlib.suppress(OSError):
            marker = self.path(key) / LAST_USED
            marker.touch()
            now = time.time()
            os.utime(marker, (now, now))

    # writing -----------------------------------------------------------------------------------
    def put(self, key: str, fill: Callable[[Path], None]) -> Path:
        """Create the entry: ``fill(tmp)`` writes the files, then manifest, atomic rename, evict."""
        final = self.path(key)
        with atomic_dir(final) as tmp:
            fill(tmp)
            write_manifest(tmp)
            (tmp / LAST_USED).touch()
        self._verified.pop(key, None)
        self.evict(protect={key})
        return final

    # eviction ----------------------------------------------------------------------------------
    def entries(self) -> Iterator[tuple[str, float, int]]:
        """(key, last used time, bytes) of every complete entry."""
        for folder in self.root.iterdir():
            if folder.name.startswith(".") or not folder.is_dir():
                continue
            try:
                size = int(json.loads((folder / MANIFEST).read_text()).get("bytes", 0))
                used = (folder / LAST_USED).stat().st_mtime if (folder / LAST_USED).exists() else folder.stat().st_mtime
            except (OSError, ValueError):
                continue
            yield folder.name, used, size

    def pending_bytes(self) -> int:
        """Bytes in the root's temporary folders (entries being written or deleted, by any process)."""
        return sum(folder_bytes(p) for p in self.root.iterdir() if p.name.startswith(".") and p.is_dir())

    def total_bytes(self) -> int:
        return sum(size for _, _, size in self.entries()) + self.pending_bytes()

    def evict(self, protect: set[str] = frozenset()) -> list[str]:  # type: ignore[assignment]
        """Remove least recently used entries until the cache, its temporary folders included, fits
        ``max_bytes``."""
        entries = sorted(self.entries(), key=lambda e: e[1])
        total = sum(e[2] for e in entries) + self.pending_bytes()
        removed = []
        for key, _, size in entries:
            if total <= self.max_bytes:
                break
            if key in protect:
                continue
            if self._discard(self.path(key)):
                removed.append(key)
                total -= size
        return removed

    def _discard(self, folder: Path) -> bool:
        """Rename to a private trash name (atomic, one winner), then delete."""
        trash = folder.parent / f".trash-{owner_tag()}-{time.monotonic_ns()}-{folder.name}"
        try:
            os.rename(folder, trash)
        except OSError:
            return False
        shutil.rmtree(trash, ignore_errors=True)
        return True
