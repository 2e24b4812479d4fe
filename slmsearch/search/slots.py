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

import time
from collections.abc import Iterable
from typing import Any

from slmsearch.search.storage import set_trial_attr_locked
from slmsearch.search.trials import REJECTED_ATTR, REPEAT_ATTR, SLOT_ATTR, counted


class SurplusTrial(Exception):
    """Raised by a trial that found every slot taken; the optimize loop catches it (FAILED, not counted)."""


def holds_slot(trial: Any) -> bool:
    """A running trial whose ``slot`` attribute is its own number."""
    from optuna.trial import TrialState

    return trial.state == TrialState.RUNNING and trial.user_attrs.get(SLOT_ATTR) == trial.number


def taken_slots(trials: Iterable[Any]) -> int:
    """Counted trials plus running trials holding a slot (a snapshot; only the claim is exact)."""
    return sum(counted(t) or holds_slot(t) for t in trials)


def claim_slot(trial: Any, target: int, storage: Any = None) -> bool:
    """Take one of the study's ``target`` slots for ``trial`` (running), atomically; False if none is free.

    ``storage`` is the study's ``RDBStorage`` (from ``storage.open_storage``); None for a storage
    that one process alone uses (in memory), where there is no race to guard against.
    """
    if storage is None:
        others = [t for t in trial.study.get_trials(deepcopy=False) if t.number != trial.number]
        if taken_slots(others) >= target:
            return False
        trial.set_user_attr(SLOT_ATTR, trial.number)
        return True
    import optuna
    from optuna.trial import TrialState

    def decide(me: Any, others: list[Any]) -> int | None:
        if me.state != TrialState.RUNNING:  # failed by a heartbeat check meanwhile
            return None
        return me.number if taken_slots(others) < target else None

    for attempt in range(5):
        try:
            return set_trial_attr_locked(storage, trial.study.study_name, trial.number, SLOT_ATTR,
                                         (SLOT_ATTR, REJECTED_ATTR, REPEAT_ATTR), decide)
        except optuna.exceptions.StorageInternalError:  # a lock timeout or a busy SQLite file
            if attempt == 4:
                raise
            time.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")
