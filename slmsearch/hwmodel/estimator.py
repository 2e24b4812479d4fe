"""``SpecEstimator(base, platform)(spec, context_len) -> (footprint_bytes, decode_s)`` for plan specs.

The same two numbers as ``estimate_fast(spec_shape(base, spec), platform, context_len)`` (and so as
``estimate``; tested), without building a shape per call. Built once per (base shape, platform):

* per distinct layer request ``spec[2:]`` (pruning, sparsity, linear format, adapter): the base's
  layers so transformed, as ``fast._shape_rec`` records them (weight-group bytes, cycles in each
  memory level), built once through ``spec_shape`` (``_Layers``); and per such layer x context:
  the activation peak, KV bytes per layer and attention cycles with the KV in L2 / off chip (``_lc``);
* per distinct embedding format ``spec[1]``: the head (``fast._head``: final norm, lm_head,
  embedding lookup) (``_Head``);
* per call, for a uniform base (one layer run, what every HF config gives) on a platform where no
  weight operator can use the NPU (16-bit activations): closed-form sums over the kept layers,
  the same arithmetic, in the same order, as ``estimate_fast``'s runs and ``_fill_cluster``.

Anything else (a non-uniform base, N-EUREKA-capable weights, no off-chip level, a bad argument)
goes through ``spec_shape`` + ``estimate_fast``, which also raises the usual errors.
"""

from __future__ import annotations

from slmsearch.hwmodel.fast import _head, _shape_rec, estimate_fast, platform_consts
from slmsearch.hwmodel.memory import NORM_BITS
from slmsearch.hwmodel.platform import Platform
from slmsearch.hwmodel.shape import ModelShape, TensorFormat
from slmsearch.hwmodel.spec import ShapeSpec, spec_shape

_MAX_RECS = 1 << 14  # distinct layer / embedding records kept
_MAX_CTX = 1 << 12  # contexts kept per distinct layer


class _Layers:
    """The base's layers as one spec's ``spec[2:]`` (pruning, sparsity, format, adapter) makes them."""

    __slots__ = ("fast", "n", "lrec", "lcs", "act0", "lbytes", "pair", "sa", "on2", "off2", "ga", "gm")

    def __init__(self, rec: tuple) -> None:
        runs = rec[5]
        # one run of equal layers, on a platform with an off-chip level, no weight op on the NPU
        self.fast = len(runs) == 1 and rec[0].off is not None and not runs[0][0].npu
        self.lcs: dict[int, tuple] = {}
        if not self.fast:
            return
        lrec, self.n = runs[0]
        self.lrec = lrec
        self.act0 = rec[3]  # max(hidden + vocab, the layer's context-free activation sets)
        ga, gm = lrec.attn, lrec.mlp
        self.ga, self.gm = ga, gm
        self.sa = ga.size
        self.pair = self.lbytes = ga.size + gm.size
        self.on2 = ga.on + gm.on
        self.off2 = ga.off + gm.off


class _Head:
    """Final norm, lm_head and embedding lookup in one embedding format (``spec[1]``)."""

    __slots__ = ("fast", "fixed", "groups", "bytes")

    def __init__(self, head: tuple) -> None:
        self.fixed, groups, self.bytes = head
        self.fast = not any(g.npu for g in groups)
        self.groups = tuple((g.size, g.on, g.off, g) for g in groups)


class SpecEstimator:
    """(footprint bytes, decode seconds per token) of plan specs on one base shape and platform."""

    def __init__(self, base: ModelShape, platform: Platform) -> None:
        self.base = base
        self.platform = platform
        self._layers: dict[tuple, _Layers] = {}
        self._heads: dict[tuple | None, _Head] = {}
        pf = self._pf = platform_consts(platform)
        self._h = base.hidden
        self._kvb = base.kv_cache_bits
        self._a = base.activation_bits
        self._freq = pf.freq
        self._l2 = pf.l2_usable
        self._wtotal = pf.weight_total

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_layers"], d["_heads"] = {}, {}  # records: rebuilt on demand in the receiving process
        return d

    def _layer_rec(self, spec: tuple) -> _Layers:
        shape = spec_shape(self.base, (0, None) + tuple(spec[2:]))
        lay = _Layers(_shape_rec(shape, self.platform))
        if len(self._layers) >= _MAX_RECS:
            self._layers.clear()
        self._layers[spec[2:]] = lay
        return lay

    def _head_rec(self, emb: tuple | None) -> _Head:
        shape = self.base if emb is None else self.base.with_embedding_format(TensorFormat(*emb))
        head = _Head(_head(shape, self.platform, self._pf))
        if len(self._heads) >= _MAX_RECS:
            self._heads.clear()
        self._heads[emb] = head
        return head

    def _lc(self, lay: _Layers, ctx: int) -> tuple:
        """Per (layer, context): activation bytes, L2 left after them, KV bytes and bits per layer,
        attention cycles with the KV in L2 / off chip, and the attention record for a split."""
        lrec = lay.lrec
        attended = ctx if ctx > 0 else 1
        best = lay.act0
        s = lrec.q + 2 * lrec.nh * attended
        if s > best:
            best = s
        act = -(-((self._h + best) * self._a) // 8)
        l2_free = self._l2 - act
        if l2_free < 0:
            l2_free = 0
        kvbits = lrec.kv * self._kvb * ctx
        c = lrec.context(attended, self._kvb)
        out = (act, l2_free, -(-kvbits // 8), kvbits, c.l2, c.off, c)
        if len(lay.lcs) >= _MAX_CTX:
            lay.lcs.clear()
        lay.lcs[ctx] = out
        return out

    def _general(self, spec: tuple, context_len: int) -> tuple[int, float]:
        return estimate_fast(spec_shape(self.base, spec), self.platform, context_len)

    def __call__(self, spec: ShapeSpec | tuple, context_len: int = 512) -> tuple[int, float]:
        """``estimate_fast(spec_shape(base, spec), platform, context_len)``."""
        lay = self._layers.get(spec[2:])
        if lay is None:
            lay = self._layer_rec(spec)
        head = self._heads.get(spec[1])
        if head is None:
            head = self._head_rec(spec[1])
        drop = spec[0]
        n = 0
        if lay.fast and head.fast:
            if type(drop) is int:
                if drop >= 0:
                    n = lay.n - drop
            else:
                n = lay.n - _n_dropped(drop, lay.n)
        if n <= 0 or type(context_len) is not int or context_len < 0:
            return self._general(spec, context_len)
        lc = lay.lcs.get(context_len)
        if lc is None:
            lc = self._lc(lay, context_len)
        act, l2_free, size, kvbits, c_l2, c_off, c = lc
        norms = (2 * n + 1) * self._h * NORM_BITS // 8
        footprint = norms + n * lay.lbytes + head.bytes + -(-(n * kvbits) // 8) + act
        # KV placement: L2 after the activations, the rest off chip (estimate_fast's run loop)
        cycles = head.fixed
        if size <= 0:
            cycles += n * c_l2
        else:
            j = l2_free // size
            if j >= n:
                cycles += n * c_l2
                l2_free -= n * size
            else:
                k = n
                if j:
                    cycles += j * c_l2
                    l2_free -= j * size
                    k -= j
                if l2_free > 0:
                    cycles += c.split_cycles((size - l2_free) / size)
                    l2_free = 0
                    k -= 1
                if k:
                    cycles += k * c_off
        # weights end to end from the norms on, on chip up to on_chip (fast._fill_cluster)
        on_chip = self._wtotal + l2_free
        pair = lay.pair
        total = 0.0
        d = on_chip - norms
        pos = norms + n * pair
        if d >= n * pair:
            total += n * lay.on2
        elif d <= 0:
            total += n * lay.off2
        else:
            i, r = divmod(d, pair)
            total += i * lay.on2 + (n - i - 1) * lay.off2
            sa = lay.sa
            ga, gm = lay.ga, lay.gm
            if r == 0:
                total += ga.off + gm.off
            elif r < sa:
                total += ga.fixed + ga.stream.at((sa - r) / sa) + gm.off
            elif r == sa:
                total += ga.on + gm.off
            else:
                total += ga.on + gm.fixed + gm.stream.at((pair - r) / gm.size)
        for size, on, off, g in head.groups:
            d = on_chip - pos
            pos += size
            if d >= size:
                total += on
            elif d <= 0:
                total += off
            else:
                total += g.fixed + g.stream.at((size - d) / size)
        cycles += total
        return footprint, cycles / self._freq


def _n_dropped(indices: tuple, n_layers: int) -> int:
    """How many distinct valid indices; n_layers (so the call takes the checked path) otherwise."""
    drop = set(indices)
    if drop and not (all(type(i) is int for i in drop) and min(drop) >= 0 and max(drop) < n_layers):
        return n_layers
    return len(drop)


__all__ = ["SpecEstimator"]
