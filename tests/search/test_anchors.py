"""Anchor plans of the default study: feasible, at least 3-bit, the fewest dropped layers, and as
many layers widened as then fit."""

from __future__ import annotations

import dataclasses

from slmsearch.hwmodel.estimate import footprint_bytes
from slmsearch.hwmodel.shape import smollm2_135m
from slmsearch.search.anchors import anchor_params, anchor_plan
from slmsearch.search.budget import WIDE_ROW_STEP
from slmsearch.search.config import load_study_config
from slmsearch.search.space import base_dims, plan_from_params


def budget(config, base, mb):
    def fits(plan):
        return footprint_bytes(plan.shape(base), context_len=config.context_len) / 1e6 <= mb

    return fits


def test_default_study_anchors_fit_with_the_fewest_dropped_layers_and_the_most_widened():
    config = load_study_config(None)
    base = smollm2_135m()
    fits = budget(config, base, config.budget_mb)
    anchors = anchor_params(config.space, base, fits)
    assert [a["gptq_bits"] for a in anchors] == [3, 4]  # 3-bit drops none at 64 MB, 4-bit drops 6
    dims, n = base_dims(base), len(base.layers)
    for params in anchors:
        plan = anchor_plan(params, config.space, base, fits)
        assert fits(plan)
        drop = plan.get("depth").n_dropped if plan.get("depth") else 0
        wider = plan.get("gptq").wider_layers
        rows = plan.get("embedding").wide_rows
        placed = {**params, "lora_steps": config.space.lora_steps, "drop_layers": drop, "gptq_wider_layers": wider,
                  "embedding_wide_rows": rows}
        assert plan_from_params(placed, config.space, dims, n) == plan
        # the room left is filled with the embedding's 8-bit rows: one more step does not fit
        assert not fits(plan_from_params({**placed, "embedding_wide_rows": rows + WIDE_ROW_STEP}, config.space, dims, n))
        if drop:  # one layer fewer dropped does not fit, even with nothing widened
            assert not fits(plan_from_params({**placed, "drop_layers": drop - 1, "gptq_wider_layers": 0}, config.space, dims, n))
        if wider < n - drop:  # one more layer widened does not fit
            assert not fits(plan_from_params({**placed, "gptq_wider_layers": wider + 1, "embedding_wide_rows": 0},
                                             config.space, dims, n))
        assert params["group_size"] in (32, 64) and params["lora_rank"] in config.space.lora_ranks
        for group in config.space.embedding_groups:  # no other embedding group drops fewer, or widens more
            other = anchor_plan({**params, "embedding_group": group}, config.space, base, fits)
            if fits(other):
                o_drop = other.get("depth").n_dropped if other.get("depth") else 0
                assert (o_drop, -other.get("gptq").wider_layers) >= (drop, -wider), (group, other.label())
    # 8-bit scale codes leave room for 7 layers at 4 bits (4 with fp16 scales; g32 widens fewer)
    assert anchor_plan(anchors[0], config.space, base, fits).label() == "emb4g64h+1k8 w3+7g64s8 kv4"
    # a budget nothing 3-bit or wider can meet: no anchors (the sampler is on its own)
    assert anchor_params(config.space, base, budget(config, base, 30.0)) == []
    narrow = dataclasses.replace(config.space, gptq_bits=(2, 16))
    assert anchor_params(narrow, base, fits) == []


def test_the_minmax_anchor_keeps_every_layer_and_spends_the_room_where_it_costs_least():
    """At 96 and 128 MB on SmolLM2-135M a minmax plan fits with all 30 layers: it comes first, with
    the KV cache and embedding of the least prior cost that fit (96: a 16-bit KV cache and a 4-bit
    embedding on the symmetric grid would fit, but 8-bit KV with the minmax embedding costs less;
    128: an 8-bit embedding and a 16-bit KV cache, not a 16-bit embedding with a 4-bit one); at 64 MB
    it does not fit undropped and the GPTQ anchors stay as they were."""
    config = load_study_config(None)
    base = smollm2_135m()
    labels = {}
    for mb in (64, 96, 128):
        fits = budget(config, base, mb)
        anchors = anchor_params(config.space, base, fits)
        plans = [anchor_plan(a, config.space, base, fits) for a in anchors]
        assert all(fits(p) for p in plans)
        labels[mb] = [p.label() for p in plans]
    assert not any("mm4g32" in label for label in labels[64])
    assert labels[96][0] == "emb4g32mm+16k8 mm4g32 kv8" and labels[128][0] == "emb8g32h mm4g32"
    assert len(labels[96]) == len(labels[128]) == 2 and "mm4g32" not in labels[96][1]
