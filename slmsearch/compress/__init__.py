"""Compression stages (depth pruning, WANDA, LoRA recovery, embedding precision, GPTQ + EoRA),
plans of stages, and the cached pipeline that runs them.

Names are imported lazily, so ``import slmsearch.compress`` does not import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "Plan": "slmsearch.compress.plan",
    "CANONICAL_ORDER": "slmsearch.compress.plan",
    "StageReport": "slmsearch.compress.stage",
    "Stage": "slmsearch.compress.stage",
    "DepthPrune": "slmsearch.compress.depth",
    "Wanda": "slmsearch.compress.wanda",
    "LoraRecovery": "slmsearch.compress.lora",
    "EmbeddingQuant": "slmsearch.compress.embedding",
    "Gptq": "slmsearch.compress.gptq",
    "Eora": "slmsearch.compress.gptq",
    "CalibSettings": "slmsearch.compress.calib",
    "Calibration": "slmsearch.compress.calib",
    "StageCache": "slmsearch.compress.cache",
    "PipelineResult": "slmsearch.compress.pipeline",
    "run": "slmsearch.compress.pipeline",
    "compress_to_dir": "slmsearch.compress.pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'slmsearch.compress' has no attribute {name!r}")
