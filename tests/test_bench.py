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


def _fake_table(path: Path, *, proxy_noise: float = 0.0) -> int:
    """A table over the real grid (points resolved and priced by the real hardware model, as
    ``build_grid.py`` does) with made-up perplexities: deeper, narrower and coarser-KV plans are
    worse; the proxy is worse than the truth by a width-dependent factor (as round-to-nearest is
    against GPTQ), times ``exp(noise)``. Returns the number of feasible points."""
    import json
    import random

    import build_grid as bg
    from slmsearch.hwmodel import estimate, load_platform
    from slmsearch.hwmodel.shape import smollm2_135m
    from slmsearch.search.config import load_study_config

    config = load_study_config(None)
    shape, platform = smollm2_135m(), load_platform(config.platform)
    rng = random.Random(0)
    rows, seen = [], set()
    for point in bg.grid_points():
        params, plan = bg.resolve(point, config, shape)
        if bg.key(params) in seen:
            continue
        seen.add(bg.key(params))
        footprint = estimate(plan.shape(shape), platform, context_len=config.context_len).memory.total_bytes / 1e6
        row = {**point, "gptq_wider_layers": params["gptq_wider_layers"], "plan": plan.label(),
               "footprint_mb": footprint, "decode_latency_s": footprint / 200, "feasible": int(footprint <= config.budget_mb)}
        if row["feasible"]:
            bits, wider, kept = params["gptq_bits"], params["gptq_wider_layers"], 30 - params["drop_layers"]
            log_ppl = math.log(30) + params["drop_layers"] / 6 + {2: 9.0, 3: 0.8, 4: 0.15}[bits] * (1 - wider / kept) \
                + {2: 0.8, 3: 0.15, 4: 0.15}[bits] * wider / kept + {16: 0.0, 8: 0.01, 4: 0.04}[params["kv_cache_bits"]]
            row["wikitext_token_ppl"] = math.exp(log_ppl)
            gap = {2: 2.5, 3: 1.0, 4: 0.2}[bits]
            row["proxy_token_ppl"] = math.exp(log_ppl + gap + rng.gauss(0, proxy_noise))
            row["proxy_s"] = 10.0
        rows.append(row)
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=bg.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    bg.baseline_path(path).write_text(json.dumps({"wikitext_token_ppl": 28.0}))
    return sum(r["feasible"] for r in rows)


def test_replay_reports_every_search_and_writes_the_figures_the_issue_asks_for(tmp_path, capsys):
    import json

    import search_efficiency as se

    table = tmp_path / "grid.csv"
    n_feasible = _fake_table(table)
    out = tmp_path / "se.json"
    summary = se.main(["--table", str(table), "--seeds", "2", "--max-evals", "8", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(summary))
    assert summary["feasible_points"] == n_feasible > 50
    assert set(summary["searches"]) == set(se.SEARCHES)
    for r in summary["searches"].values():
        for curve in (r["mean_curve"], r["min_curve"]):
            assert all(0.0 <= v <= 1.0 + 1e-9 for v in curve)
            assert all(b >= a - 1e-9 for a, b in zip(curve, curve[1:]))  # the front only grows
    assert 0.0 < summary["anchors_only_hv_fraction"] < 1.0
    screened = summary["searches"]["screened"]
    from slmsearch.search.config import ScreeningConfig

    assert all(s >= ScreeningConfig().first for s in screened["screens"])  # the first screens at least
    assert summary["searches"]["random"]["screens"] == [0, 0]  # no screening outside the screened search
    assert "anchors alone" in capsys.readouterr().out


def test_a_faithful_proxy_finds_the_front_with_fewer_evaluations_than_random_search(tmp_path):
    """On a table where the proxy ranks plans of one width as the truth does (its width-dependent
    gap is what the correction learns), the screened search needs fewer full evaluations."""
    import search_efficiency as se

    table = tmp_path / "grid.csv"
    _fake_table(table)
    summary = se.main(["--table", str(table), "--seeds", "1", "--max-evals", "25", "--out", str(tmp_path / "se.json")])
    k95 = {name: r["k95"][0] for name, r in summary["searches"].items()}
    assert k95["screened"] is not None
    assert k95["random"] is None or k95["screened"] < k95["random"]
    assert summary["searches"]["screened"]["pruned_full_evaluations"] == [0]  # nothing predicted broken evaluated


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


def test_quality_at_budget_rows_replace_only_their_budget_and_search(tmp_path: Path) -> None:
    """A peer-only run of bench/quality_at_budget.py keeps the study rows and the dense row."""
    from quality_at_budget import read_rows, write_rows

    out = tmp_path / "qab.csv"
    write_rows(out, [{"budget_mb": "dense", "search": "dense", "token_ppl": 30.0},
                     {"budget_mb": 64.0, "search": "new", "token_ppl": 64.4, "plan": "a"},
                     {"budget_mb": 64.0, "search": "llama.cpp", "token_ppl": 900.0, "plan": "old"}])
    write_rows(out, [{"budget_mb": 64, "search": "llama.cpp", "token_ppl": 620.24444, "plan": "Q2_K"},
                     {"budget_mb": 96.0, "search": "llama.cpp", "token_ppl": 32.2, "plan": "Q4_1"}])
    rows = {(r["budget_mb"], r["search"]): r for r in read_rows(out)}
    assert set(rows) == {("dense", "dense"), ("64.0", "new"), ("64", "llama.cpp"), ("96.0", "llama.cpp")}
    assert rows[("64", "llama.cpp")]["token_ppl"] == "620.2444" and rows[("64", "llama.cpp")]["plan"] == "Q2_K"
    assert rows[("64.0", "new")]["plan"] == "a"


def test_the_peer_is_given_our_kv4_overhead_less_what_dropped_layers_free() -> None:
    from _llamacpp_peer import non_weight_bytes

    from slmsearch.hwmodel.estimate import footprint_bytes
    from slmsearch.hwmodel.memory import static_bytes
    from slmsearch.hwmodel.shape import smollm2_135m

    base = smollm2_135m()
    full = non_weight_bytes(base, (), 32, 512, 0)
    kv4 = base.with_kv_cache_bits(4, 32)
    assert full == footprint_bytes(kv4, context_len=512, prefill_len=0) - static_bytes(kv4).static_total
    assert 3.0e6 < full < 4.5e6  # the 4-bit KV cache at context 512 (3.7 MB) and the decode activations (the study default: no prefill priced)
    fewer = [non_weight_bytes(base, tuple(range(n)), 32, 512, 0) for n in (1, 5, 10)]
    assert full > fewer[0] > fewer[1] > fewer[2] > 0
