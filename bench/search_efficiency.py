"""Search efficiency on a table: the study's screened search, today's sampler alone, random search
and the anchors alone, replayed on ``bench/grid_levers.csv``.

The table (``bench/build_grid.py``) holds every point of a grid of the extended space (depth x
GPTQ width x layers one width wider x KV cache, 64 MB), each evaluated once for real (token perplexity on
2 x 512 windows after GPTQ) and once by the screening proxy (round-to-nearest in place of GPTQ).
No model is loaded here: each search looks its points up.

Searches, each the study's own code on an in-memory Optuna study over the grid's axes:
- ``screened`` (the study's search with ``screening`` on, :mod:`slmsearch.search.screening`): the
  anchors and the sampler's proposals are *screened* (their proxy perplexity read, at the cost of
  the proxy's seconds, never counted as an evaluation); before each full evaluation ``per_trial``
  more are screened (``first`` before the first; the study's ``screening`` settings), then :func:`screening.choose` promotes the
  candidate whose corrected proxy point adds the most hypervolume to the evaluated ones (it screens
  more, up to ``extra_rounds`` times, when none is predicted to add any). The correction is refit on
  the evaluated points after each evaluation. Its sampler is the study's (NSGA-II, population 8).
- ``nsga2+anchors+dedup``: the search without screening (every proposal fully evaluated).
- ``random``: random search.
- ``anchors``: the anchor plans alone (the study's anchor rule on the grid).

Every search applies the study's pruning rule to what it evaluates fully (``objective.prune_reason``:
over ``max_baseline_ratio`` x the baseline, or over ``max_ppl_ratio`` x the best feasible so far): a
pruned evaluation counts, never joins the front. A proposal over the budget is rejected for free
(the study repairs it instead; the grid has no repaired points). Objectives: token perplexity and
decode latency, both minimized; hypervolume in the normalized space (log perplexity and latency
scaled to [0, 1] over the grid's points within the pruning limit), reference point 1.1, as a
fraction of the grid's.

Goal (issue 17): the screened search reaches 95% of the grid's hypervolume within 10% of the grid's
feasible points in full evaluations (median over 5 seeds), and beats random search and the
anchors alone at every number of evaluations; the anchors alone reach under 80%.

Run (no model, ~1-2 min): .venv/bin/python bench/search_efficiency.py [--seeds 5]
Writes bench/results/search_efficiency.json.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
AXES = ("drop_layers", "gptq_bits", "gptq_wider_layers", "kv_cache_bits")
SEARCHES = ("screened", "nsga2+anchors+dedup", "random")
GOAL_HV, GOAL_SHARE, ANCHOR_GOAL = 0.95, 0.10, 0.80
REF = 1.1
GRID_LAYERS = 30  # the grid's model, SmolLM2-135M (bench/build_grid.py)


class Grid:
    """The table, and each axis combination's row (sampled combinations resolve as the builder did)."""

    def __init__(self, path: Path, budget: float | None = None, partial: bool = False) -> None:
        import dataclasses

        import build_grid
        from slmsearch.hwmodel.shape import smollm2_135m
        from slmsearch.search.config import load_study_config

        self.config = load_study_config(None)
        if budget is not None:
            self.config = dataclasses.replace(self.config, budget_mb=budget)
        self.budget = self.config.budget_mb
        with path.open() as handle:
            rows = list(csv.DictReader(handle))
        self.rows: dict[tuple[int, ...], dict[str, Any]] = {}
        for r in rows:
            rec: dict[str, Any] = {k: float(r[k]) for k in ("footprint_mb", "decode_latency_s")}
            rec["feasible"] = rec["footprint_mb"] <= self.budget
            rec["plan"] = r["plan"]
            from slmsearch.search.screening import weighted_features

            bits = int(float(r["gptq_bits"]))
            rec["width"] = f"gptq{bits}"
            # the chooser's features as a study weighs them: GPTQ widths by their share of the kept layers
            rec["features"], rec["weights"] = weighted_features(
                {"stages": [{"stage": "depth", "drop": int(float(r["drop_layers"]))},
                            {"stage": "gptq", "bits": bits, "wider_layers": int(float(r["gptq_wider_layers"]))}]},
                n_layers=GRID_LAYERS)
            if r.get("wikitext_token_ppl"):
                rec["ppl"] = float(r["wikitext_token_ppl"])
                rec["proxy_ppl"] = float(r["proxy_token_ppl"])
                rec["proxy_s"] = float(r["proxy_s"])
            self.rows[build_grid.key(r)] = rec
        self.axes = {a: sorted(set(build_grid.AXES[a])) for a in AXES}
        self._shape = smollm2_135m()
        self._resolved: dict[tuple[float, ...], tuple[int, ...]] = {}
        missing = [k for k, r in self.rows.items() if r["feasible"] and "ppl" not in r]
        if partial:  # a table still being built: what is not evaluated yet is out of the grid
            self.rows = {k: r for k, r in self.rows.items() if "ppl" in r or not r["feasible"]}
        elif missing:
            raise SystemExit(f"{path}: {len(missing)} feasible point(s) not evaluated; finish bench/build_grid.py first")

    def lookup(self, point: tuple[float, ...]) -> tuple[tuple[int, ...], dict[str, Any]]:
        import build_grid

        if point not in self._resolved:
            params, _ = build_grid.resolve(dict(zip(AXES, (int(v) for v in point))), self.config, self._shape)
            self._resolved[point] = build_grid.key(params)
        key = self._resolved[point]
        return key, self.rows.get(key, {"feasible": False, "plan": "not in the table"})

    def anchors(self) -> list[tuple[float, ...]]:
        """The study's anchor rule on the grid's axes: per GPTQ width >= 3 bits, the fewest dropped
        layers that fit, with the most widened layers that then fit and the narrowest KV cache;
        fewest drops first, at most 2 (``search.anchors``)."""
        from slmsearch.search.anchors import MAX_ANCHORS, MIN_ANCHOR_BITS

        found = []
        for bits in sorted((b for b in self.axes["gptq_bits"] if b >= MIN_ANCHOR_BITS), reverse=True):
            point = next((p for drop in self.axes["drop_layers"] for wider in sorted(self.axes["gptq_wider_layers"], reverse=True)
                          for p in [(drop, bits, wider, min(self.axes["kv_cache_bits"]))] if self.lookup(p)[1]["feasible"]), None)
            if point is not None:
                found.append((point[0], -bits, point))
        return [p for _, _, p in sorted(found)[:MAX_ANCHORS]]


def _vector(row: dict[str, Any]) -> tuple[float, float]:
    return (math.log(row["ppl"]), row["decode_latency_s"])


class Normalizer:
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        raw = [_vector(r) for r in rows]
        self.lo = [min(v[i] for v in raw) for i in range(2)]
        self.hi = [max(v[i] for v in raw) for i in range(2)]

    def __call__(self, row: dict[str, Any]) -> tuple[float, ...]:
        return tuple((v - lo) / ((hi - lo) or 1.0) for v, lo, hi in zip(_vector(row), self.lo, self.hi))


def hv(points: list[tuple[float, ...]]) -> float:
    from slmsearch.search.screening import hypervolume

    return hypervolume(points, (REF, REF))


class Run:
    """What one search has evaluated fully: the pruning rule, the front, the curve."""

    def __init__(self, grid: Grid, norm: Normalizer, grid_hv: float, baseline_ppl: float) -> None:
        self.grid, self.norm, self.grid_hv, self.baseline = grid, norm, grid_hv, baseline_ppl
        self.evaluated: dict[tuple[int, ...], dict[str, Any]] = {}
        self.found: dict[tuple[int, ...], tuple[float, ...]] = {}
        self.best: float | None = None
        self.curve: list[float] = []  # HV fraction after each full evaluation
        self.screens_at: list[int] = []  # screens done by each full evaluation
        self.screens = 0
        self.screen_s = 0.0
        self.pruned = 0

    def evaluate(self, key: tuple[int, ...], row: dict[str, Any]) -> bool:
        """A full evaluation; False when the plan was evaluated before (answered from storage)."""
        from slmsearch.search.objective import prune_reason

        if key in self.evaluated:
            return False
        self.evaluated[key] = row
        if prune_reason(row["ppl"], self.baseline, self.best, self.grid.config.pruning):
            self.pruned += 1
        else:
            self.best = row["ppl"] if self.best is None else min(self.best, row["ppl"])
            self.found[key] = self.norm(row)
        self.curve.append(hv(list(self.found.values())) / self.grid_hv)
        self.screens_at.append(self.screens)
        return True


def run_sampler(name: str, seed: int, grid: Grid, run: Run, n_evals: int) -> Run:
    """Today's search (``nsga2+anchors+dedup``) or ``random``: every feasible proposal evaluated."""
    import optuna

    from slmsearch.search.config import with_overrides
    from slmsearch.search.study import make_sampler

    sampler = name.split("+")[0]
    config = with_overrides(grid.config, sampler=sampler, seed=seed)
    study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(config))
    if "anchors" in name:
        for point in grid.anchors():
            study.enqueue_trial(dict(zip(AXES, point)))

    def objective(trial: Any) -> tuple[float, float]:
        key, row = grid.lookup(tuple(trial.suggest_categorical(a, grid.axes[a]) for a in AXES))
        if not row["feasible"]:
            raise optuna.TrialPruned()
        run.evaluate(key, row)
        return row["ppl"], row["decode_latency_s"]

    for _ in range(50 * n_evals):
        if len(run.curve) >= n_evals:
            break
        study.optimize(objective, n_trials=1)
    return run


def run_screened(seed: int, grid: Grid, run: Run, n_evals: int) -> Run:
    """The study's screened search (see the module docstring), through ``search.screening``."""
    import optuna

    from slmsearch.search import screening
    from slmsearch.search.config import with_overrides
    from slmsearch.search.screen_runner import pruning_limit
    from slmsearch.search.study import make_sampler

    config = with_overrides(grid.config, seed=seed)
    proxy_study = optuna.create_study(directions=["minimize", "minimize"], sampler=make_sampler(config))
    for point in grid.anchors():
        proxy_study.enqueue_trial(dict(zip(AXES, point)))
    screened: dict[tuple[int, ...], dict[str, Any]] = {}
    axis_point: dict[tuple[int, ...], tuple[int, ...]] = {}  # a screened plan's axis values
    settings = grid.config.screening

    def objective(trial: Any) -> tuple[float, float]:
        key, row = grid.lookup(tuple(trial.suggest_categorical(a, grid.axes[a]) for a in AXES))
        if not row["feasible"]:
            raise optuna.TrialPruned()
        if key not in screened:
            screened[key] = row
            axis_point[key] = tuple(trial.params[a] for a in AXES)
            run.screens += 1
            run.screen_s += row["proxy_s"]
        prior = screening.predicted_ppl(_point(key, row, proxy=True), screening.PRIOR)
        return prior, row["decode_latency_s"]

    def neighbour() -> tuple[int, ...] | None:
        """The first unscreened, feasible one-step neighbour of the predicted front (the study's rule)."""
        evaluated = [_point(k, r, proxy=False) for k, r in run.evaluated.items()]
        pool = [_point(k, r, proxy=True) for k, r in screened.items() if k not in run.evaluated]
        theta = screening.fit_correction(evaluated)
        for p in screening.predicted_front(pool, evaluated, theta):
            for params in screening.step_neighbours(dict(zip(AXES, axis_point[tuple(json.loads(p.key))])), grid.axes):
                key, row = grid.lookup(tuple(params[a] for a in AXES))
                if row["feasible"] and key not in screened:
                    return tuple(params[a] for a in AXES)
        return None

    def screen(count: int) -> None:
        target = len(screened) + count
        local = len(screened) + math.ceil(settings.neighbour_share * count)
        while len(screened) < min(local, target):
            point = neighbour()
            if point is None:
                break
            proxy_study.enqueue_trial(dict(zip(AXES, point)))
            proxy_study.optimize(objective, n_trials=1)
        for _ in range(50 * count):
            if len(screened) >= target or len(screened) >= sum(r["feasible"] for r in grid.rows.values()):
                break
            proxy_study.optimize(objective, n_trials=1)

    screen(settings.first)
    while len(run.curve) < n_evals:
        evaluated = [_point(k, r, proxy=False) for k, r in run.evaluated.items()]
        theta = screening.fit_correction(evaluated)
        broken = pruning_limit(run.baseline, evaluated, grid.config.pruning)
        choice = None
        for round_ in range(settings.extra_rounds + 1):
            pool = [_point(k, r, proxy=True) for k, r in screened.items() if k not in run.evaluated]
            choice = screening.choose(pool, evaluated, theta, broken_ppl=broken,
                                      prune_ratio=grid.config.pruning.max_ppl_ratio)
            if choice is not None or round_ == settings.extra_rounds:
                break
            screen(settings.per_trial)
        if choice is None:
            pool = [_point(k, r, proxy=True) for k, r in screened.items() if k not in run.evaluated]
            choice = screening.fallback(pool, theta, broken_ppl=broken, evaluated=evaluated)
            if choice is None:
                break
        key = tuple(json.loads(choice.key))
        run.evaluate(key, grid.rows[key])
        screen(settings.per_trial)
    return run


def _point(key: tuple[int, ...], row: dict[str, Any], *, proxy: bool) -> Any:
    from slmsearch.search.screening import Point

    return Point(key=json.dumps(list(key)), ppl=row["proxy_ppl"] if proxy else row["ppl"], features=row["features"],
                 weights=row["weights"], costs=(row["decode_latency_s"],), proxy_ppl=row["proxy_ppl"],
                 family=json.dumps(list(key[:3])))  # the KV cache's width is the key's last axis


def spearman(a: list[float], b: list[float]) -> float:
    def ranks(values: list[float]) -> list[float]:
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        for rank, i in enumerate(order):
            out[i] = float(rank)
        return out

    ra, rb = ranks(a), ranks(b)
    ma, mb = statistics.mean(ra), statistics.mean(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb))
    var = math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))
    return cov / var if var else 0.0


def proxy_fidelity(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Rank correlation of the proxy with the real perplexity: raw, after the prior correction
    (what the first promotion uses), and within each GPTQ width."""
    from slmsearch.search import screening

    def prior(r: dict[str, Any]) -> float:
        return r["proxy_ppl"] * math.exp(sum(screening.PRIOR.get(f, 0.0) * w for f, w in zip(r["features"], r["weights"])))

    out = {"raw": spearman([r["proxy_ppl"] for r in rows], [r["ppl"] for r in rows]),
           "prior_corrected": spearman([prior(r) for r in rows], [r["ppl"] for r in rows])}
    for feature in sorted({r["width"] for r in rows}):
        same = [r for r in rows if r["width"] == feature]
        if len(same) >= 3:
            out[f"within_{feature}"] = spearman([r["proxy_ppl"] for r in same], [r["ppl"] for r in same])
    return out


def first_reaching(curve: list[float], goal: float) -> float:
    return next((k for k, v in enumerate(curve, 1) if v >= goal - 1e-12), math.inf)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", default=str(HERE / "grid_levers.csv"))
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--budget-mb", type=float, default=None, help="default: the default study's (64)")
    ap.add_argument("--out", default=str(HERE / "results" / "search_efficiency.json"))
    ap.add_argument("--screening", help="JSON overriding the study's screening settings, e.g. '{\"first\": 8}'")
    ap.add_argument("--max-evals", type=int, help="full evaluations per replay at most (default 3 x the goal's, >= 20)")
    ap.add_argument("--partial", action="store_true", help="replay on the points evaluated so far (a table being built)")
    args = ap.parse_args(argv)

    import dataclasses
    import warnings

    import optuna

    import build_grid
    from _benchlib import machine, write_result

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    started = time.perf_counter()
    grid = Grid(Path(args.table), args.budget_mb, args.partial)
    if args.screening:
        grid.config = dataclasses.replace(grid.config, screening=dataclasses.replace(grid.config.screening,
                                                                                    **json.loads(args.screening)))
    baseline = float(json.loads(build_grid.baseline_path(Path(args.table)).read_text())["wikitext_token_ppl"])
    feasible = [r for r in grid.rows.values() if r["feasible"]]
    # The results a study can keep: within max_baseline_ratio x the baseline, and within
    # max_ppl_ratio x the grid's best feasible plan (once a study has found that plan, it prunes
    # anything worse than this; a point past it survives only if evaluated before the best).
    best = min(r["ppl"] for r in feasible)
    limit = min(grid.config.pruning.max_baseline_ratio * baseline, grid.config.pruning.max_ppl_ratio * best)
    kept = [r for r in feasible if r["ppl"] <= limit]
    norm = Normalizer(kept)
    grid_hv = hv([norm(r) for r in kept])
    n = len(feasible)
    k_goal = math.ceil(GOAL_SHARE * n)
    n_evals = min(n, args.max_evals or max(3 * k_goal, 20))
    anchor_rows = [grid.lookup(p)[1] for p in grid.anchors()]
    anchors_hv = hv([norm(r) for r in anchor_rows if r["ppl"] <= limit]) / grid_hv
    print(f"table {args.table}: {len(grid.rows)} points, {n} within {grid.budget:g} MB, {len(kept)} within the pruning "
          f"limit (token ppl {limit:.1f}: min of {grid.config.pruning.max_baseline_ratio:g} x baseline {baseline:.2f} and "
          f"{grid.config.pruning.max_ppl_ratio:g} x the best feasible {best:.2f}); goal: 95% of the grid's "
          f"hypervolume within {k_goal} full evaluations ({GOAL_SHARE:.0%}); {args.seeds} seeds")
    print(f"anchors alone ({', '.join(r['plan'] for r in anchor_rows)}): {anchors_hv:.3f} of the grid's hypervolume")
    fidelity = proxy_fidelity(kept)
    print("proxy fidelity on the points within the pruning limit (Spearman rank correlation with the real token ppl): "
          + ", ".join(f"{k} {v:.3f}" for k, v in fidelity.items()))
    results: dict[str, Any] = {}
    for name in SEARCHES:
        runs = []
        for seed in range(args.seeds):
            run = Run(grid, norm, grid_hv, baseline)
            runs.append(run_screened(seed, grid, run, n_evals) if name == "screened" else run_sampler(name, seed, grid, run, n_evals))
        curves = [r.curve + [r.curve[-1] if r.curve else 0.0] * (n_evals - len(r.curve)) for r in runs]
        results[name] = {
            "k95": [first_reaching(c, GOAL_HV) for c in curves],
            "mean_curve": [statistics.mean(c[k] for c in curves) for k in range(n_evals)],
            "min_curve": [min(c[k] for c in curves) for k in range(n_evals)],
            "pruned_full_evaluations": [r.pruned for r in runs],
            "screens": [r.screens for r in runs],
            "screens_by_95pct": [r.screens_at[int(k) - 1] if not math.isinf(k) else None
                                 for r, k in zip(runs, (first_reaching(r.curve, GOAL_HV) for r in runs))],
            "screen_seconds": [round(r.screen_s, 1) for r in runs],
        }
    anchor_curve = [hv([norm(r) for r in anchor_rows[:k] if r["ppl"] <= limit]) / grid_hv for k in range(1, n_evals + 1)]
    print()
    print("| search | median full evaluations to 95% [per seed] | mean HV at 10% | pruned full evaluations (mean) | screens (mean, proxy s) |")
    print("|---|---:|---:|---:|---:|")
    for name, r in results.items():
        k95 = statistics.median(r["k95"])
        print(f"| {name} | {_k(k95)} ({_pct(k95, n)}) {[_k(k) for k in r['k95']]} | {r['mean_curve'][min(k_goal, n_evals) - 1]:.3f} | "
              f"{statistics.mean(r['pruned_full_evaluations']):.1f} | {statistics.mean(r['screens']):.0f} "
              f"({statistics.mean(r['screen_seconds']):.0f} s) |")
    print()
    print("mean HV fraction after k full evaluations (anchors alone: its first k anchors):")
    print("| k | " + " | ".join(results) + " | anchors |")
    print("|---:|" + "---:|" * (len(results) + 1))
    for k in range(n_evals):
        print(f"| {k + 1} | " + " | ".join(f"{r['mean_curve'][k]:.3f}" for r in results.values()) + f" | {anchor_curve[k]:.3f} |")
    s = results["screened"]
    beats = {other: all(a >= b - 1e-12 for a, b in zip(s["mean_curve"], results[other]["mean_curve"]))
             for other in results if other != "screened"}
    beats["anchors"] = all(a >= b - 1e-12 for a, b in zip(s["mean_curve"], anchor_curve))
    k95 = statistics.median(s["k95"])
    summary = {
        "table": Path(args.table).name, "machine": machine(), "seeds": args.seeds, "feasible_points": n,
        "points_within_pruning_limit": len(kept),
        "fraction_of_grid_for_95pct_hv": None if math.isinf(k95) else k95 / n,
        "anchors_only_hv_fraction": anchors_hv,
        "proxy_rank_correlation": fidelity,
        "goal": {"fraction_of_grid_for_95pct_hv": GOAL_SHARE, "anchors_only_hv_fraction_below": ANCHOR_GOAL},
        "screened_beats_at_every_k": beats,
        "screening": dataclasses.asdict(grid.config.screening),
        "searches": {name: {k: v for k, v in r.items()} for name, r in results.items()},
        "anchors_curve": anchor_curve,
    }
    for r in summary["searches"].values():
        r["k95"] = [None if math.isinf(k) else k for k in r["k95"]]
    print()
    print(f"screened: median {_k(k95)} full evaluations to 95% = {_pct(k95, n)} of the grid (goal <= {GOAL_SHARE:.0%}); "
          f"anchors alone {anchors_hv:.3f} (goal < {ANCHOR_GOAL}); beats at every k: {beats}")
    out = write_result(args.out, summary)
    print(f"wrote {out}; replay wall time {time.perf_counter() - started:.1f} s")
    return summary


def _k(value: float) -> str:
    return "not reached" if math.isinf(value) else f"{value:g}"


def _pct(value: float, n: int) -> str:
    return "-" if math.isinf(value) else f"{100 * value / n:.0f}%"


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
