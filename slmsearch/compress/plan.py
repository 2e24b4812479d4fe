"""A compression plan: an ordered tuple of stages, in the canonical order, as YAML/JSON.

Canonical order: depth -> wanda -> lora -> embedding -> gptq -> minmax -> eora -> kv_cache, each at
most once; gptq and minmax are two ways to quantize the same Linears (a plan holds one).
The YAML/JSON form is ``{"stages": [{"stage": "wanda", "sparsity": 0.5}, ...]}`` (a bare list
is accepted too); unknown stage names and unknown keys are rejected by name.

What a plan tells the hardware model, the checkpoint's meta file, labels and reports is what its
stages tell, in order: each method below loops over the stages. Importing this module does not
import torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.compress.depth import DepthPrune
from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch.compress.gptq import Eora, Gptq
from slmsearch.compress.kvcache import KvCacheQuant
from slmsearch.compress.lora import LoraRecovery
from slmsearch.compress.minmax import FOLLOWS_PATTERNS, MinMaxQuant
from slmsearch.compress.stage import Stage
from slmsearch.compress.wanda import Wanda
from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    from slmsearch.hwmodel.shape import ModelShape

STAGE_TYPES: dict[str, type[Stage]] = {
    cls.kind: cls for cls in (DepthPrune, Wanda, LoraRecovery, EmbeddingQuant, Gptq, MinMaxQuant, Eora, KvCacheQuant)
}
CANONICAL_ORDER: tuple[str, ...] = ("depth", "wanda", "lora", "embedding", "gptq", "minmax", "eora", "kv_cache")
PLAN_VERSION = 1
DENSE = {"format": "dense", "density": 1.0}  # the sparsity a checkpoint declares when no stage zeroed weights


@dataclass(frozen=True)
class Plan:
    """An ordered tuple of stages (validated: canonical order, each kind at most once)."""

    stages: tuple[Stage, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "stages", tuple(self.stages))
        kinds = [s.kind for s in self.stages]
        for stage in self.stages:
            if not isinstance(stage, Stage):
                raise SlmsearchError(f"a plan holds stages, got {type(stage).__name__}")
        if len(set(kinds)) != len(kinds):
            raise SlmsearchError(f"each stage may appear once in a plan, got {kinds}")
        ranks = [CANONICAL_ORDER.index(k) for k in kinds]
        if ranks != sorted(ranks):
            raise SlmsearchError(
                f"stages must follow the order {' -> '.join(CANONICAL_ORDER)}, got {' -> '.join(kinds)}"
            )
        if "gptq" in kinds and "minmax" in kinds:
            raise SlmsearchError("a plan quantizes the Linears with gptq or with minmax, not both; remove one of the two stages")
        wanda = self.get("wanda")
        if "minmax" in kinds and wanda is not None and not wanda.is_noop() and wanda.pattern not in FOLLOWS_PATTERNS:  # type: ignore[attr-defined]
            raise SlmsearchError(f"minmax's grid does not keep zeros, so it cannot follow wanda pattern {wanda.pattern!r}; "  # type: ignore[attr-defined]
                                 "use wanda pattern 'structured' (removes channels) or gptq (keeps the zeros)")
        if "eora" in kinds and "gptq" not in kinds and self.get("eora").rank > 0:  # type: ignore[union-attr]
            raise SlmsearchError("an eora stage needs a gptq stage before it")
        lora = self.get("lora")
        if lora is not None and not lora.merge and not lora.is_noop() and "gptq" in kinds:  # type: ignore[attr-defined]
            raise SlmsearchError("lora.merge=false cannot be followed by gptq; set lora.merge=true (the merge keeps pruning)")

    def get(self, kind: str) -> Stage | None:
        for stage in self.stages:
            if stage.kind == kind:
                return stage
        return None

    # serialization ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "stages": [s.to_dict() for s in self.stages]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, data: Any) -> Plan:
        if isinstance(data, list):
            data = {"stages": data}
        if not isinstance(data, dict):
            raise SlmsearchError(f"a plan is a mapping with 'stages' (or a list of stages), got {type(data).__name__}")
        unknown = sorted(set(data) - {"stages", "version"})
        if unknown:
            raise SlmsearchError(f"plan has unknown key(s) {', '.join(map(repr, unknown))}; known: 'stages', 'version'")
        if data.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise SlmsearchError(f"plan version {data.get('version')!r} is not supported (expected {PLAN_VERSION})")
        stages = []
        for i, item in enumerate(data.get("stages") or []):
            if not isinstance(item, dict) or "stage" not in item:
                raise SlmsearchError(f"plan stage #{i} must be a mapping with a 'stage' name, got {item!r}")
            kind = item["stage"]
            if kind not in STAGE_TYPES:
                raise SlmsearchError(f"plan stage #{i}: unknown stage {kind!r}; known: {', '.join(CANONICAL_ORDER)}")
            stages.append(STAGE_TYPES[kind].from_dict(item))
        return cls(tuple(stages))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            return cls.from_dict(json.loads(text))
        except json.JSONDecodeError as exc:
            raise SlmsearchError(f"plan is not valid JSON: {exc}") from None

    @classmethod
    def from_yaml(cls, text: str) -> Plan:
        import yaml

        try:
            return cls.from_dict(yaml.safe_load(text))
        except yaml.YAMLError as exc:
            raise SlmsearchError(f"plan is not valid YAML: {str(exc).splitlines()[0]}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Plan:
        """A plan from a ``.yaml``/``.yml``/``.json`` file."""
        p = Path(path)
        if not p.is_file():
            raise SlmsearchError(f"plan file {str(p)!r} does not exist")
        text = p.read_text(encoding="utf-8")
        return cls.from_json(text) if p.suffix == ".json" else cls.from_yaml(text)

    # caching ---------------------------------------------------------------------------------
    def effective(self) -> Plan:
        """The plan without stages that do nothing (same output, shorter cache keys)."""
        return Plan(tuple(s for s in self.stages if not s.is_noop()))

    def prefixes(self) -> list[Plan]:
        """Every non-empty prefix, shortest first (the stage cache stores each)."""
        return [Plan(self.stages[: i + 1]) for i in range(len(self.stages))]

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()

    # what the stages tell ------------------------------------------------------------------------
    def check_fits(self, base_shape: ModelShape) -> None:
        """Raise a SlmsearchError naming the first stage that cannot run on a model of
        ``base_shape`` (too many layers dropped, a group size that does not divide, ...), by
        arithmetic on the shapes each stage meets: before any model is loaded or stage run."""
        shape = base_shape
        for stage in self.effective().stages:
            stage.check_fits(shape)
            shape = stage.shape(shape)

    def shape(self, base_shape: ModelShape) -> ModelShape:
        """The ModelShape of this plan's output, by pure arithmetic on ``base_shape``: each stage
        that does something changes the shape in turn (no-op stages are skipped, as the pipeline
        skips them)."""
        shape = base_shape
        for stage in self.effective().stages:
            shape = stage.shape(shape)
        return shape

    def checkpoint_meta(self) -> dict[str, Any]:
        """The entries the stages put in the output checkpoint's ``slmsearch.json`` (the sparsity
        is dense unless a stage declares it; a later stage's entry replaces an earlier one's)."""
        meta: dict[str, Any] = {"sparsity": dict(DENSE)}
        for stage in self.effective().stages:
            meta.update(stage.checkpoint_meta())
        return meta

    def label(self) -> str:
        """A short human label, e.g. ``drop4 wanda2:4@0.50 lora8 emb4 w3g64 eora16``."""
        return " ".join(stage.label() for stage in self.stages) or "baseline"

    def columns(self) -> dict[str, Any]:
        """The report's per-stage columns: each stage type's defaults, overridden by the stages present."""
        out: dict[str, Any] = {}
        for kind in CANONICAL_ORDER:
            out.update(STAGE_TYPES[kind].column_defaults)
        for stage in self.stages:
            out.update(stage.columns())
        return out
