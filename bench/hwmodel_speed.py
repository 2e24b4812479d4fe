"""Estimates per second of the (footprint, decode latency) pair, the way the search asks for it.

Every iteration is a different compression plan applied to the SmolLM2-135M base shape with the
same transforms, in the same order, that ``compress.plan.Plan.shape`` applies (depth drop, Wanda
structured / unstructured / N:M, embedding quantization, GPTQ format, EoRA/LoRA adapter), at a
context length drawn from the usual few. All (shape, context) pairs of a run are distinct by
value (checked), so the per-shape memo never answers; what is shared is per distinct layer
(a 4-bit g128 layer is the same layer in every plan that makes it) and per distinct
(layer, context) attention cost, as in a search.

  (a) build the shape from the base + estimate_fast      (what one search trial pays)
  (b) estimate_fast alone on distinct pre-built shapes   (fresh shape objects every repeat)

Each is run ``--repeats`` times over ``--n`` plans (a fresh set of shape objects each time); the
first repeat of a process also pays for computing each distinct layer's record once and is shown
separately; the median of the others is the rate. Also shown: the memoized rate (same shape
object and context again).

Run: python bench/hwmodel_speed.py [--n 20000] [--repeats 5]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

from slmsearch.hwmodel import TensorFormat, estimate_fast, load_platform
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


def run(n: int, repeats: int, seed: int = 0) -> dict[str, Any]:
    p = load_platform("siracusa")
    base = smollm2_135m()
    specs = plans(n, seed)
    ctxs = [sp[-1] for sp in specs]
    distinct = {(build(base, sp), sp[-1]) for sp in specs}  # by value: ModelShape is a frozen dataclass
    assert len(distinct) == n, f"only {len(distinct)} of {n} (shape, context) pairs are distinct"

    def a_once() -> float:
        t = time.perf_counter()
        for sp in specs:
            estimate_fast(build(base, sp), p, sp[-1])
        return n / (time.perf_counter() - t)

    def b_once() -> float:
        shapes = [build(base, sp) for sp in specs]  # new objects: no per-shape memo
        t = time.perf_counter()
        for s, c in zip(shapes, ctxs):
            estimate_fast(s, p, c)
        return n / (time.perf_counter() - t)

    res: dict[str, Any] = {"n": n, "repeats": repeats}
    res["a_first"] = a_once()  # pays each distinct layer / (layer, context) record once
    res["a"] = [a_once() for _ in range(repeats)]
    res["b"] = [b_once() for _ in range(repeats)]
    shapes = [build(base, sp) for sp in specs]
    for s, c in zip(shapes, ctxs):
        estimate_fast(s, p, c)
    t = time.perf_counter()
    for s, c in zip(shapes, ctxs):
        estimate_fast(s, p, c)
    res["memo"] = n / (time.perf_counter() - t)
    return res


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=20_000, help="distinct plans (shape + context) per repeat")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    res = run(args.n, args.repeats, args.seed)
    a, b = statistics.median(res["a"]), statistics.median(res["b"])
    print(f"{args.n:,} distinct plans on SmolLM2-135M (contexts {CONTEXTS}), siracusa, "
          f"median of {args.repeats} repeats")
    print(f"(a) build shape + estimate_fast : {a:>10,.0f} /s  = {a / TARGET:.2f} x {TARGET:,}/s"
          f"   (repeats: {', '.join(f'{x:,.0f}' for x in res['a'])})")
    print(f"(b) estimate_fast, pre-built    : {b:>10,.0f} /s  = {b / TARGET:.2f} x {TARGET:,}/s"
          f"   (repeats: {', '.join(f'{x:,.0f}' for x in res['b'])})")
    print(f"    (a) first pass in a fresh process (computes each distinct layer record): "
          f"{res['a_first']:,.0f} /s")
    print(f"    memoized (same shape object and context again): {res['memo']:,.0f} /s")
    return res


if __name__ == "__main__":
    main()
