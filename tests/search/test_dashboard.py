"""`slmsearch dashboard`: start it as a process on a free loopback port, read the study and its
trials through optuna-dashboard's API, stop it by its PID."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner


def _study(path: Path) -> Any:
    import optuna
    from optuna.trial import TrialState, create_trial

    study = optuna.create_study(study_name="dash", storage=f"sqlite:///{path}", directions=["minimize", "maximize"])
    study.set_user_attr("objectives", ["wikitext_word_ppl", "triviaqa_exact_match"])
    plan = {"stages": [{"stage": "gptq", "bits": 4, "group_size": 64}]}
    study.add_trial(create_trial(values=[25.0, 0.05], user_attrs={"plan": {"stages": []}, "baseline": True, "footprint_mb": 40.0},
                                 constraints={"footprint_over_budget_mb": -24.0}))
    study.add_trial(create_trial(values=[31.0, 0.04], user_attrs={"plan": plan, "footprint_mb": 20.0},
                                 constraints={"footprint_over_budget_mb": -44.0}))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"plan": plan, "early_token_ppl": 900.0}))
    return study


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def _serve(path: Path) -> tuple[subprocess.Popen[str], str, str, Any]:
    """`slmsearch dashboard` on ``path`` as a process; returns it, its printed address, the base
    URL and the study list once its API answers."""
    code = "import sys; from slmsearch.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "dashboard", "--storage", f"sqlite:///{path}", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    line = proc.stdout.readline() if proc.stdout else ""
    assert "http://127.0.0.1:" in line, f"no address printed: {line!r} (exit {proc.poll()})"
    address = line.split(" at ")[-1].strip()
    base = address.split("/dashboard")[0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # the address is printed just before the server binds
        assert proc.poll() is None, "the dashboard exited early"
        try:
            return proc, address, base, _get(f"{base}/api/studies")
        except OSError:
            time.sleep(0.3)
    raise AssertionError("the dashboard did not answer within 60 s")


def _stop(proc: subprocess.Popen[str]) -> None:
    os.kill(proc.pid, signal.SIGTERM)
    proc.wait(timeout=20)


def test_dashboard_serves_the_study(tmp_path: Path) -> None:
    _study(tmp_path / "dash.db")
    proc, address, base, studies = _serve(tmp_path / "dash.db")
    try:
        assert address.endswith("/dashboard/studies/1")
        names = {s["study_name"]: s["study_id"] for s in studies["study_summaries"]}
        assert "dash" in names
        detail = _get(f"{base}/api/studies/{names['dash']}")
        assert [t["number"] for t in detail["trials"]] == [0, 1, 2]
        assert [t["state"] for t in detail["trials"]] == ["Complete", "Complete", "Pruned"]
        assert {t["number"] for t in detail["best_trials"]} == {0}  # trial 1 is dominated
        with urllib.request.urlopen(address, timeout=5) as response:  # the printed address is the dashboard's page
            page = response.read().decode()
        assert "<title>Optuna Dashboard</title>" in page and 'src="/static/bundle.js"' in page
        with urllib.request.urlopen(f"{base}/static/bundle.js", timeout=5) as response:
            assert len(response.read()) > 100_000  # the app itself, not an error page
    finally:
        _stop(proc)
    with pytest.raises(OSError):  # stopped by its PID: nothing serves the port any more
        _get(f"{base}/api/studies")


def test_busy_port_is_a_user_error(tmp_path: Path) -> None:
    from slmsearch.cli import main

    _study(tmp_path / "dash.db")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        result = CliRunner().invoke(main, ["dashboard", "--storage", f"sqlite:///{tmp_path / 'dash.db'}", "--port", str(port)])
    assert result.exit_code == 2
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr and "--port 0" in result.stderr


def test_missing_storage_is_a_user_error(tmp_path: Path) -> None:
    from slmsearch.cli import main

    result = CliRunner().invoke(main, ["dashboard", "--storage", f"sqlite:///{tmp_path / 'none.db'}"])
    assert result.exit_code == 2 and "no study database" in result.stderr


def test_chromium_renders_the_dashboard(tmp_path: Path) -> None:
    """The dashboard's page in headless Chromium: its app runs (the study's name is laid out) and a
    screenshot (kept in the test's folder, path printed) decodes. Fails under CI without Chromium."""
    import re

    from browser import chromium, decoded_png, dump_dom, screenshot

    binary = chromium()
    _study(tmp_path / "dash.db")
    code = "import sys; from slmsearch.cli import main; sys.exit(main())"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "dashboard", "--storage", f"sqlite:///{tmp_path / 'dash.db'}", "--port", "0"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert "http://127.0.0.1:" in line, f"no address printed: {line!r} (exit {proc.poll()})"
        address = line.split(" at ")[-1].strip()
        for _ in range(200):  # until the server answers (it prints its address as it starts listening)
            assert proc.poll() is None, "the dashboard exited early"
            try:
                _get(address.split("/dashboard")[0] + "/api/studies")
                break
            except OSError:
                time.sleep(0.3)
        dom = dump_dom(binary, address, budget_ms=15_000)
        text = re.sub(r"<[^>]+>", " ", dom.stdout)
        assert "dash" in text.split(), f"the dashboard app did not render the study: {dom.stderr[-500:]}"
        shot = screenshot(binary, address, tmp_path / "dashboard.png", budget_ms=15_000, height=1000)
        width, height, colours = decoded_png(shot)
        assert (width, height) == (1280, 1000) and colours != 1
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)


def _searched_study(path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """A study the search itself writes (open_study, run_trial; compression and evaluation stubbed
    with fixed measurements): the baseline over budget but evaluated, a plan rejected by the
    budget, and an evaluated plan within it. Returns what was measured per trial number."""
    import optuna

    from slmsearch.compress import pipeline
    from slmsearch.compress.pipeline import PipelineResult
    from slmsearch.hwmodel import ModelShape, load_platform
    from slmsearch.search import objective
    from slmsearch.search.config import SpaceConfig, StudyConfig
    from slmsearch.search.objective import TrialContext, run_trial
    from slmsearch.search.space import baseline_params
    from slmsearch.search.storage import open_storage
    from slmsearch.search.study import open_study

    tiny = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": True}
    shape = ModelShape.from_hf_config(tiny)
    config = StudyConfig(name="searched", budget_mb=0.01, context_len=128, trials=4, space=SpaceConfig(drop_layers=(0, 2)))
    measured = {"wikitext_word_ppl": 31.5, "triviaqa_exact_match": 0.04, "wikitext_token_ppl": 20.0}
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: PipelineResult(checkpoint_dir=path.parent, reports=[]))
    monkeypatch.setattr(objective, "evaluate_staged", lambda trial, ctx, folder: dict(measured))
    ctx = TrialContext(config=config, base_location="/nonexistent", base_shape=shape, platform=load_platform("siracusa"),
                       data_dir=path.parent, cache=None, log=lambda _: None)
    study = open_study(config, open_storage(f"sqlite:///{path}"))
    study.enqueue_trial(baseline_params(config.space), user_attrs={"baseline": True})
    study.enqueue_trial({"drop_layers": 0, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 16, "layer_grid": "gptq", "gptq_bits": 16})
    study.optimize(lambda t: run_trial(t, ctx), n_trials=2)
    config = StudyConfig(name="searched", budget_mb=100.0, context_len=128, trials=4, space=SpaceConfig(drop_layers=(0, 2)))
    ctx.config = config
    study.enqueue_trial({"drop_layers": 2, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 8, "embedding_grid": "sym", "layer_grid": "gptq", "gptq_bits": 16})
    study.optimize(lambda t: run_trial(t, ctx), n_trials=1)
    trials = optuna.load_study(study_name="searched", storage=f"sqlite:///{path}").trials
    return {t.number: {k: t.user_attrs[k] for k in (*measured, "decode_latency_s") if k in t.user_attrs} for t in trials}


def test_dashboard_shows_named_objectives_and_only_measured_values(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metric names from the study; no objective value that was not measured (a rejected plan has
    none, the over-budget baseline's stay in its attributes); the over-budget baseline is not
    among the best trials."""
    measured = _searched_study(tmp_path / "s.db", monkeypatch)
    assert "wikitext_word_ppl" in measured[0] and "wikitext_word_ppl" not in measured[1]  # baseline evaluated; 1 rejected
    proc, _, base, studies = _serve(tmp_path / "s.db")
    try:
        (study_id,) = [s["study_id"] for s in studies["study_summaries"] if s["study_name"] == "searched"]
        detail = _get(f"{base}/api/studies/{study_id}")
    finally:
        _stop(proc)
    names = ["wikitext_word_ppl", "triviaqa_exact_match", "decode_latency_s"]
    assert detail["objective_names"] == names
    trials = {t["number"]: t for t in detail["trials"]}
    assert [trials[n]["state"] for n in (0, 1, 2)] == ["Pruned", "Pruned", "Complete"]
    for number, trial in trials.items():
        values = trial.get("values")
        if values is None:
            continue
        assert values == [measured[number][n] for n in names], (number, values)  # exactly what was measured
    assert not any(v is not None and abs(v) >= 1e5 for t in detail["trials"] for v in (t.get("values") or []))
    assert [t["number"] for t in detail["best_trials"]] == [2]  # not the over-budget baseline, not the rejection
    attrs = {a["key"]: a["value"] for a in trials[0]["user_attrs"]}
    assert attrs["wikitext_word_ppl"] == "31.5" and "over_budget" in attrs  # measured, shown as an attribute
