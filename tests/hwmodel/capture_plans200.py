"""Capture the hardware numbers of 200 seeded random plans (the fixture of test_plans200.py).

Run once before a change that must not move the hardware model:
    .venv/bin/python tests/hwmodel/capture_plans200.py
The plans come from the study space's own ``plan_from_params``, over a space wider than the
default study's (every WANDA pattern, KV-group removal, act order, unmerged adapters are not
sampled by the study and are left out), on SmolLM2-135M and Llama-3.2-1B shapes, at four contexts.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

OUT = Path(__file__).with_name("data") / "plans200.json"


def random_params(rng: random.Random) -> dict[str, Any]:
    pattern = rng.choice(["none", "structured", "unstructured", "2:4", "4:8"])
    params: dict[str, Any] = {
        "drop_layers": rng.randint(0, 14),
        "wanda_pattern": pattern,
        "structured_fraction": round(rng.choice([0.0, 0.05, 0.1, 0.25, 0.4, 0.5]), 2),
        "kv_groups": rng.choice([0, 0, 1]),
        "structured_multiple": 64,
        "sparsity": round(rng.choice([0.1, 0.3, 0.5]), 2),
        "lora_rank": rng.choice([0, 4, 8, 16]),
        "lora_steps": 10,
        "embedding_bits": rng.choice([16, 8, 4]),
        "gptq_bits": rng.choice([2, 3, 4, 8, 16]),
        "group_size": rng.choice([32, 64, -1]),
        "act_order": rng.choice([False, True]),
        "eora_ranks": 0,
        "eora_rank": rng.choice([0, 8, 16, 32]),
    }
    return params


def cases() -> list[dict[str, Any]]:
    rng = random.Random(20261201)
    out = []
    for i in range(200):
        model = "smollm2_135m" if i % 4 else "llama32_1b"
        out.append({"model": model, "params": random_params(rng), "context_len": rng.choice([0, 128, 512, 2048])})
    return out


def numbers(case: dict[str, Any]) -> dict[str, Any]:
    """The plan and every number the hardware model gives for it (footprint, placement, passes)."""
    from slmsearch.hwmodel import estimate, load_platform
    from slmsearch.hwmodel import shape as shapes
    from slmsearch.search.config import SpaceConfig
    from slmsearch.search.space import base_dims, plan_from_params

    base = getattr(shapes, case["model"])()
    # the levers' settings the captured plans were made with (plain GPTQ with fp16 scales, max-abs embedding scales by
    # rounding, LM-loss LoRA, one KV-cache group of 32 for keys and values)
    space = SpaceConfig(kv_groups=(0, 1), gptq_mse=(0.0,), gptq_scale_bits=(16,), embedding_mse=(0.0,), embedding_scale_bits=(16,), lora_loss=("lm",),
                        embedding_gptq=False, kv_cache_group=32, kv_cache_key_group=0)
    plan = plan_from_params(case["params"], space, base_dims(base), base.n_layers)
    est = estimate(plan.shape(base), load_platform("siracusa"), context_len=case["context_len"], prefill_len=64)
    return {"plan": plan.to_dict(), "estimate": est.to_dict(with_ops=False)}


def main() -> None:
    rows = [dict(case, **numbers(case)) for case in cases()]
    OUT.parent.mkdir(exist_ok=True)
    OUT.write_text(json.dumps(rows, sort_keys=True, separators=(",", ":")) + "\n")
    print(f"wrote {len(rows)} plans to {OUT}")


if __name__ == "__main__":
    main()
