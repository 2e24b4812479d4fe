"""Evaluation throughput on the default model, side by side in one process.

(1) WikiText token perplexity: ``slmsearch.evals.wikitext.token_perplexity`` against a bare
    ``model(input_ids)`` loop over the same windows at the same batch size (tokens/s).
    Goal: within 10% of the bare loop.
(2) TriviaQA generation through lm-eval (``slmsearch.evals.triviaqa.exact_match``: greedy, KV
    cache, stop at newline/period/comma) at the study's batch size against batch size 1:
    questions/s and generated tokens/s; the forward calls are counted to check that decoding
    uses the KV cache (one new token per call after the prompt).

Each measurement is repeated (``--repeats``), alternating the two sides, after one warm-up call;
the median is shown.

Run (real model; ~5 min on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/eval_throughput.py [--json out.json]
"""

from __future__ import annotations

import argparse
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
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    quiet_env()
    import torch
    from transformers.generation.utils import GenerationMixin
    from transformers.models.llama import modeling_llama as ml

    from slmsearch.data import resolve_data_dir
    from slmsearch.evals.triviaqa import exact_match
    from slmsearch.evals.wikitext import test_windows, token_perplexity
    from slmsearch.models import load_model
    from slmsearch.search.config import load_study_config

    config = load_study_config(None)
    settings = config.eval_settings()
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

    # (2) TriviaQA generation: batch vs 1 --------------------------------------------------------
    if not args.skip_generation:
        counts = {"generated": 0, "calls": 0, "one_token_calls": 0, "forward_tokens": 0}
        orig_generate = GenerationMixin.generate
        orig_forward = ml.LlamaForCausalLM.forward

        def generate(self: Any, *a: Any, **k: Any) -> Any:
            ids = k.get("input_ids", a[0] if a else None)
            out = orig_generate(self, *a, **k)
            seqs = out if torch.is_tensor(out) else out.sequences
            if ids is not None:
                counts["generated"] += (seqs.shape[1] - ids.shape[1]) * seqs.shape[0]
            return out

        def forward(self: Any, *a: Any, **k: Any) -> Any:
            ids = k.get("input_ids", a[0] if a else None)
            if ids is not None:
                counts["calls"] += 1
                counts["forward_tokens"] += ids.numel()
                counts["one_token_calls"] += int(ids.shape[1] == 1)
            return orig_forward(self, *a, **k)

        GenerationMixin.generate = generate  # type: ignore[method-assign]
        ml.LlamaForCausalLM.forward = forward  # type: ignore[method-assign]
        try:
            def em(bs: int) -> tuple[float, dict[str, int]]:
                for key in counts:
                    counts[key] = 0
                t = time.perf_counter()
                exact_match(model, tokenizer, data_dir, limit=args.questions, shots=shots, batch_size=bs)
                return time.perf_counter() - t, dict(counts)

            em(batch)  # warm-up: lm-eval imports, task files, datasets
            runs: dict[int, list[tuple[float, dict[str, int]]]] = {batch: [], 1: []}
            for _ in range(max(1, args.repeats - 1)):
                runs[batch].append(em(batch))
                runs[1].append(em(1))
        finally:
            GenerationMixin.generate = orig_generate  # type: ignore[method-assign]
            ml.LlamaForCausalLM.forward = orig_forward  # type: ignore[method-assign]
        print(f"\n(2) TriviaQA exact match through lm-eval, {args.questions} questions, {shots}-shot, "
              f"median of {len(runs[1])}")
        print("| batch | seconds | questions/s | generated tokens/s | forward calls | of which 1 new token (KV cache) |")
        print("|---:|---:|---:|---:|---:|---:|")
        res["triviaqa"] = {}
        for bs, items in runs.items():
            secs = statistics.median(s for s, _ in items)
            c = items[0][1]
            res["triviaqa"][bs] = {"seconds": [s for s, _ in items], "counts": c}
            print(f"| {bs} | {secs:.1f} | {args.questions / secs:.2f} | {c['generated'] / secs:.1f} | {c['calls']} | "
                  f"{c['one_token_calls']} |")
        sb = statistics.median(s for s, _ in runs[batch])
        s1 = statistics.median(s for s, _ in runs[1])
        res["triviaqa"]["speedup"] = s1 / sb
        print(f"batch {batch} vs batch 1: {s1 / sb:.2f}x the questions/s")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=str))
    return res


if __name__ == "__main__":
    main()
