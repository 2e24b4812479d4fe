"""Embedding / lm_head precision: keep 16-bit, or round-to-nearest per row at 8 or 4 bits.

The model in memory (and a stage-cache entry, which later stages read) holds the dequantized
weights; the codes and 16-bit scales they come from are set on the model
(:data:`slmsearch.checkpoint.PACKED_ATTR`) and saved beside them by :func:`slmsearch.checkpoint.save`.
A finished checkpoint (``slmsearch compress --out``, ``slmsearch export``) keeps only the packed
codes + scales: what the memory model counts (``bits`` per weight plus one 16-bit scale per row or
group, no zero points). A tied embedding is quantized once (it is one tensor); an untied lm_head is
quantized the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slmsearch.compress.stage import Stage, StageReport, Timer, check_choice, space_first
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    from slmsearch.hwmodel.shape import ModelShape


@dataclass(frozen=True)
class EmbeddingQuant(Stage):
    """Quantize the token embedding (and the lm_head when it is not tied) per row."""

    kind = "embedding"
    column_defaults = {"embedding_bits": 16}
    bits: int = 16  # 16 = unchanged; 8 or 4 = symmetric round-to-nearest
    group_size: int | None = None  # None = one 16-bit scale per row; else one per group of columns
    mse: float = 0.0  # > 0: each scale chosen by a clipping search (kernels.rtn_codes); 0 = max-abs

    def __post_init__(self) -> None:
        check_choice("embedding", "bits", self.bits, (16, 8, 4))
        check_choice("embedding", "group_size", self.group_size, (None, 32, 64, 128))
        check_choice("embedding", "mse", self.mse, (0.0, 2.0, 2.4, 3.0))

    def is_noop(self) -> bool:
        return self.bits == 16

    def shape(self, shape: ModelShape) -> ModelShape:
        from slmsearch.hwmodel.shape import TensorFormat

        return shape.with_embedding_format(TensorFormat(weight_bits=self.bits, group_size=self.group_size, zero_bits=0))

    def checkpoint_meta(self) -> dict[str, Any]:
        """A cache entry stores the weights dequantized, so their width is declared. (Without this stage the
        tensors' own dtype is the truth; hwmodel uses a declared width only when it is smaller.)"""
        return {"embedding": {"bits": self.bits, "group_size": self.group_size, "zero_bits": 0}}

    def label(self) -> str:
        return f"emb{self.bits}" + (f"g{self.group_size}" if self.group_size else "")

    def columns(self) -> dict[str, Any]:
        return {"embedding_bits": self.bits}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> EmbeddingQuant | None:
        """``embedding_bits`` (16 = no stage), ``embedding_group`` (0 or absent = per row) and
        ``embedding_mse`` (else the space's first)."""
        bits = int(params.get("embedding_bits", 16))
        group = int(params.get("embedding_group") or 0)
        mse = float(params.get("embedding_mse", space_first(space, "embedding_mse", 0.0)))
        return cls(bits=bits, group_size=group or None, mse=mse) if bits != 16 else None

    def apply(self, model: Any, calib: Any = None) -> StageReport:
        import torch

        from slmsearch.checkpoint import PACKED_ATTR, PackedTensor

        metrics: dict[str, Any] = {"bits": self.bits}
        with Timer() as t, torch.no_grad():
            if not self.is_noop():
                embed = model.get_input_embeddings().weight
                original = embed.data.clone()
                if embed.shape[1] % (self.group_size or 1):
                    raise SlmsearchError(
                        f"embedding.group_size={self.group_size} must divide the hidden size {embed.shape[1]}"
                    )
                packed = {"embed": self._quantize(embed)}
                metrics["embedding_rel_error"] = float((embed.data - original).norm() / original.norm())
                head = model.get_output_embeddings()
                tied = head is None or head.weight.data_ptr() == embed.data_ptr()
                metrics["tied"] = tied
                if not tied:
                    packed["lm_head"] = self._quantize(head.weight)
                setattr(model, PACKED_ATTR, {k: PackedTensor(*v, bits=self.bits) for k, v in packed.items()})
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)

    def _quantize(self, weight: Any) -> tuple[Any, Any]:
        """Replace ``weight``'s values by their round-to-nearest grid values; (codes, fp16 scales)."""
        from slmsearch.compress.kernels import rtn_codes, rtn_dequantize

        codes, scales = rtn_codes(weight.data, self.bits, self.group_size, mse=self.mse)
        weight.data.copy_(rtn_dequantize(codes, scales, self.bits, weight.dtype))
        return codes.cpu(), scales.cpu()
