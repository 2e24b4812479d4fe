"""The stage protocol: a frozen dataclass of settings that compresses a model.

In-memory stages implement ``apply(model, calib) -> StageReport``. Stages that work on
checkpoint folders (gptqmodel reads and writes folders) set ``works_on_dirs = True`` and implement
``apply_dir(src_dir, out_dir, calib, base_dir) -> StageReport``; the pipeline handles both kinds.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from slmsearch.errors import SlmsearchError


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
    """Base of every stage: serialization with unknown keys rejected, and the two apply forms."""

    kind: ClassVar[str] = ""
    works_on_dirs: ClassVar[bool] = False

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

    def apply(self, model: Any, calib: Any) -> StageReport:  # pragma: no cover - abstract
        raise NotImplementedError

    def apply_dir(self, src_dir: Path, out_dir: Path, calib: Any, base_dir: Path | None) -> StageReport:  # pragma: no cover
        raise NotImplementedError


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
