"""Estimates per second of the (footprint, decode latency) pair used by the search.

Three regimes, all printed:
  warm      : a pool of shapes x contexts already estimated once (the memo answers)
  new ctx   : shapes seen before, a context length never seen for them (placement + op sums)
  cold      : a brand-new ModelShape object every call (plans the search has never seen;
              per-layer costs are still shared through the layer-level caches)
Run: python bench/hwmodel_speed.py
"""

from __future__ import annotations

import itertools
import time

from slmsearch.hwmodel import TensorFormat, estimate_fast, load_platform
from slmsearch.hwmodel.shape import smollm2_135m


def _shapes() -> list:
    base = smollm2_135m()
    out = []
    for bits, drop, emb in itertools.product((16, 8, 4, 3, 2), range(0, 8), (16, 8, 4)):
        s = base.with_linear_format(TensorFormat(bits, 128)) if bits < 16 else base
        s = s.drop_layers(range(drop))
        out.append(s.with_embedding_format(TensorFormat(emb, None)) if emb < 16 else s)
    return out


def _rate(fn, n: int) -> float:
    t = time.perf_counter()
    fn(n)
    return n / (time.perf_counter() - t)


def main() -> None:
    p = load_platform("siracusa")
    shapes = _shapes()
    contexts = (256, 512, 1024, 2048)
    for s in shapes:
        for c in contexts:
            estimate_fast(s, p, c)
    pairs = [(s, c) for s in shapes for c in contexts]

    def warm(n: int) -> None:
        for i in range(n):
            s, c = pairs[i % len(pairs)]
            estimate_fast(s, p, c)

    ctr = itertools.count(3000)

    def new_ctx(n: int) -> None:
        for i in range(n):
            estimate_fast(shapes[i % len(shapes)], p, next(ctr))

    def cold(n: int) -> None:
        base = smollm2_135m()
        for i in range(n):
            s = base.with_linear_format(TensorFormat(4, 128)).drop_layers([i % 30])
            estimate_fast(s, p, 512)

    print(f"shapes in pool: {len(shapes)}, contexts: {contexts}")
    print(f"warm    : {_rate(warm, 300_000):>12,.0f} estimates/s")
    print(f"new ctx : {_rate(new_ctx, 3_000):>12,.0f} estimates/s")
    print(f"cold    : {_rate(cold, 3_000):>12,.0f} estimates/s")


if __name__ == "__main__":
    main()
