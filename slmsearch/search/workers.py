"""Many workers on one study: an exact trial count without a race.

Every worker runs the same loop against one Optuna RDB storage (PostgreSQL across machines).
"Count, then start a trial" races: three workers that each see 11 of 12 trials done would all
start one. Instead, a trial that passed the budget check *claims a slot* before any compression:
in one transaction that holds the study row's lock (the lock Optuna itself takes to number new
trials), it counts the counted trials plus the running trials that hold a slot, and takes a slot
only if that is below the target. A trial that finds no free slot is a *surplus* trial: it ends
FAILED with the user attribute ``surplus`` at once, without work; it does not count and is not
retried. A slot is freed when its trial fails (a killed worker's trial is failed by the heartbeat
check after the grace period, then retried as a WAITING trial that claims a slot again).

The slot is the user attribute ``slot`` holding the trial's own number: a retried trial inherits
its predecessor's attributes, and a copied slot (another number) does not hold one.
"""

from __future__ import annotations

import json
import time
from typing import Any

SLOT_ATTR = "slot"
SURPLUS_ATTR = "surplus"
REJECTED_ATTR = "rejected"
REPEAT_ATTR = "repeat_of"  # a plan evaluated before: answered from that trial, no work (objective.py)
NOT_COUNTED = (REJECTED_ATTR, REPEAT_ATTR)


class SurplusTrial(Exception):
    """Raised by a trial that found every slot taken; the optimize loop catches it (FAILED, not counted)."""


def counted(trial: Any) -> bool:
    """A trial that counts towards ``--trials``: evaluated (complete or pruned), neither a budget
    rejection nor a repeat of an evaluated plan."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and not any(k in trial.user_attrs for k in NOT_COUNTED)


def feasible_evaluated(trial: Any) -> bool:
    """A counted, COMPLETE trial that meets every constraint: what the Pareto set and the pruning
    rule compare (not the over-budget baseline, rejections, repeats, pruned or failed trials)."""
    from optuna.trial import TrialState

    return trial.state == TrialState.COMPLETE and counted(trial) and all(c <= 0 for c in trial.constraints.values())


def holds_slot(trial: Any) -> bool:
    from optuna.trial import TrialState

    return trial.state == TrialState.RUNNING and trial.user_attrs.get(SLOT_ATTR) == trial.number


def taken_slots(trials: list[Any]) -> int:
    """Counted trials plus running trials holding a slot (a snapshot; only the claim is exact)."""
    return sum(counted(t) or holds_slot(t) for t in trials)


def _rdb_backend(storage: Any) -> Any:
    from optuna.storages import RDBStorage

    backend = getattr(storage, "_backend", storage)  # create_study wraps RDBStorage in a cache
    return backend if isinstance(backend, RDBStorage) else None


def claim_slot(trial: Any, target: int) -> bool:
    """Take one of the study's ``target`` slots for ``trial`` (running), atomically; False if none is free."""
    backend = _rdb_backend(trial.study._storage)
    if backend is None:  # in-memory or journal storage: one process, no race to guard against
        trials = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number]
        if taken_slots(trials) >= target:
            return False
        trial.set_user_attr(SLOT_ATTR, trial.number)
        return True
    import optuna

    for attempt in range(5):
        try:
            return _claim_locked(backend, trial.study._study_id, trial._trial_id, target)
        except optuna.exceptions.StorageInternalError:  # a lock timeout or a busy SQLite file
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _claim_locked(backend: Any, study_id: int, trial_id: int, target: int) -> bool:
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    with _create_scoped_session(backend.scoped_session) as session:
        # The same row lock Optuna takes while numbering a new trial: claims are serialized.
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        rows = (
            session.query(models.TrialModel.trial_id, models.TrialModel.number, models.TrialModel.state)
            .filter(models.TrialModel.study_id == study_id)
            .filter(models.TrialModel.state.in_([TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING]))
            .all()
        )
        attrs = (
            session.query(models.TrialUserAttributeModel.trial_id, models.TrialUserAttributeModel.key,
                          models.TrialUserAttributeModel.value_json)
            .join(models.TrialModel, models.TrialModel.trial_id == models.TrialUserAttributeModel.trial_id)
            .filter(models.TrialModel.study_id == study_id)
            .filter(models.TrialUserAttributeModel.key.in_([SLOT_ATTR, *NOT_COUNTED]))
            .all()
        )
        not_counted = {tid for tid, key, _ in attrs if key in NOT_COUNTED}
        slot = {tid: json.loads(value) for tid, key, value in attrs if key == SLOT_ATTR}
        me = None
        taken = 0
        for tid, number, state in rows:
            if tid == trial_id:
                me = number
                continue
            if state == TrialState.RUNNING:
                taken += slot.get(tid) == number
            else:
                taken += tid not in not_counted
        if me is None:  # no longer running (failed by a heartbeat check meanwhile)
            return False
        if taken >= target:
            return False
        row = (
            session.query(models.TrialUserAttributeModel)
            .filter(models.TrialUserAttributeModel.trial_id == trial_id)
            .filter(models.TrialUserAttributeModel.key == SLOT_ATTR)
            .one_or_none()
        )
        if row is None:
            session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=SLOT_ATTR, value_json=json.dumps(me)))
        else:
            row.value_json = json.dumps(me)
        return True
