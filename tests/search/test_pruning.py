"""The pruning rule: relative to the best feasible trial so far, and always to the baseline."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState, create_trial
from optuna.distributions import CategoricalDistribution

from slmsearch.errors import SlmsearchError
from slmsearch.search.config import PruningConfig
from slmsearch.search.objective import best_feasible_early_ppl, prune_reason

RULE = PruningConfig(first_windows=2, max_ppl_ratio=6.0, max_baseline_ratio=100.0)


def test_prune_reason_uses_the_tighter_limit():
    # before any feasible trial: only a broken model (> 100 x baseline 28) is pruned
    assert prune_reason(255.0, 28.0, None, RULE) is None
    assert "100 x baseline 28.0" in prune_reason(2900.0, 28.0, None, RULE)
    # once a feasible trial scored 255: 6 x 255 = 1530 is the limit
    assert prune_reason(1500.0, 28.0, 255.0, RULE) is None
    assert "6 x best feasible so far 255.0" in prune_reason(1600.0, 28.0, 255.0, RULE)
    # a feasible trial near the baseline makes 6 x best tighter than 100 x baseline
    assert "6 x best feasible so far 30.0" in prune_reason(200.0, 28.0, 30.0, RULE)
    assert prune_reason(math.nan, 28.0, None, RULE) == "early token ppl is nan"
    assert prune_reason(1e9, None, None, RULE) is None  # nothing to compare with yet
    with pytest.raises(SlmsearchError, match="max_baseline_ratio > 1"):
        PruningConfig(max_baseline_ratio=1.0)


def test_best_feasible_early_ppl_ignores_infeasible_rejected_repeats_and_pruned():
    study = optuna.create_study(directions=["minimize"])
    dist = {"x": CategoricalDistribution([0, 1])}

    def add(ppl: float, over: float, state: TrialState = TrialState.COMPLETE, **attrs: object) -> None:
        study.add_trial(create_trial(
            state=state, values=[ppl] if state == TrialState.COMPLETE else None, params={"x": 0}, distributions=dist,
            user_attrs={"early_token_ppl": ppl, **attrs}, system_attrs={"constraints": [over]},
        ))

    assert best_feasible_early_ppl(study, 99) is None
    add(28.0, over=200.0, baseline=True)  # the uncompressed baseline: over budget
    add(10.0, over=-1.0, rejected="footprint")  # (a rejection never has an early ppl; defensive)
    add(12.0, over=-1.0, repeat_of=3)
    add(5.0, over=-1.0, state=TrialState.PRUNED)
    assert best_feasible_early_ppl(study, 99) is None
    add(255.0, over=-2.0)
    add(300.0, over=-0.5)
    assert best_feasible_early_ppl(study, 99) == 255.0
    assert best_feasible_early_ppl(study, 4) == 300.0  # a trial never compares with itself
