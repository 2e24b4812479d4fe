"""Sampling under the budget (search/budget.py): every proposed plan fits, the size fractions place
the plan between the fewest drops that fit and the most widening that fits, never-feasible choices
are not offered, and a combination that fits at no depth is repaired and says so."""

from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.trial import FixedTrial

from slmsearch.hwmodel.estimate import footprint_bytes
from slmsearch.hwmodel.shape import smollm2_135m
from slmsearch.search.budget import REPAIRED_ATTR, WIDE_ROW_STEP, feasible_space
from slmsearch.search.config import SpaceConfig
from slmsearch.search.space import most_compressed_plan, suggest_plan

BASE = smollm2_135m()
SPACE = SpaceConfig()


def fits_within(mb: float):
    def fits(plan):
        return footprint_bytes(plan.shape(BASE), context_len=512) / 1e6 <= mb

    return fits


def filtered(mb: float) -> SpaceConfig:
    return feasible_space(SPACE, lambda o: [most_compressed_plan(SPACE, BASE, pattern=p, overrides=o) for p in SPACE.wanda_patterns],
                          fits_within(mb))


def test_choices_no_plan_can_fit_are_not_offered():
    space = filtered(64)
    assert space.gptq_bits == (2, 3, 4, 8)  # 16-bit layers never fit; 8-bit ones only with 12 dropped and half the MLP
    assert space.embedding_bits == (8, 4)  # the 57 MB fp16 embedding never fits
    assert filtered(40).gptq_bits == (2, 3, 4)
    assert filtered(1000) == SPACE  # a loose budget removes nothing


def repaired_share(mb: float, n: int = 120) -> float:
    """Sample ``n`` plans at random under ``mb``: each fits; the share that needed repair."""
    fits, space = fits_within(mb), filtered(mb)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=int(mb)))
    repaired = 0
    for _ in range(n):
        trial = study.ask()
        plan = suggest_plan(trial, space, BASE, fits=fits)
        assert fits(plan), plan.label()
        repaired += REPAIRED_ATTR in trial.user_attrs
        study.tell(trial, 0.0)
    return repaired / n


def test_no_sampled_plan_is_over_budget():
    shares = [repaired_share(mb) for mb in (48, 64, 128)]
    # a tighter budget leaves fewer combinations that fit as proposed
    assert shares[0] > shares[1] > shares[2]


def _fixed(**over):
    params = {"drop_fraction": 0.0, "wanda_pattern": "none", "lora_rank": 0, "embedding_bits": 4, "embedding_group": 64,
              "gptq_bits": 3, "group_size": 64, "act_order": False, "eora_rank": 0, "kv_cache_bits": 4, "wider_fraction": 0.0,
              "embedding_grid": "sym", "layer_grid": "gptq", "embedding_wide_fraction": 0.0}
    return FixedTrial({**params, **over})


def test_the_fractions_span_the_room_the_budget_leaves():
    fits = fits_within(64)
    none = suggest_plan(_fixed(), SPACE, BASE, fits=fits)
    assert none.get("depth") is None and none.get("gptq").wider_layers == 0  # 3-bit fits 64 MB without dropping
    full = suggest_plan(_fixed(wider_fraction=1.0), SPACE, BASE, fits=fits)
    k = full.get("gptq").wider_layers
    assert k > 0 and fits(full)
    more = dataclasses.replace(full.get("gptq"), wider_layers=k + 1)
    assert not fits(type(full)(tuple(more if s.kind == "gptq" else s for s in full.stages)))
    half = suggest_plan(_fixed(wider_fraction=0.5), SPACE, BASE, fits=fits)
    assert half.get("gptq").wider_layers == round(0.5 * k)
    deepest = suggest_plan(_fixed(drop_fraction=1.0), SPACE, BASE, fits=fits)
    assert deepest.get("depth").n_dropped == SPACE.drop_layers[1]
    # 4-bit needs layers dropped at 64 MB: drop_fraction 0 is the fewest that fit
    four = suggest_plan(_fixed(gptq_bits=4), SPACE, BASE, fits=fits)
    fewest = four.get("depth").n_dropped
    assert fewest > 0 and fits(four)


def test_the_embeddings_8_bit_rows_fill_the_room_left_after_the_layers():
    fits = fits_within(96)
    minmax = {"layer_grid": "minmax", "embedding_group": 32, "embedding_grid": "minmax", "kv_cache_bits": 8}
    none = suggest_plan(_fixed(**minmax), SPACE, BASE, fits=fits)
    assert none.get("embedding").wide_rows == 0
    full = suggest_plan(_fixed(**minmax, embedding_wide_fraction=1.0), SPACE, BASE, fits=fits)
    rows = full.get("embedding").wide_rows
    assert rows > 0 and rows % WIDE_ROW_STEP == 0 and fits(full)
    assert full.label() == f"emb4g32mm+{rows // 1024}k8 mm4g32 kv8"
    over = dataclasses.replace(full.get("embedding"), wide_rows=rows + WIDE_ROW_STEP)
    assert not fits(type(full)(tuple(over if s.kind == "embedding" else s for s in full.stages)))
    half = suggest_plan(_fixed(**minmax, embedding_wide_fraction=0.5), SPACE, BASE, fits=fits)
    assert half.get("embedding").wide_rows == round(0.5 * rows / WIDE_ROW_STEP) * WIDE_ROW_STEP
    # the layers are placed first: a GPTQ plan widening every layer it can leaves the rows less room
    widened = suggest_plan(_fixed(gptq_bits=4, group_size=64, wider_fraction=1.0, embedding_wide_fraction=1.0), SPACE, BASE,
                           fits=fits)
    plain = suggest_plan(_fixed(gptq_bits=4, group_size=64, wider_fraction=0.0, embedding_wide_fraction=1.0), SPACE, BASE,
                         fits=fits)
    assert widened.get("gptq").wider_layers > 0 and fits(widened) and fits(plain)
    assert widened.get("embedding").wide_rows < plain.get("embedding").wide_rows


def test_a_combination_that_fits_at_no_depth_is_repaired_and_recorded():
    trial = _fixed(embedding_bits=8, gptq_bits=4, eora_rank=32, kv_cache_bits=16)
    plan = suggest_plan(trial, SPACE, BASE, fits=fits_within(48))
    assert fits_within(48)(plan)
    repaired = trial.user_attrs[REPAIRED_ATTR]
    assert repaired["eora_rank"] == [32, 0] and repaired["kv_cache_bits"] == [16, 4]
    assert plan.get("eora") is None and plan.get("kv_cache").bits == 4
