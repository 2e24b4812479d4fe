"""The model against every measured row we found, the fit of assumed values, and leave-one-out.

Every row is a simulated (GVSoC) runtime from source B (pulp-platform/Deeploy
docs/tutorials/introduction.md, tutorial solutions), on Deeploy's microLlama test network
(8 layers, d 64, 16 heads x 4, FFN 256, int8; anchors.md section 2):

  decode_1core       microLlama128: one autoregressive step, KV 128, untiled (all in L2), 1 core: 16.1 Mcycles
  decode_8core       same on 8 cores: 3.1 Mcycles
  prefill_l1_64k     microLlama64_parallel: prefill of 64 tokens, 8 cores, tiled, L1 64,000 B: 35.3 Mcycles
  prefill_l1_8k      same with L1 8,000 B: 47.5 Mcycles
  prefill_npu        prefill_l1_64k + N-EUREKA, weights in L2: 28.6 Mcycles
  prefill_npu_wmem   same with the weights in the weight memory (--neureka-wmem): 28.3 Mcycles
  decode64_npu       microLlama64: one step, KV 64, tiled L1 64,000 B, 8 cores + N-EUREKA: 857 kcycles
  decode64_npu_wmem  same with the weights in the weight memory: 780 kcycles
  decode64_cluster   same without N-EUREKA: 857 x 1.04 = 891 kcycles (the tutorial gives the
                     NPU speedup "~1.04", not the runtime: a derived row)

Fit rows (FIT_ROWS, chosen before the other rows were added, and kept): the three cluster rows
that the three fitted values (FIT_KEYS) must explain. Every other row is held out: never used to
set a value. ``leave_one_out`` refits without each fit row and predicts it.
Not rows: the Deeploy paper's 340 tokens/s and 490 uJ/token (arXiv 2408.04413, abstract): the
dimensions of its TinyStories model could not be established from what we could read, and a
row priced on stand-in dimensions tests the stand-in, not the model.
``roofline`` is a bare roofline (peak MACs, peak bandwidth) for contrast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from slmsearch.hwmodel.estimate import estimate
from slmsearch.hwmodel.platform import Platform, load_platform
from slmsearch.hwmodel.shape import ModelShape, microllama

FIT_KEYS = ("cluster.kernel_overhead_cycles", "cluster.output_overhead_cycles", "cluster.l2_access_slowdown")
FIT_ROWS = ("decode_1core", "decode_8core", "prefill_l1_64k")
NO_WMEM = {"memory.weight_sram.size_bytes": 0, "memory.weight_mram.size_bytes": 0}
TILED_64K = {"tiling.l1_budget_bytes": 64000}
SOURCE_B = "B: Deeploy docs/tutorials/introduction.md"


@dataclass(frozen=True)
class Row:
    name: str
    setup: str
    measured: float
    unit: str  # Mcycles
    source: str
    overrides: dict[str, float]
    mode: str  # decode | prefill
    context_len: int
    prefill_len: int
    derived: bool = False  # computed from a published ratio, not a published runtime


ROWS = (
    Row("decode_1core", "microLlama128 decode, KV 128, untiled L2, 1 core", 16.1, "Mcycles", SOURCE_B,
        {"tiling.enabled": 0, "npu.enabled": 0, "cluster.cores": 1, **NO_WMEM}, "decode", 128, 0),
    Row("decode_8core", "microLlama128 decode, KV 128, untiled L2, 8 cores", 3.1, "Mcycles", SOURCE_B,
        {"tiling.enabled": 0, "npu.enabled": 0, **NO_WMEM}, "decode", 128, 0),
    Row("prefill_l1_64k", "microLlama64_parallel prefill 64, tiled, L1 64,000 B, 8 cores", 35.3, "Mcycles", SOURCE_B,
        {**TILED_64K, "npu.enabled": 0, **NO_WMEM}, "prefill", 64, 64),
    Row("prefill_l1_8k", "microLlama64_parallel prefill 64, tiled, L1 8,000 B, 8 cores", 47.5, "Mcycles", SOURCE_B,
        {"tiling.l1_budget_bytes": 8000, "npu.enabled": 0, **NO_WMEM}, "prefill", 64, 64),
    Row("prefill_npu", "microLlama64_parallel prefill 64, L1 64,000 B, 8 cores + N-EUREKA, weights in L2",
        28.6, "Mcycles", SOURCE_B, {**TILED_64K, **NO_WMEM}, "prefill", 64, 64),
    Row("prefill_npu_wmem", "same, weights in the N-EUREKA weight memory", 28.3, "Mcycles", SOURCE_B,
        {**TILED_64K}, "prefill", 64, 64),
    Row("decode64_npu", "microLlama64 decode, KV 64, L1 64,000 B, 8 cores + N-EUREKA, weights in L2",
        0.857, "Mcycles", SOURCE_B, {**TILED_64K, **NO_WMEM}, "decode", 64, 0),
    Row("decode64_npu_wmem", "same, weights in the N-EUREKA weight memory", 0.780, "Mcycles", SOURCE_B,
        {**TILED_64K}, "decode", 64, 0),
    Row("decode64_cluster", "microLlama64 decode, KV 64, L1 64,000 B, 8 cores (857 kcycles x NPU speedup 1.04)",
        0.857 * 1.04, "Mcycles", SOURCE_B, {**TILED_64K, "npu.enabled": 0, **NO_WMEM}, "decode", 64, 0,
        derived=True),
)


def _predict(row: Row, p: Platform, shape: ModelShape) -> float:
    e = estimate(shape, p, context_len=row.context_len, prefill_len=row.prefill_len)
    pas = e.prefill if row.mode == "prefill" else e.decode
    assert pas is not None
    return pas.cycles / 1e6


def _roofline(row: Row, p: Platform, shape: ModelShape) -> float | None:
    """max(MACs / (cores x 8-bit SIMD peak), weight bytes / L2 bandwidth), cycles."""
    if row.unit != "Mcycles":
        return None
    e = estimate(shape, p, context_len=row.context_len, prefill_len=row.prefill_len)
    pas = e.prefill if row.mode == "prefill" else e.decode
    assert pas is not None
    macs = sum(r.macs for r in pas.ops)
    peak = p.cluster.cores * p.cluster.macs_per_cycle(8)
    if p.npu.enabled:
        peak = max(peak, p.npu.macs_per_cycle(8))
    weights = sum(v for k, v in e.memory.by_kind.items() if k in ("attention", "mlp", "norms"))
    return max(macs / peak, weights / p.dma.l2_l1_bw_bytes_per_cycle) / 1e6


def validation_table(platform: str = "siracusa", fitted: dict[str, float] | None = None,
                     shape: ModelShape | None = None, loo: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One dict per measured row: ``name``, ``role`` (fit | held_out), ``measured``, ``model``,
    ``error`` (relative, signed), ``source``; fit rows also ``loo_model``/``loo_error`` when
    ``loo`` (from :func:`leave_one_out`) is given."""
    shape = shape or microllama()
    out = []
    for row in ROWS:
        p = load_platform(platform, {**(fitted or {}), **row.overrides})
        pred = _predict(row, p, shape)
        roof = _roofline(row, p, shape)
        d: dict[str, Any] = {
            "name": row.name, "role": "fit" if row.name in FIT_ROWS else "held_out", "setup": row.setup,
            "unit": row.unit, "measured": row.measured, "model": pred,
            "error": (pred - row.measured) / row.measured, "source": row.source, "derived": row.derived,
            "roofline": roof, "roofline_error": None if roof is None else (roof - row.measured) / row.measured,
        }
        if loo is not None and row.name in loo:
            d["loo_model"] = loo[row.name]
            d["loo_error"] = (loo[row.name] - row.measured) / row.measured
        out.append(d)
    return out


def leave_one_out(platform: str = "siracusa", iters: int = 100) -> dict[str, float]:
    """For each fit row: refit FIT_KEYS on the other fit rows, then predict the row left out."""
    shape = microllama()
    out = {}
    for name in FIT_ROWS:
        # start away from the full fit (the low end of each value's range): started at the file's
        # values, which already fit every row, the search would not move and predict the row exactly
        low = {k: lo for k, _, lo, _ in load_platform(platform).ranges if k in FIT_KEYS}
        vals = fit(platform, rows=tuple(r for r in FIT_ROWS if r != name), iters=iters, start=low)
        row = next(r for r in ROWS if r.name == name)
        out[name] = _predict(row, load_platform(platform, {**vals, **row.overrides}), shape)
    return out


def held_out_error_pct(table: list[dict[str, Any]]) -> float:
    """Mean absolute error (%) over the held-out rows."""
    errs = [abs(r["error"]) for r in table if r["role"] == "held_out"]
    return 100.0 * sum(errs) / len(errs)


def format_validation_table(table: list[dict[str, Any]]) -> str:
    lines = []
    for role, title in (("fit", "fit rows (the fitted values were set on these)"),
                        ("held_out", "held-out rows (never used to set a value)")):
        head = f"{'row':<18} {'measured':>9} {'model':>9} {'error':>8} {'LOO model':>9} {'LOO err':>8} {'roof err':>9}  setup"
        lines += [title, head, "-" * len(head)]
        for r in (x for x in table if x["role"] == role):
            loo = f"{r['loo_model']:>9.4g} {100 * r['loo_error']:>+7.1f}%" if "loo_model" in r else f"{'':>9} {'':>8}"
            rerr = "" if r["roofline_error"] is None else f"{100 * r['roofline_error']:+.0f}%"
            note = " [derived]" if r["derived"] else ""
            lines.append(f"{r['name']:<18} {r['measured']:>9.4g} {r['model']:>9.4g} {100 * r['error']:>+7.1f}% "
                         f"{loo} {rerr:>9}  {r['setup']}{note}")
        lines.append("")
    fit_err = [abs(r["error"]) for r in table if r["role"] == "fit"]
    held = [abs(r["error"]) for r in table if r["role"] == "held_out"]
    lines.append(f"cycles in Mcycles. mean |error|: fit rows {100 * sum(fit_err) / len(fit_err):.1f}%, "
                 f"held-out rows {held_out_error_pct(table):.1f}% (max {100 * max(held):.1f}%, {len(held)} rows)")
    loo = [abs(r["loo_error"]) for r in table if "loo_error" in r]
    if loo:
        lines.append(f"leave-one-out mean |error| on the fit rows: {100 * sum(loo) / len(loo):.1f}%")
    return "\n".join(lines)


def fit(platform: str = "siracusa", keys: tuple[str, ...] = FIT_KEYS, rows: tuple[str, ...] = FIT_ROWS,
        iters: int = 400, start: dict[str, float] | None = None) -> dict[str, float]:
    """Pattern search in log space minimising the squared log error over ``rows``.
    Starts from the values in the platform file, or from ``start``."""
    base = load_platform(platform)
    start = {k: (start or {}).get(k, _get(base, k)) for k in keys}
    sel = [r for r in ROWS if r.name in rows]
    shape = microllama()

    def loss(vals: dict[str, float]) -> float:
        s = 0.0
        for r in sel:
            p = load_platform(platform, {**vals, **r.overrides})
            s += math.log(_predict(r, p, shape) / r.measured) ** 2
        return s

    return _pattern_search(loss, start, iters)


def _pattern_search(loss: Callable[[dict[str, float]], float], x: dict[str, float], iters: int) -> dict[str, float]:
    best = loss(x)
    step = 1.0  # log-space step
    for _ in range(iters):
        improved = False
        for k in list(x):
            for sgn in (1, -1):
                cand = dict(x)
                cand[k] = max(x[k] * math.exp(sgn * step), 1.0 if k.endswith("slowdown") else 1e-3)
                v = loss(cand)
                if v < best - 1e-15:
                    x, best, improved = cand, v, True
        if not improved:
            step /= 2
            if step < 1e-4:
                break
    return x


def _get(p: Platform, dotted: str) -> float:
    obj: Any = p
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return float(obj)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="hardware model vs measured rows (anchors.md section 2)")
    ap.add_argument("--fit", action="store_true", help="refit the assumed values and print them")
    ap.add_argument("--platform", default="siracusa")
    args = ap.parse_args()
    fitted = None
    if args.fit:
        fitted = fit(args.platform)
        for k, v in fitted.items():
            print(f"{k} = {v:.6g}")
    print(format_validation_table(validation_table(args.platform, fitted, loo=leave_one_out(args.platform))))


if __name__ == "__main__":
    main()
