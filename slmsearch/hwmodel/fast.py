"""The fast path: ``(footprint_bytes, decode_s)`` of a shape without the per-operator report.

Same formulas as ``estimate`` (tested to agree), arranged so that a brand-new shape costs a few
microseconds:

* per platform object: its constants (``_PF``), once;
* per distinct layer object x (hidden, activation bits, platform): its two weight groups
  (attention, MLP) as bytes + cycles when wholly in each memory level (``_Group``), its KV bits
  per position and activation sizes (``_Layer``); stored on the layer, and transforms share
  layer objects, so a search that builds a new shape per plan reuses them;
* per layer record x (attended positions, KV bits): the attention-over-KV cycles with the KV in
  L2 / off-chip (``_Ctx``);
* per shape: the sums over its layer *runs* (``ModelShape.runs``): a uniform model is one run,
  so nothing here is O(layers);
* per call: activation peak, KV placement and the weight fill over the memory levels, done on
  runs in closed form (whole runs of groups that fit a level at once); only a group that
  straddles two levels has its operators re-costed, by ``_op_cycles`` (the cycles part of
  ``latency.op_cost``, on precompiled numbers).
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any

from slmsearch.hwmodel.latency import (
    LINEAR, Op, cluster_compute_cycles, embedding_ops, head_ops, layer_context_ops, layer_static_ops,
    n_tiles, npu_compute_cycles, op_cost,
)
from slmsearch.hwmodel.memory import NORM_BITS, layer_proj_bytes, matrix_bytes
from slmsearch.hwmodel.platform import Platform
from slmsearch.hwmodel.shape import ATTN_PROJS, LayerShape, ModelShape, TensorFormat

Parts = tuple[tuple[int, float], ...]


class _PF:
    """Constants of one platform object."""

    __slots__ = ("p", "l2", "off", "bw_off", "weight_caps", "l2_usable", "cap_levels", "freq", "kinds",
                 "bw", "weight_total", "tiled", "dbuf", "dma_bw", "tile_oh", "slow", "fixed_cl", "fixed_npu", "npu_linear")

    def __init__(self, p: Platform) -> None:
        self.p = p
        levels = p.levels
        self.kinds = tuple(lv.kind for lv in levels)
        self.bw = tuple(lv.read_bw_bytes_per_cycle for lv in levels)
        self.l2 = self.kinds.index("l2")
        self.off = self.kinds.index("offchip") if "offchip" in self.kinds else None
        self.bw_off = self.bw[self.off] if self.off is not None else 1.0
        self.weight_caps = tuple((i, lv.usable_bytes) for i, lv in enumerate(levels) if lv.kind == "weight")
        self.weight_total = sum(c for _, c in self.weight_caps)
        self.l2_usable = levels[self.l2].usable_bytes
        self.cap_levels = tuple(i for i, _ in self.weight_caps) + (self.l2,) + (
            (self.off,) if self.off is not None else ())
        self.freq = p.operating_point.freq_hz
        self.tiled = p.tiling.enabled
        self.dbuf = p.tiling.double_buffering
        self.dma_bw = p.dma.l2_l1_bw_bytes_per_cycle
        self.tile_oh = p.tiling.tile_overhead_cycles
        self.slow = p.cluster.l2_access_slowdown
        cl = p.cluster
        self.fixed_cl = cl.kernel_overhead_cycles + (cl.fork_join_cycles if cl.cores > 1 else 0.0)
        self.fixed_npu = cl.kernel_overhead_cycles + p.npu.job_overhead_cycles
        self.npu_linear = p.npu.enabled and p.tiling.enabled


_PFS: dict[int, _PF] = {}


def platform_consts(p: Platform) -> _PF:
    pf = _PFS.get(p.uid)
    if pf is None or pf.p is not p:
        pf = _PFS[p.uid] = _PF(p)
    return pf


# ---- operators compiled to numbers ------------------------------------------------------------

def _compile(op: Op, p: Platform, pf: _PF) -> tuple:
    """(weight bytes, KV bytes, act bytes, cluster overhead, cluster compute, npu or None) where
    npu = (npu overhead, npu compute): what op_cost needs besides the split."""
    tiles = n_tiles(op.weight_bytes + op.act_bytes + op.kv_bytes, p) if pf.tiled else 0
    ov_cl = pf.fixed_cl + tiles * pf.tile_oh if pf.tiled else pf.fixed_cl
    npu = None
    if op.npu_ok and pf.npu_linear and op.kind == LINEAR:
        npu = (pf.fixed_npu + tiles * pf.tile_oh, npu_compute_cycles(op, p))
    return (op.weight_bytes, op.kv_bytes, float(op.act_bytes), ov_cl, cluster_compute_cycles(op, p), npu)


def _op_cycles(c: tuple, pf: _PF, wsplit: Parts, kvsplit: Parts) -> float:
    """``op_cost(op, p, wsplit, kvsplit).cycles`` for a compiled op (same arithmetic)."""
    wb, kvb, act, ov_cl, comp_cl, npu = c
    off = pf.off
    offb = 0
    dma_b = act
    if wb:
        for i, f in wsplit:
            b = wb * f
            dma_b += b
            if i == off:
                offb += b
    if kvb:
        for i, f in kvsplit:
            b = kvb * f
            dma_b += b
            if i == off:
                offb += b
    stream = offb / pf.bw_off if offb else 0.0
    if pf.tiled:
        dma = dma_b / pf.dma_bw
        if pf.dbuf:
            best = ov_cl + max(comp_cl, dma, stream)
        else:
            best = ov_cl + (comp_cl + dma + stream)
    else:
        best = ov_cl + (comp_cl * pf.slow + stream)
    if npu is not None:
        kinds, bw = pf.kinds, pf.bw
        wmem = 0.0
        dma_b = act
        for i, f in wsplit:
            b = wb * f
            if kinds[i] == "weight":
                wmem = max(wmem, b / bw[i])
            else:
                dma_b += b
        if kvb:
            for _, f in kvsplit:
                dma_b += kvb * f
        dma = dma_b / pf.dma_bw
        terms = [npu[1], dma]
        if stream:
            terms.append(stream)
        if wmem:
            terms.append(wmem)
        c_npu = npu[0] + (max(terms) if pf.dbuf else sum(terms))
        if c_npu < best:
            best = c_npu
    return best


class _Stream:
    """Cycles of cluster-only operators as a function of the fraction f of their weight (or KV)
    bytes that lies off chip, the only thing a split changes for them (same arithmetic as
    op_cost): double-buffered, each op costs ov + max(base, k*f) with k = bytes / off-chip
    bandwidth, so the sum is convex piecewise linear in f: breakpoints base/k, sorted, with
    prefix sums; single-buffered / untiled, it is linear."""

    __slots__ = ("const", "bps", "base_right", "k_left", "linear")

    def __init__(self, ops: tuple, pf: _PF, kv: bool) -> None:
        const = 0.0
        rows = []
        for wb, kvb, act, ov_cl, comp_cl, _ in ops:
            k = (kvb if kv else wb) / pf.bw_off
            if pf.tiled:
                dma = (act + wb + kvb) / pf.dma_bw
                if pf.dbuf:
                    const += ov_cl
                    rows.append((max(comp_cl, dma) / k if k else math.inf, max(comp_cl, dma), k))
                else:
                    const += ov_cl + comp_cl + dma
                    rows.append((-1.0, 0.0, k))
            else:
                const += ov_cl + comp_cl * pf.slow
                rows.append((-1.0, 0.0, k))
        rows.sort()
        self.const = const
        self.bps = [r[0] for r in rows]
        n = len(rows)
        self.base_right = [sum(r[1] for r in rows[i:]) for i in range(n + 1)]
        self.k_left = [sum(r[2] for r in rows[:i]) for i in range(n + 1)]

    def at(self, f: float) -> float:
        i = bisect_left(self.bps, f)
        return self.const + self.base_right[i] + f * self.k_left[i]


class _Group:
    """One placement group: bytes, cycles when wholly in each level, and what a split needs."""

    __slots__ = ("size", "whole", "fixed", "ops", "npu", "stream", "on", "off")

    def __init__(self, ops: list[Op], size: int, p: Platform, pf: _PF) -> None:
        self.size = size
        whole = [0.0] * len(pf.kinds)
        for lid in pf.cap_levels:
            whole[lid] = sum(op_cost(op, p, ((lid, 1.0),), ()).cycles for op in ops)
        self.whole = whole
        self.fixed = sum(op_cost(op, p, (), ()).cycles for op in ops if not op.weight_bytes)
        self.ops = tuple(_compile(op, p, pf) for op in ops if op.weight_bytes)
        self.npu = any(c[5] is not None for c in self.ops)
        self.stream = None if self.npu or pf.off is None else _Stream(self.ops, pf, kv=False)
        # cluster only: the same cycles in every on-chip level (only off-chip bytes stream)
        self.on = whole[pf.l2]
        self.off = whole[pf.off] if pf.off is not None else 0.0

    def split_cycles(self, parts: Parts, pf: _PF) -> float:
        if self.stream is not None:  # cluster only: the off-chip fraction decides
            f = parts[-1][1] if parts[-1][0] == pf.off else 0.0
            return self.fixed + self.stream.at(f) if f else self.whole[pf.l2]
        return self.fixed + sum(_op_cycles(c, pf, parts, ()) for c in self.ops)


class _Ctx:
    """Attention over the KV cache of one layer at one context: cycles with the KV in L2 / off chip."""

    __slots__ = ("l2", "off", "fixed", "stream")

    def __init__(self, ops: list[Op], p: Platform, pf: _PF) -> None:
        self.l2 = sum(op_cost(op, p, (), ((pf.l2, 1.0),)).cycles for op in ops)
        self.off = sum(op_cost(op, p, (), ((pf.off, 1.0),)).cycles for op in ops) if pf.off is not None else 0.0
        self.fixed = sum(op_cost(op, p, (), ()).cycles for op in ops if not op.kv_bytes)
        compiled = tuple(_compile(op, p, pf) for op in ops if op.kv_bytes)
        assert all(c[5] is None for c in compiled)  # attention over the KV cache runs on the cluster
        self.stream = _Stream(compiled, pf, kv=True) if pf.off is not None else None

    def split_cycles(self, f_off: float) -> float:
        """Cycles with the fraction f_off of this layer's KV cache off chip, the rest in L2."""
        return self.fixed + self.stream.at(f_off)


class _Layer:
    """A layer at (hidden, activation bits) on one platform."""

    __slots__ = ("layer", "a", "p", "pf", "attn", "mlp", "kv", "act", "q", "nh", "ctx", "npu")

    def __init__(self, layer: LayerShape, hidden: int, act_bits: int, p: Platform, pf: _PF) -> None:
        self.layer, self.a, self.p, self.pf = layer, act_bits, p, pf
        attn_b = mlp_b = 0
        for pb in layer_proj_bytes(layer, hidden):
            if pb.name in ATTN_PROJS:
                attn_b += pb.total
            else:
                mlp_b += pb.total
        attn, mlp = layer_static_ops(layer, hidden, 1, act_bits, p, 0)
        self.attn = _Group(attn, attn_b, p, pf)
        self.mlp = _Group(mlp, mlp_b, p, pf)
        self.npu = self.attn.npu or self.mlp.npu
        self.kv = 2 * layer.n_kv_heads * layer.head_dim  # KV bits per position per KV bit
        self.q = layer.n_heads * layer.head_dim
        self.nh = layer.n_heads
        kv = layer.n_kv_heads * layer.head_dim
        # decode activation sets that do not depend on the context (memory.peak_activation_bytes)
        self.act = max(hidden + self.q + 2 * kv, hidden + 3 * layer.intermediate)
        self.ctx: dict[tuple[int, int], _Ctx] = {}

    def context(self, attended: int, kv_bits: int) -> _Ctx:
        c = self.ctx.get((attended, kv_bits))
        if c is None:
            if len(self.ctx) >= 1024:
                self.ctx.clear()
            c = self.ctx[(attended, kv_bits)] = _Ctx(
                layer_context_ops(self.layer, 1, attended, self.a, kv_bits, self.p, 0), self.p, self.pf)
        return c


# ---- head (final norm, lm_head, embedding lookup) ------------------------------------------------

# key -> (record, platform): the platform is checked by identity, as a uid can come from another
# process (an unpickled platform)
_HEADS: dict[tuple, tuple[tuple[float, tuple[_Group, ...], int], Platform]] = {}


def _head(shape: ModelShape, p: Platform, pf: _PF) -> tuple[float, tuple[_Group, ...], int]:
    """(cycles of the split-independent head ops, head weight groups in fill order, their bytes)."""
    tied = shape.tie_word_embeddings
    emb: TensorFormat = shape.embedding_format
    key = (p.uid, shape.hidden, shape.vocab_size, shape.activation_bits, emb.weight_bits, emb.group_size,
           emb.scale_bits, emb.zero_bits, emb.g_idx_bits)  # ints: hashed in C
    if not tied:
        key += (shape.head_format,)
    hit = _HEADS.get(key)
    if hit is not None and hit[1] is p:
        return hit[0]
    if len(_HEADS) >= 4096:
        _HEADS.clear()
    ops = head_ops(shape, p) + embedding_ops(shape, p, 1)
    fixed = sum(op_cost(op, p, (), ()).cycles for op in ops if not op.weight_bytes)
    groups: list[_Group] = []
    total = 0
    if shape.vocab_size:
        h, v = shape.hidden, shape.vocab_size
        ev, es = matrix_bytes(v, h, emb)
        if tied:
            names: tuple[tuple[str, int], ...] = (("embedding+lm_head", ev + es),)
        else:
            hv, hs = matrix_bytes(v, h, shape.head_format)
            names = (("lm_head", hv + hs), ("embedding", ev + es))
        for name, size in names:
            groups.append(_Group([op for op in ops if op.group == name and op.weight_bytes], size, p, pf))
            total += size
    out = (fixed, tuple(groups), total)
    _HEADS[key] = (out, p)
    return out


# ---- per shape -------------------------------------------------------------------------------

def _shape_rec(shape: ModelShape, p: Platform) -> tuple:
    """Context-independent sums over the shape's runs, on one platform."""
    pf = platform_consts(p)
    h, a = shape.hidden, shape.activation_bits
    lkey = (h, a, p.uid)
    runs = []
    n_layers = weights = kv_pos = 0
    act0 = h + shape.vocab_size
    scores: list[tuple[int, int]] = []
    npu = False
    for layer, n in shape._cache.get("runs") or shape.runs():
        m = layer.__dict__.get("_m")
        rec = m.get(lkey) if m is not None else None
        if rec is None or rec.p is not p:
            rec = layer._memo()[lkey] = _Layer(layer, h, a, p, pf)
        runs.append((rec, n))
        npu = npu or rec.npu
        n_layers += n
        weights += n * (rec.attn.size + rec.mlp.size)
        kv_pos += n * rec.kv
        if rec.act > act0:
            act0 = rec.act
        if (rec.q, rec.nh) not in scores:
            scores.append((rec.q, rec.nh))
    norms = (2 * n_layers + 1) * h * NORM_BITS // 8
    head_fixed, head_groups, head_bytes = _head(shape, p, pf)
    kvb = shape.kv_cache_bits
    cluster_only = pf.off is not None and not npu and not any(g.npu for g in head_groups)
    return (pf, norms + weights + head_bytes, kv_pos * kvb, act0, tuple(scores), tuple(runs), head_fixed,
            head_groups, norms, h, a, kvb, cluster_only)


def _split(g: _Group, k: int, free: int, caps: tuple, last_k: int, pf: _PF) -> tuple[float, int, int]:
    """Place one group that does not fit what is left of level k (placement.fill):
    (cycles, new level index, bytes free there)."""
    size = g.size
    parts = []
    left = size
    lid = caps[k][0]
    while left > 0:
        take = left if k == last_k else min(left, free)
        if take > 0:
            parts.append((lid, take / size))
            free -= take
            left -= take
        if left > 0:
            k += 1
            lid, free = caps[k]
    if len(parts) == 1:
        return g.whole[lid], k, free
    return g.split_cycles(tuple(parts), pf), k, free


def _fill(rec: tuple, l2_free: int) -> float:
    """Cycles of every weight group filled, in order, into the weight memories, L2's free bytes,
    then off chip (placement.fill, on runs: whole runs of (attention, MLP) pairs per level at once)."""
    pf, runs, head_groups, norms = rec[0], rec[5], rec[7], rec[8]
    caps = pf.weight_caps + ((pf.l2, l2_free),) + (((pf.off, 0),) if pf.off is not None else ())
    last_k = len(caps) - 1
    k = 0
    lid, free = caps[0]
    total = 0.0
    # norms: the first group; no decode operator reads it as a group, it only takes space
    left = norms
    while True:
        take = left if k == last_k else min(left, free)
        free -= take
        left -= take
        if left <= 0:
            break
        k += 1
        lid, free = caps[k]
    for lrec, n in runs:
        ga, gm = lrec.attn, lrec.mlp
        sa, sm = ga.size, gm.size
        pair = sa + sm
        wa, wm = ga.whole, gm.whole
        while n:
            if k == last_k:
                total += n * (wa[lid] + wm[lid])
                break
            j = n if pair <= 0 else min(n, free // pair)
            if j:
                total += j * (wa[lid] + wm[lid])
                free -= j * pair
                n -= j
                if not n:
                    break
            if sa <= free:  # attention fits, the MLP straddles
                total += wa[lid]
                free -= sa
            else:
                c, k, free = _split(ga, k, free, caps, last_k, pf)
                lid = caps[k][0]
                total += c
            if k == last_k or sm <= free:
                total += wm[lid]
                free -= sm
            else:
                c, k, free = _split(gm, k, free, caps, last_k, pf)
                lid = caps[k][0]
                total += c
            n -= 1
    for g in head_groups:
        if k == last_k or g.size <= free:
            total += g.whole[lid]
            free -= g.size
        else:
            c, k, free = _split(g, k, free, caps, last_k, pf)
            lid = caps[k][0]
            total += c
    return total


def _fill_cluster(rec: tuple, on_chip: int) -> float:
    """``_fill`` when no weight operator can use the NPU: then a group costs the same in every
    on-chip level, so only where the on-chip capacity ``on_chip`` ends matters (groups are laid
    end to end in fill order; at most one straddles that point)."""
    pos = rec[8]  # the norms come first
    total = 0.0
    for lrec, n in rec[5]:
        ga, gm = lrec.attn, lrec.mlp
        sa = ga.size
        pair = sa + gm.size
        d = on_chip - pos
        pos += n * pair
        if d >= n * pair:  # the whole run on chip
            total += n * (ga.on + gm.on)
            continue
        if d <= 0:  # the whole run off chip
            total += n * (ga.off + gm.off)
            continue
        i, r = divmod(d, pair)  # pairs 0..i-1 on chip, pair i crosses (or starts at) the end
        total += i * (ga.on + gm.on) + (n - i - 1) * (ga.off + gm.off)
        if r == 0:
            total += ga.off + gm.off
        elif r < sa:
            total += ga.fixed + ga.stream.at((sa - r) / sa) + gm.off
        elif r == sa:
            total += ga.on + gm.off
        else:
            total += ga.on + gm.fixed + gm.stream.at((pair - r) / gm.size)
    for g in rec[7]:
        d = on_chip - pos
        size = g.size
        pos += size
        if d >= size:
            total += g.on
        elif d <= 0:
            total += g.off
        else:
            total += g.fixed + g.stream.at((size - d) / size)
    return total


def _check_context(context_len: Any) -> None:
    if not isinstance(context_len, int) or isinstance(context_len, bool) or context_len < 0:
        from slmsearch.errors import SlmsearchError

        raise SlmsearchError(f"context_len must be an integer >= 0, but got {context_len!r}")


def estimate_fast(shape: ModelShape, platform: Platform, context_len: int = 512) -> tuple[int, float]:
    """(deployed footprint bytes, decode seconds per token) == estimate(...) with prefill_len=0."""
    cache = shape._cache
    uid = platform.uid
    key = (uid, context_len)
    hit = cache.get(key)
    if hit is not None:
        return hit
    if type(context_len) is not int or context_len < 0:
        _check_context(context_len)
    rec = cache.get(uid)
    if rec is None or rec[0].p is not platform:
        rec = cache[uid] = _shape_rec(shape, platform)
    pf, static_total, kv_pos_bits, best, scores, runs, cycles, _, _, h, a, kvb, cluster_only = rec
    attended = context_len if context_len > 0 else 1
    # memory (memory.memory_report with prefill_len=0)
    for q, nh in scores:
        s = q + 2 * nh * attended
        if s > best:
            best = s
    act = -(-((h + best) * a) // 8)
    footprint = static_total + -(-(kv_pos_bits * context_len) // 8) + act
    # KV placement (placement.place: L2 after the activations, the rest off chip) and attention
    l2_free = pf.l2_usable - act
    if l2_free < 0:
        l2_free = 0
    off = pf.off
    ckey = (attended, kvb)
    for lrec, n in runs:
        c = lrec.ctx.get(ckey) or lrec.context(attended, kvb)
        size = -(-(lrec.kv * kvb * context_len) // 8)
        if size <= 0 or off is None:
            cycles += n * c.l2
            if size > 0:
                l2_free -= n * size
            continue
        j = l2_free // size
        if j >= n:
            cycles += n * c.l2
            l2_free -= n * size
            continue
        if j:
            cycles += j * c.l2
            l2_free -= j * size
            n -= j
        if l2_free > 0:
            cycles += c.split_cycles((size - l2_free) / size)
            l2_free = 0
            n -= 1
        if n:
            cycles += n * c.off
    if cluster_only:
        cycles += _fill_cluster(rec, pf.weight_total + l2_free)
    else:
        cycles += _fill(rec, l2_free)
    out = (footprint, cycles / pf.freq)
    cache[key] = out
    return out
