"""Estimates per second of the (footprint, decode latency) pair, the way the search asks for it.

Every iteration is a different compression plan applied to the SmolLM2-135M base shape with the
same transforms, in the same order, that ``compress.plan.Plan.shape`` applies (depth drop, Wanda
structured / unstructured / N:M, embedding quantization, GPTQ format, EoRA/LoRA adapter), at a
context length drawn from the usual few. All (shape, context) pairs of a run are distinct by
value (checked), so the per-shape memo never answers; what is shared is per distinct layer
(a 4-bit g128 layer is the same layer in every plan that makes it) and per distinct
(layer, context) attention cost, as in a search.

  (a) build the shape from the base + estimate_fast      (a search trial through ModelShape)
  (b) estimate_fast alone on distinct pre-built shapes   (fresh shape objects every repeat)
  (c) make the plan's ShapeSpec + SpecEstimator          (a search trial through specs: no shape)
  (d) SpecEstimator alone on pre-built ShapeSpecs
  (e) with --plans: spec_from_plan(Plan) + SpecEstimator, a Plan object per plan (imports the
      compress stages, hence torch; no model is loaded)

Each is run ``--repeats`` times over ``--n`` plans (a fresh set of shape / spec objects each
time); the first repeat of a process also pays for computing each distinct layer's record once
and is shown separately ((c) starts from its own fresh base shape and platform object, so its
first pass is cold too); the median of the others is the rate. Also shown: the memoized rate
(same shape object and context again), and how many distinct records (c) keeps for the n plans.
(a) and (c) are checked to give the same numbers for every plan (outside the timing).

Run: python bench/hwmodel_speed.py [--n 20000] [--repeats 5] [--plans] [--cpu-time]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from slmsearch.hwmodel import ShapeSpec, SpecEstimator, TensorFormat, estimate_fast, load_platform
from slmsearch.hwmodel.shape import smollm2_135m

TARGET = 100_000
CONTEXTS = (256, 512, 1024, 2048, 4096)


def plans(n: int, seed: int = 0) -> list[tuple]:
    """n distinct plan specs: (drop, wanda, emb_bits, gptq, adapter_rank, context)."""
    rng = random.Random(seed)
    wandas: list[Any] = [None, ("2:4", None), ("4:8", None)]
    wandas += [("unstructured", d) for d in (0.3, 0.4, 0.5, 0.6, 0.7)]
    wandas += [("structured", ch, kv) for ch in (0, 128, 256, 384, 512, 768) for kv in (0, 1) if ch or kv]
    gptqs: list[Any] = [None] + [(b, g) for b in (2, 3, 4, 8) for g in (-1, 32, 64, 128)]
    out: dict[tuple, None] = {}
    while len(out) < n:
        gptq = rng.choice(gptqs)
        spec = (rng.randrange(0, 12), rng.choice(wandas), rng.choice((16, 8, 6, 4)), gptq,
                rng.choice((0, 0, 16, 32)) if gptq else 0, rng.choice(CONTEXTS))
        out[spec] = None
    return list(out)


def build(base: Any, spec: tuple) -> Any:
    """The transforms of Plan.shape, in its order (depth, wanda, embedding, gptq, eora)."""
    drop, wanda, emb, gptq, rank, _ = spec
    s = base
    if drop:
        s = s.drop_layers(range(drop))
    if wanda is not None:
        if wanda[0] == "structured":
            s = s.prune_structured(wanda[1], wanda[2])
        else:
            s = s.with_sparsity(wanda[0], wanda[1])
    if emb < 16:
        s = s.with_embedding_format(TensorFormat(weight_bits=emb, group_size=None, zero_bits=0))
    if gptq is not None:
        bits, group = gptq
        s = s.with_linear_format(TensorFormat(weight_bits=bits, group_size=None if group == -1 else group,
                                              scale_bits=16, zero_bits=bits, g_idx_bits=32))
    if rank:
        s = s.with_adapter(rank, 16)
    return s


def to_spec(spec: tuple) -> ShapeSpec:
    """The same plan as ``build`` makes, as a ShapeSpec (what SpecEstimator takes)."""
    drop, wanda, emb, gptq, rank, _ = spec
    prune = (0, 0)
    sparsity = None
    if wanda is not None:
        if wanda[0] == "structured":
            prune = (wanda[1], wanda[2])
        else:
            fmt, density = wanda
            sparsity = (fmt, 0.5 if density is None else float(density))  # N:M here: 2:4, 4:8
    linear = None
    if gptq is not None:
        bits, group = gptq
        linear = (bits, None if group == -1 else group, 16, bits, 32)
    return ShapeSpec(drop, (emb, None, 16, 0, 0) if emb < 16 else None, prune, sparsity, linear,
                     (rank, 16) if rank else None)


def to_plan(spec: tuple) -> Any:
    """A compress Plan close to ``spec`` (embedding 6-bit -> 4-bit: the stage takes 16/8/4)."""
    from slmsearch.compress.depth import DepthPrune
    from slmsearch.compress.embedding import EmbeddingQuant
    from slmsearch.compress.gptq import Eora, Gptq
    from slmsearch.compress.plan import Plan
    from slmsearch.compress.wanda import Wanda

    drop, wanda, emb, gptq, rank, _ = spec
    stages: list[Any] = [DepthPrune(drop=drop)] if drop else []
    if wanda is not None:
        if wanda[0] == "structured":
            stages.append(Wanda(pattern="structured", mlp_fraction=wanda[1] / 1536, kv_groups=wanda[2]))
        elif wanda[1] is None:
            stages.append(Wanda(pattern=wanda[0]))
        else:
            stages.append(Wanda(sparsity=round(1 - wanda[1], 6)))
    if emb < 16:
        stages.append(EmbeddingQuant(bits=min(emb, 8) if emb != 6 else 4))
    if gptq is not None:
        stages.append(Gptq(bits=gptq[0], group_size=gptq[1]))
        if rank:
            stages.append(Eora(rank=rank))
    return Plan(tuple(stages))


def run(n: int, repeats: int, seed: int = 0, with_plans: bool = False, cpu_time: bool = False) -> dict[str, Any]:
    clock = time.process_time if cpu_time else time.perf_counter
    p = load_platform("siracusa")
    base = smollm2_135m()
    specs = plans(n, seed)
    ctxs = [sp[-1] for sp in specs]
    distinct = {(build(base, sp), sp[-1]) for sp in specs}  # by value: ModelShape is a frozen dataclass
    assert len(distinct) == n, f"only {len(distinct)} of {n} (shape, context) pairs are distinct"

    def a_once() -> float:
        t = clock()
        for sp in specs:
            estimate_fast(build(base, sp), p, sp[-1])
        return n / (clock() - t)

    def b_once() -> float:
        shapes = [build(base, sp) for sp in specs]  # new objects: no per-shape memo
        t = clock()
        for s, c in zip(shapes, ctxs):
            estimate_fast(s, p, c)
        return n / (clock() - t)

    # (c): its own base shape and platform object, so that no layer record is shared with (a)
    base_c = smollm2_135m()
    est = SpecEstimator(base_c, load_platform("siracusa"))

    def c_once() -> float:
        t = clock()
        for sp in specs:
            est(to_spec(sp), sp[-1])
        return n / (clock() - t)

    def d_once() -> float:
        ss = [to_spec(sp) for sp in specs]  # new spec objects
        t = clock()
        for s, c in zip(ss, ctxs):
            est(s, c)
        return n / (clock() - t)

    res: dict[str, Any] = {"n": n, "repeats": repeats}
    res["c_first"] = c_once()  # cold: computes each distinct layer / (layer, context) / head record
    res["a_first"] = a_once()  # pays each distinct layer / (layer, context) record once
    res["a"] = [a_once() for _ in range(repeats)]
    res["b"] = [b_once() for _ in range(repeats)]
    res["c"] = [c_once() for _ in range(repeats)]
    res["d"] = [d_once() for _ in range(repeats)]
    res["records"] = (len(est._layers), len(est._heads), sum(len(x.lcs) for x in est._layers.values()))
    for sp in specs:  # same numbers, both ways (outside the timing)
        assert est(to_spec(sp), sp[-1]) == estimate_fast(build(base, sp), p, sp[-1]), sp
    shapes = [build(base, sp) for sp in specs]
    for s, c in zip(shapes, ctxs):
        estimate_fast(s, p, c)
    t = clock()
    for s, c in zip(shapes, ctxs):
        estimate_fast(s, p, c)
    res["memo"] = n / (clock() - t)
    if with_plans:
        from slmsearch.hwmodel import spec_from_plan

        plan_objs = [to_plan(sp) for sp in specs]
        for pl, c in zip(plan_objs, ctxs):
            assert est(spec_from_plan(pl, base_c), c) == estimate_fast(pl.shape(base), p, c)

        def e_once() -> float:
            t = clock()
            for pl, c in zip(plan_objs, ctxs):
                est(spec_from_plan(pl, base_c), c)
            return n / (clock() - t)

        res["e"] = [e_once() for _ in range(repeats)]
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="distinct plans (shape + context) per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--plans", action="store_true",
                    help="also time spec_from_plan on compress Plan objects (imports torch; no model)")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time with the process's own CPU time instead of the wall clock (a shared machine)")
    args = ap.parse_args(argv)
    res = run(args.n, args.repeats, args.seed, args.plans, args.cpu_time)
    print(f"{args.n:,} distinct plans on SmolLM2-135M (contexts {CONTEXTS}), siracusa, "
          f"median of {args.repeats} repeats, {'CPU time' if args.cpu_time else 'wall clock'}")
    rows = [("a", "(a) build shape + estimate_fast "), ("b", "(b) estimate_fast, pre-built    "),
            ("c", "(c) ShapeSpec + SpecEstimator   "), ("d", "(d) SpecEstimator, pre-built    "),
            ("e", "(e) spec_from_plan+SpecEstimator")]
    for key, label in rows:
        if key not in res:
            continue
        m = statistics.median(res[key])
        print(f"{label}: {m:>10,.0f} /s  = {m / TARGET:.2f} x {TARGET:,}/s"
              f"   (repeats: {', '.join(f'{x:,.0f}' for x in res[key])})")
    print("    first pass in a fresh process (computes each distinct layer record): "
          f"(a) {res['a_first']:,.0f} /s, (c) {res['c_first']:,.0f} /s")
    lay, heads, lcs = res["records"]
    print(f"    (c) keeps {lay:,} layer records, {heads} head records, {lcs:,} (layer, context) records "
          f"for {args.n:,} plans")
    print(f"    memoized (same shape object and context again): {res['memo']:,.0f} /s")
    return res


if __name__ == "__main__":
    main()
