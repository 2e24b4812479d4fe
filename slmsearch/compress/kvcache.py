"""KV-cache precision: keys and values stored at 8 or 4 bits instead of 16.

No weight changes. The stage records the width in the checkpoint's ``slmsearch.json``
(``kv_cache: {bits, group_size}``), and every model slmsearch loads from such a checkpoint
(:func:`slmsearch.checkpoint.load`) computes attention on keys and values rounded the way the
deployed cache holds them (:func:`slmsearch.compress.kernels.kv_fake_quant`: per token, per group
of ``group_size`` channels of a head, a 16-bit scale and zero), at every position, in perplexity,
TriviaQA and generation alike. The rounding is applied to the keys after the rotary embedding:
what a cache written once per token and read at every later step holds.

Keys are the hard half (a few channels carry most of their range; measured in
``docs/benchmarks.md``): ``key_group_size`` gives them finer groups than the values, and
``rotate`` multiplies each head's key and value rows by a Hadamard matrix before rounding
(queries get the same rotation online; the values' one folds into v_proj and o_proj).
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
KV_GROUPS = (8, 16, 32, 64, 128)


@dataclass(frozen=True)
class KvCacheQuant(Stage):
    """Store the KV cache at ``bits`` (asymmetric, per token and group of channels)."""

    kind = "kv_cache"
    works_on_dirs = True  # nothing to compute: the folder is linked, the records say the width
    column_defaults = {"kv_cache_bits": 16}
    bits: int = 16  # 16 = a float cache (no stage)
    group_size: int = 64  # channels of one head's value (and key) row per scale and zero
    key_group_size: int = 0  # the keys' group when finer than the values' (0: group_size)
    rotate: bool = False  # Hadamard-rotate each head's rows before rounding (kernels.kv_fake_quant)

    def __post_init__(self) -> None:
        check_choice("kv_cache", "bits", self.bits, KV_BITS)
        check_choice("kv_cache", "group_size", self.group_size, KV_GROUPS)
        if self.key_group_size:
            check_choice("kv_cache", "key_group_size", self.key_group_size, KV_GROUPS)
        if self.key_group_size == self.group_size:  # one plan, one form
            object.__setattr__(self, "key_group_size", 0)
        if not isinstance(self.rotate, bool):
            raise SlmsearchError(f"kv_cache.rotate must be true or false, got {self.rotate!r}")

    @property
    def key_group(self) -> int:
        """Channels of one head's key row per scale and zero."""
        return self.key_group_size or self.group_size

    def is_noop(self) -> bool:
        return self.bits == 16

    def check_fits(self, shape: ModelShape) -> None:
        head_dims = sorted({layer.head_dim for layer in shape.layers})
        for name, group in (("group_size", self.group_size), ("key_group_size", self.key_group)):
            bad = [d for d in head_dims if d % group]
            if bad:
                raise SlmsearchError(
                    f"kv_cache.{name}={group} must divide the head size {bad[0]}; "
                    f"choose one of {[g for g in KV_GROUPS if not bad[0] % g]}"
                )
        odd = [d for d in head_dims if d & (d - 1)]
        if self.rotate and odd:
            raise SlmsearchError(f"kv_cache.rotate needs a power-of-two head size, got {odd[0]}; set rotate: false")

    def shape(self, shape: ModelShape) -> ModelShape:
        return shape.with_kv_cache_bits(self.bits, self.group_size, key_group=self.key_group, rotate=self.rotate)

    def checkpoint_meta(self) -> dict[str, Any]:
        return {"kv_cache": self.settings()}

    def settings(self) -> dict[str, Any]:
        """What a checkpoint records (the keys' group and the rotation only where they are set)."""
        out: dict[str, Any] = {"bits": self.bits, "group_size": self.group_size}
        if self.key_group != self.group_size:
            out["key_group_size"] = self.key_group
        if self.rotate:
            out["rotate"] = True
        return out

    def label(self) -> str:
        return f"kv{self.bits}" + ("r" if self.rotate else "")

    def columns(self) -> dict[str, Any]:
        return {"kv_cache_bits": self.bits}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> KvCacheQuant | None:
        """``kv_cache_bits`` (16 = no stage), grouped by ``kv_cache_group`` and ``kv_cache_key_group``
        and rotated by ``kv_cache_rotate`` (each else the space's)."""
        bits = int(params.get("kv_cache_bits", 16))
        if bits == 16:
            return None
        group = params.get("kv_cache_group") or getattr(space, "kv_cache_group", 64)
        key_group = params.get("kv_cache_key_group") or getattr(space, "kv_cache_key_group", 0)
        rotate = params.get("kv_cache_rotate", getattr(space, "kv_cache_rotate", False))
        return cls(bits=bits, group_size=int(group), key_group_size=int(key_group or 0), rotate=bool(rotate))

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Any = None, base_dir: Path | None = None) -> StageReport:
        from slmsearch.checkpoint import copy_folder

        with Timer() as t:
            copy_folder(Path(src_dir), Path(out_dir), link_weights=True)
        return StageReport(self.kind, self.to_dict(), t.seconds, self.settings())


def kv_settings(meta: Mapping[str, Any]) -> KvCacheQuant | None:
    """The KV-cache stage a checkpoint's ``slmsearch.json`` content records, or None for a float
    cache."""
    kv = meta.get("kv_cache") or {}
    bits = int(kv.get("bits", 16))
    if bits >= 16:
        return None
    return KvCacheQuant(bits=bits, group_size=int(kv.get("group_size", 64)),  # validates
                        key_group_size=int(kv.get("key_group_size", 0)), rotate=bool(kv.get("rotate", False)))


def install(model: Any, bits: int, group_size: int, key_group_size: int = 0, rotate: bool = False) -> str:
    """Make ``model`` compute attention on keys and values rounded to ``bits`` (see the module
    docstring; keys in groups of ``key_group_size``, 0: ``group_size``); returns the attention
    implementation's registered name. Idempotent."""
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    from slmsearch.compress.kernels import kv_fake_quant

    key_group = key_group_size or group_size
    name = f"slmsearch_kv{bits}g{group_size}" + (f"k{key_group}" if key_group != group_size else "") + ("r" if rotate else "")

    def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, **kwargs: Any) -> Any:
        return sdpa_attention_forward(module, query, kv_fake_quant(key, bits, key_group, rotate),
                                      kv_fake_quant(value, bits, group_size, rotate), attention_mask, **kwargs)

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


def install_stage(model: Any, stage: KvCacheQuant) -> str:
    """:func:`install` with a KV-cache stage's settings."""
    return install(model, stage.bits, stage.group_size, stage.key_group, stage.rotate)


def folder_kv_settings(folder: Path) -> KvCacheQuant | None:
    """:func:`kv_settings` of a checkpoint folder's ``slmsearch.json`` (None without one)."""
    from slmsearch.checkpoint import META_FILE, read_meta

    return kv_settings(read_meta(folder)) if (Path(folder) / META_FILE).is_file() else None


def install_from_folder(model: Any, folder: Path) -> str | None:
    """:func:`install` with the width a checkpoint folder's ``slmsearch.json`` records, if any."""
    stage = folder_kv_settings(folder)
    return install_stage(model, stage) if stage else None
