"""Depth pruning: renumbered layers, KV-cache generation, reload, cached scores."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from slmsearch.compress.depth import DepthPrune, importance_scores, select_layers
from slmsearch.compress.surgery import decoder_layers, drop_layers
from slmsearch.errors import SlmsearchError


def greedy_no_cache(model, ids, n):
    with torch.no_grad():
        for _ in range(n):
            nxt = model(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
    return ids


def test_drop_renumbers_and_generates_with_cache(model, tmp_path):
    drop_layers(model, [1, 2])
    assert model.config.num_hidden_layers == 2
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1]
    prompt = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    assert torch.equal(cached, greedy_no_cache(model, prompt, 8))
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 2
    with torch.no_grad():
        torch.testing.assert_close(again(prompt).logits, model(prompt).logits)


def test_drop_rejects_bad_indices(model):
    with pytest.raises(SlmsearchError, match="0 <= i < 4"):
        drop_layers(model, [4])
    with pytest.raises(SlmsearchError, match="cannot drop all"):
        drop_layers(model, [0, 1, 2, 3])


def test_scores_shapes_and_selection(model, calib):
    scores = importance_scores(model, calib)
    assert scores["n_layers"] == 4
    assert len(scores["angular"]["1"]) == 4 and len(scores["angular"]["2"]) == 3
    assert all(0 <= x <= 1 for x in scores["angular"]["1"])
    assert len(scores["ppl"]) == 4
    chosen = select_layers(scores, 2, "angular", 2)
    assert chosen[1] == chosen[0] + 1
    ang = scores["angular"]["1"]
    assert select_layers(scores, 1, "angular", 1) == (min(range(4), key=lambda i: ang[i]),)
    assert select_layers(scores, 1, "ppl", 1) == (min(range(4), key=lambda i: scores["ppl"][i]),)


def test_scores_cached_once_and_a_planted_change_is_recomputed(model, calib, tmp_path):
    calib.score_dir, calib.model_key = tmp_path, "abc123"
    first = DepthPrune(drop=1, by="ppl").apply(model, calib).metrics["dropped"]
    files = list(tmp_path.glob("depth-*.json"))
    assert len(files) == 1
    stamp = files[0].stat().st_mtime_ns
    from conftest import tiny_model

    assert DepthPrune(drop=1, by="ppl").apply(tiny_model(), calib).metrics["dropped"] == first
    assert files[0].stat().st_mtime_ns == stamp  # read from the cache, not recomputed
    data = json.loads(files[0].read_text())
    other = 0 if first[0] != 0 else 1
    data["ppl"] = [1.0 if i == other else 9.0 for i in range(len(data["ppl"]))]
    files[0].write_text(json.dumps(data))  # a planted edit: layer `other` now looks redundant
    assert DepthPrune(drop=1, by="ppl").apply(tiny_model(), calib).metrics["dropped"] == first  # detected, recomputed
    assert json.loads(files[0].read_text())["ppl"] != data["ppl"]


def test_explicit_indices_and_validation(model, calib):
    report = DepthPrune(indices=(0, 3)).apply(model, calib)
    assert report.metrics["dropped"] == [0, 3] and model.config.num_hidden_layers == 2
    with pytest.raises(SlmsearchError, match="multiple"):
        DepthPrune(drop=3, block=2)
    with pytest.raises(SlmsearchError, match="block > 1"):
        DepthPrune(drop=2, block=2, by="ppl")
