"""Search efficiency on a table: NSGA-II, TPE and random search replayed on ``bench/grid_default.csv``.

The table holds every point of a reduced grid of the default space, evaluated once for real by
``bench/build_grid.py``. Each sampler is the study's own (``slmsearch.search.study.make_sampler``
with the default study's settings: NSGA-II population 8, TPE multivariate with 4 start-up
trials), on an in-memory Optuna study whose objective looks the sampled point up in the table:
``suggest_categorical`` over the grid's axes, three objectives (token perplexity min, TriviaQA
answer log-prob max, decode latency min) and the footprint budget as a constraint
(``trial.set_constraint``), with the same values a real trial reports (a point over budget is
rejected before compression: quality objectives at the rejection value, latency real). No model
is loaded.

Hypervolume: over the feasible points found so far, in a normalized space (log perplexity,
log-prob and latency each scaled to [0, 1] between the grid's best and worst feasible values,
all minimized), reference point 1.1 in every objective (10% beyond the grid's worst); reported
as a fraction of the hypervolume of the whole grid's feasible points.

Two ways to count trials ("k"): *evaluated* trials, as the study counts them (``--trials``
counts evaluated trials; a rejection costs under a second and is not counted), against the
grid's feasible points; and *all* trials, rejections included, against the whole grid. A point
sampled twice counts twice (a real study evaluates it again).

What the study does is ``nsga2+anchors+dedup``: its anchor plans enqueued first
(``slmsearch.search.anchors``) and a plan sampled again answered from storage, not counted.

Pruning (on unless ``--no-pruning``): the study stops a trial after its first token-perplexity
windows when that perplexity is over ``max_ppl_ratio`` x the best of its feasible completed trials
so far, or over ``max_baseline_ratio`` x the uncompressed baseline's (``PruningConfig``,
``objective.prune_reason``). The table's token perplexity is measured on exactly those first
windows (2 x 512 tokens) and the baseline's on the same windows (``<table>.baseline.json``, written
by ``build_grid.py``), so the replay applies the study's own rule: a pruned trial counts as
evaluated (it was compressed) but has no values and never joins the front. The grid's hypervolume
is then that of the feasible points no order of trials can prune (perplexity within
``max_baseline_ratio`` x the baseline): a broken model is never a result of the study.

Goal: the default sampler (NSGA-II) reaches 95% of the grid's hypervolume within 25% of the
grid's trials, and beats random search.

Run (no model, ~1 min): .venv/bin/python bench/search_efficiency.py [--seeds 20]
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
AXES = ("drop_layers", "embedding_bits", "gptq_bits", "eora_rank")
OBJECTIVES = (("wikitext_token_ppl", "minimize"), ("triviaqa_answer_logprob", "maximize"), ("decode_latency_s", "minimize"))
# The study's search = its sampler + anchors + repeats answered from storage ("nsga2+anchors+dedup").
SAMPLERS = ("nsga2+anchors+dedup", "nsga2", "tpe+anchors+dedup", "random", "random+anchors+dedup")
GOAL_HV, GOAL_SHARE = 0.95, 0.25
REF = 1.1
REPEATS: dict[str, list[int]] = defaultdict(list)  # per sampler: repeated points among the first n evaluations


def load_table(path: Path) -> tuple[dict[tuple[int, ...], dict[str, Any]], dict[str, list[int]]]:
    with path.open() as handle:
        rows = list(csv.DictReader(handle))
    table: dict[tuple[int, ...], dict[str, Any]] = {}
    axes: dict[str, list[int]] = {a: [] for a in AXES}
    for r in rows:
        point = tuple(int(float(r[a])) for a in AXES)
        for a, v in zip(AXES, point):
            if v not in axes[a]:
                axes[a].append(v)
        rec: dict[str, Any] = {"feasible": bool(int(float(r["feasible"]))), "footprint_mb": float(r["footprint_mb"]),
                               "decode_latency_s": float(r["decode_latency_s"])}
        if rec["feasible"]:
            rec["wikitext_token_ppl"] = float(r["wikitext_token_ppl"])
            rec["triviaqa_answer_logprob"] = float(r["triviaqa_answer_logprob"])
        table[point] = rec
    missing = math.prod(len(v) for v in axes.values()) - len(table)
    if missing:
        raise SystemExit(f"{path}: the table misses {missing} grid point(s); finish bench/build_grid.py first")
    return table, {a: sorted(v) for a, v in axes.items()}


class Normalizer:
    """Maps a feasible row to a minimized point in [0, 1]^3 (grid's best -> 0, worst -> 1)."""

    def __init__(self, rows: list[dict[str, Any]]) -> None:
        raw = [self._raw(r) for r in rows]
        self.lo = [min(v[i] for v in raw) for i in range(3)]
        self.hi = [max(v[i] for v in raw) for i in range(3)]

    @staticmethod
    def _raw(r: dict[str, Any]) -> tuple[float, float, float]:
        return (math.log(r["wikitext_token_ppl"]), -r["triviaqa_answer_logprob"], r["decode_latency_s"])

    def __call__(self, r: dict[str, Any]) -> tuple[float, ...]:
        return tuple((v - lo) / ((hi - lo) or 1.0) for v, lo, hi in zip(self._raw(r), self.lo, self.hi))


def hypervolume(points: list[tuple[float, ...]]) -> float:
    import numpy as np
    from optuna._hypervolume import compute_hypervolume

    if not points:
        return 0.0
    return float(compute_hypervolume(np.asarray(points, dtype=float), np.full(3, REF)))


def replay(name: str, seed: int, table: dict[tuple[int, ...], dict[str, Any]], axes: dict[str, list[int]],
           norm: Normalizer, grid_hv: float, budget: float, max_total: int, n_feasible: int,
           baseline_ppl: float | None = None) -> list[tuple[int, int, float]]:
    """[(all trials so far, evaluated trials so far, HV fraction)] after every trial. With a
    ``baseline_ppl`` the study's pruning rule is applied (see the module's docstring)."""
    import optuna

    from slmsearch.search.config import load_study_config, with_overrides
    from slmsearch.search.objective import prune_reason
    from slmsearch.search.study import make_sampler
    from slmsearch.search.trials import CONSTRAINT_KEY

    base, *flags = name.split("+")
    dedup = "dedup" in flags  # a repeated plan answered from the storage: not evaluated again
    sampler, _, population = base.partition(":")  # "nsga2:4": population 4
    extra = {"population_size": int(population)} if population else {}
    config = with_overrides(load_study_config(None), sampler=sampler, seed=seed, **extra)
    study = optuna.create_study(directions=[d for _, d in OBJECTIVES], sampler=make_sampler(config))
    if "anchors" in flags:
        for point in table_anchors(table, axes, budget):
            study.enqueue_trial(dict(zip(AXES, point)))
    found: dict[tuple[int, ...], tuple[float, ...]] = {}
    pruned: set[tuple[int, ...]] = set()
    best_ppl: float | None = None  # the best early token ppl among completed feasible trials so far
    curve: list[tuple[int, int, float]] = []
    evaluated = 0
    repeats: list[int] = []

    def objective(trial: Any) -> tuple[float, ...]:
        nonlocal evaluated, best_ppl
        point = tuple(trial.suggest_categorical(a, axes[a]) for a in AXES)
        row = table[point]
        over = row["footprint_mb"] - budget
        trial.set_constraint(CONSTRAINT_KEY, over)
        if over > 0:  # as the study ends a plan over budget: PRUNED, with its constraint, no values
            raise optuna.TrialPruned()
        if point in found or point in pruned:
            repeats.append(evaluated)
            if dedup:  # answered from its first trial: values, or pruned again
                if point in pruned:
                    raise optuna.TrialPruned()
                return tuple(row[m] for m, _ in OBJECTIVES)
        evaluated += 1
        ppl = row["wikitext_token_ppl"]
        if baseline_ppl is not None and prune_reason(ppl, baseline_ppl, best_ppl, config.pruning):
            pruned.add(point)
            raise optuna.TrialPruned()
        best_ppl = ppl if best_ppl is None else min(best_ppl, ppl)
        found[point] = norm(row)
        return tuple(row[m] for m, _ in OBJECTIVES)

    hv = 0.0
    for total in range(1, max_total + 1):
        before = len(found)
        study.optimize(objective, n_trials=1)
        if len(found) != before:
            hv = hypervolume(list(found.values())) / grid_hv
        curve.append((total, evaluated, hv))
        if evaluated >= n_feasible and hv >= 1.0 - 1e-12:
            break
    REPEATS[name].append(sum(1 for k in repeats if k < n_feasible))
    return curve


def table_anchors(table: dict[tuple[int, ...], dict[str, Any]], axes: dict[str, list[int]], budget: float) -> list[tuple[int, ...]]:
    """The study's anchor rule (``slmsearch.search.anchors.anchor_params``) on the table's axes: per
    GPTQ width >= 3 bits, widest first, the fewest dropped layers that fit the budget, with the
    smallest embedding precision and no EoRA (the table has no WANDA or LoRA axis); at most 2."""
    from slmsearch.search.anchors import MAX_ANCHORS, MIN_ANCHOR_BITS

    out: list[tuple[int, ...]] = []
    for bits in sorted((b for b in axes["gptq_bits"] if MIN_ANCHOR_BITS <= b < 16), reverse=True):
        for drop in sorted(axes["drop_layers"]):
            point = (drop, min(axes["embedding_bits"]), bits, 0)
            if point in table and table[point]["footprint_mb"] <= budget:
                out.append(point)
                break
        if len(out) >= MAX_ANCHORS:
            break
    return out


def load_baseline_ppl(table: Path) -> float:
    """The uncompressed model's token perplexity on the table's windows (``build_grid.py`` writes it)."""
    import json

    from build_grid import baseline_path  # bench/ is the script's folder

    path = baseline_path(table)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: score the baseline with "
                         f"`bench/build_grid.py --out {table} --baseline-only`, or replay with --no-pruning")
    return float(json.loads(path.read_text())["wikitext_token_ppl"])


def at(curve: list[tuple[int, int, float]], k: int, index: int) -> float:
    """HV fraction once ``k`` trials (index 0: all, 1: evaluated) were run (last value if never)."""
    best = 0.0
    for entry in curve:
        if entry[index] > k:
            break
        best = entry[2]
    return best


def first_reaching(curve: list[tuple[int, int, float]], goal: float, index: int) -> float:
    for entry in curve:
        if entry[2] >= goal - 1e-12:
            return entry[index]
    return math.inf


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(HERE / "grid_default.csv"))
    ap.add_argument("--seeds", type=int, default=20)
    ap.add_argument("--samplers", default=",".join(SAMPLERS),
                    help="comma list; nsga2:N = NSGA-II with population N instead of the study's; "
                         "'+dedup' answers a repeated plan without counting it as evaluated (as the study does); "
                         "'+anchors' enqueues the study's anchor plans first (as the study does)")
    ap.add_argument("--budget-mb", type=float, default=None, help="default: the default study's (64)")
    ap.add_argument("--no-pruning", action="store_true",
                    help="do not model the study's pruning (every feasible point counts, broken models included)")
    ap.add_argument("--max-total", type=int, help="trials per replay at most (default 4 x grid size)")
    args = ap.parse_args(argv)

    import optuna

    from slmsearch.search.config import load_study_config

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    import warnings

    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    config = load_study_config(None)
    budget = args.budget_mb if args.budget_mb is not None else config.budget_mb
    table, axes = load_table(Path(args.table))
    feasible_rows = [r for r in table.values() if r["footprint_mb"] <= budget]
    if not feasible_rows:
        raise SystemExit("no grid point fits the budget")
    baseline_ppl = None if args.no_pruning else load_baseline_ppl(Path(args.table))
    # The points that can be results: with pruning, those no order of trials prunes.
    kept_rows = feasible_rows if baseline_ppl is None else [
        r for r in feasible_rows if r["wikitext_token_ppl"] <= config.pruning.max_baseline_ratio * baseline_ppl]
    if not kept_rows:
        raise SystemExit("every feasible grid point is over the pruning limit: nothing to compare")
    norm = Normalizer(kept_rows)
    grid_hv = hypervolume([norm(r) for r in kept_rows])
    n_all, n_feasible = len(table), len(feasible_rows)
    max_total = args.max_total or 4 * n_all
    k_eval = math.ceil(GOAL_SHARE * n_feasible)
    k_all = math.ceil(GOAL_SHARE * n_all)
    front = _front([norm(r) for r in kept_rows])
    print(f"table {args.table}: {n_all} points ({', '.join(f'{a} {v}' for a, v in axes.items())}), "
          f"{n_feasible} within {budget:g} MB, {len(front)} on the Pareto front; {args.seeds} seeds; "
          f"optuna {optuna.__version__}")
    if baseline_ppl is None:
        print("pruning not modelled (--no-pruning): every feasible point can be a result")
    else:
        print(f"pruning modelled: baseline token ppl {baseline_ppl:.2f}; {len(kept_rows)} of {n_feasible} feasible points "
              f"are within {config.pruning.max_baseline_ratio:g} x baseline (the grid's hypervolume is theirs); "
              f"a trial also stops over {config.pruning.max_ppl_ratio:g} x the best feasible so far")
    print(f"25% of the grid = {k_eval} evaluated trials (of {n_feasible} feasible) = {k_all} trials in all (of {n_all})")
    oracle = [best_subset_hv(front, k) / grid_hv for k in range(1, len(front) + 1)]
    print("oracle (the best k points of the front, chosen knowing the table): HV fraction "
          + ", ".join(f"k={k}: {v:.3f}" for k, v in enumerate(oracle, 1)))
    results: dict[str, Any] = {}
    started = time.perf_counter()
    for name in args.samplers.split(","):
        t0 = time.perf_counter()
        curves = [replay(name, seed, table, axes, norm, grid_hv, budget, max_total, n_feasible, baseline_ppl)
                  for seed in range(args.seeds)]
        results[name] = {
            "hv_at_25pct_eval": [at(c, k_eval, 1) for c in curves],
            "hv_at_50pct_eval": [at(c, math.ceil(0.5 * n_feasible), 1) for c in curves],
            "hv_at_25pct_all": [at(c, k_all, 0) for c in curves],
            "k95_eval": [first_reaching(c, GOAL_HV, 1) for c in curves],
            "k95_all": [first_reaching(c, GOAL_HV, 0) for c in curves],
            "curve_eval": [statistics.mean(at(c, k, 1) for c in curves) for k in range(1, n_feasible + 1)],
            "seconds": time.perf_counter() - t0,
        }
    print()
    print("| sampler | HV at 25% (evaluated) mean [min-max] | seeds >= 95% at 25% | median k to 95% (evaluated) "
          "| HV at 50% (evaluated) | HV at 25% (all trials) | median k to 95% (all trials) "
          f"| repeated points in the first {n_feasible} evaluated | replay s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in results.items():
        hv25 = r["hv_at_25pct_eval"]
        reach = sum(v >= GOAL_HV - 1e-12 for v in hv25)
        k95e, k95a = statistics.median(r["k95_eval"]), statistics.median(r["k95_all"])
        print(f"| {name} | {statistics.mean(hv25):.3f} [{min(hv25):.2f}-{max(hv25):.2f}] | {reach}/{len(hv25)} | "
              f"{_k(k95e)} ({_pct(k95e, n_feasible)}) | {statistics.mean(r['hv_at_50pct_eval']):.3f} | "
              f"{statistics.mean(r['hv_at_25pct_all']):.3f} | {_k(k95a)} ({_pct(k95a, n_all)}) | "
              f"{statistics.mean(REPEATS[name]):.1f} | {r['seconds']:.1f} |")
    print()
    print("mean HV fraction after k evaluated trials:")
    print("| k | " + " | ".join(results) + " |")
    print("|---:|" + "---:|" * len(results))
    for k in range(1, n_feasible + 1):
        print(f"| {k} | " + " | ".join(f"{r['curve_eval'][k - 1]:.3f}" for r in results.values()) + " |")
    default = f"{config.sampler}+anchors+dedup"
    if default in results and "random" in results:
        d, rnd = results[default], results["random"]
        d25, r25 = statistics.mean(d["hv_at_25pct_eval"]), statistics.mean(rnd["hv_at_25pct_eval"])
        auc_d, auc_r = statistics.mean(d["curve_eval"]), statistics.mean(rnd["curve_eval"])
        print()
        print(f"default sampler {default}: mean HV at 25% of the grid {d25:.3f} (goal {GOAL_HV}); "
              f"median k to 95% = {_k(statistics.median(d['k95_eval']))} evaluated trials "
              f"(goal <= {k_eval}); vs random: HV at 25% {d25:.3f} vs {r25:.3f}, "
              f"mean HV over k=1..{n_feasible} {auc_d:.3f} vs {auc_r:.3f}")
    print(f"replay wall time: {time.perf_counter() - started:.1f} s")
    return results


def best_subset_hv(front: list[tuple[float, ...]], k: int) -> float:
    """The largest hypervolume of any k front points (an upper bound for any sampler after k
    evaluated trials: swapping a dominated point for its dominator never lowers the volume)."""
    import itertools

    return max(hypervolume(list(c)) for c in itertools.combinations(front, min(k, len(front))))


def _front(points: list[tuple[float, ...]]) -> list[tuple[float, ...]]:
    return [p for p in points if not any(all(q[i] <= p[i] for i in range(3)) and q != p for q in points)]


def _k(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:g}"


def _pct(value: float, n: int) -> str:
    return "-" if math.isinf(value) else f"{100 * value / n:.0f}%"


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
