"""Deployment choices as a study searches them: the space, the objectives, the trial's attributes."""

import json

import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel import TensorFormat, estimate, load_platform
from slmsearch.hwmodel.deployment import Deployment
from slmsearch.hwmodel.sensitivity import estimate_range
from slmsearch.hwmodel.shape import microllama, smollm2_135m
from slmsearch.search.config import Objective, SpaceConfig, StudyConfig
from slmsearch.search.objective import hardware_attrs
from slmsearch.search.space import suggest_deployment


def test_space_offers_deployment_choices_and_a_trial_samples_them():
    optuna = pytest.importorskip("optuna")
    space = SpaceConfig(activation_bits=(16, 8), kv_cache_level=("l2", "l3"))
    study = optuna.create_study()
    trial = study.ask()
    dep = suggest_deployment(trial, space)
    assert set(trial.params) == {"activation_bits", "kv_cache_level"}  # one-value choices are no parameter
    assert Deployment(**dep).weight_memory_first == "layers"
    with pytest.raises(SlmsearchError, match="activation_bits"):
        SpaceConfig(activation_bits=(4,))


def test_prefill_objective_needs_a_prompt_length():
    with pytest.raises(SlmsearchError, match="prefill_len"):
        StudyConfig(objectives=(Objective("prefill_latency_s", "minimize"),))
    cfg = StudyConfig(prefill_len=64, objectives=(Objective("prefill_latency_s", "minimize"),))
    assert cfg.prefill_len == 64


def test_trial_attributes_carry_ranges_average_decode_prefill_and_deployment():
    p = load_platform("siracusa")
    shape = microllama()
    dep = Deployment(8, "lm_head", "l3")
    est = estimate(shape, p, context_len=64, prefill_len=16, deployment=dep)
    attrs = hardware_attrs(est, estimate_range(shape, p, context_len=64, deployment=dep))
    lo, hi = attrs["decode_latency_s_range"]
    assert lo <= attrs["decode_latency_s"] <= hi
    assert attrs["prefill_latency_s"] == est.prefill.latency_s
    assert attrs["decode_avg_latency_s"] <= attrs["decode_latency_s"]
    assert attrs["deployment"] == dep.to_dict()
    assert json.loads(json.dumps(attrs)) == attrs


def test_integer_activations_price_apart_from_fp16_at_the_same_footprint():
    p = load_platform("siracusa")
    shape = smollm2_135m().with_linear_format(TensorFormat(4, 128)).with_embedding_format(
        TensorFormat(8, 128)).drop_layers(range(12))
    fp = estimate(shape, p, context_len=512, prefill_len=64)
    i8 = estimate(shape, p, context_len=512, prefill_len=64, deployment=Deployment(8))
    assert abs(fp.memory.total_bytes - i8.memory.total_bytes) < 1e6
    assert fp.decode.latency_s > 1.2 * i8.decode.latency_s
    assert fp.prefill.latency_s > 3 * i8.prefill.latency_s
    assert i8.prefill.cycles_by_engine.get("npu", 0) > 0 and "npu" not in fp.prefill.cycles_by_engine
