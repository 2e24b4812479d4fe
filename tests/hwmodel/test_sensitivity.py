from slmsearch.hwmodel import TensorFormat, estimate, load_platform
from slmsearch.hwmodel.sensitivity import estimate_range, format_sensitivity, sensitivity
from slmsearch.hwmodel.shape import microllama, smollm2_135m
from slmsearch.hwmodel.summary import deployment_pairs


def test_sensitivity_has_one_row_per_assumed_value_sorted_by_effect():
    p = load_platform("siracusa")
    shape = smollm2_135m().with_linear_format(TensorFormat(4, 128)).drop_layers(range(10))
    table = sensitivity(shape, p, context_len=128)
    assert {r["key"] for r in table} == {k for k, *_ in p.assumed_ranges()}
    effect = [max(abs(r[k]) for k in ("latency_at_low", "latency_at_high", "energy_at_low", "energy_at_high"))
              for r in table]
    assert effect == sorted(effect, reverse=True)
    assert table[0]["key"] == "memory.l3.read_bw_bytes_per_cycle"  # an L3-bound model
    assert "memory.l3.read_bw_bytes_per_cycle" in format_sensitivity(table)


def test_range_brackets_the_estimate_and_an_override_is_not_varied():
    p = load_platform("siracusa")
    shape = microllama()
    e = estimate(shape, p, context_len=64)
    r = estimate_range(shape, p, context_len=64)
    lo, hi = r["decode_latency_s_range"]
    assert lo <= e.decode.latency_s <= hi and lo < hi
    elo, ehi = r["energy_per_token_j_range"]
    assert elo <= e.decode.energy_j_per_token <= ehi and elo < ehi
    fixed = p.with_overrides({"memory.l3.read_bw_bytes_per_cycle": 1.0})
    assert "memory.l3.read_bw_bytes_per_cycle" not in {k for k, *_ in fixed.assumed_ranges()}


def test_same_footprint_deployments_that_price_apart_are_reported_with_the_reason():
    p = load_platform("siracusa")
    shape = smollm2_135m().with_linear_format(TensorFormat(4, 128)).with_embedding_format(
        TensorFormat(8, 128)).drop_layers(range(12))
    pairs = deployment_pairs(shape, p, 512)
    assert pairs
    for r in pairs:
        a, b = r["footprint_mb"]
        assert abs(a - b) <= 1.0 and max(r["latency_ratio"], r["energy_ratio"]) >= 1.2
        assert "activation_bits" in r["reason"]
