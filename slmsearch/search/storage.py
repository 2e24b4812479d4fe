"""Where studies live: storage URLs, password redaction, opening an Optuna RDB storage, finding a
study in it, and the one locked write the slots need (the only use of Optuna's private modules).
"""

from __future__ import annotations

import json
import os
import random
import re
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from slmsearch.errors import SlmsearchError
from slmsearch.search.trials import CONFIG_STUDY_ATTR, OBJECTIVES_STUDY_ATTR

if TYPE_CHECKING:
    from slmsearch.search.config import StudyConfig

ENV_RUNS = "SLMSEARCH_RUNS"
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "mysql+pymysql")
_SCHEMA_RACE = re.compile(r"already exists|duplicate key|UniqueViolation|IntegrityError|deadlock", re.IGNORECASE)
_PASSWORD_KEYS = ("password", "passwd", "pwd")


def runs_dir() -> Path:
    """Where default study databases and outputs go: ``$SLMSEARCH_RUNS`` or ``./runs``."""
    path = Path(os.environ.get(ENV_RUNS) or "runs")
    path.mkdir(parents=True, exist_ok=True)
    return path


def storage_url(config: StudyConfig) -> str:
    """The study's storage URL (default: a SQLite file named after the study in the runs folder)."""
    if config.storage:
        return config.storage
    return f"sqlite:///{(runs_dir() / f'{config.name}.db').resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other schemes and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    raw = url[len("sqlite:///"):]
    return None if raw in ("", ":memory:") else Path(raw)


def redact(url: str) -> str:
    """A storage URL with any password replaced, safe to print (``user:pw@`` and ``?password=pw``)."""
    url = re.sub(r"(://[^:/@]*):[^?#]*@", r"\1:***@", url)
    return re.sub(r"([?&](?:password|passwd|pwd)=)[^&]*", r"\1***", url, flags=re.IGNORECASE)


def _secrets(url: str) -> list[str]:
    """The password strings in a storage URL, as written and URL-decoded."""
    from urllib.parse import parse_qs, unquote, urlsplit

    try:
        parts = urlsplit(url)
        found = [parts.password] if parts.password else []
        found += [v for k, vs in parse_qs(parts.query).items() if k.lower() in _PASSWORD_KEYS for v in vs]
    except ValueError:
        return []
    return [s for f in found for s in {f, unquote(f)} if s]


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message) with the URL's passwords replaced by ``***``."""
    for secret in _secrets(url):
        text = text.replace(secret, "***")
    return redact(text)


def open_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int = 30) -> Any:
    """An Optuna RDB storage with heartbeats, so that a killed worker's trial is failed and retried."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise SlmsearchError(
            f"storage URL scheme {scheme!r} is not supported; use sqlite:///path.db or postgresql://user@host/db"
        )
    engine_kwargs = None
    if scheme.startswith("postgresql"):  # fail fast on an unreachable host instead of the TCP timeout
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        for attempt in range(6):
            try:
                with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5.0, and relied upon here
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(
                        url,
                        heartbeat_interval=heartbeat_interval,
                        grace_period=grace_period,
                        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                        engine_kwargs=engine_kwargs,
                    )
            except Exception as exc:
                # Workers started together on an empty database race to create Optuna's tables; the
                # losers see "already exists" / a duplicate key, and the tables are there on retry.
                if attempt == 5 or not _SCHEMA_RACE.search(f"{type(exc).__name__}: {exc}"):
                    raise
                time.sleep(0.5 + random.random() * (attempt + 1))
    except Exception as exc:  # connection refused, bad credentials, missing driver...
        first = scrub((str(exc).strip().splitlines() or [type(exc).__name__])[0], url)[:200]
        raise SlmsearchError(f"cannot open storage {redact(url)!r} ({first}); check the URL and that the server runs") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)
    raise AssertionError("unreachable")


def objective_names(study: Any) -> list[str]:
    """The metric behind each objective value (``values_0``... when the study did not record them)."""
    names = study.user_attrs.get(OBJECTIVES_STUDY_ATTR)
    if isinstance(names, list) and len(names) == len(study.directions):
        return [str(n) for n in names]
    return [f"values_{i}" for i in range(len(study.directions))]


@dataclass(frozen=True)
class LocatedStudy:
    """A loaded study, where it lives (URL, never printed unredacted) and the config it ran with."""

    study: Any
    url: str
    config: dict[str, Any]

    @property
    def name(self) -> str:
        return str(self.study.study_name)

    @property
    def objectives(self) -> list[str]:
        return objective_names(self.study)


def locate_study(study_file: str | None = None, storage: str | None = None, study_name: str | None = None) -> LocatedStudy:
    """Load an existing study, read-only.

    The storage is ``storage`` or the study file's (default ``studies/default.yaml``). The name is
    ``study_name``, else the study file's name, else (with ``--storage`` alone) the only study there.
    """
    import optuna

    from slmsearch.search.config import load_study_config

    config = load_study_config(study_file) if (study_file is not None or storage is None) else None
    url = storage or storage_url(config)  # type: ignore[arg-type]
    path = sqlite_path(url)
    if path is not None and not path.is_file():
        raise SlmsearchError(
            f"no study database at {str(path)!r}; run `slmsearch optimize` first, or pass --storage URL / --study FILE"
        )
    with warnings.catch_warnings():  # heartbeat options warn as experimental; a reader never beats
        warnings.simplefilter("ignore")
        rdb = open_storage(url)
    names = [s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)]
    name = study_name or (config.name if config is not None else None)
    if name is None:
        if len(names) != 1:
            listed = ", ".join(names) or "none"
            raise SlmsearchError(f"storage {redact(url)!r} holds {len(names)} studies ({listed}); pass --study-name NAME")
        name = names[0]
    if name not in names:
        listed = ", ".join(names) or "none"
        raise SlmsearchError(f"no study {name!r} in {redact(url)!r} (studies there: {listed}); pass --study-name NAME")
    study = optuna.load_study(study_name=name, storage=rdb)
    stored = study.user_attrs.get(CONFIG_STUDY_ATTR)
    return LocatedStudy(study=study, url=url, config=dict(stored) if isinstance(stored, dict) else (config.to_dict() if config else {}))


class LockedTrial(NamedTuple):
    """A trial as read inside :func:`set_trial_attr_locked`: enough for ``trials.counted``."""

    number: int
    state: Any  # optuna.trial.TrialState
    user_attrs: dict[str, Any]  # only the keys the caller asked for


def set_trial_attr_locked(
    storage: Any, study_name: str, number: int, key: str, keys: tuple[str, ...],
    decide: Callable[[LockedTrial, list[LockedTrial]], Any],
) -> bool:
    """In one transaction that holds the study row's lock (the lock Optuna itself takes to number a
    new trial, so such transactions run one at a time across every worker): read the study's
    trials (number, state, the user attributes named in ``keys``), call ``decide(trial, others)``
    with trial ``number`` and the rest, and unless it returns None store its value as ``number``'s
    user attribute ``key``. True when stored; False when ``decide`` said None.

    Optuna has no public API for a read-then-write under a lock, so this is the one place that
    uses its private ``optuna.storages._rdb`` modules (``models``, ``_create_scoped_session``) and
    ``RDBStorage.scoped_session``; tests/search/test_storage.py fails when they change.
    ``storage`` is the ``RDBStorage`` that :func:`open_storage` returned.
    """
    from optuna.storages._rdb import models
    from optuna.storages._rdb.storage import _create_scoped_session
    from optuna.trial import TrialState

    study_id = storage.get_study_id_from_name(study_name)
    trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, number)
    with _create_scoped_session(storage.scoped_session) as session:
        models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
        rows = (
            session.query(models.TrialModel.trial_id, models.TrialModel.number, models.TrialModel.state)
            .filter(models.TrialModel.study_id == study_id)
            .all()
        )
        attrs: dict[int, dict[str, Any]] = {tid: {} for tid, _, _ in rows}
        for tid, name, value in (
            session.query(models.TrialUserAttributeModel.trial_id, models.TrialUserAttributeModel.key,
                          models.TrialUserAttributeModel.value_json)
            .join(models.TrialModel, models.TrialModel.trial_id == models.TrialUserAttributeModel.trial_id)
            .filter(models.TrialModel.study_id == study_id)
            .filter(models.TrialUserAttributeModel.key.in_(keys))
        ):
            attrs[tid][name] = json.loads(value)
        trials = {tid: LockedTrial(n, TrialState(state), attrs[tid]) for tid, n, state in rows}
        value = decide(trials[trial_id], [t for tid, t in trials.items() if tid != trial_id])
        if value is None:
            return False
        row = (
            session.query(models.TrialUserAttributeModel)
            .filter(models.TrialUserAttributeModel.trial_id == trial_id)
            .filter(models.TrialUserAttributeModel.key == key)
            .one_or_none()
        )
        if row is None:
            session.add(models.TrialUserAttributeModel(trial_id=trial_id, key=key, value_json=json.dumps(value)))
        else:
            row.value_json = json.dumps(value)
        return True
