"""Per-layer sensitivity (compress/sensitivity.py): the partial forward from each layer's kept input
scores what full forward passes score, and the cache returns it without recomputing."""

from __future__ import annotations

import pytest
import torch

from slmsearch.compress.kernels import rtn_quantize
from slmsearch.compress.sensitivity import MAX_WINDOWS, cached_layer_sensitivity, layer_sensitivity
from slmsearch.compress.surgery import decoder_layers


def full_forward_scores(model, calib, bits, group):
    out = []
    windows = calib.tokens[:MAX_WINDOWS]
    with torch.no_grad():
        base = [torch.log_softmax(model(w[None]).logits[0].float(), -1) for w in windows]
        for layer in decoder_layers(model):
            linears = [m for m in layer.modules() if isinstance(m, torch.nn.Linear)]
            saved = [m.weight.data.clone() for m in linears]
            for m in linears:
                m.weight.data.copy_(rtn_quantize(m.weight.data, bits, group))
            total = 0.0
            for w, b in zip(windows, base):
                logp = torch.log_softmax(model(w[None]).logits[0].float(), -1)
                total += float(torch.nn.functional.kl_div(logp, b, log_target=True, reduction="batchmean"))
            for m, weight in zip(linears, saved):
                m.weight.data.copy_(weight)
            out.append(total / len(windows))
    return out


def test_partial_forwards_score_what_full_forwards_score(model, calib):
    fast = layer_sensitivity(model, calib, 3, 32)
    full = full_forward_scores(model, calib, 3, 32)
    assert fast == [pytest.approx(x, rel=1e-5) for x in full]
    assert all(s > 0 for s in fast)
    assert sum(layer_sensitivity(model, calib, 2, 32)) > sum(fast)  # narrower hurts more


def test_cached_scores_are_reused(model, calib, tmp_path, monkeypatch):
    from slmsearch.compress import sensitivity

    calib.score_dir = tmp_path
    first = cached_layer_sensitivity(lambda: model, calib, 3, 32, "tiny")
    monkeypatch.setattr(sensitivity, "layer_sensitivity", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert cached_layer_sensitivity(lambda: pytest.fail("loaded the model for cached scores"), calib, 3, 32, "tiny") == first
    assert len(list(tmp_path.glob("sensitivity-*.json"))) == 1
