"""Cheap fidelity first: which screened candidate the study compresses and evaluates next.

A study with screening keeps two kinds of trials in its storage: *screens*, scored in seconds by
the proxy (:mod:`slmsearch.compress.proxy`) in a companion study, and *full trials*, compressed
and evaluated in the user's study. Before each full trial the runner screens a few more
candidates, then promotes the one this module chooses:

1. **A learned correction.** The proxy leaves out GPTQ's error compensation, LoRA and EoRA, so
   its perplexity is off by an amount that depends on the plan. Each full trial measures the
   same windows the proxy scored (its early token perplexity), so the residual
   ``log(full) - log(proxy)`` is known for every evaluated plan. :func:`fit_correction` fits one
   additive term per plan feature (:func:`plan_features`: the GPTQ width, LoRA, EoRA) by ridge
   regression toward :data:`PRIOR`, so the first promotions use the prior and later ones what
   this model and machine measured. This is the "learned predictor over evaluated plans" of AMQ
   and EvoPress (``shared/research/anchors.md``), kept to a handful of parameters because a study
   evaluates few plans.
2. **The front it predicts.** Every candidate becomes a point (predicted log perplexity, then
   the study's hardware objectives), all minimized; evaluated plans are points with their
   measured perplexity. :func:`choose` promotes the candidate whose predicted point adds the most
   hypervolume to the evaluated points; one predicted broken (over the pruning limit) is never
   promoted. When no candidate is predicted to add anything, it returns None and the runner
   screens more.

Everything here is pure (no Optuna, no torch): ``bench/search_efficiency.py`` replays it on a
table with the study's own rule.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

# Prior residual log(full / proxy) per feature, on the default model (SmolLM2-135M, 2 x 512
# WikiText-2 test windows, AMD EPYC, 2026-12-01; docs/benchmarks.md sections 6 and 9):
# GPTQ 3-bit g64 with scale search x1.85 dense vs round-to-nearest x5.29 -> -1.05; 4-bit x1.13 vs
# x1.40 -> -0.22 (bench/levers.py's plans). 2-bit: GPTQ is *worse* than round-to-nearest there,
# median +1.0 over the widened 2-bit plans of bench/grid_levers.csv (+2.1 with none widened; a first
# version assumed -2.0 and promoted a 2-bit plan in the side-by-side bench).
# LoRA and EoRA: assumed small recoveries (-0.05 each), so that a plan with them is preferred
# over the same plan without only after an evaluation shows it.
PRIOR: dict[str, float] = {"gptq2": 1.0, "gptq3": -1.05, "gptq4": -0.22, "gptq8": 0.0, "lora": -0.05, "eora": -0.05}
PRIOR_WEIGHT = 1.0  # the prior counts as this many evaluated plans per feature


@dataclass(frozen=True)
class Point:
    """A plan as the chooser sees it. ``ppl`` is the proxy's (a candidate) or the measured early
    token perplexity (an evaluated plan); ``costs`` are the hardware objectives, minimized."""

    key: str
    ppl: float
    features: tuple[str, ...]
    costs: tuple[float, ...]
    proxy_ppl: float | None = None  # an evaluated plan's proxy score, when it was screened
    weights: tuple[float, ...] = ()  # each feature's share (e.g. of the layers at a GPTQ width); () = 1 each

    def weighted(self) -> tuple[tuple[str, float], ...]:
        return tuple(zip(self.features, self.weights or (1.0,) * len(self.features)))


# one GPTQ width up, as the GPTQ stage widens its most sensitive layers (compress/gptq.py's WIDER)
_WIDER = {2: 3, 3: 4, 4: 8, 8: 8}


def plan_features(plan: Mapping[str, Any]) -> tuple[str, ...]:
    """The features of a plan dict (``Plan.to_dict``) that the proxy leaves out or approximates."""
    return weighted_features(plan)[0]


def weighted_features(plan: Mapping[str, Any], n_layers: int | None = None) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """:func:`plan_features` with each one's weight: a GPTQ width weighs the share of the kept
    layers quantized at it (``n_layers``: the model's layers before any is dropped; None counts
    every layer at the stage's ``bits``), LoRA and EoRA weigh 1. A 3-bit plan with most layers
    widened to 4 bits is corrected mostly as a 4-bit one."""
    names: list[str] = []
    weights: list[float] = []

    def add(name: str, weight: float) -> None:
        if weight > 0:
            if name in names:
                weights[names.index(name)] += weight
            else:
                names.append(name)
                weights.append(weight)

    dropped = sum(len(st["indices"]) if st.get("indices") is not None else int(st.get("drop", 0))
                  for st in plan.get("stages", []) if st.get("stage") == "depth")
    for stage in plan.get("stages", []):
        kind = stage.get("stage")
        if kind == "gptq" and int(stage.get("bits", 16)) < 16:
            bits = int(stage["bits"])
            widths = [int(b) for b in stage.get("layer_bits") or []]
            wider = int(stage.get("wider_layers", 0) or 0)
            if not widths and wider and n_layers is not None and n_layers - dropped > 0:
                kept = n_layers - dropped
                widths = [_WIDER.get(bits, bits)] * min(wider, kept) + [bits] * max(kept - wider, 0)
            if widths:
                for b in sorted(set(widths)):
                    if b < 16:
                        add(f"gptq{b}", widths.count(b) / len(widths))
            else:
                add(f"gptq{bits}", 1.0)
        elif kind == "lora" and int(stage.get("rank", 0)) > 0:
            add("lora", 1.0)
        elif kind == "eora" and int(stage.get("rank", 0)) > 0:
            add("eora", 1.0)
    return tuple(names), tuple(weights)


def fit_correction(evaluated: Sequence[Point], prior: Mapping[str, float] = PRIOR,
                   weight: float = PRIOR_WEIGHT) -> dict[str, float]:
    """Per-feature additive corrections of the proxy's log perplexity: ridge regression of the
    residuals ``log(ppl) - log(proxy_ppl)`` of evaluated, screened plans toward ``prior``
    (features outside ``prior`` start at 0). Solved by coordinate descent (a few features)."""
    rows = [(dict(p.weighted()), math.log(p.ppl) - math.log(p.proxy_ppl)) for p in evaluated
            if p.proxy_ppl and p.proxy_ppl > 0 and p.ppl > 0 and math.isfinite(p.ppl) and math.isfinite(p.proxy_ppl)]
    names = sorted({f for feats, _ in rows for f in feats} | set(prior))
    theta = {f: float(prior.get(f, 0.0)) for f in names}
    for _ in range(50):
        for f in names:
            num = weight * prior.get(f, 0.0)
            den = weight
            for feats, residual in rows:
                if f in feats:
                    w = feats[f]
                    num += w * (residual - sum(theta[g] * v for g, v in feats.items() if g != f))
                    den += w * w
            theta[f] = num / den
    return theta


def predicted_ppl(point: Point, theta: Mapping[str, float]) -> float:
    """The candidate's proxy perplexity corrected by ``theta``."""
    return point.ppl * math.exp(sum(theta.get(f, 0.0) * w for f, w in point.weighted()))


def hypervolume(points: Sequence[Sequence[float]], ref: Sequence[float]) -> float:
    """Hypervolume dominated by ``points`` (minimized) up to ``ref``: exact, by slicing on the last
    dimension (fine for the few dozen points a study holds)."""
    pts = [tuple(p) for p in points if all(a < b for a, b in zip(p, ref))]
    if not pts:
        return 0.0
    if len(ref) == 1:
        return ref[0] - min(p[0] for p in pts)
    pts.sort(key=lambda p: p[-1])
    total = 0.0
    for i, p in enumerate(pts):
        upper = pts[i + 1][-1] if i + 1 < len(pts) else ref[-1]
        if upper > p[-1]:
            total += (upper - p[-1]) * hypervolume([q[:-1] for q in pts[: i + 1]], ref[:-1])
    return total


def _vector(ppl: float, costs: Sequence[float]) -> tuple[float, ...]:
    return (math.log(max(ppl, 1e-12)), *costs)


def choose(candidates: Sequence[Point], evaluated: Sequence[Point], theta: Mapping[str, float], *,
           broken_ppl: float | None = None) -> Point | None:
    """The candidate whose predicted point adds the most hypervolume to the evaluated points, or
    None when none adds any; the one with the lowest predicted perplexity when nothing is evaluated
    yet. Candidates predicted over ``broken_ppl`` are never chosen."""
    scored = [(c, predicted_ppl(c, theta)) for c in candidates]
    scored = [(c, p) for c, p in scored if math.isfinite(p) and (broken_ppl is None or p <= broken_ppl)]
    if not scored:
        return None
    base = [_vector(e.ppl, e.costs) for e in evaluated if math.isfinite(e.ppl) and (broken_ppl is None or e.ppl <= broken_ppl)]
    if not base:
        # Nothing evaluated yet: the best predicted model first. The study exists to find the best
        # model within the budget, and with no evaluated point the hypervolume gives the
        # quality extreme the thinnest box (it is the slowest plan: its latency normalizes to 1,
        # 0.1 short of the reference), so it would come after faster, worse plans.
        return fallback(candidates, theta, broken_ppl=broken_ppl)
    vectors = [_vector(p, c.costs) for c, p in scored]
    every = base + vectors
    dims = len(every[0])
    lo = [min(v[i] for v in every) for i in range(dims)]
    hi = [max(v[i] for v in every) for i in range(dims)]
    span = [(h - low) or 1.0 for low, h in zip(lo, hi)]

    def norm(v: Sequence[float]) -> tuple[float, ...]:
        return tuple((x - low) / s for x, low, s in zip(v, lo, span))

    ref = [1.1] * dims
    base_n = [norm(v) for v in base]
    before = hypervolume(base_n, ref)
    best: tuple[float, Point] | None = None
    for (cand, _), v in zip(scored, vectors):
        gain = hypervolume([*base_n, norm(v)], ref) - before
        if gain > 1e-12 and (best is None or gain > best[0]):
            best = (gain, cand)
    return best[1] if best else None


def fallback(candidates: Sequence[Point], theta: Mapping[str, float], *, broken_ppl: float | None = None) -> Point | None:
    """When no candidate is predicted to improve the front: the one with the lowest predicted
    perplexity (then the lowest costs) that is not predicted broken, or None."""
    scored = [(predicted_ppl(c, theta), c.costs, c) for c in candidates]
    scored = [s for s in scored if math.isfinite(s[0]) and (broken_ppl is None or s[0] <= broken_ppl)]
    return min(scored, key=lambda s: (s[0], s[1]))[2] if scored else None
