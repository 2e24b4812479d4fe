"""How much the hardware model's answer depends on its assumptions.

``sensitivity`` moves each assumed platform value (``Platform.assumed_ranges``) to the low and
the high end of its stated range, one at a time, and reports how decode latency and energy per
token move. ``estimate_range`` gives (low, high) decode latency and energy for a shape: every
assumed value set at once to the end that lowers (raises) the quantity, the end chosen from the
one-at-a-time table of the first shape priced on that platform and context (the directions are
the same for every LLaMA-family shape: faster memories and cheaper bytes never slow a pass down).
"""

from __future__ import annotations

from typing import Any

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel.deployment import Deployment
from slmsearch.hwmodel.estimate import estimate
from slmsearch.hwmodel.platform import Platform
from slmsearch.hwmodel.shape import ModelShape

# (platform path, overrides, context_len, deployment) -> {quantity: {"low": overrides, "high": overrides}}
_CORNERS: dict[tuple[Any, ...], dict[str, dict[str, dict[str, float]]]] = {}


def _decode(shape: ModelShape, p: Platform, context_len: int, dep: Deployment | None) -> tuple[float, float]:
    e = estimate(shape, p, context_len=context_len, deployment=dep)
    return e.decode.latency_s, e.decode.energy_j_per_token


def sensitivity(shape: ModelShape, platform: Platform, *, context_len: int = 512,
                deployment: Deployment | None = None) -> list[dict[str, Any]]:
    """One row per assumed value: its range and the relative change of decode latency and energy
    per token at each end, sorted by the largest change first."""
    lat0, en0 = _decode(shape, platform, context_len, deployment)
    rows = []
    for key, value, lo, hi in platform.assumed_ranges():
        ends = {}
        for tag, v in (("low", lo), ("high", hi)):
            try:
                p = platform.with_overrides({key: v})
            except SlmsearchError:  # an end the file's own rules refuse (e.g. a budget above L1)
                continue
            lat, en = _decode(shape, p, context_len, deployment)
            ends[tag] = (lat / lat0 - 1, en / en0 - 1)
        if not ends:
            continue
        rows.append({
            "key": key, "value": value, "low": lo, "high": hi,
            "latency_at_low": ends.get("low", (0.0, 0.0))[0], "latency_at_high": ends.get("high", (0.0, 0.0))[0],
            "energy_at_low": ends.get("low", (0.0, 0.0))[1], "energy_at_high": ends.get("high", (0.0, 0.0))[1],
            "provenance": platform.provenance_of(key),
        })
    rows.sort(key=lambda r: -max(abs(r["latency_at_low"]), abs(r["latency_at_high"]),
                                 abs(r["energy_at_low"]), abs(r["energy_at_high"])))
    return rows


def _corners(table: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    out: dict[str, dict[str, dict[str, float]]] = {"latency": {"low": {}, "high": {}},
                                                   "energy": {"low": {}, "high": {}}}
    for r in table:
        for q in ("latency", "energy"):
            at_lo, at_hi = r[f"{q}_at_low"], r[f"{q}_at_high"]
            if at_lo == at_hi:
                continue
            out[q]["low"][r["key"]] = r["low"] if at_lo < at_hi else r["high"]
            out[q]["high"][r["key"]] = r["high"] if at_lo < at_hi else r["low"]
    return out


def estimate_range(shape: ModelShape, platform: Platform, *, context_len: int = 512,
                   deployment: Deployment | None = None) -> dict[str, tuple[float, float]]:
    """``{"decode_latency_s_range": (low, high), "energy_per_token_j_range": (low, high)}``."""
    key = (platform.path, platform.overrides, context_len, deployment)
    if key not in _CORNERS:
        _CORNERS[key] = _corners(sensitivity(shape, platform, context_len=context_len, deployment=deployment))
    c = _CORNERS[key]
    lat_lo = _decode(shape, platform.with_overrides(c["latency"]["low"]), context_len, deployment)[0]
    lat_hi = _decode(shape, platform.with_overrides(c["latency"]["high"]), context_len, deployment)[0]
    en_lo = _decode(shape, platform.with_overrides(c["energy"]["low"]), context_len, deployment)[1]
    en_hi = _decode(shape, platform.with_overrides(c["energy"]["high"]), context_len, deployment)[1]
    lat, en = _decode(shape, platform, context_len, deployment)
    return {"decode_latency_s_range": (min(lat_lo, lat), max(lat_hi, lat)),
            "energy_per_token_j_range": (min(en_lo, en), max(en_hi, en))}


def format_sensitivity(table: list[dict[str, Any]], top: int | None = None) -> str:
    head = f"{'assumed value':<44} {'value':>10} {'range':>21} {'latency':>17} {'energy':>17}"
    lines = ["sensitivity of decode to each assumed value (relative change at the low / high end of its range):",
             head, "-" * len(head)]
    for r in table[:top]:
        rng = f"[{r['low']:.4g}, {r['high']:.4g}]"
        lines.append(f"{r['key']:<44} {r['value']:>10.4g} {rng:>21} "
                     f"{100 * r['latency_at_low']:>+7.1f}/{100 * r['latency_at_high']:>+7.1f}% "
                     f"{100 * r['energy_at_low']:>+7.1f}/{100 * r['energy_at_high']:>+7.1f}%")
    return "\n".join(lines)
