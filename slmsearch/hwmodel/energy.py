"""Energy of one pass: compute + memory access by level + background power over the pass time.

    energy = sum_ops macs * energy_pj_per_mac(engine)
           + sum_ops sum_levels bytes_at_level * energy_pj_per_byte(level)
           + background_power_w * latency_s
"""

from __future__ import annotations

from slmsearch.hwmodel.latency import OpCost
from slmsearch.hwmodel.platform import Platform

PJ = 1e-12


def mac_energy_pj(cost: OpCost, p: Platform) -> float:
    per_mac = p.npu.energy_pj_per_mac if cost.engine == "npu" else p.cluster.energy_pj_per_mac
    return cost.macs * per_mac


def access_energy_pj(cost: OpCost, p: Platform) -> dict[str, float]:
    return {name: b * p.level(name).energy_pj_per_byte for name, b in cost.level_bytes}


def pass_energy_j(costs: list[OpCost], latency_s: float, p: Platform) -> dict[str, float]:
    """Joules by component: compute:<engine>, memory:<level>, background."""
    out: dict[str, float] = {}
    for c in costs:
        k = f"compute:{c.engine}"
        out[k] = out.get(k, 0.0) + mac_energy_pj(c, p) * PJ
        for name, pj in access_energy_pj(c, p).items():
            out[f"memory:{name}"] = out.get(f"memory:{name}", 0.0) + pj * PJ
    out["background"] = p.operating_point.background_power_w * latency_s
    return out
