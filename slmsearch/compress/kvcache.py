"""KV-cache precision: keys and values stored at 8 or 4 bits instead of 16.

No weight changes. The stage records the width in the checkpoint's ``slmsearch.json``
(``kv_cache: {bits, group_size}``), and every model slmsearch loads from such a checkpoint
(:func:`slmsearch.checkpoint.load`) computes attention on keys and values rounded the way the
deployed cache holds them (:func:`slmsearch.compress.kernels.kv_fake_quant`: per token, per group
of ``group_size`` channels of a head, a 16-bit scale and zero), at every position, in perplexity,
TriviaQA and generation alike. The rounding is applied to the keys after the rotary embedding:
what a cache written once per token and read at every later step holds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.compress.stage import Stage, StageReport, Timer, check_choice
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    from slmsearch.hwmodel.shape import ModelShape

KV_BITS = (16, 8, 4)
KV_GROUPS = (16, 32, 64, 128)


@dataclass(frozen=True)
class KvCacheQuant(Stage):
    """Store the KV cache at ``bits`` (asymmetric, per token and group of channels)."""

    kind = "kv_cache"
    works_on_dirs = True  # nothing to compute: the folder is linked, the records say the width
    column_defaults = {"kv_cache_bits": 16}
    bits: int = 16  # 16 = a float cache (no stage)
    group_size: int = 64  # channels of one head's key (value) row per scale and zero

    def __post_init__(self) -> None:
        check_choice("kv_cache", "bits", self.bits, KV_BITS)
        check_choice("kv_cache", "group_size", self.group_size, KV_GROUPS)

    def is_noop(self) -> bool:
        return self.bits == 16

    def check_fits(self, shape: ModelShape) -> None:
        head_dims = sorted({layer.head_dim for layer in shape.layers})
        bad = [d for d in head_dims if d % self.group_size]
        if bad:
            raise SlmsearchError(
                f"kv_cache.group_size={self.group_size} must divide the head size {bad[0]}; "
                f"choose one of {[g for g in KV_GROUPS if not bad[0] % g]}"
            )

    def shape(self, shape: ModelShape) -> ModelShape:
        return shape.with_kv_cache_bits(self.bits, self.group_size)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"kv_cache": {"bits": self.bits, "group_size": self.group_size}}

    def label(self) -> str:
        return f"kv{self.bits}"

    def columns(self) -> dict[str, Any]:
        return {"kv_cache_bits": self.bits}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> KvCacheQuant | None:
        """``kv_cache_bits`` (16 = no stage), grouped by ``kv_cache_group`` (else the space's)."""
        bits = int(params.get("kv_cache_bits", 16))
        group = params.get("kv_cache_group") or getattr(space, "kv_cache_group", 64)
        return cls(bits=bits, group_size=int(group)) if bits != 16 else None

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Any = None, base_dir: Path | None = None) -> StageReport:
        from slmsearch.checkpoint import copy_folder

        with Timer() as t:
            copy_folder(Path(src_dir), Path(out_dir), link_weights=True)
        return StageReport(self.kind, self.to_dict(), t.seconds, {"bits": self.bits, "group_size": self.group_size})


def kv_settings(meta: Mapping[str, Any]) -> tuple[int, int] | None:
    """``(bits, group_size)`` of a checkpoint's quantized KV cache from its ``slmsearch.json``
    content, or None for a float cache."""
    kv = meta.get("kv_cache") or {}
    bits = int(kv.get("bits", 16))
    if bits >= 16:
        return None
    stage = KvCacheQuant(bits=bits, group_size=int(kv.get("group_size", 64)))  # validates
    return stage.bits, stage.group_size


def install(model: Any, bits: int, group_size: int) -> str:
    """Make ``model`` compute attention on keys and values rounded to ``bits`` (see the module
    docstring); returns the attention implementation's registered name. Idempotent."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from slmsearch.compress.kernels import kv_fake_quant

    name = f"slmsearch_kv{bits}g{group_size}"

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        return sdpa_attention_forward(module, query, kv_fake_quant(key, bits, group_size),
                                      kv_fake_quant(value, bits, group_size), attention_mask, **kwargs)

    AttentionInterface.register(name, attention)
    AttentionMaskInterface.register(name, sdpa_mask)
    set_attention(model, name)
    return name


def set_attention(model: Any, name: str) -> None:
    """Make every config of ``model`` use the attention implementation ``name`` (``"sdpa"``: the
    unrounded cache again)."""
    configs = [model.config] + [getattr(m, "config", None) for m in model.modules()]
    for config in {id(c): c for c in configs if c is not None}.values():
        if hasattr(config, "_attn_implementation"):
            config._attn_implementation = name


def folder_kv_settings(folder: Path) -> tuple[int, int] | None:
    """:func:`kv_settings` of a checkpoint folder's ``slmsearch.json`` (None without one)."""
    from slmsearch.checkpoint import META_FILE, read_meta

    return kv_settings(read_meta(folder)) if (Path(folder) / META_FILE).is_file() else None


def install_from_folder(model: Any, folder: Path) -> str | None:
    """:func:`install` with the width a checkpoint folder's ``slmsearch.json`` records, if any."""
    settings = folder_kv_settings(folder)
    return install(model, *settings) if settings else None
