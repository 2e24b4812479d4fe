"""Plans of nearly the same footprint that the hardware model prices apart (the report's section).

Footprint alone would make the hardware objectives redundant; these pairs show where they are not:
the study's own trials within ``PAIR_MB`` of each other whose decode latency or energy per token
differ by ``PAIR_RATIO`` or more, and the deployments of the best model (activation precision, what
fills the on-chip weight memories first, where the KV cache lives) that the hardware model tells apart
at the same footprint (:func:`slmsearch.hwmodel.summary.deployment_pairs`).
"""

from __future__ import annotations

from typing import Any

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel.summary import PAIR_MB, PAIR_RATIO

_KEYS = ("footprint_mb", "decode_latency_s", "energy_per_token_j")


def _priced(study: Any) -> list[tuple[int, dict[str, Any], dict[str, Any]]]:
    """(number, hardware numbers, what defines the plan) of every trial the hardware model priced."""
    out = []
    for t in study.get_trials(deepcopy=False):
        attrs = t.user_attrs
        if not all(isinstance(attrs.get(k), (int, float)) for k in _KEYS):
            continue
        defining = {**(attrs.get("deployment") or {}), **t.params}  # a searched deployment choice is also a param
        out.append((t.number, {k: float(attrs[k]) for k in _KEYS}, defining))
    return out


def _reason(a: dict[str, Any], b: dict[str, Any], limit: int = 6) -> str:
    diff = [f"{k}: {a.get(k, '-')} vs {b.get(k, '-')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more if diff else "same parameters"


def trial_pairs(study: Any, mb: float = PAIR_MB, ratio: float = PAIR_RATIO, limit: int = 5) -> list[dict[str, Any]]:
    """Pairs of the study's priced trials within ``mb`` MB of each other whose decode latency or
    energy per token differ by ``ratio`` or more, largest difference first (at most ``limit``), each
    with what differs between the two plans."""
    priced = sorted(_priced(study), key=lambda r: r[1]["footprint_mb"])
    out = []
    for i, (n1, h1, d1) in enumerate(priced):
        for n2, h2, d2 in priced[i + 1:]:
            if h2["footprint_mb"] - h1["footprint_mb"] > mb:
                break
            lat = max(h1["decode_latency_s"], h2["decode_latency_s"]) / min(h1["decode_latency_s"], h2["decode_latency_s"])
            en = max(h1["energy_per_token_j"], h2["energy_per_token_j"]) / min(h1["energy_per_token_j"], h2["energy_per_token_j"])
            if max(lat, en) >= ratio:
                out.append({"trials": (n1, n2), "footprint_mb": (h1["footprint_mb"], h2["footprint_mb"]),
                            "decode_latency_s": (h1["decode_latency_s"], h2["decode_latency_s"]),
                            "energy_per_token_j": (h1["energy_per_token_j"], h2["energy_per_token_j"]),
                            "latency_ratio": lat, "energy_ratio": en, "reason": _reason(d1, d2)})
    out.sort(key=lambda r: -max(r["latency_ratio"], r["energy_ratio"]))
    return out[:limit]


def best_deployment_pairs(config: dict[str, Any], plan: dict[str, Any]) -> list[dict[str, Any]]:
    """:func:`~slmsearch.hwmodel.summary.deployment_pairs` of ``plan`` (a trial's stored plan) on the
    study's model and platform. Raises SlmsearchError when the model cannot be found here."""
    from slmsearch.compress.plan import Plan
    from slmsearch.hwmodel import load_platform
    from slmsearch.hwmodel.summary import deployment_pairs
    from slmsearch.models import resolve_model
    from slmsearch.search.hardware import base_shape

    location = resolve_model(config.get("model"), trust_remote_code=bool(config.get("trust_remote_code")))
    platform = load_platform(config.get("platform", "siracusa"), config.get("platform_overrides") or None)
    shape = Plan.from_dict(plan).shape(base_shape(location))
    return deployment_pairs(shape, platform, int(config.get("context_len", 512)))


def _pair_text(lat: tuple[float, float], en: tuple[float, float], mb: tuple[float, float]) -> str:
    return (f"{mb[0]:.1f} / {mb[1]:.1f} MB, decode {lat[0] * 1e3:.0f} / {lat[1] * 1e3:.0f} ms per token, "
            f"{en[0] * 1e3:.1f} / {en[1] * 1e3:.1f} mJ per token")


def pair_lines(study: Any, config: dict[str, Any], best: dict[str, Any] | None) -> list[str]:
    """The report's lines: the study's same-footprint pairs, then the best model's deployments."""
    lines = []
    pairs = trial_pairs(study)
    if pairs:
        for p in pairs:
            a, b = p["trials"]
            lines.append(f"Trials {a} and {b}: " + _pair_text(p["decode_latency_s"], p["energy_per_token_j"],
                                                                 p["footprint_mb"]) + f"; differ in {p['reason']}.")
    else:
        lines.append(f"No two trials of this study lie within {PAIR_MB:g} MB of each other with decode latency or "
                     f"energy {PAIR_RATIO:.1f}x apart: among its plans, footprint alone ranks the hardware cost.")
    if best is None:
        return lines
    try:
        deployments = best_deployment_pairs(config, best["plan"])
    except SlmsearchError as e:
        return [*lines, f"The best model's deployments were not priced: {e}"]
    if not deployments:
        lines.append(f"The best model (trial {best['trial']}): its deployments (activation bits, what fills the "
                     f"weight memories first, KV cache level) price within {PAIR_RATIO:.1f}x of each other.")
    shown: set[str] = set()
    for p in sorted(deployments, key=lambda p: (p["reason"].count(";"), -max(p["latency_ratio"], p["energy_ratio"]))):
        if p["reason"] in shown or len(shown) == 3:
            continue  # the fewest differences first: each line names what alone makes the difference
        shown.add(p["reason"])
        lines.append(f"The best model (trial {best['trial']}) deployed two ways: "
                     + _pair_text(p["decode_latency_s"], p["energy_per_token_j"], p["footprint_mb"])
                     + f"; differ in {p['reason']}.")
    return lines


__all__ = ["trial_pairs", "best_deployment_pairs", "pair_lines"]
