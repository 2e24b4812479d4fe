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


def _kw(**given):
    names = ("tasks", "metrics", "seqlen", "windows", "pages", "max_length", "limit", "shots", "batch_size")
    return {n: given.get(n) for n in names}


def test_defaults_without_an_export_are_the_documented_ones():
    from slmsearch.evals.command import eval_settings

    s = eval_settings(None, **_kw())
    assert (s.token_seqlen, s.token_windows, s.word_pages, s.word_max_length, s.triviaqa_limit, s.triviaqa_shots,
            s.batch_size) == (512, 8, 4, 2048, 100, 5, 8)
    assert s.metrics == parse_metrics("wikitext,triviaqa", None)
    assert eval_settings(None, **_kw(windows="all", tasks="wikitext")).token_windows is None


def test_an_exports_settings_are_the_defaults_and_flags_override_them(tmp_path):
    import json

    from slmsearch.evals.command import eval_settings, export_settings
    from slmsearch.evals.settings import EvalSettings

    study = EvalSettings(metrics=("wikitext_token_ppl", "triviaqa_exact_match"), token_seqlen=256, token_windows=4,
                         word_pages=2, triviaqa_limit=50, logprob_limit=50, triviaqa_shots=1, batch_size=4)
    (tmp_path / "trial.json").write_text(json.dumps({"eval_settings": study.to_dict()}))
    stored = export_settings(str(tmp_path))
    assert stored == study and eval_settings(stored, **_kw()) == study
    narrowed = eval_settings(stored, **_kw(windows="2", limit="all"))
    assert narrowed.token_windows == 2 and narrowed.triviaqa_limit is None and narrowed.logprob_limit is None
    assert narrowed.token_seqlen == 256 and narrowed.metrics == study.metrics
    assert export_settings(str(tmp_path / "elsewhere")) is None
    (tmp_path / "trial.json").write_text("{broken")
    with pytest.raises(SlmsearchError, match="not a readable export record"):
        export_settings(str(tmp_path))
