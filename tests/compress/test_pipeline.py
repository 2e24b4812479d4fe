"""Pipeline over the stage cache: hits, corrupt entries rebuilt, output folder, shape invariant,
no-op (the cache alone: test_cache.py)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import DATA_DIR, TINY_CALIB
from slmsearch.compress.cache import StageCache
from slmsearch.compress.calib import CalibSettings
from slmsearch import checkpoint
from slmsearch.compress.pipeline import compress_to_dir, run
from slmsearch.compress.plan import Plan
from slmsearch.errors import SlmsearchError

SETTINGS = CalibSettings(**TINY_CALIB)
PLAN = Plan.from_dict(
    [
        {"stage": "depth", "drop": 1},
        {"stage": "wanda", "pattern": "structured", "mlp_fraction": 0.5, "multiple": 32},
        {"stage": "embedding", "bits": 8},
    ]
)


def logits(folder):
    model, _ = checkpoint.load(folder)
    with torch.no_grad():
        return model(torch.tensor([[1, 2, 3, 4, 5]])).logits


def test_cache_hits_and_same_result(tiny_base, tmp_path):
    cache = StageCache(tmp_path / "stages")
    first = run(PLAN, str(tiny_base), DATA_DIR, SETTINGS, cache=cache)
    assert first.cache_hits == 0 and set(first.stage_seconds) == {"depth", "wanda", "embedding"}
    second = run(PLAN, str(tiny_base), DATA_DIR, SETTINGS, cache=cache)
    assert second.cache_hits == 3 and second.stage_seconds == {}
    assert second.checkpoint_dir == first.checkpoint_dir
    assert [r.name for r in second.reports] == ["depth", "wanda", "embedding"]
    lora = Plan.from_dict([{"stage": "lora", "rank": 2, "steps": 2, "seqlen": 32}]).stages
    # lora sits before embedding in the canonical order, so only depth+wanda can be reused
    longer = Plan(PLAN.stages[:2] + lora + PLAN.stages[2:])
    third = run(longer, str(tiny_base), DATA_DIR, SETTINGS, cache=cache)
    assert third.cache_hits == 2
    assert (tmp_path / "scores").is_dir()  # depth scores cached beside the stages


def test_corrupt_entry_is_rebuilt(tiny_base, tmp_path):
    cache = StageCache(tmp_path / "stages")
    first = run(PLAN, str(tiny_base), DATA_DIR, SETTINGS, cache=cache)
    expected = logits(first.checkpoint_dir)
    weights = first.checkpoint_dir / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    weights.write_bytes(bytes(data))
    cache._verified.clear()  # a new process would not remember the earlier verification
    again = run(PLAN, str(tiny_base), DATA_DIR, SETTINGS, cache=cache)
    assert again.cache_hits == 2
    torch.testing.assert_close(logits(again.checkpoint_dir), expected)


def test_compress_to_dir(tiny_base, tmp_path):
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(PLAN.to_yaml())
    out = tmp_path / "out"
    result = compress_to_dir(plan_file, str(tiny_base), DATA_DIR, out, SETTINGS, progress=False)
    assert result.checkpoint_dir == out
    for name in ("config.json", "model.safetensors", "plan.json", "reports.json", "slmsearch.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    assert Plan.from_json((out / "plan.json").read_text()) == PLAN
    meta = json.loads((out / "slmsearch.json").read_text())
    assert meta["embedding"] == {"bits": 8, "group_size": None, "zero_bits": 0}
    assert meta["sparsity"]["format"] == "dense"
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 3 and model.config.intermediate_size == 64
    with pytest.raises(SlmsearchError, match="not empty"):
        compress_to_dir(PLAN, str(tiny_base), DATA_DIR, out, SETTINGS, progress=False)


def test_failure_leaves_nothing(tiny_base, tmp_path):
    bad = Plan.from_dict([{"stage": "wanda", "pattern": "structured", "kv_groups": 1, "multiple": 64}])
    out = tmp_path / "out"
    with pytest.raises(SlmsearchError):
        compress_to_dir(bad, str(tiny_base), DATA_DIR, out, SETTINGS, progress=False)
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_shape_from_checkpoint_matches_plan_shape(tiny_base, tmp_path):
    from slmsearch.hwmodel import ModelShape

    plan = Plan.from_dict(
        [
            {"stage": "depth", "drop": 1},
            {"stage": "wanda", "sparsity": 0.5},
            {"stage": "embedding", "bits": 4, "group_size": 32},
            {"stage": "gptq", "bits": 4, "group_size": 32},
        ]
    )
    result = run(plan, str(tiny_base), DATA_DIR, SETTINGS, out=tmp_path / "out")
    measured = ModelShape.from_checkpoint(result.checkpoint_dir)
    predicted = plan.shape(ModelShape.from_checkpoint(tiny_base))
    assert dataclasses.replace(measured, name="") == dataclasses.replace(predicted, name="")


def test_noop_plan_keeps_logits(tiny_base, tmp_path):
    plan = Plan.from_dict([{"stage": "depth"}, {"stage": "wanda"}, {"stage": "lora", "rank": 0}, {"stage": "embedding"}])
    result = run(plan, str(tiny_base), DATA_DIR, SETTINGS, out=tmp_path / "out")
    torch.testing.assert_close(logits(result.checkpoint_dir), logits(tiny_base), rtol=0, atol=0)


def test_kept_lora_adapter_reloads(tiny_base, tmp_path):
    from slmsearch.hwmodel import ModelShape

    plan = Plan.from_dict([{"stage": "lora", "rank": 4, "steps": 2, "seqlen": 32, "merge": False}])
    result = run(plan, str(tiny_base), DATA_DIR, SETTINGS, out=tmp_path / "out")
    folder = result.checkpoint_dir
    assert (folder / "adapter" / "adapter_config.json").is_file()
    model, _ = checkpoint.load(folder)
    assert type(model).__name__.startswith("Peft")
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3]])).logits).all()
    assert json.loads((folder / "slmsearch.json").read_text())["adapter"] == {"rank": 4, "bits": 16}
    assert ModelShape.from_checkpoint(folder).layers[0].adapter.rank == 4
