"""What ``slmsearch hw`` prints and writes: memory breakdown, placement, latency, energy."""

from __future__ import annotations

from typing import Any

import itertools

from slmsearch.hwmodel.deployment import ACTIVATION_BITS, KV_CACHE_LEVELS, WEIGHT_MEMORY_FIRST, Deployment
from slmsearch.hwmodel.estimate import estimate
from slmsearch.hwmodel.platform import Platform, load_platform
from slmsearch.hwmodel.sensitivity import estimate_range, format_sensitivity, sensitivity
from slmsearch.hwmodel.shape import ModelShape

PAIR_MB = 1.0  # plans this close in footprint ...
PAIR_RATIO = 1.2  # ... whose decode latency or energy differ by this factor are shown


def deployment_pairs(shape: ModelShape, platform: Platform, context_len: int = 512) -> list[dict[str, Any]]:
    """Every deployment of ``shape`` (activation bits x what fills the weight memories first x KV
    level), and the pairs within PAIR_MB of each other whose decode latency or energy per token
    differ by PAIR_RATIO or more, with what differs between them (the reason)."""
    plans = []
    for act, first, kv in itertools.product(ACTIVATION_BITS, WEIGHT_MEMORY_FIRST, KV_CACHE_LEVELS):
        dep = Deployment(act, first, kv)
        e = estimate(shape, platform, context_len=context_len, deployment=dep)
        plans.append((dep, e.memory.total_bytes / 1e6, e.decode.latency_s, e.decode.energy_j_per_token))
    out = []
    for (d1, mb1, l1, e1), (d2, mb2, l2, e2) in itertools.combinations(plans, 2):
        lat_ratio, en_ratio = max(l1, l2) / min(l1, l2), max(e1, e2) / min(e1, e2)
        if abs(mb1 - mb2) <= PAIR_MB and max(lat_ratio, en_ratio) >= PAIR_RATIO:
            reason = [f"{k}: {a} vs {b}" for k, a, b in zip(d1.to_dict(), d1.to_dict().values(), d2.to_dict().values())
                      if a != b]
            out.append({"a": d1.to_dict(), "b": d2.to_dict(), "footprint_mb": (mb1, mb2),
                        "decode_latency_s": (l1, l2), "energy_per_token_j": (e1, e2),
                        "latency_ratio": lat_ratio, "energy_ratio": en_ratio, "reason": "; ".join(reason)})
    out.sort(key=lambda r: -max(r["latency_ratio"], r["energy_ratio"]))
    return out


def hw_report(shape: ModelShape, platform: Platform | str = "siracusa", context_len: int = 512,
              prefill_len: int = 0, *, deployment: Deployment | None = None,
              with_sensitivity: bool = True) -> dict[str, Any]:
    """JSON-able report of one shape on one platform (per-operator rows included), with the
    sensitivity table, the latency/energy ranges and the same-footprint deployment pairs."""
    p = load_platform(platform) if isinstance(platform, str) else platform
    d = estimate(shape, p, context_len=context_len, prefill_len=prefill_len,
                 deployment=deployment).to_dict(with_ops=True)
    d["assumptions"] = {k: v for k, v in p.provenance if v.startswith(("assumed", "source: override"))}
    if with_sensitivity:
        d["sensitivity"] = sensitivity(shape, p, context_len=context_len, deployment=deployment)
        d["ranges"] = estimate_range(shape, p, context_len=context_len, deployment=deployment)
        d["deployment_pairs"] = deployment_pairs(shape, p, context_len)
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
    lines += [""] + _pass_lines("decode (last step: worst case)", d["decode"])
    avg = d.get("decode_avg")
    if avg:
        lines.append(f"  averaged over a generation to this context: {avg['latency_s'] * 1e3:.3f} ms, "
                     f"{avg['energy_j_per_token'] * 1e6:.1f} uJ/token")
    if d.get("prefill"):
        lines += [""] + _pass_lines("prefill", d["prefill"])
    if d.get("ranges"):
        (llo, lhi), (elo, ehi) = d["ranges"]["decode_latency_s_range"], d["ranges"]["energy_per_token_j_range"]
        lines += ["", f"decode across every assumed value's range: latency {llo * 1e3:.3f} to {lhi * 1e3:.3f} ms, "
                      f"energy {elo * 1e6:.1f} to {ehi * 1e6:.1f} uJ/token"]
    if d.get("sensitivity") is not None:
        lines += ["", format_sensitivity(d["sensitivity"])]
    if d.get("deployment_pairs") is not None:
        lines += ["", f"deployments within {PAIR_MB:g} MB of each other whose decode latency or energy differ by "
                      f"{PAIR_RATIO - 1:.0%} or more:"]
        for r in d["deployment_pairs"]:
            (l1, l2), (e1, e2), (m1, m2) = r["decode_latency_s"], r["energy_per_token_j"], r["footprint_mb"]
            lines.append(f"  {r['reason']}: {m1:.2f} / {m2:.2f} MB, {l1 * 1e3:.1f} / {l2 * 1e3:.1f} ms, "
                         f"{e1 * 1e6:.0f} / {e2 * 1e6:.0f} uJ/token")
        if not d["deployment_pairs"]:
            lines.append("  (none for this model: its deployments price within 20% of each other)")
    return "\n".join(lines)


def reference_table(platform: str = "siracusa", context_len: int = 512) -> str:
    """docs/hwmodel.md's "Reference models on Siracusa" table from the current model: SmolLM2-135M
    and Llama-3.2-1B in fp16, with 4-bit g128 linear layers, and with 4 of them dropped too
    (embedding fp16, decode at ``context_len``). ``python -c "from slmsearch.hwmodel.summary import
    reference_table; print(reference_table())"`` regenerates it."""
    from slmsearch.hwmodel.shape import TensorFormat, llama32_1b, smollm2_135m

    p = load_platform(platform)
    l3 = next(lv for lv in p.levels if lv.kind == "offchip")
    q4 = TensorFormat(weight_bits=4, group_size=128)
    lines = ["| model | format | footprint MB | streamed from L3 per token MB | decode tokens/s | mJ/token "
             "| largest bound | fits 64 MB L3 |", "|---|---|---|---|---|---|---|---|"]
    for name, base in (("SmolLM2-135M", smollm2_135m()), ("Llama-3.2-1B", llama32_1b())):
        q = base.with_linear_format(q4)
        for fmt, s in (("fp16", base), ("4-bit g128", q),
                       ("4-bit g128, 4 layers dropped", q.drop_layers(range(base.n_layers - 4, base.n_layers)))):
            e = estimate(s, p, context_len=context_len)
            streamed = sum(r.level_bytes.get(l3.name, 0) for r in e.decode.ops)
            bound = max(e.decode.cycles_by_bound.items(), key=lambda kv: kv[1])[0]
            fits = "yes" if e.memory.total_bytes <= l3.size_bytes else "no"
            lines.append(f"| {name} | {fmt} | {e.memory.total_bytes / 1e6:.1f} | {streamed / 1e6:.1f} | "
                         f"{e.decode.tokens_per_s:.2f} | {1e3 * e.decode.energy_j_per_token:.1f} | {bound} | {fits} |")
    return "\n".join(lines)
