"""The checkpoint folder (slmsearch/checkpoint.py): save -> load round trips, format detection on a
plain and a real GPTQ folder, the records and meta file, and copying without cache bookkeeping."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from slmsearch import checkpoint
from slmsearch.errors import SlmsearchError

PROMPT = torch.tensor([[1, 2, 3, 4, 5, 6]])


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(PROMPT).logits


@pytest.fixture(scope="module")
def gptq_folder(tiny_checkpoint: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real gptqmodel output: the tiny LLaMA quantized to 4 bits, groups of 32, by the pipeline."""
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan

    out = tmp_path_factory.mktemp("gptq") / "out"
    plan = Plan.from_dict([{"stage": "gptq", "bits": 4, "group_size": 32}])
    run(plan, str(tiny_checkpoint), data_dir, CalibSettings(n_samples=4, seqlen=32, batch=4), out=out)
    return out


def test_save_then_load_gives_the_same_model_and_tokenizer(tiny_checkpoint, tmp_path):
    model, tokenizer = checkpoint.load(tiny_checkpoint)
    checkpoint.save(model, tokenizer, tmp_path / "copy")
    again, tokenizer_again = checkpoint.load(tmp_path / "copy")
    assert not again.training
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)
    assert tokenizer_again("a short test").input_ids == tokenizer("a short test").input_ids
    assert tokenizer_again.pad_token is not None  # load gives a padding token for batched evaluation
    assert (tmp_path / "copy" / "model.safetensors").is_file()
    assert not checkpoint.has_adapter(tmp_path / "copy") and checkpoint.adapter_rank(tmp_path / "copy") is None


def test_a_kept_adapter_is_saved_under_adapter_and_applied_on_load(tiny_checkpoint, tmp_path):
    """What LoraRecovery(merge=False) leaves on the model (the adapter's config and tensors, the
    base weights unchanged) comes back as a PEFT model computing base + adapter."""
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict

    from slmsearch.compress.lora import ADAPTER_ATTR

    model, tokenizer = checkpoint.load(tiny_checkpoint)
    config = LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, config)
    expected = logits(peft_model)
    state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    base = peft_model.unload()
    assert not torch.equal(logits(base), expected)  # the adapter changes the output
    setattr(base, ADAPTER_ATTR, {"config": config, "state": state})
    checkpoint.save(base, tokenizer, tmp_path / "kept")

    folder = tmp_path / "kept"
    assert (folder / checkpoint.ADAPTER_DIR / checkpoint.ADAPTER_WEIGHTS_FILE).is_file()
    assert checkpoint.adapter_rank(folder) == 2 and not checkpoint.is_gptq_folder(folder)
    loaded, _ = checkpoint.load(folder)
    assert type(loaded).__name__.startswith("Peft")
    torch.testing.assert_close(logits(loaded), expected)


def test_load_refuses_a_folder_without_config(tmp_path):
    with pytest.raises(SlmsearchError, match="no config.json"):
        checkpoint.load(tmp_path)


def test_format_detection_on_a_plain_and_a_gptq_folder(tiny_checkpoint, gptq_folder, tmp_path):
    assert not checkpoint.is_gptq_folder(tiny_checkpoint)
    assert checkpoint.is_gptq_folder(gptq_folder)
    # either of gptqmodel's two marks is enough: its own file, or a quantization_config in config.json
    only_file = tmp_path / "only-file"
    only_file.mkdir()
    (only_file / checkpoint.QUANTIZE_CONFIG_FILE).write_text(json.dumps({"bits": 4}))
    assert checkpoint.is_gptq_folder(only_file)
    only_config = tmp_path / "only-config"
    only_config.mkdir()
    (only_config / "config.json").write_text(json.dumps({"quantization_config": {"bits": 4}}))
    assert checkpoint.is_gptq_folder(only_config)
    (only_config / "config.json").write_text(json.dumps({"quantization_config": None}))
    assert not checkpoint.is_gptq_folder(only_config)


def test_a_gptq_folder_loads_through_gptqmodel_and_as_a_dense_copy(gptq_folder):
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    kernel, _ = checkpoint.load(gptq_folder)
    quantized = [m for m in kernel.modules() if isinstance(m, BaseQuantLinear)]
    assert len(quantized) == 4 * 7  # every decoder Linear of the 4 layers
    dense, _ = checkpoint.load(gptq_folder, dense=True)
    assert not [m for m in dense.modules() if isinstance(m, BaseQuantLinear)]
    layer = dict(dense.named_modules())["model.layers.1.mlp.up_proj"]
    reference = dict(kernel.named_modules())["model.layers.1.mlp.up_proj"].dequantize_weight().T
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == kernel.dtype
    torch.testing.assert_close(layer.weight, reference.to(layer.weight.dtype), rtol=0, atol=0)


def test_records_round_trip(tmp_path):
    from slmsearch.compress.plan import Plan
    from slmsearch.compress.stage import StageReport

    plan = Plan.from_dict([{"stage": "depth", "drop": 1}, {"stage": "embedding", "bits": 8}])
    reports = [StageReport("depth", {"drop": 1}, 1.5, {"dropped": [2]}), StageReport("embedding", {"bits": 8}, 0.25)]
    meta = {"sparsity": {"format": "dense", "density": 1.0}, "embedding": {"bits": 8, "group_size": None, "zero_bits": 0}}
    checkpoint.write_records(tmp_path, plan, reports, meta)
    assert Plan.from_json((tmp_path / checkpoint.PLAN_FILE).read_text()) == plan
    assert checkpoint.read_reports(tmp_path) == reports
    assert checkpoint.read_meta(tmp_path) == meta
    assert checkpoint.read_reports(tmp_path / "nothing-here") == []  # a base model has no reports


@pytest.mark.parametrize("content, problem", [
    (None, "No such file"),
    ("{not json", "Expecting property name"),
    ("[1, 2]", "must hold a JSON object"),
])
def test_a_missing_or_corrupt_meta_file_is_one_error_naming_it(tmp_path, content, problem):
    if content is not None:
        (tmp_path / checkpoint.META_FILE).write_text(content)
    with pytest.raises(SlmsearchError, match=problem) as caught:
        checkpoint.read_meta(tmp_path)
    assert str(tmp_path / "slmsearch.json") in str(caught.value)


def test_copy_folder_leaves_the_cache_bookkeeping_and_links_only_the_weights(tmp_path):
    from slmsearch.compress.cache import LAST_USED, MANIFEST

    src = tmp_path / "src"
    (src / checkpoint.ADAPTER_DIR).mkdir(parents=True)
    for name in ("model.safetensors", "config.json", MANIFEST, LAST_USED, f"{checkpoint.ADAPTER_DIR}/{checkpoint.ADAPTER_CONFIG_FILE}"):
        (src / name).write_text(name)

    checkpoint.copy_folder(src, tmp_path / "linked", link_weights=True)
    checkpoint.copy_folder(src, tmp_path / "copied")
    for dst in (tmp_path / "linked", tmp_path / "copied"):
        files = sorted(str(p.relative_to(dst)) for p in dst.rglob("*") if p.is_file())
        assert files == ["adapter/adapter_config.json", "config.json", "model.safetensors"]
        assert (dst / "config.json").stat().st_ino != (src / "config.json").stat().st_ino
    assert (tmp_path / "linked" / "model.safetensors").stat().st_ino == (src / "model.safetensors").stat().st_ino
    assert (tmp_path / "copied" / "model.safetensors").stat().st_ino != (src / "model.safetensors").stat().st_ino


def test_copy_tokenizer_adds_only_the_missing_tokenizer_files(tmp_path):
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        (src / name).write_text("from src")
    (dst / "tokenizer.json").write_text("dst's own")
    checkpoint.copy_tokenizer(src, dst)
    assert (dst / "tokenizer.json").read_text() == "dst's own"
    assert (dst / "tokenizer_config.json").read_text() == "from src"
    assert not (dst / "model.safetensors").exists()
