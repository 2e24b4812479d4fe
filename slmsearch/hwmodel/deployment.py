"""Deployment choices the hardware offers for one compressed model, priced by ``estimate``.

They change latency and energy, not the weights: integer activations (8 bit puts the matrix
work on N-EUREKA and the cluster's integer SIMD, as Deeploy deploys; 16 = fp16 as the evaluated
checkpoints compute), which weight group fills the NPU weight memories first, and whether the
KV cache lives in L2 (spilling to L3) or in L3. The quality a study measures is that of the
fp16 checkpoint: the accuracy cost of 8-bit activations is not measured here.
"""

from __future__ import annotations

from dataclasses import dataclass

from slmsearch.errors import SlmsearchError

ACTIVATION_BITS = (16, 8)
WEIGHT_MEMORY_FIRST = ("layers", "lm_head")
KV_CACHE_LEVELS = ("l2", "l3")


@dataclass(frozen=True)
class Deployment:
    """activation_bits: None keeps the shape's; weight_memory_first: "layers" fills the weight
    memories in execution order, "lm_head" puts the output head (read whole every token; with a
    tied embedding, the shared matrix) there first; kv_cache_level: "l2" or "l3"."""

    activation_bits: int | None = None
    weight_memory_first: str = "layers"
    kv_cache_level: str = "l2"

    def __post_init__(self) -> None:
        if self.activation_bits is not None and self.activation_bits not in ACTIVATION_BITS:
            raise SlmsearchError(f"activation_bits must be one of {ACTIVATION_BITS}, but got {self.activation_bits!r}")
        if self.weight_memory_first not in WEIGHT_MEMORY_FIRST:
            raise SlmsearchError(
                f"weight_memory_first must be one of {WEIGHT_MEMORY_FIRST}, but got {self.weight_memory_first!r}")
        if self.kv_cache_level not in KV_CACHE_LEVELS:
            raise SlmsearchError(f"kv_cache_level must be one of {KV_CACHE_LEVELS}, but got {self.kv_cache_level!r}")

    def to_dict(self) -> dict[str, object]:
        return {"activation_bits": self.activation_bits, "weight_memory_first": self.weight_memory_first,
                "kv_cache_level": self.kv_cache_level}

    def label(self) -> str:
        act = "fp16 act" if self.activation_bits in (None, 16) else f"int{self.activation_bits} act"
        return f"{act}, {self.weight_memory_first} first in weight mem, KV in {self.kv_cache_level}"


DEFAULT = Deployment()
