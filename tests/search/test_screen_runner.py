"""Screening in a real study (tiny random LLaMA, real stages, real SQLite): screens are stored in
the companion study, full trials are promoted from them, and a resumed study keeps them."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import TrialState

from slmsearch.search import screen_runner
from slmsearch.search.config import load_study_config, with_overrides
from slmsearch.search.storage import locate_study
from slmsearch.search.study import optimize
from slmsearch.search.trials import BASELINE_ATTR, PLAN_ATTR
from test_study import write_study  # same folder (pytest's rootdir-relative import)

SCREENING = "screening: {enabled: true, first: 3, per_trial: 1, extra_rounds: 1}\n"


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))


def _config(tmp_path, tiny_checkpoint, data_dir, trials):
    path = write_study(tmp_path, tiny_checkpoint, data_dir, trials=trials)
    path.write_text(path.read_text() + SCREENING)
    return load_study_config(path)


def _count_proxies(monkeypatch):
    from slmsearch.compress import proxy

    calls = []
    real = proxy.score_plan

    def counted(plan, *args, **kwargs):
        calls.append(plan.label())
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(proxy, "score_plan", counted)
    return calls


def test_full_trials_are_promoted_screens_and_a_resume_rescreens_nothing(tmp_path, tiny_checkpoint, data_dir, cache_env,
                                                                         monkeypatch):
    calls = _count_proxies(monkeypatch)
    config = _config(tmp_path, tiny_checkpoint, data_dir, trials=3)
    summary = optimize(config, log=lambda m: None)
    study = optuna.load_study(study_name="tiny", storage=config.storage)
    screens = optuna.load_study(study_name="tiny:screen", storage=config.storage)
    done = [t for t in screens.trials if t.state == TrialState.COMPLETE]
    assert summary["screens"] == len(done) and summary["promoted"] == 2 and summary["screens_scored"] == len(calls)
    # 3 first, then 1 more after the first promotion (the baseline is not promoted)
    assert len(done) >= 4
    scored = [t for t in done if "repeat_of" not in t.user_attrs]
    assert len(calls) == len(scored)  # a plan screened twice was scored once
    for t in done:
        assert t.user_attrs[screen_runner.PROXY_PPL_ATTR] > 0 and PLAN_ATTR in t.user_attrs
    promoted = [t for t in study.trials if screen_runner.SCREENED_FROM_ATTR in t.user_attrs]
    assert len(promoted) == 2 and not any(t.user_attrs.get(BASELINE_ATTR) for t in promoted)
    for t in promoted:  # the full trial ran exactly the screened plan
        source = screens.trials[t.user_attrs[screen_runner.SCREENED_FROM_ATTR]]
        assert t.user_attrs[PLAN_ATTR] == source.user_attrs[PLAN_ATTR]
        assert t.user_attrs[screen_runner.PROXY_PPL_ATTR] == source.user_attrs[screen_runner.PROXY_PPL_ATTR]
        assert t.user_attrs[screen_runner.PREDICTED_ATTR] > 0
    assert len({t.user_attrs[screen_runner.SCREENED_FROM_ATTR] for t in promoted}) == 2  # never the same screen twice

    before = len(calls)
    optimize(with_overrides(config, trials=4), log=lambda m: None)
    screens = optuna.load_study(study_name="tiny:screen", storage=config.storage)
    new = [t for t in screens.trials if t.state == TrialState.COMPLETE and t.number >= len(done)]
    assert len(calls) - before == len([t for t in new if "repeat_of" not in t.user_attrs])  # only new screens scored
    study = optuna.load_study(study_name="tiny", storage=config.storage)
    assert len([t for t in study.trials if screen_runner.SCREENED_FROM_ATTR in t.user_attrs]) == 3
    # the screens do not make the storage ambiguous for the readers
    assert locate_study(storage=config.storage).study.study_name == "tiny"


def test_the_choice_uses_the_correction_fitted_on_evaluated_trials(tmp_path, tiny_checkpoint, data_dir, cache_env):
    config = _config(tmp_path, tiny_checkpoint, data_dir, trials=3)
    optimize(config, log=lambda m: None)
    study = optuna.load_study(study_name="tiny", storage=config.storage)
    # weighted by the model's layer count, as the study weighs them
    points = screen_runner.evaluated_points(study, config, screen_runner.base_layers(str(tiny_checkpoint)))
    promoted = [t for t in study.trials if screen_runner.SCREENED_FROM_ATTR in t.user_attrs]
    assert len(points) == len([t for t in promoted if "early_token_ppl" in t.user_attrs])
    assert all(p.proxy_ppl is not None for p in points)
    last = promoted[-1]
    from slmsearch.search.screening import fit_correction

    first_points = [p for p in points if p.key != points[-1].key]
    assert last.user_attrs["correction"] == pytest.approx(
        {k: round(v, 4) for k, v in fit_correction(first_points).items()}, abs=1e-4)


@pytest.mark.parametrize("stop", ["sigint", "sigkill"])
def test_a_stop_during_a_screen_loses_no_finished_screen(tmp_path, tiny_checkpoint, data_dir, stop):
    """A worker stopped inside a screen (blocked in the proxy's WANDA/depth stage; SIGINT: exit 130,
    the screen FAILED; SIGKILL: the screen left RUNNING) is resumed by the same command: the
    screens finished before the stop are kept as they were, no plan is scored twice, the study
    ends with its trials, and the stopped screen ends FAILED (by the resumed worker's heartbeat
    check after SIGKILL)."""
    import signal

    from slmsearch.search.storage import open_storage
    from test_slots import start_worker, wait_all, wait_until_blocked, write_worker_study

    url = f"sqlite:///{tmp_path / 'stop.db'}"
    study_file = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage=url, trials=3, name="stop")
    study_file.write_text(study_file.read_text().replace("screening: {enabled: false}", SCREENING.strip()))
    log, marker = tmp_path / "worker.log", tmp_path / "mid-screen.json"
    proc = start_worker(study_file, tmp_path / "cache", log, block_at=marker)
    wait_until_blocked(proc, marker, log)
    storage = open_storage(url)
    screens = optuna.load_study(study_name="stop:screen", storage=storage).trials
    running = [t for t in screens if t.state == TrialState.RUNNING]
    assert len(running) == 1, "the worker is blocked in a screen, not in a full trial"
    stopped = running[0].number
    finished = {t.number: (t.user_attrs[screen_runner.PROXY_KEY_ATTR], t.user_attrs[screen_runner.PROXY_PPL_ATTR])
                for t in screens if t.state == TrialState.COMPLETE}

    proc.send_signal(signal.SIGINT if stop == "sigint" else signal.SIGKILL)
    proc.wait(timeout=120)
    out = log.read_text()
    if stop == "sigint":
        assert proc.returncode == 130, out[-3000:]
        assert out.strip().splitlines()[-1] == (f"error: interrupted; screen {stopped} marked failed; "
                                                "re-run the same command to resume"), out[-3000:]
        assert "Traceback" not in out
        state = optuna.load_study(study_name="stop:screen", storage=storage).trials[stopped].state
        assert state == TrialState.FAIL
    else:
        assert proc.returncode == -signal.SIGKILL
        assert optuna.load_study(study_name="stop:screen", storage=storage).trials[stopped].state == TrialState.RUNNING

    resumed = start_worker(study_file, tmp_path / "cache", tmp_path / "resumed.log")
    (out,) = wait_all([resumed], [tmp_path / "resumed.log"])
    assert resumed.returncode == 0, out[-3000:]
    screens = optuna.load_study(study_name="stop:screen", storage=storage).trials
    assert screens[stopped].state == TrialState.FAIL
    for number, (key, ppl) in finished.items():  # kept as they were
        assert screens[number].state == TrialState.COMPLETE
        assert (screens[number].user_attrs[screen_runner.PROXY_KEY_ATTR],
                screens[number].user_attrs[screen_runner.PROXY_PPL_ATTR]) == (key, ppl)
    scored = [t.user_attrs[screen_runner.PROXY_KEY_ATTR] for t in screens
              if t.state == TrialState.COMPLETE and screen_runner.PROXY_SECONDS_ATTR in t.user_attrs]
    assert len(scored) == len(set(scored))  # no plan scored twice, across the stop
    trials = optuna.load_study(study_name="stop", storage=storage).trials
    assert sum(t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "repeat_of" not in t.user_attrs
               and "rejected" not in t.user_attrs for t in trials) == 3
    assert not [t for t in trials + screens if t.state == TrialState.RUNNING]


def test_screens_after_the_first_are_neighbours_of_the_predicted_front(tmp_path, tiny_checkpoint, data_dir, cache_env):
    """With ``neighbour_share: 1`` every screen the runner proposes is one parameter one step from
    a plan on the predicted front (an earlier screen or an evaluated trial)."""
    config = _config(tmp_path, tiny_checkpoint, data_dir, trials=3)
    config = dataclasses.replace(config, screening=dataclasses.replace(config.screening, neighbour_share=1.0))
    optimize(config, log=lambda m: None)
    screens = optuna.load_study(study_name="tiny:screen", storage=config.storage).trials
    later = [t for t in screens[config.screening.first:] if t.state == TrialState.COMPLETE]
    assert later, "the study screened after its first promotion"

    def one_step(a: dict, b: dict, distributions: dict) -> bool:
        moved = [k for k in a if k in b and a[k] != b[k]]
        if len(moved) != 1:
            return False
        values = screen_runner.param_choices(distributions[moved[0]])
        return abs(values.index(a[moved[0]]) - values.index(b[moved[0]])) == 1

    for t in later:
        assert any(one_step(t.params, e.params, t.distributions) for e in screens[: t.number]), t.params
