"""What an evaluation computes and on how much data: one frozen dataclass, a comment per field."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from slmsearch.errors import SlmsearchError

METRICS = (
    "wikitext_word_ppl",  # lm-eval `wikitext` (document level): word perplexity, + byte_ppl, bits_per_byte
    "wikitext_token_ppl",  # GPTQ/WANDA convention: exp(mean NLL) over fixed non-overlapping windows
    "triviaqa_exact_match",  # lm-eval `triviaqa`: greedy, exact match, any alias counts
    "triviaqa_answer_logprob",  # mean log p(gold answer | prompt): smooth where exact match is ~0
)


@dataclass(frozen=True)
class EvalSettings:
    metrics: tuple[str, ...] = METRICS
    token_seqlen: int = 512  # window length of wikitext_token_ppl
    token_windows: int | None = 8  # first N windows of the test text; None = all of it
    word_pages: int | None = 4  # first N of the 62 test pages for wikitext_word_ppl; None = all
    word_max_length: int | None = 2048  # lm-eval rolling window; None = the model's maximum
    triviaqa_limit: int | None = 100  # first N scored questions; None = all 1,900
    triviaqa_shots: int = 5  # few-shot examples, drawn from the never-scored pool
    logprob_limit: int | None = 200  # questions for triviaqa_answer_logprob; None = all
    batch_size: int = 8  # sequences per forward pass (perplexities, answer log-prob)
    generation_batch_size: int = 32  # TriviaQA questions generated together after the shared shots
    seed: int = 1234  # lm-eval's random seeds (TriviaQA's shots are fixed: the pool's first N)

    def __post_init__(self) -> None:
        unknown = [m for m in self.metrics if m not in METRICS]
        if unknown:
            raise SlmsearchError(f"unknown metric {unknown[0]!r}; known: {', '.join(METRICS)}")
        for name in ("token_seqlen", "batch_size", "generation_batch_size"):
            if getattr(self, name) < 1:
                raise SlmsearchError(f"eval setting {name} must be >= 1, got {getattr(self, name)}")
        if self.triviaqa_shots < 0:
            raise SlmsearchError(f"triviaqa_shots must be >= 0, got {self.triviaqa_shots}")
        for name in ("token_windows", "word_pages", "triviaqa_limit", "logprob_limit"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise SlmsearchError(f"eval setting {name} must be >= 1, or null for all, got {getattr(self, name)}")
        if self.word_max_length is not None and self.word_max_length < 2:
            raise SlmsearchError(f"eval setting word_max_length must be >= 2, or null for the model's maximum, got {self.word_max_length}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> EvalSettings:
        known = {f.name for f in fields(cls)}
        for key in raw:
            if key not in known:
                raise SlmsearchError(f"unknown eval setting {key!r}; known: {', '.join(sorted(known))}")
        data = dict(raw)
        if "metrics" in data:
            data["metrics"] = tuple(data["metrics"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["metrics"] = list(self.metrics)
        return out
