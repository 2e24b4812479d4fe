"""The model against every measured row we found, the fit of assumed values, and leave-one-out.

Every row is a simulated (GVSoC) runtime on Siracusa from source B (pulp-platform/Deeploy,
docs/tutorials/introduction.md at commit e20293c488b02e095c4c64854c6de43d4b532313, tutorial
solutions). Model rows run Deeploy's microLlama test network (8 layers, d 64, 16 heads x 4,
FFN 256, int8; anchors.md section 2; the same dimensions as the ONNX files in
DeeployTest/Tests/Models/microLlama/INT8/):

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

Kernel rows (the tutorial's Part III, "Stacked speedup" table): one int8 LeakyReLU over
(1, 16, 64, 64) = 65,536 elements, Tests/Kernels/Integer/LeakyReLU/Regular:

  leaky_untiled_1core   untiled, scalar kernel, 1 core: 2,492,970 cycles
  leaky_untiled_8core   untiled, scalar kernel, 8 cores: 313,541 cycles
  leaky_tiled_scalar    tiled, L1 32,768 B, scalar kernel, 8 cores: 108,090 cycles
  leaky_tiled_simd      tiled, L1 32,768 B, SIMD kernel, 8 cores: 43,005 cycles

A kernel row is priced as one element-wise operator (latency.op_cost) of 65,536 elements that
reads and writes 1 byte each. The SIMD kernel's cost per element is 1 cycle per core, from the
tutorial's description of its loop (a word load, pv.sra.b, pv.max.b and a store: four
instructions for four elements); the scalar kernel is priced at cluster.cycles_per_element_scalar,
the platform's cost of Deeploy's scalar int8 element-wise kernels (the requant, transpose,
concat, mul and div kernels of its integer graph, latency.integer_graph), fitted on
leaky_tiled_scalar together with the tiled group.

Fit groups (FITS), fitted in order, each on its own named rows, the others held out:
  tiled    cluster.kernel_overhead_cycles, cluster.gemm_call_cycles,
           cluster.cycles_per_element_scalar on prefill_l1_64k, decode64_npu (the published tiled
           runtimes of microLlama with Deeploy's default L1 of the tutorial's "good"
           configuration, one prefill and one decode) and leaky_tiled_scalar
  untiled  cluster.untiled_kernel_overhead_cycles, cluster.l2_access_slowdown on decode_1core
           and decode_8core (the only untiled model rows)
``leave_one_out`` refits the left-out row's group on the other fit rows (starting from the
low end of each value's range) and predicts it; a group with as many values as rows is
underdetermined once a row is left out, which the table says.
Not rows: the Deeploy paper's 340 tokens/s and 490 uJ/token (arXiv 2408.04413, abstract): its
model's dimensions and clock are not in what we could read. Deeploy's microLlama has exactly the
dimensions of the TinyStories-trained TinyLLama-v0 (8 layers, d 64, 16 heads, FFN 256, 32,000
tokens; its published GGUF metadata), so the paper's model is likely microLlama plus a 32,000 x
64 embedding and head, but that is an inference, not a published fact.
``roofline`` is a bare roofline (peak MACs, peak bandwidth) for contrast.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from slmsearch.hwmodel.estimate import estimate
from slmsearch.hwmodel.latency import ELTWISE, Op, op_cost
from slmsearch.hwmodel.platform import Platform, load_platform
from slmsearch.hwmodel.shape import ModelShape, microllama

NO_WMEM = {"memory.weight_sram.size_bytes": 0, "memory.weight_mram.size_bytes": 0}
TILED_64K = {"tiling.l1_budget_bytes": 64000}
UNTILED = {"tiling.enabled": 0, "npu.enabled": 0, **NO_WMEM}
LEAKY_TILED = {"tiling.l1_budget_bytes": 32768, "npu.enabled": 0, **NO_WMEM}
SOURCE_B = "B: Deeploy docs/tutorials/introduction.md @e20293c"
LEAKY_DIMS = (1, 16, 64, 64)  # the tutorial's generate.py SHAPE (NCHW)
LEAKY_ELEMENTS = 1 * 16 * 64 * 64
LEAKY_SIMD_CPE = 1.0  # four instructions (load, pv.sra.b, pv.max.b, store) per four int8 elements
SCALAR = "cluster.cycles_per_element_scalar"  # the scalar kernel rows' cost per element


@dataclass(frozen=True)
class FitGroup:
    name: str
    keys: tuple[str, ...]
    rows: tuple[str, ...]


FITS = (
    FitGroup("tiled", ("cluster.kernel_overhead_cycles", "cluster.gemm_call_cycles", SCALAR),
             ("prefill_l1_64k", "decode64_npu", "leaky_tiled_scalar")),
    FitGroup("untiled", ("cluster.untiled_kernel_overhead_cycles", "cluster.l2_access_slowdown"),
             ("decode_1core", "decode_8core")),
)
FIT_KEYS = tuple(k for g in FITS for k in g.keys)
FIT_ROWS = tuple(r for g in FITS for r in g.rows)


@dataclass(frozen=True)
class Row:
    name: str
    setup: str
    measured: float
    unit: str  # Mcycles
    source: str
    overrides: dict[str, float]
    mode: str  # decode | prefill | kernel
    context_len: int = 0
    prefill_len: int = 0
    derived: bool = False  # computed from a published ratio, not a published runtime
    cycles_per_element: float | str = 0.0  # kernel rows: a number, or the platform key that prices it
    tile_multiple: int = 1  # kernel rows: the innermost tile size is a multiple of this (tile constraint)
    regime: str = field(default="")


ROWS = (
    Row("decode_1core", "microLlama128 decode, KV 128, untiled L2, 1 core", 16.1, "Mcycles", SOURCE_B,
        {**UNTILED, "cluster.cores": 1}, "decode", 128, 0, regime="untiled"),
    Row("decode_8core", "microLlama128 decode, KV 128, untiled L2, 8 cores", 3.1, "Mcycles", SOURCE_B,
        dict(UNTILED), "decode", 128, 0, regime="untiled"),
    Row("prefill_l1_64k", "microLlama64_parallel prefill 64, tiled, L1 64,000 B, 8 cores", 35.3, "Mcycles", SOURCE_B,
        {**TILED_64K, "npu.enabled": 0, **NO_WMEM}, "prefill", 64, 64, regime="tiled"),
    Row("prefill_l1_8k", "microLlama64_parallel prefill 64, tiled, L1 8,000 B, 8 cores", 47.5, "Mcycles", SOURCE_B,
        {"tiling.l1_budget_bytes": 8000, "npu.enabled": 0, **NO_WMEM}, "prefill", 64, 64, regime="tiled"),
    Row("prefill_npu", "microLlama64_parallel prefill 64, L1 64,000 B, 8 cores + N-EUREKA, weights in L2",
        28.6, "Mcycles", SOURCE_B, {**TILED_64K, **NO_WMEM}, "prefill", 64, 64, regime="tiled"),
    Row("prefill_npu_wmem", "same, weights in the N-EUREKA weight memory", 28.3, "Mcycles", SOURCE_B,
        {**TILED_64K}, "prefill", 64, 64, regime="tiled"),
    Row("decode64_npu", "microLlama64 decode, KV 64, L1 64,000 B, 8 cores + N-EUREKA, weights in L2",
        0.857, "Mcycles", SOURCE_B, {**TILED_64K, **NO_WMEM}, "decode", 64, 0, regime="tiled"),
    Row("decode64_npu_wmem", "same, weights in the N-EUREKA weight memory", 0.780, "Mcycles", SOURCE_B,
        {**TILED_64K}, "decode", 64, 0, regime="tiled"),
    Row("decode64_cluster", "microLlama64 decode, KV 64, L1 64,000 B, 8 cores (857 kcycles x NPU speedup 1.04)",
        0.857 * 1.04, "Mcycles", SOURCE_B, {**TILED_64K, "npu.enabled": 0, **NO_WMEM}, "decode", 64, 0,
        derived=True, regime="tiled"),
    Row("leaky_untiled_1core", "int8 LeakyReLU, 65,536 elements, untiled L2, scalar kernel, 1 core", 2.49297,
        "Mcycles", SOURCE_B, {**UNTILED, "cluster.cores": 1}, "kernel",
        cycles_per_element=SCALAR, regime="untiled"),
    Row("leaky_untiled_8core", "same, 8 cores", 0.313541, "Mcycles", SOURCE_B, dict(UNTILED), "kernel",
        cycles_per_element=SCALAR, regime="untiled"),
    Row("leaky_tiled_scalar", "same, tiled, L1 32,768 B, scalar kernel, 8 cores", 0.108090, "Mcycles", SOURCE_B,
        dict(LEAKY_TILED), "kernel", cycles_per_element=SCALAR, regime="tiled"),
    # the tutorial's Step 6: (a) the multiple-of-16 tile constraint, then (b) the SIMD kernel; Step 5's
    # scalar row ran with the constraint's body still empty
    Row("leaky_tiled_simd", "same, tiled, L1 32,768 B, SIMD kernel (1 cycle per element per core), "
        "innermost tile a multiple of 16, 8 cores",
        0.043005, "Mcycles", SOURCE_B, dict(LEAKY_TILED), "kernel", cycles_per_element=LEAKY_SIMD_CPE,
        regime="tiled", tile_multiple=16),
)


def _kernel_cycles(row: Row, p: Platform) -> float:
    """One element-wise int8 operator reading and writing every element once."""
    cpe = _get(p, row.cycles_per_element) if isinstance(row.cycles_per_element, str) else row.cycles_per_element
    op = Op("leaky_relu", ELTWISE, "", elements=LEAKY_ELEMENTS, cycles_per_element=cpe,
            operand_bits=8, weight_bits=8, act_bytes=2 * LEAKY_ELEMENTS, dims=LEAKY_DIMS,
            last_multiple=row.tile_multiple)
    return op_cost(op, p, (), ()).cycles


def predict(row: Row, values: dict[str, float] | None = None, platform: str = "siracusa",
            shape: ModelShape | None = None) -> float:
    """The model's cycles (in row.unit) for ``row`` with ``values`` (platform keys) overriding the
    platform file."""
    p = load_platform(platform, {**(values or {}), **row.overrides})
    if row.mode == "kernel":
        return _kernel_cycles(row, p) / 1e6
    return _predict(row, p, shape or microllama())


def _predict(row: Row, p: Platform, shape: ModelShape) -> float:
    e = estimate(shape, p, context_len=row.context_len, prefill_len=row.prefill_len)
    pas = e.prefill if row.mode == "prefill" else e.decode
    assert pas is not None
    return pas.cycles / 1e6


def _roofline(row: Row, p: Platform, shape: ModelShape) -> float | None:
    """max(MACs / (cores x 8-bit SIMD peak), weight bytes / L2 bandwidth), cycles; model rows only."""
    if row.mode == "kernel":
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


def _group_of(name: str) -> FitGroup | None:
    return next((g for g in FITS if name in g.rows), None)


def validation_table(platform: str = "siracusa", fitted: dict[str, float] | None = None,
                     shape: ModelShape | None = None, loo: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """One dict per measured row: ``name``, ``role`` (fit | held_out), ``measured``, ``model``,
    ``error`` (relative, signed), ``source``, ``regime`` (tiled | untiled), ``fit_group``; fit
    rows also ``loo_model``/``loo_error`` when ``loo`` (from :func:`leave_one_out`) has them."""
    shape = shape or microllama()
    out = []
    for row in ROWS:
        pred = predict(row, fitted, platform, shape)
        roof = _roofline(row, load_platform(platform, {**(fitted or {}), **row.overrides}), shape)
        group = _group_of(row.name)
        d: dict[str, Any] = {
            "name": row.name, "role": "fit" if group else "held_out", "setup": row.setup,
            "unit": row.unit, "measured": row.measured, "model": pred,
            "error": (pred - row.measured) / row.measured, "source": row.source, "derived": row.derived,
            "regime": row.regime, "fit_group": group.name if group else None,
            "roofline": roof, "roofline_error": None if roof is None else (roof - row.measured) / row.measured,
        }
        if loo is not None and loo.get(row.name) is not None:
            d["loo_model"] = loo[row.name]
            d["loo_error"] = (loo[row.name] - row.measured) / row.measured
            d["loo_underdetermined"] = group is not None and len(group.rows) - 1 < len(group.keys)
        out.append(d)
    return out


def leave_one_out(platform: str = "siracusa", iters: int = 100) -> dict[str, float | None]:
    """For each fit row: refit its group's values on the group's other fit rows (started from
    the low end of each range, every other value as in the platform file) and predict it.
    None when the group has no other row."""
    base = load_platform(platform)
    low = {k: lo for k, _, lo, _ in base.ranges}
    out: dict[str, float | None] = {}
    for g in FITS:
        for name in g.rows:
            others = tuple(r for r in g.rows if r != name)
            if not others:
                out[name] = None
                continue
            start = {k: low.get(k, _get(base, k) / 2) for k in g.keys}
            vals = fit(platform, keys=g.keys, rows=others, iters=iters, start=start)
            out[name] = predict(_row(name), vals, platform)
    return out


def held_out_error_pct(table: list[dict[str, Any]]) -> float:
    """Mean absolute error (%) over the held-out rows."""
    errs = [abs(r["error"]) for r in table if r["role"] == "held_out"]
    return 100.0 * sum(errs) / len(errs)


def format_validation_table(table: list[dict[str, Any]]) -> str:
    lines = []
    for role, title in (("fit", "fit rows (each fit group's values were set on its rows)"),
                        ("held_out", "held-out rows (never used to set a value)")):
        head = (f"{'row':<20} {'measured':>9} {'model':>9} {'error':>8} {'LOO model':>9} {'LOO err':>8} "
                f"{'roof err':>9}  {'group':<8} setup")
        lines += [title, head, "-" * len(head)]
        for r in (x for x in table if x["role"] == role):
            if "loo_model" in r:
                flag = "*" if r.get("loo_underdetermined") else " "
                loo = f"{r['loo_model']:>9.4g} {100 * r['loo_error']:>+7.1f}%{flag}"
            else:
                loo = f"{'':>9} {'':>8} " if role == "held_out" else f"{'-':>9} {'-':>8} "
            rerr = "" if r["roofline_error"] is None else f"{100 * r['roofline_error']:+.0f}%"
            note = " [derived]" if r["derived"] else ""
            grp = r["fit_group"] or r["regime"]
            lines.append(f"{r['name']:<20} {r['measured']:>9.4g} {r['model']:>9.4g} {100 * r['error']:>+7.1f}% "
                         f"{loo}{rerr:>9}  {grp:<8} {r['setup']}{note}")
        lines.append("")
    fit_err = [abs(r["error"]) for r in table if r["role"] == "fit"]
    held = [abs(r["error"]) for r in table if r["role"] == "held_out"]
    lines.append(f"cycles in Mcycles. mean |error|: fit rows {100 * sum(fit_err) / len(fit_err):.1f}%, "
                 f"held-out rows {held_out_error_pct(table):.1f}% (max {100 * max(held):.1f}%, {len(held)} rows)")
    for regime in ("tiled", "untiled"):
        h = [abs(r["error"]) for r in table if r["role"] == "held_out" and r["regime"] == regime]
        if h:
            lines.append(f"  held-out {regime} rows: mean {100 * sum(h) / len(h):.1f}%, "
                         f"max {100 * max(h):.1f}% ({len(h)} rows)")
    loo = [abs(r["loo_error"]) for r in table if "loo_error" in r]
    if loo:
        lines.append(f"leave-one-out mean |error| on the fit rows: {100 * sum(loo) / len(loo):.1f}% "
                     "(* = underdetermined: the group has as many values as rows; - = no other row in the group)")
    return "\n".join(lines)


def fit(platform: str = "siracusa", keys: tuple[str, ...] | None = None, rows: tuple[str, ...] | None = None,
        iters: int = 400, start: dict[str, float] | None = None) -> dict[str, float]:
    """Pattern search in log space minimising the squared log error of ``rows`` over ``keys``,
    every other value as in the platform file. Without ``keys``/``rows``,
    fits every group of FITS in order on its own rows and returns all their values."""
    if keys is None or rows is None:
        vals: dict[str, float] = {}
        for g in FITS:
            vals.update(fit(platform, g.keys, g.rows, iters, {**vals, **(start or {})}))
        return vals
    base = load_platform(platform)
    fixed = {k: v for k, v in (start or {}).items() if k not in keys}
    x0 = {k: (start or {}).get(k, _get(base, k)) for k in keys}
    sel = [_row(r) for r in rows]

    def loss(vals: dict[str, float]) -> float:
        return sum(math.log(predict(r, {**fixed, **vals}, platform) / r.measured) ** 2 for r in sel)

    return _pattern_search(loss, x0, iters)


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


def _row(name: str) -> Row:
    return next(r for r in ROWS if r.name == name)


def _get(p: Platform, dotted: str) -> float:
    obj: Any = p
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return float(obj)


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser(description="hardware model vs measured rows (anchors.md section 2)")
    ap.add_argument("--fit", action="store_true", help="refit the fitted values (FITS) and print them")
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
