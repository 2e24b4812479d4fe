"""Recovery by distillation against plain LM loss, with the control the issue asks for: token
perplexity on the first 4 x 512 WikiText-2 test windows after dropping 4 layers (angular) and
training LoRA r8 for 60 steps on wiki.valid windows with each loss, and the dense model given the
same fine-tuning (what the LM loss gains there is adaptation to WikiText's text, not recovery).

Run (real model; ~3 min per configuration on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/distill.py
Appends JSON lines to bench/results/distill.jsonl.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, machine, quiet_env  # noqa: E402

OUT = REPO / "bench" / "results" / "distill.jsonl"
LORA = {"stage": "lora", "rank": 8, "steps": 60, "lr": 5e-4, "heldout": 0}
CONFIGS = {
    "drop4": [{"stage": "depth", "drop": 4}],
    "drop4 + lora lm": [{"stage": "depth", "drop": 4}, {**LORA, "loss": "lm"}],
    "drop4 + lora kd": [{"stage": "depth", "drop": 4}, {**LORA, "loss": "kd"}],
    "dense + lora lm (control)": [{**LORA, "loss": "lm"}],
    "dense + lora kd (control)": [{**LORA, "loss": "kd"}],
}


def main() -> None:
    quiet_env()
    from slmsearch import checkpoint
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.data import resolve_data_dir
    from slmsearch.evals.wikitext import token_perplexity
    from slmsearch.search.config import load_study_config

    data = resolve_data_dir(None)
    calib = load_study_config(None).calibration
    for name in sys.argv[1:] or list(CONFIGS):
        start = time.perf_counter()
        result = run(Plan.from_dict(CONFIGS[name]), None, data, calib, cache=StageCache())
        seconds = time.perf_counter() - start
        model, tok = checkpoint.load(result.checkpoint_dir)
        ppl, _ = token_perplexity(model, tok, data, seqlen=512, n_windows=4)
        row = {"name": name, "token_ppl": round(ppl, 3), "seconds": round(seconds, 1), "machine": machine()}
        print(json.dumps(row), flush=True)
        with OUT.open("a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
