"""The stage cache (compress/cache.py): an entry is complete and verified, or absent; LRU-bounded."""

from __future__ import annotations

import json

import pytest

from slmsearch.compress.cache import LAST_USED, MANIFEST, StageCache, entry_key


def fill_with(**files: bytes):
    def fill(folder):
        for name, data in files.items():
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)

    return fill


def test_put_then_get_serves_the_files_with_their_manifest(tmp_path):
    cache = StageCache(tmp_path / "stages")
    folder = cache.put("k", fill_with(**{"model.safetensors": b"w" * 100, "adapter/a.json": b"{}"}))
    assert folder == cache.path("k") and cache.get("k") == folder
    assert (folder / "model.safetensors").read_bytes() == b"w" * 100
    manifest = json.loads((folder / MANIFEST).read_text())
    assert set(manifest["files"]) == {"model.safetensors", "adapter/a.json"} and manifest["bytes"] == 102
    assert cache.get("other") is None


def test_a_fill_that_fails_leaves_no_entry_and_no_temporary_folder(tmp_path):
    cache = StageCache(tmp_path / "stages")

    def fail(folder):
        (folder / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError, match="stage failed"):
        cache.put("k", fail)
    assert cache.get("k") is None
    assert list(cache.root.iterdir()) == []


def test_half_written_entry_is_ignored(tmp_path):
    cache = StageCache(tmp_path / "stages")
    (cache.root / "abc").mkdir()
    (cache.root / "abc" / "model.safetensors").write_bytes(b"partial")
    assert cache.get("abc") is None and not (cache.root / "abc").exists()


@pytest.mark.parametrize("damage", ["flip a byte", "truncate", "remove a file", "add a file"])
def test_a_corrupt_entry_is_not_served_and_is_removed(tmp_path, damage):
    StageCache(tmp_path / "stages").put("k", fill_with(**{"model.safetensors": b"w" * 100, "config.json": b"{}"}))
    weights = tmp_path / "stages" / "k" / "model.safetensors"
    if damage == "flip a byte":
        weights.write_bytes(b"w" * 99 + b"x")
    elif damage == "truncate":
        weights.write_bytes(b"w" * 50)
    elif damage == "remove a file":
        weights.unlink()
    else:
        (weights.parent / "stray.bin").write_bytes(b"?")
    fresh = StageCache(tmp_path / "stages")  # a new process: no memory of an earlier verification
    assert fresh.get("k") is None
    assert not fresh.path("k").exists()


def test_an_unreadable_manifest_is_not_served(tmp_path):
    cache = StageCache(tmp_path / "stages")
    cache.put("k", fill_with(**{"w.bin": b"x"}))
    (cache.path("k") / MANIFEST).write_text("{not json")
    assert StageCache(tmp_path / "stages").get("k") is None


def test_lru_eviction(tmp_path):
    cache = StageCache(tmp_path / "stages", max_bytes=2500)
    for key in ("a", "b", "c"):
        cache.put(key, lambda d: (d / "w.bin").write_bytes(b"x" * 1000))
        if key == "b":
            assert cache.get("a") is not None  # touch a: b becomes the oldest
    kept = {k for k, _, _ in cache.entries()}
    assert kept == {"a", "c"}
    assert cache.total_bytes() <= 2500
    assert json.loads((cache.path("a") / MANIFEST).read_text())["bytes"] == 1000


def test_the_entry_just_written_is_kept_even_when_it_alone_exceeds_the_limit(tmp_path):
    cache = StageCache(tmp_path / "stages", max_bytes=500)
    cache.put("old", fill_with(**{"w.bin": b"x" * 100}))
    cache.put("big", fill_with(**{"w.bin": b"x" * 1000}))
    assert {k for k, _, _ in cache.entries()} == {"big"}
    assert (cache.path("big") / LAST_USED).exists()


def test_entry_key_depends_on_base_plan_prefix_and_calibration_only():
    plan = [{"stage": "depth", "drop": 1}]
    calib = {"n_samples": 8, "seqlen": 64, "seed": 0}
    key = entry_key("base", plan, calib)
    assert key == entry_key("base", [dict(reversed(list(plan[0].items())))], dict(reversed(list(calib.items()))))
    assert len({key, entry_key("other", plan, calib), entry_key("base", plan + [{"stage": "embedding"}], calib),
                entry_key("base", plan, {**calib, "seed": 1})}) == 4


# Temporary folders: named after their owner, removed when it ends, swept once it is gone ---------

KILLED_DURING_A_WRITE = """
import os, signal, sys
from pathlib import Path
from slmsearch.compress.cache import StageCache

def fill(folder):
    (folder / "w.bin").write_bytes(b"x" * 4096)
    os.kill(os.getpid(), signal.SIG{sig})  # mid-write, before the rename

{wrap}StageCache(Path(sys.argv[1])).put("k", fill)
"""


def _run_writer(root, sig: str, wrap: str = "") -> int:
    import subprocess
    import sys

    code = KILLED_DURING_A_WRITE.format(sig=sig, wrap=wrap)
    return subprocess.run([sys.executable, "-c", code, str(root)], capture_output=True, text=True, timeout=120).returncode


def test_a_write_killed_outright_leaves_a_temporary_folder_that_the_next_open_sweeps(tmp_path):
    root = tmp_path / "stages"
    assert _run_writer(root, "KILL") == -9
    (left,) = [p for p in root.iterdir()]
    assert left.name.startswith(".k.tmp-") and (left / "w.bin").stat().st_size == 4096
    cache = StageCache(root)
    assert cache.swept == [left] and list(root.iterdir()) == []


def test_sigterm_during_a_write_removes_the_temporary_folder_and_exits_143(tmp_path):
    root = tmp_path / "stages"
    wrap = "from slmsearch import interrupt\nwith interrupt.handling():\n    "
    assert _run_writer(root, "TERM", wrap) == 143
    assert list(root.iterdir()) == []


def test_sigterm_in_a_command_without_a_study_removes_the_temporary_folder(tmp_path):
    root = tmp_path / "stages"
    wrap = "from slmsearch import interrupt\ninterrupt.terminate_cleanly()\n"
    assert _run_writer(root, "TERM", wrap) == 143
    assert list(root.iterdir()) == []


def test_an_owned_folder_is_removed_when_the_process_ends_by_an_exception(tmp_path):
    import subprocess
    import sys

    code = ("import sys\nfrom slmsearch.fsutil import owned_tmp_dir\n"
            "d = owned_tmp_dir('slmsearch-compress-', sys.argv[1]); (d / 'f').write_text('x')\n"
            "raise RuntimeError('boom')")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "boom" in done.stderr
    assert list(tmp_path.iterdir()) == []


def test_temporary_folders_of_live_processes_or_other_hosts_are_kept_and_counted(tmp_path):
    import subprocess
    import sys

    from slmsearch.fsutil import owner_tag

    root = tmp_path / "stages"
    root.mkdir()
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    try:
        mine = root / f".a.tmp-{owner_tag()}-x"
        other = root / f".b.tmp-{owner_tag(live.pid)}-x"
        remote = root / f".c.tmp-{live.pid}@00000000-x"  # the same pid on another machine sharing the cache
        for folder in (mine, other, remote):
            folder.mkdir()
            (folder / "w.bin").write_bytes(b"x" * 1000)
        cache = StageCache(root, max_bytes=3500)
        assert cache.swept == [] and all(p.exists() for p in (mine, other, remote))
        assert cache.pending_bytes() == 3000 and cache.total_bytes() == 3000
        cache.put("old", fill_with(**{"w.bin": b"x" * 400}))
        cache.put("new", fill_with(**{"w.bin": b"x" * 400}))
        assert {k for k, _, _ in cache.entries()} == {"new"}  # the temporary folders count against the limit
    finally:
        live.communicate(b"")
    assert [p.name for p in StageCache(root).swept] == [other.name]  # its owner has ended now
