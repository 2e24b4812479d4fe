"""`slmsearch export`: refusals, atomic folders, and (slow) a real export of SmolLM2-135M that
plain transformers loads with the model card's two lines and that reproduces the recorded
perplexity on the same windows, rebuilt from the stage cache and recomputed without it."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

PLAN = {"stages": [{"stage": "depth", "drop": 2}, {"stage": "embedding", "bits": 8}]}
CALIBRATION = {"n_samples": 4, "seqlen": 128, "seed": 0}
EVALUATION = {"token_seqlen": 256, "token_windows": 2}
HW = {"footprint_mb": 48.0, "memory_bytes": {"linear": 3.0e7, "embedding": 1.8e7}, "placement": {"weights": "L3"},
      "decode_latency_s": 0.5, "tokens_per_s": 2.0, "energy_per_token_j": 0.045}


def make_study(path: Path, *, token_ppl: float = 40.0, data_dir: Path | None = None) -> Any:
    """Trials 0 (baseline, over budget), 1 (evaluated, PLAN), 2 (pruned), 3 (failed)."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from slmsearch.search.config import StudyConfig, calibration_from, evaluation_from

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    config = StudyConfig(name="exp", budget_mb=64.0, calibration=calibration_from(CALIBRATION),
                         evaluation=evaluation_from(EVALUATION),
                         data_dir=str(data_dir) if data_dir else None)
    study = optuna.create_study(study_name="exp", storage=f"sqlite:///{path}",
                                directions=["minimize", "maximize", "minimize"])
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("objectives", ["wikitext_word_ppl", "triviaqa_exact_match", "decode_latency_s"])
    over = {**HW, "footprint_mb": 277.6}
    study.add_trial(create_trial(values=[1e6, -1e6, 2.4], constraints={"footprint_over_budget_mb": 213.6}, user_attrs={
        "plan": {"stages": []}, "baseline": True, **over, "rejected": "footprint 277.60 MB > budget 64 MB"}))
    study.add_trial(create_trial(values=[token_ppl * 1.6, 0.02, 0.5], constraints={"footprint_over_budget_mb": -16.0}, user_attrs={
        "plan": PLAN, **HW, "wikitext_token_ppl": token_ppl, "wikitext_word_ppl": token_ppl * 1.6,
        "triviaqa_exact_match": 0.02, "eval_counts": {"wikitext_token_windows": 2}}))
    study.add_trial(create_trial(state=TrialState.PRUNED, user_attrs={"plan": PLAN, **HW, "early_token_ppl": 812.0}))
    study.add_trial(create_trial(state=TrialState.FAIL, user_attrs={"plan": PLAN, **HW}))
    return study


@pytest.mark.parametrize(("args", "message"), [
    (["--trial", "0"], "trial 0 was over budget (footprint 277.60 MB > budget 64 MB)"),
    (["--trial", "2"], "trial 2 was pruned by the early perplexity check (early token ppl 812.0)"),
    (["--trial", "3"], "trial 3 failed"),
    (["--trial", "9"], "no trial 9 in study 'exp' (trials: 0-3)"),
    ([], "--pareto (every Pareto-optimal trial) or --trial N"),
    (["--pareto", "--trial", "0"], "trial 0 was over budget"),
])
def test_refusals(tmp_path: Path, args: list[str], message: str) -> None:
    from slmsearch.cli import main

    make_study(tmp_path / "exp.db")
    result = CliRunner().invoke(main, ["export", "--storage", f"sqlite:///{tmp_path / 'exp.db'}", "--out", str(tmp_path / "out"),
                                       "--data-dir", str(tmp_path), *args])
    assert result.exit_code == 2, result.output
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_failed_rebuild_leaves_no_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slmsearch.compress import pipeline
    from slmsearch.search import export as export_mod
    from slmsearch.search.storage import locate_study

    make_study(tmp_path / "exp.db")

    def broken_run(plan: Any, model: Any, data: Any, calib: Any, *, out: Path, **_: Any) -> Any:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("killed mid-way")

    monkeypatch.setattr(pipeline, "run", broken_run)
    monkeypatch.setattr("slmsearch.models.resolve_model", lambda spec, **_: "base")
    located = locate_study(storage=f"sqlite:///{tmp_path / 'exp.db'}")
    with pytest.raises(RuntimeError, match="killed mid-way"):
        export_mod.export_trial(located, located.study.trials[1], tmp_path / "out", data_dir=tmp_path)
    assert list((tmp_path / "out").iterdir()) == []  # neither trial-0001 nor a temporary sibling


def _readme_snippet(readme: str) -> str:
    block = re.search(r"```python\n(.*?)```", readme, re.S)
    assert block, "the model card has a python block"
    lines = block.group(1).strip().splitlines()
    assert len(lines) == 2
    return "\n".join(lines)


@pytest.mark.slow
def test_export_reproduces_recorded_perplexity(tmp_path: Path, data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Record a trial the way the objective does, export it twice (warm cache, empty cache), load
    each with the README's two lines and score the same windows."""
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch import checkpoint
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.evals.wikitext import token_perplexity
    from slmsearch.search.export import export
    from slmsearch.search.storage import locate_study

    warm = StageCache(root=tmp_path / "cache")
    result = run(Plan.from_dict(PLAN), None, data_dir, CalibSettings(**CALIBRATION), cache=warm)
    model, tokenizer = checkpoint.load(result.checkpoint_dir)
    recorded, windows = token_perplexity(model, tokenizer, data_dir, seqlen=EVALUATION["token_seqlen"],
                                         n_windows=EVALUATION["token_windows"])
    assert windows == 2
    del model
    make_study(tmp_path / "exp.db", token_ppl=recorded, data_dir=data_dir)
    located = locate_study(storage=f"sqlite:///{tmp_path / 'exp.db'}")

    from_cache = export(located, tmp_path / "a", pareto=True, cache=warm, progress=False, log=lambda _: None)
    rebuilt = export(located, tmp_path / "b", numbers=(1,), cache=StageCache(root=tmp_path / "empty"), progress=False,
                     log=lambda _: None)
    assert [e.trial for e in from_cache] == [1] and from_cache[0].stages_from_cache == 2
    assert rebuilt[0].stages_from_cache == 0 and rebuilt[0].checkpoint_format == "hf+packed-embedding"  # 8-bit codes
    for item in (from_cache[0], rebuilt[0]):
        folder = item.folder
        assert folder.name == "trial-0001"
        readme = (folder / "README.md").read_text(encoding="utf-8")
        for needle in ("depth", "embedding", "wikitext_token_ppl", "footprint", "sha256", "seeds", "siracusa"):
            assert needle in readme
        card = json.loads((folder / "trial.json").read_text())
        assert card["plan"] == PLAN and math.isclose(card["metrics"]["wikitext_token_ppl"], recorded)
        assert card["data_sha256"] and card["seeds"]["calibration"] == 0
        monkeypatch.chdir(folder.parent)
        scope: dict[str, Any] = {}
        exec(_readme_snippet(readme), scope)  # the card's two lines, verbatim
        assert type(scope["model"]).__name__ == "LlamaForCausalLM"
        assert scope["model"].config.num_hidden_layers == 28
        ppl, _ = token_perplexity(scope["model"].eval(), scope["tokenizer"], data_dir, seqlen=EVALUATION["token_seqlen"],
                                  n_windows=EVALUATION["token_windows"])
        assert math.isclose(ppl, recorded, rel_tol=1e-4), (ppl, recorded)
    again = export(located, tmp_path / "a", numbers=(1,), cache=warm, progress=False, log=lambda _: None)
    assert again[0].written is False  # complete folders are kept


def test_checkpoint_format_of_a_plain_folder(tiny_checkpoint):
    """The format probe every export runs (it once imported a renamed helper unnoticed)."""
    from slmsearch.search.export import _checkpoint_format

    assert _checkpoint_format(tiny_checkpoint) == "hf"


def test_card_compares_with_the_baseline_and_eval_reproduces_it(tmp_path: Path, tiny_checkpoint: Path, data_dir: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """A real export of the tiny LLaMA: the study's baseline and trial scored the way the objective
    scores them, the trial exported; its card shows the baseline, the ratio and the sample sizes,
    and `slmsearch eval` on the folder, with no flags, reproduces the card's number."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from slmsearch import checkpoint
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.evals.command import run_eval
    from slmsearch.evals.wikitext import token_perplexity
    from slmsearch.search.config import Objective, StudyConfig, calibration_from, evaluation_from
    from slmsearch.search.export import export
    from slmsearch.search.storage import locate_study

    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    plan = {"stages": [{"stage": "depth", "drop": 1}]}
    calibration = {"n_samples": 4, "seqlen": 64, "seed": 0}
    evaluation = {"metrics": ["wikitext_token_ppl"], "token_seqlen": 128, "token_windows": 2, "batch_size": 2}
    cache = StageCache(root=tmp_path / "stages")

    def score(folder: Path) -> float:
        model, tokenizer = checkpoint.load(folder, dense=True)  # as objective.evaluate_staged loads it
        ppl, windows = token_perplexity(model, tokenizer, data_dir, seqlen=128, n_windows=2, batch_size=2)
        assert windows == 2
        return ppl

    baseline_ppl = score(tiny_checkpoint)
    trial_ppl = score(run(Plan.from_dict(plan), str(tiny_checkpoint), data_dir, CalibSettings(**calibration), cache=cache).checkpoint_dir)
    config = StudyConfig(name="tiny-exp", model=str(tiny_checkpoint), budget_mb=1.0, data_dir=str(data_dir),
                         objectives=(Objective("wikitext_token_ppl", "minimize"), Objective("decode_latency_s", "minimize")),
                         calibration=calibration_from(calibration), evaluation=evaluation_from(evaluation))
    study = optuna.create_study(study_name="tiny-exp", storage=f"sqlite:///{tmp_path / 's.db'}", directions=["minimize", "minimize"])
    study.set_user_attr("config", config.to_dict())
    study.set_user_attr("objectives", ["wikitext_token_ppl", "decode_latency_s"])
    counts = {"wikitext_token_windows": 2}
    study.add_trial(create_trial(state=TrialState.PRUNED, constraints={"footprint_over_budget_mb": 2.0}, user_attrs={
        "plan": {"stages": []}, "baseline": True, "over_budget": "footprint 3.00 MB > budget 1 MB", **HW, "footprint_mb": 3.0,
        "wikitext_token_ppl": baseline_ppl, "eval_counts": counts}))
    study.add_trial(create_trial(values=[trial_ppl, 0.5], constraints={"footprint_over_budget_mb": -0.2}, user_attrs={
        "plan": plan, **HW, "footprint_mb": 0.8, "wikitext_token_ppl": trial_ppl, "eval_counts": counts}))
    located = locate_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    (item,) = export(located, tmp_path / "out", pareto=True, data_dir=data_dir, cache=cache, progress=False, log=lambda _: None)

    readme = (item.folder / "README.md").read_text(encoding="utf-8")
    share = trial_ppl / baseline_ppl
    row = next(line for line in readme.splitlines() if line.startswith("| WikiText token ppl"))
    assert row == (f"| WikiText token ppl (`wikitext_token_ppl`) | {trial_ppl:.6g} | {baseline_ppl:.6g} | {share:.2f}x "
                   "| 2 windows |"), row
    assert "| metric | this model | baseline (trial 0) | ratio | measured on |" in readme
    assert "uncompressed baseline (trial 0, 3 MB, over budget" in readme
    card = json.loads((item.folder / "trial.json").read_text())
    assert card["reference"]["metrics"]["wikitext_token_ppl"] == baseline_ppl

    record = run_eval(model=str(item.folder), trust_remote_code=False, data_dir=str(data_dir), tasks=None, metrics=None,
                      seqlen=None, windows=None, pages=None, max_length=None, limit=None, shots=None, batch_size=None,
                      dtype="float32", out_path=str(tmp_path / "eval.json"))
    assert record["settings"] == card["eval_settings"] and record["counts"] == card["eval_counts"]
    assert math.isclose(record["metrics"]["wikitext_token_ppl"], card["metrics"]["wikitext_token_ppl"], rel_tol=1e-5)


def test_card_size_section_puts_disk_bytes_beside_the_deployed_ones() -> None:
    """The card's size table: weight files on disk beside the weights the footprint counts, the KV
    cache and activations named apart, the footprint their sum, and the gap between disk and deployed."""
    from slmsearch.search.export import size_section

    memory = {"embedding": 14_000_000, "attention": 9_000_000, "mlp": 27_000_000, "norms": 40_000,
              "scales_zeros": 1_960_000, "kv_cache": 8_650_000, "activations_peak": 100_000}
    record = {"disk_bytes": {"weights": 52_520_000, "other": 3_540_000},
              "hardware": {"memory_bytes": memory, "context_len": 512}}
    lines = size_section(record)
    table = {cells[1].strip(): cells[3].strip() for cells in (line.split("|") for line in lines) if len(cells) == 5}
    assert table["weight files (`*.safetensors`, adapter and packed embedding included)"] == "52.52 MB"
    assert table["weights + scales/zeros + sparsity metadata + adapters"] == "52.00 MB"
    assert table["KV cache (512 positions, 16-bit)"] == "8.65 MB"
    kv4 = {**record, "plan": {"stages": [{"stage": "kv_cache", "bits": 4, "group_size": 32}]}}
    assert any("KV cache (512 positions, 4-bit, a 16-bit scale and zero per 32 channels)" in line for line in size_section(kv4))
    assert table["footprint (what the budget is compared with)"] == "60.75 MB"
    assert "(+1.0% apart" in "\n".join(lines)
    assert size_section({"hardware": {"memory_bytes": memory}}) == []  # nothing measured on disk: no section
