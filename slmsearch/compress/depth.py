"""Depth pruning: drop decoder layers, chosen explicitly or by an importance score.

Scores (computed once per (model, calibration) and cached as JSON):

- ``angular``: mean angular distance ``arccos(cos(h_in, h_out)) / pi`` between the input of layer
  l and the output of layer l+n-1, for every l and every block length n (ShortGPT for n=1,
  PruneMe / "The Unreasonable Ineffectiveness of the Deeper Layers" for n>1). Low = redundant.
- ``ppl``: calibration perplexity with that single layer removed (Shortened LLaMA, arXiv
  2402.02834, PPL criterion). Low = redundant.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.compress.stage import Stage, StageReport, Timer, check_choice, check_range
from slmsearch.errors import SlmsearchError
from slmsearch.fsutil import read_json_checked, write_json_checked

if TYPE_CHECKING:
    import torch

    from slmsearch.compress.calib import Calibration
    from slmsearch.hwmodel.shape import ModelShape

# The ppl score runs L*(L-1)/2 layer passes per batch; it uses at most this many calibration
# windows (Shortened LLaMA scores on a small calibration set too).
PPL_SCORE_MAX_SAMPLES = 8
SCORE_VERSION = 1


def _layer_states(model: Any, ids: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """The input of every decoder layer and the last one's output (call under ``torch.no_grad``)."""
    from slmsearch.compress.calib import capture_first_inputs
    from slmsearch.compress.surgery import decoder_layers

    inputs = capture_first_inputs(model, [ids])
    hidden, kwargs = inputs.hidden[0], inputs.kwargs[0]
    states = [hidden]
    for layer in decoder_layers(model):
        out = layer(states[-1], **kwargs)
        states.append(out[0] if isinstance(out, tuple) else out)
    return states, kwargs


def _lm_loss(model: Any, hidden: torch.Tensor, ids: torch.Tensor) -> tuple[float, int]:
    """Summed next-token loss from the last hidden state, and its token count (under no_grad)."""
    import torch.nn.functional as F

    logits = model.lm_head(model.model.norm(hidden))[:, :-1].float()
    target = ids[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum")
    return float(loss), int(target.numel())


def importance_scores(model: Any, calib: Calibration, *, with_ppl: bool = True) -> dict[str, Any]:
    """The depth scores for ``model`` on ``calib`` (see the module docstring); the costly
    ``ppl`` score only when ``with_ppl``."""
    import torch

    from slmsearch.compress.calib import model_device
    from slmsearch.compress.kernels import angular_distance_sums
    from slmsearch.compress.surgery import decoder_layers

    n_layers = len(decoder_layers(model))
    ang_sum = torch.zeros(n_layers + 1, n_layers + 1, dtype=torch.float64)
    ang_count = 0
    ppl_loss = [0.0] * n_layers
    base_loss, n_tok = 0.0, 0
    ppl_budget = PPL_SCORE_MAX_SAMPLES if with_ppl else 0
    was_training = model.training
    model.eval()
    layers = decoder_layers(model)
    try:
        with torch.no_grad():
            for ids in calib.token_batches():
                ids = ids.to(model_device(model))
                states, kwargs = _layer_states(model, ids)
                ang_sum += angular_distance_sums(states)
                ang_count += states[0].reshape(-1, states[0].shape[-1]).shape[0]
                if ppl_budget > 0:
                    ids_p = ids[:ppl_budget]
                    ppl_budget -= ids_p.shape[0]
                    kw = {k: (v[: ids_p.shape[0]] if isinstance(v, torch.Tensor) and v.shape[0] == ids.shape[0] and v.shape[0] > 1 else v) for k, v in kwargs.items()}
                    loss, count = _lm_loss(model, states[-1][: ids_p.shape[0]], ids_p)
                    base_loss += loss
                    n_tok += count
                    for i in range(n_layers):
                        h = states[i][: ids_p.shape[0]]
                        for j in range(i + 1, n_layers):
                            out = layers[j](h, **kw)
                            h = out[0] if isinstance(out, tuple) else out
                        ppl_loss[i] += _lm_loss(model, h, ids_p)[0]
    finally:
        model.train(was_training)
    angular = {
        str(n): [float(ang_sum[l, l + n] / ang_count) for l in range(n_layers - n + 1)] for n in range(1, n_layers + 1)
    }
    scores: dict[str, Any] = {"version": SCORE_VERSION, "n_layers": n_layers, "angular": angular}
    if with_ppl:
        scores["ppl"] = [math.exp(x / n_tok) for x in ppl_loss]
        scores["ppl_base"] = math.exp(base_loss / n_tok)
    return scores


def cached_importance_scores(model: Any, calib: Calibration, *, with_ppl: bool = True) -> dict[str, Any]:
    """:func:`importance_scores`, read from / written to ``calib.score_dir`` when both it and
    ``calib.model_key`` are set (key: model fingerprint + calibration settings)."""
    from slmsearch.compress.surgery import decoder_layers

    path: Path | None = None
    if calib.score_dir is not None and calib.model_key:
        key = "-".join(f"{k}{v}" for k, v in calib.settings.key().items())
        path = Path(calib.score_dir) / f"depth-{calib.model_key[:24]}-{key}.json"
        data = read_json_checked(path)  # None when missing or changed since written: recomputed
        if (
            data is not None
            and data.get("version") == SCORE_VERSION
            and data.get("n_layers") == len(decoder_layers(model))
            and (not with_ppl or "ppl" in data)
        ):
            return data
    scores = importance_scores(model, calib, with_ppl=with_ppl)
    if path is not None:
        write_json_checked(path, scores)
    return scores


def select_layers(scores: dict[str, Any], drop: int, by: str, block: int) -> tuple[int, ...]:
    """The layers to drop: the ``drop`` lowest single-layer scores, or ``drop/block`` lowest
    non-overlapping contiguous blocks of ``block`` layers (angular only)."""
    n_layers = int(scores["n_layers"])
    if drop >= n_layers:
        raise SlmsearchError(f"depth.drop must be < {n_layers} (the model's layers), got {drop}")
    if by == "ppl":
        values = scores["ppl"]
        order = sorted(range(n_layers), key=lambda i: (values[i], i))
        return tuple(sorted(order[:drop]))
    values = scores["angular"][str(block)]
    chosen: set[int] = set()
    for start in sorted(range(len(values)), key=lambda i: (values[i], i)):
        if len(chosen) >= drop:
            break
        span = set(range(start, start + block))
        if not span & chosen:
            chosen |= span
    if len(chosen) < drop:
        raise SlmsearchError(f"cannot place {drop // block} non-overlapping blocks of {block} layers")
    return tuple(sorted(chosen))


@dataclass(frozen=True)
class DepthPrune(Stage):
    """Drop decoder layers: explicit ``indices``, or ``drop`` layers chosen ``by`` a score."""

    kind = "depth"
    column_defaults = {"drop_layers": 0}
    drop: int = 0  # how many layers to drop (ignored when indices are given)
    indices: tuple[int, ...] | None = None  # explicit layers to drop
    by: str = "angular"  # "angular" (ShortGPT/PruneMe) or "ppl" (Shortened LLaMA)
    block: int = 1  # angular only: drop contiguous blocks of this many layers

    def __post_init__(self) -> None:
        check_range("depth", "drop", self.drop, 0, 1024, integer=True)
        check_choice("depth", "by", self.by, ("angular", "ppl"))
        check_range("depth", "block", self.block, 1, 1024, integer=True)
        if self.indices is not None:
            object.__setattr__(self, "indices", tuple(int(i) for i in self.indices))
            if self.drop not in (0, len(self.indices)):
                raise SlmsearchError("depth: give either indices or drop, not both")
        if self.by == "ppl" and self.block != 1:
            raise SlmsearchError("depth: block > 1 needs by='angular' (the ppl score is per layer)")
        if self.drop % self.block:
            raise SlmsearchError(f"depth.drop ({self.drop}) must be a multiple of depth.block ({self.block})")

    @property
    def n_dropped(self) -> int:
        return len(self.indices) if self.indices is not None else self.drop

    def is_noop(self) -> bool:
        return self.n_dropped == 0

    def check_fits(self, shape: ModelShape) -> None:
        """At least one layer stays; explicit indices name layers of the model."""
        if self.indices is None and self.drop >= shape.n_layers:
            raise SlmsearchError(
                f"depth.drop={self.drop} must be below the model's {shape.n_layers} layers (at least one stays)"
            )
        if self.indices is not None:
            bad = sorted(i for i in self.indices if not 0 <= i < shape.n_layers)
            if bad or len(set(self.indices)) >= shape.n_layers:
                raise SlmsearchError(
                    f"depth.indices={list(self.indices)} must name layers in 0..{shape.n_layers - 1} and keep at least one"
                )

    def shape(self, shape: ModelShape) -> ModelShape:
        return shape.drop_layers(range(self.drop) if self.indices is None else self.indices)

    def label(self) -> str:
        return f"drop{self.n_dropped}"

    def columns(self) -> dict[str, Any]:
        return {"drop_layers": self.n_dropped}

    @classmethod
    def from_params(cls, params: Mapping[str, Any], space: Any, earlier: tuple[Stage, ...]) -> DepthPrune | None:
        """``drop_layers`` layers, chosen by the space's ``depth_score``."""
        drop = int(params.get("drop_layers", 0))
        return cls(drop=drop, by=space.depth_score) if drop else None

    def apply(self, model: Any, calib: Calibration) -> StageReport:
        from slmsearch.compress.surgery import decoder_layers, drop_layers

        metrics: dict[str, Any] = {"layers_before": len(decoder_layers(model))}
        with Timer() as t:
            if self.indices is not None:
                chosen = self.indices
            elif self.drop == 0:
                chosen = ()
            else:
                scores = cached_importance_scores(model, calib, with_ppl=self.by == "ppl")
                chosen = select_layers(scores, self.drop, self.by, self.block)
                metrics["scores"] = scores["ppl"] if self.by == "ppl" else scores["angular"][str(self.block)]
            drop_layers(model, chosen)
        metrics.update(dropped=list(chosen), layers_after=len(decoder_layers(model)))
        return StageReport(self.kind, self.to_dict(), t.seconds, metrics)
