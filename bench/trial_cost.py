"""Trial overhead: one default-study trial, its wall time split into the passes it cannot avoid
and everything else. Goal: total / unavoidable <= 1.3.

The trial is a real one: ``slmsearch.search.study.optimize`` on a temporary SQLite study holding
one enqueued trial (the plan of ``examples/plan-64mb.yaml`` by default: drop 8 layers, LoRA rank
8 x 10 steps, 4-bit embedding, GPTQ 3-bit g64, EoRA 8), with the default study's calibration and
evaluation settings, against an empty stage cache. Unavoidable = the union of the wall intervals
spent in the model's forward passes, LoRA's backward and optimizer steps, GPTQ's and EoRA's solves
and the log-softmax/loss on the logits (see bench/_benchlib.py); everything else (loading,
saving, hashing, tokenizing, lm-eval set-up, Python between passes) is overhead, and the named
parts of it are timed too.

Per-process costs are paid before the measured trial by a warm-up (imports, the base model's
fingerprint, lm-eval's task files and datasets, a 1-layer-drop compression and an evaluation on
a separate cache), because a study pays them once, not per trial; ``--no-warmup`` measures a
first trial instead.

Run (real model; takes ~5-10 min on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/trial_cost.py [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import Profiler, format_profile, fresh_cache, instrument_trial, machine, optimize_walls, quiet_env  # noqa: E402

GOAL = 1.3
# examples/plan-64mb.yaml as parameters of the default space narrowed to that plan's levers (the
# space fills in lora_steps=10; with drop_layers [8, 8] the budget-aware depth is exactly 8).
PLAN_64MB = {
    "wanda_pattern": "none", "lora_rank": 8, "embedding_bits": 4,
    "gptq_bits": 3, "group_size": 64, "act_order": False, "eora_rank": 8,
}
PLAN_64MB_SPACE = {"drop_layers": [8, 8], "kv_cache_bits": [16], "embedding_groups": [0], "embedding_mse": [0.0],
                   "wider_fraction": [0.0, 0.0], "gptq_mse": [0.0], "lora_loss": ["lm"]}


def build_config(args: argparse.Namespace, storage_dir: Path) -> Any:
    from slmsearch.search.config import load_study_config, with_overrides

    config = load_study_config(args.study)
    overrides: dict[str, Any] = {
        "name": getattr(args, "study_name", None) or "bench-trial-cost", "trials": 1, "storage": f"sqlite:///{storage_dir / 'bench.db'}",
    }
    if args.model:
        overrides["model"] = args.model
    if args.evaluation:
        overrides["evaluation"] = {**config.evaluation.to_dict(), **json.loads(args.evaluation)}
    if args.calibration:
        overrides["calibration"] = {**config.calibration.to_dict(), **json.loads(args.calibration)}
    overrides["space"] = {**_space_dict(config.space), **PLAN_64MB_SPACE, **(json.loads(args.space) if args.space else {})}
    if args.budget_mb:
        overrides["budget_mb"] = args.budget_mb
    return with_overrides(config, **overrides)


def _space_dict(space: Any) -> dict[str, Any]:
    import dataclasses

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(space).items()}


def warm_up(config: Any, cache_root: Path) -> float:
    """Pay the per-process costs on a separate cache: a 1-layer-drop compression + an evaluation."""
    from slmsearch.compress.cache import StageCache
    from slmsearch import checkpoint
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.data import resolve_data_dir
    from slmsearch.evals.runner import evaluate
    from slmsearch.models import resolve_model

    start = time.perf_counter()
    data_dir = resolve_data_dir(config.data_dir)
    location = resolve_model(config.model)
    plan = Plan.from_dict({"stages": [{"stage": "depth", "drop": 1, "by": config.space.depth_score}]})
    result = run(plan, location, data_dir, config.calibration, cache=StageCache(root=cache_root / "warmup-stages"))
    model, tokenizer = checkpoint.load(result.checkpoint_dir)
    evaluate(model, tokenizer, data_dir, config.evaluation)
    return time.perf_counter() - start


def measure(args: argparse.Namespace) -> dict[str, Any]:
    quiet_env()
    cache = fresh_cache("trial_cost", args.cache_root)
    t0 = time.perf_counter()
    import optuna  # noqa: F401
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    prof = Profiler()
    missing = instrument_trial(prof)  # imports transformers, gptqmodel, lm_eval
    import_s = time.perf_counter() - t0
    from slmsearch.search import storage as storage_mod
    from slmsearch.search import study as study_mod

    storage_dir = Path(tempfile.mkdtemp(prefix="bench-trial-cost-"))
    config = build_config(args, storage_dir)
    params = {**PLAN_64MB, **(json.loads(args.params) if args.params else {})}

    warm_s = 0.0
    if not args.no_warmup:
        print("[trial_cost] warm-up (per-process costs) ...", file=sys.stderr, flush=True)
        warm_s = warm_up(config, cache)
        prof.reset()

    storage = storage_mod.open_storage(storage_mod.storage_url(config))
    study = study_mod.open_study(config, storage)
    study.enqueue_trial(params)

    # The root timer: the study's own call that runs one trial (sampler, storage, gc included).
    import optuna.study.study as optuna_study_mod

    prof.patch_attr(optuna_study_mod.Study, "optimize", "trial (optuna loop, storage, Python)", "phase")
    print(f"[trial_cost] trial {params} ...", file=sys.stderr, flush=True)
    t1 = time.perf_counter()
    with optimize_walls() as walls:
        summary = study_mod.optimize(config, log=lambda s: print(f"[optimize] {s}", file=sys.stderr, flush=True))
    optimize_s = time.perf_counter() - t1
    prof.unpatch()
    trial_s = sum(walls)
    unavoidable = prof.unavoidable_s()
    study = study_mod.open_study(config, storage_mod.open_storage(storage_mod.storage_url(config)))
    trial = [t for t in study.get_trials(deepcopy=False) if t.user_attrs.get("plan")][-1]
    attrs = {k: trial.user_attrs.get(k) for k in ("stage_seconds", "eval_seconds", "seconds_total", "cache_hits",
                                                  "wikitext_token_ppl", "wikitext_word_ppl", "triviaqa_exact_match",
                                                  "footprint_mb", "plan")}
    rows = prof.rows()
    work_total = sum(s for _, k, s, _ in rows if k == "work")
    report_only = sum(s for label, k, s, _ in rows if k == "work" and "report only" in label)
    return {
        "machine": machine(), "cache": str(cache), "params": params, "state": str(trial.state),
        "import_s": import_s, "warmup_s": warm_s, "optimize_s": optimize_s,
        "trial_s": trial_s, "unavoidable_s": unavoidable, "work_sum_s": work_total,
        "report_only_work_s": report_only, "ratio": trial_s / unavoidable if unavoidable else float("inf"),
        "ratio_without_report_only": trial_s / (unavoidable - report_only) if unavoidable > report_only else None,
        "work_threads": dict(prof.work_threads), "rows": rows, "missing": missing,
        "summary": {k: summary[k] for k in ("completed", "pruned", "failed", "rejected_by_budget")},
        "attrs": attrs, "config": {"calibration": config.calibration.to_dict(), "evaluation": config.evaluation.to_dict()},
        "_prof": prof,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the study's model)")
    ap.add_argument("--study", help="study YAML (default studies/default.yaml)")
    ap.add_argument("--params", help="JSON: space parameters overriding the 64 MB plan's")
    ap.add_argument("--evaluation", help="JSON: evaluation settings overriding the study's (tests)")
    ap.add_argument("--calibration", help="JSON: calibration settings overriding the study's (tests)")
    ap.add_argument("--space", help="JSON: space settings overriding the study's (tests)")
    ap.add_argument("--budget-mb", type=float)
    ap.add_argument("--threads", type=int, help="torch.set_num_threads before the trial")
    ap.add_argument("--cache-root", help="parent of the fresh cache folder (default $SLMSEARCH_CACHE or /tmp/bench-cache)")
    ap.add_argument("--no-warmup", action="store_true", help="measure a first trial (per-process costs included)")
    ap.add_argument("--json", help="write the result here")
    args = ap.parse_args(argv)
    res = measure(args)
    prof = res.pop("_prof")
    print(f"machine: {res['machine']}")
    print(f"plan params: {res['params']}  (trial state {res['state']}, {res['summary']})")
    print(f"per-process, not counted: imports {res['import_s']:.1f} s, warm-up {res['warmup_s']:.1f} s")
    print()
    print(format_profile(prof, res["trial_s"], res["unavoidable_s"]))
    print()
    print(f"trial wall time            : {res['trial_s']:8.1f} s")
    print(f"unavoidable (union of work): {res['unavoidable_s']:8.1f} s   (work threads: {res['work_threads']})")
    print(f"  of which report-only forwards (LoRA held-out loss): {res['report_only_work_s']:.1f} s")
    print(f"total / unavoidable        : {res['ratio']:8.2f}   (goal <= {GOAL})")
    if res["ratio_without_report_only"]:
        print(f"total / (unavoidable - report-only forwards): {res['ratio_without_report_only']:.2f}")
    print(f"trial attrs: stage_seconds={res['attrs']['stage_seconds']} eval_seconds={res['attrs']['eval_seconds']}")
    if res["missing"]:
        print(f"not instrumented: {res['missing']}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
