"""evals/lmeval.py: the local tasks (derived data files in the cache, verified on every use, data
folder untouched; task configurations and hooks from the package, nothing executable from the
cache) and lm-eval run offline on an in-memory model, scoring the first scored questions after the
pool's shots."""

from __future__ import annotations

import json
import re

import pytest

from slmsearch.data import triviaqa_split


@pytest.fixture
def own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_local_task_dir_holds_the_chosen_rows_and_nothing_executable(data_dir, own_cache):
    from slmsearch.evals.lmeval import local_task_configs, local_task_dir

    before = {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()}
    folder = local_task_dir(data_dir, word_pages=2, triviaqa_limit=5)
    assert folder.parent == own_cache / "evals"
    scored, pool = triviaqa_split(data_dir)
    read = lambda name: [json.loads(line) for line in (folder / name).read_text().splitlines()]  # noqa: E731
    assert read("triviaqa_scored.jsonl") == scored[:5]
    assert read("triviaqa_fewshot.jsonl") == pool
    assert len(read("pages.jsonl")) == 2
    assert sorted(p.name for p in folder.iterdir()) == ["pages.jsonl", "triviaqa_fewshot.jsonl", "triviaqa_scored.jsonl"]
    configs = local_task_configs(data_dir, word_pages=2, triviaqa_limit=5)
    assert set(configs) == {"slmsearch_wikitext", "slmsearch_triviaqa"}
    assert configs["slmsearch_wikitext"]["dataset_kwargs"]["data_files"]["test"] == str(folder / "pages.jsonl")
    hooks = configs["slmsearch_wikitext"]["process_results"]
    assert hooks.__module__ == "lm_eval.tasks.wikitext.preprocess_wikitext"  # the installed package's own
    assert {p: p.stat().st_mtime_ns for p in data_dir.rglob("*") if p.is_file()} == before  # read-only


def test_local_task_dir_is_written_once_per_choice_of_rows(data_dir, own_cache):
    from slmsearch.evals.lmeval import local_task_dir

    folder = local_task_dir(data_dir, word_pages=1, triviaqa_limit=3)
    stamp = (folder / "pages.jsonl").stat().st_mtime_ns
    assert local_task_dir(data_dir, word_pages=1, triviaqa_limit=3) == folder
    assert (folder / "pages.jsonl").stat().st_mtime_ns == stamp
    others = {local_task_dir(data_dir, word_pages=2, triviaqa_limit=3), local_task_dir(data_dir, word_pages=1, triviaqa_limit=None)}
    assert folder not in others and len(others) == 2


@pytest.mark.parametrize("plant", ["change a row", "truncate", "remove a file", "add a hook file", "add a task file"])
def test_a_planted_change_in_the_cached_files_is_rebuilt_never_used(data_dir, own_cache, plant):
    from slmsearch.evals.lmeval import local_task_configs, local_task_dir

    folder = local_task_dir(data_dir, word_pages=2, triviaqa_limit=5)
    original = {p.name: p.read_bytes() for p in folder.iterdir()}
    scored = folder / "triviaqa_scored.jsonl"
    if plant == "change a row":
        scored.write_text(scored.read_text().replace('"answer": "', '"answer": "planted ', 1))
    elif plant == "truncate":
        scored.write_bytes(scored.read_bytes()[:10])
    elif plant == "remove a file":
        scored.unlink()
    elif plant == "add a hook file":
        (folder / "wikitext_hooks.py").write_text("raise SystemExit('planted code ran')\n")
    else:
        (folder / "planted.yaml").write_text("task: planted\nprocess_results: !function wikitext_hooks.process_results\n")
    configs = local_task_configs(data_dir, word_pages=2, triviaqa_limit=5)
    again = local_task_dir(data_dir, word_pages=2, triviaqa_limit=5)
    assert again == folder and {p.name: p.read_bytes() for p in folder.iterdir()} == original
    assert set(configs) == {"slmsearch_wikitext", "slmsearch_triviaqa"}


def test_run_lm_eval_scores_the_first_questions_after_the_pools_shots(tiny_checkpoint, data_dir, own_cache, capfd):
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
    progress = re.findall(r"\[lm-eval\] [^\r\n]*", capfd.readouterr().err)  # lm-eval's bar may share the line
    assert progress[0].startswith("[lm-eval] generation requests ") and "/3" in progress[0]  # our own line
    assert progress[-1].startswith("[lm-eval] generation requests 3/3")


def test_run_lm_eval_wikitext_scores_pages_with_lm_evals_own_hooks(tiny_checkpoint, data_dir, own_cache, capfd):
    from slmsearch import checkpoint
    from slmsearch.evals.lmeval import run_lm_eval

    model, tokenizer = checkpoint.load(tiny_checkpoint)
    out = run_lm_eval(model, tokenizer, ["wikitext"], data_dir=data_dir, word_pages=1, max_length=64, batch_size=2)
    metrics = out["results"]["slmsearch_wikitext"]
    assert metrics["word_perplexity,none"] > 1 and metrics["byte_perplexity,none"] > 1
    assert out["n-samples"]["slmsearch_wikitext"]["effective"] == 1
    err = capfd.readouterr().err
    assert "[lm-eval] loglikelihood windows " in err and "(1 pages)" in err  # the first batch's line at least
