"""Evaluate a grid of the extended space once, for real and by proxy, into ``bench/grid_levers.csv``.

Grid (7 x 3 x 3 x 3 = 189 points): drop 0/2/4/6/8/10/12 layers x GPTQ 2/3/4-bit
(g64) x 0/6/12 layers quantized one width wider (the most sensitive ones, as the study's
``wider_fraction`` places them: 2 -> 3, 3 -> 4, 4 -> 8 bits) x KV cache 16/8/4 bits (g32);
embedding 4-bit g64 with scale search; no WANDA, LoRA or EoRA. Every point is priced on the
hardware model (Siracusa, context 512): a point over the budget is recorded as infeasible and not
compressed (a study never compresses it either).

Each feasible point gets two scores on the same 2 x 512-token WikiText-2 test windows (the
windows a study decides pruning on):
- ``wikitext_token_ppl``: the real pipeline (depth, embedding, GPTQ through gptqmodel; the KV
  cache rounded at load, as ``checkpoint.load`` does for a folder that records it). Points that
  differ only in the KV cache share one GPTQ run.
- ``proxy_token_ppl``: the search's screening proxy (``slmsearch.compress.proxy.score_plan``:
  GPTQ replaced by round-to-nearest at the same widths), with its seconds.

GPTQ runs without its scale search and with 8 calibration samples x 128 tokens, to keep the build
near an hour on 2 cores; the proxy uses the same settings, so the table measures the proxy
against the stage it stands for. The CSV is written row by row and a re-run skips the points it
holds. The uncompressed model is scored into ``<out>.baseline.json`` (pruning needs it).
``bench/search_efficiency.py`` replays searches on the table.

Run (real model; ~60 min on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/build_grid.py
Check the grid and its footprints without compressing anything: ``--dry-run``.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import math
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import fresh_cache, machine, quiet_env  # noqa: E402

HERE = Path(__file__).resolve().parent
AXES: dict[str, tuple[int, ...]] = {
    "drop_layers": (0, 2, 4, 6, 8, 10, 12),
    "gptq_bits": (2, 3, 4),
    "gptq_wider_layers": (0, 6, 12),
    "kv_cache_bits": (16, 8, 4),
}
FIXED: dict[str, Any] = {"wanda_pattern": "none", "lora_rank": 0, "group_size": 64, "act_order": False, "gptq_mse": 0.0,
                         "eora_rank": 0, "embedding_bits": 4, "embedding_group": 64, "embedding_mse": 2.4,
                         "kv_cache_group": 32, "kv_cache_key_group": 32, "kv_cache_rotate": False}
CALIB = {"n_samples": 8, "seqlen": 128, "seed": 0}
EVAL = {"token_seqlen": 512, "token_windows": 2, "batch_size": 8}
KEY = ("drop_layers", "gptq_bits", "gptq_wider_layers", "kv_cache_bits")  # what makes two points the same plan
COLUMNS = [
    "drop_layers", "gptq_bits", "gptq_wider_layers", "kv_cache_bits", "feasible", "footprint_mb",
    "decode_latency_s", "tokens_per_s", "energy_per_token_j", "wikitext_token_ppl", "proxy_token_ppl", "proxy_s",
    "compress_s", "eval_s", "cache_hits", "plan",
]


def grid_points() -> list[dict[str, Any]]:
    """Every point, in prefix order (depth -> GPTQ width -> widened layers -> KV cache)."""
    names = list(AXES)
    return [dict(zip(names, values)) for values in itertools.product(*(AXES[n] for n in names))]


def key(row: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(float(row[n])) for n in KEY)


def resolve(point: dict[str, Any], config: Any, base_shape: Any) -> tuple[dict[str, Any], Any]:
    """The point's full parameters and its plan (widening applies to GPTQ widths that have a wider one)."""
    from slmsearch.compress.gptq import WIDER
    from slmsearch.search.space import base_dims, plan_from_params

    params = {**FIXED, **point}
    if params["gptq_bits"] not in WIDER:
        params["gptq_wider_layers"] = 0
    return params, plan_from_params(params, config.space, base_dims(base_shape), len(base_shape.layers))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "grid_levers.csv"))
    ap.add_argument("--model", help="checkpoint folder (default: the default model)")
    ap.add_argument("--budget-mb", type=float, help="default: the default study's (64)")
    ap.add_argument("--cache-root")
    ap.add_argument("--fresh", action="store_true", help="start the CSV over instead of resuming it")
    ap.add_argument("--dry-run", action="store_true", help="print the grid with footprints; compress nothing")
    ap.add_argument("--limit", type=int, help="stop after this many evaluated points (tests)")
    ap.add_argument("--eval", help="JSON overriding the evaluation settings (tests)")
    args = ap.parse_args(argv)

    quiet_env()
    import dataclasses
    import json

    from slmsearch.hwmodel import estimate, load_platform
    from slmsearch.search.config import load_study_config
    from slmsearch.search.objective import hardware_attrs

    config = load_study_config(None)
    if args.budget_mb:
        config = dataclasses.replace(config, budget_mb=args.budget_mb)
    platform = load_platform(config.platform, config.platform_overrides or None)
    location = ""
    if args.dry_run:
        from slmsearch.hwmodel.shape import smollm2_135m

        base_shape = smollm2_135m() if not args.model else _shape(args.model)
    else:
        fresh_cache("grid", args.cache_root)
        from slmsearch.models import resolve_model

        location = resolve_model(args.model)
        base_shape = _shape(location)

    rows: list[dict[str, Any]] = []
    seen: set[tuple[int, ...]] = set()
    for point in grid_points():
        params, plan = resolve(point, config, base_shape)
        if key(params) in seen:  # 4-bit "widened": the same plan as 4-bit
            continue
        seen.add(key(params))
        hw = hardware_attrs(estimate(plan.shape(base_shape), platform, context_len=config.context_len))
        row: dict[str, Any] = {**point, "gptq_wider_layers": params["gptq_wider_layers"], "plan": plan.label(),
                               "feasible": int(hw["footprint_mb"] <= config.budget_mb)}
        row.update({k: hw[k] for k in ("footprint_mb", "decode_latency_s", "tokens_per_s", "energy_per_token_j")})
        rows.append(row)
    feasible = [r for r in rows if r["feasible"]]
    out = Path(args.out)
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    if out.is_file() and not args.fresh and not args.dry_run:
        with out.open() as handle:
            wanted = {key(r) for r in rows}
            done = {key(r): r for r in csv.DictReader(handle) if key(r) in wanted}  # rows of another grid dropped
        with out.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(done.values())
    print(f"machine: {machine()}; {len(rows)} distinct points, {len(feasible)} feasible at {config.budget_mb:g} MB; "
          f"{len(done)} already in {out}", flush=True)
    if args.dry_run:
        for r in rows:
            print(f"  {r['plan']:<32} {r['footprint_mb']:6.1f} MB  {r['decode_latency_s'] * 1e3:6.1f} ms/token"
                  f"  {'feasible' if r['feasible'] else 'over budget'}")
        return

    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.data import resolve_data_dir

    eval_cfg = {**EVAL, **(json.loads(args.eval) if args.eval else {})}
    data_dir = resolve_data_dir(config.data_dir)
    baseline_file = baseline_path(out)
    if not baseline_file.is_file():
        score_baseline(location, data_dir, eval_cfg, baseline_file)
    calib = CalibSettings(**CALIB)
    cache = StageCache(max_bytes=12 * 10**9)
    new_file = args.fresh or not out.is_file()
    handle = out.open("w" if new_file else "a", newline="")
    writer = csv.DictWriter(handle, fieldnames=COLUMNS)
    if new_file:
        writer.writeheader()
        done = {}
    evaluated = 0
    started = time.perf_counter()
    groups: dict[tuple[int, ...], list[dict[str, Any]]] = {}  # rows that differ only in the KV cache
    for row in rows:
        if key(row) not in done:
            groups.setdefault(key(row)[:3], []).append(row)
    try:
        for group in groups.values():
            todo = [r for r in group if r["feasible"]]
            if todo and args.limit is not None and evaluated >= args.limit:
                break
            if todo:
                evaluated += len(todo)
                evaluate_group(todo, config, base_shape, location, data_dir, calib, cache, eval_cfg, started)
            for row in group:
                writer.writerow({c: _fmt(row.get(c)) for c in COLUMNS})
            handle.flush()
    finally:
        handle.close()
    print(f"wrote {out} ({evaluated} points evaluated in this run, {time.perf_counter() - started:.0f} s)")


def evaluate_group(rows: list[dict[str, Any]], config: Any, base_shape: Any, location: str, data_dir: Path,
                   calib: Any, cache: Any, eval_cfg: dict[str, Any], started: float) -> None:
    """Score rows that share their weights (they differ in the KV cache only): one compression and
    one load for the real scores, one proxy model for the proxy scores; each row's KV cache is
    rounded in turn. ``proxy_s`` is what one proxy alone costs (the shared model + its own scoring)."""
    from slmsearch import checkpoint
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.compress.proxy import proxy_model, score_model

    plans = [resolve({k: r[k] for k in AXES}, config, base_shape)[1] for r in rows]
    weights = Plan(tuple(s for s in plans[0].stages if s.kind != "kv_cache"))  # the KV cache is rounded at load
    t0 = time.perf_counter()
    result = run(weights, location, data_dir, calib, cache=cache)
    compress_s = time.perf_counter() - t0
    kinds = [s.kind for s in weights.effective().stages]
    t1 = time.perf_counter()
    model, tokenizer = checkpoint.load(result.checkpoint_dir, dense=True)
    load_s = time.perf_counter() - t1
    scoring = {k: eval_cfg[k] for k in ("batch_size",)}
    real = []
    for plan in plans:
        t = time.perf_counter()
        ppl = score_model(model, tokenizer, data_dir, _kv(plan), seqlen=eval_cfg["token_seqlen"],
                          windows=eval_cfg["token_windows"], **scoring)
        real.append((ppl, load_s + time.perf_counter() - t))
    del model
    t2 = time.perf_counter()
    pmodel, ptok = proxy_model(plans[0], location, data_dir, calib, cache=cache)
    build_s = time.perf_counter() - t2
    for row, plan, (ppl, eval_s) in zip(rows, plans, real):
        t = time.perf_counter()
        proxy = score_model(pmodel, ptok, data_dir, _kv(plan), seqlen=eval_cfg["token_seqlen"],
                            windows=eval_cfg["token_windows"], **scoring)
        proxy_s = build_s + time.perf_counter() - t
        row.update({"wikitext_token_ppl": ppl, "proxy_token_ppl": proxy, "proxy_s": round(proxy_s, 2),
                    "compress_s": round(compress_s, 2), "eval_s": round(eval_s, 2),
                    "cache_hits": "+".join(kinds[: result.cache_hits])})
        print(f"[{time.perf_counter() - started:6.0f} s] {row['plan']:<30} {row['footprint_mb']:5.1f} MB "
              f"ppl {ppl:11.2f} proxy {proxy:11.2f} ({proxy_s:4.1f} s)  compress {compress_s:5.1f} s "
              f"eval {eval_s:4.1f} s  hits {row['cache_hits'] or '-'}", flush=True)


def _kv(plan: Any) -> Any:
    return next((s for s in plan.stages if s.kind == "kv_cache"), None)


def baseline_path(table: Path) -> Path:
    return Path(table).with_suffix(".baseline.json")


def score(folder: Path, data_dir: Path, eval_cfg: dict[str, Any]) -> float:
    """Token perplexity of a checkpoint folder on the grid's windows."""
    from slmsearch import checkpoint
    from slmsearch.compress.proxy import score_model

    model, tokenizer = checkpoint.load(folder, dense=True)
    return score_model(model, tokenizer, data_dir, None, seqlen=eval_cfg["token_seqlen"],
                       windows=eval_cfg["token_windows"], batch_size=eval_cfg["batch_size"])


def score_baseline(location: str, data_dir: Path, eval_cfg: dict[str, Any], path: Path) -> None:
    """The uncompressed model, scored exactly as the grid's points are."""
    from slmsearch.fsutil import write_json_atomic

    t0 = time.perf_counter()
    ppl = score(Path(location), data_dir, eval_cfg)
    record = {"wikitext_token_ppl": ppl, "eval": eval_cfg, "model": Path(location).name,
              "seconds": round(time.perf_counter() - t0, 2), "measured": time.strftime("%Y-%m-%d %H:%M %Z"),
              "machine": machine()}
    write_json_atomic(path, record)
    print(f"baseline (uncompressed): token ppl {ppl:.2f} -> {path}", flush=True)


def _fmt(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6g}" if math.isfinite(value) else str(value)
    return value


def _shape(location: str) -> Any:
    from slmsearch.search.hardware import base_shape

    return base_shape(location)


if __name__ == "__main__":
    main()
