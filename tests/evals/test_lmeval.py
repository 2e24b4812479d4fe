"""evals/lmeval.py: the local task folder (derived files in the cache, data folder untouched) and
lm-eval run offline on an in-memory model, scoring the first scored questions after the pool's shots."""

from __future__ import annotations

import json

import pytest

from slmsearch.data import triviaqa_split


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_task_dir_holds_the_chosen_rows_and_filled_task_files(data_dir, own_cache):
    from slmsearch.evals.lmeval import local_task_dir

    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    folder = local_task_dir(data_dir, word_pages=2, triviaqa_limit=5)
    assert folder.parent == own_cache / "evals"
    scored, pool = triviaqa_split(data_dir)
    read = lambda name: [json.loads(line) for line in (folder / name).read_text().splitlines()]  # noqa: E731
    assert read("triviaqa_scored.jsonl") == scored[:5]
    assert read("triviaqa_fewshot.jsonl") == pool
    assert len(read("pages.jsonl")) == 2
    for task in ("slmsearch_wikitext.yaml", "slmsearch_triviaqa.yaml"):
        text = (folder / task).read_text()
        assert "@" not in text.replace("@-@", "") and str(folder) in text  # every placeholder filled
    assert (folder / "wikitext_hooks.py").is_file()
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()} == before  # read-only


def test_local_task_dir_is_written_once_per_choice_of_rows(data_dir, own_cache):
    from slmsearch.evals.lmeval import local_task_dir

    folder = local_task_dir(data_dir, word_pages=1, triviaqa_limit=3)
    stamp = (folder / "DONE").stat().st_mtime_ns
    assert local_task_dir(data_dir, word_pages=1, triviaqa_limit=3) == folder
    assert (folder / "DONE").stat().st_mtime_ns == stamp
    others = {local_task_dir(data_dir, word_pages=2, triviaqa_limit=3), local_task_dir(data_dir, word_pages=1, triviaqa_limit=None)}
    assert folder not in others and len(others) == 2


def test_run_lm_eval_scores_the_first_questions_after_the_pools_shots(tiny_checkpoint, data_dir, own_cache):
    from slmsearch import checkpoint
    from slmsearch.evals.lmeval import run_lm_eval

    model, tokenizer = checkpoint.load(tiny_checkpoint)
    out = run_lm_eval(model, tokenizer, ["triviaqa"], data_dir=data_dir, num_fewshot=2, limit=3, batch_size=4,
                      log_samples=True)
    assert list(out["results"]) == ["slmsearch_triviaqa"]
    assert out["n-samples"]["slmsearch_triviaqa"]["effective"] == 3
    scored, pool = triviaqa_split(data_dir)
    samples = out["samples"]["slmsearch_triviaqa"]
    assert [s["doc"]["context"] for s in samples] == [r["context"] for r in scored[:3]]
    shots = f"{pool[0]['context']} {pool[0]['answer']}\n\n{pool[1]['context']} {pool[1]['answer']}\n\n"
    for sample, row in zip(samples, scored[:3]):
        assert sample["arguments"][0][0] == shots + row["context"]
    assert out["prefix_cache"]["requests"] == 3  # the shared shots went through the model once
