"""Screening in a study's storage: the companion study of proxy scores, and the promotion of a
screened candidate to the next full trial (the choice itself: :mod:`slmsearch.search.screening`).

The screens live in their own Optuna study, ``<name>:screen``, in the study's storage: objectives
the proxy perplexity (corrected by :data:`screening.PRIOR`, so its sampler sees widths on one
scale) and the study's hardware objectives. Its sampler is the study's kind, so it learns which
regions the proxy finds good; a plan screened again is answered from its first screen. A promoted
candidate is enqueued in the user's study with its parameters, so the full trial samples exactly
its plan. Everything is in the storage: a resumed study (after Ctrl-C or kill -9) finds its screens
and refits the correction from its evaluated trials; nothing finished is recomputed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from typing import Any

from slmsearch.search.trials import (
    BASELINE_ATTR, BASELINE_PPL_STUDY_ATTR, EARLY_PPL_ATTR, FAILED, PLAN_ATTR, REPEAT_ATTR, SCREEN_SUFFIX, counted, status,
)

PROXY_PPL_ATTR = "proxy_token_ppl"  # a screen's proxy perplexity; on a promoted trial, its candidate's
PROXY_SECONDS_ATTR = "proxy_seconds"
SCREENED_FROM_ATTR = "screened_from"  # on a promoted trial: the number of the screen it came from
PREDICTED_ATTR = "predicted_early_ppl"  # on a promoted trial: the corrected proxy the choice used
PROXY_KEY_ATTR = "proxy_key"  # on a screen: what its proxy scored (the plan without LoRA and EoRA)


def screen_study_name(name: str) -> str:
    return f"{name}{SCREEN_SUFFIX}"


def hw_objectives(config: Any) -> list[Any]:
    from slmsearch.search.config import HW_OBJECTIVES

    return [o for o in config.objectives if o.metric in HW_OBJECTIVES]


def open_screen_study(config: Any, storage: Any) -> Any:
    import optuna

    from slmsearch.search.study import make_sampler

    directions = ["minimize"] + [o.direction for o in hw_objectives(config)]
    return optuna.create_study(study_name=screen_study_name(config.name), storage=storage, sampler=make_sampler(config),
                               directions=directions, load_if_exists=True)


def _identity(attrs: dict[str, Any]) -> str:
    import json

    return json.dumps([attrs.get(PLAN_ATTR), attrs.get("deployment")], sort_keys=True)


def _proxy_identity(plan: dict[str, Any], deployment: Any) -> str:
    """What the proxy scores of a plan: its stages without LoRA and EoRA (and its deployment)."""
    import json

    from slmsearch.compress.proxy import RECOVERY

    stages = [st for st in plan.get("stages", []) if st.get("stage") not in RECOVERY]
    return json.dumps([stages, deployment], sort_keys=True)


def _costs(attrs: dict[str, Any], config: Any) -> tuple[float, ...]:
    return tuple(float(attrs[o.metric]) * (1 if o.direction == "minimize" else -1) for o in hw_objectives(config))


def run_screen(trial: Any, ctx: Any) -> tuple[float, ...]:
    """One screen: sample a plan as a full trial would (budget placement included), price it on the
    hardware model, score its proxy (or copy an earlier screen of the same plan)."""
    from optuna.trial import TrialState

    from slmsearch.compress.proxy import score_plan
    from slmsearch.search import screening
    from slmsearch.search.objective import sample_and_price

    config = ctx.config
    ctx.current_screen = trial.number
    plan, hw = sample_and_price(trial, ctx, ranges=False)
    mine = _identity(trial.user_attrs)
    # the proxy leaves LoRA and EoRA out: plans that differ only in them share one proxy score
    scored_as = _proxy_identity(plan.to_dict(), trial.user_attrs.get("deployment"))
    trial.set_user_attr(PROXY_KEY_ATTR, scored_as)
    earlier = next((t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                    if t.user_attrs.get(PROXY_KEY_ATTR) == scored_as and PROXY_PPL_ATTR in t.user_attrs), None)
    if earlier is not None:
        ppl = float(earlier.user_attrs[PROXY_PPL_ATTR])
        trial.set_user_attr(REPEAT_ATTR, earlier.number)
    else:
        windows = config.screening.windows or config.pruning.first_windows
        score = score_plan(plan, ctx.base_location, ctx.data_dir, config.calibration,
                           cache=ctx.cache, seqlen=config.evaluation.token_seqlen, windows=windows,
                           batch_size=config.evaluation.batch_size)
        ppl = score.token_ppl
        trial.set_user_attr(PROXY_SECONDS_ATTR, score.seconds)
        ctx.log(f"screen {trial.number}: {plan.label()} ({hw['footprint_mb']:.1f} MB): proxy token ppl {ppl:.1f} "
                f"({score.seconds:.0f} s)")
    trial.set_user_attr(PROXY_PPL_ATTR, ppl)
    point = _point(mine, ppl, plan.to_dict(), (), n_layers=base_layers(ctx.base_location))
    prior = screening.predicted_ppl(point, screening.PRIOR) if math.isfinite(ppl) else float("inf")
    return (min(prior, 1e30), *(float(hw[o.metric]) for o in hw_objectives(config)))


def screen(screen_study: Any, ctx: Any, count: int, study: Any = None) -> int:
    """Run ``count`` more screens (each ends COMPLETE, or FAILED if it raised); returns how many ran.
    With the user's ``study`` given, ``screening.neighbour_share`` of them are one-step neighbours
    of the predicted front (:func:`front_neighbours`), the rest the sampler's proposals."""
    from slmsearch import interrupt

    local = math.ceil(ctx.config.screening.neighbour_share * count) if study is not None else 0
    ran = 0
    for i in range(count):
        interrupt.check()  # Ctrl-C between screens stops here (a screen takes seconds)
        if i < local:
            params = next(front_neighbours(study, screen_study, ctx), None)
            if params is not None:
                screen_study.enqueue_trial(params, skip_if_exists=True)
        # a screen that raises ends FAILED and the search goes on (Optuna logs it); the plan, if
        # promoted later, meets the same error in its full trial, which reports it
        screen_study.optimize(lambda t: run_screen(t, ctx), n_trials=1, gc_after_trial=True, catch=(Exception,))
        ctx.current_screen = None  # finished (COMPLETE or FAILED): nothing for a Ctrl-C to fail
        ran += 1
    return ran


def param_choices(distribution: Any) -> list[Any]:
    """A parameter's values in order, for a step to a neighbour: a categorical's choices (sorted
    when they are numbers), a stepped float's or an int's grid; [] for a continuous float."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    if isinstance(distribution, CategoricalDistribution):
        values = list(distribution.choices)
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        return sorted(values) if numeric else values
    if isinstance(distribution, IntDistribution) and not distribution.log:
        return list(range(distribution.low, distribution.high + 1, distribution.step))
    if isinstance(distribution, FloatDistribution) and distribution.step:
        n = int(round((distribution.high - distribution.low) / distribution.step))
        return [round(distribution.low + i * distribution.step, 10) for i in range(n + 1)]
    return []


def front_neighbours(study: Any, screen_study: Any, ctx: Any) -> Iterator[dict[str, Any]]:
    """Parameters one step from the plans on the predicted front (the evaluated trials at their
    measured perplexity, the candidates at their corrected proxy), best predicted first, that no
    screen has sampled or is waiting to sample; lazily, as the runner takes only the first."""
    from slmsearch.search import screening

    config = ctx.config
    n_layers = base_layers(ctx.base_location)
    evaluated = evaluated_points(study, config, n_layers)
    pool = candidates(screen_study, study, config, n_layers)
    sources: dict[str, Any] = {key: t for key, (t, _) in pool.items()}
    for t in study.get_trials(deepcopy=False):
        if PLAN_ATTR in t.user_attrs and t.params:
            sources.setdefault(_identity(t.user_attrs), t)
    seen = [t.params for t in screen_study.get_trials(deepcopy=False)]  # every state, WAITING included
    for point in screening.predicted_front([p for _, p in pool.values()], evaluated, screening.fit_correction(evaluated)):
        source = sources.get(point.key)
        if source is None:
            continue
        choices = {name: param_choices(d) for name, d in source.distributions.items()}
        for params in screening.step_neighbours(dict(source.params), choices):
            if params not in seen:
                seen.append(params)
                yield params


def base_layers(location: str) -> int | None:
    """The decoder layers of the study's model (its config.json), or None when it cannot be read."""
    from slmsearch.models import model_config

    try:
        return int(model_config(location)["num_hidden_layers"])
    except Exception:  # a weighting only: without it each GPTQ width counts whole
        return None


def _point(key: str, ppl: float, plan: dict[str, Any], costs: tuple[float, ...], *, n_layers: int | None,
           proxy_ppl: float | None = None) -> Any:
    from slmsearch.search import screening

    features, weights = screening.weighted_features(plan, n_layers)
    return screening.Point(key=key, ppl=ppl, features=features, weights=weights, costs=costs, proxy_ppl=proxy_ppl,
                           family=_family(plan))


def _family(plan: dict[str, Any]) -> str:
    """Plans that differ only in the KV cache's stage share a family (the proxy rounds the cache
    as the full evaluation does): the plan's other stages."""
    import json

    from slmsearch.compress.kvcache import KvCacheQuant

    return json.dumps([st for st in plan.get("stages", []) if st.get("stage") != KvCacheQuant.kind], sort_keys=True)


def evaluated_points(study: Any, config: Any, n_layers: int | None = None) -> list[Any]:
    """The study's evaluated compressed trials as the chooser sees them (measured early ppl)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if attrs.get(BASELINE_ATTR) or EARLY_PPL_ATTR not in attrs or not counted(t) or attrs.get(REPEAT_ATTR) is not None:
            continue
        if float(attrs.get("footprint_mb", math.inf)) > config.budget_mb:
            continue
        proxy = attrs.get(PROXY_PPL_ATTR)
        out.append(_point(_identity(attrs), float(attrs[EARLY_PPL_ATTR]), attrs.get(PLAN_ATTR) or {}, _costs(attrs, config),
                          n_layers=n_layers, proxy_ppl=float(proxy) if proxy is not None else None))
    return out


def candidates(screen_study: Any, study: Any, config: Any, n_layers: int | None = None) -> dict[str, tuple[Any, Any]]:
    """Screened plans no trial of the study holds yet (waiting, running or finished): identity ->
    (screen trial, chooser point)."""
    from optuna.trial import TrialState

    from slmsearch.search import screening

    live = [t for t in study.get_trials(deepcopy=False) if status(t) != FAILED]
    taken = {_identity(t.user_attrs) for t in live if PLAN_ATTR in t.user_attrs}
    promoted = {t.user_attrs[SCREENED_FROM_ATTR] for t in live if SCREENED_FROM_ATTR in t.user_attrs}
    out: dict[str, tuple[Any, Any]] = {}
    for t in screen_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        key = _identity(t.user_attrs)
        if key in taken or key in out or t.number in promoted or PROXY_PPL_ATTR not in t.user_attrs:
            continue
        ppl = float(t.user_attrs[PROXY_PPL_ATTR])
        out[key] = (t, _point(key, ppl, t.user_attrs.get(PLAN_ATTR) or {}, _costs(t.user_attrs, config), n_layers=n_layers))
    return out


def pruning_limit(baseline_ppl: float | None, evaluated: list[Any], pruning: Any) -> float | None:
    """The early perplexity over which a full trial would be pruned now (``objective.prune_reason``:
    ``max_baseline_ratio`` x the baseline, ``max_ppl_ratio`` x the best evaluated within the limit):
    a candidate predicted over it is not promoted."""
    limits = []
    if baseline_ppl:
        limits.append(pruning.max_baseline_ratio * baseline_ppl)
    kept = [p.ppl for p in evaluated if math.isfinite(p.ppl) and (not limits or p.ppl <= limits[0])]
    if kept:
        limits.append(pruning.max_ppl_ratio * min(kept))
    return min(limits) if limits else None


def promote(study: Any, screen_study: Any, ctx: Any) -> bool:
    """Screen what the schedule asks for, choose a candidate and enqueue it in ``study``; False when
    nothing is left to promote (the caller then lets the sampler propose)."""
    from optuna.trial import TrialState

    from slmsearch.search import screening
    from slmsearch.search.clock import screens_due

    config = ctx.config
    settings = config.screening
    start = time.perf_counter()
    done = len(screen_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    promoted = sum(1 for t in study.get_trials(deepcopy=False) if SCREENED_FROM_ATTR in t.user_attrs)
    missing = screens_due(config, promoted=promoted, screened=done, promotions=1)  # the schedule, one place
    if missing:
        screen(screen_study, ctx, missing, study)
    n_layers = base_layers(ctx.base_location)
    evaluated = evaluated_points(study, config, n_layers)
    theta = screening.fit_correction(evaluated)
    broken = pruning_limit(study.user_attrs.get(BASELINE_PPL_STUDY_ATTR) or ctx.baseline_first_ppl, evaluated,
                           config.pruning)
    choice = None
    pool: dict[str, tuple[Any, Any]] = {}
    for round_ in range(settings.extra_rounds + 1):
        pool = candidates(screen_study, study, config, n_layers)
        choice = screening.choose([p for _, p in pool.values()], evaluated, theta, broken_ppl=broken,
                                  prune_ratio=config.pruning.max_ppl_ratio)
        if choice is not None or round_ == settings.extra_rounds or settings.per_trial == 0:
            break
        screen(screen_study, ctx, settings.per_trial, study)
    if choice is None:
        choice = screening.fallback([p for _, p in pool.values()], theta, broken_ppl=broken, evaluated=evaluated)
        if choice is None:
            ctx.log("screening: no screened candidate left that is not predicted broken; the sampler proposes the next trial")
            return False
    source, point = pool[choice.key]
    predicted = screening.predicted_ppl(point, theta, screening.family_residuals(evaluated))
    study.enqueue_trial(dict(source.params), user_attrs={
        SCREENED_FROM_ATTR: source.number, PROXY_PPL_ATTR: point.ppl, PREDICTED_ATTR: predicted,
        "correction": {k: round(v, 4) for k, v in theta.items()},
    })
    ctx.log(f"screening: promoted screen {source.number} (proxy ppl {point.ppl:.1f}, predicted {predicted:.1f}; "
            f"{len(pool)} candidates, {time.perf_counter() - start:.0f} s of screening)")
    return True
