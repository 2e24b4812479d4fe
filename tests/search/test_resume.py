"""A study's configuration is stored with it and compared on resume (search/study.py open_study):
a setting that changes what the trials mean is refused, naming the key and both values; a run
setting (trials, timeout, storage...) is recorded as a new run segment. Real SQLite storage, no model."""

from __future__ import annotations

import dataclasses

import optuna
import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.search.config import RUN_KEYS, StudyConfig, changed_settings, load_study_config, with_overrides
from slmsearch.search.storage import open_storage
from slmsearch.search.study import open_study, stored_config
from slmsearch.search.trials import CONFIG_STUDY_ATTR, RUN_SEGMENTS_STUDY_ATTR


@pytest.fixture
def first(tmp_path):
    """A study created by a first run of the default study file, and its storage URL."""
    url = f"sqlite:///{tmp_path / 's.db'}"
    config = with_overrides(load_study_config(None), name="resume", storage=url)
    open_study(config, open_storage(url))
    return config, url


def _attrs(url: str) -> dict:
    return optuna.load_study(study_name="resume", storage=url).user_attrs


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        ({"budget_mb": 32.0}, "budget_mb=64.0, this run asks for budget_mb=32.0"),
        ({"sampler": "tpe"}, "sampler='nsga2', this run asks for sampler='tpe'"),
        ({"seed": 7}, "seed=0, this run asks for seed=7"),
        ({"model": "/elsewhere"}, "model=None, this run asks for model='/elsewhere'"),
        ({"platform": "other.yaml"}, "platform='siracusa', this run asks for platform='other.yaml'"),
    ],
)
def test_a_setting_that_changes_the_trials_is_refused_with_both_values(first, flags, needle):
    config, url = first
    before = _attrs(url)
    with pytest.raises(SlmsearchError) as err:
        open_study(with_overrides(config, **flags), open_storage(url))
    assert needle in str(err.value) and "--study-name" in str(err.value)
    assert _attrs(url) == before  # nothing recorded for a refused run


def test_nested_settings_are_named_by_their_dotted_key(first):
    config, url = first
    space = dataclasses.replace(config.space, lora_steps=3)
    evaluation = dataclasses.replace(config.evaluation, token_windows=2)
    with pytest.raises(SlmsearchError, match=r"space\.lora_steps=10, this run asks for space\.lora_steps=3 \(and 1 more: evaluation\.token_windows\)"):
        open_study(dataclasses.replace(config, space=space, evaluation=evaluation), open_storage(url))


def test_run_settings_may_change_and_each_change_is_a_run_segment(first):
    config, url = first
    segments = _attrs(url)[RUN_SEGMENTS_STUDY_ATTR]
    assert len(segments) == 1 and segments[0]["settings"]["trials"] == 8
    open_study(config, open_storage(url))  # the same command again: the same segment
    assert len(_attrs(url)[RUN_SEGMENTS_STUDY_ATTR]) == 1
    open_study(with_overrides(config, trials=12, timeout_s=600.0), open_storage(url))
    attrs = _attrs(url)
    segments = attrs[RUN_SEGMENTS_STUDY_ATTR]
    assert [s["settings"]["trials"] for s in segments] == [8, 12] and segments[1]["settings"]["timeout_s"] == 600.0
    assert all(set(s) == {"started", "settings"} and set(s["settings"]) == set(RUN_KEYS) for s in segments)
    assert attrs[CONFIG_STUDY_ATTR]["trials"] == 12  # the stored config tells the current target
    assert attrs[CONFIG_STUDY_ATTR]["budget_mb"] == 64.0


def test_the_stored_config_never_holds_a_password(tmp_path):
    url = f"sqlite:///{tmp_path / 'p.db'}"
    config = StudyConfig(name="resume", storage="postgresql://u:pw-secret@h/db")
    assert stored_config(config)["storage"] == "postgresql://u:***@h/db"
    open_study(config, open_storage(url))
    assert "pw-secret" not in str(_attrs(url))


def test_changed_settings_compares_leaves_and_skips_keys_one_side_lacks():
    before = {"a": 1, "s": {"x": [1, 2], "y": 2.0, "old": 1}}
    after = {"a": 1, "s": {"x": [1, 3], "y": 2, "new": 5}, "added": True}
    assert changed_settings(before, after) == [("s.x", [1, 2], [1, 3])]
