"""Properties the hardware model keeps for every shape: compressing a model never makes it slower
or costlier, and pinning more of it on chip never makes it slower."""

from __future__ import annotations

import random

import pytest

from slmsearch.hwmodel import TensorFormat, estimate, load_platform
from slmsearch.hwmodel.deployment import Deployment
from slmsearch.hwmodel.shape import llama32_1b, microllama, smollm2_135m

P = load_platform("siracusa")
REL = 1e-9


def _random_shape(rng: random.Random):
    base = rng.choice([smollm2_135m, llama32_1b])()
    shape = base.drop_layers(range(rng.randint(0, 8)))
    if rng.random() < 0.5:
        shape = shape.with_embedding_format(TensorFormat(rng.choice([8, 4]), 128))
    return shape


def _cost(shape, p=P, dep=None, ctx=256):
    e = estimate(shape, p, context_len=ctx, deployment=dep)
    return e.decode.latency_s, e.decode.energy_j_per_token


@pytest.mark.parametrize("seed", range(6))
def test_compressing_never_raises_latency_or_energy(seed):
    rng = random.Random(seed)
    shape = _random_shape(rng)
    dep = Deployment(rng.choice([16, 8]))
    lat, en = _cost(shape, dep=dep)
    steps = [
        shape.with_linear_format(TensorFormat(8, 128)),
        shape.with_linear_format(TensorFormat(4, 128)),
        shape.drop_layers([0, 1]),
        shape.with_embedding_format(TensorFormat(4, 128)),
        shape.prune_structured(mlp_channels_removed=256, kv_groups_removed=0),
    ]
    for smaller in steps:
        l2, e2 = _cost(smaller, dep=dep)
        assert l2 <= lat * (1 + REL) and e2 <= en * (1 + REL), (smaller, l2, lat, e2, en)
    # and fewer bits again, from 8 to 4 to 2
    prev = _cost(shape.with_linear_format(TensorFormat(8, 128)), dep=dep)
    for bits in (4, 3, 2):
        now = _cost(shape.with_linear_format(TensorFormat(bits, 128)), dep=dep)
        assert now[0] <= prev[0] * (1 + REL) and now[1] <= prev[1] * (1 + REL), bits
        prev = now


@pytest.mark.parametrize("shape_fn", [smollm2_135m, llama32_1b, microllama])
@pytest.mark.parametrize("act", [16, 8])
def test_pinning_more_on_chip_never_raises_latency(shape_fn, act):
    shape = shape_fn().with_linear_format(TensorFormat(4, 128))
    dep = Deployment(act)
    prev = None
    for mib in (0, 1, 2, 4):  # weight memory holding more and more of the model
        p = load_platform("siracusa", {"memory.weight_sram.size_bytes": mib * 2**20,
                                       "memory.weight_mram.size_bytes": mib * 2**20})
        lat = _cost(shape, p, dep)[0]
        if prev is not None:
            assert lat <= prev * (1 + REL), (mib, lat, prev)
        prev = lat


def test_pinning_the_head_first_puts_it_in_weight_memory():
    shape = smollm2_135m().with_linear_format(TensorFormat(4, 128)).with_embedding_format(TensorFormat(4, 128))
    layers = estimate(shape, P, context_len=256, deployment=Deployment(8, "layers"))
    head = estimate(shape, P, context_len=256, deployment=Deployment(8, "lm_head"))
    assert "l3" in layers.placement["embedding+lm_head"]
    assert head.placement["embedding+lm_head"].startswith("weight")
    assert head.memory.total_bytes == layers.memory.total_bytes
