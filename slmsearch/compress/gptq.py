"""GPTQ quantization and EoRA adapters, through gptqmodel (which works on checkpoint folders).

Known-good path on CPU (shared/research/toolchain.md): load the dense folder in bf16, quantize,
save; then generate the EoRA adapter with ``GPTQModel.adapter.generate`` in bf16 (the one-call
quantize-with-adapter variant deadlocked on CPU). Inference loads the GPTQ folder with the
adapter: :func:`slmsearch.checkpoint.load`.

Sparsity: GPTQ's error feedback moves pruned (zero) weights to non-zero values before rounding,
so after quantization only part of a WANDA pattern would be zero. With ``keep_sparsity`` the
stage re-zeroes those positions in the packed integers (zero is on the symmetric grid: the
integer equal to the zero point), so the dequantized weight is exactly zero wherever the input
weight was zero, and the memory model may count the pruning's density.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.checkpoint import ADAPTER_CONFIG_FILE, ADAPTER_DIR, CONFIG_FILE, copy_folder, copy_tokenizer
from slmsearch.compress.geometry import undivided_inputs
from slmsearch.compress.stage import ADAPTER_BITS, Stage, StageReport, Timer, check_choice, check_range
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    import torch

    from slmsearch.compress.calib import Calibration
    from slmsearch.hwmodel.shape import ModelShape

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUPS = (32, 64, 128, -1)  # -1 = one group per output channel (per-channel)


def calibration_rows(calib: Calibration) -> list[dict[str, list[int]]]:
    """The calibration windows as gptqmodel wants them: token ids with a full attention mask."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib.tokens]


@dataclass(frozen=True)
class Gptq(Stage):
    """GPTQ weight quantization of every decoder Linear (embedding/lm_head untouched)."""

    kind = "gptq"
    works_on_dirs = True
    column_defaults = {"gptq_bits": 16}
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

    def check_fits(self, shape: ModelShape) -> None:
        """The group size divides every quantized Linear's input size."""
        if self.group_size == -1:
            return
        dims = {name: size for layer in shape.layers for name, size, _ in layer.proj_dims(shape.hidden)}
        bad = undivided_inputs(self.group_size, dims)
        if bad:
            sizes = ", ".join(f"{size} ({', '.join(sorted(n for n, v in bad.items() if v == size))})" for size in sorted(set(bad.values())))
            raise SlmsearchError(
                f"gptq.group_size={self.group_size} must divide every Linear input size of the model, but not "
                f"{sizes}; choose a group size that divides them (e.g. 32), or -1 (one group per output channel)"
            )

    def shape(self, shape: ModelShape) -> ModelShape:
        """gptqmodel's symmetric v1 format: ``bits``-bit codes, a 16-bit scale and a ``bits``-bit
        zero point per group, and a 32-bit group index per input."""
        from slmsearch.hwmodel.shape import TensorFormat

        group = None if self.group_size == -1 else self.group_size
        return shape.with_linear_format(
            TensorFormat(weight_bits=self.bits, group_size=group, scale_bits=16, zero_bits=self.bits, g_idx_bits=32)
        )

    def label(self) -> str:
        return f"w{self.bits}g{'ch' if self.group_size == -1 else self.group_size}"

    def columns(self) -> dict[str, Any]:
        return {"gptq_bits": self.bits}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> Gptq | None:
        """``gptq_bits`` (16 = no stage) with ``group_size`` and ``act_order``."""
        bits = int(params.get("gptq_bits", 16))
        if bits == 16:
            return None
        return cls(bits=bits, group_size=int(params["group_size"]), act_order=bool(params.get("act_order", False)))

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Calibration, base_dir: Path | None = None) -> StageReport:
        import torch

        from slmsearch.compress import gptqmodel_runtime as runtime

        runtime.gptqmodel_env()
        from gptqmodel import GPTQModel, QuantizeConfig

        runtime.limit_worker_threads()
        _check_group_divides(Path(src_dir), self.group_size)
        with Timer() as t, runtime.module_logs_out_of_the_working_directory():
            zero_masks = _zero_masks(Path(src_dir)) if self.keep_sparsity else {}
            qcfg = QuantizeConfig(bits=self.bits, group_size=self.group_size, desc_act=self.act_order, sym=True, device=runtime.compute_device())
            model = GPTQModel.load(str(src_dir), quantize_config=qcfg, dtype=torch.bfloat16)
            model.layer_callback = runtime.layer_progress("gptq", _n_layers(Path(src_dir)))
            model.quantize(calibration_rows(calib), batch_size=calib.settings.batch, tokenizer=calib.tokenizer)
            with runtime.stdout_to_nothing():  # gptqmodel prints the folder's files and whole config.json
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

    def shape(self, shape: ModelShape) -> ModelShape:
        return shape.with_adapter(self.rank, ADAPTER_BITS)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"adapter": {"rank": self.rank, "bits": ADAPTER_BITS}}

    def label(self) -> str:
        return f"eora{self.rank}"

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> Eora | None:
        """``eora_rank`` (0 = no stage), only beside a GPTQ stage."""
        rank = int(params.get("eora_rank", 0))
        return cls(rank=rank) if rank and any(isinstance(s, Gptq) for s in earlier) else None

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Calibration, base_dir: Path | None = None) -> StageReport:
        with Timer() as t:
            copy_folder(Path(src_dir), Path(out_dir), link_weights=True)
            if not self.is_noop():
                if base_dir is None:
                    raise SlmsearchError("eora needs the dense checkpoint that GPTQ quantized (base_dir)")
                import torch

                from slmsearch.compress import gptqmodel_runtime as runtime

                runtime.gptqmodel_env()
                from gptqmodel import GPTQModel
                from gptqmodel.adapter.adapter import Lora

                runtime.limit_worker_threads()
                with runtime.module_logs_out_of_the_working_directory(), \
                        runtime.layer_progress_of_inner_models("eora", _n_layers(Path(src_dir))):
                    GPTQModel.adapter.generate(
                        adapter=Lora(path=str(Path(out_dir) / ADAPTER_DIR), rank=self.rank),
                        model_id_or_path=str(base_dir),
                        quantized_model_id_or_path=str(src_dir),
                        calibration_dataset=calibration_rows(calib),
                        batch_size=calib.settings.batch,
                        tokenizer=calib.tokenizer,
                        dtype=torch.bfloat16,
                        device=runtime.compute_device(),
                    )
                if not (Path(out_dir) / ADAPTER_DIR / ADAPTER_CONFIG_FILE).is_file():
                    raise SlmsearchError(f"gptqmodel wrote no EoRA adapter under {Path(out_dir) / ADAPTER_DIR}")
        return StageReport(self.kind, self.to_dict(), t.seconds, {"rank": self.rank})


def _n_layers(src: Path) -> int:
    return int(json.loads((src / CONFIG_FILE).read_text())["num_hidden_layers"])


def _check_group_divides(src: Path, group_size: int) -> None:
    if group_size == -1:
        return
    config = json.loads((src / CONFIG_FILE).read_text())
    n_heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // n_heads
    dims = {"hidden_size": config["hidden_size"], "intermediate_size": config["intermediate_size"], "o_proj input": n_heads * head_dim}
    bad = undivided_inputs(group_size, dims)
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


def restore_zeros_in_folder(folder: Path, masks: dict[str, torch.Tensor], bits: int) -> int:
    """Rewrite the packed ``qweight`` of each masked module of a saved GPTQ (v1) checkpoint so
    that every masked weight holds its group's zero point, i.e. dequantizes to exactly 0.

    v1 stores ``zero - 1`` in ``qzeros`` (gptqmodel's ``convert_gptq_v2_to_v1_format``).
    Returns the number of weights that were non-zero after GPTQ and are zero again.
    """
    from safetensors import safe_open
    from safetensors.torch import save_file

    from slmsearch.compress import kernels

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
