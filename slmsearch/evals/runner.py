"""One call that scores a model on every metric the settings ask for, with timings."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from slmsearch import interrupt
from slmsearch.errors import SlmsearchError
from slmsearch.evals.settings import EvalSettings


def evaluate(
    model: Any,
    tokenizer: Any,
    data_dir: Path | None,
    settings: EvalSettings,
    *,
    log: Any = None,
) -> dict[str, Any]:
    """{metric: value, ..., "counts": {...}, "seconds": {...}} for ``settings.metrics``.

    ``log`` (a callable taking a string) is told when each metric starts.
    """
    values: dict[str, Any] = {}
    counts: dict[str, int] = {}
    seconds: dict[str, float] = {}

    def timed(name: str, func: Any) -> dict[str, Any]:
        interrupt.check()  # a Ctrl-C that a library swallowed stops here
        if log is not None:
            log(f"evaluating {name}")
        start = time.perf_counter()
        out = func()
        seconds[name] = round(time.perf_counter() - start, 3)
        return out

    wanted = set(settings.metrics)
    needs_local = wanted & {"wikitext_token_ppl", "triviaqa_answer_logprob"}
    if data_dir is None and needs_local:
        raise SlmsearchError(
            f"metrics {sorted(needs_local)} need the offline data files; pass --data-dir "
            "(or set SLMSEARCH_DATA_DIR), or choose only wikitext_word_ppl / triviaqa_exact_match"
        )
    if "wikitext_token_ppl" in wanted:
        from slmsearch.evals.wikitext import token_perplexity

        assert data_dir is not None
        ppl, windows = timed(
            "wikitext_token_ppl",
            lambda: token_perplexity(
                model, tokenizer, data_dir, seqlen=settings.token_seqlen,
                n_windows=settings.token_windows, batch_size=settings.batch_size, progress=log is not None,
            ),
        )
        values["wikitext_token_ppl"] = ppl
        counts["wikitext_token_windows"] = windows
    if "wikitext_word_ppl" in wanted:
        from slmsearch.evals.wikitext import word_perplexity

        out = timed(
            "wikitext_word_ppl",
            lambda: word_perplexity(
                model, tokenizer, data_dir, pages=settings.word_pages,
                max_length=settings.word_max_length, batch_size=settings.batch_size,
            ),
        )
        counts["wikitext_pages"] = out.pop("wikitext_pages")
        values.update(out)
    if "triviaqa_exact_match" in wanted:
        from slmsearch.evals.triviaqa import exact_match

        out = timed(
            "triviaqa_exact_match",
            lambda: exact_match(
                model, tokenizer, data_dir, limit=settings.triviaqa_limit, shots=settings.triviaqa_shots,
                batch_size=settings.generation_batch_size, seed=settings.seed,
            ),
        )
        counts["triviaqa_questions"] = out.pop("triviaqa_questions")
        values.update(out)
    if "triviaqa_answer_logprob" in wanted:
        from slmsearch.evals.triviaqa import answer_logprob

        assert data_dir is not None
        out = timed(
            "triviaqa_answer_logprob",
            lambda: answer_logprob(
                model, tokenizer, data_dir, limit=settings.logprob_limit,
                shots=settings.triviaqa_shots, batch_size=settings.batch_size,
            ),
        )
        counts["triviaqa_logprob_questions"] = out.pop("triviaqa_logprob_questions")
        values.update(out)
    interrupt.check()
    return {**values, "counts": counts, "seconds": seconds}
