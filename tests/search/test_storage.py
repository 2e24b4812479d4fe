"""search/storage.py on real SQLite files: URLs, redaction, finding a study, and the locked write
(the one use of Optuna's private RDB modules: these tests fail when that API changes)."""

from __future__ import annotations

import re
from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from postgres import PASSWORD, postgres_server  # noqa: F401  (a fixture)
from slmsearch.errors import SlmsearchError
from slmsearch.search.config import StudyConfig
from slmsearch.search.storage import (
    LockedTrial, engine_url, locate_study, open_storage, redact, scrub, set_trial_attr_locked, sqlite_path, storage_url,
)

REPO = Path(__file__).resolve().parents[2]


def test_redact_hides_every_form_of_password():
    assert redact("postgresql://u:pw@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert redact("postgresql://u:p@ss/w@h/db") == "postgresql://u:***@h/db"
    assert redact("postgresql://h/db?user=u&password=pw&sslmode=require") == "postgresql://h/db?user=u&password=***&sslmode=require"
    assert redact("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    assert "pw%21" not in scrub("auth failed for pw%21 and pw!", "postgresql://u:pw%21@h/db")
    assert "pw!" not in scrub("auth failed for pw!", "postgresql://u:pw%21@h/db")


def test_storage_url_defaults_to_a_sqlite_file_in_the_runs_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))
    url = storage_url(StudyConfig(name="s1"))
    assert url == f"sqlite:///{(tmp_path / 'runs' / 's1.db').resolve()}" and (tmp_path / "runs").is_dir()
    assert storage_url(StudyConfig(name="s1", storage="postgresql://h/db")) == "postgresql://h/db"
    assert sqlite_path(url) == (tmp_path / "runs" / "s1.db").resolve()
    assert sqlite_path("sqlite:///:memory:") is None and sqlite_path("postgresql://h/db") is None


def test_open_storage_rejects_an_unknown_scheme():
    with pytest.raises(SlmsearchError, match="scheme 'redis' is not supported"):
        open_storage("redis://h/0")


def test_engine_url_rewrites_bare_schemes_to_the_installed_driver():
    assert engine_url("postgresql://u:pw@h:5432/db") == "postgresql+psycopg2://u:pw@h:5432/db"
    assert engine_url("postgres://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert engine_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert engine_url("sqlite:////tmp/a.db") == "sqlite:////tmp/a.db"
    with pytest.raises(SlmsearchError, match="scheme 'redis' is not supported"):
        engine_url("redis://h/0")
    with pytest.raises(SlmsearchError, match="scheme '' is not supported"):
        engine_url("/tmp/a.db")


def test_a_scheme_whose_driver_is_missing_names_the_package(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "pymysql" else real(name, *a))
    with pytest.raises(SlmsearchError, match=r"needs the driver module 'pymysql'.*pip install PyMySQL"):
        engine_url("mysql://u@h/db")


def test_the_pinned_storage_packages_are_the_installed_ones():
    """requirements.lock pins what storage URLs need (SQLAlchemy, its migrations, the driver that
    `postgresql://` is rewritten to), and the pins are what is installed."""
    from importlib.metadata import version

    pins = dict(line.split("==") for line in (REPO / "requirements.lock").read_text().splitlines() if "==" in line)
    for package in ("SQLAlchemy", "alembic", "psycopg2-binary"):
        assert package in pins, f"{package} is not pinned in requirements.lock"
        assert version(package) == pins[package], package


def test_unreachable_storage_is_one_clear_error(tmp_path, tiny_checkpoint, data_dir):
    """Nothing listens on port 1: one line that says so (not a missing driver), the password
    redacted, exit code 2."""
    from test_slots import write_worker_study  # same folder

    from slmsearch.cli import main

    study_file = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage="null", trials=1, name="away")
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/slmsearch"
    result = CliRunner().invoke(main, ["optimize", "--study", str(study_file), "--storage", url])
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert len(out.splitlines()) == 1 and out.startswith("error: cannot open storage"), out
    assert "postgres:***@127.0.0.1:1" in out and PASSWORD not in out
    assert re.search(r"connection refused|could not connect", out, re.IGNORECASE), out
    assert "import" not in out.lower(), out  # a missing driver would say "Failed to import DB access module"


@pytest.mark.postgres
def test_the_readme_postgresql_set_up_works_verbatim(tmp_path, tiny_checkpoint, data_dir, postgres_server):
    """README "Many workers", run as written there: a role and a database named slmsearch, the
    password in ~/.pgpass (the README's `echo ... > ~/.pgpass && chmod 600 ~/.pgpass`), then
    `.venv/bin/slmsearch optimize ... --storage postgresql://slmsearch@HOST/slmsearch` and
    `slmsearch pareto` with the same --storage/--study-name. Only the host:port, the study file (the
    tiny model) and the trial count differ. Without the password the same command is one line."""
    import os
    import subprocess
    import sys

    from test_slots import write_worker_study  # same folder

    from slmsearch.cli import main

    postgres_server.sql(f"CREATE ROLE slmsearch LOGIN PASSWORD '{PASSWORD}'")  # the server is this test session's
    postgres_server.sql(f'CREATE DATABASE slmsearch OWNER slmsearch')
    host = f"127.0.0.1:{postgres_server.port}"
    url = f"postgresql://slmsearch@{host}/slmsearch"
    study = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage="null", trials=1, name="readme")
    args = ["optimize", "--study", str(study), "--study-name", "smollm2-64mb", "--budget-mb", "64", "--trials", "1",
            "--storage", url]
    refused = CliRunner().invoke(main, args, env={"SLMSEARCH_CACHE": str(tmp_path / "cache"), "PGPASSFILE": str(tmp_path / "none")})
    out = refused.output.strip()
    assert refused.exit_code == 2 and len(out.splitlines()) == 1 and out.startswith("error: cannot open storage"), out
    assert "password" in out.lower(), out  # libpq: no password supplied
    home = tmp_path / "home"
    home.mkdir()
    script = (
        f"echo '127.0.0.1:{postgres_server.port}:slmsearch:slmsearch:{PASSWORD}' > ~/.pgpass && chmod 600 ~/.pgpass\n"
        f"{Path(sys.executable).parent}/slmsearch " + " ".join(args) + "\n"
    )
    env = {**os.environ, "HOME": str(home), "SLMSEARCH_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    env.pop("PGPASSFILE", None)
    done = subprocess.run(["bash", "-e", "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert PASSWORD not in done.stdout + done.stderr and f"postgresql://slmsearch@{host}/slmsearch" in done.stderr
    pareto = CliRunner().invoke(main, ["pareto", "--storage", url, "--study-name", "smollm2-64mb"],
                                env={"PGPASSFILE": str(home / ".pgpass")})
    assert pareto.exit_code == 0 and "| 0 (baseline) |" in pareto.output, pareto.output


def test_locate_study_finds_the_only_study_and_names_the_others(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    first = optuna.create_study(study_name="a", storage=url, directions=["minimize", "maximize"])
    first.set_user_attr("config", {"budget_mb": 32.0})
    first.set_user_attr("objectives", ["wikitext_word_ppl", "triviaqa_exact_match"])
    located = locate_study(storage=url)
    assert (located.name, located.config, located.objectives) == ("a", {"budget_mb": 32.0}, ["wikitext_word_ppl", "triviaqa_exact_match"])
    optuna.create_study(study_name="b", storage=url)
    with pytest.raises(SlmsearchError, match=r"holds 2 studies \(a, b\); pass --study-name"):
        locate_study(storage=url)
    assert locate_study(storage=url, study_name="b").objectives == ["values_0"]  # objectives not recorded
    with pytest.raises(SlmsearchError, match="no study 'c'"):
        locate_study(storage=url, study_name="c")
    with pytest.raises(SlmsearchError, match="no study database"):
        locate_study(storage=f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()


def _study_with_trials(path: Path) -> optuna.Study:
    study = optuna.create_study(study_name="locked", storage=open_storage(f"sqlite:///{path}"))
    done = study.ask()
    done.set_user_attr("slot", 0)
    done.set_user_attr("plan", {"stages": []})
    study.tell(done, 1.0)
    failed = study.ask()
    failed.set_user_attr("rejected", "over budget")
    study.tell(failed, state=TrialState.FAIL)
    study.ask()  # trial 2, running
    return study


def test_locked_write_reads_the_asked_attributes_and_stores_the_decision(tmp_path):
    study = _study_with_trials(tmp_path / "l.db")
    storage = open_storage(f"sqlite:///{tmp_path / 'l.db'}")  # a second connection, as another worker's
    seen: list[tuple[LockedTrial, list[LockedTrial]]] = []

    def decide(me: LockedTrial, others: list[LockedTrial]) -> int:
        seen.append((me, sorted(others)))
        return 7

    assert set_trial_attr_locked(storage, "locked", 2, "slot", ("slot", "rejected"), decide) is True
    (me, others), = seen
    assert me == LockedTrial(2, TrialState.RUNNING, {})
    assert others == [LockedTrial(0, TrialState.COMPLETE, {"slot": 0}),  # "plan" was not asked for
                      LockedTrial(1, TrialState.FAIL, {"rejected": "over budget"})]
    assert optuna.load_study(study_name="locked", storage=storage).trials[2].user_attrs == {"slot": 7}
    # An existing value is replaced; a decision of None stores nothing.
    assert set_trial_attr_locked(storage, "locked", 2, "slot", ("slot",), lambda me, others: me.user_attrs["slot"] + 1)
    assert not set_trial_attr_locked(storage, "locked", 0, "slot", ("slot",), lambda me, others: None)
    trials = optuna.load_study(study_name="locked", storage=storage).trials
    assert trials[2].user_attrs == {"slot": 8} and trials[0].user_attrs["slot"] == 0
    assert study.trials[2].state == TrialState.RUNNING  # the write changed nothing else
