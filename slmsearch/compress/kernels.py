"""Pure tensor kernels of the compression stages: no files, no models, no state.

Every function takes tensors and returns tensors, so a test can call it on a 4x8 example and
compare against brute force. Masks returned here mark the weights to *remove* (True = set to 0),
as in locuslab/wanda's ``W_mask``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from slmsearch.errors import SlmsearchError


def wanda_scores(weight: torch.Tensor, act_norm_sq: torch.Tensor) -> torch.Tensor:
    """WANDA importance ``|W_ij| * ||X_j||_2`` (Sun et al. 2023, eq. 1).

    ``weight`` is ``[out, in]``; ``act_norm_sq`` is ``[in]``, the sum over calibration tokens of
    each input feature squared (so its square root is the column's L2 norm).
    """
    if act_norm_sq.shape != weight.shape[1:]:
        raise SlmsearchError(
            f"activation norms must have one entry per input column: weight {tuple(weight.shape)}, "
            f"norms {tuple(act_norm_sq.shape)}"
        )
    return weight.abs().float() * act_norm_sq.float().clamp_min(0).sqrt().unsqueeze(0)


def _row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    if not 0.0 <= sparsity < 1.0:
        raise SlmsearchError(f"sparsity must satisfy 0 <= sparsity < 1, got {sparsity}")
    rows, cols = scores.shape
    n_remove = int(cols * sparsity)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if n_remove == 0:
        return mask
    # Stable sort: ties are broken by column index, the same as a brute-force argsort.
    order = torch.sort(scores, dim=1, stable=True).indices[:, :n_remove]
    return mask.scatter_(1, order, True)


def _nm_mask(scores: torch.Tensor, n_m: tuple[int, int]) -> torch.Tensor:
    n, m = n_m
    if not 0 < n < m:
        raise SlmsearchError(f"an N:M pattern needs 0 < N < M, got N={n}, M={m}")
    rows, cols = scores.shape
    if cols % m:
        raise SlmsearchError(f"N:M pruning needs the input size divisible by M: {cols} % {m} != 0")
    grouped = scores.reshape(rows, cols // m, m)
    order = torch.sort(grouped, dim=2, stable=True).indices[:, :, :n]
    mask = torch.zeros_like(grouped, dtype=torch.bool).scatter_(2, order, True)
    return mask.reshape(rows, cols)


def mask_from_scores(
    scores: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None
) -> torch.Tensor:
    """Remove the lowest scores of each row: ``int(cols * sparsity)`` of them, or N of every M."""
    if n_m is not None:
        return _nm_mask(scores, n_m)
    return _row_mask(scores, sparsity)


def wanda_mask(
    weight: torch.Tensor,
    act_norm_sq: torch.Tensor,
    sparsity: float,
    n_m: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Boolean ``[out, in]`` mask of the weights WANDA removes (True = prune), compared per row.

    Unstructured: each row loses exactly ``int(cols * sparsity)`` weights. With ``n_m=(N, M)``
    every group of M consecutive inputs of a row loses exactly N weights (``sparsity`` unused).
    """
    return mask_from_scores(wanda_scores(weight, act_norm_sq), sparsity, n_m)


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None
) -> torch.Tensor:
    """The magnitude-pruning baseline: ``|W|`` alone, compared per row like :func:`wanda_mask`."""
    return mask_from_scores(weight.abs().float(), sparsity, n_m)


def mlp_channel_scores(
    gate: torch.Tensor,
    up: torch.Tensor,
    down: torch.Tensor,
    hidden_norm_sq: torch.Tensor,
    inter_norm_sq: torch.Tensor,
) -> torch.Tensor:
    """WANDA score of each MLP intermediate channel: the sum of the scores of every weight that
    dies with it (its gate row, its up row, its down column). ``[intermediate]``."""
    return (
        wanda_scores(gate, hidden_norm_sq).sum(1)
        + wanda_scores(up, hidden_norm_sq).sum(1)
        + wanda_scores(down, inter_norm_sq).sum(0)
    )


def kv_group_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    o: torch.Tensor,
    hidden_norm_sq: torch.Tensor,
    attn_norm_sq: torch.Tensor,
    *,
    n_kv_heads: int,
    head_dim: int,
) -> torch.Tensor:
    """WANDA score of each KV group (one KV head and the query heads that share it): the summed
    scores of its q/k/v rows and its o_proj columns. ``[n_kv_heads]``."""
    n_heads = q.shape[0] // head_dim
    rep = n_heads // n_kv_heads
    q_rows = wanda_scores(q, hidden_norm_sq).sum(1).reshape(n_kv_heads, rep * head_dim).sum(1)
    k_rows = wanda_scores(k, hidden_norm_sq).sum(1).reshape(n_kv_heads, head_dim).sum(1)
    v_rows = wanda_scores(v, hidden_norm_sq).sum(1).reshape(n_kv_heads, head_dim).sum(1)
    o_cols = wanda_scores(o, attn_norm_sq).sum(0).reshape(n_kv_heads, rep * head_dim).sum(1)
    return q_rows + k_rows + v_rows + o_cols


def keep_lowest_removed(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """Sorted indices of the entries to keep after removing the ``n_remove`` lowest scores."""
    if not 0 <= n_remove < scores.numel():
        raise SlmsearchError(f"can remove 0 <= n < {scores.numel()} entries, got {n_remove}")
    order = torch.sort(scores, stable=True).indices
    return torch.sort(order[n_remove:]).values



def _grouped(weight: torch.Tensor, bits: int, group_size: int | None, *, max_bits: int) -> torch.Tensor:
    """``weight`` ``[rows, cols]`` as fp32 ``[rows, cols // group, group]`` (one group per row when
    ``group_size`` is None or -1), after checking the width and that the group divides the row."""
    if not 2 <= bits <= max_bits:
        raise SlmsearchError(f"bits must satisfy 2 <= bits <= {max_bits}, got {bits}")
    rows, cols = weight.shape
    group = cols if group_size in (None, -1) else int(group_size)
    if group <= 0 or cols % group:
        raise SlmsearchError(f"group size {group_size} must divide the input size {cols}")
    return weight.float().reshape(rows, cols // group, group)

def rtn_quantize(weight: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    """Round-to-nearest symmetric quantization, returned dequantized (same shape and dtype).

    The grid is gptqmodel's symmetric one: per row (``group_size=None``) or per group of
    ``group_size`` inputs, ``scale = 2 * max|w| / (2**bits - 1)``, integers ``q - 2**(bits-1)``
    with ``q`` in ``[0, 2**bits - 1]``, so zero is exactly representable.
    """
    w = _grouped(weight, bits, group_size, max_bits=16)
    rows, cols = weight.shape
    maxq = 2**bits - 1
    zero = (maxq + 1) / 2
    scale = (2 * w.abs().amax(dim=2, keepdim=True) / maxq).clamp_min(1e-12)
    q = torch.clamp(torch.round(w / scale) + zero, 0, maxq)
    return ((q - zero) * scale).reshape(rows, cols).to(weight.dtype)


def rtn_codes(weight: torch.Tensor, bits: int, group_size: int | None = None,
              scale_dtype: torch.dtype = torch.float16, mse: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest symmetric codes of ``weight`` ``[rows, cols]``: ``(codes, scales)``.

    The grid of :func:`rtn_quantize` with each scale rounded to ``scale_dtype`` first (the 16-bit
    scale a deployed tensor stores), so :func:`rtn_dequantize` of the two is the whole truth:
    ``codes`` are uint8 in ``[0, 2**bits - 1]`` (``[rows, cols]``, zero point ``2**(bits-1)``
    implicit), ``scales`` are ``[rows, cols // group]`` in ``scale_dtype``.

    ``mse`` > 0: each group's range is shrunk (in 2% steps down to 52%) to the scale that minimises
    ``sum |w - q(w)|**mse`` over the group (the clipping search of the GPTQ reference code, norm
    2.4), instead of the plain max-abs range.
    """
    w = _grouped(weight, bits, group_size, max_bits=8)
    rows, cols = weight.shape
    maxq = 2**bits - 1
    info = torch.finfo(scale_dtype)
    smallest = info.tiny * info.eps  # the smallest positive (subnormal) value: an all-zero group stays 0
    zero = 2 ** (bits - 1)
    full = 2 * w.abs().amax(dim=2) / maxq  # [rows, groups]
    scales = full.to(scale_dtype).clamp_min(smallest)
    if mse > 0:
        best = torch.full_like(full, float("inf"))
        for step in range(25):
            candidate = (full * (1 - step / 50)).to(scale_dtype).clamp_min(smallest)
            c = candidate.float().unsqueeze(2)
            err = ((torch.clamp(torch.round(w / c) + zero, 0, maxq) - zero) * c - w).abs().pow(mse).sum(dim=2)
            better = err < best
            best = torch.where(better, err, best)
            scales = torch.where(better, candidate, scales)
    q = torch.clamp(torch.round(w / scales.float().unsqueeze(2)) + zero, 0, maxq)
    return q.reshape(rows, cols).to(torch.uint8), scales


def grid_codes(values: torch.Tensor, scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The codes of ``values`` ``[rows, cols]`` that already lie on the symmetric grid of
    ``scales`` ``[rows, groups]`` (e.g. GPTQ's output): ``round(v / scale) + 2**(bits-1)``, clamped
    to ``[0, 2**bits - 1]``, uint8; :func:`rtn_dequantize` maps them back."""
    rows, cols = values.shape
    groups = scales.shape[1]
    if scales.shape[0] != rows or cols % groups:
        raise SlmsearchError(f"scales {tuple(scales.shape)} do not fit values {tuple(values.shape)}")
    v = values.float().reshape(rows, groups, cols // groups) / scales.float().unsqueeze(2)
    q = torch.clamp(torch.round(v) + 2 ** (bits - 1), 0, 2**bits - 1)
    return q.reshape(rows, cols).to(torch.uint8)


def rtn_dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, dtype: torch.dtype) -> torch.Tensor:
    """The weights ``codes`` and ``scales`` (from :func:`rtn_codes`) stand for, in ``dtype``:
    ``(code - 2**(bits-1)) * scale`` formed in fp32 and rounded once to ``dtype``."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    if scales.shape[0] != rows or cols % groups:
        raise SlmsearchError(f"scales {tuple(scales.shape)} do not fit codes {tuple(codes.shape)}")
    q = codes.float().reshape(rows, groups, cols // groups) - 2 ** (bits - 1)
    return (q * scales.float().unsqueeze(2)).reshape(rows, cols).to(dtype)


def minmax_codes(weight: torch.Tensor, bits: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest codes of ``weight`` ``[rows, cols]`` on an asymmetric grid per group of
    ``group_size`` columns: ``w = min + code * scale`` with ``min`` the group's smallest weight and
    ``scale`` its range over ``2**bits - 1``, both rounded to fp16 first (what a deployment stores:
    llama.cpp's Q4_1 layout at 4 bits g32). ``(codes uint8 [rows, cols], scales fp16, mins fp16)``,
    the last two ``[rows, cols // group_size]``; :func:`minmax_dequantize` of the three is the truth."""
    rows, cols = weight.shape
    if cols % group_size:
        raise ValueError(f"group_size {group_size} must divide {cols} columns")
    maxq = 2**bits - 1
    w = weight.detach().float().reshape(rows, cols // group_size, group_size)
    mins = w.amin(dim=2).to(torch.float16)
    info = torch.finfo(torch.float16)
    scales = ((w.amax(dim=2) - mins.float()) / maxq).to(torch.float16).clamp_min(info.tiny * info.eps)
    q = torch.clamp(torch.round((w - mins.float().unsqueeze(2)) / scales.float().unsqueeze(2)), 0, maxq)
    return q.reshape(rows, cols).to(torch.uint8), scales, mins


def minmax_dequantize(codes: torch.Tensor, scales: torch.Tensor, mins: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The weights of :func:`minmax_codes` (``min + code * scale``, in float32, then ``dtype``)."""
    rows, cols = codes.shape
    groups = scales.shape[1]
    q = codes.float().reshape(rows, groups, cols // groups)
    w = mins.float().unsqueeze(2) + q * scales.float().unsqueeze(2)
    return w.reshape(rows, cols).to(dtype)


def angular_distance_sums(states: Sequence[torch.Tensor]) -> torch.Tensor:
    """Angular distances ``arccos(cos(h_a, h_b)) / pi`` (ShortGPT / PruneMe), in [0, 1] per token,
    between every pair of hidden states, summed over the tokens.

    ``states`` are ``[..., hidden]`` tensors over the same tokens (e.g. the input of every decoder
    layer and the last layer's output). Returns a float64 CPU ``[n, n]`` tensor whose entry
    ``[a, b]`` (``a < b``) is the sum over tokens; zero on and below the diagonal.
    """
    flat = [F.normalize(s.reshape(-1, s.shape[-1]).float(), dim=-1) for s in states]
    sums = torch.zeros(len(flat), len(flat), dtype=torch.float64)
    for a in range(len(flat)):
        for b in range(a + 1, len(flat)):
            cos = (flat[a] * flat[b]).sum(-1).clamp(-1.0, 1.0)
            sums[a, b] = (torch.arccos(cos) / math.pi).double().sum().cpu()
    return sums


def masked_delta(delta: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """A merge delta with every position where ``weight`` is exactly zero set to zero."""
    return delta * (weight != 0).to(delta.dtype)


def input_eigenspace(covariance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The maps into and out of the eigenspace of a Linear's input covariance ``X.T @ X`` [in, in]:
    with ``covariance = Q diag(lam) Q.T``, ``into = Q diag(sqrt lam)`` and ``back = diag(1/sqrt lam) Q.T``
    (float64), so that ``||M @ X.T|| = ||M @ into||`` for any ``M`` and ``into @ back`` projects onto
    the directions the inputs use. Eigenvalues at or below a float32 covariance's numerical noise
    (``lam_max * in * eps32``) count as zero: those directions carry no input (a pseudoinverse)."""
    n_in = covariance.shape[0]
    if covariance.shape != (n_in, n_in):
        raise SlmsearchError(f"a covariance must be square, got shape {tuple(covariance.shape)}")
    lam, q = torch.linalg.eigh(covariance.double())
    kept = lam > lam[-1].clamp_min(0.0) * n_in * torch.finfo(torch.float32).eps
    root = torch.where(kept, lam.clamp_min(0.0).sqrt(), torch.zeros_like(lam))
    inv_root = torch.where(kept, 1.0 / torch.where(kept, root, torch.ones_like(root)), torch.zeros_like(lam))
    return q * root, inv_root[:, None] * q.T


def eigenspace_low_rank(delta: torch.Tensor, space: tuple[torch.Tensor, torch.Tensor],
                        rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """EoRA's factors (Liu et al. 2024, arXiv 2410.21271): ``a`` [rank, in] and ``b`` [out, rank]
    such that ``b @ a`` is the rank-``rank`` matrix closest to ``delta`` [out, in] *on the inputs*,
    minimising ``||(delta - b @ a) @ X.T||``; ``space`` is :func:`input_eigenspace` of ``X.T @ X``.

    The error equals ``||(delta - b @ a) @ into||``, so the best fit is the truncated SVD of
    ``delta @ into`` carried back with ``back``. Solved in float64, returned in float32. A ``rank``
    above ``min(out, in)`` is padded with zero rows and columns (the shapes match the rank asked).
    """
    into, back = space
    if rank < 1:
        raise SlmsearchError(f"eora rank must be >= 1, got {rank}")
    if delta.shape[1] != into.shape[0]:
        raise SlmsearchError(f"an eigenspace of {into.shape[0]} inputs does not fit a delta of {delta.shape[1]}")
    u, s, vh = torch.linalg.svd(delta.double() @ into, full_matrices=False)
    r = min(rank, s.numel())
    half = s[:r].sqrt()
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :r] = u[:, :r] * half
    a[:r] = (half[:, None] * vh[:r]) @ back
    return a.float(), b.float()


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Unpack int32 words along dim 0 into ``bits``-bit unsigned values (GPTQ layout).

    GPTQ packs the values of a column as one little-endian bit stream over consecutive 32-bit
    words (for 3 bits a value may straddle two words), so ``[W, C]`` words hold
    ``[W * 32 // bits, C]`` values.
    """
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(32, dtype=torch.int64).view(1, 32, 1)
    stream = ((w.unsqueeze(1) >> shifts) & 1).reshape(-1, words.shape[1])  # [W*32, C] bits
    n = stream.shape[0] // bits
    stream = stream[: n * bits].reshape(n, bits, -1)
    weights = (1 << torch.arange(bits, dtype=torch.int64)).view(1, bits, 1)
    return (stream * weights).sum(1)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`unpack_bits`: ``[N, C]`` values in ``[0, 2**bits)`` to int32 words."""
    n, cols = values.shape
    if (n * bits) % 32:
        raise SlmsearchError(f"{n} values of {bits} bits do not fill whole 32-bit words")
    v = values.to(torch.int64)
    stream = ((v.unsqueeze(1) >> torch.arange(bits, dtype=torch.int64).view(1, bits, 1)) & 1).reshape(-1, cols)
    stream = stream.reshape(-1, 32, cols)
    words = (stream << torch.arange(32, dtype=torch.int64).view(1, 32, 1)).sum(1)
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.to(torch.int32)


# A grid of scales spans at least one octave (so that decoding and re-encoding a code stored in
# fp16 finds the same code) and at most MAX_SCALE_OCTAVES below the largest scale; its smallest
# value is an fp16 normal number (2**-14), so every decoded scale keeps fp16's full precision.
MAX_SCALE_OCTAVES = 16.0
MIN_SCALE_OCTAVES = 1.0
FP16_MIN_NORMAL_LOG2 = -14.0


def log_scale_grid(scales: torch.Tensor, bits: int) -> torch.Tensor:
    """The ``bits``-bit log2 grid of one tensor's positive group scales: float32 ``[2]``, the
    log2 of its smallest value and the step between codes, spanning the tensor's own range
    (clamped as above). Double quantization of the scales, as llama.cpp's k-quants and QLoRA do
    for theirs: 8 bits on a log grid keep every scale within half a step (under 1.1% over 8
    octaves) of its fp16 value."""
    if bits < 2 or bits > 8:
        raise SlmsearchError(f"scale codes must be 2 to 8 bits, got {bits}")
    logs = torch.log2(scales.float()[scales > 0])
    if logs.numel() == 0:
        raise SlmsearchError("a tensor of scales has no positive scale")
    hi = float(logs.max())
    lo = max(float(logs.min()), hi - MAX_SCALE_OCTAVES, FP16_MIN_NORMAL_LOG2)
    lo = min(lo, hi - MIN_SCALE_OCTAVES)
    return torch.tensor([lo, (hi - lo) / (2**bits - 1)], dtype=torch.float32)


def log_scale_codes(scales: torch.Tensor, grid: torch.Tensor, bits: int) -> torch.Tensor:
    """Each scale's nearest code on ``grid`` (:func:`log_scale_grid`), uint8; scales below the
    grid (zero included) take its smallest value."""
    logs = torch.log2(scales.float().clamp_min(torch.finfo(torch.float32).tiny))
    codes = torch.round((logs - grid[0]) / grid[1])
    return codes.clamp(0, 2**bits - 1).to(torch.uint8)


def log_scale_values(codes: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """The float32 scales that ``codes`` stand for on ``grid``: ``2 ** (lo + code * step)``."""
    return torch.exp2(grid[0] + codes.float() * grid[1])


def round_to_log_grid(scales: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(``scales`` moved to their codes' values on their own ``bits``-bit log2 grid, in their
    dtype; the grid): what a stage stores when it keeps its scales as codes."""
    grid = log_scale_grid(scales, bits)
    return log_scale_values(log_scale_codes(scales, grid, bits), grid).to(scales.dtype), grid


def exact_log_scale_codes(scales: torch.Tensor, grid: torch.Tensor, bits: int) -> torch.Tensor | None:
    """The codes of ``scales`` on ``grid`` when they decode to ``scales`` bit for bit (scales made
    by :func:`round_to_log_grid`), else None."""
    codes = log_scale_codes(scales, grid, bits)
    return codes if torch.equal(log_scale_values(codes, grid).to(scales.dtype), scales) else None


def hadamard(n: int) -> torch.Tensor:
    """The orthonormal Walsh-Hadamard matrix of size ``n`` (a power of two), Sylvester's
    construction: ``H @ H.T == I``, every entry +-1/sqrt(n)."""
    if n < 1 or n & (n - 1):
        raise SlmsearchError(f"a Hadamard rotation needs a power-of-two size, got {n}")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def kv_fake_quant(x: torch.Tensor, bits: int, group_size: int, rotate: bool = False) -> torch.Tensor:
    """Keys or values ``[..., channels]`` rounded to ``bits`` as a KV cache stores them, returned
    dequantized in ``x``'s dtype.

    Asymmetric round-to-nearest per token, per group of ``group_size`` channels of the last
    dimension (KIVI's per-token form, arXiv:2402.02750): a 16-bit scale ``(max - min) / (2**bits -
    1)`` and a 16-bit zero point (the group's minimum) per group, codes in ``[0, 2**bits - 1]``.
    A token's codes depend only on that token, so rounding the whole sequence at once equals
    rounding each position as it enters the cache.

    ``rotate``: each row is multiplied by the orthonormal Hadamard matrix before rounding and back
    after (QuaRot, arXiv:2404.00456): attention is unchanged by an orthogonal rotation applied to
    queries and keys alike (values: folded into v_proj and o_proj), and the rotation spreads a few
    outlier channels over the whole row, so a group's range is set by typical values.
    """
    if not 2 <= bits <= 8:
        raise SlmsearchError(f"KV-cache bits must satisfy 2 <= bits <= 8, got {bits}")
    channels = x.shape[-1]
    if group_size <= 0 or channels % group_size:
        raise SlmsearchError(f"KV-cache group size {group_size} must divide the head size {channels}")
    rot = hadamard(channels) if rotate else None
    g = x.float() if rot is None else x.float() @ rot
    g = g.reshape(*x.shape[:-1], channels // group_size, group_size)
    maxq = 2**bits - 1
    low = g.amin(dim=-1, keepdim=True).to(torch.float16).float()
    scale = ((g.amax(dim=-1, keepdim=True) - low) / maxq).to(torch.float16).float().clamp_min(1e-8)
    q = torch.clamp(torch.round((g - low) / scale), 0, maxq)
    out = (q * scale + low).reshape(x.shape)
    return (out if rot is None else out @ rot.T).to(x.dtype)
