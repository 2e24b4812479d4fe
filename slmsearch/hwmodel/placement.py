"""Where each tensor group lives: NPU weight memory, L2 or off-chip L3.

Policy (what a deployment flow like Deeploy does by hand, written down):
1. L2 first holds the peak activations and then the KV cache (both are rewritten every token and
   the NPU cannot use the weight memory for them); KV positions that do not fit spill to L3.
2. Weight groups, in execution order (norms, layer 0 attention, layer 0 MLP, ..., lm_head, an
   untied embedding last since decode reads one row of it), fill the weight memories (N-EUREKA
   reads them without DMA), then what is left of L2, then L3. A group may straddle two levels.
3. Whatever lies in L3 streams into the chip once per token it is used.
A model "fits on chip" when nothing lies in L3; it "fits" when L3 is large enough for the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmsearch.hwmodel.platform import Platform

Split = tuple[tuple[int, float], ...]  # (index into Platform.levels, fraction of the bytes)


@dataclass(frozen=True)
class Placement:
    groups: tuple[tuple[str, int, Split], ...]  # name, bytes, split over levels
    kv_split: tuple[Split, ...]  # per layer
    activations_level: int
    used_bytes: tuple[int, ...]  # per level, same order as Platform.levels
    offchip_bytes_per_token: int  # weights read from L3 per decode token (KV excluded)
    on_chip: bool  # nothing in L3
    fits: bool  # also within L3's size

    def level_of(self, platform: Platform, group: str) -> str:
        for name, _, split in self.groups:
            if name == group:
                return _split_name(platform, split)
        raise KeyError(group)

    def to_dict(self, platform: Platform) -> dict:
        names = [lv.name for lv in platform.levels]
        return {
            "groups": {
                name: {"bytes": b, "level": _split_name(platform, s),
                       "split": {names[i]: round(f, 6) for i, f in s}}
                for name, b, s in self.groups
            },
            "kv_cache_levels": sorted({_split_name(platform, s) for s in self.kv_split}),
            "activations_level": names[self.activations_level],
            "used_bytes": dict(zip(names, self.used_bytes)),
            "offchip_weight_bytes_per_token": self.offchip_bytes_per_token,
            "on_chip": self.on_chip,
            "fits": self.fits,
        }


def _split_name(platform: Platform, split: Split) -> str:
    if not split:
        return "-"
    if len(split) == 1:
        return platform.levels[split[0][0]].name
    return "+".join(platform.levels[i].name for i, _ in split)


def fill(sizes: list[int] | tuple[int, ...], capacities: list[tuple[int, int]]) -> list[Split]:
    """Fill ``sizes`` in order into ``capacities`` [(level index, bytes free)]; the last level
    takes any excess. Returns one split per size."""
    caps = [list(c) for c in capacities]
    out: list[Split] = []
    k = 0
    for size in sizes:
        if size <= 0:
            out.append(((caps[k][0], 1.0),) if caps else ())
            continue
        left = size
        parts = []
        while left > 0:
            idx, free = caps[k]
            last = k == len(caps) - 1
            take = left if last else min(left, free)
            if take > 0:
                parts.append((idx, take / size))
                caps[k][1] = free - take
                left -= take
            if left > 0:
                k += 1
        out.append(tuple(parts))
    return out


HEAD_GROUPS = ("embedding+lm_head", "lm_head")


def place(platform: Platform, weight_groups: tuple[tuple[str, int], ...], kv_per_layer: list[int],
          activation_bytes: int, *, head_first: bool = False, kv_offchip: bool = False) -> Placement:
    """``head_first``: the output head's group fills the weight memories before the layers;
    ``kv_offchip``: the KV cache goes to L3 (when there is one) and leaves L2 to weights."""
    if head_first:
        weight_groups = (tuple(g for g in weight_groups if g[0] in HEAD_GROUPS)
                         + tuple(g for g in weight_groups if g[0] not in HEAD_GROUPS))
    levels = platform.levels
    l2 = next(i for i, lv in enumerate(levels) if lv.kind == "l2")
    off = next((i for i, lv in enumerate(levels) if lv.kind == "offchip"), None)
    weight = [i for i, lv in enumerate(levels) if lv.kind == "weight"]
    l2_free = levels[l2].usable_bytes - activation_bytes
    overflow = l2_free < 0
    l2_free = max(0, l2_free)
    kv_caps = [(l2, l2_free)] + ([(off, 0)] if off is not None else [])
    if kv_offchip and off is not None:
        kv_caps = [(off, 0)]
    kv_split = fill(kv_per_layer, kv_caps)
    kv_in_l2 = sum(int(round(s * f)) for s, sp in zip(kv_per_layer, kv_split) for i, f in sp if i == l2)
    l2_free -= kv_in_l2
    caps = [(i, levels[i].usable_bytes) for i in weight] + [(l2, l2_free)]
    if off is not None:
        caps.append((off, 0))
    sizes = [b for _, b in weight_groups]
    splits = fill(sizes, caps)
    used = [0] * len(levels)
    used[l2] += activation_bytes
    for size, sp in list(zip(kv_per_layer, kv_split)) + list(zip(sizes, splits)):
        for i, f in sp:
            used[i] += int(round(size * f))
    offchip_w = 0
    if off is not None:
        offchip_w = sum(int(round(s * f)) for s, sp in zip(sizes, splits) for i, f in sp if i == off)
        if weight_groups and weight_groups[-1][0] == "embedding":  # untied embedding: one row per token
            offchip_w -= int(round(sizes[-1] * sum(f for i, f in splits[-1] if i == off)))
    on_chip = off is None or used[off] == 0
    fits = not overflow and (off is None or used[off] <= levels[off].usable_bytes)
    if off is None:
        fits = fits and all(used[i] <= levels[i].usable_bytes for i in range(len(levels)) if levels[i].kind != "l1")
    groups = tuple((n, b, sp) for (n, b), sp in zip(weight_groups, splits))
    return Placement(groups, tuple(kv_split), l2, tuple(used), max(0, offchip_w), on_chip, fits)
