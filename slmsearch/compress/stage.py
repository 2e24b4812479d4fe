"""The stage protocol: a frozen dataclass of settings that compresses a model.

In-memory stages implement ``apply(model, calib) -> StageReport``. Stages that work on
checkpoint folders (gptqmodel reads and writes folders) set ``works_on_dirs = True`` and implement
``apply_dir(src_dir, out_dir, calib, base_dir) -> StageReport``; the pipeline handles both kinds.

A stage also owns what the rest of slmsearch knows about it: its change to the hardware model's
shape, its entries in the checkpoint's ``slmsearch.json``, its label and report columns, and how
the search's sampled parameters become the stage. A stage module imports nothing heavy at module
level (the search space builds plans without torch): ``apply`` imports what it runs.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from slmsearch.errors import SlmsearchError

if TYPE_CHECKING:
    from slmsearch.hwmodel.shape import ModelShape

ADAPTER_BITS = 16  # a kept LoRA or an EoRA adapter is stored in 16-bit floats
SCALE_BITS = (16, 8)  # how a stage stores its scales: fp16, or 8-bit codes on a log2 grid per tensor


@dataclass
class StageReport:
    """What one stage did: its name and settings, wall time, and named metrics."""

    name: str
    settings: dict[str, Any]
    seconds: float = 0.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageReport:
        return cls(**data)


class Timer:
    """``with Timer() as t: ...; t.seconds``."""

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        self.seconds = 0.0
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


@dataclass(frozen=True)
class Stage:
    """Base of every stage: serialization with unknown keys rejected, the two apply forms, and
    what the stage tells the hardware model, the checkpoint's meta file, labels and reports."""

    kind: ClassVar[str] = ""
    works_on_dirs: ClassVar[bool] = False
    # The report's columns of a plan without this stage (see :meth:`columns`).
    column_defaults: ClassVar[Mapping[str, Any]] = {}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"stage": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Stage:
        body = {k: v for k, v in data.items() if k != "stage"}
        names = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(body) - set(names))
        if unknown:
            raise SlmsearchError(
                f"stage {cls.kind!r} has no setting(s) {', '.join(map(repr, unknown))}; "
                f"known: {', '.join(sorted(names))}"
            )
        kwargs = {}
        for key, value in body.items():
            if isinstance(value, list):
                value = tuple(value)
            kwargs[key] = value
        try:
            return cls(**kwargs)
        except TypeError as exc:
            raise SlmsearchError(f"stage {cls.kind!r}: {exc}") from None

    def is_noop(self) -> bool:
        """True when the stage leaves the model unchanged (its output equals its input)."""
        return False

    def check_fits(self, shape: ModelShape) -> None:
        """Raise a SlmsearchError when this stage cannot run on a model of ``shape`` (its input's
        shape), by arithmetic alone: ``Plan.check_fits`` calls it before any stage runs. The
        default: every shape fits."""
        return None

    # what the stage tells the rest of slmsearch ---------------------------------------------------
    def shape(self, shape: ModelShape) -> ModelShape:  # pragma: no cover - abstract
        """The hardware-model shape of this stage's output, given its input's ``shape`` (pure
        arithmetic). Only for a stage that does something: ``Plan.shape`` skips no-op stages, as the
        pipeline does."""
        raise NotImplementedError

    def checkpoint_meta(self) -> dict[str, Any]:
        """The entries this stage puts in the checkpoint's ``slmsearch.json``: what its tensors
        cannot tell the hardware model (none by default). Only for a stage that does something."""
        return {}

    def label(self) -> str:  # pragma: no cover - abstract
        """A short human label, e.g. ``drop4`` or ``w3g64``."""
        raise NotImplementedError

    def columns(self) -> dict[str, Any]:
        """The report's columns for this stage (same keys as ``column_defaults``)."""
        return {}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> Stage | None:  # pragma: no cover - abstract
        """The stage a search trial's sampled ``params`` stand for, or None when they ask for none.

        ``space`` is the study's ``slmsearch.search.config.SpaceConfig`` (read by attribute:
        compress does not import search); ``earlier`` holds the stages built before this one, in
        the canonical order. The parameter names and values are those stored with every trial:
        changing them changes the plan a stored trial rebuilds.
        """
        raise NotImplementedError

    def apply(self, model: Any, calib: Any) -> StageReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Any, base_dir: Path | None) -> StageReport:  # pragma: no cover
        raise NotImplementedError


def space_first(space: Any, field: str, default: Any) -> Any:
    """The first of the search space's choices ``field`` (what a stage takes when the sampled
    parameters do not name the setting: a single choice is not sampled), else ``default``."""
    return (getattr(space, field, None) or (default,))[0]


def check_range(stage: str, name: str, value: Any, low: float, high: float, *, integer: bool = False) -> None:
    """Raise a SlmsearchError unless ``low <= value <= high`` (and an int when ``integer``)."""
    if integer and (isinstance(value, bool) or not isinstance(value, int)):
        raise SlmsearchError(f"{stage}.{name} must be an integer, got {value!r}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise SlmsearchError(f"{stage}.{name} must be a number, got {value!r}")
    if not low <= value <= high:
        raise SlmsearchError(f"{stage}.{name}: {low} <= {name} <= {high} must hold, but got {name}={value}")


def check_choice(stage: str, name: str, value: Any, choices: tuple[Any, ...]) -> None:
    if value not in choices:
        raise SlmsearchError(
            f"{stage}.{name} must be one of {', '.join(map(repr, choices))}, got {value!r}"
        )
