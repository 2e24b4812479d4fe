"""Structural edits of a LLaMA model in memory: drop decoder layers, shrink MLPs, remove KV groups.

Each edit keeps the config consistent with the tensors, so the result saves with
``save_pretrained`` and reloads with plain ``from_pretrained``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from slmsearch.errors import SlmsearchError


def decoder_layers(model: Any) -> nn.ModuleList:
    """The decoder layers of a LLaMA causal LM (``model.model.layers``)."""
    try:
        return model.model.layers
    except AttributeError:
        raise SlmsearchError(
            f"{type(model).__name__} has no model.layers; slmsearch compresses LLaMA causal LMs only"
        ) from None


def drop_layers(model: Any, indices: Sequence[int]) -> Any:
    """Remove decoder layers ``indices`` in place; renumber ``layer_idx`` and the config."""
    layers = decoder_layers(model)
    n = len(layers)
    drop = sorted(set(int(i) for i in indices))
    if any(not 0 <= i < n for i in drop):
        raise SlmsearchError(f"layer indices must satisfy 0 <= i < {n}, got {list(indices)}")
    if len(drop) >= n:
        raise SlmsearchError(f"cannot drop all {n} layers; drop at most {n - 1}")
    if not drop:
        return model
    keep = [i for i in range(n) if i not in set(drop)]
    model.model.layers = nn.ModuleList([layers[i] for i in keep])
    for new, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = new
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = new
    config = model.config
    config.num_hidden_layers = len(keep)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and len(layer_types) == n:
        config.layer_types = [layer_types[i] for i in keep]
    return model


def _shrink_linear(linear: nn.Linear, *, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> None:
    weight = linear.weight.data
    if rows is not None:
        weight = weight.index_select(0, rows)
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, rows).contiguous())
    if cols is not None:
        weight = weight.index_select(1, cols)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=linear.weight.requires_grad)
    linear.out_features, linear.in_features = weight.shape


def shrink_mlp(layer: nn.Module, keep: torch.Tensor) -> None:
    """Keep MLP intermediate channels ``keep`` of one decoder layer (gate/up rows, down columns)."""
    idx = keep.to(torch.long)
    _shrink_linear(layer.mlp.gate_proj, rows=idx)
    _shrink_linear(layer.mlp.up_proj, rows=idx)
    _shrink_linear(layer.mlp.down_proj, cols=idx)
    if hasattr(layer.mlp, "intermediate_size"):
        layer.mlp.intermediate_size = int(idx.numel())


def shrink_attention(layer: nn.Module, groups: torch.Tensor, *, rep: int, head_dim: int) -> None:
    """Keep KV groups ``groups`` of one layer: each KV head with the ``rep`` query heads reading it."""
    groups = groups.to(torch.long)
    kv_rows = (groups[:, None] * head_dim + torch.arange(head_dim, device=groups.device)).reshape(-1)
    q_rows = (groups[:, None] * rep * head_dim + torch.arange(rep * head_dim, device=groups.device)).reshape(-1)
    attn = layer.self_attn
    _shrink_linear(attn.q_proj, rows=q_rows)
    _shrink_linear(attn.k_proj, rows=kv_rows)
    _shrink_linear(attn.v_proj, rows=kv_rows)
    _shrink_linear(attn.o_proj, cols=q_rows)
    attn.head_dim = head_dim


def head_geometry(config: Any) -> tuple[int, int, int]:
    """(query heads, KV heads, head dim) of a LLaMA config."""
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // n_heads
    return n_heads, n_kv, head_dim


def set_kv_groups(config: Any, kept: int, *, rep: int, head_dim: int) -> None:
    """Make the config agree with attention tensors that keep ``kept`` KV groups."""
    config.head_dim = head_dim
    config.num_key_value_heads = kept
    config.num_attention_heads = kept * rep
