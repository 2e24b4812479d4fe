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


def test_dashboard_serves_the_study(tmp_path: Path) -> None:
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
        base = address.split("/dashboard")[0]
        assert address.endswith("/dashboard/studies/1")
        deadline = time.monotonic() + 60
        studies = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, "the dashboard exited early"
            try:
                studies = _get(f"{base}/api/studies")
                break
            except OSError:
                time.sleep(0.3)
        assert studies is not None, "the dashboard did not answer within 60 s"
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
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
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
