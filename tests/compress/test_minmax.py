"""The minmax stage: an asymmetric grid with a 16-bit scale and minimum per group, stored packed,
loaded bit for bit, counted by the hardware model as stored; its kernel reproduces a tensor that
already lies on such a grid exactly (llama.cpp's Q4_1 layout)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from slmsearch import checkpoint
from slmsearch.compress.kernels import minmax_codes, minmax_dequantize, rtn_codes, rtn_dequantize
from slmsearch.errors import SlmsearchError

CALIB = dict(n_samples=4, seqlen=32, batch=4)


def test_minmax_kernel_is_lossless_on_its_own_grid_and_beats_the_symmetric_grid_on_skewed_rows():
    torch.manual_seed(0)
    # a tensor on a Q4_1 grid: per block of 32, fp16 scale and minimum, codes 0..15 with 0 and 15 present
    rows, cols = 16, 128
    scale = (torch.rand(rows, cols // 32) * 0.1 + 0.01).half().float()
    low = (torch.randn(rows, cols // 32) * 0.1).half().float()
    codes = torch.randint(0, 16, (rows, cols // 32, 32))
    codes[:, :, 0], codes[:, :, 1] = 0, 15
    w = (low.unsqueeze(2) + codes.float() * scale.unsqueeze(2)).reshape(rows, cols)
    q, s, m = minmax_codes(w, 4, 32)
    assert s.dtype == m.dtype == torch.float16 and q.dtype == torch.uint8 and int(q.max()) <= 15
    assert torch.equal(minmax_dequantize(q, s, m, torch.float32), w)  # every weight back exactly
    sym_codes, sym_scales = rtn_codes(w, 4, 32)
    assert not torch.equal(rtn_dequantize(sym_codes, sym_scales, 4, torch.float32), w)
    # all-positive rows: the symmetric grid wastes half its codes, the min..max grid does not
    skewed = torch.rand(rows, cols) + 1.0
    mq = minmax_dequantize(*minmax_codes(skewed, 4, 32), torch.float32)
    sq = rtn_dequantize(*rtn_codes(skewed, 4, 32), 4, torch.float32)
    assert (mq - skewed).norm() < 0.6 * (sq - skewed).norm()
    flat = torch.zeros(2, 32)  # a constant group: scale at the smallest fp16, the value exact
    assert torch.equal(minmax_dequantize(*minmax_codes(flat + 0.5, 4, 32), torch.float32), flat + 0.5)


@pytest.fixture(scope="module")
def minmax_export(tiny_checkpoint: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished folder of a 4-bit embedding + minmax 4-bit g32 + KV 4 plan, and its cache entries."""
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan

    root = tmp_path_factory.mktemp("minmax")
    plan = Plan.from_dict([{"stage": "embedding", "bits": 4, "group_size": 32},
                           {"stage": "minmax", "bits": 4, "group_size": 32},
                           {"stage": "kv_cache", "bits": 4, "group_size": 16}])
    cache = StageCache(root / "cache")
    result = run(plan, str(tiny_checkpoint), data_dir, CalibSettings(**CALIB), cache=cache, out=root / "out")
    return plan, result, cache


def test_minmax_export_is_packed_loads_bit_for_bit_and_is_the_size_the_hardware_model_counts(
        minmax_export, tiny_checkpoint):
    from safetensors import safe_open

    from slmsearch.hwmodel import ModelShape
    from slmsearch.hwmodel.memory import static_bytes

    plan, result, cache = minmax_export
    folder = result.checkpoint_dir
    report = next(r for r in result.reports if r.name == "minmax")
    assert 0 < report.metrics["rel_error"] < 0.2 and report.metrics["bits"] == 4
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        names = set(f.keys())
    assert not any(n.endswith("_proj.weight") for n in names) and "model.embed_tokens.weight" not in names
    packed, _ = checkpoint.read_packed(folder)
    assert set(packed) == {"embed"} | {f"model.layers.{i}.{g}.{p}" for i in range(4)
                                       for g, ps in (("self_attn", "qkvo"), ("mlp", ("gate", "up", "down")))
                                       for p in (f"{x}_proj" for x in ps)}
    assert packed["embed"].mins is None and packed["model.layers.0.mlp.up_proj"].mins is not None
    # what the plan predicts = what the finished folder measures = what the cache entry declares
    predicted = dataclasses.replace(plan.shape(ModelShape.from_checkpoint(tiny_checkpoint)), name="")
    measured = dataclasses.replace(ModelShape.from_checkpoint(folder), name="")
    assert measured == predicted
    fmt = measured.layers[0].linear_format
    assert (fmt.weight_bits, fmt.group_size, fmt.scale_bits, fmt.zero_bits) == (4, 32, 16, 16)
    counted = static_bytes(predicted).static_total
    on_disk = checkpoint.disk_bytes(folder)["weights"]
    assert abs(on_disk - counted) <= 0.10 * counted, (on_disk, counted)
    # loading: the unpacked Linears are the stage's grid values, bit for bit
    model, _ = checkpoint.load(folder)
    up = model.model.layers[1].mlp.up_proj.weight
    assert torch.equal(up, packed["model.layers.1.mlp.up_proj"].dense(up.dtype))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def _entry_keys(cache):
    return [p.name for p in cache.root.iterdir() if (p / checkpoint.CONFIG_FILE).is_file()]


def test_a_cached_minmax_entry_measures_as_the_finished_folder(minmax_export):
    from slmsearch.hwmodel import ModelShape

    plan, result, cache = minmax_export
    shapes = set()
    for key in _entry_keys(cache):
        folder = cache.root / key
        if "minmax" in (folder / checkpoint.PLAN_FILE).read_text():
            shapes.add(dataclasses.replace(ModelShape.from_checkpoint(folder), name="", kv_cache_bits=16,
                                           kv_cache_group=None, kv_cache_key_group=None))
    finished = dataclasses.replace(ModelShape.from_checkpoint(result.checkpoint_dir), name="", kv_cache_bits=16,
                                   kv_cache_group=None, kv_cache_key_group=None)
    assert shapes == {finished}


@pytest.mark.parametrize("stages, message", [
    ([{"stage": "gptq", "bits": 4}, {"stage": "minmax", "bits": 4}], "gptq or with minmax, not both"),
    ([{"stage": "wanda", "sparsity": 0.5}, {"stage": "minmax", "bits": 4}], "cannot follow wanda pattern 'unstructured'"),
    ([{"stage": "minmax", "bits": 5}], "minmax.bits must be one of 2, 4, 8, got 5"),
    ([{"stage": "minmax", "bits": 4, "group_size": 48}], "minmax.group_size must be one of 32, 64, 128, got 48"),
    ([{"stage": "minmax", "zero": "float"}], "stage 'minmax' has no setting(s) 'zero'"),
    ([{"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax", "gptq": True}],
     "embedding.grid 'minmax' rounds to nearest in groups"),
    ([{"stage": "embedding", "bits": 4, "grid": "minmax", "gptq": False, "mse": 0.0}],
     "embedding.grid 'minmax' rounds to nearest in groups: it needs a group_size"),
])
def test_bad_minmax_plans_are_one_error_naming_the_value(stages, message):
    from slmsearch.compress.plan import Plan

    with pytest.raises(SlmsearchError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Plan.from_dict(stages)


def test_a_study_file_with_an_unknown_layer_grid_is_one_error_line(tmp_path):
    from slmsearch.search.config import load_study_config

    path = tmp_path / "s.yaml"
    path.write_text("budget_mb: 96\nspace:\n  layer_grids: [gptq, q4_1]\n")
    with pytest.raises(SlmsearchError, match="space.layer_grids.*'q4_1'"):
        load_study_config(path)
