"""A compression plan as plain hashable values: what ``compress.plan.Plan.shape`` does to a base shape.

``ShapeSpec`` names the result of the plan transforms (depth drop, structured pruning, sparsity,
embedding format, linear-layer format, adapter) without building a ``ModelShape``; ``spec_shape``
builds that shape with the same transforms, and ``spec_from_plan`` maps a ``Plan`` to its spec,
so that ``spec_shape(base, spec_from_plan(plan, base)) == plan.shape(base)`` (tested).
``SpecEstimator`` (estimator.py) answers ``(footprint_bytes, decode_s)`` for a spec directly.

Formats are tuples of ints (``format_key``), not ``TensorFormat`` objects, so that a spec hashes in C.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel.shape import ModelShape, TensorFormat

# TensorFormat fields in order: (weight_bits, group_size, scale_bits, zero_bits, g_idx_bits)
FormatKey = tuple[int, int | None, int, int | None, int]


class ShapeSpec(NamedTuple):
    """The shape a plan makes of a base shape. ``None`` = the base's value, unchanged.

    drop: the first ``drop`` layers dropped (``Plan.shape`` drops ``range(n)``), or a tuple of
        layer indices to drop.
    embedding: embedding format (``format_key``); the lm_head follows it (``with_embedding_format``).
    prune: (MLP channels, KV groups) removed in every layer (``prune_structured``); (0, 0) = none.
    sparsity: (format, density) of the linear layers (``with_sparsity``; see ``sparsity_key``).
    linear: format of every linear layer (``with_linear_format``).
    adapter: (rank, bits) of an unmerged adapter on every projection; rank 0 = none (``with_adapter``).
    """

    drop: int | tuple[int, ...] = 0
    embedding: FormatKey | None = None
    prune: tuple[int, int] = (0, 0)
    sparsity: tuple[str, float] | None = None
    linear: FormatKey | None = None
    adapter: tuple[int, int] | None = None


def format_key(fmt: TensorFormat) -> FormatKey:
    """The ``TensorFormat`` as a tuple of its fields (``TensorFormat(*key) == fmt``)."""
    return (fmt.weight_bits, fmt.group_size, fmt.scale_bits, fmt.zero_bits, fmt.g_idx_bits)


def sparsity_key(format: str, density: float | None = None) -> tuple[str, float]:  # noqa: A002
    """(format, density) as ``ModelShape.with_sparsity`` normalizes them (N:M -> N/M by default)."""
    if density is None:
        if ":" in format:
            n, m = format.split(":")
            density = int(n) / int(m)
        else:
            density = 1.0
    return (format, float(density))


def spec_shape(base: ModelShape, spec: ShapeSpec | tuple) -> ModelShape:
    """The ``ModelShape`` of ``spec`` applied to ``base``, by the ``ModelShape`` transforms."""
    drop, emb, prune, sparsity, linear, adapter = spec
    s = base
    if drop:
        s = s.drop_layers(range(drop) if type(drop) is int else drop)
    if prune[0] or prune[1]:
        s = s.prune_structured(prune[0], prune[1])
    if sparsity is not None:
        s = s.with_sparsity(sparsity[0], sparsity[1])
    if emb is not None:
        s = s.with_embedding_format(TensorFormat(*emb))
    if linear is not None:
        s = s.with_linear_format(TensorFormat(*linear))
    if adapter is not None:
        s = s.with_adapter(adapter[0], adapter[1])
    return s


def _first_kept_layer(base: ModelShape, drop: int | tuple[int, ...]) -> int:
    dropped = set(range(drop)) if type(drop) is int else set(drop)
    for i in range(base.n_layers):
        if i not in dropped:
            return i
    raise SlmsearchError("structured pruning after dropping every layer: no layer is left to prune")


def spec_from_plan(plan: Any, base: ModelShape) -> ShapeSpec:
    """The spec of ``plan`` (a ``compress.plan.Plan``) on ``base``: the same transforms, values and
    order as ``Plan.shape`` (stages that do nothing skipped; the last adapter wins)."""
    drop: int | tuple[int, ...] = 0
    emb = linear = None
    prune = (0, 0)
    sparsity = adapter = None
    for stage in plan.stages:
        if stage.is_noop():
            continue
        kind = stage.kind
        if kind == "depth":
            drop = stage.n_dropped if stage.indices is None else tuple(stage.indices)
        elif kind == "wanda":
            if stage.pattern == "structured":
                channels = 0
                if stage.mlp_fraction:
                    from slmsearch.compress.wanda import mlp_channels_to_remove  # loaded with the plan

                    inter = base.layers[_first_kept_layer(base, drop)].intermediate
                    channels = mlp_channels_to_remove(inter, stage.mlp_fraction, stage.multiple)
                prune = (channels, stage.kv_groups)
            else:
                sparsity = sparsity_key(stage.pattern if stage.n_m else "unstructured", stage.density)
        elif kind == "lora":
            if not stage.merge:
                adapter = (stage.rank, 16)
        elif kind == "embedding":
            emb = (stage.bits, stage.group_size, 16, 0, 0)
        elif kind == "gptq":
            bits = stage.bits
            linear = (bits, None if stage.group_size == -1 else stage.group_size, 16, bits, 32)
        elif kind == "eora":
            adapter = (stage.rank, 16)
    return ShapeSpec(drop, emb, prune, sparsity, linear, adapter)


__all__ = ["FormatKey", "ShapeSpec", "format_key", "sparsity_key", "spec_from_plan", "spec_shape"]
