"""``estimate(shape, platform)``: memory, placement, decode and prefill latency and energy.

``estimate_fast(shape, platform, context_len) -> (footprint_bytes, decode_s)`` returns the same two
numbers as ``estimate(...).memory.total_bytes`` and ``.decode.latency_s`` (tested), without building
the per-operator report. Per-shape and per-(layer, platform, placement) costs are memoized; shapes
are immutable, so a memo can never go stale.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from slmsearch.hwmodel.energy import pass_energy_j
from slmsearch.hwmodel.latency import Op, OpCost, head_ops, layer_context_ops, layer_static_ops, op_cost
from slmsearch.hwmodel.memory import MemoryReport, memory_report, static_bytes
from slmsearch.hwmodel.placement import Placement, Split, place
from slmsearch.hwmodel.platform import Platform
from slmsearch.hwmodel.shape import LayerShape, ModelShape
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
        }


# ---- shared pieces ---------------------------------------------------------------------------

def _check(context_len: int, prefill_len: int) -> None:
    for name, v in (("context_len", context_len), ("prefill_len", prefill_len)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise SlmsearchError(f"{name} must be an integer >= 0, but got {v!r}")


def _placement(shape: ModelShape, p: Platform, context_len: int, activation_bytes: int) -> Placement:
    kv_layer = [
        -(-(2 * layer.n_kv_heads * layer.head_dim * shape.kv_cache_bits * context_len) // 8)
        for layer in shape.layers
    ]
    return place(p, static_bytes(shape).weight_groups, kv_layer, activation_bytes)


@functools.lru_cache(maxsize=8192)
def _static_layer_ops(layer: LayerShape, hidden: int, tokens: int, act_bits: int, p: Platform
                      ) -> tuple[tuple[Op, ...], tuple[Op, ...]]:
    a, m = layer_static_ops(layer, hidden, tokens, act_bits, p, 0)
    return tuple(a), tuple(m)


@functools.lru_cache(maxsize=65536)
def _group_cycles(ops: tuple[Op, ...], p: Platform, split: Split) -> float:
    return sum(op_cost(op, p, split, ()).cycles for op in ops)


@functools.lru_cache(maxsize=65536)
def _context_cycles(layer: LayerShape, tokens: int, attended: int, act_bits: int, kv_bits: int,
                    p: Platform, kv_split: Split) -> float:
    return sum(op_cost(op, p, (), kv_split).cycles
               for op in layer_context_ops(layer, tokens, attended, act_bits, kv_bits, p, 0))


# ---- full report ------------------------------------------------------------------------------

def _run_pass(shape: ModelShape, p: Platform, pl: Placement, tokens: int, attended: int) -> PassEstimate:
    splits = {name: sp for name, _, sp in pl.groups}
    rows: list[OpRow] = []
    costs: list[OpCost] = []

    def add(layer: int | None, op: Op, wsplit: Split, kvsplit: Split) -> None:
        c = op_cost(op, p, wsplit, kvsplit)
        costs.append(c)
        rows.append(OpRow(layer, op.name, c.engine, c.bound, c.cycles, c.compute_cycles, c.overhead_cycles,
                          dict(c.transfer_cycles), dict(c.level_bytes), c.n_tiles, c.macs))

    for idx, layer in enumerate(shape.layers):
        attn, mlp = layer_static_ops(layer, shape.hidden, tokens, shape.activation_bits, p, idx)
        ctx = layer_context_ops(layer, tokens, attended, shape.activation_bits, shape.kv_cache_bits, p, idx)
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


def estimate(shape: ModelShape, platform: Platform, *, context_len: int = 512, prefill_len: int = 0) -> Estimate:
    """Memory, placement, decode step at ``context_len`` (attending to that many positions) and,
    when ``prefill_len`` > 0, a prefill of that many tokens. The KV cache is sized for
    max(context_len, prefill_len) positions."""
    _check(context_len, prefill_len)
    ctx = max(context_len, prefill_len)
    mem = memory_report(shape, ctx, prefill_len)
    pl = _placement(shape, platform, ctx, mem.by_kind["activations_peak"])
    decode = _run_pass(shape, platform, pl, 1, max(context_len, 1))
    prefill = _run_pass(shape, platform, pl, prefill_len, prefill_len) if prefill_len else None
    return Estimate(shape, platform, context_len, prefill_len, mem,
                    {name: pl.level_of(platform, name) for name, _, _ in pl.groups}, pl, decode, prefill)


# ---- fast path -------------------------------------------------------------------------------

class _FastConsts:
    """Per-(shape, platform) constants of the fast path: group sizes in fill order, their cycles
    when wholly in each level (prefix sums), KV bytes per position per layer."""

    def __init__(self, shape: ModelShape, p: Platform) -> None:
        sb = static_bytes(shape)
        self.static_total = sb.static_total
        self.kv_bits_pos = [2 * layer.n_kv_heads * layer.head_dim * shape.kv_cache_bits for layer in shape.layers]
        self.kv_bits_per_position = sb.kv_bits_per_position
        self.sizes = [b for _, b in sb.weight_groups]
        levels = p.levels
        self.l2 = next(i for i, lv in enumerate(levels) if lv.kind == "l2")
        self.off = next((i for i, lv in enumerate(levels) if lv.kind == "offchip"), None)
        self.weight_caps = [(i, lv.usable_bytes) for i, lv in enumerate(levels) if lv.kind == "weight"]
        self.l2_usable = levels[self.l2].usable_bytes
        h, a = shape.hidden, shape.activation_bits
        ops: list[tuple[Op, ...]] = [()]  # norms group: no weight-reading operator per layer
        for layer in shape.layers:
            attn, mlp = _static_layer_ops(layer, h, 1, a, p)
            ops += [attn, mlp]
        heads = head_ops(shape, p)
        self.head_eltwise = sum(op_cost(op, p, (), ()).cycles for op in heads if not op.weight_bytes)
        tail = tuple(op for op in heads if op.weight_bytes)
        if tail:
            ops.append(tail)
        while len(ops) < len(self.sizes):
            ops.append(())  # untied embedding: no decode operator reads it wholesale
        self.ops = ops
        self.level_ids = [i for i, _ in self.weight_caps] + [self.l2] + ([self.off] if self.off is not None else [])
        self.prefix = {}
        for lid in self.level_ids:
            acc, pre = 0.0, [0.0]
            for g in ops:
                acc += _group_cycles(g, p, ((lid, 1.0),)) if g else 0.0
                pre.append(acc)
            self.prefix[lid] = pre
        seen: dict[tuple[int, int, int, int], None] = {}
        for layer in shape.layers:
            seen[(layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.intermediate)] = None
        self.act_dims = list(seen)


def _splits_cycles(fc: _FastConsts, p: Platform, caps: list[tuple[int, int]]) -> float:
    """Cycles of all weight groups filled in order into ``caps`` (same rule as placement.fill)."""
    total = 0.0
    k, free = 0, caps[0][1]
    g, n = 0, len(fc.sizes)
    while g < n:
        lid = caps[k][0]
        last = k == len(caps) - 1
        # whole groups that fit in this level: advance with the prefix sums
        start = g
        while g < n and (last or fc.sizes[g] <= free):
            if fc.sizes[g] > 0:
                free -= fc.sizes[g]
            g += 1
        total += fc.prefix[lid][g] - fc.prefix[lid][start]
        if g >= n:
            break
        size = fc.sizes[g]
        parts, left, kk, fr = [], size, k, free
        while left > 0:
            take = left if kk == len(caps) - 1 else min(left, fr)
            if take > 0:
                parts.append((caps[kk][0], take / size))
                left -= take
                fr -= take
            if left > 0:
                kk += 1
                fr = caps[kk][1]
        if len(parts) == 1:  # the group starts exactly on a fresh level
            k, free = kk, fr
            continue
        total += _group_cycles(fc.ops[g], p, tuple(parts)) if fc.ops[g] else 0.0
        k, free = kk, fr
        g += 1
    return total


def estimate_fast(shape: ModelShape, platform: Platform, context_len: int = 512) -> tuple[int, float]:
    """(deployed footprint bytes, decode seconds per token) == estimate(...) with prefill_len=0."""
    memo = shape._cache.get("fast")
    if memo is None:
        memo = shape._cache["fast"] = {}
    key = (platform.uid, context_len)
    hit = memo.get(key)
    if hit is not None:
        return hit
    _check(context_len, 0)
    fc = shape._cache.get(("fastc", platform.uid))
    if fc is None:
        fc = shape._cache[("fastc", platform.uid)] = _FastConsts(shape, platform)
    attended = max(context_len, 1)
    # memory (same formula as memory.memory_report with prefill_len=0)
    best = shape.hidden + shape.vocab_size
    h = shape.hidden
    for nh, nkv, hd, inter in fc.act_dims:
        q, kv = nh * hd, nkv * hd
        best = max(best, h + q + 2 * kv, q + 2 * nh * attended, h + 3 * inter)
    act = -(-((h + best) * shape.activation_bits) // 8)
    kv_total = -(-(fc.kv_bits_per_position * context_len) // 8)
    footprint = fc.static_total + kv_total + act
    # placement of KV (same rule as placement.place), then its attention cost per layer
    l2_free = max(0, fc.l2_usable - act)
    cycles = 0.0
    ctx_memo: dict[tuple[LayerShape, Split], float] = {}
    a, kvb = shape.activation_bits, shape.kv_cache_bits
    for layer, bits in zip(shape.layers, fc.kv_bits_pos):
        size = -(-(bits * context_len) // 8)
        if size <= 0:
            split: Split = ((fc.l2, 1.0),)
        elif fc.off is None or size <= l2_free:
            split = ((fc.l2, 1.0),)
            l2_free -= size
        elif l2_free > 0:
            split = ((fc.l2, l2_free / size), (fc.off, (size - l2_free) / size))
            l2_free = 0
        else:
            split = ((fc.off, 1.0),)
        c = ctx_memo.get((layer, split))
        if c is None:
            c = ctx_memo[(layer, split)] = _context_cycles(layer, 1, attended, a, kvb, platform, split)
        cycles += c
    caps = list(fc.weight_caps) + [(fc.l2, l2_free)] + ([(fc.off, 0)] if fc.off is not None else [])
    cycles += _splits_cycles(fc, platform, caps) + fc.head_eltwise
    out = (footprint, cycles / platform.operating_point.freq_hz)
    memo[key] = out
    return out
