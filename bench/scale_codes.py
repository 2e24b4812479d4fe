"""GPTQ scales as 8-bit codes: what rounding them costs, and what the bytes they free buy at 64 MB.

A GPTQ Linear stores one fp16 scale per group and output: at 3-bit g64 on SmolLM2-135M that is
3.3 MB of the 64 MB budget. ``gptq.scale_bits: 8`` stores each scale as a code on a log2 grid
spanning its tensor's scales (compress/kernels.py ``log_scale_grid``), half of that. Three models,
each scored on the first 4 x 512 WikiText test windows, the mean log-probability of the gold
answer on TriviaQA questions 200-999 (zero-shot; never the reported ones) and exact match on the
reported first 200 (5-shot, as every table):

- ``fp16``: the 64 MB anchor of the twelfth session (embedding 4-bit g64 by GPTQ, layers GPTQ 3-bit
  g64 with the scale search and 4 layers at 4 bits, KV cache 4-bit), fp16 scales;
- ``fp16 -> 8-bit``: the same folder with its scales rounded onto 8-bit grids (what the stage does
  after GPTQ): the cost of the codes alone;
- ``8-bit anchor``: the anchor the default space places now: the 1.66 MB buy 3 more layers at 4
  bits and the embedding's first 1,024 token ids at 8 bits (63.9 MB);
- ``... the embedding's scales too``: its packed scales as 8-bit codes as well
  (``embedding.scale_bits: 8``, 0.44 MB): one more layer at 4 bits.

``--only NAME ...`` runs some of them.

Appends one JSON line per model to bench/results/scale_codes.jsonl.

Run (real model; ~4 min per GPTQ run, ~3 min of scoring per model):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/scale_codes.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, fresh_cache, machine, quiet_env  # noqa: E402
from embedding_damp import gold_logprob  # noqa: E402

OUT = REPO / "bench" / "results" / "scale_codes.jsonl"
EMB = {"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4, "gptq": True, "damp": 0.25}
GPTQ = {"stage": "gptq", "bits": 3, "group_size": 64, "mse": 2.4, "wider_layers": 4}
KV = {"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}
MODELS: dict[str, list[dict[str, Any]]] = {
    "fp16": [EMB, GPTQ, KV],
    "fp16 -> 8-bit": [EMB, GPTQ, KV],  # the same plan, its folder's scales then rounded
    "8-bit anchor": [{**EMB, "wide_rows": 1024}, {**GPTQ, "scale_bits": 8, "wider_layers": 7}, KV],
    "8-bit anchor, the embedding's scales too": [{**EMB, "wide_rows": 1024, "scale_bits": 8},
                                                 {**GPTQ, "scale_bits": 8, "wider_layers": 8}, KV],
}


def main() -> None:
    only = sys.argv[sys.argv.index("--only") + 1:] if "--only" in sys.argv else list(MODELS)
    unknown = sorted(set(only) - set(MODELS))
    if unknown:
        raise SystemExit(f"error: unknown model(s) {unknown}; choose from {list(MODELS)}")
    quiet_env()
    from slmsearch import checkpoint
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.data import resolve_data_dir
    from slmsearch.evals.runner import evaluate
    from slmsearch.evals.settings import EvalSettings
    from slmsearch.hwmodel.estimate import footprint_bytes
    from slmsearch.models import resolve_model
    from slmsearch.search.config import load_study_config
    from slmsearch.search.hardware import base_shape

    config = load_study_config(None)
    data = resolve_data_dir(None)
    cache = StageCache(fresh_cache("scale_codes"))
    settings = EvalSettings(metrics=("wikitext_token_ppl", "triviaqa_exact_match"), token_windows=4, triviaqa_limit=200)
    base = base_shape(resolve_model(None))
    with tempfile.TemporaryDirectory(prefix="scale-codes-") as tmp:
        for name, stages in MODELS.items():
            if name not in only:
                continue
            start = time.perf_counter()
            plan = Plan.from_dict(stages)
            folder = run(plan, None, data, config.calibration, cache=cache).checkpoint_dir
            if name == "fp16 -> 8-bit":
                copy = Path(tmp) / "rounded"
                checkpoint.copy_folder(folder, copy)
                checkpoint.write_scale_grids(copy, 8)
                folder, plan = copy, Plan.from_dict([EMB, {**GPTQ, "scale_bits": 8}, KV])
            compress_s = time.perf_counter() - start
            model, tok = checkpoint.load(folder, dense=True)
            out = evaluate(model, tok, data, settings)
            footprint = footprint_bytes(plan.shape(base), context_len=config.context_len) / 1e6
            row = {"model": name, "plan": plan.label(), "footprint_mb": round(footprint, 2),
                   "token_ppl": round(out["wikitext_token_ppl"], 3),
                   "gold_logprob_0shot_q200_999": round(gold_logprob(model, tok, data), 4),
                   "triviaqa_em_first200": out["triviaqa_exact_match"], "compress_s": round(compress_s, 1),
                   "machine": machine()}
            print(json.dumps(row), flush=True)
            with OUT.open("a") as f:
                f.write(json.dumps(row) + "\n")
            shutil.rmtree(Path(tmp) / "rounded", ignore_errors=True)


if __name__ == "__main__":
    main()
