"""Bytes by kind: weights, quantization and sparsity metadata, adapters, KV cache, activation peak."""

import pytest

from slmsearch.hwmodel import ModelShape, TensorFormat, estimate, load_platform
from slmsearch.hwmodel.memory import KINDS, memory_report, peak_activation_bytes, static_bytes
from slmsearch.hwmodel.shape import llama32_1b, microllama, smollm2_135m

P = load_platform("siracusa")
SHAPES = {"smollm2": smollm2_135m(), "llama1b": llama32_1b(), "microllama": microllama()}
TINY = ModelShape.from_hf_config(dict(num_hidden_layers=3, hidden_size=32, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=8, intermediate_size=48, vocab_size=100,
                                      tie_word_embeddings=True))


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("group", [None, 32, 64, 128])
def test_4bit_is_quarter_of_16bit_plus_exact_scale_zero_overhead(shape, group):
    fmt = TensorFormat(weight_bits=4, group_size=group, scale_bits=16, zero_bits=4)
    shape = shape.with_linear_format(TensorFormat(16))
    base = estimate(shape, P, context_len=0).memory.by_kind
    q = estimate(shape.with_linear_format(fmt), P, context_len=0).memory.by_kind
    assert q["attention"] * 4 == base["attention"]
    assert q["mlp"] * 4 == base["mlp"]
    expected = 0
    for layer in shape.layers:
        for _, i, o in layer.proj_dims(shape.hidden):
            groups = o if group is None else o * -(-i // group)
            expected += groups * (16 + 4) // 8
    assert q["scales_zeros"] - base["scales_zeros"] == expected


def test_gptq_default_zero_convention_and_sparsity_metadata():
    shape = smollm2_135m()
    g = TensorFormat(weight_bits=4, group_size=128)  # zero_bits None -> packed at 4 bits
    assert g.zero_point_bits == 4
    dense = estimate(shape, P, context_len=0).memory.by_kind
    s24 = estimate(shape.with_sparsity("2:4"), P, context_len=0).memory.by_kind
    unst = estimate(shape.with_sparsity("unstructured", 0.5), P, context_len=0).memory.by_kind
    lin = dense["attention"] + dense["mlp"]
    assert s24["attention"] + s24["mlp"] == lin // 2
    assert s24["sparsity_metadata"] == (lin // 2 // 2) * 2 // 8  # 2-bit index per kept value
    assert unst["sparsity_metadata"] == lin // 2 // 8  # 1-bit mask per weight


def test_tiny_model_by_hand():
    # hidden 32, 3 layers of q 32, kv 16, MLP 48, tied 100 x 32 embedding; everything fp16
    per_layer = 2 * (32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 48)
    mem = memory_report(TINY, context_len=100)
    assert mem.by_kind["attention"] + mem.by_kind["mlp"] == 3 * per_layer
    assert mem.by_kind["embedding"] == 100 * 32 * 2 and mem.by_kind["lm_head"] == 0
    assert mem.by_kind["norms"] == (2 * 3 + 1) * 32 * 2
    assert mem.by_kind["kv_cache"] == 3 * 2 * 16 * 100 * 2  # K and V, 3 layers, 100 positions, 2 bytes
    # decode at 100 positions: the scores (q 32 + 2 x 4 heads x 100) are the largest operator
    assert mem.by_kind["activations_peak"] == (32 + 32 + 2 * 4 * 100) * 2
    assert mem.total_bytes == sum(mem.by_kind.values()) and list(mem.by_kind) == list(KINDS)
    assert sum(b for _, b in mem.weight_groups) == static_bytes(TINY).static_total
    assert [name for name, _ in mem.weight_groups] == [
        "norms", "layers.0.attn", "layers.0.mlp", "layers.1.attn", "layers.1.mlp", "layers.2.attn", "layers.2.mlp",
        "embedding+lm_head"]


def test_activation_peak_covers_prefill_and_kv_bits():
    # a 64-token prefill: residual 64 x 32 + the scores (64 x 32 + 2 x 4 heads x 64 x 64), larger than the MLP
    assert peak_activation_bytes(TINY, 64, 64) == (64 * 32 + 64 * 32 + 2 * 4 * 64 * 64) * 2
    assert peak_activation_bytes(TINY, 0, 0) == 0
    assert memory_report(TINY, 100, prefill_len=64).by_kind["activations_peak"] == peak_activation_bytes(TINY, 64, 64)
    assert memory_report(TINY.with_kv_cache_bits(4), 100).by_kind["kv_cache"] == 3 * 2 * 16 * 100 // 2
    untied = ModelShape(hidden=32, layers=TINY.layers, vocab_size=100, tie_word_embeddings=False,
                        lm_head_format=TensorFormat(8, None, zero_bits=0))
    mem = memory_report(untied, 0)
    assert mem.by_kind["lm_head"] == 100 * 32 and mem.weight_groups[-2:] == (
        ("lm_head", 100 * 32 + 100 * 2), ("embedding", 100 * 32 * 2))  # an 8-bit head + one fp16 scale per row
