"""`slmsearch report`: self-contained HTML (every image a data: URI) + Markdown twin, rendered in
headless Chromium with every image decoded."""

from __future__ import annotations

import base64
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_pareto import OBJECTIVES, build_study  # same folder (pytest's rootdir-relative import)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slmsearch.search.storage import locate_study
    from slmsearch.search.report import write_report

    root = tmp_path_factory.mktemp("report")
    build_study(root / "demo.db")
    write_report(locate_study(storage=f"sqlite:///{root / 'demo.db'}"), root / "out")
    return root / "out"


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def _chromium_cmd(binary: str, *extra: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
            *extra]


def test_html_embeds_every_image(report_dir: Path) -> None:
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r"<img [^>]*src=\"([^\"]+)\"", html)
    assert len(srcs) == 4
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r"(src|href)=\"(?!data:|#)", html), "the page must not reference other files"
    for heading in ("Pareto fronts", "Every trial by bits and by depth", "Parameter importances", "Time per stage", "Pareto table"):
        assert heading in html
    assert "budget" in html and "64 MB" in html


def test_markdown_twin(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 4
    for image in images:
        assert (report_dir / image).read_bytes().startswith(PNG_MAGIC)
    assert "| trial | plan | WikiText word ppl" in md


def test_few_trials_say_so(tmp_path: Path) -> None:
    from slmsearch.search.storage import locate_study
    from slmsearch.search.report import importances, write_report

    build_study(tmp_path / "few.db", n_trials=4, budget_mb=300.0, name="few")
    located = locate_study(storage=f"sqlite:///{tmp_path / 'few.db'}")
    values, reason = importances(located.study, OBJECTIVES)
    assert values == {} and reason.startswith("not enough trials")
    report = write_report(located, tmp_path / "out")
    assert "not enough trials" in report.html_path.read_text(encoding="utf-8")


def test_cli_report(tmp_path: Path) -> None:
    from slmsearch.cli import main

    build_study(tmp_path / "demo.db", n_trials=12)
    result = CliRunner().invoke(main, ["report", "--storage", f"sqlite:///{tmp_path / 'demo.db'}", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert str(tmp_path / "r" / "report.html") in result.stdout


@pytest.mark.skipif(_chromium() is None, reason="no chromium binary: install it with `apt-get install -y chromium`")
def test_chromium_loads_every_image(report_dir: Path) -> None:
    """Render in headless Chromium: every <img> decodes (naturalWidth > 0); keep a screenshot."""
    binary = str(_chromium())
    probe = report_dir / "probe.html"  # a copy with a script that writes the image count into the DOM
    probe.write_text((report_dir / "report.html").read_text(encoding="utf-8").replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.setAttribute('data-images',i.length+'/'+i.filter(x=>x.complete&&x.naturalWidth>0).length);});"
        "</script></body>"), encoding="utf-8")
    env = {**os.environ, "HOME": tempfile.mkdtemp(prefix="chromium-home-")}
    dom = subprocess.run(_chromium_cmd(binary, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()),
                         capture_output=True, text=True, timeout=120, env=env)
    match = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert match, f"chromium did not run the probe: {dom.stderr[-500:]}"
    assert match.group(1) == match.group(2) == "4"
    rendered = re.sub(r"<[^>]+>", " ", dom.stdout)  # the text the browser laid out
    for text in ("slmsearch report: demo", "Pareto fronts", "Time per stage", "Pareto table", "64 MB"):
        assert text in rendered, text
    shot = Path(os.environ.get("SLMSEARCH_SCREENSHOT_DIR") or report_dir) / "report.png"
    subprocess.run(_chromium_cmd(binary, f"--screenshot={shot}", "--window-size=1280,4000", "--hide-scrollbars",
                                 (report_dir / "report.html").as_uri()),
                   capture_output=True, timeout=120, env=env, check=False)
    assert shot.is_file() and shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 50_000
