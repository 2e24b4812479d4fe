"""What the embedding's GPTQ costs in recall, and how much dampening buys back.

The tied embedding is read twice per token: as the lm_head (every logit) and as the input lookup
(one row). GPTQ's Hessian sees only the first; its error compensation makes single rows worse
than rounding does. ``embedding.damp`` (gptqmodel's ``damp_percent``) adds an isotropic term, the
weight of a row's own error. This bench scores each damp value, and the rounded embedding, on:

- token perplexity over the first 4 x 512 WikiText test windows (as every bench);
- the mean log-probability of the gold answer on TriviaQA questions 200-999 (the *tuning*
  questions: never the 200 that ``bench/quality_at_budget.py`` reports; zero-shot, the
  question prompt alone, so 800 questions cost about a minute);
- exact match on the reported first 200 questions, for the record (chosen on nothing).

Two settings of the rest of the model: ``alone`` (only the embedding quantized) and ``anchor`` (the
64 MB anchor plan: 3-bit layers, 4 widened, the KV cache at 4 bits). Found (docs/benchmarks.md
section 6): alone, damp moves nothing; in the anchor, 0.25 keeps 1.04 nats more of the gold
answers than 0.05 for 2.4% token ppl, hence the default.
Appends one JSON line per configuration to bench/results/embedding_damp.jsonl.

Run (real model; the GPTQ embedding ~70 s, an anchor's layers ~2 min, the scoring ~1.5 min):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/embedding_damp.py [alone|anchor] [DAMP|rtn ...] [--no-dense]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, machine, quiet_env  # noqa: E402

OUT = REPO / "bench" / "results" / "embedding_damp.jsonl"
TUNING = slice(200, 1000)  # questions scored for the choice; the reported ones are the first 200
EMB = {"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4}
REST = {
    "alone": [],
    "anchor": [{"stage": "gptq", "bits": 3, "group_size": 64, "mse": 2.4, "wider_layers": 4},
               {"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}],
}
DEFAULT_VARIANTS = ("rtn", "0.05", "0.25", "0.9")


def plan_stages(setting: str, variant: str) -> list[dict[str, Any]]:
    """The plan of one configuration: the embedding rounded (``rtn``) or by GPTQ at damp ``variant``."""
    emb = dict(EMB) if variant == "rtn" else {**EMB, "gptq": True, "damp": float(variant)}
    return [emb, *REST[setting]]


def gold_logprob(model: Any, tok: Any, data_dir: Path) -> float:
    """Mean log p(gold answer | zero-shot prompt) over the tuning questions."""
    from slmsearch.data import triviaqa_split
    from slmsearch.evals.triviaqa import answer_logprobs

    scored, _ = triviaqa_split(data_dir)
    rows = scored[TUNING]
    values = answer_logprobs(model, tok, [r["context"] for r in rows], [r["answer"] for r in rows], batch_size=32)
    return sum(values) / len(values)


def main() -> None:
    quiet_env()
    from slmsearch import checkpoint
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.data import resolve_data_dir
    from slmsearch.evals.runner import evaluate
    from slmsearch.evals.settings import EvalSettings
    from slmsearch.models import load_model
    from slmsearch.search.config import load_study_config

    args = sys.argv[1:]
    setting = args.pop(0) if args and args[0] in REST else "alone"
    with_dense = "--no-dense" not in args
    args = [a for a in args if a != "--no-dense"]
    variants = args or list(DEFAULT_VARIANTS)
    data = resolve_data_dir(None)
    calib = load_study_config(None).calibration
    cache = StageCache()
    settings = EvalSettings(metrics=("wikitext_token_ppl", "triviaqa_exact_match"), token_windows=4, triviaqa_limit=200)
    for variant in ["dense", *variants] if with_dense else variants:
        start = time.perf_counter()
        if variant == "dense":
            model, tok = load_model(None)
            label = "dense"
        else:
            plan = Plan.from_dict(plan_stages(setting, variant))
            result = run(plan, None, data, calib, cache=cache)
            model, tok = checkpoint.load(result.checkpoint_dir, dense=True)
            label = plan.label()
        compress_s = time.perf_counter() - start
        out = evaluate(model, tok, data, settings)
        row = {"setting": setting, "variant": variant, "plan": label,
               "token_ppl": round(out["wikitext_token_ppl"], 3),
               "gold_logprob_0shot_q200_999": round(gold_logprob(model, tok, data), 4),
               "triviaqa_em_first200": out["triviaqa_exact_match"],
               "compress_s": round(compress_s, 1), "machine": machine()}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
