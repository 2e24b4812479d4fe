"""The bench scripts' own logic (no timings asserted): profiler accounting, the tabular replay,
and the test-text tokenization shared across tokenizer objects."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))


def test_profiler_rows_add_up_to_the_root_and_work_is_counted_once():
    from _benchlib import Profiler

    prof = Profiler()
    inner = prof.timed(lambda: time.sleep(0.01), "inner", "work")
    work = prof.timed(lambda: (inner(), time.sleep(0.01)), "work", "work")
    phase = prof.timed(lambda: (work(), time.sleep(0.005)), "phase", "phase")
    start = time.perf_counter()
    with prof.span("root", "phase"):
        phase()
        phase()
    wall = time.perf_counter() - start
    rows = {label: seconds for label, _, seconds, _ in prof.rows()}
    assert "inner [phase]" not in rows  # nested inside "work": timed by the outer one only
    assert sum(rows.values()) == pytest.approx(wall, rel=0.05)
    assert prof.unavoidable_s() == pytest.approx(rows["work [phase]"], rel=1e-6)
    assert prof.calls["work [phase]"] == 2


def _fake_table(path: Path, baseline_ppl: float | None = None) -> None:
    import json

    import build_grid as bg

    if baseline_ppl is not None:
        bg.baseline_path(path).write_text(json.dumps({"wikitext_token_ppl": baseline_ppl}))

    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=bg.COLUMNS)
        writer.writeheader()
        for point in bg.grid_points():
            size = 30 - point["drop_layers"] + point["embedding_bits"] + 3 * point["gptq_bits"] + point["eora_rank"] / 4
            row = {**point, "group_size": 64, "feasible": int(size <= 40), "footprint_mb": size,
                   "decode_latency_s": size / 100}
            if size <= 40:
                row["wikitext_token_ppl"] = 10 * math.exp(point["drop_layers"] / 10 + 1 / point["gptq_bits"])
                row["triviaqa_answer_logprob"] = -point["drop_layers"] / 4 + point["eora_rank"] / 16
            writer.writerow(row)


def test_replay_reaches_the_whole_grid_and_reports_every_sampler(tmp_path, capsys):
    import search_efficiency as se

    table_path = tmp_path / "grid.csv"
    _fake_table(table_path)
    results = se.main(["--table", str(table_path), "--seeds", "2", "--budget-mb", "40", "--no-pruning"])
    assert set(results) == set(se.SAMPLERS)
    assert "nsga2+anchors+dedup" in results  # what the study runs
    for r in results.values():
        assert all(0.0 <= v <= 1.0 + 1e-9 for v in r["curve_eval"])
        assert r["curve_eval"] == sorted(r["curve_eval"])  # the found set only grows
    table, axes = se.load_table(table_path)
    feasible = [r for r in table.values() if r["footprint_mb"] <= 40]
    norm = se.Normalizer(feasible)
    grid_hv = se.hypervolume([norm(r) for r in feasible])
    curve = se.replay("random", 0, table, axes, norm, grid_hv, 40, 400, len(feasible))
    assert curve[-1][2] == pytest.approx(1.0)  # random search finds every feasible point eventually
    assert "default sampler nsga2" in capsys.readouterr().out


def test_replay_prunes_broken_points_as_the_study_does(tmp_path, capsys):
    import search_efficiency as se

    table_path = tmp_path / "grid.csv"
    _fake_table(table_path)
    with pytest.raises(SystemExit, match="baseline-only"):  # pruning needs the baseline's perplexity
        se.main(["--table", str(table_path), "--seeds", "1", "--budget-mb", "40"])
    _fake_table(table_path, baseline_ppl=0.4)  # 100 x baseline = 40: the deep 2- and 3-bit points are broken
    table, axes = se.load_table(table_path)
    feasible = [r for r in table.values() if r["footprint_mb"] <= 40]
    kept = [r for r in feasible if r["wikitext_token_ppl"] <= 40]
    assert 0 < len(kept) < len(feasible)
    norm = se.Normalizer(kept)
    grid_hv = se.hypervolume([norm(r) for r in kept])
    curve = se.replay("random", 0, table, axes, norm, grid_hv, 40, 400, len(feasible), baseline_ppl=0.4)
    assert curve[-1][2] == pytest.approx(1.0)  # the volume is the kept points' only
    assert all(hv <= 1.0 + 1e-9 for _, _, hv in curve)
    # a pruned trial was compressed: it counts as evaluated although it never joins the front
    assert curve[-1][1] >= len(feasible)
    results = se.main(["--table", str(table_path), "--seeds", "2", "--budget-mb", "40", "--samplers", "random"])
    assert "pruning modelled: baseline token ppl 0.40" in capsys.readouterr().out
    assert max(results["random"]["curve_eval"]) <= 1.0 + 1e-9


def test_wikitext_is_tokenized_once_for_two_copies_of_a_tokenizer(tiny_checkpoint, data_dir, monkeypatch):
    """Every trial loads its checkpoint's copy of the tokenizer: the test text (evaluation) and the
    validation text (calibration, LoRA) must be tokenized once per process, not once per copy."""
    from transformers import AutoTokenizer

    from slmsearch import data
    from slmsearch.evals import wikitext

    first = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    second = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    assert first is not second and data.tokenizer_key(first) == data.tokenizer_key(second)
    monkeypatch.setattr(data, "_TOKEN_IDS", data.OrderedDict())
    calls = []
    texts = {split: fn for split, fn in data._SPLIT_TEXT.items()}
    monkeypatch.setattr(data, "_SPLIT_TEXT", {s: (lambda d, s=s: calls.append(s) or texts[s](d)) for s in texts})
    a = wikitext.test_windows(first, data_dir, 64, 2)
    b = wikitext.test_windows(second, data_dir, 64, 2)
    assert calls == ["test"] and a.equal(b)
    c = data.calibration_tokens(first, data_dir, n_samples=2, seqlen=32, seed=0)
    d = data.calibration_tokens(second, data_dir, n_samples=2, seqlen=32, seed=0)
    assert calls == ["test", "valid"] and c.equal(d)


def test_cache_bench_states_the_bound_a_cache_of_the_shared_stages_allows():
    from cache import shared_work_line

    a = {"wall_s": 200.0, "cache_hits": [], "stage_seconds": {"depth": 10.0, "lora": 40.0, "gptq": 60.0, "eora": 60.0}}
    b = {"wall_s": 155.0, "cache_hits": ["depth", "lora"], "stage_seconds": {"gptq": 65.0, "eora": 60.0}}
    line = shared_work_line(a, b, shares=("depth", "lora"))
    assert "cost A 50.0 s of 200.0 s" in line
    assert "B re-ran none of them" in line
    assert "allows: 1.33" in line  # 200 / (200 - 50)
    assert "B - (A - shared) = +5.0 s" in line
    b_missed = {**b, "cache_hits": ["depth"], "stage_seconds": {"lora": 40.0, **b["stage_seconds"]}}
    assert "B re-ran lora" in shared_work_line(a, b_missed, shares=("depth", "lora"))


def test_hwmodel_speed_bench_writes_its_figures(tmp_path):
    """The hardware-model speed bench prices real plans and records its machine beside the figures."""
    import json

    import hwmodel_speed

    out = tmp_path / "speed.json"
    hwmodel_speed.main(["--n", "5", "--json", str(out)])
    record = json.loads(out.read_text())
    assert record["plans"] == 5 and record["cpu_model"]
    assert 0 < record["ms_per_plan"]["median"] <= record["ms_per_plan"]["max"]
    assert record["plan_shape_ms"]["median"] > 0 and record["estimate_ms"]["median"] > 0
