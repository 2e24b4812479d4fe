"""WANDA stage on a tiny random LLaMA: counts, untouched modules, structured shapes, reload."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import tiny_model
from slmsearch.compress.calib import CalibSettings, Calibration
from slmsearch.compress.surgery import decoder_layers, head_geometry, set_kv_groups, shrink_attention, shrink_mlp
from slmsearch.compress.wanda import Wanda
from slmsearch.errors import SlmsearchError

PROMPT = torch.tensor([[5, 17, 99, 3, 42, 7, 128, 64]])


def logits(model):
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.mark.parametrize("pattern,sparsity", [("unstructured", 0.5), ("unstructured", 0.3), ("2:4", 0.5), ("4:8", 0.0)])
def test_counts_in_model(model, calib, pattern, sparsity):
    report = Wanda(sparsity=sparsity, pattern=pattern).apply(model, calib)
    for layer in decoder_layers(model):
        for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
            w = lin.weight
            cols = w.shape[1]
            if pattern == "unstructured":
                assert ((w == 0).sum(1) == int(cols * sparsity)).all()
            else:
                n, m = (int(x) for x in pattern.split(":"))
                assert ((w == 0).reshape(w.shape[0], -1, m).sum(-1) == n).all()
    assert report.metrics["sparsity_achieved"] == pytest.approx(sparsity or 0.5, abs=0.01)


def test_untargeted_modules_bit_identical(model, calib):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    Wanda(sparsity=0.5, targets=("self_attn.q_proj",)).apply(model, calib)
    for key, value in model.state_dict().items():
        if "q_proj" in key:
            assert not torch.equal(value, before[key])
        else:
            assert torch.equal(value, before[key]), key


@pytest.mark.parametrize("n", [1, 3, 5])
def test_any_number_of_calibration_samples(model, calib, n):
    small = Calibration(CalibSettings(n_samples=n, seqlen=32, batch=4), calib.tokens[:n, :32])
    Wanda(sparsity=0.5).apply(model, small)
    assert (model.model.layers[0].mlp.up_proj.weight == 0).float().mean() == 0.5


def test_wanda_differs_from_magnitude(calib):
    a, b = tiny_model(), tiny_model()
    Wanda(sparsity=0.5).apply(a, calib)
    Wanda(sparsity=0.5, score="magnitude").apply(b, calib)
    assert not torch.equal(a.model.layers[1].mlp.up_proj.weight == 0, b.model.layers[1].mlp.up_proj.weight == 0)


def test_structured_shrinks_and_reloads(model, calib, tmp_path):
    report = Wanda(pattern="structured", mlp_fraction=0.5, kv_groups=1, multiple=32).apply(model, calib)
    assert report.metrics["mlp_channels_removed"] == 64
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_key_value_heads, cfg.num_attention_heads) == (64, 1, 2)
    for layer in decoder_layers(model):
        assert layer.mlp.gate_proj.weight.shape == (64, 64)
        assert layer.mlp.down_proj.weight.shape == (64, 64)
        assert layer.self_attn.q_proj.weight.shape == (32, 64)
        assert layer.self_attn.k_proj.weight.shape == (16, 64)
        assert layer.self_attn.o_proj.weight.shape == (64, 32)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    got = logits(again)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected)


def test_structured_keep_everything_is_identical(model):
    before = logits(model)
    n_heads, n_kv, head_dim = head_geometry(model.config)
    for layer in decoder_layers(model):
        shrink_mlp(layer, torch.arange(128))
        shrink_attention(layer, torch.arange(n_kv), rep=n_heads // n_kv, head_dim=head_dim)
    set_kv_groups(model.config, n_kv, rep=n_heads // n_kv, head_dim=head_dim)
    assert torch.equal(logits(model), before)


def test_noop_stage_is_identical(model, calib):
    before = logits(model)
    for stage in (Wanda(), Wanda(pattern="structured")):
        assert stage.is_noop()
        stage.apply(model, calib)
    assert torch.equal(logits(model), before)


def test_structured_multiple_rules(model, calib):
    with pytest.raises(SlmsearchError, match="multiple"):
        Wanda(pattern="structured", mlp_fraction=0.5, multiple=96).apply(model, calib)
    with pytest.raises(SlmsearchError, match="kv_groups must be <"):
        Wanda(pattern="structured", kv_groups=2, multiple=16).apply(model, calib)
    with pytest.raises(SlmsearchError, match=r"kv_groups=1 is not allowed .* allowed \[0\]"):
        Wanda(pattern="structured", kv_groups=1, multiple=64).apply(model, calib)


def test_settings_validated():
    with pytest.raises(SlmsearchError, match="0.0 <= sparsity <= 0.99"):
        Wanda(sparsity=1.5)
    with pytest.raises(SlmsearchError, match="pattern"):
        Wanda(pattern="3:4")
    with pytest.raises(SlmsearchError, match="implies sparsity"):
        Wanda(pattern="2:4", sparsity=0.3)
    with pytest.raises(SlmsearchError, match="structured"):
        Wanda(sparsity=0.5, pattern="structured")
