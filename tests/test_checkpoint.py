"""The checkpoint folder (slmsearch/checkpoint.py): save -> load round trips, format detection on a
plain and a real GPTQ folder, the records and meta file, and copying without cache bookkeeping."""

from __future__ import annotations

import dataclasses
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

    from slmsearch.compress.gptqmodel_runtime import compute_dtype

    kernel, _ = checkpoint.load(gptq_folder)
    quantized = [m for m in kernel.modules() if isinstance(m, BaseQuantLinear)]
    assert len(quantized) == 4 * 7  # every decoder Linear of the 4 layers
    dense, _ = checkpoint.load(gptq_folder, dense=True)
    assert not [m for m in dense.modules() if isinstance(m, BaseQuantLinear)]
    layer = dict(dense.named_modules())["model.layers.1.mlp.up_proj"]
    kernel_layer = dict(kernel.named_modules())["model.layers.1.mlp.up_proj"]
    dtype = compute_dtype()  # the kernel's (bf16), or float32 where bf16 is emulated (the kernel in float16)
    if dtype == torch.float32:  # the stored float16 scales times the integer codes, exactly
        kernel_layer.scales = kernel_layer.scales.float()
    reference = kernel_layer.dequantize_weight().T
    assert type(layer) is torch.nn.Linear and layer.weight.dtype == dtype
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


# the packed embedding ----------------------------------------------------------------------------
@pytest.mark.parametrize("bits, group_size", [(4, None), (4, 32), (8, None)])
def test_packed_codes_unpack_to_the_fake_quantized_weights_bit_for_bit(bits, group_size):
    from transformers import LlamaConfig, LlamaForCausalLM

    from slmsearch.compress.embedding import EmbeddingQuant

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    EmbeddingQuant(bits=bits, group_size=group_size).apply(model)
    packed = getattr(model, checkpoint.PACKED_ATTR)["embed"]
    stored = checkpoint.pack_codes(packed.codes, bits)
    assert stored.dtype == torch.uint8 and stored.shape == (512, 64 * bits // 8)
    assert torch.equal(checkpoint.unpack_codes(stored, bits), packed.codes)
    assert packed.scales.dtype == torch.float16 and packed.scales.shape == (512, 64 // (group_size or 64))
    weight = model.get_input_embeddings().weight.data
    assert torch.equal(packed.dense(torch.bfloat16), weight)  # bit for bit, not close
    assert int(packed.codes.max()) < 2**bits


def _weight_bytes_counted(shape) -> int:
    from slmsearch.hwmodel.memory import static_bytes

    return static_bytes(shape).static_total  # weights + scales/zeros + sparsity metadata + adapters


@pytest.fixture(scope="module")
def packed_export(tiny_checkpoint: Path, data_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """A finished folder of a 4-bit-embedding plan, and the cache entry it was copied from."""
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan

    root = tmp_path_factory.mktemp("packed")
    plan = Plan.from_dict([{"stage": "embedding", "bits": 4}])
    cache = StageCache(root / "cache")
    result = run(plan, str(tiny_checkpoint), data_dir, CalibSettings(n_samples=4, seqlen=32, batch=4),
                 cache=cache, out=root / "out")
    entry = next(p for p in (root / "cache").iterdir() if (p / checkpoint.CONFIG_FILE).is_file())
    return plan, result.checkpoint_dir, entry


def test_a_4bit_embedding_export_is_the_size_the_hardware_model_counts(packed_export, tiny_checkpoint):
    """The weight files (every *.safetensors: the config, tokenizer and records are left out, as
    the tiny model's tokenizer alone outweighs its weights) are within 10% of the bytes the memory
    model counts for weights; the dense copy (fp32 here, 8x the packed codes) is gone."""
    from slmsearch.hwmodel import ModelShape

    plan, folder, entry = packed_export
    counted = _weight_bytes_counted(plan.shape(ModelShape.from_checkpoint(tiny_checkpoint)))
    on_disk = checkpoint.disk_bytes(folder)["weights"]
    assert abs(on_disk - counted) <= 0.10 * counted, (on_disk, counted)
    assert checkpoint.disk_bytes(entry)["weights"] > 3 * counted  # the cache entry keeps the dense copy
    from safetensors import safe_open

    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert "model.embed_tokens.weight" not in f.keys()
    measured = dataclasses.replace(ModelShape.from_checkpoint(folder), name="")
    assert measured == dataclasses.replace(ModelShape.from_checkpoint(entry), name="")
    assert measured.embedding_format.weight_bits == 4 and measured.embedding_format.zero_bits == 0


def test_a_packed_folder_loads_to_the_model_the_stage_made(packed_export):
    plan, folder, entry = packed_export
    unpacked, _ = checkpoint.load(folder)
    dense, _ = checkpoint.load(entry)
    assert torch.equal(unpacked.get_input_embeddings().weight, dense.get_input_embeddings().weight)
    assert unpacked.get_output_embeddings().weight.data_ptr() == unpacked.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(logits(unpacked), logits(dense), rtol=0, atol=0)


def test_finish_refuses_a_dense_copy_that_differs_from_its_codes(packed_export, tmp_path):
    from safetensors.torch import load_file, save_file

    _, _, entry = packed_export
    folder = tmp_path / "copy"
    checkpoint.copy_folder(entry, folder)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.embed_tokens.weight"][0, 0] += 1.0
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(SlmsearchError, match="differs from its packed codes"):
        checkpoint.finish(folder)


def test_a_packed_embedding_survives_gptq_and_loads_through_gptqmodel(tiny_checkpoint, data_dir, tmp_path, capfd):
    """gptqmodel re-saves the dense embedding it read (in bf16); EoRA's gptqmodel load of the GPTQ
    folder does not take the packed codes for a GPTQ embedding; the finished folder drops the dense
    copy, and the dense view gptqmodel loads holds the unpacked codes in that dtype, bit for bit."""
    from safetensors import safe_open

    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.hwmodel import ModelShape

    plan = Plan.from_dict([{"stage": "embedding", "bits": 4, "group_size": 32},
                           {"stage": "gptq", "bits": 4, "group_size": 32}, {"stage": "eora", "rank": 4}])
    out = tmp_path / "out"
    run(plan, str(tiny_checkpoint), data_dir, CalibSettings(n_samples=4, seqlen=32, batch=4), out=out)
    err = capfd.readouterr().err.splitlines()
    for stage in ("gptq", "eora"):  # one progress line per decoder layer
        lines = [line.split(" (")[0] for line in err if line.startswith(f"[{stage}]")]
        assert lines == [f"[{stage}] layer {i}/4" for i in range(1, 5)], err
    assert checkpoint.is_gptq_folder(out) and checkpoint.has_packed_embedding(out) and checkpoint.has_adapter(out)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        assert not {"model.embed_tokens.weight", "lm_head.weight"} & set(f.keys())
    packed, dtype = checkpoint.read_packed(out)
    model, _ = checkpoint.load(out, dense=True)  # gptqmodel's load, then its dense copy in the packed dtype
    weight = model.get_input_embeddings().weight
    assert str(weight.dtype) == f"torch.{dtype}"
    assert torch.equal(weight.cpu(), packed["embed"].dense(weight.dtype))
    assert torch.isfinite(logits(model)).all()
    shape = ModelShape.from_checkpoint(out)
    assert (shape.embedding_format.weight_bits, shape.embedding_format.group_size) == (4, 32)
