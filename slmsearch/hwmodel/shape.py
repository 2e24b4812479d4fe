"""What the hardware model needs to know about a (compressed) LLaMA-family model.

A ``ModelShape`` is pure data: dimensions per layer, the storage format of every weight tensor,
sparsity, unmerged adapters, KV-cache and activation precision. Compression plans turn one shape
into another with the pure ``with_*`` / ``drop_layers`` / ``prune_structured`` methods; a real
checkpoint is read back into a shape by ``ModelShape.from_checkpoint`` (see checkpoint_shape.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmsearch.errors import SlmsearchError

# Projections of one decoder layer: name -> (input features, output features) as functions
# of the layer's dimensions. Attention first, MLP second: the order is the execution order.
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
PROJS = ATTN_PROJS + MLP_PROJS

SPARSITY_FORMATS = ("dense", "unstructured", "2:4", "4:8")
_MEMO_MAX = 4096  # per layer object: derived layers and hardware-model records kept
_object_new = object.__new__
_object_setattr = object.__setattr__


def _positive_int(name: str, value: Any, *, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        rule = ">= 0" if allow_zero else "> 0"
        raise SlmsearchError(f"{name} must be an integer {rule}, but got {value!r}")


@dataclass(frozen=True)
class TensorFormat:
    """How one weight tensor is stored.

    weight_bits: bits per stored weight; 16 (fp16/bf16) or 32 (fp32) means not quantized.
    group_size: input features sharing one scale/zero; None = one group per output channel
        (only meaningful when quantized).
    scale_bits: bits per scale (GPTQ: fp16 -> 16).
    zero_bits: bits per zero point. None follows the GPTQ checkpoint convention: zero points are
        stored packed at the weight bit-width (``qzeros``), for symmetric quantization too.
        0 = no zero points stored.
    g_idx_bits: bits per input channel of a group-index table (GPTQ ``g_idx`` is int32 -> 32);
        0 when the tensor has none.
    """

    weight_bits: int = 16
    group_size: int | None = None
    scale_bits: int = 16
    zero_bits: int | None = None
    g_idx_bits: int = 0

    # Written out (dataclass keeps an explicit __init__): plans build a TensorFormat per trial.
    def __init__(self, weight_bits: int = 16, group_size: int | None = None, scale_bits: int = 16,
                 zero_bits: int | None = None, g_idx_bits: int = 0) -> None:
        d = self.__dict__
        d["weight_bits"] = weight_bits
        d["group_size"] = group_size
        d["scale_bits"] = scale_bits
        d["zero_bits"] = zero_bits
        d["g_idx_bits"] = g_idx_bits
        if (type(weight_bits) is int and 1 <= weight_bits <= 32
                and (group_size is None or (type(group_size) is int and group_size > 0))
                and type(scale_bits) is int and scale_bits >= 0
                and (zero_bits is None or (type(zero_bits) is int and zero_bits >= 0))
                and type(g_idx_bits) is int and g_idx_bits >= 0):
            return  # the common case, checked in one expression; __post_init__ explains otherwise
        self.__post_init__()

    def __post_init__(self) -> None:
        if not (isinstance(self.weight_bits, int) and 1 <= self.weight_bits <= 32):
            raise SlmsearchError(f"weight_bits must be an integer in 1..32, but got {self.weight_bits!r}")
        if self.group_size is not None:
            _positive_int("group_size", self.group_size)
        _positive_int("scale_bits", self.scale_bits, allow_zero=True)
        if self.zero_bits is not None:
            _positive_int("zero_bits", self.zero_bits, allow_zero=True)
        _positive_int("g_idx_bits", self.g_idx_bits, allow_zero=True)

    @property
    def quantized(self) -> bool:
        return self.weight_bits < 16

    @property
    def zero_point_bits(self) -> int:
        return self.weight_bits if self.zero_bits is None else self.zero_bits

    def n_groups(self, in_features: int, out_features: int) -> int:
        """Scale/zero groups of a [out_features, in_features] weight (0 when not quantized)."""
        if not self.quantized:
            return 0
        if self.group_size is None:
            return out_features
        return out_features * -(-in_features // self.group_size)

    def scale_zero_bytes(self, in_features: int, out_features: int) -> int:
        """Bytes of scales + zero points + group index of one tensor (0 when not quantized)."""
        if not self.quantized:
            return 0
        bits = self.n_groups(in_features, out_features) * (self.scale_bits + self.zero_point_bits)
        bits += in_features * self.g_idx_bits
        return -(-bits // 8)


FP16 = TensorFormat()


@dataclass(frozen=True)
class Sparsity:
    """Weight sparsity of the attention + MLP projections.

    dense: every weight stored. unstructured: kept weights stored densely packed + a 1-bit-per-
    weight bitmask. N:M: N of every M consecutive input weights kept, each kept weight carries a
    ceil(log2(M))-bit position index (2:4 -> 2 bits, 4:8 -> 3 bits).
    """

    format: str = "dense"
    density: float = 1.0

    def __post_init__(self) -> None:
        if self.format not in SPARSITY_FORMATS:
            raise SlmsearchError(f"sparsity format must be one of {SPARSITY_FORMATS}, but got {self.format!r}")
        if not (isinstance(self.density, (int, float)) and 0.0 < self.density <= 1.0):
            raise SlmsearchError(f"sparsity density must be in (0, 1], but got {self.density!r}")
        nm = self.n_m
        if nm is not None and abs(self.density - nm[0] / nm[1]) > 1e-9:
            raise SlmsearchError(
                f"sparsity {self.format} keeps {nm[0]}/{nm[1]} of the weights, so density must be "
                f"{nm[0] / nm[1]}, but got {self.density}"
            )
        if self.format == "dense" and self.density != 1.0:
            raise SlmsearchError(f"dense sparsity needs density 1.0, but got {self.density}; use 'unstructured'")

    @property
    def n_m(self) -> tuple[int, int] | None:
        if ":" not in self.format:
            return None
        n, m = self.format.split(":")
        return int(n), int(m)

    def stored_values(self, n_weights: int) -> int:
        """How many weight values are stored."""
        if self.format == "dense":
            return n_weights
        return round(n_weights * self.density)

    def metadata_bits(self, n_weights: int) -> int:
        """Bits of sparsity metadata (bitmask or N:M indices) for a tensor of n_weights."""
        if self.format == "dense":
            return 0
        if self.format == "unstructured":
            return n_weights
        _, m = self.n_m  # type: ignore[misc]
        return self.stored_values(n_weights) * (m - 1).bit_length()


DENSE = Sparsity()


@dataclass(frozen=True)
class Adapter:
    """Unmerged low-rank adapter (LoRA/EoRA) on every projection: A [rank, in] and B [out, rank]."""

    rank: int
    bits: int = 16

    def __post_init__(self) -> None:
        _positive_int("adapter rank", self.rank)
        if not (isinstance(self.bits, int) and 1 <= self.bits <= 32):
            raise SlmsearchError(f"adapter bits must be an integer in 1..32, but got {self.bits!r}")


@dataclass(frozen=True)
class LayerShape:
    """One decoder layer. The model's hidden size lives on ModelShape (the residual stream)."""

    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    linear_format: TensorFormat = FP16
    # per-projection exceptions to linear_format, e.g. (("down_proj", TensorFormat(8)),)
    proj_formats: tuple[tuple[str, TensorFormat], ...] = ()
    sparsity: Sparsity = DENSE
    adapter: Adapter | None = None

    def __post_init__(self) -> None:
        nh, nkv, hd, inter = self.n_heads, self.n_kv_heads, self.head_dim, self.intermediate
        if (type(nh) is int and type(nkv) is int and type(hd) is int and type(inter) is int
                and nh > 0 and nkv > 0 and hd > 0 and inter > 0 and not nh % nkv and not self.proj_formats):
            return  # the common case; the messages below otherwise
        for name in ("n_heads", "n_kv_heads", "head_dim", "intermediate"):
            _positive_int(name, getattr(self, name))
        if self.n_heads % self.n_kv_heads:
            raise SlmsearchError(
                f"n_heads must be a multiple of n_kv_heads, but got n_heads={self.n_heads}, "
                f"n_kv_heads={self.n_kv_heads}"
            )
        for proj, _ in self.proj_formats:
            if proj not in PROJS:
                raise SlmsearchError(f"unknown projection {proj!r} in proj_formats; use one of {PROJS}")

    # Per-object memo (not a field: not compared, hashed, printed or pickled): the layers that
    # transforms derive from this one, and the hardware model's per-(platform, ...) records.
    # Shapes share layer objects, so a 30-layer uniform model pays for one layer.
    def _memo(self) -> dict:
        m = self.__dict__.get("_m")
        if m is None:
            m = self.__dict__["_m"] = {}
        return m

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_m"}

    def fmt(self, proj: str) -> TensorFormat:
        for name, f in self.proj_formats:
            if name == proj:
                return f
        return self.linear_format

    def proj_dims(self, hidden: int) -> tuple[tuple[str, int, int], ...]:
        """(name, in_features, out_features) of the seven projections, in execution order."""
        q, kv, inter = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim, self.intermediate
        return (
            ("q_proj", hidden, q),
            ("k_proj", hidden, kv),
            ("v_proj", hidden, kv),
            ("o_proj", q, hidden),
            ("gate_proj", hidden, inter),
            ("up_proj", hidden, inter),
            ("down_proj", inter, hidden),
        )


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA-family decoder: embedding, layers, final norm, lm_head (tied or not).

    vocab_size 0 means the graph has no embedding/lm_head (e.g. Deeploy's microLlama test
    networks, which take embeddings as input). kv_cache_bits / activation_bits are the deployed
    precisions of the KV cache and of activations (N-EUREKA only accepts 8-bit activations).
    Norm weights are counted as fp16.
    """

    hidden: int
    layers: tuple[LayerShape, ...]
    vocab_size: int
    tie_word_embeddings: bool = True
    embedding_format: TensorFormat = FP16
    lm_head_format: TensorFormat | None = None  # untied only; None = same as embedding_format
    kv_cache_bits: int = 16
    activation_bits: int = 16
    name: str = ""
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False, hash=False)

    def __post_init__(self) -> None:
        _positive_int("hidden", self.hidden)
        _positive_int("vocab_size", self.vocab_size, allow_zero=True)
        if not isinstance(self.layers, tuple) or not all(isinstance(x, LayerShape) for x in self.layers):
            raise SlmsearchError("layers must be a tuple of LayerShape")
        for name in ("kv_cache_bits", "activation_bits"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 1 <= v <= 32):
                raise SlmsearchError(f"{name} must be an integer in 1..32, but got {v!r}")

    # ---- derived -------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def head_format(self) -> TensorFormat:
        """Format of the lm_head matrix (the embedding itself when tied)."""
        if self.tie_word_embeddings or self.lm_head_format is None:
            return self.embedding_format
        return self.lm_head_format

    def n_params(self) -> int:
        """Parameters as stored densely (sparsity and adapters not counted), norms included."""
        emb = self.vocab_size * self.hidden * (1 if self.tie_word_embeddings else 2)
        per_layer = sum(
            i * o for layer in self.layers for _, i, o in layer.proj_dims(self.hidden)
        )
        norms = (2 * self.n_layers + 1) * self.hidden
        return emb + per_layer + norms

    # ---- constructors ----------------------------------------------------------------------
    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelShape:
        """Shape of a LLaMA ``config.json`` dict; every weight fp16, dense, no adapter."""
        try:
            hidden = int(cfg["hidden_size"])
            n_layers = int(cfg["num_hidden_layers"])
            n_heads = int(cfg["num_attention_heads"])
            inter = int(cfg["intermediate_size"])
            vocab = int(cfg["vocab_size"])
        except KeyError as e:
            raise SlmsearchError(f"config is missing {e.args[0]!r}; a LLaMA config.json needs it") from None
        n_kv = int(cfg.get("num_key_value_heads") or n_heads)
        head_dim = int(cfg.get("head_dim") or hidden // n_heads)
        layer = LayerShape(n_heads=n_heads, n_kv_heads=n_kv, head_dim=head_dim, intermediate=inter)
        return cls(
            hidden=hidden,
            layers=(layer,) * n_layers,
            vocab_size=vocab,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            name=str(cfg.get("_name_or_path", "")),
        )

    @classmethod
    def from_checkpoint(cls, path: str | Path) -> ModelShape:
        """Shape measured from a checkpoint folder (see checkpoint_shape.shape_from_checkpoint)."""
        from slmsearch.hwmodel.checkpoint_shape import shape_from_checkpoint

        return shape_from_checkpoint(path)

    # ---- layer runs ------------------------------------------------------------------------
    def runs(self) -> tuple[tuple[LayerShape, int], ...]:
        """The layers as (layer, count) runs of consecutive equal layers, in order. Transforms
        hand the runs to the shape they build, so a uniform 30-layer model is one run, and each
        transform maps one layer object per run (and reuses the result for an equal request)."""
        r = self._cache.get("runs")
        if r is None:
            out: list[list[Any]] = []
            for layer in self.layers:
                if out and (out[-1][0] is layer or out[-1][0] == layer):
                    out[-1][1] += 1
                else:
                    out.append([layer, 1])
            r = self._cache["runs"] = tuple((lay, n) for lay, n in out)
        return r

    def __getstate__(self) -> dict:
        d = dict(self.__dict__)
        d["_cache"] = {}  # memos are keyed by per-process platform ids
        return d

    # ---- transformations (pure) ------------------------------------------------------------
    def _replace(self, **kw: Any) -> ModelShape:
        return dataclasses.replace(self, **kw)

    def _derive(self, runs: tuple[tuple[LayerShape, int], ...] | None, kw: dict[str, Any] | None = None
                ) -> ModelShape:
        """A copy with the fields in ``kw`` replaced and, when ``runs`` is given, layers rebuilt
        from them. Inputs are already validated (fields of a valid shape, validated layers and
        formats), so __init__/__post_init__ are skipped: transforms run once per search trial."""
        d = self.__dict__.copy()
        if kw is not None:
            d.update(kw)
        if runs is None:
            runs = self._cache.get("runs") or self.runs()
        elif len(runs) == 1:
            d["layers"] = (runs[0][0],) * runs[0][1]
        else:
            layers: tuple[LayerShape, ...] = ()
            for layer, n in runs:
                layers += (layer,) * n
            d["layers"] = layers
        d["_cache"] = {"runs": runs}
        new = _object_new(type(self))
        _object_setattr(new, "__dict__", d)
        return new

    def _map_runs(self, key: tuple, make: Any) -> ModelShape:
        """Every layer -> make(layer), computed once per distinct (layer object, key)."""
        runs = self._cache.get("runs") or self.runs()
        out: list[tuple[LayerShape, int]] = []
        for layer, n in runs:
            m = layer.__dict__.get("_m")
            if m is None:
                m = layer._memo()
            new = m.get(key)
            if new is None:
                if len(m) >= _MEMO_MAX:
                    m.clear()
                new = m[key] = make(layer)
            if len(runs) == 1:
                return self._derive(((new, n),))
            if out and out[-1][0] is new:
                out[-1] = (new, out[-1][1] + n)
            else:
                out.append((new, n))
        return self._derive(tuple(out))

    def _map_layers(self, **kw: Any) -> ModelShape:
        return self._map_runs(("replace", tuple(sorted(kw.items()))), lambda layer: dataclasses.replace(layer, **kw))

    def drop_layers(self, indices: Iterable[int]) -> ModelShape:
        n_layers = len(self.layers)
        runs = self._cache.get("runs") or self.runs()
        if type(indices) is range and len(runs) == 1 and len(indices) and indices.step > 0:
            # the usual plan: drop range(n) of a uniform model
            if indices[0] >= 0 and indices[-1] < n_layers:
                kept = runs[0][1] - len(indices)
                return self._derive(((runs[0][0], kept),) if kept else ())
        drop = set(indices)
        if drop and not (all(type(i) is int for i in drop) and min(drop) >= 0 and max(drop) < n_layers):
            bad = sorted(i for i in drop if not (isinstance(i, int) and 0 <= i < n_layers))
            if bad:
                raise SlmsearchError(f"layer indices to drop must be in 0..{n_layers - 1}, but got {bad}")
        if not drop:
            return self._derive(None)
        if len(runs) == 1:
            kept = runs[0][1] - len(drop)
            return self._derive(((runs[0][0], kept),) if kept else ())
        out: list[tuple[LayerShape, int]] = []
        start = 0
        for layer, n in runs:
            kept = n - sum(1 for i in drop if start <= i < start + n)
            start += n
            if not kept:
                continue
            if out and out[-1][0] is layer:
                out[-1] = (layer, out[-1][1] + kept)
            else:
                out.append((layer, kept))
        return self._derive(tuple(out))

    def prune_structured(self, mlp_channels_removed: int, kv_groups_removed: int) -> ModelShape:
        """Remove the same MLP channels and KV groups (with their query heads) in every layer."""
        _positive_int("mlp_channels_removed", mlp_channels_removed, allow_zero=True)
        _positive_int("kv_groups_removed", kv_groups_removed, allow_zero=True)
        start = 0
        for layer, n in self.runs():
            if mlp_channels_removed >= layer.intermediate or kv_groups_removed >= layer.n_kv_heads:
                raise SlmsearchError(
                    f"layer {start} has intermediate={layer.intermediate}, n_kv_heads={layer.n_kv_heads}: "
                    f"cannot remove {mlp_channels_removed} MLP channels and {kv_groups_removed} KV groups "
                    f"(at least one of each must remain)"
                )
            start += n

        def make(layer: LayerShape) -> LayerShape:
            q_per_kv = layer.n_heads // layer.n_kv_heads
            return dataclasses.replace(
                layer,
                intermediate=layer.intermediate - mlp_channels_removed,
                n_kv_heads=layer.n_kv_heads - kv_groups_removed,
                n_heads=layer.n_heads - kv_groups_removed * q_per_kv,
            )

        return self._map_runs(("prune", mlp_channels_removed, kv_groups_removed), make)

    def with_linear_format(self, fmt: TensorFormat) -> ModelShape:
        key = (("linear_format", fmt.weight_bits, fmt.group_size, fmt.scale_bits, fmt.zero_bits, fmt.g_idx_bits)
               if type(fmt) is TensorFormat else ("linear_format", fmt))  # ints hash in C
        return self._map_runs(key, lambda layer: dataclasses.replace(layer, linear_format=fmt, proj_formats=()))

    def with_embedding_format(self, fmt: TensorFormat) -> ModelShape:
        return self._derive(None, {"embedding_format": fmt, "lm_head_format": None})

    def with_sparsity(self, format: str, density: float | None = None) -> ModelShape:  # noqa: A002
        if density is None:
            if ":" in format and format in SPARSITY_FORMATS:
                n, m = (int(x) for x in format.split(":"))
                density = n / m
            else:
                density = 1.0
        density = float(density)
        return self._map_runs(
            ("sparsity", format, density), lambda layer: dataclasses.replace(layer, sparsity=Sparsity(format, density))
        )

    def with_adapter(self, rank: int, bits: int = 16) -> ModelShape:
        return self._map_runs(
            ("adapter", rank, bits),
            lambda layer: dataclasses.replace(layer, adapter=Adapter(rank, bits) if rank else None),
        )

    def with_kv_cache_bits(self, bits: int) -> ModelShape:
        return self._replace(kv_cache_bits=bits)

    def with_activation_bits(self, bits: int) -> ModelShape:
        return self._replace(activation_bits=bits)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("_cache", None)
        return d


# Reference shapes (docs, tests, validation). Dimensions from the models' config.json files and,
# for microLlama, from anchors.md section 2 (Deeploy's test ONNX: 8 layers, d_model 64,
# 16 heads x head_dim 4, gated FFN 256, ~526k INT8 weights, embeddings are a graph input).
def smollm2_135m() -> ModelShape:
    return ModelShape.from_hf_config(
        dict(num_hidden_layers=30, hidden_size=576, num_attention_heads=9, num_key_value_heads=3,
             head_dim=64, intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True,
             _name_or_path="SmolLM2-135M")
    )


def llama32_1b() -> ModelShape:
    return ModelShape.from_hf_config(
        dict(num_hidden_layers=16, hidden_size=2048, num_attention_heads=32, num_key_value_heads=8,
             head_dim=64, intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True,
             _name_or_path="Llama-3.2-1B")
    )


def microllama() -> ModelShape:
    int8 = TensorFormat(weight_bits=8, group_size=None, scale_bits=0, zero_bits=0)
    layer = LayerShape(n_heads=16, n_kv_heads=16, head_dim=4, intermediate=256, linear_format=int8)
    return ModelShape(hidden=64, layers=(layer,) * 8, vocab_size=0, kv_cache_bits=8,
                      activation_bits=8, name="microLlama (Deeploy test)")
