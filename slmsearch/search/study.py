"""Create or resume a study and run it: the sampler, the budget check, the trial loop, the summary.

Where the study lives is :mod:`slmsearch.search.storage`; what each stored trial is, :mod:`slmsearch.search.trials`.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from slmsearch import interrupt
from slmsearch.errors import SlmsearchError
from slmsearch.search import clock
from slmsearch.search.config import RUN_KEYS, StudyConfig, changed_settings
from slmsearch.search.objective import TrialContext, run_trial
from slmsearch.search.slots import SurplusTrial, taken_slots
from slmsearch.search.space import baseline_params, most_compressed_plan
from slmsearch.search.storage import LocatedStudy, check_study_name, open_storage, redact, storage_url
from slmsearch.search.trials import (
    ANCHOR_ATTR, BASELINE_ATTR, CONFIG_STUDY_ATTR, EVALUATED, FAILED, OBJECTIVES_STUDY_ATTR, OVER_BUDGET,
    PRUNED, REJECTED, REPEAT, RUN_SEGMENTS_STUDY_ATTR, SURPLUS, counted, pareto_trials, status,
)


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
    stored = stored_config(config)
    _check_resume(study, stored)  # before anything is written to an existing study
    names = [o.metric for o in config.objectives]
    if study.metric_names != names:  # named for optuna-dashboard and trials_dataframe (new or resumed study)
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(names)
    if CONFIG_STUDY_ATTR not in study.user_attrs:
        study.set_user_attr(CONFIG_STUDY_ATTR, stored)
        study.set_user_attr(OBJECTIVES_STUDY_ATTR, names)
    _record_run_segment(study, stored)
    return study


def stored_config(config: StudyConfig) -> dict[str, Any]:
    """The config as the study stores it: JSON types, the storage URL without its password."""
    import json

    raw = config.to_dict()
    raw["storage"] = redact(raw["storage"]) if raw.get("storage") else None  # never a password
    return dict(json.loads(json.dumps(raw)))


def _check_resume(study: Any, stored: dict[str, Any]) -> None:
    """Refuse to resume a study with a setting that changes what its trials mean (the budget, the
    model, the space, the sampler, the seed...); the run settings (``config.RUN_KEYS``) may change."""
    before = study.user_attrs.get(CONFIG_STUDY_ATTR)
    if not isinstance(before, dict):
        return
    changes = [c for c in changed_settings(before, stored) if c[0].split(".")[0] not in RUN_KEYS]
    if not changes:
        return
    key, old, new = changes[0]
    more = f" (and {len(changes) - 1} more: {', '.join(c[0] for c in changes[1:])})" if len(changes) > 1 else ""
    raise SlmsearchError(
        f"study {study.study_name!r} was run with {key}={old!r}, this run asks for {key}={new!r}{more}; "
        "that changes what its trials mean: restore the setting, or start a new study with --study-name NAME"
    )


def _record_run_segment(study: Any, stored: dict[str, Any]) -> None:
    """Append a run segment (its start and its run settings) when the run settings differ from the
    last segment's, and keep the stored config's run settings current."""
    from datetime import datetime, timezone

    settings = {k: stored.get(k) for k in RUN_KEYS}
    segments = study.user_attrs.get(RUN_SEGMENTS_STUDY_ATTR)
    if not isinstance(segments, list):
        segments = []
    if segments and segments[-1].get("settings") == settings:
        return
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    study.set_user_attr(RUN_SEGMENTS_STUDY_ATTR, [*segments, {"started": started, "settings": settings}])
    before = study.user_attrs.get(CONFIG_STUDY_ATTR)
    if isinstance(before, dict) and {k: before.get(k) for k in RUN_KEYS} != settings:
        study.set_user_attr(CONFIG_STUDY_ATTR, {**before, **settings})


def optimize(config: StudyConfig, *, log: Any = print, stop_after: int | None = None) -> dict[str, Any]:
    """Run (or resume) the study until ``config.trials`` trials are evaluated; returns a summary."""
    return optimize_located(config, log=log, stop_after=stop_after)[0]


def optimize_located(config: StudyConfig, *, log: Any = print, stop_after: int | None = None) -> tuple[dict[str, Any], LocatedStudy]:
    """:func:`optimize`, also returning the study as the results commands read it, through the same
    storage handle (one per process: each handle holds its own connections)."""
    import optuna

    from slmsearch.compress.cache import StageCache
    from slmsearch.data import data_hashes, resolve_data_dir
    from slmsearch.hwmodel import estimate, load_platform
    from slmsearch.models import check_tensors, resolve_model
    from slmsearch.fsutil import ENV_CACHE, cache_dir
    from slmsearch.outputs import check_writable_dir
    from slmsearch.search.hardware import base_shape as model_base_shape, check_context

    check_study_name(config.name)  # it names runs/<name>.db: before anything is loaded or written
    data_dir = resolve_data_dir(config.data_dir)
    if data_dir is None:
        raise SlmsearchError("optimize needs the offline data folder for calibration; pass --data-dir or set SLMSEARCH_DATA_DIR")
    data_hashes(data_dir)  # every data file present and verified before anything is written
    platform = load_platform(config.platform, config.platform_overrides or None)
    location = resolve_model(config.model, trust_remote_code=config.trust_remote_code)
    check_tensors(location, trust_remote_code=config.trust_remote_code)  # before anything is written
    base_shape = model_base_shape(location)  # as deployed: 16-bit, whatever the checkpoint stores
    check_context(location, config.context_len, "context_len")
    check_writable_dir(cache_dir(), f"the cache folder (${ENV_CACHE})")  # the stage cache is written to
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
    from slmsearch.search.budget import FILTERED_CHOICES, feasible_space, within_budget

    fits = within_budget(config, base_shape)  # the default deployment (anchors; which choices can fit)
    space = feasible_space(config.space, lambda overrides: [
        most_compressed_plan(config.space, base_shape, pattern=p, overrides=overrides) for p in config.space.wanda_patterns
    ], fits)
    removed = {f: sorted(set(getattr(config.space, f)) - set(getattr(space, f)), key=str) for f, _ in FILTERED_CHOICES}
    if any(removed.values()):
        log("choices no plan fits in the budget, not sampled: "
            + "; ".join(f"{k} {v}" for k, v in removed.items() if v))
    url = storage_url(config)
    storage = open_storage(url, heartbeat_interval=config.heartbeat_s, grace_period=config.grace_s)
    study = open_study(config, storage)
    existing = study.get_trials(deepcopy=False)
    done = sum(counted(t) for t in existing)
    baseline_done = any(t.user_attrs.get(BASELINE_ATTR) and counted(t) for t in existing)
    fresh = not existing
    if fresh:
        # skip_if_exists: workers started together enqueue the baseline once (as far as timing allows).
        study.enqueue_trial(baseline_params(config.space), user_attrs={BASELINE_ATTR: True}, skip_if_exists=True)
    screen_study = None
    if config.screening.enabled:
        from slmsearch.search.screen_runner import open_screen_study

        screen_study = open_screen_study(config, storage)
    if fresh or (screen_study is not None and not screen_study.get_trials(deepcopy=False)):
        if config.anchors:
            from slmsearch.search.anchors import anchor_params, anchor_plan

            # with screening, the anchors are the first candidates screened (promoted if the proxy
            # ranks them on the front); without, the first trials evaluated
            target = screen_study if screen_study is not None else study
            for params in anchor_params(space, base_shape, fits):
                target.enqueue_trial(params, user_attrs={ANCHOR_ATTR: True}, skip_if_exists=True)
                log(f"anchor plan {'enqueued for screening' if screen_study is not None else 'enqueued'}: "
                    f"{anchor_plan(params, space, base_shape, fits).label()}")
    remaining = max(0, config.trials - done)
    n_layers = len(base_shape.layers)
    probe = clock.Probe(clock.REFERENCE_FORWARD_S, clock.REFERENCE_SEQLEN, 1.0)
    basis = "x1 (nothing left to run)"
    started = time.perf_counter()  # the timeout counts the probes too
    if remaining:
        # timing runs a forward pass and a real GPTQ stage: Ctrl-C here stops before any trial starts
        stopped = "interrupted while timing this machine, before any trial started; re-run the same command to resume"
        try:
            with interrupt.handling(on_force=lambda: stopped):
                probe = clock.probe(config, location, data_dir, space)
                interrupt.check()
        except KeyboardInterrupt:
            raise Interrupted(stopped) from None
        basis = clock.describe(probe)
    per_trial = clock.trial_seconds(config, probe, space=space, n_layers=n_layers)
    total = clock.study_seconds(config, probe, remaining, baseline_done=baseline_done, space=space, n_layers=n_layers)
    log(
        f"study {config.name!r} on {redact(url)}: {done} of {config.trials} trials done; "
        f"~{total / 60:.0f} min estimated for the {remaining} left"
        + (f" (the timeout of {config.timeout_s / 60:.0f} min ends it first)" if config.timeout_s and config.timeout_s < total else "")
        + " "
        f"(~{per_trial:.0f} s each compressed trial, screens included: the reference machine's stage costs scaled by "
        f"{basis}; re-estimated after each trial from this machine's); smallest reachable footprint {smallest:.1f} MB"
    )
    ctx = TrialContext(
        config=config, base_location=location, base_shape=base_shape, platform=platform, data_dir=data_dir,
        storage=storage, cache=StageCache(max_bytes=config.cache_bytes), log=log, space=space, screen_study=screen_study,
        formula=clock.formula(config, probe, space=space, n_layers=n_layers),
    )
    try:
        with interrupt.handling(on_force=lambda: _interrupted_message(study, ctx)):
            _run_loop(study, ctx, log=log, stop_after=stop_after, started=started, max_runs=50 * max(1, remaining))
    except KeyboardInterrupt:
        raise Interrupted(_interrupted_message(study, ctx)) from None
    summary = summarize(study, config, stage_calls=ctx.stage_calls, seconds=time.perf_counter() - started,
                        screen_study=ctx.screen_study)
    return summary, LocatedStudy(study=study, url=url, config=dict(study.user_attrs.get(CONFIG_STUDY_ATTR) or {}), storage=storage)


class Interrupted(SlmsearchError):
    """Ctrl-C during a study: the running trial is marked FAILED; the CLI exits with 130."""

    exit_code = 130


class _QuietFailureFilter(logging.Filter):
    """Optuna warns (with a traceback) about every failed trial. A surplus trial (ended on purpose,
    no work) is not news, and Ctrl-C gets its own one-line message: drop both, and the
    "failed with value None" line that follows each."""

    QUIET = (SurplusTrial.__name__, "KeyboardInterrupt")

    def __init__(self) -> None:
        super().__init__()
        self._numbers: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        match = re.match(r"Trial (\d+) failed with ", message)
        if not match:
            return True
        if any(q in message for q in self.QUIET):
            self._numbers.add(match.group(1))
            return False
        if message.startswith(f"Trial {match.group(1)} failed with value") and match.group(1) in self._numbers:
            self._numbers.discard(match.group(1))
            return False
        return True


_QUIET_FILTER = _QuietFailureFilter()


def _run_loop(study: Any, ctx: TrialContext, *, log: Any, stop_after: int | None, started: float, max_runs: int) -> None:
    """Start trials until the study holds ``config.trials`` counted trials (this worker's and others')."""
    import warnings

    import optuna
    from tqdm.auto import tqdm

    config = ctx.config
    # Optuna logs failed trials from its private module's logger (no public hook): if that name or
    # the message changes, the Ctrl-C tests in tests/search/test_slots.py see a traceback and fail.
    logging.getLogger("optuna.study._optimize").addFilter(_QUIET_FILTER)
    trials = study.get_trials(deepcopy=False)
    done = sum(counted(t) for t in trials)
    bar = tqdm(total=config.trials, initial=done, desc="trials", unit="trial", disable=done >= config.trials)
    runs = 0
    waiting_logged = False
    try:
        while True:
            interrupt.check()  # also while waiting on other workers
            trials = study.get_trials(deepcopy=False)
            bar.n = sum(counted(t) for t in trials)
            bar.refresh()
            if bar.n >= config.trials:
                break
            if config.timeout_s is not None:
                # a trial that cannot finish in the time left is not started (checked between trials)
                elapsed, upcoming = time.perf_counter() - started, _next_seconds(trials, ctx)
                if elapsed + upcoming > config.timeout_s:
                    log(f"timeout of {config.timeout_s:g} s: {elapsed:.0f} s used, and the next trial would take "
                        f"~{upcoming:.0f} s on this machine (its screens included); stopping")
                    break
            if (stop_after is not None and runs >= stop_after) or runs >= max_runs:
                break
            if taken_slots(trials) >= config.trials:
                # Other workers run the last trials. Wait for them, and fail any whose worker died
                # (heartbeat older than the grace period) so that its retry frees and takes the slot.
                if not waiting_logged:
                    log("the remaining trials all run on other workers; waiting for them to finish")
                    waiting_logged = True
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                    optuna.storages.fail_stale_trials(study)
                time.sleep(min(config.heartbeat_s, 5))
                continue
            waiting_logged = False
            interrupt.check()
            screening_s = 0.0
            if ctx.screen_study is not None and not any(t.state == optuna.trial.TrialState.WAITING for t in trials):
                from slmsearch.search.screen_runner import promote

                t0, before = time.perf_counter(), _screens_run(ctx.screen_study)
                promote(study, ctx.screen_study, ctx)
                screening_s = time.perf_counter() - t0
                ran = _screens_run(ctx.screen_study) - before
                if ran > 0:
                    ctx.measured.screens += ran
                    ctx.measured.screen_s += screening_s
            study.optimize(lambda t: run_trial(t, ctx), n_trials=1, catch=(SurplusTrial,), gc_after_trial=True)
            finished, ctx.current = ctx.current, None
            runs += 1
            if finished is not None:
                _re_estimate(study, ctx, finished, log, screening_s)
    finally:
        bar.close()


def _screens_run(screen_study: Any) -> int:
    from optuna.trial import TrialState

    return len(screen_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))


def _screens_due(trials: list[Any], ctx: TrialContext, promotions: int) -> int:
    """Screens the schedule runs before the next ``promotions`` promoted trials (0 without screening)."""
    from optuna.trial import TrialState

    from slmsearch.search.screen_runner import SCREENED_FROM_ATTR

    if ctx.screen_study is None:
        return 0
    promoted = sum(SCREENED_FROM_ATTR in t.user_attrs for t in trials)
    screened = len(ctx.screen_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    return clock.screens_due(ctx.config, promoted=promoted, screened=screened, promotions=promotions)


def _next_seconds(trials: list[Any], ctx: TrialContext) -> float:
    """This machine's seconds for the trial this worker starts next, with the screens that choose
    it: the baseline when it waits (it is first in the queue), else a compressed trial."""
    from optuna.trial import TrialState

    formula = ctx.formula or clock.Formula(0.0, 0.0, 0.0)
    waiting = [t for t in trials if t.state == TrialState.WAITING]
    if any(t.user_attrs.get(BASELINE_ATTR) for t in waiting):
        return clock.seconds_left(ctx.measured, formula, compressed=0, baseline=True, screens=0)
    screens = 0 if waiting else _screens_due(trials, ctx, promotions=1)
    return clock.seconds_left(ctx.measured, formula, compressed=1, baseline=False, screens=screens)


def _re_estimate(study: Any, ctx: TrialContext, number: int, log: Any, screening_s: float = 0.0) -> None:
    """After each trial this worker evaluated: its seconds (and the screens' that chose it), and the
    time left re-estimated from this machine's measured trials and screens (the first estimate
    came from the probes and the reference machine's stage costs)."""
    trials = study.get_trials(deepcopy=False)
    trial = next((t for t in trials if t.number == number), None)
    if trial is None or not counted(trial) or "seconds_total" not in trial.user_attrs:
        return
    seconds = float(trial.user_attrs["seconds_total"])
    ctx.measured.trials.append((bool(trial.user_attrs.get(BASELINE_ATTR)), seconds))
    remaining = max(0, ctx.config.trials - sum(counted(t) for t in trials))
    if remaining and ctx.formula is not None:
        baseline = not any(t.user_attrs.get(BASELINE_ATTR) and counted(t) for t in trials)
        compressed = remaining - int(baseline)
        left = clock.seconds_left(ctx.measured, ctx.formula, compressed=compressed, baseline=baseline,
                                  screens=_screens_due(trials, ctx, compressed))
        log(f"trial {number}: {seconds:.0f} s" + (f" (+ {screening_s:.0f} s of screening)" if screening_s >= 0.5 else "")
            + f"; ~{left / 60:.0f} min left for the {remaining} remaining (from this machine's trials and screens so far)")


def _interrupted_message(study: Any, ctx: TrialContext) -> str:
    """Make sure the trial (or screen) this worker ran is FAILED (not left RUNNING), and say so."""
    from optuna.trial import TrialState

    number, target, what = ctx.current, study, "trial"
    if number is None and ctx.current_screen is not None and ctx.screen_study is not None:
        number, target, what = ctx.current_screen, ctx.screen_study, "screen"
    if number is None:
        return "interrupted between trials; the storage is consistent; re-run the same command to resume"
    try:
        target.tell(number, state=TrialState.FAIL, skip_if_finished=True)
    except Exception:  # the storage went away too: the heartbeat check fails the trial later
        return f"interrupted; {what} {number} will be marked failed after the grace period; re-run the same command to resume"
    return f"interrupted; {what} {number} marked failed; re-run the same command to resume"


def summarize(study: Any, config: StudyConfig, *, stage_calls: list[str] | None = None, seconds: float = 0.0,
              screen_study: Any = None) -> dict[str, Any]:
    """Counts by outcome (:func:`trials.status`), the screens (when screening), and the feasible Pareto trials."""
    from optuna.trial import TrialState

    from slmsearch.search.screen_runner import PROXY_SECONDS_ATTR, SCREENED_FROM_ATTR

    statuses = [status(t) for t in study.get_trials(deepcopy=False)]
    screening: dict[str, Any] = {}
    if screen_study is not None:
        screens = screen_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        scored = [t for t in screens if PROXY_SECONDS_ATTR in t.user_attrs]
        screening = {"screens": len(screens), "screens_scored": len(scored),
                     "screen_seconds": round(sum(float(t.user_attrs[PROXY_SECONDS_ATTR]) for t in scored), 1),
                     "promoted": sum(SCREENED_FROM_ATTR in t.user_attrs for t in study.get_trials(deepcopy=False))}
    return {
        "study": config.name,
        "trials": len(statuses),
        "completed": sum(s in (EVALUATED, OVER_BUDGET) for s in statuses),  # the baseline may be over budget
        "repeats": statuses.count(REPEAT),
        "rejected_by_budget": statuses.count(REJECTED),
        "pruned": statuses.count(PRUNED),
        "failed": statuses.count(FAILED),
        "surplus": statuses.count(SURPLUS),
        **screening,
        "pareto": [t.number for t in pareto_trials(study)],
        "stage_calls": list(stage_calls or []),
        "seconds": seconds,
    }

