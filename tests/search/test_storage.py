"""search/storage.py on real SQLite files: URLs, redaction, finding a study, and the locked write
(the one use of Optuna's private RDB modules: these tests fail when that API changes)."""

from __future__ import annotations

from pathlib import Path

import optuna
import pytest
from click.testing import CliRunner
from optuna.trial import TrialState

from postgres import PASSWORD
from slmsearch.errors import SlmsearchError
from slmsearch.search.config import StudyConfig
from slmsearch.search.storage import (
    LockedTrial, locate_study, open_storage, redact, scrub, set_trial_attr_locked, sqlite_path, storage_url,
)


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


def test_unreachable_storage_is_one_clear_error(tmp_path, tiny_checkpoint, data_dir):
    """Nothing listens on port 1: one line, the password redacted, exit code 2."""
    from test_slots import write_worker_study  # same folder

    from slmsearch.cli import main

    study_file = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage="null", trials=1, name="away")
    url = f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/slmsearch"
    result = CliRunner().invoke(main, ["optimize", "--study", str(study_file), "--storage", url])
    out = result.output.strip()
    assert result.exit_code == 2, out
    assert len(out.splitlines()) == 1 and out.startswith("error: cannot open storage"), out
    assert "postgres:***@127.0.0.1:1" in out and PASSWORD not in out


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
