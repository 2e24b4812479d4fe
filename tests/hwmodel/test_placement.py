"""Placement policy: activations and KV cache in L2 first, weights fill the weight memories, then
L2, then off chip (siracusa levels: l1, weight_sram, weight_mram, l2, l3)."""

import pytest

from slmsearch.hwmodel import estimate, load_platform
from slmsearch.hwmodel.placement import fill, place
from slmsearch.hwmodel.shape import microllama, smollm2_135m

P = load_platform("siracusa")
SRAM, MRAM, L2, L3 = 1, 2, 3, 4
L2_USABLE = 2097152 - 262144
WMEM = 4194304  # each weight memory


def test_fill_straddles_levels_in_order_and_the_last_level_takes_the_excess():
    assert fill([3, 5, 4, 0], [(0, 4), (1, 6), (2, 0)]) == [
        ((0, 1.0),), ((0, 0.2), (1, 0.8)), ((1, 0.5), (2, 0.5)), ((2, 1.0),)]
    assert fill([10], [(7, 3)]) == [((7, 1.0),)]  # one level: it takes everything


def test_weights_fill_weight_memories_then_l2_then_offchip():
    groups = (("norms", 1000), ("layers.0.attn", 3_000_000), ("layers.0.mlp", 3_000_000),
              ("embedding+lm_head", 4_000_000))
    act = L2_USABLE - 1_000_000
    pl = place(P, groups, [500_000, 500_000], act)
    assert pl.kv_split == (((L2, 1.0),), ((L2, 1.0),))  # the KV cache fills what activations leave of L2
    assert pl.level_of(P, "norms") == "weight_sram" and pl.level_of(P, "layers.0.attn") == "weight_sram"
    assert pl.level_of(P, "layers.0.mlp") == "weight_sram+weight_mram"
    assert pl.level_of(P, "embedding+lm_head") == "weight_mram+l3"  # L2 is full
    spill = 4_000_000 - (2 * WMEM - 6_001_000)
    assert pl.used_bytes == (0, WMEM, WMEM, L2_USABLE, spill)
    assert pl.offchip_bytes_per_token == spill
    assert not pl.on_chip and pl.fits
    with pytest.raises(KeyError):
        pl.level_of(P, "layers.1.attn")


def test_kv_cache_spills_to_offchip_and_an_untied_embedding_is_not_streamed_per_token():
    groups = (("norms", 1000), ("lm_head", 2 * WMEM), ("embedding", 1_000_000))
    pl = place(P, groups, [500_000, 500_000], L2_USABLE - 500_000)
    assert pl.kv_split == (((L2, 1.0),), ((L3, 1.0),))
    assert pl.level_of(P, "embedding") == "l3"
    assert pl.offchip_bytes_per_token == 1000  # the lm_head's overflow; the embedding is read one row a token
    too_big = place(P, groups, [0], L2_USABLE + 1)  # activations alone overflow L2
    assert not too_big.fits


def test_a_model_that_fits_on_chip_moves_no_offchip_bytes():
    e = estimate(microllama(), P, context_len=128, prefill_len=16)
    assert e.placement_detail.on_chip and e.placement_detail.used_bytes[L3] == 0
    for pas in (e.decode, e.prefill):
        assert all("l3" not in r.level_bytes for r in pas.ops)
        assert not any(k.startswith("stream:") for k in pas.cycles_by_bound)
        assert "memory:l3" not in pas.energy_by
    big = estimate(smollm2_135m(), P, context_len=128)
    assert not big.placement_detail.on_chip
    assert big.decode.cycles_by_bound.get("stream:l3", 0) > 0
