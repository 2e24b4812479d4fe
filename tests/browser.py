"""Headless Chromium for the tests that render the report and the dashboard.

`.ci/run` installs Debian's ``chromium`` when it is missing (as it installs ``postgresql``). The
browser tests skip when no Chromium is found, except under CI (``CI`` set), where a missing
browser fails them: CI must test what it claims. Each test keeps its screenshot in its temporary
folder (or ``$SLMSEARCH_SCREENSHOT_DIR``) and prints the path, so a CI run can keep it.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import pytest

from postgres import in_ci

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def chromium() -> str:
    """The Chromium binary; skips the test without one, fails it under CI."""
    found = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if found:
        return found
    message = "no chromium binary: install it with `apt-get install -y chromium` (.ci/run does)"
    if in_ci():
        pytest.fail(f"CI is set and {message}")
    pytest.skip(message)


def _cmd(binary: str, *extra: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage",
            f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "HOME": tempfile.mkdtemp(prefix="chromium-home-")}


def dump_dom(binary: str, url: str, *, budget_ms: int = 10_000) -> subprocess.CompletedProcess[str]:
    """The DOM after the page's scripts ran for ``budget_ms`` of virtual time."""
    return subprocess.run(_cmd(binary, f"--virtual-time-budget={budget_ms}", "--dump-dom", url),
                          capture_output=True, text=True, timeout=180, env=_env())


def screenshot(binary: str, url: str, shot: Path, *, width: int = 1280, height: int = 2000,
               budget_ms: int = 10_000) -> Path:
    """A PNG of the page at ``width`` x ``height``; its path is printed (a CI artifact)."""
    shot = Path(os.environ.get("SLMSEARCH_SCREENSHOT_DIR") or shot.parent) / shot.name
    shot.parent.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(_cmd(binary, f"--screenshot={shot}", f"--window-size={width},{height}", "--hide-scrollbars",
                               f"--virtual-time-budget={budget_ms}", url),
                          capture_output=True, text=True, timeout=180, env=_env())
    assert shot.is_file(), f"chromium wrote no screenshot (exit {done.returncode}): {done.stderr[-500:]}"
    print(f"screenshot: {shot}")
    return shot


def decoded_png(path: Path) -> tuple[int, int, int]:
    """(width, height, distinct colours) of a PNG, decoded in full with PIL (the header and the
    chunk layout only, colours 0, without it): raises if it does not decode."""
    data = path.read_bytes()
    assert data.startswith(PNG_MAGIC), f"{path} is not a PNG"
    width, height = struct.unpack(">II", data[16:24])
    try:
        from PIL import Image
    except ImportError:
        return width, height, 0
    with Image.open(path) as image:
        image.load()  # decodes every row: a truncated or corrupt file raises here
        assert image.size == (width, height)
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    return width, height, len(colours) if colours is not None else 1 << 20
