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


# distillation ---------------------------------------------------------------------------------
def test_kd_loss_is_least_for_the_teachers_own_distribution():
    from slmsearch.compress.lora import kd_loss

    torch.manual_seed(0)
    teacher = torch.randn(2, 5, 50) * 3
    top = torch.log_softmax(teacher, dim=-1).topk(8, dim=-1)
    own = kd_loss(teacher, top.values, top.indices)
    for scale in (0.1, 1.0):
        assert own < kd_loss(teacher + scale * torch.randn_like(teacher), top.values, top.indices)
    # a student that puts all mass outside the teacher's top-k pays for it
    flat = torch.zeros_like(teacher)
    assert kd_loss(flat, top.values, top.indices) > own


def test_distilled_recovery_moves_the_student_toward_the_teacher(tiny_base, tmp_path):
    """drop one layer, then LoRA with the KD loss: the KL from the dense model on held-out windows
    falls, and the teacher's top-k are cached once per base model and windows."""
    from conftest import DATA_DIR, TINY_CALIB
    from slmsearch import checkpoint
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.depth import DepthPrune
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan

    cache = StageCache(tmp_path / "stages")
    settings = CalibSettings(**TINY_CALIB)
    dropped = run(Plan((DepthPrune(drop=1),)), str(tiny_base), DATA_DIR, settings, cache=cache)
    kd = LoraRecovery(rank=4, steps=30, lr=3e-3, seqlen=64, heldout=0, loss="kd")
    recovered = run(Plan((DepthPrune(drop=1), kd)), str(tiny_base), DATA_DIR, settings, cache=cache)
    teacher = checkpoint.load(tiny_base)[0]
    from conftest import byte_tokenizer
    from slmsearch.compress.calib import Calibration

    text = Calibration.from_data(byte_tokenizer(), DATA_DIR, settings).samples(8, part="heldout", seqlen=64, seed=5)

    def kl(folder):
        student = checkpoint.load(folder)[0]
        with torch.no_grad():
            t = torch.log_softmax(teacher(text).logits, -1)
            s = torch.log_softmax(student(text).logits, -1)
        return float((t.exp() * (t - s)).sum(-1).mean())

    assert kl(recovered.checkpoint_dir) < kl(dropped.checkpoint_dir)
    assert len(list(cache.score_dir().glob("teacher-*.safetensors"))) == 1


def test_an_unknown_recovery_loss_is_refused():
    import pytest

    from slmsearch.errors import SlmsearchError

    with pytest.raises(SlmsearchError, match="lora.loss must be one of lm, kd, got 'mse'"):
        LoraRecovery(loss="mse")


def _logit_error(weight, reference, inputs):
    return float(sum(((x @ weight.T) - (x @ reference.T)).pow(2).sum() for x in inputs))


def test_embedding_gptq_moves_the_logits_less_than_rounding(model, calib):
    """GPTQ codes of the tied embedding: on the grid the packed format stores, and the lm_head's
    outputs on the calibration inputs move less than with round-to-nearest at the same grid."""
    from conftest import tiny_model

    from slmsearch.checkpoint import PACKED_ATTR
    from slmsearch.compress.kernels import rtn_dequantize

    original = model.get_input_embeddings().weight.detach().clone()
    stage = EmbeddingQuant(bits=4, group_size=32, mse=2.4, gptq=True)
    inputs = stage._lm_head_inputs(model, calib)
    report = stage.apply(model, calib)
    gptq = model.get_input_embeddings().weight.detach()
    packed = getattr(model, PACKED_ATTR)["embed"]
    assert torch.equal(rtn_dequantize(packed.codes, packed.scales, 4, gptq.dtype), gptq)  # the packed truth
    assert report.metrics["tied"] and model.lm_head.weight is model.get_input_embeddings().weight
    rtn_model = tiny_model()
    EmbeddingQuant(bits=4, group_size=32, mse=2.4).apply(rtn_model)
    rtn = rtn_model.get_input_embeddings().weight.detach()
    assert _logit_error(gptq, original, inputs) < 0.9 * _logit_error(rtn, original, inputs)
    assert stage.label() == "emb4g32h"


def test_embedding_gptq_damp_trades_the_logits_for_the_rows(calib):
    """``damp`` weighs each row's own error (the input lookup) against the logits': a larger damp
    gives rows closer to the originals and logits further from them, both between the two ends."""
    from conftest import tiny_model

    def quantized(**kw):
        m = tiny_model()
        EmbeddingQuant(bits=4, group_size=32, **kw).apply(m, calib)
        return m.get_input_embeddings().weight.detach()

    base = tiny_model()
    original = base.get_input_embeddings().weight.detach().clone()
    inputs = EmbeddingQuant(bits=4, group_size=32, gptq=True)._lm_head_inputs(base, calib)
    low, high, rtn = quantized(gptq=True, damp=0.01), quantized(gptq=True, damp=0.9), quantized()
    row_err = {k: float((w - original).pow(2).sum()) for k, w in (("low", low), ("high", high), ("rtn", rtn))}
    logit_err = {k: _logit_error(w, original, inputs) for k, w in (("low", low), ("high", high), ("rtn", rtn))}
    assert row_err["rtn"] < row_err["high"] < row_err["low"]
    assert logit_err["low"] < logit_err["high"] < logit_err["rtn"]


def test_embedding_gptq_without_calibration_is_refused(model):
    import pytest

    from slmsearch.errors import SlmsearchError

    with pytest.raises(SlmsearchError, match="embedding.gptq needs calibration windows"):
        EmbeddingQuant(bits=4, group_size=32, gptq=True).apply(model)
    with pytest.raises(SlmsearchError, match="embedding.gptq must be true or false, got 'yes'"):
        EmbeddingQuant(bits=4, gptq="yes")
    with pytest.raises(SlmsearchError, match="embedding.damp: 0.001 <= damp <= 0.99 must hold, but got damp=1.5"):
        EmbeddingQuant(bits=4, gptq=True, damp=1.5)
