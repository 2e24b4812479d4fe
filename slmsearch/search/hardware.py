"""A model (and a plan) as the hardware model sees it: the shape it deploys, and `slmsearch hw`'s report.

Here because it maps a Plan to a shape, and hwmodel may not import compress.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from slmsearch.errors import SlmsearchError
from slmsearch.hwmodel import ModelShape
from slmsearch.models import model_config


def max_positions(location: str) -> int | None:
    """The longest sequence the model at ``location`` was built for (``max_position_embeddings``),
    or None when its config does not say."""
    value = model_config(location).get("max_position_embeddings")
    return int(value) if isinstance(value, int) and value > 0 else None


def check_context(location: str, context_len: int, key: str = "--context") -> None:
    """A context length of at least 1 token and at most the model's positions."""
    limit = max_positions(location)
    if isinstance(context_len, bool) or not isinstance(context_len, int) or context_len < 1 or (limit and context_len > limit):
        allowed = f"1..{limit}" if limit else ">= 1"
        raise SlmsearchError(
            f"{key} {context_len!r} is outside the model's positions; allowed: {allowed} tokens "
            f"(max_position_embeddings of {location})"
        )


def base_shape(location: str) -> ModelShape:
    """The base model's shape from its config, as deployed: every weight dense and 16-bit, whatever
    precision the checkpoint stores. ``location`` is a model folder or a hub id."""
    return ModelShape.from_hf_config(model_config(location))


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

        plan = Plan.load(plan_file)
        plan.check_fits(shape)
        shape = plan.shape(shape)
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
    from slmsearch.outputs import check_output_file

    check_output_file(out_path)
    plat = load_platform(platform, overrides or None)
    location = resolve_model(model)
    check_context(location, context_len)
    limit = max_positions(location)
    if isinstance(prefill_len, bool) or not isinstance(prefill_len, int) or prefill_len < 0 or (limit and prefill_len > limit):
        raise SlmsearchError(f"--prefill {prefill_len!r} is outside the model's positions; allowed: 0..{limit or 'any'} tokens")
    report = hw_report(model_shape(location, plan_file), plat, context_len=context_len, prefill_len=prefill_len)
    write_json_atomic(Path(out_path), report)
    return report
