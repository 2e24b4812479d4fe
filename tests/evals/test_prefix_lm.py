"""evals/prefix_lm.py: the shared prompt is run once, and greedy answers are lm-eval's own."""

from __future__ import annotations

import pytest

SHOTS = "".join(f"Question: What is {a} plus {b}?\nAnswer: {a + b}\n\n" for a, b in [(2, 3), (10, 4), (7, 7), (1, 8)])
QUESTIONS = ["Question: What is 5 plus 6?\nAnswer:", "Question: Who wrote Hamlet?\nAnswer:", "Question: Where is Paris?\nAnswer:"]


def test_common_prefix_leaves_every_row_a_token():
    from slmsearch.evals.prefix_lm import common_prefix

    assert common_prefix([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 9]]) == [1, 2]
    assert common_prefix([[1, 2, 3], [1, 2, 3]]) == [1, 2]  # a whole row is never the prefix
    assert common_prefix([[7, 1], [8, 1]]) == []
    assert common_prefix([]) == []


def generate(lm, contexts: list[str]) -> list[str]:
    from lm_eval.api.instance import Instance

    kwargs = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    requests = [Instance(request_type="generate_until", doc={}, arguments=(c, dict(kwargs)), idx=i) for i, c in enumerate(contexts)]
    return lm.generate_until(requests, disable_tqdm=True)


@pytest.fixture(scope="module")
def tiny_lms(tiny_checkpoint):
    """(PrefixCachedHFLM, lm-eval's HFLM) on the same tiny random LLaMA."""
    from lm_eval.models.huggingface import HFLM

    from slmsearch import checkpoint
    from slmsearch.evals.prefix_lm import PrefixCachedHFLM

    model, tokenizer = checkpoint.load(tiny_checkpoint)
    kwargs = dict(pretrained=model, tokenizer=tokenizer, batch_size=2, device="cpu")
    return PrefixCachedHFLM(**kwargs), HFLM(**kwargs)


def test_shared_shots_run_once_and_answers_equal_lm_evals_own(tiny_lms):
    cached, plain = tiny_lms
    contexts = [SHOTS + q for q in QUESTIONS]
    assert generate(cached, contexts) == generate(plain, contexts)
    stats = cached.prefix_stats
    assert stats["requests"] == len(QUESTIONS) and stats["prefix_tokens"] >= 32
    assert stats["suffix_tokens"] < stats["prefix_tokens"]  # each question fed alone, not with the shots


def test_prompts_without_a_long_shared_start_take_lm_evals_path(tiny_lms):
    cached, plain = tiny_lms
    before = dict(cached.prefix_stats)
    assert generate(cached, QUESTIONS) == generate(plain, QUESTIONS)
    assert cached.prefix_stats["requests"] == before["requests"]  # no request went through the cache


def test_shared_prompt_cache_gives_lm_evals_own_answers(default_model, data_dir):
    """On the real model and the real task: the prefix-cached generation answers exactly as
    lm-eval's HFLM on the same prompts, feeding the shared shots through the model once."""
    from slmsearch.evals.lmeval import run_lm_eval

    model, tok = default_model
    runs = {
        cached: run_lm_eval(model, tok, ["triviaqa"], data_dir=data_dir, num_fewshot=3, limit=8, batch_size=4,
                            log_samples=True, prefix_cache=cached)
        for cached in (True, False)
    }
    answers = {c: [s["filtered_resps"] for s in next(iter(r["samples"].values()))] for c, r in runs.items()}
    assert len(answers[True]) == 8
    assert answers[True] == answers[False]
    stats = runs[True]["prefix_cache"]
    assert stats["requests"] == 8 and stats["prefix_tokens"] >= 32
    assert stats["suffix_tokens"] < stats["prefix_tokens"] * 8 / 2  # most prompt tokens were shared
    assert runs[False]["prefix_cache"] == {}
