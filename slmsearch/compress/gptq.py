"""GPTQ quantization and EoRA adapters, through gptqmodel (which works on checkpoint folders).

Known-good path on CPU (shared/research/toolchain.md): load the dense folder in bf16, quantize,
save; then generate the EoRA adapter with ``GPTQModel.adapter.generate`` in bf16 (the one-call
quantize-with-adapter variant deadlocked on CPU). Inference loads the GPTQ folder with the
adapter: :func:`slmsearch.compress.pipeline.load_checkpoint`.

Sparsity: GPTQ's error feedback moves pruned (zero) weights to non-zero values before rounding,
so after quantization only part of a WANDA pattern would be zero. With ``keep_sparsity`` the
stage re-zeroes those positions in the packed integers (zero is on the symmetric grid: the
integer equal to the zero point), so the dequantized weight is exactly zero wherever the input
weight was zero, and the memory model may count the pruning's density.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slmsearch.compress import kernels
from slmsearch.compress.calib import Calibration
from slmsearch.compress.gptqmodel_runtime import (
    compute_device,
    gptqmodel_env,
    limit_worker_threads,
    module_logs_out_of_the_working_directory,
)
from slmsearch.compress.stage import Stage, StageReport, Timer, check_choice, check_range
from slmsearch.errors import SlmsearchError

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUPS = (32, 64, 128, -1)  # -1 = one group per output channel (per-channel)
EORA_DIR = "adapter"  # sub-folder holding the EoRA adapter (hwmodel reads adapter/ too)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json", "chat_template.jinja")


def calibration_rows(calib: Calibration) -> list[dict[str, list[int]]]:
    """The calibration windows as gptqmodel wants them: token ids with a full attention mask."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib.tokens]


# Cache bookkeeping of the source folder: never carried into a new folder (see link_or_copy_tree).
_NOT_COPIED = ("MANIFEST.json", ".last_used")


def link_or_copy_tree(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder into ``dst`` (created): ``*.safetensors`` are hard-linked when
    possible (never rewritten in place: they are replaced whole), every other file is copied, so
    that writing a small file of ``dst`` (records, manifest) cannot write into ``src``'s inode. The
    source's cache manifest and LRU stamp are not copied."""
    dst.mkdir(parents=True, exist_ok=True)
    for path in src.rglob("*"):
        target = dst / path.relative_to(src)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            continue
        if path.parent == src and path.name in _NOT_COPIED:
            continue
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".safetensors":
            try:
                os.link(path, target)
                continue
            except OSError:
                pass
        shutil.copy2(path, target)


def copy_tokenizer(src: Path, dst: Path) -> None:
    for name in TOKENIZER_FILES:
        if (src / name).is_file() and not (dst / name).exists():
            shutil.copy2(src / name, dst / name)


@dataclass(frozen=True)
class Gptq(Stage):
    """GPTQ weight quantization of every decoder Linear (embedding/lm_head untouched)."""

    kind = "gptq"
    works_on_dirs = True
    bits: int = 4  # 2, 3, 4 or 8
    group_size: int = 128  # 32, 64, 128, or -1 (per output channel)
    act_order: bool = False  # gptqmodel desc_act: quantize columns by decreasing Hessian diagonal
    keep_sparsity: bool = True  # re-zero weights that were exactly zero before quantization

    def __post_init__(self) -> None:
        check_choice("gptq", "bits", self.bits, GPTQ_BITS)
        check_choice("gptq", "group_size", self.group_size, GPTQ_GROUPS)
        for name in ("act_order", "keep_sparsity"):
            if not isinstance(getattr(self, name), bool):
                raise SlmsearchError(f"gptq.{name} must be true or false, got {getattr(self, name)!r}")

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Calibration, base_dir: Path | None = None) -> StageReport:
        gptqmodel_env()
        from gptqmodel import GPTQModel, QuantizeConfig

        limit_worker_threads()
        _check_group_divides(Path(src_dir), self.group_size)
        with Timer() as t, module_logs_out_of_the_working_directory():
            zero_masks = _zero_masks(Path(src_dir)) if self.keep_sparsity else {}
            qcfg = QuantizeConfig(bits=self.bits, group_size=self.group_size, desc_act=self.act_order, sym=True, device=compute_device())
            model = GPTQModel.load(str(src_dir), quantize_config=qcfg, dtype=torch.bfloat16)
            model.quantize(calibration_rows(calib), batch_size=calib.settings.batch, tokenizer=calib.tokenizer)
            model.save(str(out_dir))
            del model
            restored = restore_zeros_in_folder(Path(out_dir), zero_masks, self.bits) if zero_masks else 0
            copy_tokenizer(Path(src_dir), Path(out_dir))
        metrics: dict[str, Any] = {"zeros_restored": restored, "sparse_modules": len(zero_masks)}
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)


@dataclass(frozen=True)
class Eora(Stage):
    """EoRA: a rank-r adapter, fitted in the activation eigenspace, beside a GPTQ checkpoint."""

    kind = "eora"
    works_on_dirs = True
    rank: int = 16  # 0 = no adapter

    def __post_init__(self) -> None:
        check_range("eora", "rank", self.rank, 0, 4096, integer=True)

    def is_noop(self) -> bool:
        return self.rank == 0

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Calibration, base_dir: Path | None = None) -> StageReport:
        with Timer() as t:
            link_or_copy_tree(Path(src_dir), Path(out_dir))
            if not self.is_noop():
                if base_dir is None:
                    raise SlmsearchError("eora needs the dense checkpoint that GPTQ quantized (base_dir)")
                gptqmodel_env()
                from gptqmodel import GPTQModel
                from gptqmodel.adapter.adapter import Lora

                limit_worker_threads()
                with module_logs_out_of_the_working_directory():
                    GPTQModel.adapter.generate(
                        adapter=Lora(path=str(Path(out_dir) / EORA_DIR), rank=self.rank),
                        model_id_or_path=str(base_dir),
                        quantized_model_id_or_path=str(src_dir),
                        calibration_dataset=calibration_rows(calib),
                        batch_size=calib.settings.batch,
                        tokenizer=calib.tokenizer,
                        dtype=torch.bfloat16,
                        device=compute_device(),
                    )
                if not (Path(out_dir) / EORA_DIR / "adapter_config.json").is_file():
                    raise SlmsearchError(f"gptqmodel wrote no EoRA adapter under {Path(out_dir) / EORA_DIR}")
        return StageReport(self.kind, self.to_dict(), t.seconds, {"rank": self.rank})


@torch.no_grad()
def dequantize_to_dense(model: torch.nn.Module, dtype: torch.dtype) -> int:
    """Replace every gptqmodel quantized Linear of ``model`` by a plain ``nn.Linear`` in ``dtype``
    holding the weight gptqmodel's kernel computes with (``dequantize_weight``: the quantization
    grid's values), its EoRA adapter merged in (the kernel adds ``(x @ A) @ B``, the same as
    ``x @ (W + A @ B)``; the sum is formed in fp32 and rounded once).

    In the kernel's own compute dtype (bf16 on a CPU) the model computes what the kernel model
    does, without dequantizing every weight in every forward call: on a 2-core CPU a trial's
    evaluation runs ~2x faster (docs/benchmarks.md). Returns the number of modules replaced.
    """
    gptqmodel_env()
    from gptqmodel.nn_modules.qlinear import BaseQuantLinear

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, BaseQuantLinear):
                continue
            weight = child.dequantize_weight().float()  # [in, out]
            adapter = getattr(child, "adapter", None)
            if adapter is not None and getattr(adapter, "lora_A", None) is not None:
                weight = weight + adapter.lora_A.float() @ adapter.lora_B.float()
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    dtype=dtype, device=weight.device)
            dense.weight.copy_(weight.T.to(dtype))
            if child.bias is not None:
                dense.bias.copy_(child.bias.to(dtype))
            setattr(parent, name, dense)
            replaced += 1
    return replaced


def _check_group_divides(src: Path, group_size: int) -> None:
    if group_size == -1:
        return
    config = json.loads((src / "config.json").read_text())
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    dims = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"], "o_proj input": n_heads * head_dim}
    bad = {k: v for k, v in dims.items() if v % group_size}
    if bad:
        raise SlmsearchError(
            f"gptq.group_size={group_size} must divide every Linear input size, but {bad} do not; "
            "choose a smaller group size (e.g. 32 or 64) or structured-prune with a matching multiple"
        )


def _zero_masks(src: Path) -> dict[str, torch.Tensor]:
    """Boolean zero masks of the decoder Linear weights that hold exact zeros (a pruned model)."""
    from safetensors import safe_open

    masks: dict[str, torch.Tensor] = {}
    for file in sorted(src.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if ".layers." in key and key.endswith("_proj.weight"):
                    weight = handle.get_tensor(key)
                    mask = weight == 0
                    if mask.float().mean() > 0.01:  # random exact zeros in a dense model: ignore
                        masks[key[: -len(".weight")]] = mask
    return masks


@torch.no_grad()
def restore_zeros_in_folder(folder: Path, masks: dict[str, torch.Tensor], bits: int) -> int:
    """Rewrite the packed ``qweight`` of each masked module of a saved GPTQ (v1) checkpoint so
    that every masked weight holds its group's zero point, i.e. dequantizes to exactly 0.

    v1 stores ``zero - 1`` in ``qzeros`` (gptqmodel's ``convert_gptq_v2_to_v1_format``).
    Returns the number of weights that were non-zero after GPTQ and are zero again.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    changed = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        touched = False
        for name, mask in masks.items():
            if f"{name}.qweight" not in tensors:
                continue
            qweight = tensors[f"{name}.qweight"]  # [in * bits / 32, out]
            codes = kernels.unpack_bits(qweight, bits)[: mask.shape[1]]  # [in, out]
            zeros = kernels.unpack_bits(tensors[f"{name}.qzeros"].T.contiguous(), bits).T + 1  # [groups, out]
            g_idx = tensors[f"{name}.g_idx"].long()
            target = zeros[g_idx]  # [in, out]
            where = mask.T
            changed += int((codes[where] != target[where]).sum())
            codes[where] = target[where]
            tensors[f"{name}.qweight"] = kernels.pack_bits(codes, bits)
            touched = True
        if touched:
            tmp = file.with_suffix(".tmp")
            save_file(tensors, str(tmp), metadata=metadata)
            os.replace(tmp, file)
    return changed


@torch.no_grad()
def quantized_zero_fraction(folder: Path) -> float:
    """Fraction of the GPTQ weights of a saved checkpoint that dequantize to exactly 0 (integer
    equal to its group's zero point), read from the packed tensors (no kernels needed)."""
    from safetensors import safe_open

    zero = total = 0
    for file in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            keys = set(handle.keys())
            for key in sorted(k for k in keys if k.endswith(".qweight")):
                name = key[: -len(".qweight")]
                bits = _bits_of(Path(folder))
                codes = kernels.unpack_bits(handle.get_tensor(key), bits)
                g_idx = handle.get_tensor(f"{name}.g_idx").long()
                codes = codes[: g_idx.numel()]
                zeros = kernels.unpack_bits(handle.get_tensor(f"{name}.qzeros").T.contiguous(), bits).T + 1
                zero += int((codes == zeros[g_idx]).sum())
                total += codes.numel()
    return zero / max(total, 1)


def _bits_of(folder: Path) -> int:
    path = folder / "quantize_config.json"
    config = json.loads(path.read_text()) if path.is_file() else json.loads((folder / "config.json").read_text())["quantization_config"]
    return int(config["bits"])


def is_gptq_folder(folder: Path) -> bool:
    """True when a checkpoint folder holds a GPTQ-quantized model."""
    folder = Path(folder)
    if (folder / "quantize_config.json").is_file():
        return True
    config = folder / "config.json"
    return config.is_file() and bool(json.loads(config.read_text()).get("quantization_config"))
