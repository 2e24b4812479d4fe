"""What a screen costs, with and without the remembered clip-search scales.

A screen (compress/proxy.py) runs a plan's depth / WANDA stages through the stage cache, rounds
its embedding (remembered per setting) and its layers at their widths, and scores the first 2 x
512 WikiText test windows. The layers' clip search (25 trial roundings of every weight) was
searched afresh for every screen; ``proxy.round_linears`` now remembers each layer's scales by
its weights' content (so plans that drop different layers share the layers they keep). This bench scores the same plans three times in one process: once to fill the stage
cache and the embedding memo (not reported), then with the scale memo emptied before every screen
(as before), then with it kept (as a study runs). Same plans, same scores (checked), seconds side
by side. Writes bench/results/screen_cost.json.

Run (the default model; ~5 min on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/screen_cost.py
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, machine, quiet_env  # noqa: E402

OUT = REPO / "bench" / "results" / "screen_cost.json"
E64 = {"stage": "embedding", "bits": 4, "group_size": 64, "mse": 2.4}
KV = {"stage": "kv_cache", "bits": 4, "group_size": 64, "key_group_size": 16}
# plans of the default study's space at 64 MB: two depths, two widths and groups each
PLANS = [
    [E64, {"stage": "gptq", "bits": 3, "group_size": 64, "mse": 2.4, "wider_layers": 4}, KV],
    [E64, {"stage": "gptq", "bits": 3, "group_size": 64, "mse": 2.4, "wider_layers": 8}, KV],
    [{"stage": "depth", "drop": 6}, E64, {"stage": "gptq", "bits": 4, "group_size": 64, "mse": 2.4}, KV],
    [{"stage": "depth", "drop": 6}, E64, {"stage": "gptq", "bits": 3, "group_size": 32, "mse": 2.4, "wider_layers": 9}, KV],
    [{"stage": "depth", "drop": 7}, E64, {"stage": "gptq", "bits": 4, "group_size": 64, "mse": 2.4}, KV],
    [{"stage": "depth", "drop": 7}, E64, {"stage": "gptq", "bits": 4, "group_size": 32, "mse": 2.4}, KV],
]


def main() -> None:
    quiet_env()
    from slmsearch.compress import proxy
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.plan import Plan
    from slmsearch.data import resolve_data_dir
    from slmsearch.models import resolve_model
    from slmsearch.search.config import load_study_config

    data = resolve_data_dir(None)
    calib = load_study_config(None).calibration
    base = str(resolve_model(None))
    cache = StageCache()
    plans = [Plan.from_dict(p) for p in PLANS]
    runs: dict[str, list[dict]] = {}
    for mode in ("warm-up", "searched every screen", "scales remembered"):
        proxy._SCALES.clear()
        rows = []
        for plan in plans:
            if mode == "searched every screen":
                proxy._SCALES.clear()
            start = time.perf_counter()
            score = proxy.score_plan(plan, base, data, calib, cache=cache)
            rows.append({"plan": plan.label(), "token_ppl": round(score.token_ppl, 4),
                         "seconds": round(time.perf_counter() - start, 1)})
            print(mode, rows[-1], flush=True)
        runs[mode] = rows
    before, after = runs["searched every screen"], runs["scales remembered"]
    same = all(a["token_ppl"] == b["token_ppl"] for a, b in zip(before, after, strict=True))
    result = {
        "plans": len(plans),
        "median_s_searched_every_screen": statistics.median(r["seconds"] for r in before),
        "median_s_scales_remembered": statistics.median(r["seconds"] for r in after),
        "total_s_searched_every_screen": round(sum(r["seconds"] for r in before), 1),
        "total_s_scales_remembered": round(sum(r["seconds"] for r in after), 1),
        "same_scores": same,
        "runs": runs,
        "machine": machine(),
    }
    result["speedup_total"] = round(result["total_s_searched_every_screen"] / result["total_s_scales_remembered"], 2)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
