"""evals/command.py (`slmsearch eval`): task and metric names, and the count options' words."""

from __future__ import annotations

import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.evals.command import _count, format_table, parse_metrics


def test_tasks_choose_their_metrics_and_metrics_narrow_them():
    assert parse_metrics("wikitext, triviaqa", None) == (
        "wikitext_word_ppl", "wikitext_token_ppl", "triviaqa_exact_match", "triviaqa_answer_logprob")
    assert parse_metrics("wikitext", "wikitext_token_ppl") == ("wikitext_token_ppl",)
    # a metric of another task is taken as asked rather than silently dropped
    assert parse_metrics("wikitext", "triviaqa_exact_match") == ("triviaqa_exact_match",)


@pytest.mark.parametrize("tasks, metrics, message", [
    ("hellaswag", None, "unknown task 'hellaswag'"),
    ("wikitext", "wikitext_ppl", "unknown metric 'wikitext_ppl'"),
    (" , ", None, "no metric chosen"),
])
def test_unknown_names_are_one_error_naming_them(tasks, metrics, message):
    with pytest.raises(SlmsearchError, match=message):
        parse_metrics(tasks, metrics)


def test_count_options_take_a_positive_integer_or_their_word_for_everything():
    assert _count("8", "--windows") == 8
    assert _count("all", "--windows") is None
    assert _count("model", "--max-length", "model") is None
    for bad, message in (("0", ">= 1"), ("many", "integer or 'all'")):
        with pytest.raises(SlmsearchError, match=message):
            _count(bad, "--windows")


def test_table_lists_metrics_not_counts_or_seconds():
    table = format_table({"wikitext_token_ppl": 12.34567, "counts": {"wikitext_token_windows": 2}, "seconds": {"x": 1.0}})
    assert "wikitext_token_ppl  12.3457" in table and "samples: wikitext_token_windows=2" in table
    assert "seconds" not in table
