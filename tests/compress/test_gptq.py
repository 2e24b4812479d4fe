"""GPTQ + EoRA through gptqmodel on a tiny model: error ordering, sparsity, reload with adapter."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from conftest import DATA_DIR, TINY_CALIB, finished_copy
from slmsearch.compress import kernels
from slmsearch.compress.cache import StageCache
from slmsearch.compress.calib import CalibSettings
from slmsearch.compress.gptq import Gptq
from slmsearch import checkpoint
from slmsearch.compress.pipeline import run
from slmsearch.compress.plan import Plan
from slmsearch.errors import SlmsearchError

LAYER = "model.layers.1.mlp.up_proj"


def dequantized(folder, name=LAYER):
    model, _ = checkpoint.load(folder)
    module = dict(model.named_modules())[name]
    return module.dequantize_weight().T.float()  # [out, in]


def layer_inputs(tiny_base, name=LAYER):
    from transformers import AutoModelForCausalLM

    from slmsearch.compress.calib import Calibration
    from conftest import byte_tokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    calib = Calibration.from_data(byte_tokenizer(), DATA_DIR, CalibSettings(**TINY_CALIB))
    seen = []
    handle = dict(model.named_modules())[name].register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        model(calib.tokens)
    handle.remove()
    return dict(model.named_modules())[name].weight.detach(), torch.cat(seen)


def output_error(weight, approx, inputs):
    """Relative output error ``||X (W - A)^T||_F / ||X W^T||_F`` of a linear layer on inputs."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()
    return float(torch.linalg.norm(x @ (weight.float() - approx.float()).T) / torch.linalg.norm(x @ weight.float().T))


def quantized_zero_fraction(model):
    """Fraction of a GPTQ model's quantized weights that dequantize to exactly 0."""
    weights = [m.dequantize_weight() for m in model.modules() if hasattr(m, "qweight")]
    return sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)


def test_gptq_beats_rtn_and_eora_helps(quantized, tiny_base):
    weight, x = layer_inputs(tiny_base)
    rtn = output_error(weight, kernels.rtn_quantize(weight, 4, 32), x)
    gptq_w = dequantized(quantized["gptq"].checkpoint_dir)
    gptq = output_error(weight, gptq_w, x)
    adapter = load_file(str(quantized["eora"].checkpoint_dir / "adapter" / "adapter_model.safetensors"))
    a = next(v for k, v in adapter.items() if LAYER.split("model.")[1] in k and "lora_A" in k).float()
    b = next(v for k, v in adapter.items() if LAYER.split("model.")[1] in k and "lora_B" in k).float()
    eora = output_error(weight, gptq_w + b @ a, x)
    assert gptq < rtn
    assert eora < gptq


def test_reload_runs_forward_with_adapter(quantized):
    folder = quantized["eora"].checkpoint_dir
    model, tok = checkpoint.load(folder)
    module = dict(model.named_modules())[LAYER]
    assert module.adapter is not None and module.adapter.rank == 16
    with torch.no_grad():
        out = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(out.float()).all()
    meta = json.loads((folder / "slmsearch.json").read_text())
    assert meta["adapter"] == {"rank": 16, "bits": 16}
    assert quantized["eora"].cache_hits == 1  # the gptq prefix was reused


def test_sparsity_survives_quantization(quantized):
    folder = quantized["sparse"].checkpoint_dir
    model, _ = checkpoint.load(folder)
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            w = module.dequantize_weight()  # [in, out]
            assert int((w == 0).sum(0).min()) >= w.shape[0] // 2, name  # every row keeps its zeros
    assert quantized_zero_fraction(model) >= 0.5
    assert quantized_zero_fraction(checkpoint.load(quantized["gptq"].checkpoint_dir)[0]) < 0.2
    report = quantized["sparse"].reports[-1]
    assert report.metrics["sparse_modules"] == 28
    meta = json.loads((folder / "slmsearch.json").read_text())
    assert meta["sparsity"] == {"format": "unstructured", "density": 0.5}


def test_group_size_must_divide(tiny_base, tmp_path):
    from conftest import byte_tokenizer
    from slmsearch.compress.calib import Calibration

    calib = Calibration.from_data(byte_tokenizer(), DATA_DIR, CalibSettings(**TINY_CALIB))
    with pytest.raises(SlmsearchError, match="must divide"):
        Gptq(bits=4, group_size=128).apply_dir(tiny_base, tmp_path / "out", calib)
    with pytest.raises(SlmsearchError, match="bits"):
        Gptq(bits=5)


def test_eora_leaves_the_gptq_entry_it_starts_from_intact(quantized, tiny_base):
    """EoRA builds its folder from the GPTQ entry's files; writing its own records and manifest must
    not write into the GPTQ entry (hard links), so the next EoRA rank reuses the GPTQ entry."""
    from slmsearch.compress.cache import MANIFEST

    gptq_dir = quantized["gptq"].checkpoint_dir
    cache = StageCache(gptq_dir.parent)  # a fresh object: verify checks every file's sha256
    assert cache.verify(gptq_dir.name)
    listed = json.loads((gptq_dir / MANIFEST).read_text())["files"]
    assert not [name for name in listed if name.startswith("adapter")]
    assert all((gptq_dir / name).stat().st_nlink == 1 for name in ("MANIFEST.json", "plan.json", "slmsearch.json"))
    other_rank = Plan.from_yaml("[{stage: gptq, bits: 4, group_size: 32}, {stage: eora, rank: 8}]")
    again = run(other_rank, str(tiny_base), DATA_DIR, CalibSettings(**TINY_CALIB), cache=cache)
    assert again.cache_hits == 1 and list(again.stage_seconds) == ["eora"]


@pytest.mark.parametrize("name", ["eora", "sparse"])
def test_dense_evaluation_model_computes_the_quantized_model(quantized, name):
    """``checkpoint.load(dense=True)``: plain Linears in the compute dtype (the kernel's, bfloat16,
    or float32 where bfloat16 is emulated and the kernel runs in float16) with gptqmodel's
    dequantized weights (in float32 there: the stored float16 scales exactly) and the EoRA adapter
    merged give the kernel model's logits."""
    from slmsearch.compress.gptqmodel_runtime import compute_dtype

    folder = quantized[name].checkpoint_dir
    kernel, _ = checkpoint.load(folder)
    dense, _ = checkpoint.load(folder, dense=True)
    dtype = compute_dtype()
    assert not any(hasattr(m, "qweight") for m in dense.modules())
    module = dict(dense.named_modules())[LAYER]
    assert isinstance(module, torch.nn.Linear) and module.weight.dtype == dtype
    kernel_module = dict(kernel.named_modules())[LAYER]
    scales = kernel_module.scales
    kernel_module.scales = scales.to(dtype) if dtype == torch.float32 else scales
    expected = kernel_module.dequantize_weight().float()
    kernel_module.scales = scales
    if name == "eora":
        plain = expected.to(dtype)
        expected = expected + kernel_module.adapter.lora_A.float() @ kernel_module.adapter.lora_B.float()
        assert not torch.equal(module.weight.T, plain)  # the adapter is in
    assert torch.equal(module.weight.T, expected.to(dtype))
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 11]])
    with torch.no_grad():
        ref = kernel(ids).logits.float()
        got = dense(ids).logits.float()
    assert torch.allclose(got, ref, atol=0.02 * ref.abs().max().item())
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.75


def test_gptqmodel_workers_share_the_cores_instead_of_each_taking_all(quantized):
    """The GPTQ stages above ran on gptqmodel's CPU workers: each must hold cores // workers torch
    threads (not all cores each, which oversubscribes them), and this thread keeps its own count."""
    import threading

    import gptqmodel

    from slmsearch.compress.gptqmodel_runtime import on_each_cpu_worker

    workers = len(gptqmodel.get_device_thread_pool()._worker_groups["cpu"])
    own = torch.get_num_threads()
    seen = dict(on_each_cpu_worker(lambda: (threading.current_thread().name, torch.get_num_threads())))
    assert len(seen) == workers  # one probe on each worker
    assert set(seen.values()) == {max(1, own // workers)}, seen
    assert torch.get_num_threads() == own


def test_a_failing_worker_task_is_raised_in_the_caller_not_on_the_worker(quantized):
    """gptqmodel ends the process when a worker task raises: the error must come back here."""
    from slmsearch.compress.gptqmodel_runtime import on_each_cpu_worker

    def fail():
        raise ValueError("probe failed")

    with pytest.raises(ValueError, match="probe failed"):
        on_each_cpu_worker(fail)
    assert len(on_each_cpu_worker(lambda: 1)) >= 1  # the workers are still there


def test_quantizing_leaves_nothing_in_the_working_directory(quantized):
    # gptqmodel writes a log file per quantize / EoRA run into ./logs unless redirected
    assert quantized["cwd_after"] == []


def test_module_logs_go_to_a_temporary_folder_removed_afterwards(tmp_path, monkeypatch):
    from slmsearch.compress.gptqmodel_runtime import gptqmodel_env, module_logs_out_of_the_working_directory

    gptqmodel_env()
    from gptqmodel.looper import loop_processor

    monkeypatch.chdir(tmp_path)
    before = loop_processor._PROJECT_LOG_DIR
    with module_logs_out_of_the_working_directory() as folder:
        assert folder is not None and folder.is_dir() and tmp_path not in folder.parents
        path = loop_processor.LoopProcessor._build_log_file_path("gptq", "now")
        assert path.parent == folder
        path.write_text("{}")
    assert not folder.exists()
    assert loop_processor._PROJECT_LOG_DIR == before
    assert list(tmp_path.iterdir()) == []


def test_gptqmodel_logs_warnings_only_unless_asked_for_more(monkeypatch, capfd):
    from slmsearch.compress.gptqmodel_runtime import LOG_LEVEL_ENV, gptqmodel_env

    monkeypatch.delenv(LOG_LEVEL_ENV, raising=False)
    gptqmodel_env()
    from gptqmodel.utils.logger import setup_logger

    log = setup_logger()  # the logger gptqmodel's modules log through
    try:
        capfd.readouterr()
        log.info("module table row 1")
        log.warn("a gptqmodel warning 1")
        shown = "".join(capfd.readouterr())
        assert "module table row 1" not in shown and "a gptqmodel warning 1" in shown
        # tokenicer (gptqmodel's tokenizer helper) logs through stdlib logging and configures the
        # root logger at INFO on import; its own logger is set instead
        assert logging.getLogger("tokenicer").getEffectiveLevel() == logging.WARNING
        monkeypatch.setenv(LOG_LEVEL_ENV, "info")
        gptqmodel_env()
        log.info("module table row 2")
        assert "module table row 2" in "".join(capfd.readouterr())
        assert logging.getLogger("tokenicer").getEffectiveLevel() == logging.INFO
        monkeypatch.setenv(LOG_LEVEL_ENV, "loud")
        with pytest.raises(SlmsearchError, match=f"{LOG_LEVEL_ENV}='loud' is not a log level"):
            gptqmodel_env()
    finally:
        monkeypatch.delenv(LOG_LEVEL_ENV)
        gptqmodel_env()


def test_gptqmodel_progress_bars_are_not_redrawn_into_a_file(monkeypatch):
    """Off a terminal logbar must see a headless backend, so gptqmodel's bars are not redrawn
    into logs (logbar alone says otherwise: under pytest, and off CI, it always draws)."""
    import io
    import sys

    from logbar import terminal

    from slmsearch.compress.gptqmodel_runtime import gptqmodel_env

    gptqmodel_env()
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert terminal.render_backend_state(stream=sys.stdout).headless


# mixed precision across layers -----------------------------------------------------------------
def _layer_widths(folder):
    from slmsearch.hwmodel import ModelShape

    return [layer.linear_format.weight_bits for layer in ModelShape.from_checkpoint(folder).layers]


def test_mixed_precision_widens_the_layer_whose_rounding_hurts_most(quantized, tiny_base):
    from conftest import byte_tokenizer
    from slmsearch.compress.calib import Calibration
    from slmsearch.compress.sensitivity import layer_sensitivity

    result = quantized["mixed"]
    calib = Calibration.from_data(byte_tokenizer(), DATA_DIR, CalibSettings(**TINY_CALIB))
    scores = layer_sensitivity(checkpoint.load(tiny_base)[0], calib, 3, 32)
    widest = max(range(4), key=lambda i: scores[i])
    expected = [4 if i == widest else 3 for i in range(4)]
    assert result.reports[-1].metrics["layer_bits"] == expected
    assert _layer_widths(result.checkpoint_dir) == expected  # what the tensors hold
    model = checkpoint.load(result.checkpoint_dir)[0]
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[1, 2, 3, 4]])).logits.float()).all()


def test_mixed_plan_prices_what_the_checkpoint_holds(quantized, tiny_base, tmp_path):
    from slmsearch.hwmodel import ModelShape
    from slmsearch.hwmodel.memory import static_bytes

    base = ModelShape.from_hf_config(json.loads((tiny_base / checkpoint.CONFIG_FILE).read_text()))
    for name in ("mixed", "sparse_mixed", "asym"):
        result = quantized[name]
        measured = ModelShape.from_checkpoint(finished_copy(result.checkpoint_dir, tmp_path / name))
        predicted = result.plan.shape(base)
        # the plan does not know which layer sensitivity widens; the bytes do not depend on it
        assert static_bytes(measured).static_total == static_bytes(predicted).static_total, name
        assert sorted(_layer_widths(result.checkpoint_dir)) == sorted(l.linear_format.weight_bits for l in predicted.layers)
    assert _layer_widths(quantized["sparse_mixed"].checkpoint_dir) == [3, 4, 3, 8]


def test_sparsity_survives_mixed_widths(quantized):
    model, _ = checkpoint.load(quantized["sparse_mixed"].checkpoint_dir)
    for name, module in model.named_modules():
        if hasattr(module, "qweight"):
            w = module.dequantize_weight()
            assert int((w == 0).sum(0).min()) >= w.shape[0] // 2, name
    assert quantized["sparse_mixed"].reports[-1].metrics["zeros_restored"] >= 0


@pytest.mark.parametrize("stage,match", [
    ({"bits": 3, "group_size": 32, "layer_bits": [3, 4, 3]}, "gptq.layer_bits has 3 entries, but the model quantized has 4 decoder layers"),
    ({"bits": 3, "group_size": 32, "wider_layers": 5}, "gptq.wider_layers=5 exceeds the 4 decoder layers"),
])
def test_per_layer_widths_must_fit_the_model(stage, match, tiny_base, tmp_path):
    plan = Plan.from_dict([{"stage": "gptq", **stage}])
    with pytest.raises(SlmsearchError, match=match):
        run(plan, str(tiny_base), DATA_DIR, CalibSettings(**TINY_CALIB), out=tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stage,match", [
    ({"bits": 4, "layer_bits": [4, 5]}, "layer_bits entries must be one of"),
    ({"bits": 4, "layer_bits": [8, 8]}, "gptq.bits must be the narrowest"),
    ({"bits": 8, "wider_layers": 2}, "needs a width with a wider one"),
    ({"bits": 3, "wider_layers": 2, "layer_bits": [3, 4]}, "not both"),
])
def test_mixed_settings_are_checked(stage, match):
    with pytest.raises(SlmsearchError, match=match):
        Gptq(**stage)


def test_most_sensitive_picks_the_largest_scores_in_layer_order():
    from slmsearch.compress.sensitivity import most_sensitive

    assert most_sensitive([0.1, 0.5, 0.2, 0.5, 0.0], 2) == (1, 3)
    assert most_sensitive([0.1, 0.5, 0.2], 0) == ()


# the compute dtype ---------------------------------------------------------------------------------
def test_emulated_bfloat16_falls_back_to_float32():
    from slmsearch.compress.gptqmodel_runtime import choose_dtype

    assert choose_dtype(bf16_s=1.0, fp32_s=1.0) == "bfloat16"
    assert choose_dtype(bf16_s=0.4, fp32_s=1.0) == "bfloat16"  # AMX / AVX-512 bf16: faster
    assert choose_dtype(bf16_s=5.0, fp32_s=1.0) == "float32"  # emulated (AVX only): 4-10x slower


def test_float32_compute_quantizes_and_loads_every_width_in_float32(tiny_base, tmp_path, monkeypatch):
    """The path a CPU without native bfloat16 takes, forced: GPTQ in float32, then a 3-bit plan with
    a 4-bit layer and an EoRA adapter (gptqmodel's one float32 kernel takes 4-bit layers only: this
    plan used not to load, nor could EoRA run). The dense copy is float32 throughout: each quantized
    weight is its stored float16 scale times an integer, exactly; the norms are the stored ones."""
    from safetensors import safe_open

    from slmsearch.compress import gptqmodel_runtime as runtime

    monkeypatch.setenv(runtime.ENV_COMPUTE_DTYPE, "float32")
    assert runtime.kernel_dtype() == torch.float16 and runtime.kernel_dtype(torch.bfloat16) == torch.bfloat16
    cache = StageCache(tmp_path / "stages")
    gptq = "{stage: gptq, bits: 3, group_size: 32, wider_layers: 1}"
    runs = {name: run(Plan.from_yaml(text), str(tiny_base), DATA_DIR, CalibSettings(**TINY_CALIB), cache=cache)
            for name, text in {"gptq": f"[{gptq}]", "eora": f"[{gptq}, {{stage: eora, rank: 8}}]"}.items()}
    folder = runs["gptq"].checkpoint_dir
    assert sorted(set(_layer_widths(folder))) == [3, 4]
    model, _ = checkpoint.load(folder, dense=True)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        for name in ("model.layers.0.mlp.up_proj", "model.layers.1.mlp.up_proj"):
            scales = f.get_tensor(f"{name}.scales").float()  # [groups, out]
            weight = dict(model.named_modules())[name].weight.detach()  # [out, in]
            codes = weight / scales.T.repeat_interleave(32, dim=1)
            assert torch.equal(codes, codes.round()) and codes.abs().max() <= 15
        norm = "model.layers.0.input_layernorm.weight"
        assert torch.equal(model.get_parameter(norm), f.get_tensor(norm).float())
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 11]])
    adapted, _ = checkpoint.load(runs["eora"].checkpoint_dir, dense=True)
    kernel, _ = checkpoint.load(runs["eora"].checkpoint_dir)  # not dense: gptqmodel's kernels, in float16
    assert kernel.dtype == torch.float16
    with torch.no_grad():
        plain, got, ref = (m(ids).logits.float() for m in (model, adapted, kernel))
    assert torch.isfinite(got).all() and not torch.equal(got, plain)  # the adapter is in
    assert torch.allclose(got, ref, atol=0.02 * ref.abs().max().item())
    monkeypatch.setenv(runtime.ENV_COMPUTE_DTYPE, "float16")
    with pytest.raises(SlmsearchError, match="SLMSEARCH_COMPUTE_DTYPE='float16': use bfloat16 or float32"):
        runtime.compute_dtype()


@pytest.mark.parametrize("name,left_out", [("gptq", {"g_idx", "qzeros"}), ("eora", {"g_idx", "qzeros"}),
                                           ("sparse_mixed", {"g_idx", "qzeros"}), ("asym", {"g_idx"}),
                                           ("scales8", {"g_idx", "qzeros"})])
def test_a_finished_folder_leaves_out_what_it_can_rebuild_and_computes_the_same(quantized, name, left_out, tmp_path):
    """finish drops g_idx (columns in their own order) and a symmetric grid's qzeros (one value),
    every quantized Linear, and nothing else; load rebuilds them: the same logits, bit for bit."""
    from safetensors import safe_open

    source = quantized[name].checkpoint_dir
    folder = finished_copy(source, tmp_path / "finished")

    def names(where):
        keys = set()
        for path in where.glob("*.safetensors"):
            with safe_open(str(path), framework="pt") as f:
                keys.update(f.keys())
        return keys

    before, after = names(source), names(folder)
    gone = {n.rsplit(".", 1)[1] for n in before - after}
    assert gone == left_out
    assert all(f"{n.rsplit('.', 1)[0]}.{kind}" not in after for n in after if n.endswith(".qweight") for kind in left_out)
    assert checkpoint.derived_gptq(folder) == sorted(left_out)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        expected = checkpoint.load(source)[0](prompt).logits
        got = checkpoint.load(folder)[0](prompt).logits
    assert torch.equal(got, expected)


def test_only_tensors_equal_to_their_rebuilt_form_are_left_out():
    from slmsearch import gptq_compact

    in_f, out_f, group, bits = 64, 32, 32, 3
    tensors = {"m.qweight": torch.zeros(in_f * bits // 32, out_f, dtype=torch.int32),
               "m.scales": torch.ones(in_f // group, out_f, dtype=torch.float16),
               "m.g_idx": gptq_compact.identity_groups(in_f, group),
               "m.qzeros": gptq_compact.symmetric_zeros(in_f // group, out_f, bits)}
    assert gptq_compact.derivable(tensors, group, sym=True) == {"m.g_idx": "g_idx", "m.qzeros": "qzeros"}
    assert gptq_compact.derivable(tensors, group, sym=False) == {"m.g_idx": "g_idx"}
    reordered = {**tensors, "m.g_idx": tensors["m.g_idx"].flip(0)}  # activation order: kept
    shifted = {**tensors, "m.qzeros": tensors["m.qzeros"] + 1}  # not one symmetric zero: kept
    assert gptq_compact.derivable(reordered, group, sym=True) == {"m.qzeros": "qzeros"}
    assert gptq_compact.derivable(shifted, group, sym=True) == {"m.g_idx": "g_idx"}
    shapes = {k: list(v.shape) for k, v in tensors.items() if k in ("m.qweight", "m.scales")}
    rebuilt = gptq_compact.rebuilt(shapes, ["g_idx", "qzeros"], group)
    assert torch.equal(rebuilt["m.g_idx"], tensors["m.g_idx"]) and torch.equal(rebuilt["m.qzeros"], tensors["m.qzeros"])


def _tensors(folder, suffix):
    from safetensors import safe_open

    out = {}
    for path in folder.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as f:
            out.update({(path.name, k): f.get_tensor(k) for k in f.keys() if k.endswith(suffix)})
    return out


def test_scales_on_8_bit_grids_keep_the_codes_and_move_each_scale_by_under_half_a_step(quantized):
    """scale_bits 8 rounds each fp16 scale onto its tensor's log2 grid after GPTQ: the packed codes
    are GPTQ's own (the same plan with fp16 scales), each scale moves by at most half a grid step,
    and the model's output moves far less than the rounding of the weights moved it."""
    plain, rounded = quantized["gptq3"].checkpoint_dir, quantized["scales8"].checkpoint_dir
    assert quantized["scales8"].reports[-1].metrics["scales_on_grids"] == 4 * 7
    q16 = {k: v for (_, k), v in _tensors(plain, ".qweight").items()}
    q8 = {k: v for (_, k), v in _tensors(rounded, ".qweight").items()}
    assert q16.keys() == q8.keys() and all(torch.equal(q16[k], q8[k]) for k in q16)
    s16 = {k: v for (_, k), v in _tensors(plain, ".scales").items()}
    s8 = {k: v for (_, k), v in _tensors(rounded, ".scales").items()}
    grids = {k: v for (_, k), v in _tensors(rounded, ".scales_log2_grid").items()}
    assert len(grids) == len(s16) == 28
    for name, scales in s16.items():
        step = float(grids[name.replace(".scales", ".scales_log2_grid")][1])
        moved = (torch.log2(s8[name].float()) - torch.log2(scales.float())).abs().max()
        assert 0 < step <= 16 / 255 and moved <= step / 2 + 2e-3  # half a step, plus fp16's rounding
    assert not all(torch.equal(s16[k], s8[k]) for k in s16)
    ids = torch.tensor([[5, 17, 99, 3, 42, 7, 64, 11, 8, 250]])
    with torch.no_grad():
        a = checkpoint.load(plain, dense=True)[0](ids).logits.float()
        b = checkpoint.load(rounded, dense=True)[0](ids).logits.float()
    assert 0 < (a - b).abs().max() < 0.05 * a.abs().max()


def test_a_finished_folder_stores_8_bit_scale_codes_that_the_hardware_model_counts(quantized, tmp_path):
    from slmsearch.hwmodel import ModelShape

    source = quantized["scales8"].checkpoint_dir
    folder = finished_copy(source, tmp_path / "finished")
    stored = _tensors(folder, ".scales")
    assert {f for f, _ in stored} == {checkpoint.SCALE_CODES_FILE} and len(stored) == 28
    assert all(t.dtype == torch.uint8 for t in stored.values())
    assert checkpoint.has_scale_codes(folder) and not checkpoint.has_scale_codes(source)
    shape = ModelShape.from_checkpoint(folder)
    assert {layer.linear_format.scale_bits for layer in shape.layers} == {8}
    assert ModelShape.from_checkpoint(source).layers[0].linear_format.scale_bits == 16  # fp16 until finished
    saved = sum(p.stat().st_size for p in source.glob("*.safetensors")) - sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    n_scales = sum(t.numel() for t in stored.values())
    assert saved >= n_scales  # one byte a scale at least (g_idx and qzeros went too)
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    with torch.no_grad():
        assert torch.equal(checkpoint.load(folder, dense=True)[0](prompt).logits,
                           checkpoint.load(source, dense=True)[0](prompt).logits)


def test_finish_refuses_scales_that_left_their_grid(quantized, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "copy"
    checkpoint.copy_folder(quantized["scales8"].checkpoint_dir, folder)
    path = next(p for p in checkpoint.weight_files(folder))
    tensors = load_file(str(path))
    name = next(k for k in tensors if k.endswith(".scales"))
    tensors[name] = tensors[name] * 1.01
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(SlmsearchError, match=rf"{name} is not on its 8-bit scale grid; re-create the checkpoint"):
        checkpoint.finish(folder)
