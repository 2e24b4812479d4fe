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
   hypervolume to the evaluated points (the first, with nothing evaluated, is the largest predicted
   box; the second the best predicted model); one predicted broken (over the pruning limit) is never
   promoted. When no candidate is predicted to add anything, it returns None and the runner
   screens more. Two refinements measured on the replay grid (``bench/search_efficiency.py``,
   docs/benchmarks.md section 9): plans that differ only in the KV cache's width form a *family*
   whose measured residual replaces the fitted one (:func:`family_residuals`), and a candidate
   whose family is not measured yet is credited :data:`OPTIMISM` in the gain (optimism under
   uncertainty: its correction is borrowed from other plans).
3. **Where to screen next.** Half of each round's screens are proposed here rather than by the
   sampler: the unscreened one-step neighbours of the predicted front (:func:`predicted_front`,
   :func:`step_neighbours`), those of its best-predicted plan first. The sampler's proposals keep
   the search global; the neighbours fill in the front where the study is looking.

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
# Credit, in nats of predicted log perplexity, to a candidate whose family has no measurement when
# its hypervolume gain is computed: about half the spread of the residuals within one GPTQ width on
# the replay grid (0.15-0.25, bench/grid_levers.csv). 0.1-0.2 measured alike; 0 and 0.05 need one
# more evaluation to reach 95% (median over 5 seeds, docs/benchmarks.md section 10).
OPTIMISM = 0.1


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
    family: str = ""  # plans that differ only where the proxy is exact (the KV cache's width); "" = its own

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


def predicted_ppl(point: Point, theta: Mapping[str, float], measured: Mapping[str, float] | None = None) -> float:
    """The candidate's proxy perplexity corrected by its family's measured residual (``measured``,
    from :func:`family_residuals`) when a plan of its family was evaluated, else by ``theta``."""
    if measured and point.family and point.family in measured:
        return point.ppl * math.exp(measured[point.family])
    return point.ppl * math.exp(sum(theta.get(f, 0.0) * w for f, w in point.weighted()))


def family_residuals(evaluated: Sequence[Point]) -> dict[str, float]:
    """Mean residual ``log(ppl) - log(proxy_ppl)`` of each family with an evaluated, screened plan.
    The proxy rounds the KV cache as the full evaluation does, so plans that differ only in it
    share the residual of their weight stages (on the replay grid such siblings differ by 0.01-0.06,
    plans of one GPTQ width by up to 0.5)."""
    found: dict[str, list[float]] = {}
    for p in evaluated:
        if p.family and p.proxy_ppl and p.proxy_ppl > 0 and p.ppl > 0 and math.isfinite(p.ppl) and math.isfinite(p.proxy_ppl):
            found.setdefault(p.family, []).append(math.log(p.ppl) - math.log(p.proxy_ppl))
    return {k: sum(v) / len(v) for k, v in found.items()}


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
           broken_ppl: float | None = None, prune_ratio: float | None = None) -> Point | None:
    """The candidate whose predicted point adds the most hypervolume to the evaluated points (with
    :data:`OPTIMISM` for an unmeasured family), or None when none adds any. With nothing evaluated
    that is the largest predicted box (a knee of the predicted front); with one plan evaluated, the
    best predicted model comes first when it is predicted better than that one, so the first two
    trials give a user a balanced plan and the best model the budget is predicted to hold (on the
    replay grid the pair is ahead of random search and of the anchors at the first and second
    evaluation: docs/benchmarks.md section 9). Candidates predicted over ``broken_ppl`` are never
    chosen; with nothing evaluated, neither are those predicted over ``prune_ratio`` (the pruning
    rule's ``max_ppl_ratio``) x the best predicted one: once that one is evaluated, the study would
    prune them."""
    measured = family_residuals(evaluated)
    scored = [(c, predicted_ppl(c, theta, measured)) for c in candidates]
    scored = [(c, p) for c, p in scored if math.isfinite(p) and (broken_ppl is None or p <= broken_ppl)]
    if not scored:
        return None
    base = [_vector(e.ppl, e.costs) for e in evaluated if math.isfinite(e.ppl) and (broken_ppl is None or e.ppl <= broken_ppl)]
    if not base and prune_ratio is not None:
        limit = prune_ratio * min(p for _, p in scored)
        scored = [(c, p) for c, p in scored if p <= limit]
    if len(base) == 1:
        # The second promotion: the best predicted model (fallback's order), when it is predicted
        # better than the one evaluated (the first promotion, below, is the largest predicted box: a knee)
        top, ppl = min(scored, key=lambda cp: (cp[1], cp[0].costs))
        if ppl < math.exp(base[0][0]):
            return top
    vectors = [_vector(p, c.costs) for c, p in scored]
    lo, span = _bounds(base + vectors)

    def norm(v: Sequence[float]) -> tuple[float, ...]:
        return tuple((x - low) / s for x, low, s in zip(v, lo, span))

    ref = [1.1] * len(lo)
    base_n = [norm(v) for v in base]
    before = hypervolume(base_n, ref)
    best: tuple[float, Point] | None = None
    for (cand, _), v in zip(scored, vectors):
        credit = 0.0 if cand.family and cand.family in measured else OPTIMISM
        gain = hypervolume([*base_n, norm((v[0] - credit, *v[1:]))], ref) - before
        if gain > 1e-12 and (best is None or gain > best[0]):
            best = (gain, cand)
    return best[1] if best else None


def _bounds(vectors: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    dims = len(vectors[0])
    lo = [min(v[i] for v in vectors) for i in range(dims)]
    hi = [max(v[i] for v in vectors) for i in range(dims)]
    return lo, [(h - low) or 1.0 for low, h in zip(lo, hi)]


def predicted_front(candidates: Sequence[Point], evaluated: Sequence[Point], theta: Mapping[str, float]) -> list[Point]:
    """The non-dominated points among the evaluated (measured) and the candidates (predicted),
    best predicted quality first: where :func:`step_neighbours` looks for the next screens."""
    measured = family_residuals(evaluated)
    points = [(e, _vector(e.ppl, e.costs)) for e in evaluated if math.isfinite(e.ppl)]
    points += [(c, _vector(predicted_ppl(c, theta, measured), c.costs)) for c in candidates]
    points = [(p, v) for p, v in points if all(math.isfinite(x) for x in v)]

    def dominated(v: Sequence[float]) -> bool:
        return any(all(a <= b for a, b in zip(w, v)) and any(a < b for a, b in zip(w, v)) for _, w in points)

    return [p for p, v in sorted(points, key=lambda pv: pv[1]) if not dominated(v)]


def step_neighbours(params: Mapping[str, Any], choices: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """The plans one step from ``params``: each parameter with ordered ``choices`` moved to the
    value before or after its own (parameters without choices, or whose value is not among them,
    stay), in the order of ``params``."""
    out = []
    for name, value in params.items():
        values = list(choices.get(name, ()))
        if value not in values:
            continue
        i = values.index(value)
        for j in (i - 1, i + 1):
            if 0 <= j < len(values):
                out.append({**params, name: values[j]})
    return out


def fallback(candidates: Sequence[Point], theta: Mapping[str, float], *, broken_ppl: float | None = None,
             evaluated: Sequence[Point] = ()) -> Point | None:
    """When no candidate is predicted to improve the front: the one with the lowest predicted
    perplexity (then the lowest costs) that is not predicted broken, or None."""
    measured = family_residuals(evaluated)
    scored = [(predicted_ppl(c, theta, measured), c.costs, c) for c in candidates]
    scored = [s for s in scored if math.isfinite(s[0]) and (broken_ppl is None or s[0] <= broken_ppl)]
    return min(scored, key=lambda s: (s[0], s[1]))[2] if scored else None
