"""Sampling under the memory budget: every plan a trial proposes fits.

The hardware model prices a plan in well under a millisecond of memory arithmetic, so the space
adapts to the budget instead of rejecting what does not fit:

1. **Choices that can never fit are removed up front** (:func:`feasible_space`): a value of a
   categorical dimension stays when the most compressed plan holding it fits. The lists are fixed
   for the study (the same config and model give the same lists), so the samplers' bookkeeping of
   categorical distributions stays valid.
2. **The two size dimensions are sampled last, as fractions of what is left**: ``drop_fraction``
   places the number of dropped layers between the fewest that fit and the space's maximum;
   ``wider_fraction`` places the number of layers GPTQ quantizes one width wider between none and
   the most that still fit; ``embedding_wide_fraction`` then places the embedding's 8-bit rows
   (its lowest token ids) in the room left. A sampler learns "how much of the remaining room to use", which keeps
   its meaning from one combination of the other choices to the next.
3. **A combination that fits at no depth is repaired** in a fixed order (EoRA off, the narrowest
   KV cache, the narrowest embedding, then narrower GPTQ widths) and the trial records what was
   changed (:data:`REPAIRED_ATTR`); the plan stored with the trial is the one evaluated.

Importing this module does not import torch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from slmsearch.compress.embedding import WIDE_BITS
from slmsearch.compress.gptq import WIDER
from slmsearch.compress.plan import Plan
from slmsearch.search.config import SpaceConfig, StudyConfig

WIDE_ROW_STEP = 1024  # the embedding's 8-bit rows are placed in steps of this many token ids
REPAIRED_ATTR = "repaired_params"  # {param: [proposed, used]} of a trial whose choices did not fit at any depth
Fits = Callable[[Plan], bool]
PlanOf = Callable[[dict[str, Any]], Plan]


# the categorical dimensions whose never-feasible values feasible_space removes: (space field, parameter)
FILTERED_CHOICES = (("gptq_bits", "gptq_bits"), ("embedding_bits", "embedding_bits"), ("kv_cache_bits", "kv_cache_bits"),
                    ("embedding_groups", "embedding_group"), ("eora_ranks", "eora_rank"), ("layer_grids", "layer_grid"))


def within_budget(config: StudyConfig, base_shape: Any, deployment: Any = None) -> Fits:
    """``fits(plan) -> bool``: the plan's deployed footprint (``deployment``, default the
    platform's) at the study's context is within ``config.budget_mb``."""
    from slmsearch.hwmodel.estimate import footprint_bytes

    def fits(plan: Plan) -> bool:
        size = footprint_bytes(plan.shape(base_shape), context_len=config.context_len,
                               prefill_len=config.prefill_len, deployment=deployment)
        return size / 1e6 <= config.budget_mb

    return fits


def drop_bounds(space: SpaceConfig, n_layers: int) -> tuple[int, int]:
    lo, hi = space.drop_layers
    hi = min(hi, n_layers - 1)
    return min(lo, hi), hi


def fewest_drops(params: dict[str, Any], plan_of: PlanOf, fits: Fits, lo: int, hi: int) -> int | None:
    """The fewest dropped layers in ``lo..hi`` with which ``params`` (no layer widened) fits, or None."""
    for drop in range(lo, hi + 1):
        if fits(plan_of({**params, "drop_layers": drop, "gptq_wider_layers": 0})):
            return drop
    return None


def _most_fitting(params: dict[str, Any], plan_of: PlanOf, fits: Fits, key: str, most: int, step: int = 1) -> int:
    """The largest multiple of ``step`` up to ``most`` that ``params[key]`` can take with the plan
    still fitting (the footprint grows with it, so a bisection finds it)."""
    lo, hi = 0, most // step
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(plan_of({**params, key: mid * step})):
            lo = mid
        else:
            hi = mid - 1
    return lo * step


def most_widened(params: dict[str, Any], plan_of: PlanOf, fits: Fits, n_kept: int) -> int:
    """The most layers that can be quantized one width wider with ``params`` still fitting."""
    return _most_fitting(params, plan_of, fits, "gptq_wider_layers", n_kept)


def most_wide_rows(params: dict[str, Any], plan_of: PlanOf, fits: Fits, vocab: int) -> int:
    """The most embedding rows (a multiple of :data:`WIDE_ROW_STEP`, at most ``vocab``) that can be
    kept at 8 bits with ``params`` still fitting."""
    return _most_fitting(params, plan_of, fits, "embedding_wide_rows", vocab, WIDE_ROW_STEP)


def repairs(params: dict[str, Any], space: SpaceConfig, default_group: int) -> list[dict[str, Any]]:
    """Cumulative changes that shrink a plan, in the order they are tried."""
    steps: list[dict[str, Any]] = []
    if params.get("eora_rank"):
        steps.append({"eora_rank": 0})
    if params.get("kv_cache_bits", 16) != min(space.kv_cache_bits):
        steps.append({"kv_cache_bits": min(space.kv_cache_bits)})
    if params.get("embedding_bits", 16) != min(space.embedding_bits):
        steps.append({"embedding_bits": min(space.embedding_bits),
                      "embedding_group": max(space.embedding_groups, key=lambda g: g or 10**9)})
    bits = params.get("gptq_bits", 16)
    to_gptq = {"layer_grid": "gptq"} if params.get("layer_grid") == "minmax" else {}  # minmax has no narrower width here
    for narrower in sorted((b for b in space.gptq_bits if b < bits), reverse=True):
        steps.append({"gptq_bits": narrower, **to_gptq, **({} if "group_size" in params else
                                                           {"group_size": default_group, "act_order": space.act_order[0],
                                                            "eora_rank": 0})})
    return steps


def place_size(params: dict[str, Any], space: SpaceConfig, n_layers: int, plan_of: PlanOf, fits: Fits,
               drop_fraction: float, wider_fraction: float, *, default_group: int = -1,
               wide_rows_fraction: float = 0.0, vocab: int = 0) -> tuple[dict[str, Any], dict[str, list[Any]]]:
    """``params`` completed with ``drop_layers`` and ``gptq_wider_layers`` from the two fractions,
    repaired if no depth fits, then ``embedding_wide_rows`` from ``wide_rows_fraction`` of the room
    left (of a ``vocab``-row embedding below 8 bits); and the repairs made ({param: [proposed, used]})."""
    lo, hi = drop_bounds(space, n_layers)
    current = dict(params)
    repaired: dict[str, list[Any]] = {}
    fewest = fewest_drops(current, plan_of, fits, lo, hi)
    for step in repairs(params, space, default_group):
        if fewest is not None:
            break
        current.update(step)
        repaired.update({key: [params.get(key), value] for key, value in step.items() if params.get(key) != value})
        fewest = fewest_drops(current, plan_of, fits, lo, hi)
    drop = hi if fewest is None else fewest + int(round(drop_fraction * (hi - fewest)))
    current["drop_layers"] = drop
    current["gptq_wider_layers"] = 0
    if current.get("gptq_bits", 16) in WIDER and fewest is not None:
        room = most_widened(current, plan_of, fits, n_layers - drop)
        current["gptq_wider_layers"] = int(round(wider_fraction * room))
    current["embedding_wide_rows"] = 0
    if wide_rows_fraction > 0 and current.get("embedding_bits", 16) < WIDE_BITS and vocab and fewest is not None:
        room = most_wide_rows(current, plan_of, fits, vocab) // WIDE_ROW_STEP
        current["embedding_wide_rows"] = int(round(wide_rows_fraction * room)) * WIDE_ROW_STEP
    return current, repaired


def feasible_space(space: SpaceConfig, candidates: Callable[[dict[str, Any]], list[Plan]], fits: Fits) -> SpaceConfig:
    """``space`` with each categorical value removed that no plan can hold within the budget: a value
    stays when one of the most compressed plans with it fits (``candidates(overrides)``, one per
    WANDA pattern). A dimension none of whose values fits is left whole (the study's own check
    reports an unreachable budget)."""
    changes: dict[str, tuple[Any, ...]] = {}
    for field, param in FILTERED_CHOICES:
        values = getattr(space, field)
        kept = tuple(v for v in values if any(fits(plan) for plan in candidates({param: v})))
        if kept and kept != values:
            changes[field] = kept
    return dataclasses.replace(space, **changes) if changes else space
