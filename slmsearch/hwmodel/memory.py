"""Bytes of a deployed model, by kind.

Deployed footprint (``MemoryReport.total_bytes``, what ``--budget-mb`` compares against) =
  weights (embedding, lm_head when untied, attention, MLP, norms)
  + quantization metadata (scales, zero points, group indices)
  + sparsity metadata (bitmasks / N:M indices)
  + unmerged adapters
  + KV cache for ``context_len`` positions
  + peak live activations (the largest operator's inputs + outputs, plus the residual stream)
    over one decode step at ``context_len`` and, when ``prefill_len`` > 0, a prefill of that many.
Code and runtime buffers are not counted (platform levels reserve space for them instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from slmsearch.hwmodel.shape import ATTN_PROJS, KV_PARAM_BITS, LayerShape, ModelShape, TensorFormat

KINDS = (
    "embedding", "lm_head", "attention", "mlp", "norms", "scales_zeros",
    "sparsity_metadata", "adapters", "kv_cache", "activations_peak",
)
NORM_BITS = 16  # RMSNorm weights are kept in fp16


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class ProjBytes:
    """Bytes of one projection: quantized values, their scales/zeros, sparsity metadata, adapter."""

    name: str
    in_features: int
    out_features: int
    weights: int
    scales_zeros: int
    sparsity_metadata: int
    adapter: int

    @property
    def total(self) -> int:
        return self.weights + self.scales_zeros + self.sparsity_metadata + self.adapter


def layer_proj_bytes(layer: LayerShape, hidden: int) -> tuple[ProjBytes, ...]:
    """Bytes of the seven projections of ``layer``, in execution order."""
    out = []
    for name, i, o in layer.proj_dims(hidden):
        fmt = layer.fmt(name)
        n = i * o
        stored = layer.sparsity.stored_values(n)
        adapter = 0
        if layer.adapter is not None:
            adapter = _ceil_div(layer.adapter.rank * (i + o) * layer.adapter.bits, 8)
        out.append(
            ProjBytes(
                name=name, in_features=i, out_features=o,
                weights=_ceil_div(stored * fmt.weight_bits, 8),
                scales_zeros=fmt.scale_zero_bytes(i, o),
                sparsity_metadata=_ceil_div(layer.sparsity.metadata_bits(n), 8),
                adapter=adapter,
            )
        )
    return tuple(out)


def matrix_bytes(rows: int, cols: int, fmt: TensorFormat) -> tuple[int, int]:
    """(values, scales_zeros) bytes of a dense [rows, cols] matrix grouped along cols."""
    return _ceil_div(fmt.value_bits(rows, cols), 8), fmt.scale_zero_bytes(cols, rows)


def peak_activation_bytes(shape: ModelShape, tokens: int, attended: int) -> int:
    """Largest live activation set of one forward pass over ``tokens`` new tokens that attend to
    ``attended`` positions: residual stream + max over operators of (inputs + outputs)."""
    if tokens <= 0:
        return 0
    a = shape.activation_bits
    h = shape.hidden
    best = 0
    for layer in shape.layers:
        q = layer.n_heads * layer.head_dim
        kv = layer.n_kv_heads * layer.head_dim
        qkv = tokens * (h + q + 2 * kv)
        scores = tokens * q + 2 * layer.n_heads * tokens * attended  # q, scores in, probabilities out
        mlp = tokens * (h + 3 * layer.intermediate)  # input, gate, up, product
        best = max(best, qkv, scores, mlp)
    head = h + shape.vocab_size  # last token only
    best = max(best, head)
    return _ceil_div((tokens * h + best) * a, 8)


@dataclass(frozen=True)
class MemoryReport:
    by_kind: dict[str, int]
    weight_groups: tuple[tuple[str, int], ...]  # placement units (name, bytes), in fill order
    total_bytes: int = field(default=0)

    def to_dict(self) -> dict:
        return {"total_bytes": self.total_bytes, "by_kind": dict(self.by_kind),
                "weight_groups": [list(g) for g in self.weight_groups]}


@dataclass(frozen=True)
class StaticBytes:
    """Context-independent bytes of a shape."""

    by_kind: tuple[tuple[str, int], ...]
    weight_groups: tuple[tuple[str, int], ...]
    kv_bits_per_position: int

    @property
    def static_total(self) -> int:
        return sum(v for _, v in self.by_kind)


def static_bytes(shape: ModelShape) -> StaticBytes:
    """Weights, metadata and adapters by kind, the placement groups, and KV-cache bits per position."""
    kinds = dict.fromkeys(KINDS[:8], 0)
    groups: list[tuple[str, int]] = []
    h = shape.hidden
    norms = (2 * shape.n_layers + 1) * h * NORM_BITS // 8
    kinds["norms"] = norms
    groups.append(("norms", norms))
    for idx, layer in enumerate(shape.layers):
        attn = mlp = 0
        for pb in layer_proj_bytes(layer, h):
            kinds["attention" if pb.name in ATTN_PROJS else "mlp"] += pb.weights
            kinds["scales_zeros"] += pb.scales_zeros
            kinds["sparsity_metadata"] += pb.sparsity_metadata
            kinds["adapters"] += pb.adapter
            if pb.name in ATTN_PROJS:
                attn += pb.total
            else:
                mlp += pb.total
        groups.append((f"layers.{idx}.attn", attn))
        groups.append((f"layers.{idx}.mlp", mlp))
    if shape.vocab_size:
        ev, es = matrix_bytes(shape.vocab_size, h, shape.embedding_format)
        kinds["embedding"] = ev
        kinds["scales_zeros"] += es
        if shape.tie_word_embeddings:
            groups.append(("embedding+lm_head", ev + es))
        else:
            hv, hs = matrix_bytes(shape.vocab_size, h, shape.head_format)
            kinds["lm_head"] = hv
            kinds["scales_zeros"] += hs
            groups.append(("lm_head", hv + hs))
            groups.append(("embedding", ev + es))  # one row read per token: placed last
    k_values = sum(layer.n_kv_heads * layer.head_dim for layer in shape.layers)  # as many V values
    kv_bits = 2 * k_values * shape.kv_cache_bits
    if shape.kv_cache_group is not None:
        key_group = shape.kv_key_group or shape.kv_cache_group
        kv_bits += (-(-k_values // key_group) + -(-k_values // shape.kv_cache_group)) * KV_PARAM_BITS
    return StaticBytes(tuple(kinds.items()), tuple(groups), kv_bits)


def memory_report(shape: ModelShape, context_len: int, prefill_len: int = 0) -> MemoryReport:
    sb = static_bytes(shape)
    by_kind = dict(sb.by_kind)
    by_kind["kv_cache"] = _ceil_div(sb.kv_bits_per_position * context_len, 8)
    by_kind["activations_peak"] = max(
        peak_activation_bytes(shape, 1, max(context_len, 1)),
        peak_activation_bytes(shape, prefill_len, prefill_len),
    )
    return MemoryReport(by_kind=by_kind, weight_groups=sb.weight_groups, total_bytes=sum(by_kind.values()))
