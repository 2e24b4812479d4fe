"""The KV-cache precision stage: the rounding kernel, the attention that reads rounded keys and
values, and the checkpoint that carries the width to every later load."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import DATA_DIR, TINY_CALIB
from slmsearch import checkpoint
from slmsearch.compress import kernels, kvcache
from slmsearch.compress.calib import CalibSettings
from slmsearch.compress.kvcache import KvCacheQuant
from slmsearch.compress.pipeline import run
from slmsearch.compress.plan import Plan
from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel import ModelShape

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7, 128, 64, 9, 11, 200, 13]])


def test_kernel_error_shrinks_with_width_and_group():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 40, 64) * torch.linspace(0.1, 4.0, 64)  # outlier channels, as keys have
    err = {(b, g): float((kernels.kv_fake_quant(x, b, g) - x).abs().mean()) for b in (8, 4) for g in (64, 16)}
    assert err[(8, 64)] < err[(4, 16)] < err[(4, 64)]
    assert err[(8, 16)] < err[(8, 64)]
    y = kernels.kv_fake_quant(x, 4, 16)
    # at most 2**4 distinct values per token and group, and the group's extremes kept to fp16 precision
    groups = y.reshape(-1, 16)
    assert max(len(torch.unique(row)) for row in groups[:50]) <= 16
    assert torch.allclose(groups.amin(dim=1), x.reshape(-1, 16).amin(dim=1), rtol=1e-3, atol=1e-3)


def test_kernel_rounds_each_token_alone():
    """A position's rounding does not depend on the others: the whole sequence at once equals the
    cache filled one position at a time (what makes a perplexity score the deployed model's)."""
    torch.manual_seed(1)
    x = torch.randn(1, 2, 9, 32)
    whole = kernels.kv_fake_quant(x, 4, 32)
    one_by_one = torch.cat([kernels.kv_fake_quant(x[:, :, i : i + 1], 4, 32) for i in range(9)], dim=2)
    assert torch.equal(whole, one_by_one)
    assert torch.allclose(kernels.kv_fake_quant(whole, 4, 32), whole, atol=1e-5)  # rounding twice changes nothing


def test_hadamard_is_orthonormal_and_rotation_spreads_an_outlier_channel():
    h = kernels.hadamard(64)
    assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
    assert torch.allclose(h.abs(), torch.full((64, 64), 1 / 8))
    with pytest.raises(SlmsearchError, match="power-of-two size, got 48"):
        kernels.hadamard(48)
    torch.manual_seed(2)
    x = torch.randn(1, 2, 50, 64)
    x[..., 5] *= 30  # one channel carries the range, as a rotary pair of keys does
    plain = (kernels.kv_fake_quant(x, 4, 64) - x).pow(2).mean()
    rotated = (kernels.kv_fake_quant(x, 4, 64, rotate=True) - x).pow(2).mean()
    assert rotated < 0.5 * plain
    # a rotated cache still rounds each token alone
    whole = kernels.kv_fake_quant(x, 4, 32, rotate=True)
    one = torch.cat([kernels.kv_fake_quant(x[:, :, i : i + 1], 4, 32, rotate=True) for i in range(50)], dim=2)
    assert torch.allclose(whole, one, atol=1e-6)


@pytest.mark.parametrize("bits,group,match", [(1, 16, "2 <= bits <= 8"), (4, 24, "group size 24 must divide the head size 64")])
def test_kernel_rejects_bad_settings(bits, group, match):
    with pytest.raises(SlmsearchError, match=match):
        kernels.kv_fake_quant(torch.zeros(1, 1, 2, 64), bits, group)


def _nll(model) -> float:
    with torch.no_grad():
        return float(model(PROMPT, labels=PROMPT).loss)


def test_install_changes_attention_by_the_width(tiny_base):
    model = checkpoint.load(tiny_base)[0]
    dense = _nll(model)
    with torch.no_grad():
        before = model(PROMPT).logits
    kvcache.install(model, 8, 16)
    with torch.no_grad():
        eight = model(PROMPT).logits
    kvcache.install(model, 4, 16)
    with torch.no_grad():
        four = model(PROMPT).logits
    d8, d4 = (eight - before).abs().max(), (four - before).abs().max()
    assert 0 < d8 < d4
    assert _nll(model) != dense


def test_generation_with_a_cache_matches_the_full_forward(tiny_base):
    """Decoding step by step through the cache scores the same tokens as one forward pass."""
    model = checkpoint.load(tiny_base)[0]
    kvcache.install(model, 4, 16)
    with torch.no_grad():
        full = model(PROMPT).logits[0, -1]
        out = model(PROMPT[:, :-1], use_cache=True)
        step = model(PROMPT[:, -1:], cache=out.past_key_values, use_cache=True).logits[0, -1]
    assert torch.allclose(full, step, atol=1e-4)


def test_checkpoint_records_the_width_and_every_load_applies_it(tiny_base, tmp_path):
    plan = Plan((KvCacheQuant(bits=4, group_size=16),))
    result = run(plan, str(tiny_base), DATA_DIR, CalibSettings(**TINY_CALIB), out=tmp_path / "kv4")
    meta = json.loads((result.checkpoint_dir / checkpoint.META_FILE).read_text())
    assert meta["kv_cache"] == {"bits": 4, "group_size": 16}
    loaded = checkpoint.load(result.checkpoint_dir)[0]
    assert loaded.config._attn_implementation == "slmsearch_kv4g16"
    reference = checkpoint.load(tiny_base)[0]
    kvcache.install(reference, 4, 16)
    with torch.no_grad():
        assert torch.equal(loaded(PROMPT).logits, reference(PROMPT).logits)
    shape = ModelShape.from_checkpoint(result.checkpoint_dir)
    assert (shape.kv_cache_bits, shape.kv_cache_group) == (4, 16)
    assert shape.kv_bits_per_value == 4 + 32 / 16


def test_keys_in_their_own_group_rotated_are_recorded_counted_and_applied(tiny_base, tmp_path):
    stage = KvCacheQuant(bits=4, group_size=16, key_group_size=8, rotate=True)
    assert stage.label() == "kv4r"
    result = run(Plan((stage,)), str(tiny_base), DATA_DIR, CalibSettings(**TINY_CALIB), out=tmp_path / "kv4r")
    meta = json.loads((result.checkpoint_dir / checkpoint.META_FILE).read_text())
    assert meta["kv_cache"] == {"bits": 4, "group_size": 16, "key_group_size": 8, "rotate": True}
    loaded = checkpoint.load(result.checkpoint_dir)[0]
    assert loaded.config._attn_implementation == "slmsearch_kv4g16k8r"
    reference = checkpoint.load(tiny_base)[0]
    kvcache.install(reference, 4, 16, 8, rotate=True)
    plain = checkpoint.load(tiny_base)[0]
    kvcache.install(plain, 4, 16)
    with torch.no_grad():
        logits = loaded(PROMPT).logits
        assert torch.equal(logits, reference(PROMPT).logits)
        assert not torch.equal(logits, plain(PROMPT).logits)
    shape = ModelShape.from_checkpoint(result.checkpoint_dir)
    assert (shape.kv_cache_group, shape.kv_key_group, shape.kv_cache_rotate) == (16, 8, True)
    assert shape.kv_bits_per_value == 4 + (32 / 8 + 32 / 16) / 2


def test_stage_settings_are_checked():
    with pytest.raises(SlmsearchError, match="kv_cache.bits must be one of 16, 8, 4, got 5"):
        KvCacheQuant(bits=5)
    with pytest.raises(SlmsearchError, match="kv_cache.group_size=32 must divide the head size 16"):
        Plan((KvCacheQuant(bits=4, group_size=32),)).check_fits(_tiny_shape())
    with pytest.raises(SlmsearchError, match="kv_cache.key_group_size=32 must divide the head size 16"):
        Plan((KvCacheQuant(bits=4, group_size=16, key_group_size=32),)).check_fits(_tiny_shape())
    with pytest.raises(SlmsearchError, match="kv_cache.key_group_size must be one of 8, 16, 32, 64, 128, got 24"):
        KvCacheQuant(bits=4, key_group_size=24)
    with pytest.raises(SlmsearchError, match="kv_cache.rotate must be true or false"):
        KvCacheQuant(bits=4, rotate=1)
    from slmsearch.hwmodel.shape import LayerShape

    odd = ModelShape(hidden=96, layers=(LayerShape(n_heads=4, n_kv_heads=2, head_dim=48, intermediate=128),), vocab_size=256)
    with pytest.raises(SlmsearchError, match="kv_cache.rotate needs a power-of-two head size, got 48"):
        Plan((KvCacheQuant(bits=4, group_size=16, rotate=True),)).check_fits(odd)


def _tiny_shape() -> ModelShape:
    from slmsearch.hwmodel.shape import LayerShape

    layer = LayerShape(n_heads=4, n_kv_heads=2, head_dim=16, intermediate=128)
    return ModelShape(hidden=64, layers=(layer,) * 2, vocab_size=256)


def test_memory_counts_scales_and_zeros():
    from slmsearch.hwmodel.memory import memory_report

    shape = _tiny_shape()
    fp16 = memory_report(shape, context_len=100).by_kind["kv_cache"]
    q = memory_report(shape.with_kv_cache_bits(4, 16), context_len=100).by_kind["kv_cache"]
    assert fp16 == 2 * 2 * 2 * 16 * 2 * 100  # layers x (K, V) x heads x head_dim x 2 bytes x positions
    assert q == fp16 * (4 + 2) // 16  # 4-bit values plus 32 bits of scale and zero per 16 values
    keys_finer = memory_report(shape.with_kv_cache_bits(4, 16, key_group=8), context_len=100).by_kind["kv_cache"]
    assert keys_finer == fp16 // 2 * (4 + 2) // 16 + fp16 // 2 * (4 + 4) // 16  # values as before, keys 4 + 32/8 bits


def test_rotation_is_priced_as_a_small_decode_cost():
    from slmsearch.hwmodel import load_platform
    from slmsearch.hwmodel.estimate import estimate
    from slmsearch.hwmodel.shape import smollm2_135m

    shape = smollm2_135m().with_kv_cache_bits(4, 64)
    siracusa = load_platform("siracusa")
    plain = estimate(shape, siracusa)
    rotated = estimate(shape.with_kv_cache_bits(4, 64, rotate=True), siracusa)
    assert plain.memory.total_bytes == rotated.memory.total_bytes
    ops = [r for r in rotated.decode.ops if r.name == "kv_rotate"]
    assert len(ops) == 30 and not any(r.name == "kv_rotate" for r in plain.decode.ops)
    assert plain.decode.latency_s < rotated.decode.latency_s < 1.01 * plain.decode.latency_s
