"""A model (and a plan) as the hardware model sees it: the shape it deploys, and `slmsearch hw`'s report.

Here because it maps a Plan to a shape, and hwmodel may not import compress.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from slmsearch.hwmodel import ModelShape


def base_shape(location: str) -> ModelShape:
    """The base model's shape from its config, as deployed: every weight dense and 16-bit, whatever
    precision the checkpoint stores. ``location`` is a model folder or a hub id."""
    from slmsearch.checkpoint import CONFIG_FILE

    path = Path(location)
    if path.is_dir():
        return ModelShape.from_hf_config(json.loads((path / CONFIG_FILE).read_text()))
    from transformers import AutoConfig

    return ModelShape.from_hf_config(AutoConfig.from_pretrained(location).to_dict())


def model_shape(location: str, plan_file: str | Path | None = None) -> ModelShape:
    """The shape of the model at ``location`` with ``plan_file``'s shape changes applied.

    A folder that ``slmsearch compress`` (or gptqmodel) wrote is read as stored; any other model
    as deployed (:func:`base_shape`).
    """
    from slmsearch.checkpoint import META_FILE, QUANTIZE_CONFIG_FILE

    folder = Path(location)
    compressed = (folder / META_FILE).is_file() or (folder / QUANTIZE_CONFIG_FILE).is_file()
    shape = ModelShape.from_checkpoint(location) if compressed else base_shape(location)
    if plan_file is not None:
        from slmsearch.compress.plan import Plan

        shape = Plan.load(plan_file).shape(shape)
    return shape


def write_hw_report(
    out_path: str | Path, *, model: str | None = None, plan_file: str | Path | None = None, platform: str = "siracusa",
    overrides: dict[str, float] | None = None, context_len: int = 512, prefill_len: int = 0,
) -> dict[str, Any]:
    """Memory, placement, latency and energy of ``model`` (default SmolLM2-135M) after ``plan_file``
    on ``platform`` (values replaced by ``overrides``), written to ``out_path`` as JSON; returns it."""
    from slmsearch.fsutil import write_json_atomic
    from slmsearch.hwmodel import load_platform
    from slmsearch.hwmodel.summary import hw_report
    from slmsearch.models import resolve_model

    plat = load_platform(platform, overrides or None)
    report = hw_report(model_shape(resolve_model(model), plan_file), plat, context_len=context_len, prefill_len=prefill_len)
    write_json_atomic(Path(out_path), report)
    return report
