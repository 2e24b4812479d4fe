"""LoRA recovery (masked merge, held-out loss) and embedding precision."""

from __future__ import annotations

import torch

from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch.compress.lora import ADAPTER_ATTR, LoraRecovery
from slmsearch.compress.surgery import decoder_layers
from slmsearch.compress.wanda import Wanda


def zero_count(model):
    return sum(int((l.weight == 0).sum()) for layer in decoder_layers(model) for l in layer.modules() if isinstance(l, torch.nn.Linear))


def test_merge_keeps_zeros_and_lowers_heldout_loss(model, calib):
    Wanda(sparsity=0.5).apply(model, calib)
    zeros = zero_count(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = LoraRecovery(rank=4, steps=12, lr=1e-2, batch=4, seqlen=64).apply(model, calib)
    assert zero_count(model) == zeros == report.metrics["zeros_kept"]
    assert report.metrics["heldout_loss_after_merge"] < report.metrics["heldout_loss_before"]
    assert len(report.metrics["loss_curve"]) == 12
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed and all("proj" in k for k in changed)
    assert not any("lora" in k for k in model.state_dict())


def test_keep_adapter(model, calib, capsys):
    report = LoraRecovery(rank=2, steps=2, merge=False, seqlen=32).apply(model, calib)
    lines = [line.split(" (")[0] for line in capsys.readouterr().err.splitlines() if line.startswith("[lora]")]
    curve = report.metrics["loss_curve"]
    assert lines == [f"[lora] step 1/2 loss {curve[0]:.3f}", f"[lora] step 2/2 loss {curve[1]:.3f}"]  # first and last
    adapter = getattr(model, ADAPTER_ATTR)
    assert adapter["config"].r == 2 and any("lora_A" in k for k in adapter["state"])
    assert "heldout_loss_after" in report.metrics


def test_embedding_rtn_per_row(model):
    original = model.get_input_embeddings().weight.clone()
    report = EmbeddingQuant(bits=4).apply(model)
    weight = model.get_input_embeddings().weight
    assert report.metrics["tied"] and model.lm_head.weight is weight
    assert all(row.unique().numel() <= 16 for row in weight)
    assert 0 < report.metrics["embedding_rel_error"] < 0.2
    assert not torch.equal(weight, original)


def test_embedding_groups_lower_error(model):
    from conftest import tiny_model

    per_row = EmbeddingQuant(bits=4).apply(tiny_model()).metrics["embedding_rel_error"]
    grouped = EmbeddingQuant(bits=4, group_size=32).apply(model).metrics["embedding_rel_error"]
    assert grouped < per_row


def test_embedding_16_is_noop(model):
    before = model.get_input_embeddings().weight.clone()
    EmbeddingQuant(bits=16).apply(model)
    assert torch.equal(model.get_input_embeddings().weight, before)


def test_heldout_zero_trains_without_the_loss_report(model, calib):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = LoraRecovery(rank=2, steps=2, seqlen=32, heldout=0).apply(model, calib)
    assert len(report.metrics["loss_curve"]) == 2
    assert not [k for k in report.metrics if k.startswith("heldout")]
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
