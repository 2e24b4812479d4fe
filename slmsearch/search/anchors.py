"""Anchor plans: feasible, sensible starting points enqueued right after the baseline.

Under a tight budget most of the default space is infeasible or broken: at 64 MB a random plan
of SmolLM2-135M is usually over budget (rejected, free) or 2-bit (perplexity 1e4-1e6, pruned), and
NSGA-II's first generation is random sampling. A study of 8 trials then evaluates few usable
plans. The anchors give the sampler one usable point per weight precision from the start: for
each GPTQ width of 3 bits or more in the space (widest first), the plan that removes the fewest
layers while fitting the budget (no WANDA, the smallest embedding precision, the largest group
size that divides the model, LoRA recovery when layers are dropped, no EoRA). Priced by the
hardware model only: choosing them compresses nothing.
"""

from __future__ import annotations

from typing import Any

from slmsearch.compress.plan import Plan
from slmsearch.search.config import SpaceConfig
from slmsearch.search.space import base_dims, plan_from_params, valid_group_sizes

MIN_ANCHOR_BITS = 3  # 2-bit GPTQ breaks SmolLM2 (docs/benchmarks.md: every 2-bit grid point ppl > 1e6)
MAX_ANCHORS = 2


def anchor_params(
    space: SpaceConfig, base_shape: Any, footprint_mb: Any, budget_mb: float, *, max_anchors: int = MAX_ANCHORS
) -> list[dict[str, Any]]:
    """Parameter sets (as ``study.enqueue_trial`` takes them) of up to ``max_anchors`` feasible anchor plans.

    ``footprint_mb(shape) -> float`` prices a shape (the study passes the hardware model).
    """
    if "none" not in space.wanda_patterns or 0 not in space.eora_ranks:
        return []  # the space cannot express an anchor (no WANDA, no EoRA)
    dims = base_dims(base_shape)
    n_layers = len(base_shape.layers)
    group = max([g for g in valid_group_sizes(space, dims) if g > 0] or [-1])
    lo, hi = space.drop_layers
    hi = min(hi, n_layers - 1)
    lora = 8 if 8 in space.lora_ranks else max(space.lora_ranks)
    out: list[dict[str, Any]] = []
    for bits in sorted((b for b in space.gptq_bits if MIN_ANCHOR_BITS <= b < 16), reverse=True):
        for drop in range(min(lo, hi), hi + 1):
            params: dict[str, Any] = {
                "drop_layers": drop, "wanda_pattern": "none", "lora_rank": lora if drop or 0 not in space.lora_ranks else 0,
                "embedding_bits": min(space.embedding_bits), "gptq_bits": bits,
                "group_size": group, "act_order": space.act_order[0], "eora_rank": 0,
            }
            if footprint_mb(anchor_plan(params, space, base_shape).shape(base_shape)) <= budget_mb:
                out.append(params)
                break
        if len(out) >= max_anchors:
            break
    return out


def anchor_plan(params: dict[str, Any], space: SpaceConfig, base_shape: Any) -> Plan:
    """The plan an anchor's parameters stand for (fixed settings such as LoRA steps from the space)."""
    return plan_from_params({**params, "lora_steps": space.lora_steps}, space, base_dims(base_shape), len(base_shape.layers))
