"""WANDA pruning (Sun et al. 2023): unstructured, N:M, and structured (channels / KV groups).

Unstructured and N:M zero weights in place (the tensors keep their shape; the memory model
counts the sparsity from ``slmsearch.json``). Structured removes whole MLP intermediate channels
and whole KV groups, the same count in every layer, so the tensors physically shrink.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from slmsearch.compress.geometry import NM_PATTERNS, allowed_kv_group_removals, mlp_channels_to_remove
from slmsearch.compress.stage import Stage, StageReport, Timer, check_choice, check_range
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    import torch

    from slmsearch.compress.calib import Calibration
    from slmsearch.hwmodel.shape import ModelShape

PATTERNS = ("unstructured", "2:4", "4:8", "structured")
ALL_TARGETS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)


@dataclass(frozen=True)
class Wanda(Stage):
    """Prune with WANDA scores (or plain magnitude, the baseline, with ``score='magnitude'``)."""

    kind = "wanda"
    column_defaults = {"wanda": "none"}
    sparsity: float = 0.0  # unstructured: fraction of each row zeroed; N:M: must be N/M or 0
    pattern: str = "unstructured"  # "unstructured", "2:4", "4:8" or "structured"
    targets: tuple[str, ...] = ALL_TARGETS  # Linear modules of each layer (unstructured / N:M)
    score: str = "wanda"  # "wanda" or "magnitude"
    mlp_fraction: float = 0.0  # structured: fraction of MLP intermediate channels removed
    kv_groups: int = 0  # structured: KV groups (a KV head + its query heads) removed per layer
    multiple: int = 64  # structured: channel counts stay divisible by this (the quant group size)

    def __post_init__(self) -> None:
        check_choice("wanda", "pattern", self.pattern, PATTERNS)
        check_choice("wanda", "score", self.score, ("wanda", "magnitude"))
        check_range("wanda", "sparsity", self.sparsity, 0.0, 0.99)
        check_range("wanda", "mlp_fraction", self.mlp_fraction, 0.0, 0.95)
        check_range("wanda", "kv_groups", self.kv_groups, 0, 1024, integer=True)
        check_range("wanda", "multiple", self.multiple, 1, 4096, integer=True)
        object.__setattr__(self, "targets", tuple(self.targets))
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad:
            raise SlmsearchError(f"wanda.targets: unknown module(s) {bad}; known: {', '.join(ALL_TARGETS)}")
        if self.pattern == "structured":
            if self.sparsity:
                raise SlmsearchError("wanda: structured pruning takes mlp_fraction and kv_groups, not sparsity")
        else:
            if self.mlp_fraction or self.kv_groups:
                raise SlmsearchError(f"wanda: mlp_fraction/kv_groups need pattern='structured', got {self.pattern!r}")
            if self.pattern in NM_PATTERNS:
                n, m = NM_PATTERNS[self.pattern]
                if self.sparsity not in (0.0, n / m):
                    raise SlmsearchError(f"wanda: pattern {self.pattern} implies sparsity {n / m}, got {self.sparsity}")

    @property
    def n_m(self) -> tuple[int, int] | None:
        return NM_PATTERNS.get(self.pattern)

    @property
    def density(self) -> float:
        """Fraction of targeted weights kept (unstructured / N:M)."""
        if self.n_m is not None:
            n, m = self.n_m
            return 1.0 - n / m
        return 1.0 - self.sparsity

    def is_noop(self) -> bool:
        if self.pattern == "structured":
            return self.mlp_fraction == 0 and self.kv_groups == 0
        return (self.n_m is None and self.sparsity == 0) or not self.targets

    def shape(self, shape: ModelShape) -> ModelShape:
        if self.pattern == "structured":
            inter = shape.layers[0].intermediate
            channels = mlp_channels_to_remove(inter, self.mlp_fraction, self.multiple) if self.mlp_fraction else 0
            return shape.prune_structured(channels, self.kv_groups)
        return shape.with_sparsity(self.pattern, self.density)

    def checkpoint_meta(self) -> dict[str, Any]:
        """Zeroed weights keep the tensors' shape: the sparsity format and density are declared.
        (Structured pruning shrinks the tensors, which tell the hardware model themselves.)"""
        if self.pattern == "structured":
            return {}
        return {"sparsity": {"format": self.pattern, "density": self.density}}

    def label(self) -> str:
        if self.pattern == "structured":
            return f"struct{self.mlp_fraction:.2f}/kv{self.kv_groups}"
        return f"wanda{self.pattern}@{self.sparsity:.2f}"

    def columns(self) -> dict[str, Any]:
        return {"wanda": self.pattern}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> Wanda | None:
        """``wanda_pattern``: "structured" with ``structured_fraction``, ``kv_groups`` and
        ``structured_multiple``; "2:4"/"4:8" at their sparsity; "unstructured" at ``sparsity``."""
        pattern = params.get("wanda_pattern", "none")
        if pattern == "structured":
            fraction = float(params.get("structured_fraction", 0.0))
            kv = int(params.get("kv_groups", 0))
            if fraction > 0 or kv > 0:
                return cls(pattern="structured", mlp_fraction=fraction, kv_groups=kv,
                           multiple=int(params.get("structured_multiple", 64)))
        elif pattern in NM_PATTERNS:
            n, m = NM_PATTERNS[pattern]
            return cls(pattern=pattern, sparsity=n / m)
        elif pattern == "unstructured":
            return cls(pattern="unstructured", sparsity=float(params["sparsity"]))
        return None

    def apply(self, model: Any, calib: Calibration) -> StageReport:
        with Timer() as t:
            if self.is_noop():
                metrics: dict[str, Any] = {"noop": True}
            elif self.pattern == "structured":
                metrics = self._structured(model, calib)
            else:
                metrics = self._unstructured(model, calib)
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)

    # unstructured and N:M ---------------------------------------------------------------
    def _unstructured(self, model: Any, calib: Calibration) -> dict[str, Any]:
        from slmsearch.compress import kernels
        from slmsearch.compress.calib import LayerInputs, collect_norms, layerwise, linear_modules
        from slmsearch.compress.surgery import decoder_layers

        pruned = total = 0
        targets = list(self.targets)

        def visit(i: int, layer: torch.nn.Module, inputs: LayerInputs) -> None:
            nonlocal pruned, total
            modules = linear_modules(layer)
            norms = collect_norms(layer, inputs, targets) if self.score == "wanda" else {}
            for name in targets:
                weight = modules[name].weight.data
                if self.score == "wanda":
                    mask = kernels.wanda_mask(weight, norms[name], self.sparsity, self.n_m)
                else:
                    mask = kernels.magnitude_mask(weight, self.sparsity, self.n_m)
                weight.masked_fill_(mask, 0)
                pruned += int(mask.sum())
                total += mask.numel()

        if self.score == "wanda":
            layerwise(model, calib, visit)
        else:  # magnitude needs no activations
            for i, layer in enumerate(decoder_layers(model)):
                visit(i, layer, LayerInputs([], []))
        return {"sparsity_achieved": pruned / max(total, 1), "weights_pruned": pruned, "weights_targeted": total}

    # structured ----------------------------------------------------------------------------
    def _structured(self, model: Any, calib: Calibration) -> dict[str, Any]:
        import torch

        from slmsearch.compress import kernels
        from slmsearch.compress.calib import LayerInputs, collect_norms, layerwise, linear_modules
        from slmsearch.compress.surgery import decoder_layers, head_geometry, set_kv_groups, shrink_attention, shrink_mlp

        config = model.config
        inter = config.intermediate_size
        n_heads, n_kv, head_dim = head_geometry(config)
        n_channels = mlp_channels_to_remove(inter, self.mlp_fraction, self.multiple) if self.mlp_fraction else 0
        if self.kv_groups >= n_kv:
            raise SlmsearchError(f"wanda.kv_groups must be < {n_kv} (the model's KV heads), got {self.kv_groups}")
        allowed = allowed_kv_group_removals(config.hidden_size, n_heads, n_kv, head_dim, self.multiple)
        if self.kv_groups not in allowed:
            raise SlmsearchError(
                f"wanda.kv_groups={self.kv_groups} is not allowed for this model with multiple={self.multiple}: "
                f"allowed {list(allowed)} (hidden_size must stay divisible by the head count, and the "
                "o_proj input by the multiple)"
            )
        keep_mlp: list[torch.Tensor] = []
        keep_kv: list[torch.Tensor] = []
        names = ["mlp.gate_proj", "mlp.down_proj", "self_attn.q_proj", "self_attn.o_proj"]

        def visit(i: int, layer: torch.nn.Module, inputs: LayerInputs) -> None:
            if self.score == "wanda":
                norms = collect_norms(layer, inputs, names)
            else:
                norms = {n: torch.ones(m.in_features, device=m.weight.device) for n, m in linear_modules(layer).items() if n in names}
            mlp, attn = layer.mlp, layer.self_attn
            if n_channels:
                s = kernels.mlp_channel_scores(
                    mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight,
                    norms["mlp.gate_proj"], norms["mlp.down_proj"],
                )
                keep_mlp.append(kernels.keep_lowest_removed(s, n_channels))
                # Shrink now, so the next layer is calibrated on the pruned model's outputs.
                shrink_mlp(layer, keep_mlp[-1])
            if self.kv_groups:
                s = kernels.kv_group_scores(
                    attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight, attn.o_proj.weight,
                    norms["self_attn.q_proj"], norms["self_attn.o_proj"], n_kv_heads=n_kv, head_dim=head_dim,
                )
                keep_kv.append(kernels.keep_lowest_removed(s, self.kv_groups))
                shrink_attention(layer, keep_kv[-1], rep=n_heads // n_kv, head_dim=head_dim)

        if self.score == "wanda":
            layerwise(model, calib, visit)
        else:
            for i, layer in enumerate(decoder_layers(model)):
                visit(i, layer, LayerInputs([], []))
        # Per-layer shrinking is done; now make the config agree (tensors already have the shape).
        if n_channels:
            config.intermediate_size = inter - n_channels
            for layer in decoder_layers(model):
                if hasattr(layer.mlp, "intermediate_size"):
                    layer.mlp.intermediate_size = inter - n_channels
        if self.kv_groups:
            set_kv_groups(config, n_kv - self.kv_groups, rep=n_heads // n_kv, head_dim=head_dim)
        return {
            "mlp_channels_removed": n_channels,
            "intermediate_size": config.intermediate_size,
            "kv_groups_removed": self.kv_groups,
            "num_key_value_heads": config.num_key_value_heads,
            "num_attention_heads": config.num_attention_heads,
            "kept_mlp_channels": [k.cpu().tolist() for k in keep_mlp],
            "kept_kv_groups": [k.cpu().tolist() for k in keep_kv],
        }

