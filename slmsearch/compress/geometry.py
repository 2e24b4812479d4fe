"""Integer rules of the model's geometry that compression must keep: pure Python, no torch.

The stages apply these rules to a model, the search samples only what they allow, and the
hardware model's shapes follow them, so each lives here once.
"""

from __future__ import annotations

from collections.abc import Mapping

from slmsearch.errors import SlmsearchError

# N:M patterns the WANDA stage accepts, as (zeros per group, group size).
NM_PATTERNS: dict[str, tuple[int, int]] = {"2:4": (2, 4), "4:8": (4, 8)}


def allowed_kv_group_removals(hidden: int, n_heads: int, n_kv: int, head_dim: int, multiple: int) -> tuple[int, ...]:
    """KV-group counts structured pruning may remove: at least one group stays, the o_proj input
    stays divisible by ``multiple``, and ``hidden % num_attention_heads == 0`` still holds
    (transformers' LlamaConfig refuses to save or load a config that breaks it, even with an
    explicit ``head_dim``). SmolLM2-135M: (0, 1, 2); Llama-3.2-1B: (0, 4, 6, 7)."""
    rep = n_heads // n_kv
    out = []
    for removed in range(n_kv):
        heads = (n_kv - removed) * rep
        if hidden % heads == 0 and (heads * head_dim) % multiple == 0:
            out.append(removed)
    return tuple(out)


def mlp_channels_to_remove(intermediate_size: int, fraction: float, multiple: int) -> int:
    """Channels removed per layer: ``fraction`` of them, rounded to the nearest multiple of
    ``multiple`` so the remaining width stays divisible by the quantization group size."""
    if intermediate_size % multiple:
        raise SlmsearchError(
            f"wanda.multiple={multiple} must divide the intermediate size {intermediate_size}; "
            "choose a divisor such as 32 or 64"
        )
    n = int(round(intermediate_size * fraction / multiple)) * multiple
    return min(n, intermediate_size - multiple)


def undivided_inputs(group_size: int, input_sizes: Mapping[str, int]) -> dict[str, int]:
    """The quantized Linears' input sizes (by name) that a GPTQ ``group_size`` does not divide;
    none for ``-1`` (one group per output channel). A group size fits a model when this is empty."""
    if group_size == -1:
        return {}
    return {name: size for name, size in input_sizes.items() if size % group_size}
