"""Time of the hardware model per search candidate: ``plan.shape(base)`` + ``estimate()``.

A trial of the search samples a plan, builds its shape from the base model's and asks
``hwmodel.estimate`` for the memory footprint, placement, decode latency and energy, once per
candidate. This script does the same for ``--n`` plans sampled from the default study's space by
the search's own ``suggest_plan`` (Optuna's RandomSampler, seeded), on the SmolLM2-135M (or
Llama-3.2-1B) base shape, the siracusa platform and the default study's context length, and
reports the median and 90th percentile milliseconds per plan, with the shape and the estimate
timed apart as well. No model is loaded.

Run: python bench/hwmodel_speed.py [--n 300] [--base smollm2_135m] [--json bench/results/hwmodel_speed.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform as pyplatform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results" / "hwmodel_speed.json"


def cpu_model() -> str:
    """``lscpu``'s model name (the processor's own name where lscpu is missing)."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return pyplatform.processor() or "unknown"
    for line in out.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "Model name":
            return value.strip()
    return pyplatform.processor() or "unknown"


def sample_plans(n: int, seed: int, base: Any) -> list[Any]:
    """``n`` plans drawn from the default study's space the way a trial draws one."""
    import optuna

    from slmsearch.search.config import SpaceConfig
    from slmsearch.search.space import suggest_plan

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed))
    space = SpaceConfig()
    return [suggest_plan(study.ask(), space, base) for _ in range(n)]


def percentile(values: list[float], q: float) -> float:
    """The ``q``-quantile (0..1) of ``values`` by the nearest-rank rule."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def run(n: int, seed: int = 0, base_name: str = "smollm2_135m", context_len: int | None = None) -> dict[str, Any]:
    from slmsearch.hwmodel import estimate, load_platform
    from slmsearch.hwmodel import shape as shapes
    from slmsearch.search.config import StudyConfig

    base = getattr(shapes, base_name)()
    defaults = StudyConfig()
    ctx = defaults.context_len if context_len is None else context_len
    platform = load_platform(defaults.platform)
    plans = sample_plans(n, seed, base)
    shape_ms: list[float] = []
    estimate_ms: list[float] = []
    footprints: set[int] = set()
    for plan in plans:
        t0 = time.perf_counter()
        shape = plan.shape(base)
        t1 = time.perf_counter()
        est = estimate(shape, platform, context_len=ctx)
        t2 = time.perf_counter()
        shape_ms.append((t1 - t0) * 1e3)
        estimate_ms.append((t2 - t1) * 1e3)
        footprints.add(est.memory.total_bytes)
    total_ms = [a + b for a, b in zip(shape_ms, estimate_ms)]

    def ms(x: float) -> float:
        return round(x, 3)

    return {
        "bench": "hwmodel_speed",
        "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "python": pyplatform.python_version(),
        "base": base_name,
        "platform": defaults.platform,
        "context_len": ctx,
        "plans": n,
        "distinct_footprints": len(footprints),
        "seed": seed,
        "ms_per_plan": {"median": ms(statistics.median(total_ms)), "p90": ms(percentile(total_ms, 0.9)),
                        "mean": ms(statistics.fmean(total_ms)), "max": ms(max(total_ms)), "first": ms(total_ms[0])},
        "plan_shape_ms": {"median": ms(statistics.median(shape_ms)), "p90": ms(percentile(shape_ms, 0.9))},
        "estimate_ms": {"median": ms(statistics.median(estimate_ms)), "p90": ms(percentile(estimate_ms, 0.9))},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=300, help="plans sampled, each estimated once")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="smollm2_135m", choices=("smollm2_135m", "llama32_1b"))
    ap.add_argument("--context-len", type=int, default=None, help="default: the default study's")
    ap.add_argument("--json", type=Path, default=RESULTS, help=f"where the figures go (default {RESULTS})")
    args = ap.parse_args(argv)
    if args.n < 1:
        ap.error("--n must be >= 1")
    res = run(args.n, args.seed, args.base, args.context_len)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(res, indent=2) + "\n")
    per = res["ms_per_plan"]
    print(f"{res['plans']} plans of the default space on {res['base']}, {res['platform']}, context {res['context_len']} "
          f"({res['cpu_model']}, load {res['load_average_1min']})")
    print(f"plan.shape + estimate: median {per['median']:.1f} ms, p90 {per['p90']:.1f} ms, max {per['max']:.1f} ms, "
          f"first {per['first']:.1f} ms "
          f"(shape {res['plan_shape_ms']['median']:.2f} ms, estimate {res['estimate_ms']['median']:.1f} ms median)")
    print(f"wrote {args.json}")
    return res


if __name__ == "__main__":
    main()
