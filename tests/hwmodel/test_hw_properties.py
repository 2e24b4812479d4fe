"""Properties of the hardware model (item 6 of the issue), parametrized over reference shapes."""

import pytest

from slmsearch.hwmodel import TensorFormat, estimate, estimate_fast, load_platform
from slmsearch.hwmodel.shape import llama32_1b, microllama, smollm2_135m

P = load_platform("siracusa")
SHAPES = {"smollm2": smollm2_135m(), "llama1b": llama32_1b(), "microllama": microllama()}
Q4 = TensorFormat(weight_bits=4, group_size=128)


def _decode_and_mem(shape, platform=P, ctx=256):
    e = estimate(shape, platform, context_len=ctx, prefill_len=32)
    return e.memory.total_bytes, e.decode.latency_s, e.prefill.latency_s


def _variants(shape):
    """(smaller, larger) pairs: the first is the second compressed a bit more."""
    q8 = TensorFormat(weight_bits=8, group_size=128)
    q4 = shape.with_linear_format(Q4)
    yield "drop_first", shape.drop_layers([0]), shape
    yield "drop_last", shape.drop_layers([shape.n_layers - 1]), shape
    yield "drop_from_q4", q4.drop_layers([1]), q4
    yield "mlp_channels", shape.prune_structured(32, 0), shape
    if shape.layers[0].n_kv_heads > 1:
        yield "kv_group", shape.prune_structured(0, 1), shape
    yield "16->8 bit", shape.with_linear_format(q8), shape.with_linear_format(TensorFormat(16))
    yield "8->4 bit", q4, shape.with_linear_format(q8)
    yield "4->2 bit", shape.with_linear_format(TensorFormat(2, 128)), q4
    if shape.vocab_size:
        yield "emb 16->4", shape.with_embedding_format(Q4), shape
    yield "kv 16->8", shape.with_kv_cache_bits(8), shape.with_kv_cache_bits(16)


CASES = [(n, v, s, b) for n, s in SHAPES.items() for v, s, b in _variants(s)]


@pytest.mark.parametrize("platform", ["siracusa", "generic_mcu"])
@pytest.mark.parametrize("name,variant,small,big", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_compressing_never_increases_memory_or_latency(platform, name, variant, small, big):
    p = load_platform(platform)
    ms, ds, ps = _decode_and_mem(small, p)
    mb, db, pb = _decode_and_mem(big, p)
    assert ms <= mb
    assert ds <= db * (1 + 1e-12)
    assert ps <= pb * (1 + 1e-12)


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


def test_model_on_chip_does_no_offchip_traffic():
    e = estimate(microllama(), P, context_len=128, prefill_len=16)
    assert e.placement_detail.on_chip
    for pas in (e.decode, e.prefill):
        assert all("l3" not in r.level_bytes for r in pas.ops)
        assert not any(k.startswith("stream:") for k in pas.cycles_by_bound)
        assert "memory:l3" not in pas.energy_by
    big = estimate(smollm2_135m(), P, context_len=128)
    assert not big.placement_detail.on_chip
    assert big.decode.cycles_by_bound.get("stream:l3", 0) > 0


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


def test_fast_path_equals_full_report():
    p2 = load_platform("siracusa", {"memory.weight_sram.size_bytes": 1_000_000})
    for shape in list(SHAPES.values()) + [smollm2_135m().with_linear_format(Q4).drop_layers([3, 4]),
                                          smollm2_135m().with_adapter(16).with_sparsity("2:4")]:
        for p in (P, p2, load_platform("generic_mcu")):
            for ctx in (0, 1, 100, 512, 4096):
                full = estimate(shape, p, context_len=ctx)
                fb, fs = estimate_fast(shape, p, ctx)
                assert fb == full.memory.total_bytes
                assert fs == pytest.approx(full.decode.latency_s, rel=1e-9)
                assert estimate_fast(shape, p, ctx) == (fb, fs)  # memo hit agrees


def test_report_rows_name_engine_and_bound():
    e = estimate(smollm2_135m().with_linear_format(TensorFormat(8, 128)).with_activation_bits(8), P,
                 context_len=64, prefill_len=64)
    engines = {r.engine for r in e.prefill.ops}
    assert engines == {"cluster", "npu"}  # 8-bit weights + 8-bit activations use N-EUREKA
    assert all(r.bound for r in e.decode.ops)
    assert e.decode.energy_j_per_token > 0 and e.decode.tokens_per_s > 0
    d = e.to_dict()
    import json

    json.dumps(d)


def _random_shapes(rng, n):
    """Shapes the way plans build them, plus non-uniform ones (per-layer differences, drops)."""
    from slmsearch.hwmodel import LayerShape, ModelShape

    bases = [smollm2_135m(), llama32_1b(), microllama(), smollm2_135m().with_activation_bits(8)]
    for _ in range(n):
        s = rng.choice(bases)
        if rng.random() < 0.3:  # non-uniform: every layer its own (equal or pruned) object
            layers = []
            for layer in s.layers:
                if rng.random() < 0.5:
                    inter = max(8, layer.intermediate - rng.choice((0, 32, 256)))
                    kv = layer.n_kv_heads - (1 if layer.n_kv_heads > 1 and rng.random() < 0.3 else 0)
                    layer = LayerShape(layer.n_heads // layer.n_kv_heads * kv, kv, layer.head_dim, inter,
                                       linear_format=TensorFormat(rng.choice((2, 4, 8, 16)), 128))
                else:
                    layer = LayerShape(layer.n_heads, layer.n_kv_heads, layer.head_dim, layer.intermediate,
                                       layer.linear_format)  # equal value, distinct object
                layers.append(layer)
            s = ModelShape(hidden=s.hidden, layers=tuple(layers), vocab_size=s.vocab_size,
                           tie_word_embeddings=rng.random() < 0.5, activation_bits=s.activation_bits)
        if rng.random() < 0.7:
            k = rng.randrange(0, s.n_layers)
            s = s.drop_layers(range(k) if rng.random() < 0.5 else rng.sample(range(s.n_layers), k))
        r = rng.random()
        if r < 0.25 and s.layers and min(x.intermediate for x in s.layers) > 64:
            kv_ok = min(x.n_kv_heads for x in s.layers) > 1
            s = s.prune_structured(rng.choice((0, 32, 64)), rng.choice((0, 1)) if kv_ok else 0)
        elif r < 0.5:
            s = s.with_sparsity(rng.choice(("2:4", "4:8", "unstructured")), 0.5)
        if s.vocab_size and rng.random() < 0.6:
            s = s.with_embedding_format(TensorFormat(rng.choice((2, 4, 8)), rng.choice((None, 64)), zero_bits=0))
        if rng.random() < 0.8:
            bits = rng.choice((2, 3, 4, 8))
            s = s.with_linear_format(TensorFormat(bits, rng.choice((None, 32, 128)), 16, bits, 32))
        if rng.random() < 0.3:
            s = s.with_adapter(rng.choice((8, 16)), 16)
        if rng.random() < 0.2:
            s = s.with_kv_cache_bits(8)
        yield s


def test_fast_path_equals_full_report_on_random_shapes():
    import random

    rng = random.Random(1)
    platforms = [
        P, load_platform("generic_mcu"),
        load_platform("siracusa", {"memory.weight_sram.size_bytes": 1_000_000, "memory.weight_mram.size_bytes": 0}),
        load_platform("siracusa", {"tiling.double_buffering": 0}),
        load_platform("siracusa", {"tiling.enabled": 0}),
        load_platform("siracusa", {"memory.l3.read_bw_bytes_per_cycle": 0.2, "npu.enabled": 0}),
    ]
    for shape in _random_shapes(rng, 60):
        for p in rng.sample(platforms, 3):
            for ctx in rng.sample((0, 1, 7, 128, 512, 2048, 8192), 2):
                full = estimate(shape, p, context_len=ctx)
                fb, fs = estimate_fast(shape, p, ctx)
                assert fb == full.memory.total_bytes
                assert fs == pytest.approx(full.decode.latency_s, rel=1e-12)


def test_transforms_share_layer_objects_and_keep_runs():
    import pickle

    base = smollm2_135m()
    a = base.drop_layers(range(3)).with_linear_format(Q4)
    b = base.drop_layers([5, 9, 0]).with_linear_format(TensorFormat(weight_bits=4, group_size=128))
    assert a == b and a.layers[0] is b.layers[0]  # one derived layer object for equal requests
    assert a.runs() == ((a.layers[0], 27),) and len(set(map(id, a.layers))) == 1
    mixed = base.prune_structured(0, 0)
    from slmsearch.hwmodel import ModelShape

    odd = ModelShape(hidden=576, layers=base.layers[:3] + (a.layers[0],) + base.layers[3:6],
                     vocab_size=base.vocab_size)
    assert [n for _, n in odd.runs()] == [3, 1, 3]
    dropped = odd.drop_layers([3])
    assert [n for _, n in dropped.runs()] == [6] and dropped.n_layers == 6
    assert mixed.runs()[0][1] == 30
    c = pickle.loads(pickle.dumps(a))
    assert c == a and c._cache == {} and "_m" not in c.layers[0].__dict__


def test_decode_reads_one_embedding_row_and_prefill_scores_the_full_matrix():
    from slmsearch.hwmodel.latency import causal_pairs

    s = smollm2_135m()
    for shape in (s, s.with_embedding_format(TensorFormat(4, None, zero_bits=0))):
        e = estimate(shape, P, context_len=64, prefill_len=16)
        row = [r for r in e.decode.ops if r.name == "embedding"]
        assert len(row) == 1 and row[0].layer is None and row[0].cycles > 0
        assert len([r for r in e.prefill.ops if r.name == "embedding"]) == 1
    from slmsearch.hwmodel.latency import embedding_ops

    op = embedding_ops(s.with_embedding_format(TensorFormat(4, None, zero_bits=0)), P, 1)[0]
    assert op.weight_bytes == 576 * 4 // 8 + 2  # one 4-bit row + its fp16 scale
    untied = s._replace(tie_word_embeddings=False)
    assert embedding_ops(untied, P, 3)[0].group == "embedding"
    assert embedding_ops(untied, P, 3)[0].weight_bytes == 3 * 576 * 2
    assert causal_pairs(1, 512) == 512 and causal_pairs(64, 64) == 64 * 64  # masked, not skipped
    pre = estimate(s, P, context_len=64, prefill_len=64).prefill
    scores = [r for r in pre.ops if r.name == "attn_scores"][0]
    layer = s.layers[0]
    assert scores.macs == layer.n_heads * layer.head_dim * 64 * 64
    values = [r for r in pre.ops if r.name == "attn_values"][0]
    assert values.macs == layer.n_heads * layer.head_dim * 64 * 64
