"""GPTQ tensors a deployment need not store, left out of a finished checkpoint and rebuilt on load.

gptqmodel saves every quantized Linear as ``qweight`` (packed codes), ``scales`` (one per group
and output), ``qzeros`` (one zero point per group and output, packed at the weight width) and
``g_idx`` (the group of each input column, int32). Two of them carry no information in the plans
slmsearch makes:

- ``g_idx`` is ``arange(in_features) // group_size`` unless the columns were quantized in
  activation order (``act_order``; gptqmodel's group-aware reordering keeps it so);
- ``qzeros`` of a symmetric grid holds one value, the middle code, in every group (gptqmodel's v1
  format stores ``zero - 1``: ``2**(bits - 1) - 1``).

A deployment (and :func:`slmsearch.checkpoint.finish`) drops them when they are exactly that,
checked tensor by tensor, so the files hold what the hardware model counts
(:meth:`slmsearch.compress.gptq.Gptq.shape`): for SmolLM2-135M at 3 bits, 1.2 MB of 64.
:func:`rebuilt` makes them again, bit for bit, for gptqmodel's loader. At module level only the
standard library is imported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

G_IDX, QZEROS = "g_idx", "qzeros"


def layout(quantize_config: Mapping[str, Any]) -> tuple[int, bool]:
    """(group size, or -1 for one group per output; symmetric) of a GPTQ folder's quantize settings
    (:func:`slmsearch.checkpoint.quantize_config`)."""
    return int(quantize_config.get("group_size", -1)), bool(quantize_config.get("sym", True))


def identity_groups(in_features: int, group_size: int) -> torch.Tensor:
    """The ``g_idx`` of columns quantized in their own order: ``arange(in_features) // group_size``."""
    import torch

    return torch.arange(in_features, dtype=torch.int32) // group_size


def symmetric_zeros(groups: int, out_features: int, bits: int) -> torch.Tensor:
    """The ``qzeros`` of a symmetric grid in gptqmodel's v1 format: ``[groups, out * bits / 32]`` int32,
    every packed value ``2**(bits - 1) - 1``."""
    import torch

    from slmsearch.compress.kernels import pack_bits

    values = torch.full((out_features, groups), 2 ** (bits - 1) - 1, dtype=torch.int64)
    return pack_bits(values, bits).T.contiguous()


def _dims(shapes: Mapping[str, Sequence[int]], prefix: str, group_size: int) -> tuple[int, int, int, int]:
    """(in_features, out_features, groups, bits) of the quantized Linear ``prefix`` from the
    shapes of its tensors."""
    groups, out_f = shapes[f"{prefix}.scales"]
    g_idx = shapes.get(f"{prefix}.{G_IDX}")
    in_f = int(g_idx[0]) if g_idx is not None else int(groups) * group_size
    return in_f, int(out_f), int(groups), int(shapes[f"{prefix}.qweight"][0]) * 32 // in_f


def derivable(tensors: Mapping[str, torch.Tensor], group_size: int, sym: bool) -> dict[str, str]:
    """{tensor name: kind} of the ``g_idx`` / ``qzeros`` tensors in ``tensors`` (one safetensors
    file) that equal what :func:`rebuilt` makes from the others; per-output-channel ``g_idx`` is
    kept (it is what gives the input size)."""
    import torch

    found: dict[str, str] = {}
    shapes = {k: tuple(v.shape) for k, v in tensors.items()}
    for name in tensors:
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        if f"{prefix}.scales" not in tensors:
            continue
        in_f, out_f, groups, bits = _dims(shapes, prefix, group_size)
        g_idx = tensors.get(f"{prefix}.{G_IDX}")
        if g_idx is not None and group_size > 0 and torch.equal(g_idx, identity_groups(in_f, group_size).to(g_idx.dtype)):
            found[f"{prefix}.{G_IDX}"] = G_IDX
        zeros = tensors.get(f"{prefix}.{QZEROS}")
        if sym and zeros is not None and (out_f * bits) % 32 == 0 \
                and torch.equal(zeros, symmetric_zeros(groups, out_f, bits).to(zeros.dtype)):
            found[f"{prefix}.{QZEROS}"] = QZEROS
    return found


def rebuilt(shapes: Mapping[str, Sequence[int]], kinds: Collection[str], group_size: int) -> dict[str, torch.Tensor]:
    """The left-out tensors of ``kinds`` (``g_idx``, ``qzeros``) for every quantized Linear that
    lacks them; ``shapes``: the shape of every tensor the folder stores, by name."""
    out: dict[str, torch.Tensor] = {}
    for name in shapes:
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        in_f, out_f, groups, bits = _dims(shapes, prefix, group_size)
        if G_IDX in kinds and f"{prefix}.{G_IDX}" not in shapes:
            out[f"{prefix}.{G_IDX}"] = identity_groups(in_f, group_size)
        if QZEROS in kinds and f"{prefix}.{QZEROS}" not in shapes:
            out[f"{prefix}.{QZEROS}"] = symmetric_zeros(groups, out_f, bits)
    return out
