"""What a stored trial is: the attribute names a trial carries, its status, and the Pareto set.

Every module that reads a study (the loop, the slots, the report, the table, the export) asks
here, so that "counted", "feasible" and "over budget" mean one thing everywhere.
"""

from __future__ import annotations

import math
from typing import Any

# User attributes of a trial (see objective.py for what writes each).
PLAN_ATTR = "plan"  # the plan as a dict (Plan.to_dict)
BASELINE_ATTR = "baseline"  # True on the enqueued uncompressed reference
ANCHOR_ATTR = "anchor"  # True on an enqueued anchor plan (search/anchors.py)
WORKER_ATTR = "worker"  # host:pid of the process that ran it
REJECTED_ATTR = "rejected"  # why it was over budget; never compressed or evaluated (ends PRUNED, no values)
OVER_BUDGET_ATTR = "over_budget"  # the baseline over budget: evaluated all the same (ends PRUNED, metrics in attrs)
REPEAT_ATTR = "repeat_of"  # a plan evaluated before: the number of that trial, answered from it without work
SURPLUS_ATTR = "surplus"  # every slot was taken when it started: ended FAILED without work (slots.py)
SLOT_ATTR = "slot"  # the trial's own number once it holds one of the study's slots (slots.py)
EARLY_PPL_ATTR = "early_token_ppl"  # token perplexity of the first windows, which the pruning rule judges
STAGE_SECONDS_ATTR = "stage_seconds"  # wall seconds per compression stage that ran
CACHE_HITS_ATTR = "cache_hits"  # stage kinds read from the stage cache
EVAL_SECONDS_ATTR = "eval_seconds"  # wall seconds per evaluation part and "total"
EVAL_COUNTS_ATTR = "eval_counts"  # windows, pages and questions each metric scored
CONSTRAINT_KEY = "footprint_over_budget_mb"  # the trial's constraint: footprint minus budget (> 0: infeasible)
# Hardware-model outputs and quality metrics, each stored under its own name.
HW_ATTRS = ("footprint_mb", "decode_latency_s", "tokens_per_s", "energy_per_token_j")
QUALITY_ATTRS = ("wikitext_word_ppl", "wikitext_token_ppl", "triviaqa_exact_match", "triviaqa_answer_logprob", EARLY_PPL_ATTR)

# Study user attributes.
CONFIG_STUDY_ATTR = "config"  # the StudyConfig as a dict (storage URL redacted)
OBJECTIVES_STUDY_ATTR = "objectives"  # the metric behind each objective value
RUN_SEGMENTS_STUDY_ATTR = "run_segments"  # one entry per change of trials/timeout/storage...: {started, settings}
SCREEN_SUFFIX = ":screen"  # the companion study of a study's proxy screens (search/screen_runner.py)
BASELINE_PPL_STUDY_ATTR = "baseline_early_token_ppl"  # the baseline's early token ppl (the pruning reference)

# What :func:`status` returns.
EVALUATED = "evaluated"  # complete, within the budget: what the Pareto set is drawn from
OVER_BUDGET = "over budget"  # complete, evaluated, footprint over the budget (the uncompressed baseline can be)
REJECTED = "rejected"  # over budget, so never compressed or evaluated
PRUNED = "pruned"  # stopped by the early perplexity check
REPEAT = "repeat"  # a plan sampled again, answered from its first trial
FAILED = "failed"  # raised, or its worker died
SURPLUS = "surplus"  # found every slot taken and ended without work
RUNNING = "running"
WAITING = "waiting"  # enqueued, not started
COUNTED = (EVALUATED, OVER_BUDGET, PRUNED)  # the statuses that count towards the study's ``trials``


def status(trial: Any) -> str:
    """What ``trial`` (a FrozenTrial) is, as one of the names above."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    if trial.state == TrialState.RUNNING:
        return RUNNING
    if trial.state == TrialState.WAITING:
        return WAITING
    if trial.state == TrialState.FAIL:
        return SURPLUS if SURPLUS_ATTR in attrs else FAILED
    if REJECTED_ATTR in attrs:
        return REJECTED
    if REPEAT_ATTR in attrs:
        return REPEAT
    if trial.state == TrialState.PRUNED:
        # An evaluated over-budget baseline ends PRUNED (see objective.py); pruned by the early check, it has no metrics.
        evaluated = OVER_BUDGET_ATTR in attrs and any(k in attrs for k in QUALITY_ATTRS if k != EARLY_PPL_ATTR)
        return OVER_BUDGET if evaluated else PRUNED
    return EVALUATED if all(c <= 0 for c in trial.constraints.values()) else OVER_BUDGET


def counted(trial: Any) -> bool:
    """A trial that counts towards the study's ``trials``: evaluated (complete or pruned), neither a
    budget rejection nor a repeat. The same as ``status(trial) in COUNTED``; this form needs only
    ``state`` and ``user_attrs``, so that slots.py can ask it of rows read under a lock."""
    from optuna.trial import TrialState

    attrs = trial.user_attrs
    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and REJECTED_ATTR not in attrs and REPEAT_ATTR not in attrs


def feasible_evaluated(trial: Any) -> bool:
    """A counted, complete trial within the budget: what the Pareto set and the pruning rule compare."""
    return status(trial) == EVALUATED


def pareto_trials(study: Any) -> list[Any]:
    """Feasible, evaluated trials with finite values that no other such trial dominates."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    feasible = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if feasible_evaluated(t) and t.values is not None and all(math.isfinite(v) for v in t.values)
    ]
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions]

    def dominates(a: Any, b: Any) -> bool:
        av = [s * v for s, v in zip(signs, a.values)]
        bv = [s * v for s, v in zip(signs, b.values)]
        return all(x <= y for x, y in zip(av, bv)) and any(x < y for x, y in zip(av, bv))

    return [t for t in feasible if not any(dominates(o, t) for o in feasible if o is not t)]
