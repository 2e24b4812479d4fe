"""Today's search against the screened one, for the same wall-clock time, on the default model at 64 MB.

Both sides run the default study (``studies/default.yaml``: SmolLM2-135M, Siracusa, 64 MB, its
space, objectives and evaluation) in this one process, one after the other, each with its own
fresh stage cache (sharing only the converted model) and its own SQLite study, under the same
``timeout_s``:
- ``old``: ``screening.enabled: false`` (the anchors, then NSGA-II's proposals, each compressed
  and evaluated);
- ``new``: the default, ``screening.enabled: true`` (proxy screens; the candidate predicted to add
  most to the front is compressed and evaluated).
The study does not start a trial (with the screens that choose it) that its clock predicts cannot
end within the timeout; each side's real wall time is reported too.

Per side: the hypervolume of its feasible evaluated trials on the study's three objectives
(normalized over both sides' feasible trials together: log word perplexity, TriviaQA exact match,
decode latency; reference point 1.1), the best feasible token perplexity, the full evaluations
(compressed and evaluated trials, the baseline excluded), how many of them ended pruned, the
budget rejections and the screens.

Run (real model; 2 x M minutes and the last trial's overrun, default M = 40: at 12-15 minutes the
first round of screens leaves the new side no room for more than the anchors' count of trials;
docs/benchmarks.md section 9):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/search_side_by_side.py [--minutes 40]
Writes bench/results/search_side_by_side.json.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import fresh_cache, machine, quiet_env, write_result  # noqa: E402

HERE = Path(__file__).resolve().parent


def run_side(name: str, screening: bool, minutes: float, runs: Path, cache_root: str | None) -> dict[str, Any]:
    import dataclasses

    from slmsearch.search.config import load_study_config
    from slmsearch.search.study import optimize_located

    fresh_cache(f"side-{name}", cache_root)
    config = load_study_config(None)
    config = dataclasses.replace(
        config, name=f"side-{name}", trials=1000, timeout_s=minutes * 60,
        storage=f"sqlite:///{runs / f'side-{name}.db'}",
        screening=dataclasses.replace(config.screening, enabled=screening),
    )
    started = time.perf_counter()
    summary, located = optimize_located(config, log=lambda m: print(f"[{name} {time.perf_counter() - started:5.0f} s] {m}", flush=True))
    wall = time.perf_counter() - started
    return {"config": config, "study": located.study, "summary": summary, "wall_s": wall}


def side_figures(side: dict[str, Any]) -> dict[str, Any]:
    from optuna.trial import TrialState

    from slmsearch.search.screen_runner import screen_study_name
    from slmsearch.search.trials import BASELINE_ATTR, PRUNED, REJECTED, counted, feasible_evaluated, status

    study, config = side["study"], side["config"]
    trials = study.get_trials(deepcopy=False)
    full = [t for t in trials if counted(t) and not t.user_attrs.get(BASELINE_ATTR) and "repeat_of" not in t.user_attrs]
    feasible = [t for t in trials if t.state == TrialState.COMPLETE and feasible_evaluated(t)]
    screens = 0
    if config.screening.enabled:
        import optuna

        screen = optuna.load_study(study_name=screen_study_name(config.name), storage=config.storage)
        screens = sum(t.state == TrialState.COMPLETE and "proxy_seconds" in t.user_attrs for t in screen.trials)
    ppl = [float(t.user_attrs["wikitext_token_ppl"]) for t in feasible if "wikitext_token_ppl" in t.user_attrs]
    return {
        "wall_s": round(side["wall_s"], 1),
        "full_evaluations": len(full),
        "pruned_after_full_compression": sum(status(t) == PRUNED for t in full),
        "budget_rejections": sum(status(t) == REJECTED for t in trials),
        "screens": screens,
        "feasible_evaluated": len(feasible),
        "best_token_ppl": min(ppl) if ppl else None,
        "plans": [t.user_attrs.get("plan_label") or _label(t) for t in full],
        "_points": [_vector(t) for t in feasible],
    }


def _label(trial: Any) -> str:
    from slmsearch.compress.plan import Plan

    plan = trial.user_attrs.get("plan")
    return Plan.from_dict(plan).label() if plan else "?"


def _vector(trial: Any) -> tuple[float, float, float]:
    values = trial.values  # word ppl (min), TriviaQA EM (max), decode latency (min)
    return (math.log(values[0]), -values[1], values[2])


def hypervolumes(sides: dict[str, dict[str, Any]]) -> None:
    from slmsearch.search.screening import hypervolume

    every = [p for s in sides.values() for p in s["_points"]]
    if not every:
        for s in sides.values():
            s["hypervolume"] = 0.0
        return
    lo = [min(p[i] for p in every) for i in range(3)]
    hi = [max(p[i] for p in every) for i in range(3)]
    for s in sides.values():
        norm = [tuple((v - a) / ((b - a) or 1.0) for v, a, b in zip(p, lo, hi)) for p in s["_points"]]
        s["hypervolume"] = round(hypervolume(norm, (1.1, 1.1, 1.1)), 4)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=40.0, help="wall-clock time per side")
    ap.add_argument("--cache-root")
    ap.add_argument("--out", default=str(HERE / "results" / "search_side_by_side.json"))
    args = ap.parse_args(argv)
    quiet_env()
    os.environ.setdefault("SLMSEARCH_DATA_DIR", str(HERE.parent.parent / "shared" / "data"))
    with tempfile.TemporaryDirectory(prefix="side-by-side-") as tmp:
        runs = Path(tmp)
        sides = {name: side_figures(run_side(name, screening, args.minutes, runs, args.cache_root))
                 for name, screening in (("old", False), ("new", True))}
    hypervolumes(sides)
    result = {"minutes": args.minutes, "machine": machine(), "measured": time.strftime("%Y-%m-%d %H:%M %Z"),
              **{name: {k: v for k, v in s.items() if not k.startswith("_")} for name, s in sides.items()}}
    print()
    print("| side | wall s | hypervolume | best token ppl | full evaluations | pruned after full compression | budget rejections | screens |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in ("old", "new"):
        s = result[name]
        best = f"{s['best_token_ppl']:.2f}" if s["best_token_ppl"] else "-"
        print(f"| {name} | {s['wall_s']:.0f} | {s['hypervolume']:.3f} | {best} | {s['full_evaluations']} | "
              f"{s['pruned_after_full_compression']} | {s['budget_rejections']} | {s['screens']} |")
    out = write_result(args.out, result)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
