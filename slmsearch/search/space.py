"""Trial -> Plan: the only place in slmsearch that calls ``trial.suggest_*``.

Only combinations that can run are sampled: group sizes that do not divide every quantized input
dimension of the base model are removed from the choices up front (a fixed choice list keeps the
samplers' bookkeeping valid), and structured pruning keeps dimensions multiples of the largest
group size left. Each stage type turns the sampled parameters into its stage
(``Stage.from_params``). Importing this module does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from slmsearch.compress.embedding import WIDE_BITS
from slmsearch.compress.geometry import allowed_kv_group_removals, undivided_inputs
from slmsearch.compress.gptq import WIDER
from slmsearch.compress.minmax import FOLLOWS_PATTERNS
from slmsearch.compress.plan import CANONICAL_ORDER, STAGE_TYPES, Plan
from slmsearch.compress.stage import Stage
from slmsearch.errors import SlmsearchError
from slmsearch.search.config import SpaceConfig


def base_dims(shape: Any) -> dict[str, int]:
    """Input sizes of the base model's quantized projections: hidden, attention output, MLP."""
    layer = shape.layers[0]
    return {
        "hidden": int(shape.hidden),
        "attn_out": int(layer.n_heads * layer.head_dim),
        "intermediate": int(layer.intermediate),
        "head_dim": int(layer.head_dim),
    }


def valid_group_sizes(space: SpaceConfig, dims: dict[str, int]) -> tuple[int, ...]:
    """The space's group sizes that divide every quantized layer's input size (-1 always fits)."""
    needed = {name: dims[name] for name in ("hidden", "attn_out", "intermediate")}
    groups = tuple(g for g in space.group_sizes if not undivided_inputs(g, needed))
    if not groups:
        raise SlmsearchError(
            f"no group size in {list(space.group_sizes)} divides the model's input sizes {list(needed.values())}; "
            "add 32 or -1 (per channel) to space.group_sizes"
        )
    return groups


def kv_group_choices(space: SpaceConfig, base_shape: Any, multiple: int) -> list[int]:
    """KV-group removals within ``space.kv_groups`` that the model's shapes allow (see
    :func:`slmsearch.compress.geometry.allowed_kv_group_removals`); 0 is always among them."""
    layer = base_shape.layers[0]
    allowed = allowed_kv_group_removals(base_shape.hidden, layer.n_heads, layer.n_kv_heads, layer.head_dim, multiple)
    lo, hi = space.kv_groups
    return [k for k in allowed if lo <= k <= hi] or [0]


def kv_cache_group(space: SpaceConfig, dims: dict[str, int]) -> int:
    """The KV cache's group: ``space.kv_cache_group``, or the largest smaller one dividing the head size."""
    return _fitting_group(space.kv_cache_group, dims["head_dim"])


def _fitting_group(group: int, head_dim: int) -> int:
    from slmsearch.compress.kvcache import KV_GROUPS

    fitting = [g for g in KV_GROUPS if g <= group and head_dim % g == 0]
    return max(fitting) if fitting else group  # none divides: the stage says why


def kv_cache_params(space: SpaceConfig, dims: dict[str, int]) -> dict[str, Any]:
    """The KV cache's fixed settings as trial parameters: the values' and the keys' groups
    (:func:`kv_cache_group`, each fitted to the head size) and the rotation."""
    group = kv_cache_group(space, dims)
    key_group = _fitting_group(space.kv_cache_key_group, dims["head_dim"]) if space.kv_cache_key_group else group
    return {"kv_cache_group": group, "kv_cache_key_group": key_group, "kv_cache_rotate": space.kv_cache_rotate}


def structured_multiple(groups: tuple[int, ...], dims: dict[str, int]) -> int:
    """Channel counts after structured pruning stay multiples of this (the largest group in use)."""
    sized = [g for g in groups if g > 0]
    return max(sized) if sized else dims["head_dim"]


def plan_from_params(params: dict[str, Any], space: SpaceConfig, dims: dict[str, int], n_layers: int) -> Plan:
    """The plan a set of sampled parameters stands for (also used to rebuild a trial's plan): each
    stage type, in the canonical order, reads its parameters (``Stage.from_params``)."""
    drop = int(params.get("drop_layers", 0))
    if drop >= n_layers:
        raise SlmsearchError(f"cannot drop {drop} of {n_layers} layers; lower space.drop_layers")
    stages: list[Stage] = []
    for kind in CANONICAL_ORDER:
        stage = STAGE_TYPES[kind].from_params(params, space, tuple(stages))
        if stage is not None:
            stages.append(stage)
    return Plan(tuple(stages))


def suggest_plan(trial: Any, space: SpaceConfig, base_shape: Any, fits: Callable[[Plan], bool] | None = None) -> Plan:
    """Sample one plan from ``space`` for the model ``base_shape`` describes.

    The kinds of compression are sampled first, the sizes last (:mod:`slmsearch.search.budget`):
    ``drop_fraction`` and ``wider_fraction`` place the dropped layers and the layers GPTQ quantizes
    one width wider within the room ``fits(plan) -> bool`` (the budget) leaves, then
    ``embedding_wide_fraction`` the embedding's 8-bit rows in what is left; without ``fits``
    every plan fits. A repaired trial records what changed (``budget.REPAIRED_ATTR``)."""
    from slmsearch.search.budget import REPAIRED_ATTR, drop_bounds, place_size

    dims = base_dims(base_shape)
    n_layers = len(base_shape.layers)
    groups = valid_group_sizes(space, dims)
    params: dict[str, Any] = {}
    pattern = trial.suggest_categorical("wanda_pattern", list(space.wanda_patterns))
    params["wanda_pattern"] = pattern
    if pattern == "structured":
        params["structured_fraction"] = trial.suggest_float("structured_fraction", *space.structured_fraction, step=0.05)
        params["structured_multiple"] = structured_multiple(groups, dims)
        choices = kv_group_choices(space, base_shape, params["structured_multiple"])
        params["kv_groups"] = trial.suggest_categorical("kv_groups", choices) if len(choices) > 1 else choices[0]
    elif pattern == "unstructured":
        params["sparsity"] = trial.suggest_float("sparsity", *space.unstructured_sparsity, step=0.05)
    params["lora_rank"] = trial.suggest_categorical("lora_rank", list(space.lora_ranks))
    params["lora_steps"] = space.lora_steps
    if params["lora_rank"]:
        params["lora_loss"] = _choose(trial, "lora_loss", space.lora_loss)
    params["embedding_bits"] = trial.suggest_categorical("embedding_bits", list(space.embedding_bits))
    if params["embedding_bits"] != 16:
        params["embedding_group"] = _choose(trial, "embedding_group", space.embedding_groups)
        params["embedding_grid"] = _choose(trial, "embedding_grid", space.embedding_grids)
        params["embedding_scale_bits"] = _choose(trial, "embedding_scale_bits", space.embedding_scale_bits)
        if params["embedding_grid"] == "sym":
            params["embedding_mse"] = _choose(trial, "embedding_mse", space.embedding_mse)
    params["layer_grid"] = _choose(trial, "layer_grid", space.layer_grids)
    forced: dict[str, list[Any]] = {}
    if params["layer_grid"] == "minmax" and pattern not in FOLLOWS_PATTERNS:
        params["layer_grid"] = "gptq"  # minmax's grid does not keep WANDA's zeros (compress/plan.py)
        forced["layer_grid"] = ["minmax", "gptq"]
    if params["layer_grid"] == "minmax":
        params["minmax_bits"] = _choose(trial, "minmax_bits", space.minmax_bits)
        params["gptq_bits"] = 16
    else:
        params["gptq_bits"] = trial.suggest_categorical("gptq_bits", list(space.gptq_bits))
    if params["gptq_bits"] != 16:
        params["group_size"] = trial.suggest_categorical("group_size", list(groups))
        params["act_order"] = trial.suggest_categorical("act_order", list(space.act_order))
        params["gptq_mse"] = _choose(trial, "gptq_mse", space.gptq_mse)
        params["gptq_scale_bits"] = _choose(trial, "gptq_scale_bits", space.gptq_scale_bits)
        params["eora_rank"] = trial.suggest_categorical("eora_rank", list(space.eora_ranks))
    params["kv_cache_bits"] = _choose(trial, "kv_cache_bits", space.kv_cache_bits)
    params.update(kv_cache_params(space, dims))
    lo, hi = drop_bounds(space, n_layers)
    drop_fraction = trial.suggest_float("drop_fraction", 0.0, 1.0, step=0.05) if hi > lo else 0.0
    wider_fraction = _fraction(trial, "wider_fraction", space.wider_fraction) if params["gptq_bits"] in WIDER else 0.0
    wide_rows_fraction = (_fraction(trial, "embedding_wide_fraction", space.embedding_wide_fraction)
                          if params["embedding_bits"] < WIDE_BITS else 0.0)

    def plan_of(p: dict[str, Any]) -> Plan:
        return plan_from_params(p, space, dims, n_layers)

    params, repaired = place_size(params, space, n_layers, plan_of, fits or (lambda plan: True), drop_fraction,
                                  wider_fraction, default_group=max(groups, key=lambda g: g if g > 0 else 10**9),
                                  wide_rows_fraction=wide_rows_fraction, vocab=int(base_shape.vocab_size))
    repaired = {**forced, **repaired}
    if repaired:
        trial.set_user_attr(REPAIRED_ATTR, repaired)
    return plan_of(params)


def _fraction(trial: Any, name: str, bounds: tuple[float, float]) -> float:
    """A size's share of the room left, in steps of 0.05 within ``bounds``; 0 when the upper bound
    is 0, and no parameter of the study when the bounds are equal."""
    lo, hi = bounds
    if hi <= 0:
        return 0.0
    return trial.suggest_float(name, lo, hi, step=0.05) if hi > lo else lo


def _choose(trial: Any, name: str, choices: tuple[Any, ...]) -> Any:
    """A categorical parameter; a single choice is no parameter of the study (not suggested)."""
    return trial.suggest_categorical(name, list(choices)) if len(choices) > 1 else choices[0]


def suggest_deployment(trial: Any, space: SpaceConfig) -> dict[str, Any]:
    """The deployment choices of ``space`` (activation bits, weight-memory order, KV level) for
    this trial; a choice with one value is not suggested (it is no parameter of the study)."""
    out: dict[str, Any] = {}
    for name, choices in (("activation_bits", space.activation_bits), ("weight_memory_first", space.weight_memory_first),
                          ("kv_cache_level", space.kv_cache_level)):
        out[name] = trial.suggest_categorical(name, list(choices)) if len(choices) > 1 else choices[0]
    return out


def most_compressed_plan(space: SpaceConfig, base_shape: Any, *, pattern: str = "structured",
                         overrides: dict[str, Any] | None = None) -> Plan:
    """The most compressed plan with this WANDA pattern (and ``overrides`` of its parameters); the
    smallest footprint the space reaches is the least over its patterns (for "budget unreachable"
    messages, and for which choices can fit at all: :func:`slmsearch.search.budget.feasible_space`)."""
    dims = base_dims(base_shape)
    groups = valid_group_sizes(space, dims)
    n_layers = len(base_shape.layers)
    if (overrides or {}).get("layer_grid") == "minmax" and pattern not in FOLLOWS_PATTERNS:
        pattern = "structured"  # minmax cannot follow a pattern that keeps zeros (compress/plan.py)
    params: dict[str, Any] = {
        "drop_layers": min(space.drop_layers[1], n_layers - 1),
        "wanda_pattern": pattern,
        "sparsity": space.unstructured_sparsity[1],
        "structured_fraction": space.structured_fraction[1],
        "kv_groups": max(kv_group_choices(space, base_shape, structured_multiple(groups, dims))),
        "structured_multiple": structured_multiple(groups, dims),
        "lora_rank": 0,
        "embedding_bits": min(space.embedding_bits),
        "embedding_group": max(space.embedding_groups, key=lambda g: g or 10**9),
        "gptq_bits": min(space.gptq_bits),
        "minmax_bits": min(space.minmax_bits),
        "kv_cache_bits": min(space.kv_cache_bits),
        **kv_cache_params(space, dims),
        "group_size": max(groups, key=lambda g: g if g > 0 else 10**9),
        "eora_rank": 0,
        **(overrides or {}),
    }
    return plan_from_params(params, space, dims, n_layers)


def baseline_params(space: SpaceConfig) -> dict[str, Any]:
    """The uncompressed baseline as a parameter set, enqueued as the study's first trial."""
    params: dict[str, Any] = {"drop_layers": 0, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 16, "gptq_bits": 16,
                              "kv_cache_bits": 16}
    for name, field, choices in (
        ("wanda_pattern", "wanda_patterns", space.wanda_patterns),
        ("lora_rank", "lora_ranks", space.lora_ranks),
        ("embedding_bits", "embedding_bits", space.embedding_bits),
        ("gptq_bits", "gptq_bits", space.gptq_bits),
        ("kv_cache_bits", "kv_cache_bits", space.kv_cache_bits),
    ):
        if params[name] not in choices:
            raise SlmsearchError(
                f"the baseline needs {params[name]!r} in space.{field} so every trial can be compared to it"
            )
    return params
