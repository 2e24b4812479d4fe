"""``estimate(shape, platform)``: memory, placement, decode and prefill latency and energy."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from slmsearch.hwmodel.deployment import DEFAULT, Deployment
from slmsearch.hwmodel.energy import pass_energy_j
from slmsearch.hwmodel.latency import (Op, OpCost, embedding_ops, head_ops, layer_context_ops, layer_static_ops,
                                       op_cost)
from slmsearch.hwmodel.memory import MemoryReport, memory_report
from slmsearch.hwmodel.placement import Placement, Split, place
from slmsearch.hwmodel.platform import Platform
from slmsearch.hwmodel.shape import ModelShape
from slmsearch.errors import SlmsearchError


@dataclass(frozen=True)
class OpRow:
    layer: int | None
    name: str
    engine: str
    bound: str
    cycles: float
    compute_cycles: float
    overhead_cycles: float
    transfer_cycles: dict[str, float]
    level_bytes: dict[str, int]
    n_tiles: int
    macs: int


@dataclass(frozen=True)
class PassEstimate:
    """One forward pass: a decode step (tokens=1) or a prefill (tokens=P)."""

    tokens: int
    attended: int
    cycles: float
    latency_s: float
    energy_j: float
    energy_by: dict[str, float]
    cycles_by_bound: dict[str, float]
    cycles_by_engine: dict[str, float]
    ops: tuple[OpRow, ...] = field(repr=False)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.latency_s if self.latency_s else float("inf")

    @property
    def energy_j_per_token(self) -> float:
        return self.energy_j / self.tokens if self.tokens else 0.0

    def to_dict(self, with_ops: bool = True) -> dict[str, Any]:
        d = {
            "tokens": self.tokens, "attended_positions": self.attended, "cycles": self.cycles,
            "latency_s": self.latency_s, "tokens_per_s": self.tokens_per_s,
            "energy_j": self.energy_j, "energy_j_per_token": self.energy_j_per_token,
            "energy_j_by_component": self.energy_by, "cycles_by_bound": self.cycles_by_bound,
            "cycles_by_engine": self.cycles_by_engine,
        }
        if with_ops:
            d["ops"] = [r.__dict__ for r in self.ops]
        return d


@dataclass(frozen=True)
class Estimate:
    shape: ModelShape = field(repr=False)
    platform: Platform = field(repr=False)
    context_len: int
    prefill_len: int
    memory: MemoryReport
    placement: dict[str, str]  # weight group -> level name ("l2+l3" when split)
    placement_detail: Placement = field(repr=False)
    decode: PassEstimate
    prefill: PassEstimate | None
    decode_first: PassEstimate | None = field(default=None, repr=False)  # first generated token
    deployment: Deployment = DEFAULT

    @property
    def decode_avg_latency_s(self) -> float:
        """Mean decode latency over a generation from the first token after the prompt to
        ``context_len``: the per-token cost grows (nearly) linearly with the KV length, so the
        mean of the first and the last step (``decode`` is the last, the worst case)."""
        first = self.decode_first or self.decode
        return (first.latency_s + self.decode.latency_s) / 2

    @property
    def decode_avg_energy_j(self) -> float:
        first = self.decode_first or self.decode
        return (first.energy_j + self.decode.energy_j) / 2

    def to_dict(self, with_ops: bool = True) -> dict[str, Any]:
        return {
            "model": self.shape.name,
            "platform": self.platform.name,
            "freq_hz": self.platform.operating_point.freq_hz,
            "context_len": self.context_len,
            "prefill_len": self.prefill_len,
            "memory": self.memory.to_dict(),
            "placement": self.placement_detail.to_dict(self.platform),
            "decode": self.decode.to_dict(with_ops),
            "prefill": self.prefill.to_dict(with_ops) if self.prefill else None,
            "decode_avg": {"latency_s": self.decode_avg_latency_s, "energy_j_per_token": self.decode_avg_energy_j},
            "deployment": self.deployment.to_dict(),
        }


def _check(context_len: int, prefill_len: int) -> None:
    for name, v in (("context_len", context_len), ("prefill_len", prefill_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SlmsearchError(f"{name} must be an integer >= 0, but got {v!r}")


def _placement(shape: ModelShape, p: Platform, context_len: int, mem: MemoryReport,
               dep: Deployment = DEFAULT) -> Placement:
    kv_layer = [
        int(math.ceil(2 * layer.n_kv_heads * layer.head_dim * shape.kv_bits_per_value * context_len / 8))
        for layer in shape.layers
    ]
    return place(p, mem.weight_groups, kv_layer, mem.by_kind["activations_peak"],
                 head_first=dep.weight_memory_first == "lm_head", kv_offchip=dep.kv_cache_level == "l3")


def _run_pass(shape: ModelShape, p: Platform, pl: Placement, tokens: int, attended: int) -> PassEstimate:
    splits = {name: sp for name, _, sp in pl.groups}
    rows: list[OpRow] = []
    costs: list[OpCost] = []

    def add(layer: int | None, op: Op, wsplit: Split, kvsplit: Split) -> None:
        c = op_cost(op, p, wsplit, kvsplit)
        costs.append(c)
        rows.append(OpRow(layer, op.name, c.engine, c.bound, c.cycles, c.compute_cycles, c.overhead_cycles,
                          dict(c.transfer_cycles), dict(c.level_bytes), c.n_tiles, c.macs))

    for op in embedding_ops(shape, p, tokens):
        add(None, op, splits.get(op.group, ()), ())
    for idx, layer in enumerate(shape.layers):
        attn, mlp = layer_static_ops(layer, shape.hidden, tokens, shape.activation_bits, p, idx)
        ctx = layer_context_ops(layer, tokens, attended, shape.activation_bits, shape.kv_cache_bits, p, idx,
                                kv_stored_bits=shape.kv_bits_per_value, rotate=shape.kv_cache_rotate)
        o_at = next(i for i, op in enumerate(attn) if op.name == "o_proj")
        ga, gm = splits[f"layers.{idx}.attn"], splits[f"layers.{idx}.mlp"]
        for op in attn[:o_at]:
            add(idx, op, ga, ())
        for op in ctx:
            add(idx, op, (), pl.kv_split[idx])
        for op in attn[o_at:]:
            add(idx, op, ga, ())
        for op in mlp:
            add(idx, op, gm, ())
    for op in head_ops(shape, p):
        add(None, op, splits.get(op.group, ()), ())
    cycles = sum(r.cycles for r in rows)
    latency = cycles / p.operating_point.freq_hz
    energy_by = pass_energy_j(costs, latency, p)
    by_bound: dict[str, float] = {}
    by_engine: dict[str, float] = {}
    for r in rows:
        by_bound[r.bound] = by_bound.get(r.bound, 0.0) + r.cycles
        by_engine[r.engine] = by_engine.get(r.engine, 0.0) + r.cycles
    return PassEstimate(tokens, attended, cycles, latency, sum(energy_by.values()), energy_by,
                        by_bound, by_engine, tuple(rows))


def estimate(shape: ModelShape, platform: Platform, *, context_len: int = 512, prefill_len: int = 0,
             deployment: Deployment | None = None) -> Estimate:
    """Memory, placement, decode step at ``context_len`` (attending to that many positions; the
    worst case of a generation) and, when ``prefill_len`` > 0, a prefill of that many tokens.
    The KV cache is sized for max(context_len, prefill_len) positions. ``deployment`` chooses
    activation precision, what fills the weight memories first and where the KV cache lives."""
    _check(context_len, prefill_len)
    dep = deployment or DEFAULT
    shape = _deployed(shape, dep)
    ctx = max(context_len, prefill_len)
    mem = memory_report(shape, ctx, prefill_len)
    pl = _placement(shape, platform, ctx, mem, dep)
    decode = _run_pass(shape, platform, pl, 1, max(context_len, 1))
    first_at = min(prefill_len + 1, max(context_len, 1))
    decode_first = _run_pass(shape, platform, pl, 1, first_at) if first_at != max(context_len, 1) else None
    prefill = _run_pass(shape, platform, pl, prefill_len, prefill_len) if prefill_len else None
    return Estimate(shape, platform, context_len, prefill_len, mem,
                    {name: pl.level_of(platform, name) for name, _, _ in pl.groups}, pl, decode, prefill,
                    decode_first, dep)


def _deployed(shape: ModelShape, dep: Deployment) -> ModelShape:
    if dep.activation_bits is not None and dep.activation_bits != shape.activation_bits:
        return shape.with_activation_bits(dep.activation_bits)
    return shape


def footprint_bytes(shape: ModelShape, *, context_len: int = 512, prefill_len: int = 0,
                    deployment: Deployment | None = None) -> int:
    """The deployed footprint :func:`estimate` reports (``memory.total_bytes``), without the
    placement and latency passes: microseconds instead of milliseconds, for the search's budget."""
    _check(context_len, prefill_len)
    return memory_report(_deployed(shape, deployment or DEFAULT), max(context_len, prefill_len), prefill_len).total_bytes


__all__ = ["Estimate", "OpRow", "PassEstimate", "estimate", "footprint_bytes"]
