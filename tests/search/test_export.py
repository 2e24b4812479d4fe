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
    assert rebuilt[0].stages_from_cache == 0 and rebuilt[0].checkpoint_format == "hf"
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
