"""Quality at the budget: the best feasible plan a study finds at 48, 64, 96 and 128 MB on the
default model, with this turn's levers ("new": KV-cache precision, embedding groups, mixed
precision by sensitivity, GPTQ's scale search, distilled recovery) and restricted to last turn's
("last_turn": float KV cache, per-row embedding scales, one GPTQ width, plain GPTQ, plain LoRA),
side by side, plus a llama.cpp peer ("llama.cpp").

Each study runs ``--trials`` evaluated trials (the baseline, the anchors, then the sampler) with
the default study's evaluation, on one stage cache; then its best feasible trial (lowest token
perplexity on the first windows) is scored again on the first 4 x 512 WikiText test windows,
lm-eval's word perplexity and TriviaQA exact match on 200 questions, beside the dense model on
the same data.

The peer (bench/_llamacpp_peer.py; needs ``pip install .[peer]``, llama-cpp-python built from its
sdist, and that sdist's llama.cpp tree for convert_hf_to_gguf.py, ``--llama-cpp-src``): the dense
model converted to an f32 GGUF, quantized by llama.cpp's quantizer to the same bytes as our plans.
Rule: GGUF tensor bytes + the KV cache at 4 bits (groups of 32) + the activation peak, as the
hardware model counts them for our "kv4" plans at context 512 (3.79 MB with 30 layers), within the
budget; the fewest layers dropped (angular ranking, the quantizer's ``prune_layers``), then the
fitting llama.cpp type (ftype, its own mix or pure) of lowest token perplexity on the same windows;
loaded back by transformers' GGUF loader and scored like the studies' best. Its KV cache is
counted at 4 bits but scored in float, as transformers runs it.

Writes bench/results/quality_at_budget.csv (one row per budget and search): the rows of the
searches run replace their earlier rows; other rows, and the dense row once scored, are kept.

Run (real model; ~12 min per study on 2 cores with 3 trials):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/quality_at_budget.py [--trials 3] [--budgets 48 64 96 128]
The peer alone (~28 min for the four budgets on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/quality_at_budget.py --searches llama.cpp \
      --llama-cpp-src /tmp/llpkg/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, fresh_cache, machine, quiet_env  # noqa: E402

OUT = REPO / "bench" / "results" / "quality_at_budget.csv"
COLUMNS = ["budget_mb", "search", "token_ppl", "ratio_to_dense", "word_ppl", "triviaqa_em", "footprint_mb", "plan",
           "trials", "study_minutes", "note"]
# Last turn's levers: what the space held before KV-cache precision, embedding groups, mixed
# precision, the scale search, distillation and 8-bit scale codes were added.
LAST_TURN = {"kv_cache_bits": (16,), "embedding_groups": (0,), "embedding_gptq": False, "wider_fraction": (0.0, 0.0), "gptq_mse": (0.0,),
             "layer_grids": ("gptq",), "embedding_grids": ("sym",), "embedding_wide_fraction": (0.0, 0.0),
             "lora_loss": ("lm",), "gptq_scale_bits": (16,)}


FINAL_METRICS = ("wikitext_token_ppl", "wikitext_word_ppl", "triviaqa_exact_match")


def scores(model: Any, tok: Any, data_dir: Path, metrics: tuple[str, ...] = FINAL_METRICS) -> dict[str, float]:
    """Token ppl (first 4 x 512), word ppl (lm-eval, 2 pages) and TriviaQA EM (200 questions)."""
    from slmsearch.evals.runner import evaluate
    from slmsearch.evals.settings import EvalSettings

    settings = EvalSettings(metrics=metrics, token_windows=4, word_pages=2, word_max_length=1024, triviaqa_limit=200)
    out = evaluate(model, tok, data_dir, settings)
    names = {"wikitext_token_ppl": "token_ppl", "wikitext_word_ppl": "word_ppl", "triviaqa_exact_match": "triviaqa_em"}
    return {names[m]: out[m] for m in metrics}


def final_scores(folder: Path | None, data_dir: Path) -> dict[str, float]:
    """:func:`scores` of a checkpoint folder, or of the dense model (``None``)."""
    from slmsearch import checkpoint
    from slmsearch.models import load_model

    model, tok = checkpoint.load(folder, dense=True) if folder is not None else load_model(None)
    return scores(model, tok, data_dir)


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


def run_peer(budgets: list[float], src: Path, data_dir: Path, work: Path) -> Iterator[dict[str, Any]]:
    """The llama.cpp peer's row at each budget, as each is scored (see bench/_llamacpp_peer.py)."""
    import _llamacpp_peer as peer

    from slmsearch.compress.calib import Calibration
    from slmsearch.compress.depth import importance_scores, select_layers
    from slmsearch.hwmodel.shape import ModelShape
    from slmsearch.models import default_checkpoint, load_model
    from slmsearch.search.config import load_study_config
    from slmsearch.search.space import kv_cache_group

    config = load_study_config(None)
    work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    f32 = peer.convert_dense(default_checkpoint(), src, work / "dense-f32.gguf")
    sized = peer.size_candidates(f32, work)
    dense, tok = load_model(None)
    angular = importance_scores(dense, Calibration.from_data(tok, data_dir, config.calibration), with_ppl=False)
    del dense
    print(f"  llama.cpp: converted, {len(sized)} candidates sized, layers ranked in {(time.perf_counter() - start) / 60:.1f} min",
          file=sys.stderr, flush=True)
    base = ModelShape.from_checkpoint(default_checkpoint())
    group = kv_cache_group(config.space, {"head_dim": base.layers[0].head_dim})

    def non_weight(dropped: tuple[int, ...]) -> int:
        return peer.non_weight_bytes(base, dropped, group, config.context_len, config.prefill_len)

    def token_ppl(path: Path) -> float:
        return scores(peer.load_gguf(path), tok, data_dir, ("wikitext_token_ppl",))["token_ppl"]

    def ranking(n: int) -> tuple[int, ...]:  # the n layers our depth stage drops (by="angular", block=1)
        return tuple(select_layers(angular, n, "angular", 1)) if n else ()

    memo: dict[str, float] = {}
    for budget in budgets:
        start = time.perf_counter()
        choice = peer.choose(budget * 1e6, sized, f32, work, ranking=ranking, non_weight=non_weight,
                             token_ppl=token_ppl, memo=memo)
        if choice is None:
            yield {"budget_mb": budget, "search": "llama.cpp", "note": "no llama.cpp type fits"}
            continue
        found = scores(peer.load_gguf(choice.path), tok, data_dir)
        extra_mb = (choice.footprint_bytes - choice.tensor_bytes) / 1e6
        yield {"budget_mb": budget, "search": "llama.cpp", **found, "footprint_mb": choice.footprint_bytes / 1e6,
               "plan": choice.plan(), "trials": choice.fitting, "study_minutes": (time.perf_counter() - start) / 60,
               "note": f"GGUF tensors {choice.tensor_bytes / 1e6:.2f} MB + KV 4-bit/activations {extra_mb:.2f} MB; "
                       f"dropped {list(choice.dropped)}; best of {choice.fitting} fitting types by token ppl"}


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def row_key(row: dict[str, Any]) -> tuple[str, str]:
    budget = str(row["budget_mb"])
    return (budget if budget == "dense" else f"{float(budget):g}", str(row["search"]))


def write_rows(path: Path, rows: list[dict[str, Any]]) -> None:
    """``rows`` into the CSV at ``path``: each replaces the row of its budget and search, in place."""
    merged = {row_key(r): r for r in read_rows(path)}
    for r in rows:
        merged[row_key(r)] = {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in r.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(merged.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", type=float, nargs="+", default=[48.0, 64.0, 96.0, 128.0])
    parser.add_argument("--searches", nargs="+", choices=["new", "last_turn", "llama.cpp"],
                        default=["new", "last_turn", "llama.cpp"])
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--llama-cpp-src", type=Path, help="a llama.cpp tree (the llama-cpp-python sdist's "
                        "vendor/llama.cpp) for convert_hf_to_gguf.py and gguf-py; needed by the llama.cpp peer")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    if "llama.cpp" in args.searches and (args.llama_cpp_src is None or not (args.llama_cpp_src / "convert_hf_to_gguf.py").is_file()):
        parser.error("the llama.cpp peer needs --llama-cpp-src DIR holding convert_hf_to_gguf.py (or leave llama.cpp out of --searches)")
    quiet_env()
    cache = fresh_cache("quality_at_budget")
    from slmsearch.data import resolve_data_dir

    data_dir = resolve_data_dir(None)
    print(f"machine: {machine()}", file=sys.stderr)
    dense_row = next((r for r in read_rows(args.out) if r["search"] == "dense"), None)
    if dense_row is None:  # scored once; later runs keep it
        dense = final_scores(None, data_dir)
        dense_row = {"budget_mb": "dense", "search": "dense", **dense, "ratio_to_dense": 1.0, "plan": "baseline",
                     "note": machine()}
        write_rows(args.out, [dense_row])
    dense_ppl = float(dense_row["token_ppl"])
    print(f"dense: token ppl {dense_ppl}", file=sys.stderr)
    for budget in args.budgets:
        for search in [s for s in args.searches if s != "llama.cpp"]:
            found = run_study(budget, search, args.trials, data_dir, cache)
            row = {"budget_mb": budget, "search": search, **found}
            if "token_ppl" in row:
                row["ratio_to_dense"] = row["token_ppl"] / dense_ppl
            print(json.dumps(row), flush=True)
            write_rows(args.out, [row])  # after each study: a partial run keeps its rows
    if "llama.cpp" in args.searches:
        for row in run_peer(args.budgets, args.llama_cpp_src, data_dir, cache / "llamacpp"):
            if "token_ppl" in row:
                row["ratio_to_dense"] = row["token_ppl"] / dense_ppl
            print(json.dumps(row), flush=True)
            write_rows(args.out, [row])


if __name__ == "__main__":
    main()
