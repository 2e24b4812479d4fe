"""Evaluation throughput on the default model, side by side in one process.

(1) WikiText token perplexity: ``slmsearch.evals.wikitext.token_perplexity`` against a bare
    ``model(input_ids)`` loop over the same windows at the same batch size (tokens/s).
    Goal: within 10% of the bare loop.
(2) TriviaQA generation through lm-eval, as the study runs it (``exact_match``: the shared 5-shot
    prefix through the model once, its KV cache reused, ``generation_batch_size`` questions at a
    time; ``slmsearch.evals.prefix_lm``) against lm-eval's own ``HFLM`` at the study's batch size
    (every prompt whole, left-padded), on the same prompts: seconds, tokens through the model,
    forward calls, and whether the answers are the same.
(3) A quantized trial model (``--plan``, default ``examples/plan-64mb.yaml``: GPTQ 3-bit + EoRA,
    compressed through the stage cache): gptqmodel's kernel model against the dense evaluation
    model (``checkpoint.load(dense=True)``: dequantized weights in the kernel's dtype, EoRA merged), token
    perplexity and TriviaQA: seconds and values.

Each measurement is repeated (``--repeats``), alternating the sides, after one warm-up call;
the median is shown.

Run (real model; ~10 min on 2 cores, the first time ~3 min more to compress --plan):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/eval_throughput.py [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import machine, quiet_env  # noqa: E402

GOAL = 1.10


def bare_loop(model: Any, windows: Any, batch_size: int) -> None:
    import torch

    with torch.inference_mode():
        for start in range(0, windows.shape[0], batch_size):
            model(windows[start : start + batch_size])


class ForwardCounter:
    """Counts ``LlamaForCausalLM.forward`` calls and the tokens they take, while entered."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.counts = {"calls": 0, "forward_tokens": 0}

    def __enter__(self) -> "ForwardCounter":
        from transformers.models.llama import modeling_llama as ml

        self._orig = ml.LlamaForCausalLM.forward
        orig, counts = self._orig, self.counts

        # wraps: generate() reads forward's signature (position_ids) through __wrapped__
        @functools.wraps(orig)
        def forward(module: Any, *a: Any, **k: Any) -> Any:
            ids = k.get("input_ids", a[0] if a else None)
            if ids is not None:
                counts["calls"] += 1
                counts["forward_tokens"] += ids.numel()
            return orig(module, *a, **k)

        ml.LlamaForCausalLM.forward = forward  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: Any) -> None:
        from transformers.models.llama import modeling_llama as ml

        ml.LlamaForCausalLM.forward = self._orig  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the default model)")
    ap.add_argument("--windows", type=int, default=8, help="WikiText windows of --seqlen tokens")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--batch-size", type=int, help="default: the default study's (8)")
    ap.add_argument("--questions", type=int, default=24, help="TriviaQA questions")
    ap.add_argument("--shots", type=int, help="default: the default study's (5)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--plan", default=str(Path(__file__).resolve().parents[1] / "examples" / "plan-64mb.yaml"),
                    help="plan of the quantized model for (3); '' to skip")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    quiet_env()
    import torch
    from slmsearch.data import resolve_data_dir
    from slmsearch.evals.lmeval import run_lm_eval
    from slmsearch.evals.wikitext import test_windows, token_perplexity
    from slmsearch.models import load_model
    from slmsearch.search.config import load_study_config

    config = load_study_config(None)
    settings = config.evaluation
    batch = args.batch_size or settings.batch_size
    shots = args.shots if args.shots is not None else settings.triviaqa_shots
    data_dir = resolve_data_dir(config.data_dir)
    model, tokenizer = load_model(args.model)
    res: dict[str, Any] = {"machine": machine(), "batch_size": batch}
    print(f"machine: {res['machine']}")

    # (1) WikiText token perplexity vs a bare forward loop --------------------------------------
    windows = test_windows(tokenizer, data_dir, args.seqlen, args.windows)
    tokens = windows.numel()

    def ours() -> float:
        t = time.perf_counter()
        token_perplexity(model, tokenizer, data_dir, seqlen=args.seqlen, n_windows=args.windows, batch_size=batch)
        return time.perf_counter() - t

    def bare() -> float:
        t = time.perf_counter()
        bare_loop(model, windows, batch)
        return time.perf_counter() - t

    ours(), bare()  # warm-up (tokenization of the test text, allocator)
    t_ours, t_bare = [], []
    for _ in range(args.repeats):
        t_ours.append(ours())
        t_bare.append(bare())
    mo, mb = statistics.median(t_ours), statistics.median(t_bare)
    res["wikitext"] = {"tokens": tokens, "ours_s": t_ours, "bare_s": t_bare, "ratio": mo / mb}
    print(f"\n(1) WikiText token ppl, {args.windows} windows x {args.seqlen} tokens, batch {batch}, "
          f"median of {args.repeats}")
    print("| loop | seconds | tokens/s |\n|---|---:|---:|")
    print(f"| token_perplexity | {mo:.2f} | {tokens / mo:,.0f} |")
    print(f"| bare model(input_ids) | {mb:.2f} | {tokens / mb:,.0f} |")
    print(f"token_perplexity / bare = {mo / mb:.3f}   (goal <= {GOAL})")

    counter = ForwardCounter()
    gen_batch = settings.generation_batch_size

    def tqa(cached: bool, bs: int, on: Any = None) -> tuple[float, dict[str, Any]]:
        """One TriviaQA run (``on`` a model other than the default): seconds, answers, counts."""
        counter.reset()
        t = time.perf_counter()
        with counter:
            r = run_lm_eval(on or model, tokenizer, ["triviaqa"], data_dir=data_dir, num_fewshot=shots,
                            limit=args.questions, batch_size=bs, log_samples=True, prefix_cache=cached)
        seconds = time.perf_counter() - t
        (name,) = r["results"]
        samples = sorted(r["samples"][name], key=lambda x: x["doc_id"])
        return seconds, {"answers": [x["filtered_resps"] for x in samples], "counts": dict(counter.counts),
                         "em": r["results"][name]["exact_match,remove_whitespace"], "prefix": r["prefix_cache"]}

    # (2) TriviaQA generation: the study's path vs lm-eval's HFLM --------------------------------
    if not args.skip_generation:
        sides = {f"study path (shared prefix, batch {gen_batch})": (True, gen_batch),
                 f"lm-eval HFLM (batch {batch})": (False, batch)}
        tqa(*next(iter(sides.values())))  # warm-up: lm-eval imports, task files, datasets
        runs: dict[str, list[tuple[float, dict[str, Any]]]] = {k: [] for k in sides}
        for _ in range(max(1, args.repeats - 1)):
            for label, (cached, bs) in sides.items():
                runs[label].append(tqa(cached, bs))
        print(f"\n(2) TriviaQA exact match through lm-eval, {args.questions} questions, {shots}-shot (the same "
              f"prompts on both sides), median of {len(next(iter(runs.values())))}")
        print("| path | seconds | questions/s | tokens through the model | forward calls | exact match |")
        print("|---|---:|---:|---:|---:|---:|")
        res["triviaqa"] = {}
        for label, items in runs.items():
            secs = statistics.median(x for x, _ in items)
            info = items[0][1]
            res["triviaqa"][label] = {"seconds": [x for x, _ in items], "counts": info["counts"], "em": info["em"],
                                      "prefix": info["prefix"]}
            print(f"| {label} | {secs:.1f} | {args.questions / secs:.2f} | {info['counts']['forward_tokens']:,} | "
                  f"{info['counts']['calls']} | {info['em']:.3f} |")
        study_runs, hflm_runs = runs.values()
        same = sum(a == b for a, b in zip(study_runs[0][1]["answers"], hflm_runs[0][1]["answers"]))
        speedup = statistics.median(x for x, _ in hflm_runs) / statistics.median(x for x, _ in study_runs)
        res["triviaqa"]["speedup"] = speedup
        res["triviaqa"]["same_answers"] = same
        print(f"study path vs HFLM: {speedup:.2f}x the questions/s; the same answer on {same} of {args.questions} "
              f"questions; shared prefix {study_runs[0][1]['prefix'].get('prefix_tokens')} tokens")

    # (3) a quantized trial model: gptqmodel's kernel vs the dense evaluation model -------------
    if args.plan:
        from slmsearch.compress.cache import StageCache
        from slmsearch import checkpoint
        from slmsearch.compress.pipeline import run
        from slmsearch.compress.plan import Plan
        from slmsearch.models import resolve_model

        plan = Plan.from_yaml(Path(args.plan).read_text())
        t = time.perf_counter()
        result = run(plan, resolve_model(args.model), data_dir, config.calibration, cache=StageCache())
        print(f"\n(3) quantized model {args.plan}: compressed (or found in the stage cache) in "
              f"{time.perf_counter() - t:.0f} s: {result.checkpoint_dir}")
        loaded = {}
        for label, dense in (("gptqmodel kernel (bf16)", False), ("dense evaluation model (bf16)", True)):
            t = time.perf_counter()
            loaded[label] = (checkpoint.load(result.checkpoint_dir, dense=dense)[0], time.perf_counter() - t)
        q_windows = 4

        def ppl_on(m: Any) -> tuple[float, float]:
            t = time.perf_counter()
            value, _ = token_perplexity(m, tokenizer, data_dir, seqlen=args.seqlen, n_windows=q_windows, batch_size=batch)
            return time.perf_counter() - t, value

        for m, _ in loaded.values():  # warm-up
            ppl_on(m)
        rows: dict[str, dict[str, Any]] = {}
        for label, (m, load_s) in loaded.items():
            ppl_runs = [ppl_on(m) for _ in range(args.repeats)]
            secs, info = tqa(True, gen_batch, on=m)
            rows[label] = {"load_s": load_s, "ppl_s": statistics.median(x for x, _ in ppl_runs), "ppl": ppl_runs[0][1],
                           "tqa_s": secs, "em": info["em"], "answers": info["answers"]}
        print(f"| model | load s | token ppl ({q_windows} x {args.seqlen}) s | token ppl | TriviaQA ({args.questions} q) s | exact match |")
        print("|---|---:|---:|---:|---:|---:|")
        for label, r in rows.items():
            print(f"| {label} | {r['load_s']:.1f} | {r['ppl_s']:.2f} | {r['ppl']:.2f} | {r['tqa_s']:.1f} | {r['em']:.3f} |")
        k, d = rows.values()
        same = sum(a == b for a, b in zip(k["answers"], d["answers"]))
        res["quantized"] = {label: {k2: v for k2, v in r.items() if k2 != "answers"} for label, r in rows.items()}
        res["quantized"]["same_answers"] = same
        print(f"dense / kernel: token ppl {d['ppl'] / k['ppl']:.4f} (value), {k['ppl_s'] / d['ppl_s']:.2f}x faster; "
              f"TriviaQA {k['tqa_s'] / d['tqa_s']:.2f}x faster, the same answer on {same} of {args.questions}")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
