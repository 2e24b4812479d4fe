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
:func:`rebuilt` makes them again, bit for bit, for gptqmodel's loader.

The ``scales`` (fp16, one per group and output) may be stored as 8-bit codes instead
(``gptq.scale_bits: 8``): each tensor's scales on a log2 grid of its own range
(:func:`slmsearch.compress.kernels.log_scale_grid`, ``<prefix>.scales_log2_grid``). The GPTQ
stage rounds the fp16 scales onto the grid (:func:`on_log_grid`), so every later stage and the
evaluation see the deployed values; a finished folder stores the codes (:func:`scale_codes`,
checked to decode to the fp16 scales bit for bit) in :data:`slmsearch.checkpoint.SCALE_CODES_FILE`
and :func:`decoded_scales` makes the fp16 tensors again. At 3 bits g64 on SmolLM2-135M this is
1.66 MB of 64. At module level only the standard library is imported.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

G_IDX, QZEROS, SCALES = "g_idx", "qzeros", "scales"
SCALE_GRID = "scales_log2_grid"  # <prefix>.scales_log2_grid: float32 [lowest log2, step] of 8-bit scale codes


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


def _scale_names(tensors: Mapping[str, Any]) -> list[str]:
    """The ``scales`` tensors of the quantized Linears in ``tensors`` (those beside a ``qweight``)."""
    return [n for n in tensors if n.endswith(f".{SCALES}") and f"{n.removesuffix(SCALES)}qweight" in tensors]


def _grid_name(scales_name: str) -> str:
    """``<prefix>.scales_log2_grid`` of ``<prefix>.scales``."""
    return f"{scales_name.removesuffix(SCALES)}{SCALE_GRID}"


def on_log_grid(tensors: Mapping[str, torch.Tensor], bits: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(``tensors`` with every quantized Linear's fp16 ``scales`` rounded to its own ``bits``-bit
    log2 grid, {``<prefix>.scales_log2_grid``: grid}). The codes (``qweight``) are kept: a scale
    moves by under half a grid step (1.1% over 8 octaves at 8 bits), far below a rounding step of
    the weights, so GPTQ's choice of codes stays the nearest one."""
    import torch

    from slmsearch.compress import kernels
    from slmsearch.errors import SlmsearchError

    out, grids = dict(tensors), {}
    for name in _scale_names(tensors):
        scales = tensors[name]
        if scales.dtype != torch.float16:
            raise SlmsearchError(f"{name} is {scales.dtype}, not float16: 8-bit scale codes are made from gptqmodel's fp16 scales")
        out[name], grids[_grid_name(name)] = kernels.round_to_log_grid(scales, bits)
    return out, grids


def scale_codes(tensors: Mapping[str, torch.Tensor], grids: Mapping[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """{``<prefix>.scales``: uint8 codes} of the ``scales`` in ``tensors`` that have a grid,
    each checked to decode to the stored fp16 tensor bit for bit."""
    from slmsearch.compress import kernels
    from slmsearch.errors import SlmsearchError

    out: dict[str, torch.Tensor] = {}
    for name in _scale_names(tensors):
        grid = grids.get(_grid_name(name))
        if grid is None:
            continue
        codes = kernels.exact_log_scale_codes(tensors[name], grid, bits)
        if codes is None:
            raise SlmsearchError(f"{name} is not on its {bits}-bit scale grid; re-create the checkpoint")
        out[name] = codes
    return out


def decoded_scales(stored: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The fp16 ``scales`` that the uint8 codes in ``stored`` (a finished folder's
    :data:`slmsearch.checkpoint.SCALE_CODES_FILE`, codes beside their grids) stand for."""
    import torch

    from slmsearch.compress import kernels

    return {name: kernels.log_scale_values(codes, stored[_grid_name(name)]).to(torch.float16)
            for name, codes in stored.items() if name.endswith(f".{SCALES}")}
