"""`slmsearch export` keeps an existing trial folder only when it matches its manifest, takes
remote code only from its own command line, and writes cards without local paths (fast: the
pipeline is replaced by a stand-in that writes two small files)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from test_export import make_study


@pytest.fixture
def fake_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path) -> dict[str, Any]:
    """A study with one exportable trial (1); the pipeline writes two files; resolve_model is spied."""
    from slmsearch.compress import pipeline
    from slmsearch.search.storage import locate_study

    calls: dict[str, Any] = {"runs": 0, "trust": []}

    def run(plan: Any, model: Any, data: Any, calib: Any, *, out: Path, **_: Any) -> Any:
        calls["runs"] += 1
        out.mkdir(parents=True, exist_ok=True)
        (out / "model.safetensors").write_bytes(b"w" * 64)
        (out / "config.json").write_text('{"model_type": "llama"}')
        return pipeline.PipelineResult(out, [], cache_hits=0)

    def resolve(spec: Any, *, trust_remote_code: bool = False) -> str:
        calls["trust"].append(trust_remote_code)
        return str(tmp_path / "models" / "my-base")

    monkeypatch.setattr(pipeline, "run", run)
    monkeypatch.setattr("slmsearch.models.resolve_model", resolve)
    monkeypatch.setattr("slmsearch.models.model_fingerprint", lambda location: "f" * 64)
    study = make_study(tmp_path / "exp.db", data_dir=data_dir)
    config = dict(study.user_attrs["config"])
    config["trust_remote_code"] = True  # what a study run with --trust-remote-code stores
    config["model"] = str(tmp_path / "models" / "my-base")  # a local checkpoint, by absolute path
    study.set_user_attr("config", config)
    calls["located"] = locate_study(storage=f"sqlite:///{tmp_path / 'exp.db'}")
    return calls


def _export(calls: dict[str, Any], out: Path, **kw: Any) -> Any:
    from slmsearch.search.export import export

    (item,) = export(calls["located"], out, numbers=(1,), cache=object(), progress=False, log=lambda _: None, **kw)
    return item


def test_a_complete_folder_is_kept_and_a_half_written_one_rebuilt(tmp_path: Path, fake_export: dict[str, Any]) -> None:
    out = tmp_path / "out"
    first = _export(fake_export, out)
    folder = out / "trial-0001"
    assert first.written and (folder / "MANIFEST.json").is_file() and fake_export["runs"] == 1
    files = {p.name: p.read_bytes() for p in folder.iterdir()}
    assert _export(fake_export, out).written is False and fake_export["runs"] == 1  # complete: kept
    (folder / "model.safetensors").write_bytes(b"w" * 10)  # what a killed copy leaves
    again = _export(fake_export, out)
    assert again.written and again.replaced and fake_export["runs"] == 2
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == files
    (folder / "MANIFEST.json").unlink()  # a folder without a manifest (an older, interrupted export)
    assert _export(fake_export, out).replaced and fake_export["runs"] == 3
    assert sorted(p.name for p in out.iterdir()) == ["trial-0001"]  # no temporary or stale sibling left


def test_remote_code_comes_only_from_the_command_line(tmp_path: Path, fake_export: dict[str, Any]) -> None:
    assert fake_export["located"].config["trust_remote_code"] is True
    _export(fake_export, tmp_path / "a")
    _export(fake_export, tmp_path / "b", trust_remote_code=True)
    assert fake_export["trust"] == [False, True]


def test_export_cli_has_a_trust_remote_code_flag_off_by_default() -> None:
    from slmsearch.cli import main

    option = {p.name: p for p in main.commands["export"].params}["trust_remote_code"]
    assert option.is_flag and option.default is False


def test_the_card_embeds_no_absolute_local_path(tmp_path: Path, fake_export: dict[str, Any]) -> None:
    item = _export(fake_export, tmp_path / "out")
    for name in ("README.md", "trial.json"):
        text = (item.folder / name).read_text()
        assert str(tmp_path) not in text and str(Path.home()) not in text, name
    record = json.loads((item.folder / "trial.json").read_text())
    assert record["base_model"] == "my-base" and record["storage"] == "sqlite:///exp.db"
