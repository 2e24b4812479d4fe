"""Each quality lever alone (and the 64 MB anchor) on the default model: token perplexity over the
first 4 x 512 WikiText test windows, the deployed footprint (context 512) and the compression time.

Every configuration is a plan run through the pipeline on the user's stage cache with the default
study's calibration (16 x 256 tokens of wiki.valid), then scored with the same windows as the
dense model. Appends one JSON line per configuration to bench/results/levers.jsonl.

Run (real model; GPTQ configurations take 1-3 min each on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/levers.py [NAME ...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, machine, quiet_env  # noqa: E402

OUT = REPO / "bench" / "results" / "levers.jsonl"
G3 = {"stage": "gptq", "bits": 3, "group_size": 64}
EH = {"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4, "gptq": True}
CONFIGS: dict[str, list[dict]] = {
    "dense": [],
    "embedding 4-bit per row": [{"stage": "embedding", "bits": 4}],
    "embedding 4-bit g64": [{"stage": "embedding", "bits": 4, "group_size": 64}],
    "embedding 4-bit g32": [{"stage": "embedding", "bits": 4, "group_size": 32}],
    "embedding 4-bit g64 clip-search": [{"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4}],
    "embedding 4-bit g32 clip-search": [{"stage": "embedding", "bits": 4, "group_size": 32, "mse": 2.4}],
    "kv cache 8-bit g64": [{"stage": "kv_cache", "bits": 8, "group_size": 64}],
    "kv cache 4-bit g64": [{"stage": "kv_cache", "bits": 4, "group_size": 64}],
    "kv cache 4-bit g32": [{"stage": "kv_cache", "bits": 4, "group_size": 32}],
    "kv cache 4-bit g16": [{"stage": "kv_cache", "bits": 4, "group_size": 16}],
    "kv cache 4-bit, keys g16, values g64": [{"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}],
    "kv cache 4-bit, keys g32, values g64, rotated": [{"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 32,
                                                       "rotate": True}],
    "kv cache 4-bit g64 rotated": [{"stage": "kv_cache", "bits": 4, "group_size": 64, "rotate": True}],
    "embedding 4-bit g64 clip-search gptq": [{"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4, "gptq": True}],
    "embedding 4-bit g32 clip-search gptq": [{"stage": "embedding", "bits": 4, "group_size": 32, "mse": 2.4, "gptq": True}],
    "gptq 3-bit g64": [G3],
    "gptq 3-bit g64 act_order": [{**G3, "act_order": True}],
    "gptq 3-bit g64 gptaq": [{**G3, "gptaq": True}],
    "gptq 3-bit g64 scale search": [{**G3, "mse": 2.4}],
    "gptq 3-bit g64 asymmetric": [{**G3, "sym": False}],
    "gptq 3-bit g64 scale search asymmetric": [{**G3, "mse": 2.4, "sym": False}],
    "gptq 3-bit per channel": [{"stage": "gptq", "bits": 3, "group_size": -1}],
    "gptq 3-bit g64 + 8 layers 4-bit": [{**G3, "wider_layers": 8}],
    "gptq 3-bit g64 scale search + 8 layers 4-bit": [{**G3, "mse": 2.4, "wider_layers": 8}],
    "gptq 4-bit g64": [{"stage": "gptq", "bits": 4, "group_size": 64}],
    "gptq 4-bit g64 scale search": [{"stage": "gptq", "bits": 4, "group_size": 64, "mse": 2.4}],
    "64 MB anchor": [{"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4}, {**G3, "mse": 2.4, "wider_layers": 1},
                     {"stage": "kv_cache", "bits": 4, "group_size": 32}],
    # the 64 MB anchor once finished checkpoints leave out g_idx and symmetric zeros (1.2 MB): the
    # anchor rule's choice (finer embedding groups, 2 layers wider) and two ways to spend the room on layers
    "64 MB anchor, compact": [{"stage": "embedding", "bits": 4, "group_size": 32, "mse": 2.4},
                              {**G3, "mse": 2.4, "wider_layers": 2}, {"stage": "kv_cache", "bits": 4, "group_size": 32}],
    # the minmax stage (fp16 scale and minimum per group of 32: llama.cpp's Q4_1 layout) alone, and the
    # plans it makes at 96 and 128 MB (thirteenth session)
    "minmax 4-bit g32": [{"stage": "minmax", "bits": 4, "group_size": 32}],
    "minmax 4-bit g64": [{"stage": "minmax", "bits": 4, "group_size": 64}],
    "96 MB minmax, kv 4-bit": [{**EH, "group_size": 32}, {"stage": "minmax", "bits": 4, "group_size": 32},
                               {"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}],
    "96 MB minmax, kv 8-bit": [{**EH, "group_size": 32}, {"stage": "minmax", "bits": 4, "group_size": 32},
                               {"stage": "kv_cache", "bits": 8, "group_size": 64}],
    "embedding 4-bit g32 minmax": [{"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax"}],
    "96 MB minmax, embedding minmax, kv 8-bit": [{"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax"},
                                                 {"stage": "minmax", "bits": 4, "group_size": 32},
                                                 {"stage": "kv_cache", "bits": 8, "group_size": 64}],
    # the embedding's first token ids at 8 bits (fourteenth session): the count was looked at on 6 x 512
    # held-out wiki.valid windows (4,096 .. 24,576 rows), 16,384 is what 96 MB leaves room for
    "embedding 4-bit g32 minmax, first 4096 ids 8-bit": [{"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax",
                                                          "wide_rows": 4096}],
    "embedding 4-bit g32 minmax, first 8192 ids 8-bit": [{"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax",
                                                          "wide_rows": 8192}],
    "embedding 4-bit g32 minmax, first 16384 ids 8-bit": [{"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax",
                                                           "wide_rows": 16384}],
    "embedding 4-bit g64 gptq, first 4096 ids 8-bit": [{**EH, "wide_rows": 4096}],
    "96 MB minmax, embedding minmax + 16k ids 8-bit, kv 8-bit": [
        {"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax", "wide_rows": 16384},
        {"stage": "minmax", "bits": 4, "group_size": 32}, {"stage": "kv_cache", "bits": 8, "group_size": 64}],
    "128 MB minmax, embedding 8-bit g32": [{"stage": "embedding", "bits": 8, "group_size": 32},
                                           {"stage": "minmax", "bits": 4, "group_size": 32}],
    "128 MB minmax, embedding 16-bit, kv 4-bit": [{"stage": "minmax", "bits": 4, "group_size": 32},
                                                  {"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}],
    "64 MB, embedding g64, 4 layers wider": [{"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4},
                                             {**G3, "mse": 2.4, "wider_layers": 4}, {"stage": "kv_cache", "bits": 4, "group_size": 32}],
    "64 MB, embedding g64, 5 layers wider, kv g64": [{"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4},
                                                     {**G3, "mse": 2.4, "wider_layers": 5}, {"stage": "kv_cache", "bits": 4, "group_size": 64}],
    # the embedding by GPTQ over the lm_head's inputs (eleventh session), and finer key groups or rotated keys
    "64 MB, embedding gptq, 4 layers wider": [EH, {**G3, "mse": 2.4, "wider_layers": 4}, {"stage": "kv_cache", "bits": 4, "group_size": 32}],
    "64 MB, embedding gptq, 4 layers wider, keys g16 values g64": [
        EH, {**G3, "mse": 2.4, "wider_layers": 4}, {"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}],
    "64 MB, embedding g64, 4 layers wider, keys g16 values g64": [
        {"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4}, {**G3, "mse": 2.4, "wider_layers": 4},
        {"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}],
    "64 MB, embedding gptq, 5 layers wider, kv g64 rotated": [
        EH, {**G3, "mse": 2.4, "wider_layers": 5}, {"stage": "kv_cache", "bits": 4, "group_size": 64, "rotate": True}],
}


def main() -> None:
    quiet_env()
    from slmsearch import checkpoint
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.data import resolve_data_dir
    from slmsearch.evals.wikitext import token_perplexity
    from slmsearch.hwmodel.estimate import footprint_bytes
    from slmsearch.search.config import load_study_config

    data = resolve_data_dir(None)
    calib = load_study_config(None).calibration
    names = sys.argv[1:] or list(CONFIGS)
    cache = StageCache()
    from slmsearch.models import resolve_model
    from slmsearch.search.hardware import base_shape

    base = base_shape(resolve_model(None))
    for name in names:
        plan = Plan.from_dict(CONFIGS[name])
        start = time.perf_counter()
        result = run(plan, None, data, calib, cache=cache)
        seconds = time.perf_counter() - start
        model, tok = checkpoint.load(result.checkpoint_dir, dense=True)
        ppl, _ = token_perplexity(model, tok, data, seqlen=512, n_windows=4)
        row = {"name": name, "plan": plan.label(), "token_ppl": round(ppl, 3),
               "footprint_mb": round(footprint_bytes(plan.shape(base), context_len=512) / 1e6, 2),
               "compress_s": round(seconds, 1), "cache_hits": result.cache_hits, "machine": machine()}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
