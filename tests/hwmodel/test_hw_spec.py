"""SpecEstimator (plan specs, no shape per call) against the full report and estimate_fast."""

import random

import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel import LayerShape, ModelShape, TensorFormat, estimate, estimate_fast, load_platform
from slmsearch.hwmodel.estimator import SpecEstimator
from slmsearch.hwmodel.shape import llama32_1b, microllama, smollm2_135m
from slmsearch.hwmodel.spec import ShapeSpec, format_key, sparsity_key, spec_shape

CONTEXTS = (0, 1, 7, 256, 512, 1024, 2048, 4096, 8192)


def _platforms():
    return {
        "siracusa": load_platform("siracusa"),
        "generic_mcu": load_platform("generic_mcu"),
        "small_sram": load_platform("siracusa", {"memory.weight_sram.size_bytes": 1_000_000,
                                                 "memory.weight_mram.size_bytes": 0}),
        "no_dbuf": load_platform("siracusa", {"tiling.double_buffering": 0}),
        "untiled": load_platform("siracusa", {"tiling.enabled": 0}),
        "slow_l3_no_npu": load_platform("siracusa", {"memory.l3.read_bw_bytes_per_cycle": 0.2, "npu.enabled": 0}),
    }


def _nonuniform() -> ModelShape:
    base = smollm2_135m()
    other = LayerShape(9, 3, 64, 1024, linear_format=TensorFormat(8, 128))
    return ModelShape(hidden=576, layers=base.layers[:10] + (other,) * 5 + base.layers[15:],
                      vocab_size=base.vocab_size, name="mixed")


def _bases():
    s = smollm2_135m()
    return {
        "smollm2": s,
        "llama1b": llama32_1b(),
        "microllama": microllama(),  # 8-bit activations and weights: N-EUREKA (shape path) where enabled
        "smollm2_act8": s.with_activation_bits(8),
        "smollm2_kv8_untied": ModelShape(hidden=s.hidden, layers=s.layers, vocab_size=s.vocab_size,
                                         tie_word_embeddings=False, kv_cache_bits=8),
        "mixed": _nonuniform(),
    }


def _random_spec(rng: random.Random, base: ModelShape) -> ShapeSpec:
    n = base.n_layers
    r = rng.random()
    if r < 0.55:
        drop = rng.randrange(0, n)
    elif r < 0.9:
        drop = tuple(rng.randrange(0, n) for _ in range(rng.randrange(0, n)))  # repeats allowed
    else:
        drop = n if rng.random() < 0.5 else tuple(range(n))  # every layer
    inter = min(x.intermediate for x in base.layers)
    kv = min(x.n_kv_heads for x in base.layers)
    prune = (0, 0)
    if rng.random() < 0.35:
        prune = (rng.choice([c for c in (0, 32, 64, 256, 512) if c < inter]), rng.choice((0, 1)) if kv > 1 else 0)
    sparsity = None
    if rng.random() < 0.4:
        fmt = rng.choice(("2:4", "4:8", "unstructured"))
        sparsity = sparsity_key(fmt, None if ":" in fmt else rng.choice((0.3, 0.45, 0.5, 0.7)))
    emb = None
    if base.vocab_size and rng.random() < 0.6:
        emb = (rng.choice((2, 4, 8)), rng.choice((None, 32, 64, 128)), 16, 0, 0)
    linear = None
    if rng.random() < 0.75:
        bits = rng.choice((2, 3, 4, 8))
        linear = (bits, rng.choice((None, 32, 64, 128)), 16, bits, 32)
        if rng.random() < 0.1:
            linear = format_key(TensorFormat(8, None, 0, 0))
    adapter = None
    if rng.random() < 0.35:
        adapter = (rng.choice((0, 8, 16, 32)), 16)
    return ShapeSpec(drop, emb, prune, sparsity, linear, adapter)


def _counting(est: SpecEstimator) -> list:
    """Count the calls that take the shape path (spec_shape + estimate_fast)."""
    calls: list = []
    general = est._general

    def wrapped(spec, ctx):
        calls.append(spec)
        return general(spec, ctx)

    est._general = wrapped
    return calls


def test_spec_estimator_equals_full_report_on_random_plans():
    rng = random.Random(7)
    platforms = _platforms()
    bases = _bases()
    n_fast = 0
    for bname, base in bases.items():
        for pname, p in platforms.items():
            est = SpecEstimator(base, p)
            general = _counting(est)
            n = 12 if bname in ("smollm2", "llama1b") else 4
            for _ in range(n):
                spec = _random_spec(rng, base)
                shape = spec_shape(base, spec)
                for ctx in rng.sample(CONTEXTS, 2):
                    fb, fs = est(spec, ctx)
                    full = estimate(shape, p, context_len=ctx)
                    assert fb == full.memory.total_bytes, (bname, pname, spec, ctx)
                    assert fs == pytest.approx(full.decode.latency_s, rel=1e-9), (bname, pname, spec, ctx)
            if bname in ("smollm2", "llama1b", "smollm2_kv8_untied"):
                n_fast += 2 * n - len(general)
    assert n_fast > 200  # the closed form answered most of them


@pytest.mark.parametrize("bname", ["smollm2", "llama1b", "smollm2_act8", "smollm2_kv8_untied", "mixed", "microllama"])
def test_spec_estimator_is_estimate_fast_bit_for_bit(bname):
    rng = random.Random(hash(bname) % 1000)
    base = _bases()[bname]
    for p in _platforms().values():
        est = SpecEstimator(base, p)
        general = _counting(est)
        calls = empty = 0
        for _ in range(60):
            spec = _random_spec(rng, base)
            shape = spec_shape(base, spec)
            for ctx in rng.sample(CONTEXTS, 3):
                assert est(spec, ctx) == estimate_fast(shape, p, ctx), (spec, ctx)
                assert est(spec, ctx) == estimate_fast(shape, p, ctx)  # cached records agree
                calls += 2
                empty += 2 * (shape.n_layers == 0)
        if bname in ("smollm2", "llama1b", "smollm2_kv8_untied"):  # uniform, 16-bit activations
            assert len(general) == empty  # only the every-layer drops take the shape path
        if bname == "mixed":  # not one run of layers: the shape path
            assert len(general) == calls


def test_uniform_plans_take_the_closed_form_and_cover_its_branches():
    """On siracusa, SmolLM2 plans split the KV cache and the weights at every kind of point."""
    p = load_platform("siracusa")
    base = smollm2_135m()
    est = SpecEstimator(base, p)
    general = _counting(est)
    rng = random.Random(3)
    seen_split = set()
    for _ in range(400):
        spec = _random_spec(rng, base)
        if not isinstance(spec.drop, int) or spec.drop >= base.n_layers:
            continue
        ctx = rng.choice(CONTEXTS)
        assert est(spec, ctx) == estimate_fast(spec_shape(base, spec), p, ctx)
        seen_split.add(ctx)
    assert not general
    assert len(seen_split) == len(CONTEXTS)


def test_spec_shape_bad_input_raises_like_the_shape_methods():
    p = load_platform("siracusa")
    est = SpecEstimator(smollm2_135m(), p)
    with pytest.raises(SlmsearchError, match="layer indices to drop"):
        est(ShapeSpec(drop=(0, 30)), 256)
    with pytest.raises(SlmsearchError, match="layer indices to drop"):
        est(ShapeSpec(drop=31), 256)
    with pytest.raises(SlmsearchError, match="context_len"):
        est(ShapeSpec(drop=2), -1)
    with pytest.raises(SlmsearchError, match="context_len"):
        est(ShapeSpec(drop=2), True)
    with pytest.raises(SlmsearchError, match="weight_bits"):
        est(ShapeSpec(linear=(0, None, 16, 0, 32)), 256)
    with pytest.raises(SlmsearchError, match="cannot remove"):
        est(ShapeSpec(prune=(1536, 0)), 256)
    assert est(ShapeSpec(drop=()), 256) == est(ShapeSpec(), 256) == estimate_fast(smollm2_135m(), p, 256)


def _random_plan(rng: random.Random, n_layers: int):
    from slmsearch.compress.depth import DepthPrune
    from slmsearch.compress.embedding import EmbeddingQuant
    from slmsearch.compress.gptq import Eora, Gptq
    from slmsearch.compress.lora import LoraRecovery
    from slmsearch.compress.plan import Plan
    from slmsearch.compress.wanda import Wanda

    stages = []
    if rng.random() < 0.7:
        if rng.random() < 0.7:
            stages.append(DepthPrune(drop=rng.randrange(0, n_layers // 2)))
        else:
            stages.append(DepthPrune(indices=tuple(rng.sample(range(n_layers), rng.randrange(1, 8)))))
    r = rng.random()
    if r < 0.25:
        stages.append(Wanda(pattern="structured", mlp_fraction=rng.choice((0.0, 0.1, 0.25, 0.5)),
                            kv_groups=rng.choice((0, 1)), multiple=rng.choice((32, 64))))
    elif r < 0.45:
        stages.append(Wanda(pattern=rng.choice(("2:4", "4:8"))))
    elif r < 0.65:
        stages.append(Wanda(pattern="unstructured", sparsity=rng.choice((0.0, 0.3, 0.5, 0.6))))
    gptq = rng.random() < 0.7
    if not gptq and rng.random() < 0.4:
        stages.append(LoraRecovery(rank=rng.choice((0, 8, 16)), merge=rng.random() < 0.5))
    elif rng.random() < 0.3:
        stages.append(LoraRecovery(rank=8, merge=True))
    if rng.random() < 0.6:
        stages.append(EmbeddingQuant(bits=rng.choice((16, 8, 4)), group_size=rng.choice((None, 32, 64, 128))))
    if gptq:
        stages.append(Gptq(bits=rng.choice((2, 3, 4, 8)), group_size=rng.choice((-1, 32, 64, 128))))
        if rng.random() < 0.4:
            stages.append(Eora(rank=rng.choice((0, 16, 32))))
    return Plan(tuple(stages))


def test_spec_from_plan_is_plan_shape():
    pytest.importorskip("torch")  # compress stages import torch (no model is loaded)
    from slmsearch.hwmodel.spec import spec_from_plan

    rng = random.Random(11)
    p = load_platform("siracusa")
    for base in (smollm2_135m(), llama32_1b()):
        est = SpecEstimator(base, p)
        for _ in range(150):
            plan = _random_plan(rng, base.n_layers)
            spec = spec_from_plan(plan, base)
            shape = plan.shape(base)
            assert spec_shape(base, spec) == shape, plan
            ctx = rng.choice(CONTEXTS)
            assert est(spec, ctx) == estimate_fast(shape, p, ctx)


@pytest.mark.parametrize("where", ["pair_boundary", "attention_boundary", "mid_attention", "mid_mlp"])
def test_weights_ending_exactly_at_a_group_boundary(where):
    """On-chip capacity sized so that it ends at a layer pair's start / its attention's end."""
    base = smollm2_135m()
    spec = ShapeSpec(drop=4, linear=(4, 128, 16, 4, 32))
    p0 = load_platform("siracusa")
    est0 = SpecEstimator(base, p0)
    est0(spec, 0)
    lay = est0._layers[spec[2:]]
    act, l2_free = est0._lc(lay, 0)[:2]
    norms = (2 * 26 + 1) * base.hidden * 2
    extra = {"pair_boundary": 0, "attention_boundary": lay.sa, "mid_attention": lay.sa // 3,
             "mid_mlp": lay.sa + 1000}[where]
    sram = norms + 5 * lay.pair + extra - l2_free
    p = load_platform("siracusa", {"memory.weight_sram.size_bytes": sram, "memory.weight_mram.size_bytes": 0})
    est = SpecEstimator(base, p)
    shape = spec_shape(base, spec)
    full = estimate(shape, p, context_len=0)
    fb, fs = est(spec, 0)
    assert (fb, fs) == estimate_fast(shape, p, 0)
    assert fb == full.memory.total_bytes
    assert fs == pytest.approx(full.decode.latency_s, rel=1e-9)
    expected = {"pair_boundary": ("l3", "l3"), "attention_boundary": ("l2", "l3"),
                "mid_attention": ("l2+l3", "l3"), "mid_mlp": ("l2", "l2+l3")}[where]
    got = (full.placement["layers.5.attn"], full.placement["layers.5.mlp"])
    assert full.placement["layers.4.mlp"].endswith("l2")  # on chip (the SRAM / L2 edge may split it)
    assert got == expected


def test_records_follow_the_platform_object_not_its_uid():
    """A platform with another's uid (dataclasses.replace, or unpickled from another process)
    gets its own records; a pickled estimator answers the same."""
    import dataclasses
    import pickle

    p = load_platform("siracusa")
    slow = dataclasses.replace(load_platform("siracusa", {"memory.l3.read_bw_bytes_per_cycle": 0.2,
                                                          "npu.enabled": 0}), uid=p.uid)
    spec = ShapeSpec(drop=3, embedding=(4, None, 16, 0, 0), linear=(4, 128, 16, 4, 32))
    shape = spec_shape(smollm2_135m(), spec)
    assert estimate_fast(shape, p, 512) == SpecEstimator(smollm2_135m(), p)(spec, 512)
    fresh = spec_shape(smollm2_135m(), spec)
    full = estimate(fresh, slow, context_len=512)
    fb, fs = estimate_fast(fresh, slow, 512)
    assert fb == full.memory.total_bytes and fs == pytest.approx(full.decode.latency_s, rel=1e-9)
    est = SpecEstimator(smollm2_135m(), slow)
    assert est(spec, 512) == (fb, fs)
    again = pickle.loads(pickle.dumps(est))
    assert again._layers == {} and again(spec, 512) == (fb, fs)
