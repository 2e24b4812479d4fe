"""TriviaQA: lm-eval's generative exact match, and the gold answer's log-probability."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmsearch.data import triviaqa_split


def exact_match(
    model: Any,
    tokenizer: Any,
    data_dir: Path | None,
    *,
    limit: int | None,
    shots: int,
    batch_size: int = 8,
    seed: int = 1234,
) -> dict[str, float]:
    """``triviaqa_exact_match`` through lm-eval (greedy, any alias counts) on the first ``limit``
    scored questions, the pool's first ``shots`` examples (never scored) before each; the shared
    shots are run through the model once (see ``run_lm_eval``)."""
    from slmsearch.evals.lmeval import run_lm_eval

    out = run_lm_eval(
        model, tokenizer, ["triviaqa"], data_dir=data_dir, num_fewshot=shots, limit=limit,
        batch_size=batch_size, seed=seed,
    )
    (name,) = out["results"]
    return {
        "triviaqa_exact_match": float(out["results"][name]["exact_match,remove_whitespace"]),
        "triviaqa_questions": int(out["n-samples"][name]["effective"]),
    }


def fewshot_prefix(pool: list[dict[str, Any]], shots: int) -> str:
    """The first ``shots`` pool questions with their answers, lm-eval style (blank-line separated)."""
    return "".join(f"{row['context']} {row['answer']}\n\n" for row in pool[:shots])


def answer_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: list[str],
    answers: list[str],
    *,
    batch_size: int = 8,
) -> list[float]:
    """Sum of log p(answer tokens | prompt) for each pair, the answer preceded by one space.

    Prompt and answer are tokenized separately (as lm-eval does for loglikelihood requests), so the
    answer's tokens are exactly the ones scored whatever the tokenizer merges at the boundary.
    """
    import torch

    device = next(model.parameters()).device
    pairs = [
        (tokenizer(p, add_special_tokens=False).input_ids, tokenizer(" " + a, add_special_tokens=False).input_ids)
        for p, a in zip(prompts, answers, strict=True)
    ]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores: list[float] = []
    with torch.inference_mode():
        for start in range(0, len(pairs), batch_size):
            chunk = pairs[start : start + batch_size]
            seqs = [p + a for p, a in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), pad, dtype=torch.long)
            mask = torch.zeros((len(seqs), width), dtype=torch.long)
            for row, seq in enumerate(seqs):  # right padding: positions stay 0..len-1
                ids[row, : len(seq)] = torch.tensor(seq)
                mask[row, : len(seq)] = 1
            logp = torch.log_softmax(model(ids.to(device), attention_mask=mask.to(device)).logits.float(), -1).cpu()
            for row, (prompt, answer) in enumerate(chunk):
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(answer) - 1)
                scores.append(float(logp[row, positions, torch.tensor(answer)].sum()))
    return scores


def answer_logprob(
    model: Any,
    tokenizer: Any,
    data_dir: Path,
    *,
    limit: int | None,
    shots: int,
    batch_size: int = 8,
) -> dict[str, float]:
    """``triviaqa_answer_logprob``: the mean over questions of log p(gold answer | k-shot prompt)."""
    scored, pool = triviaqa_split(data_dir)
    rows = scored if limit is None else scored[:limit]
    prefix = fewshot_prefix(pool, shots)
    values = answer_logprobs(
        model, tokenizer, [prefix + r["context"] for r in rows], [r["answer"] for r in rows], batch_size=batch_size
    )
    return {"triviaqa_answer_logprob": sum(values) / len(values), "triviaqa_logprob_questions": len(values)}
