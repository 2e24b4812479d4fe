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
# Each accepted scheme -> (the SQLAlchemy URL scheme it is opened with, the driver module that needs).
# SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3 and ``mysql://`` to mysqlclient; the
# drivers used are psycopg2 (pinned in requirements.lock) and PyMySQL (when installed), so bare schemes
# are rewritten here.
STORAGE_DRIVERS: dict[str, tuple[str, str]] = {
    "sqlite": ("sqlite", "sqlite3"),
    "postgresql": ("postgresql+psycopg2", "psycopg2"),
    "postgres": ("postgresql+psycopg2", "psycopg2"),
    "postgresql+psycopg2": ("postgresql+psycopg2", "psycopg2"),
    "mysql": ("mysql+pymysql", "pymysql"),
    "mysql+pymysql": ("mysql+pymysql", "pymysql"),
}
STORAGE_SCHEMES = tuple(STORAGE_DRIVERS)
_DRIVER_PACKAGES = {"psycopg2": "psycopg2-binary", "pymysql": "PyMySQL", "sqlite3": "sqlite3 (Python's own)"}
_SCHEMA_RACE = re.compile(r"already exists|duplicate key|UniqueViolation|IntegrityError|deadlock", re.IGNORECASE)
_PASSWORD_KEYS = ("password", "passwd", "pwd")


def runs_dir() -> Path:
    """Where default study databases and outputs go: ``$SLMSEARCH_RUNS`` or ``./runs``."""
    path = Path(os.environ.get(ENV_RUNS) or "runs")
    path.mkdir(parents=True, exist_ok=True)
    return path


_STUDY_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def check_study_name(name: object) -> str:
    """``name`` when it is a file name (letters, digits, ``-``, ``_``, ``.``; no leading dot, no
    separator; at most 128 characters): it names ``runs/<name>.db`` and output folders."""
    if not isinstance(name, str) or not _STUDY_NAME.fullmatch(name):
        raise SlmsearchError(
            f"study name {name!r} is not a file name; use letters, digits, '-', '_' and '.' "
            "(not first), e.g. --study-name my-study-2"
        )
    return name


def storage_url(config: StudyConfig) -> str:
    """The study's storage URL (default: a SQLite file named after the study in the runs folder)."""
    check_study_name(config.name)
    if config.storage:
        return config.storage
    return f"sqlite:///{(runs_dir() / f'{config.name}.db').resolve()}"


def sqlite_path(url: str) -> Path | None:
    """The database file of a ``sqlite:///`` URL (None for other schemes and in-memory SQLite)."""
    if not url.startswith("sqlite:///"):
        return None
    raw = url[len("sqlite:///"):]
    return None if raw in ("", ":memory:") else Path(raw)


# The start of a URL as SQLAlchemy's ``make_url`` splits it (sqlalchemy/engine/url.py, _parse_url):
# scheme, user, ``:``, password, ``@``; SQLAlchemy ends the password at the first ``@``, redaction at
# the last one, so that a password holding a raw ``@`` (not URL-encoded) is hidden whole too.
_USERINFO = re.compile(r"(?P<head>[\w+]+://[^:/@]*:)(?P<password>.*)(?P<at>@)")
_QUERY_PASSWORD = re.compile(r"([?&](?:password|passwd|pwd)=)[^&#\s]*", re.IGNORECASE)
_URL_IN_TEXT = re.compile(r"[A-Za-z][\w+.-]*://[^\s'\"<>`]+")


def redact(url: str) -> str:
    """A storage URL with its password replaced by ``***``, safe to print or store; the rest kept
    as written.

    The password is the field SQLAlchemy reads as the password (its own split of the URL), so it
    is replaced whatever it holds (``pa%3Fss``, ``p%23ss``, ``p%40ss``, or even a raw ``?`` or ``#``);
    ``password=``/``passwd=``/``pwd=`` query values are replaced too.
    """
    match = _USERINFO.match(url)
    if match is not None and match.group("password"):
        url = f"{match.group('head')}***{match.group('at')}{url[match.end():]}"
    return _QUERY_PASSWORD.sub(r"\1***", url)


def _secrets(url: str) -> list[str]:
    """The password strings in a storage URL, as SQLAlchemy decodes them and as written."""
    from urllib.parse import parse_qsl, quote, unquote

    found: list[str] = []
    try:
        from sqlalchemy.engine import make_url

        parsed = make_url(url)
        if parsed.password:
            found.append(str(parsed.password))
        found += [str(v) for k, v in parsed.query.items() if k.lower() in _PASSWORD_KEYS and isinstance(v, str)]
    except Exception:
        match = _USERINFO.match(url)
        if match and match.group("password"):
            found.append(match.group("password"))
        if "?" in url:
            found += [v for k, v in parse_qsl(url.split("?", 1)[1]) if k.lower() in _PASSWORD_KEYS]
    variants = {v for f in found for v in (f, unquote(f), quote(f, safe=""))}
    return sorted((s for s in variants if s), key=len, reverse=True)


def scrub(text: str, url: str) -> str:
    """``text`` (a driver's message) with the URL's password replaced by ``***``: every URL in it
    redacted (:func:`redact`), and the password (as written and decoded) wherever it stands as a
    whole word, never inside another word (password ``im``: "import" stays "import")."""
    text = text.replace(url, redact(url))
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    for secret in _secrets(url):
        esc = re.escape(secret)
        text = re.sub(rf"(?<![A-Za-z0-9]){esc}(?![A-Za-z0-9])", "***", text)
    return text


def engine_url(url: str) -> str:
    """The SQLAlchemy URL that opens the storage ``url``: the scheme checked and rewritten to the
    installed driver (``postgresql://`` -> ``postgresql+psycopg2://``). Every opening of a storage
    URL goes through here; the result holds the password, so it is never printed."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in STORAGE_DRIVERS:
        raise SlmsearchError(
            f"storage URL scheme {scheme.lower() if sep else ''!r} is not supported; use sqlite:///path.db or "
            "postgresql://user@host/db"
        )
    dialect, driver = STORAGE_DRIVERS[scheme.lower()]
    if importlib.util.find_spec(driver) is None:
        raise SlmsearchError(
            f"storage scheme {scheme!r} needs the driver module {driver!r}, which is not installed; "
            f"pip install {_DRIVER_PACKAGES.get(driver, driver)}"
        )
    return f"{dialect}://{rest}"


def open_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int = 30) -> Any:
    """An Optuna RDB storage with heartbeats, so that a killed worker's trial is failed and retried.

    Open it once per process and pass the handle on: each handle holds its own connection pool."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    engine = engine_url(url)
    engine_kwargs = None
    if engine.startswith("postgresql"):  # fail fast on an unreachable host instead of the TCP timeout
        engine_kwargs = {"pool_pre_ping": True, "connect_args": {"connect_timeout": 10}}
    try:
        for attempt in range(6):
            try:
                with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5.0, and relied upon here
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    return RDBStorage(
                        engine,
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
    storage: Any = None  # the RDBStorage it was read through (one per process: reuse it)

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
    from slmsearch.search.trials import SCREEN_SUFFIX

    every = [s.study_name for s in optuna.get_all_study_summaries(rdb, include_best_trial=False)]
    names = [n for n in every if not n.endswith(SCREEN_SUFFIX)]  # a study's screens are not a study to read
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
    return LocatedStudy(study=study, url=url, config=dict(stored) if isinstance(stored, dict) else (config.to_dict() if config else {}),
                        storage=rdb)


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
