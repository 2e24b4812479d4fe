"""evals/runner.py: ``evaluate`` scores exactly the metrics asked for, with the settings' sizes,
and returns them beside their sample counts and seconds."""

from __future__ import annotations

import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.evals.runner import evaluate
from slmsearch.evals.settings import EvalSettings

LOCAL = dict(metrics=("wikitext_token_ppl", "triviaqa_answer_logprob"), token_seqlen=32, token_windows=2,
             logprob_limit=3, triviaqa_shots=1, batch_size=2)


@pytest.fixture(scope="module")
def tiny(tiny_checkpoint):
    from slmsearch import checkpoint

    return checkpoint.load(tiny_checkpoint)


def test_scores_the_asked_metrics_as_the_metric_functions_do(tiny, data_dir):
    from slmsearch.evals.triviaqa import answer_logprob
    from slmsearch.evals.wikitext import token_perplexity

    model, tokenizer = tiny
    told: list[str] = []
    out = evaluate(model, tokenizer, data_dir, EvalSettings(**LOCAL), log=told.append)
    assert set(out) == {"wikitext_token_ppl", "triviaqa_answer_logprob", "counts", "seconds"}
    assert out["counts"] == {"wikitext_token_windows": 2, "triviaqa_logprob_questions": 3}
    assert set(out["seconds"]) == {"wikitext_token_ppl", "triviaqa_answer_logprob"}
    assert told == ["evaluating wikitext_token_ppl", "evaluating triviaqa_answer_logprob"]
    ppl, _ = token_perplexity(model, tokenizer, data_dir, seqlen=32, n_windows=2, batch_size=2)
    assert out["wikitext_token_ppl"] == pytest.approx(ppl, rel=1e-9)
    logprob = answer_logprob(model, tokenizer, data_dir, limit=3, shots=1, batch_size=2)["triviaqa_answer_logprob"]
    assert out["triviaqa_answer_logprob"] == pytest.approx(logprob, rel=1e-9)


def test_local_metrics_without_the_data_folder_are_one_error_naming_them(tiny):
    model, tokenizer = tiny
    with pytest.raises(SlmsearchError, match=r"\['triviaqa_answer_logprob', 'wikitext_token_ppl'\] need the offline data"):
        evaluate(model, tokenizer, None, EvalSettings(**LOCAL))


def test_a_lost_ctrl_c_stops_before_any_scoring(tiny, data_dir, monkeypatch):
    from slmsearch import interrupt
    from slmsearch.evals import wikitext

    def must_not_run(*args, **kwargs):
        raise AssertionError("scored after Ctrl-C")

    monkeypatch.setattr(wikitext, "token_perplexity", must_not_run)
    model, tokenizer = tiny
    interrupt._requested.set()
    try:
        with pytest.raises(KeyboardInterrupt):
            evaluate(model, tokenizer, data_dir, EvalSettings(**LOCAL))
    finally:
        interrupt._requested.clear()
