"""What the hardware model needs to know about a (compressed) LLaMA-family model.

A ``ModelShape`` is pure data: dimensions per layer, the storage format of every weight tensor,
sparsity, unmerged adapters, KV-cache and activation precision. Compression plans turn one shape
into another with the pure ``with_*`` / ``drop_layers`` / ``prune_structured`` methods; a real
checkpoint is read back into a shape by ``ModelShape.from_checkpoint`` (see checkpoint_shape.py).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmsearch.errors import SlmsearchError

# Projections of one decoder layer: name -> (input features, output features) as functions
# of the layer's dimensions. Attention first, MLP second: the order is the execution order.
ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
PROJS = ATTN_PROJS + MLP_PROJS

SPARSITY_FORMATS = ("dense", "unstructured", "2:4", "4:8")
KV_PARAM_BITS = 32  # one fp16 scale + one fp16 zero point per group of a quantized KV-cache row


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
    wide_rows: the first rows stored at ``wide_bits`` instead of ``weight_bits`` (same groups,
        scales and zero points): the embedding's lowest token ids, which a BPE vocabulary orders
        by merge rank, most frequent first (compress/embedding.py).
    """

    weight_bits: int = 16
    group_size: int | None = None
    scale_bits: int = 16
    zero_bits: int | None = None
    g_idx_bits: int = 0
    wide_rows: int = 0
    wide_bits: int = 8

    def __post_init__(self) -> None:
        if not (isinstance(self.weight_bits, int) and 1 <= self.weight_bits <= 32):
            raise SlmsearchError(f"weight_bits must be an integer in 1..32, but got {self.weight_bits!r}")
        if self.group_size is not None:
            _positive_int("group_size", self.group_size)
        _positive_int("scale_bits", self.scale_bits, allow_zero=True)
        if self.zero_bits is not None:
            _positive_int("zero_bits", self.zero_bits, allow_zero=True)
        _positive_int("g_idx_bits", self.g_idx_bits, allow_zero=True)
        _positive_int("wide_rows", self.wide_rows, allow_zero=True)
        if self.wide_rows and not self.weight_bits < self.wide_bits <= 16:
            raise SlmsearchError(f"wide_bits must be above weight_bits ({self.weight_bits}) and at most 16, "
                                 f"but got {self.wide_bits!r}")

    def value_bits(self, rows: int, cols: int) -> int:
        """Bits of the stored values of a [rows, cols] matrix (the first ``wide_rows`` rows wider)."""
        wide = min(self.wide_rows, rows)
        return (rows - wide) * cols * self.weight_bits + wide * cols * self.wide_bits

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
    # channels of one cached key (value) row sharing a 16-bit scale and a 16-bit zero point; None =
    # no scales (a 16-bit float cache). compress/kvcache.py quantizes per token and head this way.
    kv_cache_group: int | None = None
    kv_cache_key_group: int | None = None  # the keys' group when it differs (None: kv_cache_group)
    # each head's query and key rows Hadamard-rotated online before the cache (compress/kvcache.py)
    kv_cache_rotate: bool = False

    def __post_init__(self) -> None:
        _positive_int("hidden", self.hidden)
        _positive_int("vocab_size", self.vocab_size, allow_zero=True)
        if not isinstance(self.layers, tuple) or not all(isinstance(x, LayerShape) for x in self.layers):
            raise SlmsearchError("layers must be a tuple of LayerShape")
        for name in ("kv_cache_bits", "activation_bits"):
            v = getattr(self, name)
            if not (isinstance(v, int) and 1 <= v <= 32):
                raise SlmsearchError(f"{name} must be an integer in 1..32, but got {v!r}")
        if self.kv_cache_group is not None:
            _positive_int("kv_cache_group", self.kv_cache_group)
        if self.kv_cache_key_group is not None:
            _positive_int("kv_cache_key_group", self.kv_cache_key_group)

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

    # ---- transformations (pure) ------------------------------------------------------------
    def _with_each_layer(self, make: Callable[[LayerShape], LayerShape]) -> ModelShape:
        return dataclasses.replace(self, layers=tuple(make(layer) for layer in self.layers))

    def drop_layers(self, indices: Iterable[int]) -> ModelShape:
        drop = set(indices)
        bad = sorted(i for i in drop if not (isinstance(i, int) and 0 <= i < self.n_layers))
        if bad:
            raise SlmsearchError(f"layer indices to drop must be in 0..{self.n_layers - 1}, but got {bad}")
        return dataclasses.replace(self, layers=tuple(x for i, x in enumerate(self.layers) if i not in drop))

    def prune_structured(self, mlp_channels_removed: int, kv_groups_removed: int) -> ModelShape:
        """Remove the same MLP channels and KV groups (with their query heads) in every layer."""
        _positive_int("mlp_channels_removed", mlp_channels_removed, allow_zero=True)
        _positive_int("kv_groups_removed", kv_groups_removed, allow_zero=True)
        for idx, layer in enumerate(self.layers):
            if mlp_channels_removed >= layer.intermediate or kv_groups_removed >= layer.n_kv_heads:
                raise SlmsearchError(
                    f"layer {idx} has intermediate={layer.intermediate}, n_kv_heads={layer.n_kv_heads}: "
                    f"cannot remove {mlp_channels_removed} MLP channels and {kv_groups_removed} KV groups "
                    f"(at least one of each must remain)"
                )

        def pruned(layer: LayerShape) -> LayerShape:
            q_per_kv = layer.n_heads // layer.n_kv_heads
            return dataclasses.replace(
                layer,
                intermediate=layer.intermediate - mlp_channels_removed,
                n_kv_heads=layer.n_kv_heads - kv_groups_removed,
                n_heads=layer.n_heads - kv_groups_removed * q_per_kv,
            )

        return self._with_each_layer(pruned)

    def with_linear_format(self, fmt: TensorFormat) -> ModelShape:
        return self.with_linear_formats((fmt,) * self.n_layers)

    def with_linear_formats(self, fmts: Iterable[TensorFormat]) -> ModelShape:
        """Layer ``i``'s projections all stored as ``fmts[i]`` (mixed precision across layers)."""
        fmts = tuple(fmts)
        if len(fmts) != self.n_layers:
            raise SlmsearchError(f"{len(fmts)} layer formats given for {self.n_layers} layers")
        layers = tuple(dataclasses.replace(layer, linear_format=f, proj_formats=()) for layer, f in zip(self.layers, fmts))
        return dataclasses.replace(self, layers=layers)

    def with_embedding_format(self, fmt: TensorFormat) -> ModelShape:
        return dataclasses.replace(self, embedding_format=fmt, lm_head_format=None)

    def with_sparsity(self, format: str, density: float | None = None) -> ModelShape:  # noqa: A002
        """Every layer's sparsity; ``density`` defaults to N/M for an N:M format, else 1.0."""
        if density is None:
            if ":" in format and format in SPARSITY_FORMATS:
                n, m = (int(x) for x in format.split(":"))
                density = n / m
            else:
                density = 1.0
        sparsity = Sparsity(format, float(density))
        return self._with_each_layer(lambda layer: dataclasses.replace(layer, sparsity=sparsity))

    def with_adapter(self, rank: int, bits: int = 16) -> ModelShape:
        """An unmerged adapter of ``rank`` on every layer (rank 0 removes it)."""
        adapter = Adapter(rank, bits) if rank else None
        return self._with_each_layer(lambda layer: dataclasses.replace(layer, adapter=adapter))

    def with_kv_cache_bits(self, bits: int, group: int | None = None, *, key_group: int | None = None,
                           rotate: bool = False) -> ModelShape:
        """A KV cache of ``bits``-bit values, with a 16-bit scale and zero per ``group`` channels
        (None: no scales, for a float cache), keys per ``key_group`` (None: ``group``), rotated
        online when ``rotate``."""
        return dataclasses.replace(self, kv_cache_bits=bits, kv_cache_group=group,
                                   kv_cache_key_group=None if key_group == group else key_group,
                                   kv_cache_rotate=rotate)

    @property
    def kv_key_group(self) -> int | None:
        return self.kv_cache_group if self.kv_cache_key_group is None else self.kv_cache_key_group

    @property
    def kv_bits_per_value(self) -> float:
        """Stored bits per cached key or value element (the mean of the two), its share of the
        scales and zeros included."""
        if self.kv_cache_group is None:
            return float(self.kv_cache_bits)
        key_group = self.kv_key_group or self.kv_cache_group
        return self.kv_cache_bits + KV_PARAM_BITS * (1 / key_group + 1 / self.kv_cache_group) / 2

    def with_activation_bits(self, bits: int) -> ModelShape:
        return dataclasses.replace(self, activation_bits=bits)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
