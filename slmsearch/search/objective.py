"""One trial: sample a plan, check the budget on the hardware model, compress, evaluate (staged).

Everything a trial measures lands in its user attributes: the plan, the memory breakdown and
placement, latency and energy, per-stage wall times and cache hits, and every quality metric.
"""

from __future__ import annotations

import math
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmsearch import interrupt
from slmsearch.compress.plan import Plan
from slmsearch.search.clock import Formula, Measured
from slmsearch.search.config import StudyConfig
from slmsearch.search.slots import SurplusTrial, claim_slot
from slmsearch.search.space import suggest_deployment, suggest_plan
from slmsearch.search.trials import (
    BASELINE_ATTR, BASELINE_PPL_STUDY_ATTR, CACHE_HITS_ATTR, CONSTRAINT_KEY, EARLY_PPL_ATTR, EVAL_COUNTS_ATTR,
    EVAL_SECONDS_ATTR, OVER_BUDGET_ATTR, PLAN_ATTR, REJECTED_ATTR, REPEAT_ATTR, SLOT_ATTR, STAGE_SECONDS_ATTR, SURPLUS_ATTR, WORKER_ATTR,
    counted, feasible_evaluated,
)

# How a plan over the budget ends: PRUNED, with its constraint (footprint minus budget, > 0) and
# its hardware attributes, and no objective values: nothing was measured, so nothing is made up.
# Read from the installed optuna 5.0 / optuna-dashboard 0.21 source:
# - TPESampler reads COMPLETE and PRUNED trials and puts any trial whose constraint is > 0 among
#   the infeasible ones before it looks at the state (tpe/sampler.py `_split_trials`), ranked by
#   violation after every feasible trial: it still learns that the region is infeasible.
# - NSGAIISampler builds its populations from COMPLETE trials only, so a rejection takes no place
#   in a generation and is never a parent; it is not misled (as a COMPLETE trial it only ever
#   ranked last, and filled population slots with values nobody measured).
# - optuna-dashboard lists as "best trials" the Pareto front of all COMPLETE trials, constraints
#   ignored (_pareto_front.py); its plots and importances use the values of COMPLETE trials.
# The uncompressed baseline over the budget is evaluated all the same (it is the pruning
# reference) and, for the dashboard's sake, ends PRUNED too, its metrics in its user attributes:
# trials.status() reads it back as OVER_BUDGET and counted() counts it.
# Which process ran a trial (host:pid), for studies shared by many workers.
WORKER = f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class TrialContext:
    """What every trial of one process shares (built once by :func:`slmsearch.search.study.optimize`)."""

    config: StudyConfig
    base_location: str
    base_shape: Any
    platform: Any
    data_dir: Path
    cache: Any
    storage: Any = None  # the study's RDBStorage, for slot claims (None: one process, in memory)
    log: Any = print
    stage_calls: list[str] = field(default_factory=list)  # every stage the pipeline ran (tests count it)
    baseline_first_ppl: float | None = None
    current: int | None = None  # number of the trial running now, for Ctrl-C
    current_screen: int | None = None  # number of the screen running now (in screen_study), for Ctrl-C
    formula: Formula | None = None  # this machine's seconds per trial and screen before one was measured (search/clock.py)
    space: Any = None  # config.space without the choices no plan can hold in the budget (search.budget)
    measured: Measured = field(default_factory=Measured)  # this worker's trials' and screens' seconds (the re-estimates)
    screen_study: Any = None  # the companion study of proxy screens (search/screen_runner.py), when screening

    def sampled_space(self) -> Any:
        return self.space if self.space is not None else self.config.space

    def fits(self, deployment: Any) -> Callable[[Any], bool]:
        """``fits(plan) -> bool``: the plan's deployed footprint is within the budget."""
        from slmsearch.search.budget import within_budget

        return within_budget(self.config, self.base_shape, deployment)


def hardware_attrs(estimate: Any, ranges: dict[str, Any] | None = None) -> dict[str, Any]:
    """The hardware model's numbers as flat, JSON-able trial attributes; ``ranges`` (from
    ``hwmodel.sensitivity.estimate_range``) adds decode_latency_s_range / energy_per_token_j_range."""
    decode = estimate.decode
    out = {
        "footprint_mb": estimate.memory.total_bytes / 1e6,
        "memory_bytes": dict(estimate.memory.by_kind),
        "placement": dict(estimate.placement),  # weight group -> memory level
        "decode_latency_s": decode.latency_s,  # last step of a generation to context_len: the worst case
        "decode_avg_latency_s": estimate.decode_avg_latency_s,
        "tokens_per_s": decode.tokens_per_s,
        "energy_per_token_j": decode.energy_j_per_token,
        "deployment": estimate.deployment.to_dict(),
    }
    if estimate.prefill is not None:
        out["prefill_latency_s"] = estimate.prefill.latency_s
    for key, pair in (ranges or {}).items():
        out[key] = [float(pair[0]), float(pair[1])]
    return out


class Pruned(Exception):
    """Raised inside the staged evaluation when the early perplexity is hopeless."""


def sample_and_price(trial: Any, ctx: TrialContext, *, ranges: bool = True) -> tuple[Plan, dict[str, Any]]:
    """The trial's deployment and plan (sampled within the budget; the baseline's is empty) and its
    hardware attributes (with latency/energy ranges when ``ranges``), both recorded on the trial.
    A full trial and a screen (``search/screen_runner.py``) sample and price a plan this way."""
    from slmsearch.hwmodel import estimate
    from slmsearch.hwmodel.deployment import Deployment
    from slmsearch.hwmodel.sensitivity import estimate_range

    config = ctx.config
    dep = Deployment(**suggest_deployment(trial, config.space))
    if trial.user_attrs.get(BASELINE_ATTR):
        plan = Plan(())  # the uncompressed reference: nothing to sample
    else:
        plan = suggest_plan(trial, ctx.sampled_space(), ctx.base_shape, fits=ctx.fits(dep))
    trial.set_user_attr(PLAN_ATTR, plan.to_dict())
    shape = plan.shape(ctx.base_shape)
    est = estimate(shape, ctx.platform, context_len=config.context_len, prefill_len=config.prefill_len, deployment=dep)
    spread = estimate_range(shape, ctx.platform, context_len=config.context_len, deployment=dep) if ranges else None
    hw = hardware_attrs(est, spread)
    for key, value in hw.items():
        trial.set_user_attr(key, value)
    return plan, hw


def run_trial(trial: Any, ctx: TrialContext) -> tuple[float, ...]:
    """The objective: returns one value per ``ctx.config.objectives``."""
    import optuna

    from slmsearch.compress import pipeline

    config = ctx.config
    ctx.current = trial.number
    trial.set_user_attr(WORKER_ATTR, WORKER)
    start = time.perf_counter()
    plan, hw = sample_and_price(trial, ctx)
    over = hw["footprint_mb"] - config.budget_mb
    with warnings.catch_warnings():  # a retried trial inherits its (identical) constraint: optuna warns, keeps it
        warnings.filterwarnings("ignore", message="The constraint value is ignored")
        trial.set_constraint(CONSTRAINT_KEY, over)
    over_reason = f"footprint {hw['footprint_mb']:.2f} MB > budget {config.budget_mb:g} MB"
    if over > 0 and trial.user_attrs.get(BASELINE_ATTR):
        # The uncompressed reference is evaluated whatever its size (pruning compares every trial
        # with it); the constraint keeps it out of the feasible Pareto set.
        trial.set_user_attr(OVER_BUDGET_ATTR, over_reason)
    elif over > 0:
        trial.set_user_attr(REJECTED_ATTR, over_reason)
        trial.set_user_attr("seconds_total", time.perf_counter() - start)
        ctx.log(f"trial {trial.number}: rejected before compression ({over_reason})")
        raise optuna.TrialPruned(f"over budget, not evaluated: {over_reason}")  # see the note at the top

    twin = find_twin(trial.study, trial.user_attrs[PLAN_ATTR], trial.number, hw["deployment"])
    if twin is not None:
        return answer_from_twin(trial, twin, ctx, start)

    if not claim_slot(trial, config.trials, ctx.storage):
        # Other workers already run or finished the last trials: end without work, not counted.
        trial.set_user_attr(SURPLUS_ATTR, f"all {config.trials} trials were taken when it started")
        raise SurplusTrial(f"trial {trial.number}: all {config.trials} trials taken by other workers")
    ctx.log(f"trial {trial.number}: {plan.label()} ({hw['footprint_mb']:.1f} MB)")
    result = pipeline.run(plan, ctx.base_location, ctx.data_dir, config.calibration, cache=ctx.cache, progress=True)
    kinds = [stage.kind for stage in plan.effective().stages]
    ctx.stage_calls.extend(kinds[result.cache_hits :])
    trial.set_user_attr(STAGE_SECONDS_ATTR, result.stage_seconds)
    trial.set_user_attr(CACHE_HITS_ATTR, kinds[: result.cache_hits])
    trial.set_user_attr("stage_reports", [r.to_dict() for r in result.reports])
    metrics = evaluate_staged(trial, ctx, result.checkpoint_dir)
    for key, value in metrics.items():
        trial.set_user_attr(key, value)
    trial.set_user_attr("seconds_total", time.perf_counter() - start)
    if "pruned" in metrics:
        raise optuna.TrialPruned(metrics["pruned"])
    if over > 0:  # the evaluated baseline over budget: measured, kept off the dashboard's best trials
        raise optuna.TrialPruned(f"evaluated, over budget: {over_reason}")
    values = {**metrics, **hw}
    return tuple(float(values[o.metric]) for o in config.objectives)


# What a repeat does not copy from its twin: what belongs to the run, not to the plan.
_RUN_ATTRS = frozenset({WORKER_ATTR, PLAN_ATTR, SLOT_ATTR, BASELINE_ATTR, "seconds_total", STAGE_SECONDS_ATTR, CACHE_HITS_ATTR,
                        "stage_reports"})


def find_twin(study: Any, plan: dict[str, Any], number: int, deployment: dict[str, Any] | None = None) -> Any | None:
    """An earlier evaluated trial (complete or pruned) of exactly this plan, if the study has one
    (and, when ``deployment`` is given, deployed the same way: its hardware objectives differ)."""
    from optuna.trial import TrialState

    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED)):
        if t.number != number and t.user_attrs.get(PLAN_ATTR) == plan and counted(t):
            if deployment is not None and t.user_attrs.get("deployment", deployment) != deployment:
                continue
            return t
    return None


def answer_from_twin(trial: Any, twin: Any, ctx: TrialContext, start: float) -> tuple[float, ...]:
    """A plan sampled again: compression and evaluation are deterministic, so the earlier trial's
    results are this trial's. Copied without work, marked ``repeat_of``, not counted (samplers
    still learn from it)."""
    import optuna

    for key, value in twin.user_attrs.items():
        if key not in _RUN_ATTRS and key not in trial.user_attrs:
            trial.set_user_attr(key, value)
    trial.set_user_attr(REPEAT_ATTR, twin.number)
    trial.set_user_attr("seconds_total", time.perf_counter() - start)
    ctx.log(f"trial {trial.number}: same plan as trial {twin.number}, answered from it")
    if twin.values is None:  # the twin was pruned
        raise optuna.TrialPruned(f"same plan as trial {twin.number} (pruned)")
    return tuple(twin.values)


def best_feasible_early_ppl(study: Any, number: int) -> float | None:
    """The lowest early token perplexity among the study's feasible, evaluated (complete) trials."""
    from optuna.trial import TrialState

    values = [
        float(t.user_attrs[EARLY_PPL_ATTR])
        for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if t.number != number and EARLY_PPL_ATTR in t.user_attrs and feasible_evaluated(t)
    ]
    return min(values) if values else None


def prune_reason(ppl: float, baseline: float | None, best_feasible: float | None, pruning: Any) -> str | None:
    """Why a trial with this early token perplexity stops now, or None (see ``PruningConfig``)."""
    if not math.isfinite(ppl):
        return f"early token ppl is {ppl}"
    limits = []
    if baseline:
        limits.append((pruning.max_baseline_ratio * baseline, f"{pruning.max_baseline_ratio:g} x baseline {baseline:.1f}"))
    if best_feasible:
        limits.append((pruning.max_ppl_ratio * best_feasible, f"{pruning.max_ppl_ratio:g} x best feasible so far {best_feasible:.1f}"))
    if not limits:
        return None
    limit, what = min(limits)
    return f"early token ppl {ppl:.1f} > {what}" if ppl > limit else None


def evaluate_staged(trial: Any, ctx: TrialContext, checkpoint_dir: Path) -> dict[str, Any]:
    """Token perplexity on the first windows, a pruning decision, the remaining windows, then the
    other metrics. No window is scored twice."""
    import dataclasses

    from slmsearch import checkpoint
    from slmsearch.evals.runner import evaluate
    from slmsearch.evals.wikitext import token_perplexity

    settings = ctx.config.evaluation
    pruning = ctx.config.pruning
    start = time.perf_counter()
    model, tokenizer = checkpoint.load(checkpoint_dir, dense=True)  # GPTQ: a dense copy in the kernel's dtype
    out: dict[str, Any] = {}

    def decide(windows_done: int, ppl: float) -> None:
        interrupt.check()
        if EARLY_PPL_ATTR in out:
            return
        out[EARLY_PPL_ATTR] = ppl
        trial.set_user_attr(EARLY_PPL_ATTR, ppl)
        if trial.user_attrs.get(BASELINE_ATTR):
            ctx.baseline_first_ppl = ppl
            trial.study.set_user_attr(BASELINE_PPL_STUDY_ATTR, ppl)
        baseline = ctx.baseline_first_ppl or trial.study.user_attrs.get(BASELINE_PPL_STUDY_ATTR)
        reason = prune_reason(ppl, baseline, best_feasible_early_ppl(trial.study, trial.number), pruning)
        if reason:
            raise Pruned(reason)

    try:
        ppl, windows = token_perplexity(
            model, tokenizer, ctx.data_dir, seqlen=settings.token_seqlen, n_windows=settings.token_windows,
            batch_size=settings.batch_size, chunk_windows=pruning.first_windows, on_chunk=decide,
        )
    except Pruned as stop:
        out["pruned"] = str(stop)
        ctx.log(f"trial {trial.number}: pruned ({stop})")
        return out
    rest = dataclasses.replace(settings, metrics=tuple(m for m in settings.metrics if m != "wikitext_token_ppl"))
    results = evaluate(model, tokenizer, ctx.data_dir, rest) if rest.metrics else {"counts": {}, "seconds": {}}
    out["wikitext_token_ppl"] = ppl
    out.update({k: v for k, v in results.items() if k not in {"counts", "seconds"}})
    out[EVAL_COUNTS_ATTR] = {"wikitext_token_windows": windows, **results["counts"]}
    out[EVAL_SECONDS_ATTR] = {**results["seconds"], "total": time.perf_counter() - start}
    return out
