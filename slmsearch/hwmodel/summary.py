"""What ``slmsearch hw`` prints and writes: memory breakdown, placement, latency, energy."""

from __future__ import annotations

from typing import Any

from slmsearch.hwmodel.estimate import estimate
from slmsearch.hwmodel.platform import Platform, load_platform
from slmsearch.hwmodel.shape import ModelShape


def hw_report(shape: ModelShape, platform: Platform | str = "siracusa", context_len: int = 512,
              prefill_len: int = 0) -> dict[str, Any]:
    """JSON-able report of one shape on one platform (per-operator rows included)."""
    p = load_platform(platform) if isinstance(platform, str) else platform
    d = estimate(shape, p, context_len=context_len, prefill_len=prefill_len).to_dict(with_ops=True)
    d["assumptions"] = {k: v for k, v in p.provenance if v.startswith(("assumed", "source: override"))}
    return d


def _mb(b: float) -> str:
    return f"{b / 1e6:10.3f} MB"


def _pass_lines(title: str, pas: dict[str, Any], top: int = 8) -> list[str]:
    lines = [
        f"{title}: {pas['tokens']} token(s) attending {pas['attended_positions']} positions",
        f"  latency {pas['latency_s'] * 1e3:.3f} ms ({pas['cycles'] / 1e6:.3f} Mcycles), "
        f"{pas['tokens_per_s']:.2f} tokens/s, {pas['energy_j_per_token'] * 1e6:.1f} uJ/token",
        "  cycles by bound:  " + ", ".join(
            f"{k} {v / pas['cycles']:.0%}" for k, v in sorted(pas["cycles_by_bound"].items(), key=lambda kv: -kv[1])),
        "  cycles by engine: " + ", ".join(f"{k} {v / pas['cycles']:.0%}" for k, v in pas["cycles_by_engine"].items()),
        "  energy:           " + ", ".join(
            f"{k} {v * 1e6:.1f} uJ" for k, v in sorted(pas["energy_j_by_component"].items(), key=lambda kv: -kv[1])),
    ]
    ops = pas.get("ops") or []
    if ops:
        agg: dict[str, list[Any]] = {}
        for r in ops:
            a = agg.setdefault(r["name"], [0.0, r["engine"], {}, 0])
            a[0] += r["cycles"]
            a[2][r["bound"]] = a[2].get(r["bound"], 0.0) + r["cycles"]
            a[3] += 1
        lines.append(f"  {'operator':<18} {'n':>4} {'engine':<8} {'Mcycles':>9} {'share':>6}  bound")
        for name, (cyc, eng, bounds, n) in sorted(agg.items(), key=lambda kv: -kv[1][0])[:top]:
            bound = max(bounds, key=lambda k: bounds[k])
            lines.append(f"  {name:<18} {n:>4} {eng:<8} {cyc / 1e6:>9.3f} {cyc / pas['cycles']:>6.1%}  {bound}")
    return lines


def format_report(d: dict[str, Any]) -> str:
    """Human tables for a ``hw_report`` dict."""
    mem, pl = d["memory"], d["placement"]
    lines = [f"model {d['model'] or '?'} on {d['platform']} @ {d['freq_hz'] / 1e6:.0f} MHz, "
             f"context {d['context_len']}, prefill {d['prefill_len']}", "", "memory (deployed footprint):"]
    for k, v in mem["by_kind"].items():
        if v:
            lines.append(f"  {k:<20} {_mb(v)}")
    lines.append(f"  {'total':<20} {_mb(mem['total_bytes'])}")
    lines += ["", "placement:"]
    by_level: dict[str, list[str]] = {}
    for name, g in pl["groups"].items():
        by_level.setdefault(g["level"], []).append(name)
    for level, names in by_level.items():
        shown = ", ".join(names[:4]) + (f", ... ({len(names)} groups)" if len(names) > 4 else "")
        lines.append(f"  {level:<24} {shown}")
    lines.append("  used: " + ", ".join(f"{k} {_mb(v).strip()}" for k, v in pl["used_bytes"].items() if v))
    lines.append(f"  KV cache in {', '.join(pl['kv_cache_levels'])}; activations in {pl['activations_level']}")
    lines.append(f"  weights streamed from off-chip per token: {_mb(pl['offchip_weight_bytes_per_token']).strip()}; "
                 f"on chip: {pl['on_chip']}; fits: {pl['fits']}")
    lines += [""] + _pass_lines("decode", d["decode"])
    if d.get("prefill"):
        lines += [""] + _pass_lines("prefill", d["prefill"])
    return "\n".join(lines)
