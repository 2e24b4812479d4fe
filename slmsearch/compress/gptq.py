"""GPTQ quantization through gptqmodel (which works on checkpoint folders), and EoRA adapters.

Known-good path on CPU (shared/research/toolchain.md): load the dense folder in bf16, quantize,
save. The EoRA adapter is fitted by :mod:`slmsearch.compress.eora` in float32 on the quantized
model's dense copy and saved in gptqmodel's adapter format (gptqmodel's own ``adapter.generate``
computes in fp16/bf16 only: ~48 s a layer where bf16 is emulated, and its one-call
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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.checkpoint import ADAPTER_DIR, CONFIG_FILE, copy_folder, copy_tokenizer, write_scale_grids
from slmsearch.compress.geometry import undivided_inputs
from slmsearch.compress.stage import ADAPTER_BITS, SCALE_BITS, Stage, StageReport, Timer, check_choice, check_range, space_first
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    import torch

    from slmsearch.compress.calib import Calibration
    from slmsearch.hwmodel.shape import ModelShape

GPTQ_BITS = (2, 3, 4, 8)
GPTQ_GROUPS = (32, 64, 128, -1)  # -1 = one group per output channel (per-channel)
WIDER = {2: 3, 3: 4, 4: 8}  # the width a layer raised by mixed precision gets (gptqmodel's widths)


def calibration_rows(calib: Calibration) -> list[dict[str, list[int]]]:
    """The calibration windows as gptqmodel wants them: token ids with a full attention mask."""
    return [{"input_ids": row.tolist(), "attention_mask": [1] * row.numel()} for row in calib.tokens]


@dataclass(frozen=True)
class Gptq(Stage):
    """GPTQ weight quantization of every decoder Linear (embedding/lm_head untouched)."""

    kind = "gptq"
    works_on_dirs = True
    column_defaults = {"gptq_bits": 16, "gptq_wider_layers": 0, "gptq_scale_bits": 16}
    bits: int = 4  # 2, 3, 4 or 8
    group_size: int = 128  # 32, 64, 128, or -1 (per output channel)
    act_order: bool = False  # gptqmodel desc_act: quantize columns by decreasing Hessian diagonal
    keep_sparsity: bool = True  # re-zero weights that were exactly zero before quantization
    # gptqmodel's scale search: each group's range shrunk in 1% steps to minimise sum |w - q(w)|^mse
    # (the original GPTQ code's grid search, norm 2.4); 0 = the plain min/max range
    mse: float = 0.0
    gptaq: bool = False  # gptqmodel's GPTAQ (GPTQ v2): the error against the unquantized model's inputs
    # symmetric grid (the zero point is the middle code, the same for every group: a deployment
    # need not store it); false: each group's own zero point (its min..max range), stored at the width
    sym: bool = True
    # Mixed precision across layers, one of: the widths of every decoder layer in order (``bits``
    # is then the narrowest), or how many layers get the next wider width (WIDER), chosen as the
    # layers whose rounding alone moves the output most (compress/sensitivity.py).
    layer_bits: tuple[int, ...] = ()
    wider_layers: int = 0
    # how the deployment stores each group's scale: 16 (fp16), or 8 (a code on a log2 grid spanning
    # the tensor's own scales, as llama.cpp's k-quants store theirs in 6 bits under an fp16 one):
    # the stage rounds the scales to it, so the evaluation scores what is deployed
    scale_bits: int = 16

    def __post_init__(self) -> None:
        check_choice("gptq", "bits", self.bits, GPTQ_BITS)
        check_choice("gptq", "group_size", self.group_size, GPTQ_GROUPS)
        for name in ("act_order", "keep_sparsity", "sym"):
            if not isinstance(getattr(self, name), bool):
                raise SlmsearchError(f"gptq.{name} must be true or false, got {getattr(self, name)!r}")
        object.__setattr__(self, "layer_bits", tuple(self.layer_bits))
        for b in self.layer_bits:
            check_choice("gptq", "layer_bits entries", b, GPTQ_BITS)
        if self.layer_bits and min(self.layer_bits) != self.bits:
            raise SlmsearchError(f"gptq.bits must be the narrowest of gptq.layer_bits ({min(self.layer_bits)}), got {self.bits}")
        check_range("gptq", "wider_layers", self.wider_layers, 0, 4096, integer=True)
        check_choice("gptq", "scale_bits", self.scale_bits, SCALE_BITS)
        check_range("gptq", "mse", self.mse, 0.0, 10.0)
        if not isinstance(self.gptaq, bool):
            raise SlmsearchError(f"gptq.gptaq must be true or false, got {self.gptaq!r}")
        if self.wider_layers and self.layer_bits:
            raise SlmsearchError("gptq: give layer_bits or wider_layers, not both")
        if self.wider_layers and self.bits not in WIDER:
            raise SlmsearchError(f"gptq.wider_layers needs a width with a wider one ({', '.join(map(str, WIDER))}), got bits={self.bits}")

    def widths(self, n_layers: int) -> tuple[int, ...]:
        """Each layer's width as the hardware model counts it: ``layer_bits``, or the first
        ``wider_layers`` layers wider (which layers is known only once the input model is measured;
        the footprint and latency of equal-sized layers do not depend on it)."""
        if self.layer_bits:
            return self.layer_bits
        return tuple(WIDER[self.bits] if i < self.wider_layers else self.bits for i in range(n_layers))

    def check_fits(self, shape: ModelShape) -> None:
        """The per-layer widths match the layers; the group size divides every quantized Linear's input size."""
        n = len(shape.layers)
        if self.layer_bits and len(self.layer_bits) != n:
            raise SlmsearchError(
                f"gptq.layer_bits has {len(self.layer_bits)} entries, but the model quantized has {n} decoder layers; "
                f"give one width per layer (after any layers dropped before it)"
            )
        if self.wider_layers > n:
            raise SlmsearchError(f"gptq.wider_layers={self.wider_layers} exceeds the {n} decoder layers quantized")
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
        """gptqmodel's v1 format as a finished checkpoint stores it (:mod:`slmsearch.gptq_compact`),
        per layer at its width (:meth:`widths`): ``b``-bit codes and a ``scale_bits`` scale per group; a
        ``b``-bit zero point per group only on an asymmetric grid; a 32-bit group index per input
        only in activation order or with one group per output (it then gives the input size)."""
        from slmsearch.hwmodel.shape import TensorFormat

        group = None if self.group_size == -1 else self.group_size
        g_idx_bits = 32 if self.act_order or group is None else 0
        return shape.with_linear_formats(
            TensorFormat(weight_bits=b, group_size=group, scale_bits=self.scale_bits, zero_bits=0 if self.sym else b,
                         g_idx_bits=g_idx_bits)
            for b in self.widths(len(shape.layers))
        )

    def label(self) -> str:
        mixed = f"+{self.wider_layers}" if self.wider_layers else (f"~{sum(self.layer_bits) / len(self.layer_bits):.2f}" if self.layer_bits else "")
        scales = "" if self.scale_bits == 16 else f"s{self.scale_bits}"
        return f"w{self.bits}{mixed}g{'ch' if self.group_size == -1 else self.group_size}{'' if self.sym else 'a'}{scales}"

    def columns(self) -> dict[str, Any]:
        return {"gptq_bits": self.bits, "gptq_wider_layers": self.wider_layers, "gptq_scale_bits": self.scale_bits}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> Gptq | None:
        """``gptq_bits`` (16 = no stage) with ``group_size``, ``act_order``, ``gptq_wider_layers`` and
        ``gptq_mse`` and ``gptq_scale_bits`` (else the space's first)."""
        bits = int(params.get("gptq_bits", 16))
        if bits == 16 or params.get("layer_grid", "gptq") != "gptq":
            return None
        wider = int(params.get("gptq_wider_layers", 0)) if bits in WIDER else 0
        mse = params.get("gptq_mse", space_first(space, "gptq_mse", 0.0))
        scale_bits = params.get("gptq_scale_bits", space_first(space, "gptq_scale_bits", 16))
        return cls(bits=bits, group_size=int(params["group_size"]), act_order=bool(params.get("act_order", False)),
                   wider_layers=wider, mse=float(mse), scale_bits=int(scale_bits))

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Calibration, base_dir: Path | None = None) -> StageReport:
        import torch

        from slmsearch.compress import gptqmodel_runtime as runtime

        runtime.gptqmodel_env()
        from gptqmodel import GPTQModel, QuantizeConfig

        runtime.limit_worker_threads()
        _check_group_divides(Path(src_dir), self.group_size)
        with Timer() as t, runtime.module_logs_out_of_the_working_directory():
            zero_masks = _zero_masks(Path(src_dir)) if self.keep_sparsity else {}
            widths = self._layer_widths(Path(src_dir), calib)
            qcfg = QuantizeConfig(bits=self.bits, group_size=self.group_size, desc_act=self.act_order, sym=self.sym,
                                  device=runtime.compute_device(), dynamic=_dynamic(widths, self.bits),
                                  mse=float(self.mse), **({"gptaq": {"device": runtime.compute_device()}} if self.gptaq else {}),
                                  # gptqmodel's group-aware reordering (its default) needs groups
                                  act_group_aware=not self.act_order and self.group_size != -1)
            model = GPTQModel.load(str(src_dir), quantize_config=qcfg, dtype=runtime.compute_dtype())
            model.layer_callback = runtime.layer_progress("gptq", _n_layers(Path(src_dir)))
            model.quantize(calibration_rows(calib), batch_size=calib.settings.batch, tokenizer=calib.tokenizer)
            with runtime.stdout_to_nothing():  # gptqmodel prints the folder's files and whole config.json
                model.save(str(out_dir))
            del model
            if runtime.compute_dtype() == torch.float32:
                # what a bfloat16 run writes (a packed embedding's dense copy stays as its codes
                # computed it: finish leaves it out only when it equals them)
                store_floats_in_bfloat16(Path(out_dir), keep=_packed_dense_names(Path(src_dir)))
            restored = restore_zeros_in_folder(Path(out_dir), zero_masks) if zero_masks else 0
            gridded = write_scale_grids(Path(out_dir), self.scale_bits) if self.scale_bits != 16 else 0
            copy_tokenizer(Path(src_dir), Path(out_dir))
        metrics: dict[str, Any] = {"zeros_restored": restored, "sparse_modules": len(zero_masks)}
        if gridded:
            metrics["scales_on_grids"] = gridded
        if len(set(widths)) > 1:
            metrics["layer_bits"] = list(widths)
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)

    def _layer_widths(self, src: Path, calib: Calibration) -> tuple[int, ...]:
        """Each decoder layer's width: given, or the ``wider_layers`` most sensitive ones raised."""
        n = _n_layers(src)
        if not self.wider_layers:
            return self.widths(n)
        from slmsearch import checkpoint
        from slmsearch.compress.sensitivity import cached_layer_sensitivity, most_sensitive

        meta = checkpoint.read_meta(src) if (src / checkpoint.META_FILE).is_file() else {}
        model_id = json.dumps({"base": meta.get("base_fingerprint") or calib.model_key, "plan": meta.get("plan")}, sort_keys=True)
        scores = cached_layer_sensitivity(lambda: checkpoint.load(src)[0], calib, self.bits, self.group_size, model_id)
        raised = set(most_sensitive(scores, self.wider_layers))
        return tuple(WIDER[self.bits] if i in raised else self.bits for i in range(n))


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
            metrics: dict[str, Any] = {}
            if not self.is_noop():
                if base_dir is None:
                    raise SlmsearchError("eora needs the dense checkpoint that GPTQ quantized (base_dir)")
                metrics = self._fit(Path(src_dir), Path(out_dir), calib, Path(base_dir))
        return StageReport(self.kind, self.to_dict(), t.seconds, {"rank": self.rank, **metrics})

    def _fit(self, src: Path, out: Path, calib: Calibration, base: Path) -> dict[str, Any]:
        """Fit the adapters in float32 on the quantized model's dense copy (:mod:`slmsearch.compress.eora`)."""
        from slmsearch import checkpoint
        from slmsearch.compress import eora
        from slmsearch.progress import Ticker

        model, _ = checkpoint.load(src, dense=True)
        model.float()
        ticker = Ticker(self.kind, _n_layers(src), "layer", every_s=0)
        factors = eora.fit_adapters(model, eora.reference_weights(base), calib, self.rank, lambda _: ticker.tick())
        eora.save_adapter(out / ADAPTER_DIR, factors, self.rank, str(src))
        return {"modules": len(factors)}


def _n_layers(src: Path) -> int:
    return int(json.loads((src / CONFIG_FILE).read_text())["num_hidden_layers"])


def _dynamic(widths: tuple[int, ...], bits: int) -> dict[str, dict[str, int]] | None:
    """gptqmodel's per-module overrides for the layers whose width is not ``bits``."""
    out = {rf"+:^model\.layers\.{i}\.": {"bits": b} for i, b in enumerate(widths) if b != bits}
    return out or None


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

    from slmsearch.checkpoint import weight_files

    masks: dict[str, torch.Tensor] = {}
    for file in weight_files(src):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if ".layers." in key and key.endswith("_proj.weight"):
                    weight = handle.get_tensor(key)
                    mask = weight == 0
                    if mask.float().mean() > 0.01:  # random exact zeros in a dense model: ignore
                        masks[key[: -len(".weight")]] = mask
    return masks


def _packed_dense_names(src: Path) -> frozenset[str]:
    from slmsearch import checkpoint

    return frozenset(checkpoint.dense_names(src)) if checkpoint.has_packed_embedding(src) else frozenset()


def store_floats_in_bfloat16(folder: Path, keep: frozenset[str] = frozenset()) -> int:
    """Rewrite the float32 tensors of a saved GPTQ checkpoint (the embedding, norms, an unquantized
    head: what gptqmodel saves in the dtype it computed in) as bfloat16, the 16 bits that a plan
    prices them at and that a bfloat16 run stores. Only a float32 run (a CPU without native
    bfloat16) leaves any; tensors named in ``keep`` stay. Returns the number of tensors rewritten."""
    import torch

    from slmsearch.checkpoint import rewrite_weight_files

    changed = 0

    def edit(_: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        nonlocal changed
        wide = [key for key, tensor in tensors.items() if tensor.dtype == torch.float32 and key not in keep]
        changed += len(wide)
        return {**tensors, **{key: tensors[key].to(torch.bfloat16) for key in wide}} if wide else None

    rewrite_weight_files(Path(folder), edit)
    return changed


def restore_zeros_in_folder(folder: Path, masks: dict[str, torch.Tensor]) -> int:
    """Rewrite the packed ``qweight`` of each masked module of a saved GPTQ (v1) checkpoint so
    that every masked weight holds its group's zero point, i.e. dequantizes to exactly 0.

    v1 stores ``zero - 1`` in ``qzeros`` (gptqmodel's ``convert_gptq_v2_to_v1_format``). Each
    module's width is read from its packed rows (mixed precision gives layers different widths).
    Returns the number of weights that were non-zero after GPTQ and are zero again.
    """
    from slmsearch.checkpoint import rewrite_weight_files
    from slmsearch.compress import kernels

    changed = 0

    def edit(_: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        nonlocal changed
        names = [name for name in masks if f"{name}.qweight" in tensors]
        for name in names:
            mask = masks[name]
            qweight = tensors[f"{name}.qweight"]  # [in * bits / 32, out]
            bits = qweight.shape[0] * 32 // mask.shape[1]  # this module's width (layers may differ)
            codes = kernels.unpack_bits(qweight, bits)[: mask.shape[1]]  # [in, out]
            zeros = kernels.unpack_bits(tensors[f"{name}.qzeros"].T.contiguous(), bits).T + 1  # [groups, out]
            target = zeros[tensors[f"{name}.g_idx"].long()]  # [in, out]
            where = mask.T
            changed += int((codes[where] != target[where]).sum())
            codes[where] = target[where]
            tensors[f"{name}.qweight"] = kernels.pack_bits(codes, bits)
        return tensors if names else None

    rewrite_weight_files(Path(folder), edit)
    return changed
