"""The embedding's wide rows: its first token ids kept at 8 bits on the same grid as the rest.
Each row is rounded on its own, so the narrow rows are exactly what the stage gives without wide
rows; the finished folder stores the two widths apart, loads bit for bit, and measures as the plan
predicts."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from slmsearch import checkpoint
from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel.memory import matrix_bytes
from slmsearch.hwmodel.shape import TensorFormat, smollm2_135m

CALIB = dict(n_samples=4, seqlen=32, batch=4)


def applied_one_then_the_other(model, first, second):
    """(the embedding before, after ``first``, after ``second`` applied to the original instead)."""
    original = model.get_input_embeddings().weight.detach().clone()
    first.apply(model)
    after_first = model.get_input_embeddings().weight.detach().clone()
    model.get_input_embeddings().weight.data.copy_(original)
    second.apply(model)
    return original, after_first, model.get_input_embeddings().weight.detach()


@pytest.mark.parametrize("grid", ["minmax", "sym"])
def test_wide_rows_are_the_8_bit_grid_and_leave_the_other_rows_as_they_were(model, grid):
    base = EmbeddingQuant(bits=4, group_size=32, grid=grid, **({"mse": 0.0} if grid == "sym" else {}))
    wide = dataclasses.replace(base, wide_rows=40)
    original, all_narrow, got = applied_one_then_the_other(model, base, wide)
    assert torch.equal(got[40:], all_narrow[40:])  # rows are rounded one by one
    packed = getattr(model, checkpoint.PACKED_ATTR)["embed"]
    assert packed.bits == 4 and packed.top.bits == 8 and packed.top.codes.shape[0] == 40
    assert int(packed.top.codes.max()) > 15  # 8-bit codes in use
    assert torch.equal(packed.dense(got.dtype), got)
    err_wide = (got[:40] - original[:40]).norm()
    err_narrow = (all_narrow[:40] - original[:40]).norm()
    assert err_wide < 0.2 * err_narrow  # 16x finer steps
    assert wide.label() == f"emb4g32{'mm' if grid == 'minmax' else ''}+40r8"
    assert dataclasses.replace(base, wide_rows=16384).label().endswith("+16k8")


def test_gptq_codes_of_the_wide_rows_serve_the_logits_on_the_8_bit_grid(model, calib):
    """GPTQ's error feedback runs along a row's columns, so the narrow rows come out as GPTQ gives
    them without wide rows (up to float summation order), and the wide rows on the 8-bit grid."""
    original = model.get_input_embeddings().weight.detach().clone()
    base = EmbeddingQuant(bits=4, group_size=32, gptq=True, mse=0.0)
    base.apply(model, calib)
    plain = getattr(model, checkpoint.PACKED_ATTR)["embed"]
    model.get_input_embeddings().weight.data.copy_(original)
    dataclasses.replace(base, wide_rows=64).apply(model, calib)
    packed = getattr(model, checkpoint.PACKED_ATTR)["embed"]
    assert packed.top.bits == 8 and packed.top.codes.shape[0] == 64 and int(packed.top.codes.max()) > 15
    same = (packed.codes == plain.codes[64:]).float().mean()
    assert same > 0.99, float(same)
    got = model.get_input_embeddings().weight.detach()
    assert (got[:64] - original[:64]).norm() < 0.2 * (plain.dense(got.dtype)[:64] - original[:64]).norm()


def test_the_hardware_model_counts_wide_rows_at_8_bits():
    base = smollm2_135m()
    fmt = TensorFormat(weight_bits=4, group_size=32, zero_bits=16)
    wide = dataclasses.replace(fmt, wide_rows=16384)
    v4, s4 = matrix_bytes(49152, 576, fmt)
    v, s = matrix_bytes(49152, 576, wide)
    assert v == (49152 - 16384) * 576 // 2 + 16384 * 576 and s == s4  # same groups, same scales and minimums
    assert v - v4 == 16384 * 576 // 2
    plan_shape = EmbeddingQuant(bits=4, group_size=32, grid="minmax", wide_rows=16384).shape(base)
    assert plan_shape.embedding_format == wide


@pytest.fixture(scope="module")
def wide_export(tiny_checkpoint: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan

    root = tmp_path_factory.mktemp("wide")
    plan = Plan.from_dict([{"stage": "embedding", "bits": 4, "group_size": 32, "grid": "minmax", "wide_rows": 4096},
                           {"stage": "minmax", "bits": 4, "group_size": 32}])
    cache = StageCache(root / "cache")
    result = run(plan, str(tiny_checkpoint), data_dir, CalibSettings(**CALIB), cache=cache, out=root / "out")
    return plan, result, cache


def test_a_finished_folder_with_wide_rows_loads_bit_for_bit_and_measures_as_predicted(wide_export, tiny_checkpoint):
    from safetensors import safe_open

    from slmsearch.hwmodel import ModelShape
    from slmsearch.hwmodel.memory import static_bytes

    plan, result, cache = wide_export
    folder = result.checkpoint_dir
    with safe_open(str(folder / checkpoint.PACKED_EMBEDDING_FILE), framework="pt") as f:
        names = set(f.keys())
    assert {f"model.embed_tokens.top.{checkpoint.CODES}", f"model.embed_tokens.{checkpoint.CODES}"} <= names
    packed, _ = checkpoint.read_packed(folder)
    assert packed["embed"].top.codes.shape == (4096, 64) and packed["embed"].codes.shape[0] == 49152 - 4096
    predicted = dataclasses.replace(plan.shape(ModelShape.from_checkpoint(tiny_checkpoint)), name="")
    measured = dataclasses.replace(ModelShape.from_checkpoint(folder), name="")
    assert measured == predicted and measured.embedding_format.wide_rows == 4096
    counted = static_bytes(predicted).static_total
    on_disk = checkpoint.disk_bytes(folder)["weights"]
    assert abs(on_disk - counted) <= 0.05 * counted, (on_disk, counted)
    entries = [cache.root / p.name for p in cache.root.iterdir() if (p / checkpoint.CONFIG_FILE).is_file()
               and "wide_rows" in (p / checkpoint.PLAN_FILE).read_text()]
    assert entries and all(dataclasses.replace(ModelShape.from_checkpoint(e), name="").embedding_format
                           == measured.embedding_format for e in entries)
    model, _ = checkpoint.load(folder)
    embed = model.get_input_embeddings().weight
    assert torch.equal(embed, packed["embed"].dense(embed.dtype))
    assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits).all()


def test_every_row_wide_leaves_no_narrow_row_and_round_trips_through_the_packed_file(model, tmp_path):
    """wide_rows equal to the vocabulary (the study's embedding_wide_fraction 1.0): the narrow part
    has no rows, and the packed file still reads back bit for bit (a minmax stage after it reads it)."""
    rows = model.get_input_embeddings().weight.shape[0]
    EmbeddingQuant(bits=4, group_size=32, grid="minmax", wide_rows=rows).apply(model)
    packed = getattr(model, checkpoint.PACKED_ATTR)["embed"]
    assert packed.codes.shape[0] == 0 and packed.top.codes.shape[0] == rows
    got = model.get_input_embeddings().weight.detach()
    checkpoint.write_packed(tmp_path, {"embed": packed}, "float32")
    back, _ = checkpoint.read_packed(tmp_path)
    assert back["embed"].codes.shape == packed.codes.shape and torch.equal(back["embed"].dense(got.dtype), got)
    empty = torch.zeros(0, 16, dtype=torch.uint8)
    assert checkpoint.unpack_codes(checkpoint.pack_codes(empty, 4), 4).shape == (0, 16)


@pytest.mark.parametrize("stage, message", [
    ({"stage": "embedding", "bits": 8, "group_size": 32, "wide_rows": 1024},
     "embedding.wide_rows keeps rows at 8 bits: it needs bits below 8, got bits 8"),
    ({"stage": "embedding", "bits": 4, "group_size": 32, "wide_rows": -1}, "embedding.wide_rows: 0 <= wide_rows <= 10000000 must hold, but got wide_rows=-1"),
    ({"stage": "embedding", "bits": 4, "group_size": 32, "wide_rows": 1.5}, "embedding.wide_rows must be an integer"),
])
def test_bad_wide_rows_are_one_error_naming_the_value(stage, message):
    from slmsearch.compress.plan import Plan

    with pytest.raises(SlmsearchError, match=message):
        Plan.from_dict([stage])


def test_more_wide_rows_than_tokens_is_refused_before_any_weight_is_read():
    from slmsearch.compress.plan import Plan

    plan = Plan.from_dict([{"stage": "embedding", "bits": 4, "group_size": 32, "wide_rows": 60000}])
    with pytest.raises(SlmsearchError, match="embedding.wide_rows=60000 exceeds the model's 49152 token rows; choose at most"):
        plan.check_fits(smollm2_135m())


@pytest.mark.parametrize("grid", ["minmax", "sym"])
def test_8_bit_scale_codes_of_the_embedding_round_trip_through_its_packed_file(model, grid, tmp_path):
    """scale_bits 8: the scales (of both widths) move to their log2 grid's values before the
    weights are set from them, the packed file stores one byte a scale, and reading it back gives
    the same weights bit for bit; the weights move far less than the 4-bit rounding moved them."""
    from safetensors import safe_open

    base = EmbeddingQuant(bits=4, group_size=32, grid=grid, wide_rows=40, **({"mse": 0.0} if grid == "sym" else {}))
    coded = dataclasses.replace(base, scale_bits=8)
    original, fp16, got = applied_one_then_the_other(model, base, coded)
    packed = getattr(model, checkpoint.PACKED_ATTR)["embed"]
    assert packed.scale_grid is not None and packed.top.scale_grid is not None
    assert torch.equal(packed.dense(got.dtype), got)
    assert 0 < (got - fp16).norm() < 0.1 * (fp16 - original).norm()
    checkpoint.write_packed(tmp_path, {"embed": packed}, "float32")
    with safe_open(str(tmp_path / checkpoint.PACKED_EMBEDDING_FILE), framework="pt") as f:
        assert f.get_slice(f"model.embed_tokens.{checkpoint.SCALES}").get_dtype() == "U8"
        assert f.get_slice(f"model.embed_tokens.top.{checkpoint.SCALES}").get_dtype() == "U8"
    back, _ = checkpoint.read_packed(tmp_path)
    assert torch.equal(back["embed"].dense(got.dtype), got)
    assert coded.label().startswith(f"emb4g32{'mm' if grid == 'minmax' else ''}s8+40r8")
    assert coded.shape(smollm2_135m()).embedding_format.scale_bits == 8
    assert "scale_bits" not in base.to_dict() and coded.to_dict()["scale_bits"] == 8
