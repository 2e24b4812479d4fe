"""The screening proxy (compress/proxy.py) on a tiny real LLaMA: what it rounds, what it scores."""

from __future__ import annotations

import pytest
import torch

from slmsearch.compress.calib import CalibSettings
from slmsearch.compress.depth import DepthPrune
from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch.compress.gptq import Gptq
from slmsearch.compress.kernels import rtn_codes, rtn_dequantize
from slmsearch.compress.kvcache import KvCacheQuant, install
from slmsearch.compress.plan import Plan
from slmsearch.compress.proxy import proxy_model, round_linears, score_plan, structural_part
from slmsearch.evals.wikitext import token_perplexity
from slmsearch.models import load_model

CALIB = CalibSettings(n_samples=2, seqlen=32, seed=0)


def test_round_linears_puts_each_layer_on_its_own_grid(tiny_llama):
    original = {n: m.weight.data.clone() for n, m in tiny_llama.named_modules() if isinstance(m, torch.nn.Linear)}
    round_linears(tiny_llama, (4, 16, 2, 4), 32, 0.0)
    for name, module in tiny_llama.named_modules():
        if not isinstance(module, torch.nn.Linear) or "layers." not in name:
            continue
        layer = int(name.split("layers.")[1].split(".")[0])
        bits = (4, 16, 2, 4)[layer]
        if bits == 16:
            assert torch.equal(module.weight.data, original[name])
            continue
        codes, scales = rtn_codes(original[name], bits, 32)
        assert torch.equal(module.weight.data, rtn_dequantize(codes, scales, bits, module.weight.dtype))
        for group in module.weight.data.reshape(module.weight.shape[0], -1, 32).reshape(-1, 32):
            assert group.unique().numel() <= 2**bits


def test_remembered_clip_scales_round_bit_for_bit_as_the_search(tiny_llama):
    """The clip search's scales are remembered by the weights' content: rounding the same weights
    again (another screen, or the same layer after other layers were dropped) reuses them and gives
    exactly what a fresh search gives; changed weights are searched afresh."""
    import copy

    from slmsearch.compress import proxy

    def linears(m):
        return {n: x.weight.data.clone() for n, x in m.named_modules() if isinstance(x, torch.nn.Linear) and "layers." in n}

    proxy._SCALES.clear()
    fresh = copy.deepcopy(tiny_llama)
    first = copy.deepcopy(fresh)
    round_linears(first, (3, 4, 3, 4), 32, 2.4)
    assert len(proxy._SCALES) == 4 * 7
    searched = dict(proxy._SCALES)
    second = copy.deepcopy(fresh)
    round_linears(second, (3, 4, 3, 4), 32, 2.4)
    assert len(proxy._SCALES) == 4 * 7 and all(proxy._SCALES[k] is v for k, v in searched.items())  # reused
    proxy._SCALES.clear()
    cold = copy.deepcopy(fresh)
    round_linears(cold, (3, 4, 3, 4), 32, 2.4)
    a, b, c = linears(first), linears(second), linears(cold)
    assert all(torch.equal(a[n], b[n]) and torch.equal(a[n], c[n]) for n in a)
    dropped = copy.deepcopy(fresh)  # layer 0 dropped: the others' scales are found again
    del dropped.model.layers[0]
    round_linears(dropped, (4, 3, 4), 32, 2.4)  # layers 1-3 at the widths they had
    assert len(proxy._SCALES) == 4 * 7
    other = copy.deepcopy(fresh)
    with torch.no_grad():
        other.model.layers[0].mlp.down_proj.weight.mul_(3.0)
    expected = copy.deepcopy(other)
    proxy._SCALES.clear()
    round_linears(expected, (3, 4, 3, 4), 32, 2.4)
    round_linears(other, (3, 4, 3, 4), 32, 2.4)
    assert torch.equal(linears(other)["model.layers.0.mlp.down_proj"], linears(expected)["model.layers.0.mlp.down_proj"])


def test_structural_part_keeps_depth_and_wanda_only():
    plan = Plan((DepthPrune(drop=1), EmbeddingQuant(bits=8), Gptq(bits=4, group_size=32), KvCacheQuant(bits=4, group_size=16)))
    assert [s.kind for s in structural_part(plan).stages] == ["depth"]


def test_the_proxy_of_no_compression_is_the_models_perplexity(tiny_checkpoint, data_dir):
    model, tokenizer = load_model(str(tiny_checkpoint))
    expected, _ = token_perplexity(model, tokenizer, data_dir, seqlen=64, n_windows=2, batch_size=2)
    score = score_plan(Plan(()), str(tiny_checkpoint), data_dir, CALIB, seqlen=64, windows=2, batch_size=2)
    assert score.token_ppl == pytest.approx(expected, rel=1e-6) and score.windows == 2 and score.seconds > 0


def test_the_proxy_rounds_what_the_plan_rounds(tiny_checkpoint, data_dir):
    """GPTQ 4-bit g32 becomes round-to-nearest on every decoder Linear, the embedding is rounded
    as its stage rounds it, the KV cache as its stage says; nothing else changes."""
    plan = Plan((EmbeddingQuant(bits=8, group_size=32), Gptq(bits=4, group_size=32), KvCacheQuant(bits=4, group_size=16)))
    model, tokenizer = proxy_model(plan, str(tiny_checkpoint), data_dir, CALIB)
    reference, _ = load_model(str(tiny_checkpoint))
    EmbeddingQuant(bits=8, group_size=32).apply(reference)
    round_linears(reference, (4, 4, 4, 4), 32, 0.0)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters()):
        assert torch.equal(a, b), name
    install(reference, 4, 16)
    expected, _ = token_perplexity(reference, tokenizer, data_dir, seqlen=64, n_windows=2, batch_size=2)
    score = score_plan(plan, str(tiny_checkpoint), data_dir, CALIB, seqlen=64, windows=2, batch_size=2)
    assert score.token_ppl == pytest.approx(expected, rel=1e-6)
    plain = score_plan(Plan(()), str(tiny_checkpoint), data_dir, CALIB, seqlen=64, windows=2, batch_size=2)
    assert score.token_ppl != pytest.approx(plain.token_ppl, rel=1e-6)  # the rounding is scored
