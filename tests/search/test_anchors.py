"""Anchor plans of the default study: feasible, at least 3-bit, and the fewest dropped layers."""

from __future__ import annotations

import dataclasses

from slmsearch.hwmodel import estimate, load_platform
from slmsearch.hwmodel.shape import smollm2_135m
from slmsearch.search.anchors import anchor_params
from slmsearch.search.config import load_study_config
from slmsearch.search.space import base_dims, plan_from_params


def test_default_study_anchors_fit_with_the_fewest_dropped_layers():
    config = load_study_config(None)
    base, platform = smollm2_135m(), load_platform(config.platform)

    def footprint(shape):
        return estimate(shape, platform, context_len=config.context_len).memory.total_bytes / 1e6

    anchors = anchor_params(config.space, base, footprint, config.budget_mb)
    assert [a["gptq_bits"] for a in anchors] == [4, 3]
    dims, n = base_dims(base), len(base.layers)
    for params in anchors:
        assert footprint(plan_from_params(params, config.space, dims, n).shape(base)) <= config.budget_mb
        one_less = dict(params, drop_layers=params["drop_layers"] - 1)
        assert footprint(plan_from_params(one_less, config.space, dims, n).shape(base)) > config.budget_mb
        assert params["group_size"] in (32, 64) and params["lora_rank"] in config.space.lora_ranks
    # a budget nothing 3-bit or wider can meet: no anchors (the sampler is on its own)
    assert anchor_params(config.space, base, footprint, 30.0) == []
    narrow = dataclasses.replace(config.space, gptq_bits=(2, 16))
    assert anchor_params(narrow, base, footprint, config.budget_mb) == []
