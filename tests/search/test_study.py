"""A real study end to end: tiny random LLaMA, real stages, real hardware model, real SQLite."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from slmsearch.search.config import load_study_config
from slmsearch.search.storage import open_storage
from slmsearch.search.study import optimize
from slmsearch.search.trials import OVER_BUDGET, counted, pareto_trials, status

TINY_STUDY = """
name: tiny
model: {model}
data_dir: {data}
budget_mb: {budget}
context_len: 128
space:
  drop_layers: [0, 1]
  wanda_patterns: [none, unstructured, "2:4"]
  unstructured_sparsity: [0.2, 0.5]
  lora_ranks: [0, 4]
  lora_steps: 2
  gptq_bits: [4, 16]
  group_sizes: [32]
  eora_ranks: [0, 8]
  embedding_bits: [16, 8]
calibration: {{n_samples: 4, seqlen: 64, seed: 0}}
evaluation:
  token_seqlen: 128
  token_windows: 2
  word_pages: 1
  word_max_length: 256
  triviaqa_limit: 4
  triviaqa_shots: 1
  logprob_limit: 4
  batch_size: 4
pruning: {{first_windows: 1, max_ppl_ratio: 50.0}}
sampler: {sampler}
population_size: 4
seed: {seed}
trials: {trials}
storage: {storage}
heartbeat_s: 1
grace_s: 3
cache_gb: 2
"""


def write_study(tmp_path: Path, tiny_checkpoint: Path, data_dir: Path, **kw: object) -> Path:
    values = dict(model=tiny_checkpoint, data=data_dir, budget=1000, sampler="random", seed=0, trials=5,
                  storage=f"sqlite:///{tmp_path / 'study.db'}")
    values.update(kw)
    path = tmp_path / "study.yaml"
    path.write_text(TINY_STUDY.format(**values))
    return path


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))


def test_five_trials_end_to_end(tmp_path, tiny_checkpoint, data_dir, cache_env):
    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir))
    summary = optimize(config, log=lambda m: None)
    study = optuna.load_study(study_name="tiny", storage=config.storage)
    evaluated = [t for t in study.trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    assert len(evaluated) >= 5 and summary["completed"] + summary["pruned"] >= 5
    first = study.trials[0]
    assert first.user_attrs.get("baseline") and first.user_attrs["plan"]["stages"] == []
    for trial in study.trials:
        if trial.state == TrialState.COMPLETE:
            for key in ("plan", "footprint_mb", "memory_bytes", "decode_latency_s", "energy_per_token_j",
                        "stage_seconds", "cache_hits", "wikitext_word_ppl", "triviaqa_exact_match"):
                assert key in trial.user_attrs, key
    front = pareto_trials(study)
    assert front
    signs = [1 if d.name == "MINIMIZE" else -1 for d in study.directions]
    for a in front:
        for b in front:
            if a is not b:
                better_everywhere = all(s * x <= s * y for s, x, y in zip(signs, b.values, a.values))
                assert not (better_everywhere and b.values != a.values), (a.number, b.number)


def midpoint_budget(tiny_checkpoint: Path) -> float:
    """A budget the uncompressed model exceeds and an 8-bit-embedding, 4-bit plan meets."""
    import json

    from slmsearch.compress.plan import Plan
    from slmsearch.hwmodel import ModelShape, estimate, load_platform

    shape = ModelShape.from_hf_config(json.loads((tiny_checkpoint / "config.json").read_text()))
    base_mb = estimate(shape, load_platform("siracusa"), context_len=128).memory.total_bytes / 1e6
    emb8 = Plan.from_dict({"stages": [{"stage": "embedding", "bits": 8}, {"stage": "gptq", "bits": 4, "group_size": 32}]})
    small_mb = estimate(emb8.shape(shape), load_platform("siracusa"), context_len=128).memory.total_bytes / 1e6
    return round((base_mb + small_mb) / 2, 4)


def test_over_budget_baseline_is_still_the_reference(tmp_path, tiny_checkpoint, data_dir, cache_env):
    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir, budget=midpoint_budget(tiny_checkpoint), trials=1))
    optimize(config, log=lambda m: None, stop_after=1)  # the enqueued baseline only
    study = optuna.load_study(study_name="tiny", storage=config.storage)
    trial, *anchors = study.trials
    assert all(t.state == TrialState.WAITING and t.user_attrs["anchor"] for t in anchors)
    assert trial.user_attrs["baseline"] and "over_budget" in trial.user_attrs and "rejected" not in trial.user_attrs
    assert trial.user_attrs["wikitext_token_ppl"] > 1  # evaluated: every later trial is judged against it
    assert study.user_attrs["baseline_early_token_ppl"] == trial.user_attrs["early_token_ppl"]
    assert trial.constraints["footprint_over_budget_mb"] > 0 and pareto_trials(study) == []
    # measured, but kept off the dashboard's best trials (the Pareto front of COMPLETE trials): PRUNED, no values
    assert trial.state == TrialState.PRUNED and trial.values is None and status(trial) == OVER_BUDGET and counted(trial)
    assert study.metric_names == ["wikitext_word_ppl", "triviaqa_exact_match", "decode_latency_s"]


def test_same_prefix_hits_cache_with_identical_metrics(tmp_path, tiny_checkpoint, data_dir, cache_env):
    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir, trials=1))
    storage = open_storage(config.storage)
    params = {"drop_fraction": 1.0, "wanda_pattern": "unstructured", "sparsity": 0.5, "lora_rank": 4,
              "embedding_bits": 16, "layer_grid": "gptq", "gptq_bits": 16, "kv_cache_bits": 16}  # drop 1 (the space's most)
    study = optuna.create_study(study_name="tiny", storage=storage, directions=config.directions)
    study.enqueue_trial(params)
    study.enqueue_trial({**params, "embedding_bits": 8, "embedding_grid": "sym"})  # shares depth + WANDA + LoRA
    optimize(dataclasses.replace(config, trials=3), log=lambda m: None, stop_after=2)
    a, b = optuna.load_study(study_name="tiny", storage=config.storage).trials[:2]
    assert a.user_attrs["cache_hits"] == [] and b.user_attrs["cache_hits"] == ["depth", "wanda", "lora"]
    assert list(b.user_attrs["stage_seconds"]) == ["embedding"]
    # The same plan in another study on the same stage cache (within one study it would be a repeat,
    # answered from storage): every stage from the cache, identical metrics.
    other = optuna.create_study(study_name="tiny-again", storage=storage, directions=config.directions)
    other.enqueue_trial(params)
    optimize(dataclasses.replace(config, name="tiny-again", trials=3), log=lambda m: None, stop_after=1)
    (c,) = [t for t in optuna.load_study(study_name="tiny-again", storage=config.storage).trials if t.params == params]
    assert c.user_attrs["cache_hits"] == ["depth", "wanda", "lora"] and c.user_attrs["stage_seconds"] == {}
    assert "repeat_of" not in c.user_attrs and c.values == a.values
    assert c.user_attrs["wikitext_token_ppl"] == a.user_attrs["wikitext_token_ppl"]


def test_killed_study_resumes_without_losing_trials(tmp_path, tiny_checkpoint, data_dir):
    study_file = write_study(tmp_path, tiny_checkpoint, data_dir, trials=4)
    env = {**os.environ, "SLMSEARCH_CACHE": str(tmp_path / "cache"), "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "slmsearch", "optimize", "--study", str(study_file)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    deadline = time.time() + 300
    # Kill it while a trial runs, after at least one trial finished.
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            trials = optuna.load_study(study_name="tiny", storage=storage).trials
        except Exception:
            continue
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        if done and trials[-1].state == TrialState.RUNNING:
            break
    assert proc.poll() is None, proc.stdout.read()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = optuna.load_study(study_name="tiny", storage=storage).trials
    finished = {t.number for t in before if t.state == TrialState.COMPLETE}
    interrupted = [t.number for t in before if t.state == TrialState.RUNNING]
    assert interrupted
    time.sleep(4)  # past the grace period
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    after = optuna.load_study(study_name="tiny", storage=storage).trials
    by_number = {t.number: t for t in after}
    assert finished <= {t.number for t in after if t.state == TrialState.COMPLETE}
    assert all(by_number[n].state == TrialState.FAIL for n in interrupted)
    evaluated = [t for t in after if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "rejected" not in t.user_attrs]
    assert len(evaluated) >= 4


def test_repeated_plan_is_answered_from_its_first_trial(tmp_path, tiny_checkpoint, data_dir, cache_env):
    """A plan sampled again is not compressed or evaluated again (both are deterministic): the trial
    copies its twin's values and metrics, is marked ``repeat_of``, and does not count."""
    from slmsearch.search.config import with_overrides

    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir, trials=2))
    optimize(config, log=lambda m: None)
    study = optuna.load_study(study_name="tiny", storage=config.storage)
    first = study.trials[1]
    assert first.state == TrialState.COMPLETE and "repeat_of" not in first.user_attrs
    study.enqueue_trial(first.params)
    summary = optimize(with_overrides(config, trials=3), log=lambda m: None)
    trials = optuna.load_study(study_name="tiny", storage=config.storage).trials
    again = trials[2]
    assert again.params == first.params and again.user_attrs["repeat_of"] == 1
    assert again.values == first.values
    for key in ("wikitext_word_ppl", "triviaqa_exact_match", "footprint_mb", "decode_latency_s"):
        assert again.user_attrs[key] == first.user_attrs[key], key
    assert "stage_seconds" not in again.user_attrs and "slot" not in again.user_attrs  # no work, no slot
    repeats = [t for t in trials if "repeat_of" in t.user_attrs]
    assert summary["repeats"] == len(repeats) >= 1 and summary["completed"] + summary["pruned"] == 3
    assert len([t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]) == 3 + len(repeats)
    assert all(trials[t.user_attrs["repeat_of"]].user_attrs["plan"] == t.user_attrs["plan"] for t in repeats)
    assert 2 not in [t.number for t in pareto_trials(optuna.load_study(study_name="tiny", storage=config.storage))]



@pytest.mark.parametrize("reader", ["pareto", "report", "export", "dashboard"])
def test_the_readers_do_not_import_the_runner(reader):
    """They read a study through storage.py and trials.py, at module level or inside a function."""
    import ast

    import slmsearch.search

    source = (Path(slmsearch.search.__file__).parent / f"{reader}.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert "slmsearch.search.study" not in imported and "slmsearch.search.objective" not in imported
    assert "slmsearch.search.storage" in imported


def test_the_time_left_comes_from_this_machines_trials_and_screens():
    from slmsearch.search.clock import Formula, Measured, seconds_left

    formula = Formula(baseline_s=50.0, compressed_s=100.0, screen_s=10.0)
    measured = Measured()
    assert seconds_left(measured, formula, compressed=4, baseline=True, screens=6) == 50 + 400 + 60
    measured.trials.append((True, 30.0))  # the baseline alone says nothing of a compressed trial
    assert seconds_left(measured, formula, compressed=4, baseline=False, screens=0) == 400.0
    measured.trials += [(False, 500.0), (False, 700.0)]
    measured.screens, measured.screen_s = 9, 270.0  # screens are timed apart from the trials they chose
    assert seconds_left(measured, formula, compressed=3, baseline=False, screens=6) == 3 * 600 + 6 * 30
