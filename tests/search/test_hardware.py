"""search/hardware.py: the shape of a base model, of a compressed folder, and of a plan applied
(what `slmsearch hw` and the study's budget check price), and the hw report file."""

from __future__ import annotations

import json
from pathlib import Path

from slmsearch.compress.plan import Plan
from slmsearch.hwmodel import ModelShape, load_platform
from slmsearch.hwmodel.summary import hw_report
from slmsearch.search.hardware import base_shape, model_shape, write_hw_report

PLAN = "stages:\n  - {stage: depth, drop: 1, by: angular}\n  - {stage: embedding, bits: 8}\n"


def test_a_base_model_is_priced_as_deployed_in_16_bit(tiny_checkpoint: Path) -> None:
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "float32"  # stored in fp32...
    shape = base_shape(str(tiny_checkpoint))
    assert shape == ModelShape.from_hf_config(config)
    assert shape.embedding_format.weight_bits == 16 and len(shape.layers) == 4  # ...deployed in 16 bit
    assert model_shape(str(tiny_checkpoint)) == shape


def test_a_plan_file_changes_the_shape_as_the_plan_says(tmp_path: Path, tiny_checkpoint: Path) -> None:
    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text(PLAN)
    shape = model_shape(str(tiny_checkpoint), plan_file)
    assert shape == Plan.load(plan_file).shape(base_shape(str(tiny_checkpoint)))
    assert len(shape.layers) == 3 and shape.embedding_format.weight_bits == 8


def test_a_compressed_folder_is_read_as_stored(tmp_path: Path, tiny_checkpoint: Path, data_dir: Path) -> None:
    """Its fp32 tensors hold a fake-quantized 8-bit embedding: only slmsearch.json says so."""
    from slmsearch.compress.pipeline import compress_to_dir

    plan_file = tmp_path / "plan.yaml"
    plan_file.write_text("stages:\n  - {stage: embedding, bits: 8}\n")
    compress_to_dir(plan_file, str(tiny_checkpoint), data_dir, tmp_path / "out", progress=False)
    shape = model_shape(str(tmp_path / "out"))
    assert shape.embedding_format.weight_bits == 8
    assert base_shape(str(tmp_path / "out")).embedding_format.weight_bits == 16  # what a config alone says


def test_write_hw_report_writes_what_it_returns(tmp_path: Path, tiny_checkpoint: Path) -> None:
    out = tmp_path / "hw.json"
    overrides = {"memory.l3.read_bw_bytes_per_cycle": 2.0}
    report = write_hw_report(out, model=str(tiny_checkpoint), platform="siracusa", overrides=overrides, context_len=64)
    assert json.loads(out.read_text()) == json.loads(json.dumps(report))
    expected = hw_report(base_shape(str(tiny_checkpoint)), load_platform("siracusa", overrides), context_len=64)
    assert report == expected and report != hw_report(base_shape(str(tiny_checkpoint)), "siracusa", context_len=64)
