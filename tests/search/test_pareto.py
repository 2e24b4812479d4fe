"""`slmsearch pareto` on a real SQLite study: non-dominated, feasible rows; md/csv/json that parse.

``build_study`` makes a study shaped like one `slmsearch optimize` leaves behind (plans from the real
space, hardware attributes, rejected, pruned and failed trials, the enqueued baseline); the report
tests import it from here.
"""

from __future__ import annotations

import csv
import io
import json
import math
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

SMOLLM2_DIMS = {"hidden": 576, "attn_out": 576, "intermediate": 1536, "head_dim": 64}
OBJECTIVES = ["wikitext_word_ppl", "triviaqa_exact_match", "decode_latency_s"]
DIRECTIONS = ["minimize", "maximize", "minimize"]
BITS_PENALTY = {2: 1.6, 3: 0.55, 4: 0.15, 8: 0.01, 16: 0.0}
EVAL_COUNTS = {"wikitext_token_windows": 4, "wikitext_pages": 2, "triviaqa_questions": 50}


def _distributions() -> dict[str, Any]:
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    return {
        "drop_layers": IntDistribution(0, 12),
        "wanda_pattern": CategoricalDistribution(["none", "structured", "unstructured", "2:4"]),
        "structured_fraction": FloatDistribution(0.0, 0.5, step=0.05),
        "kv_groups": IntDistribution(0, 0),
        "sparsity": FloatDistribution(0.1, 0.5, step=0.05),
        "lora_rank": CategoricalDistribution([0, 4, 8, 16]),
        "embedding_bits": CategoricalDistribution([16, 8, 4]),
        "gptq_bits": CategoricalDistribution([2, 3, 4, 8, 16]),
        "group_size": CategoricalDistribution([32, 64]),
        "act_order": CategoricalDistribution([False]),
        "eora_rank": CategoricalDistribution([0, 8, 16, 32]),
    }


def _sample(rng: random.Random) -> dict[str, Any]:
    params: dict[str, Any] = {"drop_layers": rng.randint(0, 12), "wanda_pattern": rng.choice(["none", "structured", "unstructured", "2:4"])}
    if params["wanda_pattern"] == "structured":
        params["structured_fraction"] = round(rng.choice([0.0, 0.1, 0.2, 0.3, 0.4]), 2)
        params["kv_groups"] = 0
    elif params["wanda_pattern"] == "unstructured":
        params["sparsity"] = round(rng.choice([0.1, 0.2, 0.3, 0.4, 0.5]), 2)
    params["lora_rank"] = rng.choice([0, 4, 8, 16])
    params["embedding_bits"] = rng.choice([16, 8, 8, 4, 4, 4])
    params["gptq_bits"] = rng.choice([2, 3, 3, 3, 4, 4, 4, 8, 16])
    if params["gptq_bits"] != 16:
        params["group_size"] = rng.choice([32, 64])
        params["act_order"] = False
        params["eora_rank"] = rng.choice([0, 8, 16, 32])
    return params


def _measure(params: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    """Plausible numbers for SmolLM2-135M on Siracusa (shapes right, values invented)."""
    layers = 30 - params["drop_layers"]
    frac = params.get("structured_fraction", 0.0)
    bits = params["gptq_bits"]
    per_layer = 4 * 576 * 576 * 0.625 + 3 * 576 * 1536 * (1 - frac)  # GQA q,o + k,v ~ 0.625; MLP
    linear_bytes = layers * per_layer * (bits / 8 if bits != 16 else 2.0) * (1.06 if bits != 16 else 1.0)
    emb_bytes = 49152 * 576 * params["embedding_bits"] / 8
    kv_bytes = layers * 2 * 3 * 64 * 512 * 2
    memory = {"linear": linear_bytes, "embedding": emb_bytes, "kv_cache": kv_bytes, "activations": 2.0e5}
    footprint = sum(memory.values()) / 1e6
    latency = footprint * 1e6 / 120e6 + 0.004 * layers
    damage = 0.05 * params["drop_layers"] + BITS_PENALTY[bits] + 0.5 * frac + params.get("sparsity", 0.0) ** 2 * 2
    damage += {16: 0.0, 8: 0.02, 4: 0.25}[params["embedding_bits"]] + (0.3 if params["wanda_pattern"] == "2:4" else 0.0)
    damage -= 0.05 * (params["lora_rank"] > 0) + 0.004 * params.get("eora_rank", 0)
    word_ppl = 25.0 * math.exp(max(0.0, damage)) * rng.uniform(0.95, 1.05)
    em = max(0.0, 0.06 * math.exp(-1.5 * max(0.0, damage)) + rng.uniform(-0.005, 0.005))
    return {
        "footprint_mb": footprint, "memory_bytes": memory, "placement": {"weights": "L3", "kv_cache": "L3"},
        "decode_latency_s": latency, "tokens_per_s": 1 / latency, "energy_per_token_j": latency * 0.09,
        "wikitext_word_ppl": word_ppl, "wikitext_token_ppl": word_ppl * 0.62, "early_token_ppl": word_ppl * 0.6,
        "triviaqa_exact_match": em, "triviaqa_answer_logprob": -6.0 - damage,
    }


def build_study(path: Path, *, n_trials: int = 40, budget_mb: float = 64.0, name: str = "demo", seed: int = 0) -> Any:
    """A SQLite study at ``path`` shaped like the output of ``slmsearch optimize``; returns it."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from slmsearch.search.config import SpaceConfig, StudyConfig
    from slmsearch.search.space import plan_from_params

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = StudyConfig(name=name, budget_mb=budget_mb)
    study = optuna.create_study(study_name=name, storage=f"sqlite:///{path}", directions=DIRECTIONS)
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("objectives", OBJECTIVES)
    rng = random.Random(seed)
    all_dists = _distributions()
    baseline = {"drop_layers": 0, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 16, "gptq_bits": 16}
    for i in range(n_trials):
        params = baseline if i == 0 else _sample(rng)
        plan = plan_from_params(params, SpaceConfig(), SMOLLM2_DIMS, 30).to_dict()
        m = _measure(params, rng)
        over = m["footprint_mb"] - budget_mb
        attrs: dict[str, Any] = {"plan": plan, **{k: m[k] for k in ("footprint_mb", "memory_bytes", "placement",
                                                                    "decode_latency_s", "tokens_per_s", "energy_per_token_j")}}
        if i == 0:
            attrs["baseline"] = True
        dists = {k: all_dists[k] for k in params}
        state, values = TrialState.COMPLETE, None
        if over > 0 and i == 0:  # the baseline over budget: evaluated, ended PRUNED (objective.py)
            state = TrialState.PRUNED
            attrs["over_budget"] = f"footprint {m['footprint_mb']:.2f} MB > budget {budget_mb:g} MB"
            for key in ("wikitext_word_ppl", "wikitext_token_ppl", "triviaqa_exact_match", "triviaqa_answer_logprob",
                        "early_token_ppl"):
                attrs[key] = m[key]
            attrs.update(eval_counts=EVAL_COUNTS, eval_seconds={"total": 80.0}, stage_seconds={}, cache_hits=[])
        elif over > 0:  # rejected before compression: PRUNED, no values
            state = TrialState.PRUNED
            attrs["rejected"] = f"footprint {m['footprint_mb']:.2f} MB > budget {budget_mb:g} MB"
            attrs["seconds_total"] = 0.01
        else:
            stages = [s["stage"] for s in plan["stages"]]
            seconds = {s: {"depth": 4.0, "wanda": 9.0, "lora": 25.0, "embedding": 0.8, "gptq": 60.0, "eora": 110.0}[s]
                       * rng.uniform(0.8, 1.2) for s in stages}
            hits = [s for s in stages if rng.random() < 0.3]
            attrs.update(stage_seconds={s: (0.2 if s in hits else t) for s, t in seconds.items()}, cache_hits=hits,
                         stage_reports=[], early_token_ppl=m["early_token_ppl"])
            if m["early_token_ppl"] > 6 * 15.0:
                state = TrialState.PRUNED
                attrs["seconds_total"] = sum(seconds.values()) + 3.0
            elif i % 17 == 16:
                state = TrialState.FAIL
            else:
                for key in ("wikitext_word_ppl", "wikitext_token_ppl", "triviaqa_exact_match", "triviaqa_answer_logprob"):
                    attrs[key] = m[key]
                attrs["eval_counts"] = EVAL_COUNTS
                attrs["eval_seconds"] = {"wikitext_word_ppl": 60.0, "triviaqa": 25.0, "total": 92.0}
                attrs["seconds_total"] = sum(attrs["stage_seconds"].values()) + 92.0
                values = [m["wikitext_word_ppl"], m["triviaqa_exact_match"], m["decode_latency_s"]]
        study.add_trial(create_trial(
            state=state, values=values, params=params, distributions=dists, user_attrs=attrs,
            constraints={"footprint_over_budget_mb": over} if state == TrialState.COMPLETE or over > 0 else None,
        ))
    return study


@pytest.fixture
def study_db(tmp_path: Path) -> Path:
    path = tmp_path / "demo.db"
    build_study(path)
    return path


def _dominates(a: list[float], b: list[float], signs: list[float]) -> bool:
    av, bv = [s * x for s, x in zip(signs, a)], [s * x for s, x in zip(signs, b)]
    return all(x <= y for x, y in zip(av, bv)) and any(x < y for x, y in zip(av, bv))


def test_pareto_rows_are_feasible_and_non_dominated(study_db: Path) -> None:
    from optuna.trial import TrialState

    from slmsearch.search.pareto import pareto_rows
    from slmsearch.search.storage import locate_study

    located = locate_study(storage=f"sqlite:///{study_db}", study_name="demo")
    study = located.study
    rows = pareto_rows(study)
    assert rows, "the demo study has feasible trials"
    signs = [1.0, -1.0, 1.0]
    feasible = [t for t in study.get_trials(states=(TrialState.COMPLETE,)) if "rejected" not in t.user_attrs]
    by_number = {t.number: t for t in study.get_trials()}
    for row in rows:
        trial = by_number[row["trial"]]
        assert trial.state == TrialState.COMPLETE and "rejected" not in trial.user_attrs
        assert row["footprint_mb"] <= 64.0
        assert not any(_dominates(o.values, trial.values, signs) for o in feasible if o.number != trial.number)
    # every feasible trial left out is dominated by some feasible trial
    listed = {r["trial"] for r in rows}
    for trial in feasible:
        if trial.number not in listed:
            assert any(_dominates(o.values, trial.values, signs) for o in feasible)
    ppl = [r["wikitext_word_ppl"] for r in rows]
    assert ppl == sorted(ppl)


def test_formats_parse(study_db: Path) -> None:
    from slmsearch.search.pareto import format_rows, pareto_rows
    from slmsearch.search.storage import locate_study

    located = locate_study(storage=f"sqlite:///{study_db}")  # the only study in the storage
    rows = pareto_rows(located.study)
    parsed = json.loads(format_rows(rows, "json", OBJECTIVES))
    assert [r["trial"] for r in parsed] == [r["trial"] for r in rows]
    assert set(parsed[0]) >= {"trial", "plan", "wikitext_word_ppl", "triviaqa_exact_match_pct", "decode_latency_s",
                              "footprint_mb", "tokens_per_s", "energy_per_token_mj", "samples"}
    table = list(csv.DictReader(io.StringIO(format_rows(rows, "csv", OBJECTIVES))))
    assert len(table) == len(rows)
    assert math.isclose(float(table[0]["wikitext_word_ppl"]), rows[0]["wikitext_word_ppl"])
    md = [line for line in format_rows(rows, "md", OBJECTIVES).splitlines() if line.startswith("|")]
    assert len(md) == len(rows) + 2 and md[0].startswith("| trial | plan | WikiText word ppl")
    assert all(line.count("|") == md[0].count("|") for line in md)


def _md_cells(md: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip().strip("|").split("|")] for line in md.splitlines() if line.startswith("|")]


def test_baseline_row_in_every_format_with_the_same_units(study_db: Path) -> None:
    """The over-budget baseline is the first row of md, csv and json; the other rows carry their
    ratio to it; the three formats hold the same numbers in the same units; sample sizes shown."""
    from slmsearch.search.pareto import pareto_table
    from slmsearch.search.storage import locate_study

    located = locate_study(storage=f"sqlite:///{study_db}")
    base = located.study.trials[0]
    assert base.user_attrs["baseline"] and base.values is None  # evaluated over budget: no objective values
    parsed = json.loads(pareto_table(located, "json"))
    table = list(csv.DictReader(io.StringIO(pareto_table(located, "csv"))))
    md = pareto_table(located, "md")
    cells = _md_cells(md)
    first = parsed[0]
    assert first["baseline"] is True and first["trial"] == 0 and first["status"] == "over budget"
    assert math.isclose(first["wikitext_word_ppl"], base.user_attrs["wikitext_word_ppl"])
    assert math.isclose(first["triviaqa_exact_match_pct"], 100 * base.user_attrs["triviaqa_exact_match"])
    assert math.isclose(first["energy_per_token_mj"], 1e3 * base.user_attrs["energy_per_token_j"])
    assert table[0]["trial"] == "0" and table[0]["baseline"] == "True"
    assert cells[2][0] == "0 (baseline, over budget)"
    assert len(parsed) == len(table) == len(cells) - 2 >= 2
    for rec, row, line in zip(parsed, table, cells[2:]):
        for field, cell in zip(("wikitext_word_ppl", "triviaqa_exact_match_pct", "decode_latency_s", "footprint_mb",
                                "tokens_per_s", "energy_per_token_mj"), line[2:]):
            assert math.isclose(float(row[field]), rec[field])
            shown = float(cell.split(" ")[0])  # Markdown: rounded, same unit
            assert math.isclose(shown, rec[field], rel_tol=0.01, abs_tol=0.06), (field, shown, rec[field])
        if not rec["baseline"]:
            ratio = rec["wikitext_word_ppl"] / first["wikitext_word_ppl"]
            assert math.isclose(rec["wikitext_word_ppl_vs_baseline"], ratio)
            assert f"({ratio:.2f}x)" in line[2]
        assert rec["samples"] == EVAL_COUNTS and row["n_wikitext_pages"] == "2"
    assert "[n = 2 pages]" in cells[0][2] and "[n = 50 questions]" in cells[0][3]
    assert "divided by the baseline's (trial 0" in md


def test_cli_pareto(study_db: Path) -> None:
    from slmsearch.cli import main

    runner = CliRunner()
    result = runner.invoke(main, ["pareto", "--storage", f"sqlite:///{study_db}", "--study-name", "demo", "--format", "json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert rows[0]["baseline"] and all(r["footprint_mb"] <= 64 for r in rows[1:])
    result = runner.invoke(main, ["pareto", "--storage", f"sqlite:///{study_db}", "--format", "csv"])
    assert result.exit_code == 0 and result.stdout.startswith("trial,plan,status,baseline,pareto,wikitext_word_ppl")
    result = runner.invoke(main, ["pareto", "--storage", f"sqlite:///{study_db}"])
    assert result.exit_code == 0 and "| trial | plan |" in result.stdout


def test_user_errors(tmp_path: Path, study_db: Path) -> None:
    from slmsearch.cli import main

    runner = CliRunner()
    missing = runner.invoke(main, ["pareto", "--storage", f"sqlite:///{tmp_path / 'nope.db'}"])
    assert missing.exit_code == 2 and "no study database" in missing.stderr and "slmsearch optimize" in missing.stderr
    assert not (tmp_path / "nope.db").exists()  # reading never creates a database
    wrong = runner.invoke(main, ["pareto", "--storage", f"sqlite:///{study_db}", "--study-name", "other"])
    assert wrong.exit_code == 2 and "no study 'other'" in wrong.stderr and "demo" in wrong.stderr
    secret = runner.invoke(main, ["pareto", "--storage", "postgresql://me:hunter2@127.0.0.1:1/db"])
    assert secret.exit_code == 2 and "hunter2" not in secret.stderr


def test_empty_front_still_prints_a_table(tmp_path: Path) -> None:
    from slmsearch.search.pareto import format_rows, pareto_rows
    from slmsearch.search.storage import locate_study

    build_study(tmp_path / "tight.db", n_trials=3, budget_mb=1.0, name="tight")
    located = locate_study(storage=f"sqlite:///{tmp_path / 'tight.db'}")
    rows = pareto_rows(located.study)
    assert rows == []
    assert json.loads(format_rows(rows, "json", OBJECTIVES)) == []
    assert len(_md_cells(format_rows(rows, "md", OBJECTIVES))) == 3
