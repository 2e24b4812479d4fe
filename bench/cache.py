"""Stage cache: a cold trial against trials that share a prefix of its plan with it.

Four real default-study trials run in one process, in this order, through
``slmsearch.search.study.optimize`` (one temporary SQLite study, trials enqueued), on an empty
stage cache, with the default study's calibration and evaluation settings:

  A  cold          drop 8, WANDA unstructured 0.3, LoRA r8 x 10, emb 4, GPTQ 3-bit g64, EoRA 8
  B  shares depth + WANDA + LoRA with A        (GPTQ 2-bit g64 instead of 3-bit, EoRA 8; the
     embedding stage (4-bit, 0.5 s) is shared too: an 8-bit one puts B over the 64 MB budget)
  C  shares everything up to GPTQ with A       (EoRA 16 instead of 8)
  D  the same plan as A, in a second study      (every stage from the cache; evaluation only; in the
     on the same stage cache                      same study it would be a repeat, answered from storage)

Each trial's wall time is the study's own call that runs it (budget check, compression,
evaluation, storage). Goal: A / B >= 3. Trial A is the process's first trial, so it also pays the
per-process costs (the base model's fingerprint, lm-eval's first task build: seconds, against a
trial of minutes); ``--warmup`` pays them before it instead (see bench/trial_cost.py).

Run (real model; ~10 min on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/cache.py [--json out.json]
The ratio is decided by how much of A the shared stages are: with the thesis study's LoRA length
(``--space '{"lora_steps": 200}'``, ~16 min) A's LoRA is 400 s instead of 30 s and B costs the same.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import fresh_cache, machine, optimize_walls, quiet_env  # noqa: E402
from trial_cost import build_config, warm_up  # noqa: E402

GOAL = 3.0
BASE = {
    "drop_layers": 8, "wanda_pattern": "unstructured", "sparsity": 0.3, "lora_rank": 8, "embedding_bits": 4,
    "gptq_bits": 3, "group_size": 64, "act_order": False, "eora_rank": 8,
}
TRIALS = [
    ("A", "cold", {}),
    ("B", "shares depth + WANDA + LoRA (+ embedding)", {"gptq_bits": 2}),
    ("C", "shares up to GPTQ (EoRA differs)", {"eora_rank": 16}),
    ("D", "same plan, another study on the same cache (full hit)", {}),
]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    quiet_env()
    cache = fresh_cache("cache", args.cache_root)
    from slmsearch.compress.plan import Plan
    from slmsearch.search import storage as storage_mod
    from slmsearch.search import study as study_mod

    storage_dir = Path(tempfile.mkdtemp(prefix="bench-cache-"))
    args.study_name = "bench-cache"
    config = build_config(args, storage_dir)
    # Every trial is evaluated in full: B (2-bit) would be pruned after 2 windows otherwise, and
    # the comparison is about what the cache saves, not what pruning saves.
    from slmsearch.search.config import with_overrides

    config = with_overrides(config, pruning={"first_windows": 2, "max_ppl_ratio": 1e12, "max_baseline_ratio": 1e12})
    base = {**BASE, **(json.loads(args.params) if args.params else {})}
    trials = [(name, what, {**base, **change}) for name, what, change in TRIALS]
    _check_budget(config, trials)
    warm_s = warm_up(config, cache) if args.warmup else 0.0

    # A, B and C run in one study; D (A's plan again) in a second study on the same stage cache:
    # inside one study a plan sampled again is answered from storage (a "repeat", no work at all),
    # which is not what a cache measures.
    done: list[Any] = []
    walls: list[float] = []
    for suffix, group in (("", trials[:3]), ("-d", trials[3:])):
        sub = with_overrides(config, name=config.name + suffix)
        storage = storage_mod.open_storage(storage_mod.storage_url(sub))
        study = study_mod.open_study(sub, storage)
        for _, _, params in group:
            study.enqueue_trial(params)
        sub = _with_trials(sub, len(group))
        with optimize_walls() as group_walls:
            study_mod.optimize(sub, log=lambda s: print(f"[optimize] {s}", file=sys.stderr, flush=True))
        walls += group_walls
        done += sorted((t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("plan")), key=lambda t: t.number)
    rows = []
    for (name, what, params), trial, wall in zip(trials, done, walls):
        attrs = trial.user_attrs
        rows.append({
            "trial": name, "what": what, "plan": Plan.from_dict(attrs["plan"]).label(), "state": trial.state.name,
            "rejected": attrs.get("rejected"), "footprint_mb": attrs.get("footprint_mb"),
            "wall_s": wall, "cache_hits": attrs.get("cache_hits"), "stage_seconds": attrs.get("stage_seconds"),
            "eval_s": (attrs.get("eval_seconds") or {}).get("total"),
        })
    return {"machine": machine(), "cache": str(cache), "warmup_s": warm_s, "rows": rows,
            "calibration": config.calibration.to_dict(), "evaluation": config.evaluation.to_dict()}


def _check_budget(config: Any, trials: list[tuple[str, str, dict[str, Any]]]) -> None:
    """Every trial must fit the budget (a rejected one is not counted, and the study would sample
    others in its place)."""
    from slmsearch.hwmodel import estimate, load_platform
    from slmsearch.models import resolve_model
    from slmsearch.search.hardware import base_shape
    from slmsearch.search.space import base_dims, plan_from_params

    shape = base_shape(resolve_model(config.model))
    platform = load_platform(config.platform, config.platform_overrides or None)
    for name, _, params in trials:
        plan = plan_from_params({**params, "lora_steps": config.space.lora_steps}, config.space, base_dims(shape), len(shape.layers))
        mb = estimate(plan.shape(shape), platform, context_len=config.context_len).memory.total_bytes / 1e6
        if mb > config.budget_mb:
            raise SystemExit(f"trial {name} ({params}) is {mb:.2f} MB, over the {config.budget_mb:g} MB budget")


def _with_trials(config: Any, n: int) -> Any:
    from slmsearch.search.config import with_overrides

    return with_overrides(config, trials=n)


B_SHARES = ("depth", "wanda", "lora", "embedding")  # the stages B's plan has in common with A's


def shared_work_line(a: dict[str, Any], b: dict[str, Any], shares: tuple[str, ...] = B_SHARES) -> str:
    """What the cache can do for B at these stage costs, against what it did.

    A cache of the stages B shares with A can at best take their time off B; if B's own stages
    cost what A's do, B >= A - shared, so A / B <= A / (A - shared) whatever the cache does. The
    line gives that bound, the shared stages B still ran (none, if the cache works) and B's time
    beyond A - shared (B's own stages costing more or less than A's: a 2-bit GPTQ is not a 3-bit
    one; A also pays the process's first-trial costs).
    """
    a_stages, b_stages = a["stage_seconds"] or {}, b["stage_seconds"] or {}
    shared = [k for k in a_stages if k in shares]
    shared_s = sum(a_stages[k] for k in shared)
    rerun = [k for k in b_stages if k in shared]
    bound = a["wall_s"] / max(a["wall_s"] - shared_s, 1e-9)
    return (f"shared stages ({', '.join(shared) or 'none'}) cost A {shared_s:.1f} s of {a['wall_s']:.1f} s; "
            f"B re-ran {', '.join(rerun) or 'none of them'}; best A / B any cache of them allows: "
            f"{bound:.2f}; B - (A - shared) = {b['wall_s'] - (a['wall_s'] - shared_s):+.1f} s")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model")
    ap.add_argument("--study")
    ap.add_argument("--params", help="JSON: parameters overriding trial A's (and so every trial's)")
    ap.add_argument("--evaluation")
    ap.add_argument("--calibration")
    ap.add_argument("--space")
    ap.add_argument("--budget-mb", type=float)
    ap.add_argument("--cache-root")
    ap.add_argument("--warmup", action="store_true", help="pay the per-process costs before trial A (adds ~7 min)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    res = measure(args)
    rows = res["rows"]
    cold = rows[0]["wall_s"]
    print(f"machine: {res['machine']}; warm-up {res['warmup_s']:.1f} s (not counted)")
    print("| trial | shares with A | plan | cache hits | compress s | eval s | wall s | A / this |")
    print("|---|---|---|---|---:|---:|---:|---:|")
    for r in rows:
        compress = sum((r["stage_seconds"] or {}).values())
        hits = ", ".join(r["cache_hits"] or []) or "-"
        state = r["state"] if not r["rejected"] else f"REJECTED ({r['rejected']})"
        print(f"| {r['trial']} | {r['what']} | {r['plan']} ({r['footprint_mb']:.1f} MB, {state}) | {hits} | "
              f"{compress:.1f} | {r['eval_s'] or 0:.1f} | {r['wall_s']:.1f} | {cold / r['wall_s']:.2f} |")
    if len(rows) > 1:
        print(f"A / B (shares depth + WANDA + LoRA): {cold / rows[1]['wall_s']:.2f}   (goal >= {GOAL})")
        print(shared_work_line(rows[0], rows[1]))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
