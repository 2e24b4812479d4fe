"""Embedding / lm_head precision: keep 16-bit, or round-to-nearest per row at 8 or 4 bits.

The model in memory (and a stage-cache entry, which later stages read) holds the dequantized
weights; the codes and 16-bit scales they come from are set on the model
(:data:`slmsearch.checkpoint.PACKED_ATTR`) and saved beside them by :func:`slmsearch.checkpoint.save`.
A finished checkpoint (``slmsearch compress --out``, ``slmsearch export``) keeps only the packed
codes + scales: what the memory model counts (``bits`` per weight plus one 16-bit scale per row or
group, no zero points). A tied embedding is quantized once (it is one tensor); an untied lm_head is
quantized the same way.

``gptq``: the codes on the same grid come from GPTQ (gptqmodel's solver) instead of rounding to
nearest, with the Hessian of the lm_head's inputs (the final norm's outputs on the calibration
windows): the rounding error of one column is carried into the columns not yet rounded, so the
logits move least. The output side is what rounding a tied embedding hurts most; on SmolLM2-135M at
4 bits g64 token ppl goes from x1.17 to x1.05 the dense model's (docs/benchmarks.md section 6).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from slmsearch.compress.stage import SCALE_BITS, Stage, StageReport, Timer, check_choice, check_range, space_first
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    from slmsearch.hwmodel.shape import ModelShape

WIDE_BITS = 8  # the width of the embedding's wide rows (EmbeddingQuant.wide_rows)


@dataclass(frozen=True)
class EmbeddingQuant(Stage):
    """Quantize the token embedding (and the lm_head when it is not tied) per row."""

    kind = "embedding"
    column_defaults = {"embedding_bits": 16, "embedding_wide_rows": 0}
    bits: int = 16  # 16 = unchanged; 8 or 4 = symmetric round-to-nearest
    group_size: int | None = None  # None = one 16-bit scale per row; else one per group of columns
    mse: float = 0.0  # > 0: each scale chosen by a clipping search (kernels.rtn_codes); 0 = max-abs
    gptq: bool = False  # codes by GPTQ over the lm_head's input Hessian (needs calibration)
    # GPTQ's dampening: ``damp`` x the Hessian's mean diagonal added to its diagonal. For a tied
    # embedding it is also the weight of the input side (each row read as a token's vector, which
    # the lm_head's Hessian does not see): 1.0 weighs a row's own error as much as an average
    # direction of the logits' error; near 0 the codes serve the output side alone. 0.25, not
    # gptqmodel's 0.05: at the 64 MB anchor it keeps 1.04 nats more of the gold answers'
    # log-prob on TriviaQA questions never reported, for 2.4% token ppl (docs/benchmarks.md §6).
    damp: float = 0.25
    # "sym": the symmetric grid (one scale per group); "minmax": each group's own min..max range with
    # an fp16 minimum beside the scale (kernels.minmax_codes; llama.cpp's Q4_1 layout at 4 bits g32),
    # rounded to nearest (GPTQ's solver keeps integer zero points: gptq must be false)
    grid: str = "sym"
    # the first ``wide_rows`` rows (token ids) at 8 bits on the same grid and groups. A BPE vocabulary
    # numbers its tokens by merge rank, so the lowest ids are the most frequent: on SmolLM2-135M the
    # first 16,384 of 49,152 ids are 89% of WikiText-2 test tokens and 87% of TriviaQA's. What
    # matters is fixed by the tokenizer, not by any data a study scores on (docs/benchmarks.md §6).
    wide_rows: int = 0
    # how each group's scale is stored: 16 (fp16), or 8 (a code on a log2 grid spanning the
    # tensor's own scales, as the GPTQ stage's ``scale_bits``): rounded before the weights are set
    scale_bits: int = 16

    def __post_init__(self) -> None:
        check_choice("embedding", "bits", self.bits, (16, 8, 4))
        check_choice("embedding", "group_size", self.group_size, (None, 32, 64, 128))
        check_choice("embedding", "mse", self.mse, (0.0, 2.0, 2.4, 3.0))
        if not isinstance(self.gptq, bool):
            raise SlmsearchError(f"embedding.gptq must be true or false, got {self.gptq!r}")
        check_range("embedding", "damp", self.damp, 0.001, 0.99)
        check_choice("embedding", "grid", self.grid, ("sym", "minmax"))
        if self.grid == "minmax" and (self.gptq or self.mse or self.group_size is None):
            raise SlmsearchError("embedding.grid 'minmax' rounds to nearest in groups: it needs a group_size and "
                                 "takes neither gptq nor mse (set gptq: false, mse: 0)")
        check_range("embedding", "wide_rows", self.wide_rows, 0, 10**7, integer=True)
        check_choice("embedding", "scale_bits", self.scale_bits, SCALE_BITS)
        if self.wide_rows and self.bits >= WIDE_BITS:
            raise SlmsearchError(f"embedding.wide_rows keeps rows at {WIDE_BITS} bits: it needs bits below {WIDE_BITS}, "
                                 f"got bits {self.bits}")

    def check_fits(self, shape: ModelShape) -> None:
        """The wide rows are rows of the vocabulary."""
        if self.wide_rows > shape.vocab_size:
            raise SlmsearchError(f"embedding.wide_rows={self.wide_rows} exceeds the model's {shape.vocab_size} "
                                 f"token rows; choose at most {shape.vocab_size}")

    def is_noop(self) -> bool:
        return self.bits == 16

    def to_dict(self) -> dict[str, Any]:
        """As every stage's, without ``wide_rows`` when there are none: the settings of plans made
        before wide rows existed (stage-cache keys, stored trials) stay what they were."""
        out = super().to_dict()
        if not self.wide_rows:
            del out["wide_rows"]
        if self.scale_bits == 16:
            del out["scale_bits"]
        return out

    def shape(self, shape: ModelShape) -> ModelShape:
        from slmsearch.hwmodel.shape import TensorFormat

        zero_bits = 16 if self.grid == "minmax" else 0
        return shape.with_embedding_format(TensorFormat(weight_bits=self.bits, group_size=self.group_size, zero_bits=zero_bits,
                                                        scale_bits=self.scale_bits, wide_rows=self.wide_rows,
                                                        wide_bits=WIDE_BITS))

    def checkpoint_meta(self) -> dict[str, Any]:
        """A cache entry stores the weights dequantized, so their width is declared. (Without this stage the
        tensors' own dtype is the truth; hwmodel uses a declared width only when it is smaller.)"""
        meta = {"bits": self.bits, "group_size": self.group_size, "zero_bits": 16 if self.grid == "minmax" else 0,
                **({"scale_bits": self.scale_bits} if self.scale_bits != 16 else {})}
        return {"embedding": {**meta, "wide_rows": self.wide_rows} if self.wide_rows else meta}

    def label(self) -> str:
        return (f"emb{self.bits}" + (f"g{self.group_size}" if self.group_size else "") + ("h" if self.gptq else "")
                + ("mm" if self.grid == "minmax" else "") + ("" if self.scale_bits == 16 else f"s{self.scale_bits}")
                + self._wide_label())

    def _wide_label(self) -> str:
        """``+16k8``: 16 x 1024 rows at 8 bits (``+40r8`` when not a multiple of 1024)."""
        if not self.wide_rows:
            return ""
        return f"+{self.wide_rows // 1024}k8" if self.wide_rows % 1024 == 0 else f"+{self.wide_rows}r8"

    def columns(self) -> dict[str, Any]:
        return {"embedding_bits": self.bits, "embedding_wide_rows": self.wide_rows}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> EmbeddingQuant | None:
        """``embedding_bits`` (16 = no stage), ``embedding_group`` (0 or absent = per row) and
        ``embedding_mse`` (else the space's first), ``embedding_gptq`` (else the space's);
        ``embedding_grid`` "minmax" (else "sym") rounds on the min..max grid instead;
        ``embedding_wide_rows`` (else 0) first rows at 8 bits; ``embedding_scale_bits`` (else the space's first)."""
        bits = int(params.get("embedding_bits", 16))
        group = int(params.get("embedding_group") or 0)
        mse = float(params.get("embedding_mse", space_first(space, "embedding_mse", 0.0)))
        gptq = bool(params.get("embedding_gptq", getattr(space, "embedding_gptq", False)))
        if bits == 16:
            return None
        wide = int(params.get("embedding_wide_rows") or 0)
        scale_bits = int(params.get("embedding_scale_bits", space_first(space, "embedding_scale_bits", 16)))
        if params.get("embedding_grid", "sym") == "minmax":  # rounded to nearest in groups (32 when per row was asked)
            return cls(bits=bits, group_size=group or 32, grid="minmax", wide_rows=wide, scale_bits=scale_bits)
        return cls(bits=bits, group_size=group or None, mse=mse, gptq=gptq, wide_rows=wide, scale_bits=scale_bits)

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
                inputs = self._lm_head_inputs(model, calib) if self.gptq else None
                packed = {"embed": self._packed(embed, inputs)}
                metrics["embedding_rel_error"] = float((embed.data - original).norm() / original.norm())
                head = model.get_output_embeddings()
                tied = head is None or head.weight.data_ptr() == embed.data_ptr()
                metrics["tied"] = tied
                if not tied:
                    packed["lm_head"] = self._packed(head.weight, inputs)
                setattr(model, PACKED_ATTR, packed)
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)

    def _packed(self, weight: Any, inputs: Any = None) -> Any:
        """Replace ``weight``'s values by their grid values, its first ``wide_rows`` rows at 8 bits
        and the others at ``bits`` (each row is rounded on its own, by rounding or by GPTQ, whose
        error feedback runs along a row's columns); the :class:`PackedTensor` they come from."""
        from slmsearch.checkpoint import PackedTensor

        wide = min(self.wide_rows, weight.shape[0])
        rest = self._quantize(weight.data[wide:], self.bits, inputs)
        if not wide:
            return rest
        return replace(rest, top=self._quantize(weight.data[:wide], WIDE_BITS, inputs))

    def _quantize(self, weight: Any, bits: int, inputs: Any = None) -> Any:
        """Replace the values of ``weight`` (a view of the embedding) by their grid values at ``bits``
        (round-to-nearest, or GPTQ given the ``inputs`` it multiplies as the lm_head); the
        :class:`PackedTensor` (codes, fp16 scales, fp16 minimums or None, the scales' 8-bit grid
        or None) they come from."""
        from slmsearch.checkpoint import PackedTensor
        from slmsearch.compress.kernels import minmax_codes, minmax_dequantize, rtn_codes, rtn_dequantize

        mins = None
        if self.grid == "minmax":
            codes, scales, mins = minmax_codes(weight, bits, self.group_size or 0)
        elif inputs is None:
            codes, scales = rtn_codes(weight, bits, self.group_size, mse=self.mse)
        else:
            codes, scales = gptq_codes(weight, inputs, bits, self.group_size, self.mse, self.damp)
        scales, grid = self._stored_scales(scales)
        if mins is not None:
            weight.copy_(minmax_dequantize(codes, scales, mins, weight.dtype))
        else:
            weight.copy_(rtn_dequantize(codes, scales, bits, weight.dtype))
        return PackedTensor(codes.cpu(), scales.cpu(), bits, None if mins is None else mins.cpu(), scale_grid=grid)

    def _stored_scales(self, scales: Any) -> tuple[Any, Any]:
        """(the scales as stored, their log2 grid or None): with ``scale_bits`` 8 each scale moves
        to its code's value (kernels.log_scale_grid), and the weights are set from those."""
        from slmsearch.compress import kernels

        return (scales, None) if self.scale_bits == 16 else kernels.round_to_log_grid(scales, self.scale_bits)

    def _lm_head_inputs(self, model: Any, calib: Any) -> list[Any]:
        """The lm_head's inputs (the final norm's outputs) on the calibration windows, a
        ``[tokens, hidden]`` float32 tensor per batch."""
        import torch

        from slmsearch.compress.calib import model_device

        if calib is None:
            raise SlmsearchError("embedding.gptq needs calibration windows; run the stage through a plan")
        decoder = model.get_decoder()
        hidden = model.get_input_embeddings().weight.shape[1]
        return [decoder(input_ids=batch.to(model_device(model))).last_hidden_state.reshape(-1, hidden).float().cpu()
                for batch in calib.token_batches()]


def gptq_codes(weight: Any, inputs: list[Any], bits: int, group_size: int | None, mse: float,
               damp: float) -> tuple[Any, Any]:
    """GPTQ of ``weight`` ``[rows, cols]`` as a Linear applied to ``inputs`` (``[tokens, cols]``
    tensors), on the symmetric grid :func:`kernels.rtn_dequantize` reads:
    ``(codes uint8, scales fp16)``. gptqmodel's solver (its group-aware column order, groups kept
    contiguous; no act_order) with its scale search when ``mse`` > 0; its scales are rounded to 16
    bits after the solve. ``damp`` is gptqmodel's ``damp_percent``, kept as given (no automatic
    increments)."""
    import torch
    from torch import nn

    from slmsearch.compress import gptqmodel_runtime as runtime
    from slmsearch.compress.kernels import grid_codes

    runtime.gptqmodel_env()
    from gptqmodel.quantization.config import QuantizeConfig
    from gptqmodel.quantization.gptq import GPTQ

    runtime.limit_worker_threads()
    rows, cols = weight.shape
    linear = nn.Linear(cols, rows, bias=False)
    linear.weight.data.copy_(weight.float())
    # gptqmodel's group-aware order (its default; columns within a group solved by Hessian weight,
    # groups stay contiguous): x1.038 vs x1.060 the dense token ppl at 4-bit g64 on SmolLM2-135M
    qcfg = QuantizeConfig(bits=bits, group_size=group_size or -1, sym=True, desc_act=False,
                          act_group_aware=bool(group_size), mse=float(mse), offload_to_disk=False, device="cpu",
                          damp_percent=float(damp), damp_auto_increment=0.0)
    solver = GPTQ(linear, qcfg)
    solver.quantizer.configure(perchannel=True)
    for x in inputs:
        solver.add_batch(x.unsqueeze(0), None)
    with runtime.stdout_to_nothing():
        q, scale, _, g_idx = solver.quantize()[:4]
    if group_size and not torch.equal(g_idx.long().cpu(), torch.arange(cols) // group_size):
        raise SlmsearchError("gptqmodel returned reordered groups; the packed embedding needs contiguous ones")
    q = q.reshape(rows, cols).float()
    scale = scale.reshape(rows, -1).float()
    codes = grid_codes(q, scale, bits)
    return codes, scale.to(torch.float16)
