"""The search space: sampled parameters -> Plan, the group sizes and KV groups a model allows, the
most compressed plan, the baseline. Pure arithmetic on the SmolLM2-135M shape (no model loaded)."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import FixedTrial

from slmsearch.compress.depth import DepthPrune
from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch.compress.gptq import Eora, Gptq
from slmsearch.compress.kvcache import KvCacheQuant
from slmsearch.compress.lora import LoraRecovery
from slmsearch.compress.plan import Plan
from slmsearch.compress.wanda import Wanda
from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel import estimate, load_platform
from slmsearch.hwmodel.shape import smollm2_135m
from slmsearch.search.config import SpaceConfig
from slmsearch.search.space import (
    base_dims,
    baseline_params,
    kv_group_choices,
    most_compressed_plan,
    plan_from_params,
    suggest_plan,
    valid_group_sizes,
)

BASE = smollm2_135m()  # hidden 576, 9 heads x 64, 3 KV heads, MLP 1536, 30 layers
DIMS = base_dims(BASE)
SPACE = SpaceConfig()
FULL = {
    "drop_layers": 4, "wanda_pattern": "2:4", "lora_rank": 8, "lora_steps": 10, "embedding_bits": 4,
    "gptq_bits": 3, "group_size": 64, "act_order": True, "eora_rank": 16,
}


def test_base_dims_and_valid_group_sizes():
    assert DIMS == {"hidden": 576, "attn_out": 576, "intermediate": 1536, "head_dim": 64}
    assert valid_group_sizes(SPACE, DIMS) == (32, 64)  # 128 does not divide 576
    assert valid_group_sizes(dataclasses.replace(SPACE, group_sizes=(128, -1)), DIMS) == (-1,)
    with pytest.raises(SlmsearchError, match=r"no group size in \[128\] divides the model's input sizes \[576, 576, 1536\]"):
        valid_group_sizes(dataclasses.replace(SPACE, group_sizes=(128,)), DIMS)


def test_kv_group_choices_keep_the_space_range_and_the_model_rules():
    assert kv_group_choices(SPACE, BASE, 64) == [0]  # the default space removes none
    assert kv_group_choices(dataclasses.replace(SPACE, kv_groups=(0, 2)), BASE, 64) == [0, 1, 2]
    assert kv_group_choices(dataclasses.replace(SPACE, kv_groups=(1, 2)), BASE, 64) == [1, 2]
    assert kv_group_choices(dataclasses.replace(SPACE, kv_groups=(1, 2)), BASE, 256) == [0]  # none allowed: 0


def test_plan_from_params_builds_every_stage_in_order():
    plan = plan_from_params(FULL, dataclasses.replace(SPACE, depth_score="ppl", lora_heldout=8), DIMS, 30)
    assert plan == Plan((
        DepthPrune(drop=4, by="ppl"), Wanda(pattern="2:4", sparsity=0.5), LoraRecovery(rank=8, steps=10, heldout=8, loss="kd"),
        EmbeddingQuant(bits=4, mse=2.4, gptq=True), Gptq(bits=3, group_size=64, act_order=True, mse=2.4, scale_bits=8), Eora(rank=16),
    ))
    assert Plan.from_dict(plan.to_dict()).label() == "drop4 wanda2:4@0.50 lora8kd emb4h w3g64s8 eora16"


@pytest.mark.parametrize("params, stages", [
    ({"wanda_pattern": "structured", "structured_fraction": 0.25, "kv_groups": 1, "structured_multiple": 32},
     (Wanda(pattern="structured", mlp_fraction=0.25, kv_groups=1, multiple=32),)),
    ({"wanda_pattern": "structured", "structured_fraction": 0.0, "kv_groups": 0}, ()),  # removes nothing: no stage
    ({"wanda_pattern": "unstructured", "sparsity": 0.3}, (Wanda(sparsity=0.3),)),
    ({"wanda_pattern": "4:8"}, (Wanda(pattern="4:8", sparsity=0.5),)),
    ({"lora_rank": 8}, ()),  # recovery only after a stage removed something
    ({"wanda_pattern": "2:4", "lora_rank": 4}, (Wanda(pattern="2:4", sparsity=0.5), LoraRecovery(rank=4, steps=10, heldout=0, loss="kd"))),
    ({"eora_rank": 8}, ()),  # EoRA only beside GPTQ
    ({"gptq_bits": 8, "group_size": -1}, (Gptq(bits=8, group_size=-1, mse=2.4, scale_bits=8),)),
    ({"embedding_bits": 16, "gptq_bits": 16, "drop_layers": 0}, ()),
])
def test_plan_from_params_rules(params, stages):
    assert plan_from_params(params, SPACE, DIMS, 30) == Plan(stages)


def test_plan_from_params_refuses_to_drop_every_layer():
    with pytest.raises(SlmsearchError, match="cannot drop 30 of 30 layers; lower space.drop_layers"):
        plan_from_params({"drop_layers": 30}, SPACE, DIMS, 30)


def test_suggest_plan_on_a_fixed_trial_records_the_params_that_rebuild_it():
    trial = FixedTrial({
        "drop_fraction": 0.35, "wanda_pattern": "structured", "structured_fraction": 0.25, "lora_rank": 8,
        "embedding_bits": 8, "embedding_group": 32, "gptq_bits": 4, "group_size": 64, "act_order": False,
        "eora_rank": 8, "kv_cache_bits": 8, "wider_fraction": 0.5, "lora_loss": "kd", "embedding_grid": "sym",
        "layer_grid": "gptq",
    })
    plan = suggest_plan(trial, SPACE, BASE)  # no budget: the sizes span the whole space
    assert plan == Plan((
        DepthPrune(drop=4), Wanda(pattern="structured", mlp_fraction=0.25, kv_groups=0, multiple=64),  # round(0.35 * 12)
        LoraRecovery(rank=8, steps=SPACE.lora_steps, heldout=SPACE.lora_heldout, loss="kd"),
        EmbeddingQuant(bits=8, group_size=32, mse=2.4, gptq=True), Gptq(bits=4, group_size=64, wider_layers=13, mse=2.4, scale_bits=8),  # 0.5 * 26 kept
        Eora(rank=8), KvCacheQuant(bits=8, group_size=64, key_group_size=16),
    ))
    fixed = {"structured_multiple": 64, "lora_steps": SPACE.lora_steps, "drop_layers": 4, "gptq_wider_layers": 13}
    assert plan_from_params({**trial.params, **fixed}, SPACE, DIMS, 30) == plan
    with pytest.raises(ValueError, match="128"):  # a group size the model does not allow is never offered
        suggest_plan(FixedTrial({**trial.params, "group_size": 128}), SPACE, BASE)


def test_suggest_plan_without_gptq_asks_for_no_gptq_settings():
    trial = FixedTrial({"drop_fraction": 0.0, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 16,
                        "layer_grid": "gptq", "gptq_bits": 16, "kv_cache_bits": 16})
    assert suggest_plan(trial, SPACE, BASE) == Plan(())
    assert set(trial.params) == {"drop_fraction", "wanda_pattern", "lora_rank", "embedding_bits", "layer_grid", "gptq_bits",
                                 "kv_cache_bits"}


def test_baseline_params_are_the_empty_plan():
    assert plan_from_params(baseline_params(SPACE), SPACE, DIMS, 30) == Plan(())
    assert Plan.from_dict({}).label() == "baseline"
    with pytest.raises(SlmsearchError, match="the baseline needs 16 in space.gptq_bits"):
        baseline_params(dataclasses.replace(SPACE, gptq_bits=(4, 8)))


def test_most_compressed_plan_takes_every_extreme():
    assert most_compressed_plan(SPACE, BASE) == Plan((
        DepthPrune(drop=12), Wanda(pattern="structured", mlp_fraction=0.5, kv_groups=0, multiple=64),
        EmbeddingQuant(bits=4, group_size=64, mse=2.4, gptq=True), Gptq(bits=2, group_size=64, mse=2.4, scale_bits=8),
        KvCacheQuant(bits=4, group_size=64, key_group_size=16),
    ))
    assert most_compressed_plan(SPACE, BASE, pattern="unstructured").get("wanda") == Wanda(sparsity=0.5)


def test_no_sampled_plan_is_smaller_than_the_most_compressed_one():
    platform = load_platform("siracusa")

    def footprint(plan):
        return estimate(plan.shape(BASE), platform, context_len=512).memory.total_bytes

    smallest = min(footprint(most_compressed_plan(SPACE, BASE, pattern=p)) for p in SPACE.wanda_patterns)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    for _ in range(40):
        trial = study.ask()
        assert footprint(suggest_plan(trial, SPACE, BASE)) >= smallest
        study.tell(trial, 0.0)


def test_the_space_settings_of_the_embedding_and_kv_cache_reach_the_stages():
    space = dataclasses.replace(SPACE, embedding_gptq=True, kv_cache_group=64, kv_cache_key_group=16, kv_cache_rotate=True)
    trial = FixedTrial({"drop_fraction": 0.0, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 4,
                        "embedding_group": 64, "embedding_grid": "sym", "layer_grid": "gptq", "gptq_bits": 16,
                        "kv_cache_bits": 4, "embedding_wide_fraction": 0.0})
    plan = suggest_plan(trial, space, BASE)
    assert plan == Plan((EmbeddingQuant(bits=4, group_size=64, mse=2.4, gptq=True),
                         KvCacheQuant(bits=4, group_size=64, key_group_size=16, rotate=True)))
    assert plan.label() == "emb4g64h kv4r"
    # the footprint counts the keys' finer groups: 4 + 32/16 bits a key, 4 + 32/64 a value
    assert plan.shape(BASE).kv_bits_per_value == 4 + (2 + 0.5) / 2


def test_a_minmax_trial_quantizes_the_layers_and_the_embedding_on_the_minmax_grid():
    from slmsearch.compress.minmax import MinMaxQuant

    trial = FixedTrial({"drop_fraction": 0.0, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 4,
                        "embedding_group": 32, "embedding_grid": "minmax", "layer_grid": "minmax", "kv_cache_bits": 8,
                        "embedding_wide_fraction": 0.0})
    plan = suggest_plan(trial, SPACE, BASE)
    assert plan == Plan((EmbeddingQuant(bits=4, group_size=32, grid="minmax"), MinMaxQuant(bits=4, group_size=32),
                         KvCacheQuant(bits=8, group_size=64, key_group_size=16)))
    assert plan.label() == "emb4g32mm mm4g32 kv8"
    assert "gptq_bits" not in trial.params and "eora_rank" not in trial.params
    fmt = plan.shape(BASE).layers[0].linear_format
    assert (fmt.weight_bits, fmt.group_size, fmt.zero_bits) == (4, 32, 16)


def test_minmax_is_not_drawn_after_a_pattern_that_keeps_zeros():
    trial = FixedTrial({"drop_fraction": 0.0, "wanda_pattern": "unstructured", "sparsity": 0.3, "lora_rank": 0,
                        "embedding_bits": 16, "layer_grid": "minmax", "gptq_bits": 4, "group_size": 64, "act_order": False,
                        "eora_rank": 0, "kv_cache_bits": 16, "wider_fraction": 0.0})
    plan = suggest_plan(trial, SPACE, BASE)
    assert plan.get("minmax") is None and plan.get("gptq") is not None
    assert trial.user_attrs["repaired_params"]["layer_grid"] == ["minmax", "gptq"]
    assert most_compressed_plan(SPACE, BASE, pattern="unstructured", overrides={"layer_grid": "minmax"}).get("minmax")
