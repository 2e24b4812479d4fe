"""Evaluate a reduced grid of the default space once, for real, into ``bench/grid_default.csv``.

Grid (36 points): drop 4/8/12 layers x GPTQ 2/3/4-bit (g64) x EoRA rank 0/8 x embedding 4/8-bit;
no WANDA, no LoRA. Every point is first priced on the hardware model (Siracusa, context 512) as a
trial is: over the 64 MB budget it is recorded as infeasible and not compressed (a real study
never compresses it either). Feasible points are compressed through the real pipeline with a
stage cache (points are visited depth -> embedding -> GPTQ -> EoRA, so prefixes are shared) and
scored cheaply: WikiText token perplexity on 2 windows x 512 tokens and the TriviaQA answer
log-probability on 50 questions (5-shot), with calibration of 8 samples x 128 tokens.

The CSV is written row by row and a re-run skips the points it holds (``--resume``, default), so
an interrupted build continues. The uncompressed model is scored the same way into
``<out>.baseline.json`` (the replay needs its token perplexity: a study prunes any trial whose
early perplexity is over ``max_baseline_ratio`` x the baseline's). ``bench/search_efficiency.py``
replays samplers on the table.

Run (real model; ~20-30 min on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/build_grid.py [--out bench/grid_default.csv]
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
    "drop_layers": (4, 8, 12),
    "embedding_bits": (4, 8),
    "gptq_bits": (2, 3, 4),
    "eora_rank": (0, 8),
}
FIXED = {"wanda_pattern": "none", "lora_rank": 0, "group_size": 64, "act_order": False}
CALIB = {"n_samples": 8, "seqlen": 128, "seed": 0}
EVAL = {"token_seqlen": 512, "token_windows": 2, "logprob_limit": 50, "triviaqa_shots": 5, "batch_size": 8}
COLUMNS = [
    *AXES, "group_size", "feasible", "footprint_mb", "decode_latency_s", "tokens_per_s", "energy_per_token_j",
    "wikitext_token_ppl", "triviaqa_answer_logprob", "compress_s", "eval_s", "seconds", "cache_hits", "plan",
]


def grid_points() -> list[dict[str, int]]:
    """Every point, in prefix order (depth -> embedding -> GPTQ -> EoRA)."""
    names = list(AXES)
    return [dict(zip(names, values)) for values in itertools.product(*(AXES[n] for n in names))]


def key(row: dict[str, Any]) -> tuple[int, ...]:
    return tuple(int(float(row[n])) for n in AXES)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(HERE / "grid_default.csv"))
    ap.add_argument("--model", help="checkpoint folder (default: the default model)")
    ap.add_argument("--budget-mb", type=float, help="default: the default study's (64)")
    ap.add_argument("--cache-root")
    ap.add_argument("--fresh", action="store_true", help="start the CSV over instead of resuming it")
    ap.add_argument("--dry-run", action="store_true", help="print the grid with footprints; compress nothing")
    ap.add_argument("--baseline-only", action="store_true", help="only (re)score the uncompressed model into <out>.baseline.json")
    ap.add_argument("--limit", type=int, help="stop after this many evaluated points (tests)")
    ap.add_argument("--eval", help="JSON overriding the evaluation settings (tests)")
    args = ap.parse_args(argv)

    quiet_env()
    import json

    from slmsearch.hwmodel import estimate, load_platform
    from slmsearch.search.config import load_study_config
    from slmsearch.search.objective import hardware_attrs
    from slmsearch.search.space import base_dims, plan_from_params

    config = load_study_config(None)
    budget = args.budget_mb or config.budget_mb
    platform = load_platform(config.platform, config.platform_overrides or None)
    if args.dry_run:
        from slmsearch.hwmodel.shape import smollm2_135m

        base_shape = smollm2_135m() if not args.model else _shape(args.model)
    else:
        fresh_cache("grid", args.cache_root)
        from slmsearch.models import resolve_model

        location = resolve_model(args.model)
        base_shape = _shape(location)
    dims = base_dims(base_shape)
    n_layers = len(base_shape.layers)

    out = Path(args.out)
    done: dict[tuple[int, ...], dict[str, Any]] = {}
    if out.is_file() and not args.fresh and not args.dry_run:
        with out.open() as handle:
            done = {key(r): r for r in csv.DictReader(handle)}
    points = grid_points()
    print(f"machine: {machine()}; {len(points)} points, budget {budget:g} MB; {len(done)} already in {out}", flush=True)

    rows: list[dict[str, Any]] = []
    for point in points:
        params = {**FIXED, **point}
        plan = plan_from_params(params, config.space, dims, n_layers)
        hw = hardware_attrs(estimate(plan.shape(base_shape), platform, context_len=config.context_len))
        row: dict[str, Any] = {**point, "group_size": FIXED["group_size"], "feasible": int(hw["footprint_mb"] <= budget),
                               "plan": plan.label()}
        row.update({k: hw[k] for k in ("footprint_mb", "decode_latency_s", "tokens_per_s", "energy_per_token_j")})
        rows.append(row)
    feasible = [r for r in rows if r["feasible"]]
    print(f"feasible: {len(feasible)} of {len(rows)}", flush=True)
    if args.dry_run:
        for r in rows:
            print(f"  {r['plan']:<28} {r['footprint_mb']:6.1f} MB  {r['decode_latency_s'] * 1e3:6.1f} ms/token"
                  f"  {'feasible' if r['feasible'] else 'over budget'}")
        return

    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.data import resolve_data_dir

    eval_cfg = {**EVAL, **(json.loads(args.eval) if args.eval else {})}
    data_dir = resolve_data_dir(config.data_dir)
    baseline_file = baseline_path(out)
    if args.baseline_only or not baseline_file.is_file():
        score_baseline(location, data_dir, eval_cfg, baseline_file)
        if args.baseline_only:
            return
    calib = CalibSettings(**CALIB)
    cache = StageCache(max_bytes=40 * 10**9)
    new_file = args.fresh or not out.is_file()
    handle = out.open("w" if new_file else "a", newline="")
    writer = csv.DictWriter(handle, fieldnames=COLUMNS)
    if new_file:
        writer.writeheader()
        done = {}
    evaluated = 0
    started = time.perf_counter()
    try:
        for row in rows:
            if key(row) in done:
                continue
            if row["feasible"]:
                if args.limit is not None and evaluated >= args.limit:
                    break
                params = {**FIXED, **{k: row[k] for k in AXES}}
                plan = plan_from_params(params, config.space, dims, n_layers)
                t0 = time.perf_counter()
                result = run(plan, location, data_dir, calib, cache=cache)
                t1 = time.perf_counter()
                ppl, logprob = score(result.checkpoint_dir, data_dir, eval_cfg)
                t2 = time.perf_counter()
                kinds = [s.kind for s in plan.effective().stages]
                row.update({
                    "wikitext_token_ppl": ppl, "triviaqa_answer_logprob": logprob,
                    "compress_s": round(t1 - t0, 2), "eval_s": round(t2 - t1, 2), "seconds": round(t2 - t0, 2),
                    "cache_hits": "+".join(kinds[: result.cache_hits]),
                })
                evaluated += 1
                print(f"[{time.perf_counter() - started:7.0f} s] {row['plan']:<24} {row['footprint_mb']:5.1f} MB "
                      f"ppl {ppl:9.2f} logprob {logprob:7.3f}  compress {t1 - t0:5.1f} s "
                      f"eval {t2 - t1:5.1f} s  hits {row['cache_hits'] or '-'}", flush=True)
            writer.writerow({c: _fmt(row.get(c)) for c in COLUMNS})
            handle.flush()
    finally:
        handle.close()
    print(f"wrote {out} ({evaluated} points evaluated in this run, {time.perf_counter() - started:.0f} s)")


def baseline_path(table: Path) -> Path:
    return Path(table).with_suffix(".baseline.json")


def score(folder: Path, data_dir: Path, eval_cfg: dict[str, Any]) -> tuple[float, float]:
    """(token perplexity, TriviaQA answer log-prob) of a checkpoint folder, as the grid scores it."""
    from slmsearch import checkpoint
    from slmsearch.evals.triviaqa import answer_logprob
    from slmsearch.evals.wikitext import token_perplexity

    model, tokenizer = checkpoint.load(folder)
    ppl, _ = token_perplexity(model, tokenizer, data_dir, seqlen=eval_cfg["token_seqlen"],
                              n_windows=eval_cfg["token_windows"], batch_size=eval_cfg["batch_size"])
    logprob = answer_logprob(model, tokenizer, data_dir, limit=eval_cfg["logprob_limit"],
                             shots=eval_cfg["triviaqa_shots"], batch_size=eval_cfg["batch_size"])
    return ppl, logprob["triviaqa_answer_logprob"]


def score_baseline(location: str, data_dir: Path, eval_cfg: dict[str, Any], path: Path) -> None:
    """The uncompressed model, scored exactly as the grid's points are."""
    from slmsearch.fsutil import write_json_atomic

    t0 = time.perf_counter()
    ppl, logprob = score(Path(location), data_dir, eval_cfg)
    record = {"wikitext_token_ppl": ppl, "triviaqa_answer_logprob": logprob,
              "eval": eval_cfg, "model": Path(location).name, "seconds": round(time.perf_counter() - t0, 2),
              "measured": time.strftime("%Y-%m-%d %H:%M %Z")}
    write_json_atomic(path, record)
    print(f"baseline (uncompressed): token ppl {ppl:.2f}, answer log-prob {logprob:.3f} -> {path}",
          flush=True)


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
