"""search/trials.py: the status of every kind of stored trial, read back from a real SQLite study,
and the Pareto set."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from slmsearch.search import trials as tr

# name -> (state, values, constraint, user attributes): one of each kind a study stores
KINDS = {
    tr.EVALUATED: (TrialState.COMPLETE, [30.0], -4.0, {}),
    tr.OVER_BUDGET: (TrialState.COMPLETE, [20.0], 200.0, {tr.BASELINE_ATTR: True}),  # the evaluated baseline
    tr.REJECTED: (TrialState.PRUNED, None, 12.0, {tr.REJECTED_ATTR: "footprint 76 MB > budget 64 MB"}),
    tr.PRUNED: (TrialState.PRUNED, None, -4.0, {tr.EARLY_PPL_ATTR: 900.0}),
    tr.REPEAT: (TrialState.COMPLETE, [30.0], -4.0, {tr.REPEAT_ATTR: 0}),
    "repeat of a pruned plan": (TrialState.PRUNED, None, -4.0, {tr.REPEAT_ATTR: 3}),
    tr.FAILED: (TrialState.FAIL, None, None, {}),
    # how the objective ends the evaluated over-budget baseline now (PRUNED, metrics in attributes),
    # and how studies written before stored a rejection (COMPLETE with made-up values)
    "baseline over budget, ended pruned": (TrialState.PRUNED, None, 200.0, {
        tr.BASELINE_ATTR: True, tr.OVER_BUDGET_ATTR: "footprint 277 MB > budget 64 MB", "wikitext_word_ppl": 25.0}),
    "baseline over budget, pruned early": (TrialState.PRUNED, None, 200.0, {
        tr.BASELINE_ATTR: True, tr.OVER_BUDGET_ATTR: "footprint 277 MB > budget 64 MB", tr.EARLY_PPL_ATTR: 900.0}),
    "rejected, old studies": (TrialState.COMPLETE, [1e6], 12.0, {tr.REJECTED_ATTR: "footprint 76 MB > budget 64 MB"}),
    tr.SURPLUS: (TrialState.FAIL, None, -4.0, {tr.SURPLUS_ATTR: "all 8 trials were taken"}),
}


@pytest.fixture
def stored(tmp_path):
    """A SQLite study holding one trial of each kind, a running and a waiting one, loaded back."""
    url = f"sqlite:///{tmp_path / 't.db'}"
    study = optuna.create_study(study_name="kinds", storage=url)
    for state, values, over, attrs in KINDS.values():
        study.add_trial(create_trial(state=state, values=values, user_attrs=attrs, params={"x": 0.5},
                                     distributions={"x": FloatDistribution(0, 1)},
                                     constraints=None if over is None else {tr.CONSTRAINT_KEY: over}))
    study.ask()
    study.enqueue_trial({"x": 0.1})
    return optuna.load_study(study_name="kinds", storage=url).trials


def test_status_of_every_kind(stored):
    named = {"baseline over budget, ended pruned": tr.OVER_BUDGET, "baseline over budget, pruned early": tr.PRUNED,
             "rejected, old studies": tr.REJECTED}
    expected = [tr.REPEAT if name.startswith("repeat") else named.get(name, name) for name in KINDS] + [tr.RUNNING, tr.WAITING]
    assert [tr.status(t) for t in stored] == expected


def test_counted_and_feasible_agree_with_status(stored):
    # evaluated, the evaluated baseline, pruned, the baseline ended pruned (evaluated), the baseline pruned early
    assert [t.number for t in stored if tr.counted(t)] == [0, 1, 3, 7, 8]
    assert all(tr.counted(t) == (tr.status(t) in tr.COUNTED) for t in stored)
    assert [t.number for t in stored if tr.feasible_evaluated(t)] == [0]


def test_pareto_trials_are_feasible_finite_and_non_dominated(tmp_path):
    study = optuna.create_study(study_name="front", storage=f"sqlite:///{tmp_path / 'p.db'}", directions=["minimize", "maximize"])

    def add(values, over=-1.0, **attrs):
        study.add_trial(create_trial(values=values, constraints={tr.CONSTRAINT_KEY: over}, user_attrs=attrs))

    add([10.0, 0.5])  # 0: on the front
    add([20.0, 0.9])  # 1: on the front (worse first, better second)
    add([15.0, 0.4])  # 2: dominated by 0
    add([5.0, 0.99], over=3.0)  # 3: would dominate all, but over budget
    add([5.0, 0.99], **{tr.REJECTED_ATTR: "over"})  # 4: rejected
    add([5.0, 0.99], **{tr.REPEAT_ATTR: 0})  # 5: a repeat never counts
    add([math.inf, 1.0])  # 6: not finite
    add([10.0, 0.5])  # 7: equal to 0, so neither dominates the other
    assert [t.number for t in tr.pareto_trials(study)] == [0, 1, 7]
