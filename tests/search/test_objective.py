"""search/objective.py as a unit: the hardware attributes, and the three ways a trial ends without
compressing anything (over budget, a repeated plan, no free slot), on a real in-memory study, the
real space and the real hardware model. The compressing path runs in test_study.py."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState, create_trial

from slmsearch.compress.plan import Plan
from slmsearch.hwmodel import ModelShape, estimate, load_platform
from slmsearch.search import trials as tr
from slmsearch.search.config import SpaceConfig, StudyConfig
from slmsearch.search.objective import TrialContext, hardware_attrs, run_trial
from slmsearch.search.slots import SurplusTrial
from slmsearch.search.space import plan_from_params

TINY = {"model_type": "llama", "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 4,
        "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 1024, "tie_word_embeddings": True}
PARAMS = {"drop_fraction": 0.5, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 8, "embedding_group": 0,
          "embedding_grid": "sym", "layer_grid": "gptq", "gptq_bits": 16, "kv_cache_bits": 16}


def _context(budget_mb: float, trials: int = 8) -> TrialContext:
    space = SpaceConfig(drop_layers=(0, 2), embedding_groups=(0, 32))
    config = StudyConfig(name="unit", budget_mb=budget_mb, context_len=128, trials=trials, space=space)
    # No data folder, model or cache: these paths must never reach compression or evaluation.
    return TrialContext(config=config, base_location="/nonexistent", base_shape=ModelShape.from_hf_config(TINY),
                        platform=load_platform("siracusa"), data_dir=Path("/nonexistent"), cache=None, log=lambda _: None)


def _plan(ctx: TrialContext) -> dict:
    """The plan dict ``PARAMS`` stand for (as the space builds it for the trial)."""
    dims = {"hidden": 64, "attn_out": 64, "intermediate": 128}
    placed = {**PARAMS, "drop_layers": 1, "lora_steps": ctx.config.space.lora_steps}  # round(0.5 * 2) of 4 layers
    return plan_from_params(placed, ctx.config.space, dims, 4).to_dict()


def _run(study: optuna.Study, ctx: TrialContext, params: dict) -> optuna.trial.FrozenTrial:
    study.enqueue_trial(params)
    study.optimize(lambda t: run_trial(t, ctx), n_trials=1, catch=(SurplusTrial,))
    return study.trials[-1]


def test_hardware_attrs_are_the_estimate_flat_and_json_able():
    est = estimate(ModelShape.from_hf_config(TINY), load_platform("siracusa"), context_len=128)
    attrs = hardware_attrs(est)
    assert set(tr.HW_ATTRS) <= set(attrs)
    assert attrs["footprint_mb"] * 1e6 == est.memory.total_bytes == sum(attrs["memory_bytes"].values())
    assert attrs["decode_latency_s"] == est.decode.latency_s and attrs["tokens_per_s"] == pytest.approx(1 / est.decode.latency_s)
    assert attrs["placement"] == est.placement and all(isinstance(v, str) for v in attrs["placement"].values())
    assert json.loads(json.dumps(attrs)) == attrs


def test_an_over_budget_plan_is_rejected_before_any_work():
    """A budget no plan meets (the study refuses one up front; a worker of a study whose budget
    another process set could still meet one): the repair shrinks the plan as far as it goes, says
    what it changed, and the plan ends rejected without any work."""
    ctx = _context(budget_mb=0.01)
    study = optuna.create_study(directions=ctx.config.directions)
    trial = _run(study, ctx, PARAMS)
    plan = Plan.from_dict(trial.user_attrs[tr.PLAN_ATTR])
    footprint = estimate(plan.shape(ctx.base_shape), ctx.platform, context_len=128).memory.total_bytes / 1e6
    assert tr.status(trial) == tr.REJECTED and ctx.stage_calls == []
    assert plan.label() == "drop2 emb4h w2g64s8 kv4"  # every repair taken, the deepest drop
    assert trial.user_attrs["repaired_params"] == {
        "kv_cache_bits": [16, 4], "embedding_bits": [8, 4], "gptq_bits": [16, 2], "group_size": [None, 64],
        "act_order": [None, False], "eora_rank": [None, 0]}
    assert trial.user_attrs["footprint_mb"] == footprint
    assert trial.user_attrs[tr.REJECTED_ATTR] == f"footprint {footprint:.2f} MB > budget 0.01 MB"
    assert trial.constraints == {tr.CONSTRAINT_KEY: pytest.approx(footprint - 0.01)}
    # nothing was measured, so no objective value is stored: it ends PRUNED with its constraint
    # (TPE reads it as infeasible; the dashboard shows no made-up value), and does not count
    assert trial.state == TrialState.PRUNED and trial.values is None and not tr.counted(trial)


def test_a_repeated_plan_is_answered_from_its_first_trial():
    ctx = _context(budget_mb=100.0)
    study = optuna.create_study(directions=ctx.config.directions)
    study.add_trial(create_trial(
        values=[31.0, 0.02, 0.01], constraints={tr.CONSTRAINT_KEY: -50.0},
        user_attrs={tr.PLAN_ATTR: _plan(ctx), "wikitext_word_ppl": 31.0, tr.STAGE_SECONDS_ATTR: {"depth": 2.0},
                    tr.WORKER_ATTR: "elsewhere:1"},
    ))
    again = _run(study, ctx, PARAMS)
    assert tr.status(again) == tr.REPEAT and again.user_attrs[tr.REPEAT_ATTR] == 0 and ctx.stage_calls == []
    assert again.values == [31.0, 0.02, 0.01] and again.user_attrs["wikitext_word_ppl"] == 31.0
    # what belongs to the first trial's run is not copied
    assert tr.STAGE_SECONDS_ATTR not in again.user_attrs and again.user_attrs[tr.WORKER_ATTR] != "elsewhere:1"
    assert not tr.counted(again)


def test_a_trial_without_a_free_slot_ends_as_surplus():
    ctx = _context(budget_mb=100.0, trials=1)
    study = optuna.create_study(directions=ctx.config.directions)
    study.add_trial(create_trial(values=[31.0, 0.02, 0.01], user_attrs={tr.PLAN_ATTR: {"stages": []}}))  # the one slot, taken
    trial = _run(study, ctx, PARAMS)
    assert trial.state == TrialState.FAIL and tr.status(trial) == tr.SURPLUS and ctx.stage_calls == []
    assert trial.user_attrs[tr.SURPLUS_ATTR] == "all 1 trials were taken when it started"
    assert tr.SLOT_ATTR not in trial.user_attrs
