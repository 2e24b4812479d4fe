"""Anchor plans: feasible, sensible starting points enqueued right after the baseline.

Under a tight budget most of the default space is infeasible or broken: at 64 MB a random plan
of SmolLM2-135M is usually over budget (rejected, free) or 2-bit (perplexity 1e4-1e6, pruned), and
NSGA-II's first generation is random sampling. A study of 8 trials then evaluates few usable
plans. The anchors give the sampler one usable point per weight precision from the start: for
each GPTQ width of 3 bits or more in the space, the plan that removes the fewest layers while
fitting the budget and widens as many layers as then fit (no WANDA, the smallest embedding
precision with the group that leaves the fewest layers to drop and then the most to widen, the largest GPTQ group size that
divides the model, the narrowest KV cache, LoRA recovery when layers are dropped, no EoRA); the
anchors are the ones that drop the fewest layers (then the wider width). Each fills the room
then left with 8-bit embedding rows (the upper end of ``space.embedding_wide_fraction``). Priced by the
hardware model only: choosing them compresses nothing.

When the space offers the minmax grid for the layers and a minmax plan fits with every layer kept,
that plan comes first, with the KV cache and embedding of the least prior cost that fit (each
measured alone on SmolLM2-135M: :data:`KV_COST`, :data:`EMBEDDING_COST`).
"""

from __future__ import annotations

from typing import Any

from slmsearch.compress.gptq import WIDER
from slmsearch.compress.plan import Plan
from slmsearch.search.budget import Fits, place_size
from slmsearch.search.config import SpaceConfig
from slmsearch.search.space import base_dims, kv_cache_params, plan_from_params, valid_group_sizes

MIN_ANCHOR_BITS = 3  # 2-bit GPTQ breaks SmolLM2 (docs/benchmarks.md: every 2-bit grid point ppl > 1e6)
MAX_ANCHORS = 2


def anchor_params(space: SpaceConfig, base_shape: Any, fits: Fits, *, max_anchors: int = MAX_ANCHORS) -> list[dict[str, Any]]:
    """Parameter sets (as ``study.enqueue_trial`` takes them) of up to ``max_anchors`` feasible anchor plans.

    ``fits(plan) -> bool`` is the budget (the study passes the hardware model's footprint).
    """
    if "none" not in space.wanda_patterns or 0 not in space.eora_ranks:
        return []  # the space cannot express an anchor (no WANDA, no EoRA)
    dims = base_dims(base_shape)
    group_size = max([g for g in valid_group_sizes(space, dims) if g > 0] or [-1])
    n_layers = len(base_shape.layers)
    lora = 8 if 8 in space.lora_ranks else max(space.lora_ranks)
    found: list[tuple[int, int, dict[str, Any]]] = []
    minmax = _minmax_anchor(space, base_shape, fits)
    gptq_bits = space.gptq_bits if "gptq" in space.layer_grids else ()
    for bits in sorted((b for b in gptq_bits if MIN_ANCHOR_BITS <= b < 16), reverse=True):
        best: tuple[tuple[int, int], dict[str, Any]] | None = None
        # the embedding group that leaves the fewest layers to drop, then the most layers widened
        # (the finer one on a tie): at 64 MB on SmolLM2-135M, g64 with 4 layers widened measured
        # token ppl 64.4 against g32 with 2 widened 66.4 (docs/benchmarks.md section 6)
        for group in sorted(space.embedding_groups, key=lambda g: g or 10**9):
            params: dict[str, Any] = {
                "wanda_pattern": "none", "lora_rank": 0 if 0 in space.lora_ranks else lora,
                "embedding_bits": min(space.embedding_bits), "gptq_bits": bits,
                "group_size": group_size, "act_order": space.act_order[0], "gptq_mse": space.gptq_mse[0],
                "gptq_scale_bits": space.gptq_scale_bits[0], "eora_rank": 0,
                "kv_cache_bits": min(space.kv_cache_bits), "drop_fraction": 0.0, "wider_fraction": space.wider_fraction[1],
                "embedding_wide_fraction": space.embedding_wide_fraction[1], "layer_grid": "gptq",
            }
            if params["embedding_bits"] != 16:
                params["embedding_group"] = group
                params["embedding_grid"] = "sym" if "sym" in space.embedding_grids else space.embedding_grids[0]
            placed, repaired = _placed(params, space, base_shape, fits)
            if repaired or not fits(_plan(placed, space, base_shape)):
                continue
            if placed["gptq_wider_layers"] and placed["gptq_wider_layers"] == n_layers - placed["drop_layers"] \
                    and WIDER[bits] in space.gptq_bits:
                continue  # every layer widened: the wider width's own plan
            if placed["drop_layers"]:
                params["lora_rank"] = lora
            rank = (placed["drop_layers"], -placed["gptq_wider_layers"])
            if best is None or rank < best[0]:
                best = (rank, params)
        if best is not None:
            found.append((best[0][0], -bits, best[1]))
    # fewest layers dropped first (dropping costs more quality than a narrower width), then the wider
    ordered = [params for _, _, params in sorted(found, key=lambda f: f[:2])]
    if minmax is not None:
        return [minmax, *ordered][:max_anchors]
    return ordered[:max_anchors]


# Token ppl / dense of each KV-cache width and embedding format alone on SmolLM2-135M (bench/levers.py,
# docs/benchmarks.md section 6; the first 4 x 512 WikiText test windows, the ones reported): which
# combination the minmax anchor spends the room on. A prior for the anchor only; a study measures.
KV_COST = {16: 1.0, 8: 1.0005, 4: 1.030}  # keys g16, values g64 at 4 bits
EMBEDDING_COST = {(16, ""): 1.0, (8, "sym"): 1.0, (8, "minmax"): 1.0, (4, "minmax"): 1.043, (4, "sym"): 1.05}


def _minmax_anchor(space: SpaceConfig, base_shape: Any, fits: Fits) -> dict[str, Any] | None:
    """The minmax plan with every layer kept at the widest minmax width that fits, with the KV-cache
    width and embedding format (16 bits, or 8 or 4 bits in the finest group, either grid) of the
    least prior cost (:data:`KV_COST` x :data:`EMBEDDING_COST`) that fit; None when the space has no
    minmax grid or nothing fits undropped."""
    if "minmax" not in space.layer_grids or 0 not in space.lora_ranks:
        return None
    group = min(space.embedding_groups, key=lambda g: g or 10**9) or 32
    embeddings: list[tuple[float, dict[str, Any]]] = []
    for bits in space.embedding_bits:
        if bits == 16:
            embeddings.append((EMBEDDING_COST[(16, "")], {"embedding_bits": 16}))
            continue
        for grid in space.embedding_grids:
            embeddings.append((EMBEDDING_COST.get((bits, grid), 2.0), {
                "embedding_bits": bits, "embedding_group": group, "embedding_grid": grid,
                **({"embedding_mse": space.embedding_mse[0]} if grid == "sym" else {})}))
    for bits in sorted(space.minmax_bits, reverse=True):
        options = sorted(((KV_COST.get(kv, 2.0) * cost, kv, emb) for kv in space.kv_cache_bits for cost, emb in embeddings),
                         key=lambda o: (o[0], -o[1]))
        for _, kv, emb in options:
            params: dict[str, Any] = {"wanda_pattern": "none", "lora_rank": 0, "layer_grid": "minmax",
                                      "minmax_bits": bits, "kv_cache_bits": kv, "drop_fraction": 0.0,
                                      "embedding_wide_fraction": space.embedding_wide_fraction[1], **emb}
            if fits(_plan(params, space, base_shape)):
                return params
    return None


def anchor_plan(params: dict[str, Any], space: SpaceConfig, base_shape: Any, fits: Fits) -> Plan:
    """The plan an anchor's parameters stand for (sizes placed in the budget as a trial places them)."""
    return _plan(_placed(params, space, base_shape, fits)[0], space, base_shape)


def _placed(params: dict[str, Any], space: SpaceConfig, base_shape: Any, fits: Fits) -> tuple[dict[str, Any], dict[str, Any]]:
    n_layers = len(base_shape.layers)
    return place_size({**params, "lora_steps": space.lora_steps}, space, n_layers,
                      lambda p: _plan(p, space, base_shape), fits, float(params.get("drop_fraction", 0.0)),
                      float(params.get("wider_fraction", 0.0)),
                      wide_rows_fraction=float(params.get("embedding_wide_fraction", 0.0)), vocab=int(base_shape.vocab_size))


def _plan(params: dict[str, Any], space: SpaceConfig, base_shape: Any) -> Plan:
    dims = base_dims(base_shape)
    return plan_from_params({**params, "lora_steps": space.lora_steps, **kv_cache_params(space, dims)},
                            space, dims, len(base_shape.layers))
