"""Create or resume a study and run it: storage, sampler, the budget check, the trial loop."""

from __future__ import annotations

import math
import os
import re
import time
from pathlib import Path
from typing import Any

from slmsearch.errors import SlmsearchError
from slmsearch.search.config import StudyConfig
from slmsearch.search.objective import CONSTRAINT_KEY, TrialContext, run_trial
from slmsearch.search.space import baseline_params, most_compressed_plan

ENV_RUNS = "SLMSEARCH_RUNS"
STORAGE_SCHEMES = ("sqlite", "postgresql", "postgresql+psycopg2", "mysql", "mysql+pymysql")


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


def redact(url: str) -> str:
    """A storage URL with any password replaced, safe to print."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def open_storage(url: str, *, heartbeat_interval: int = 10, grace_period: int = 30) -> Any:
    """An Optuna RDB storage with heartbeats, so that a killed worker's trial is failed and retried."""
    import warnings

    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in STORAGE_SCHEMES:
        raise SlmsearchError(
            f"storage URL scheme {scheme!r} is not supported; use sqlite:///path.db or postgresql://user@host/db"
        )
    try:
        with warnings.catch_warnings():  # heartbeats are "experimental" in optuna 5.0, and relied upon here
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return RDBStorage(
                url,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=2),
                engine_kwargs={"pool_pre_ping": True} if scheme.startswith("postgresql") else None,
            )
    except Exception as exc:  # connection refused, bad credentials, missing driver...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise SlmsearchError(f"cannot open storage {redact(url)!r} ({first}); check the URL and that the server runs") from None
    finally:
        optuna.logging.set_verbosity(optuna.logging.WARNING)


def make_sampler(config: StudyConfig) -> Any:
    import optuna

    if config.sampler == "nsga2":
        return optuna.samplers.NSGAIISampler(population_size=config.population_size, seed=config.seed)
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=config.seed, multivariate=True, n_startup_trials=4)
    return optuna.samplers.RandomSampler(seed=config.seed)


def open_study(config: StudyConfig, storage: Any) -> Any:
    """Create the study, or load it when it exists (same name, same objectives)."""
    import optuna

    study = optuna.create_study(
        study_name=config.name, storage=storage, sampler=make_sampler(config),
        directions=config.directions, load_if_exists=True,
    )
    if [d.name.lower() for d in study.directions] != config.directions:
        raise SlmsearchError(
            f"study {config.name!r} exists with other objectives; pass another --study-name or the same study file"
        )
    if "config" not in study.user_attrs:
        study.set_user_attr("config", config.to_dict())
        study.set_user_attr("objectives", [o.metric for o in config.objectives])
    return study


def counted(trial: Any) -> bool:
    """A trial that counts towards ``--trials``: evaluated (complete or pruned), not a budget rejection."""
    from optuna.trial import TrialState

    return trial.state in (TrialState.COMPLETE, TrialState.PRUNED) and "rejected" not in trial.user_attrs


def n_counted(study: Any) -> int:
    return sum(counted(t) for t in study.get_trials(deepcopy=False))


def estimate_trial_seconds(config: StudyConfig) -> float:
    """A rough wall time of one evaluated trial of the default model on 2 CPU cores (see docs)."""
    space = config.space
    gptq_share = sum(b != 16 for b in space.gptq_bits) / len(space.gptq_bits)
    eora_share = gptq_share * sum(r > 0 for r in space.eora_ranks) / len(space.eora_ranks)
    lora_share = sum(r > 0 for r in space.lora_ranks) / len(space.lora_ranks) * 0.75
    settings = config.eval_settings()
    eval_s = 1.5 * (settings.token_windows or 580) + 8 * (settings.word_pages or 62) + 0.5 * (settings.triviaqa_limit or 1900)
    return 15 + gptq_share * 60 + eora_share * 110 + lora_share * 2.5 * space.lora_steps + eval_s


def optimize(config: StudyConfig, *, log: Any = print, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) the study until ``config.trials`` trials are evaluated; returns a summary."""
    import optuna

    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import StageCache
    from slmsearch.data import resolve_data_dir
    from slmsearch.hwmodel import ModelShape, estimate, load_platform
    from slmsearch.models import resolve_model

    data_dir = resolve_data_dir(config.data_dir)
    if data_dir is None:
        raise SlmsearchError("optimize needs the offline data folder for calibration; pass --data-dir or set SLMSEARCH_DATA_DIR")
    platform = load_platform(config.platform, config.platform_overrides or None)
    location = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
    # Deployed precision of unquantized weights is 16 bit, whatever the checkpoint stores.
    base_shape = _base_shape(location, ModelShape)
    smallest = min(
        estimate(most_compressed_plan(config.space, base_shape, pattern=p).shape(base_shape), platform,
                 context_len=config.context_len).memory.total_bytes / 1e6
        for p in config.space.wanda_patterns
    )
    if smallest > config.budget_mb:
        raise SlmsearchError(
            f"budget {config.budget_mb:g} MB is below the smallest footprint this space reaches "
            f"({smallest:.2f} MB); raise --budget-mb or widen the space (more dropped layers, lower bits)"
        )
    url = storage_url(config)
    storage = open_storage(url, heartbeat_interval=config.heartbeat_s, grace_period=config.grace_s)
    study = open_study(config, storage)
    done = n_counted(study)
    if not study.get_trials(deepcopy=False):
        study.enqueue_trial(baseline_params(config.space), user_attrs={"baseline": True})
    per_trial = estimate_trial_seconds(config)
    remaining = max(0, config.trials - done)
    log(
        f"study {config.name!r} on {redact(url)}: {done} of {config.trials} trials done; "
        f"~{per_trial * remaining / 60:.0f} min estimated for the {remaining} left "
        f"(~{per_trial:.0f} s each on 2 CPU cores); smallest reachable footprint {smallest:.1f} MB"
    )
    ctx = TrialContext(
        config=config, base_location=location, base_shape=base_shape, platform=platform, data_dir=data_dir,
        calib=config.calib_settings() if config.calibration else CalibSettings(),
        eval_settings=config.eval_settings(), cache=StageCache(max_bytes=int(config.cache_gb * 1e9)), log=log,
    )
    started = time.perf_counter()
    max_total = len(study.get_trials(deepcopy=False)) + 50 * max(1, remaining)
    from tqdm.auto import tqdm

    bar = tqdm(total=config.trials, initial=done, desc="trials", unit="trial", disable=remaining == 0)
    runs = 0
    while n_counted(study) < config.trials and len(study.get_trials(deepcopy=False)) < max_total:
        if config.timeout_s is not None and time.perf_counter() - started > config.timeout_s:
            log(f"timeout of {config.timeout_s:g} s reached")
            break
        if stop_after is not None and runs >= stop_after:
            break
        study.optimize(lambda t: run_trial(t, ctx), n_trials=1, catch=(), gc_after_trial=True)
        runs += 1
        bar.n = n_counted(study)
        bar.refresh()
    bar.close()
    return summarize(study, config, stage_calls=ctx.stage_calls, seconds=time.perf_counter() - started)


def _base_shape(location: str, shape_cls: Any) -> Any:
    """The base model's shape from its config: every weight dense and 16-bit, as deployed."""
    path = Path(location)
    if path.is_dir():
        import json

        return shape_cls.from_hf_config(json.loads((path / "config.json").read_text()))
    from transformers import AutoConfig

    return shape_cls.from_hf_config(AutoConfig.from_pretrained(location).to_dict())


def summarize(study: Any, config: StudyConfig, *, stage_calls: list[str] | None = None, seconds: float = 0.0) -> dict[str, Any]:
    """Counts by outcome and the feasible Pareto trials."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    rejected = [t for t in trials if "rejected" in t.user_attrs]
    return {
        "study": config.name,
        "trials": len(trials),
        "completed": sum(t.state == TrialState.COMPLETE and "rejected" not in t.user_attrs for t in trials),
        "rejected_by_budget": len(rejected),
        "pruned": sum(t.state == TrialState.PRUNED for t in trials),
        "failed": sum(t.state == TrialState.FAIL for t in trials),
        "pareto": [t.number for t in pareto_trials(study)],
        "stage_calls": list(stage_calls or []),
        "seconds": seconds,
    }


def pareto_trials(study: Any) -> list[Any]:
    """Feasible, evaluated trials that no other such trial dominates."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState

    feasible = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if "rejected" not in t.user_attrs and all(c <= 0 for c in t.constraints.values())
        and t.values is not None and all(math.isfinite(v) for v in t.values)
    ]
    signs = [1.0 if d == StudyDirection.MINIMIZE else -1.0 for d in study.directions]

    def dominates(a: Any, b: Any) -> bool:
        av = [s * v for s, v in zip(signs, a.values)]
        bv = [s * v for s, v in zip(signs, b.values)]
        return all(x <= y for x, y in zip(av, bv)) and any(x < y for x, y in zip(av, bv))

    return [t for t in feasible if not any(dominates(o, t) for o in feasible if o is not t)]
