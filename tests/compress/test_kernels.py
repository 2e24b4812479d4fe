"""Pure kernels on hand-made tensors, against brute force."""

from __future__ import annotations

import math

import pytest
import torch

from slmsearch.compress import kernels
from slmsearch.compress.geometry import NM_PATTERNS
from slmsearch.errors import SlmsearchError


def brute_force_mask(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r in range(scores.shape[0]):
        order = sorted(range(scores.shape[1]), key=lambda c: (float(scores[r, c]), c))
        for c in order[:n_remove]:
            mask[r, c] = True
    return mask


def test_wanda_mask_equals_brute_force_argsort():
    weight = torch.tensor(
        [
            [0.1, -2.0, 0.3, 0.4, -0.5, 0.6, 0.05, -1.0],
            [1.0, 1.0, -1.0, 1.0, 0.2, -0.2, 0.2, 0.9],
            [-3.0, 0.0, 0.01, 2.0, -0.7, 0.7, 0.8, -0.1],
            [0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2],
        ]
    )
    norm_sq = torch.tensor([1.0, 0.25, 4.0, 1.0, 9.0, 0.0, 16.0, 1.0])
    scores = weight.abs() * norm_sq.sqrt()
    for sparsity in (0.25, 0.5, 0.75):
        got = kernels.wanda_mask(weight, norm_sq, sparsity)
        assert torch.equal(got, brute_force_mask(scores, int(8 * sparsity)))


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.3, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("cols", [7, 64, 100])
def test_exact_per_row_counts(sparsity, cols):
    torch.manual_seed(0)
    weight = torch.randn(13, cols)
    mask = kernels.wanda_mask(weight, torch.rand(cols), sparsity)
    assert (mask.sum(1) == int(cols * sparsity)).all()
    assert ((~mask).sum(1) == cols - int(cols * sparsity)).all()


@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_exact_nm_counts(pattern):
    n, m = NM_PATTERNS[pattern]
    torch.manual_seed(1)
    weight = torch.randn(16, 64)
    mask = kernels.wanda_mask(weight, torch.rand(64), 0.0, n_m=(n, m))
    assert (mask.reshape(16, 64 // m, m).sum(-1) == n).all()


def test_small_weight_with_large_input_norm_survives():
    weight = torch.tensor([[0.1, 1.0, 1.0, 1.0]])
    norm_sq = torch.tensor([10_000.0, 1.0, 1.0, 1.0])  # column 0 sees a 100x larger input
    wanda = kernels.wanda_mask(weight, norm_sq, 0.25)
    magnitude = kernels.magnitude_mask(weight, 0.25)
    assert not wanda[0, 0] and magnitude[0, 0]


def test_mask_rejects_bad_settings():
    with pytest.raises(SlmsearchError, match="sparsity"):
        kernels.wanda_mask(torch.randn(2, 4), torch.ones(4), 1.0)
    with pytest.raises(SlmsearchError, match="divisible"):
        kernels.wanda_mask(torch.randn(2, 6), torch.ones(6), 0.0, n_m=(2, 4))
    with pytest.raises(SlmsearchError, match="one entry per input"):
        kernels.wanda_mask(torch.randn(2, 4), torch.ones(3), 0.5)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("group", [None, 16])
def test_rtn_grid(bits, group):
    torch.manual_seed(2)
    weight = torch.randn(8, 32)
    deq = kernels.rtn_quantize(weight, bits, group)
    groups = deq.reshape(8, -1, group or 32)
    for row in groups.reshape(-1, groups.shape[-1]):
        assert row.unique().numel() <= 2**bits
    assert (kernels.rtn_quantize(torch.zeros(2, 32), bits, group) == 0).all()
    err = (deq - weight).abs().max()
    assert err <= weight.abs().max() / (2**bits - 1) + 1e-6


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_pack_roundtrip(bits):
    values = torch.randint(0, 2**bits, (64, 5))
    assert torch.equal(kernels.unpack_bits(kernels.pack_bits(values, bits), bits), values)


def test_gptq_layout_4bit():
    # value k of a column sits at bits 4*(k % 8) of word k // 8 (GPTQ's layout)
    values = torch.arange(8).reshape(8, 1)
    word = int(kernels.pack_bits(values, 4)[0, 0]) & 0xFFFFFFFF
    assert word == 0x76543210


def test_angular_distance_sums_equal_brute_force():
    torch.manual_seed(2)
    a = torch.randn(3, 5, 16)
    b = torch.randn(3, 5, 16)
    sums = kernels.angular_distance_sums([a, a, -a, b])
    assert sums.shape == (4, 4) and sums.dtype == torch.float64
    assert torch.equal(sums.tril(), torch.zeros(4, 4, dtype=torch.float64))
    assert sums[0, 1] == pytest.approx(0.0, abs=1e-2)  # the same states: 0 per token
    assert sums[0, 2] == pytest.approx(15.0, abs=1e-2)  # opposite states: 1 per token, 15 tokens
    brute = 0.0
    for t in range(15):
        x, y = a.reshape(15, 16)[t].double(), b.reshape(15, 16)[t].double()
        brute += math.acos(float(x @ y / (x.norm() * y.norm()))) / math.pi
    assert float(sums[0, 3]) == pytest.approx(brute, rel=1e-5)


def test_masked_delta_and_scores():
    weight = torch.tensor([[0.0, 1.0], [2.0, 0.0]])
    delta = torch.ones(2, 2)
    assert torch.equal(kernels.masked_delta(delta, weight), torch.tensor([[0.0, 1.0], [1.0, 0.0]]))
    scores = torch.tensor([3.0, 1.0, 2.0, 0.5])
    assert kernels.keep_lowest_removed(scores, 2).tolist() == [0, 2]


def test_rtn_clipping_search_lowers_the_error_it_minimises():
    from slmsearch.compress.kernels import rtn_codes, rtn_dequantize

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((64, 128))  # heavy tails: the max-abs range wastes levels
    plain = rtn_dequantize(*rtn_codes(w, 4, 64), 4, torch.float32)
    searched_codes, searched_scales = rtn_codes(w, 4, 64, mse=2.4)
    searched = rtn_dequantize(searched_codes, searched_scales, 4, torch.float32)
    assert (w - searched).abs().pow(2.4).sum() < (w - plain).abs().pow(2.4).sum()
    assert (searched_scales <= rtn_codes(w, 4, 64)[1]).all()  # ranges only shrink
    assert int(searched_codes.max()) <= 15


def test_log_scale_codes_keep_each_scale_within_half_a_step_of_its_own_range():
    g = torch.Generator().manual_seed(0)
    scales = torch.exp2(torch.rand(24, 40, generator=g) * 6 - 9).half()  # 6 octaves
    grid = kernels.log_scale_grid(scales, 8)
    lo, step = float(grid[0]), float(grid[1])
    assert lo == pytest.approx(math.log2(float(scales.float().min())), abs=1e-6)
    assert lo + 255 * step == pytest.approx(math.log2(float(scales.float().max())), abs=1e-5)
    codes = kernels.log_scale_codes(scales, grid, 8)
    assert codes.dtype == torch.uint8 and int(codes.min()) == 0 and int(codes.max()) == 255
    back = kernels.log_scale_values(codes, grid)
    assert (torch.log2(back) - torch.log2(scales.float())).abs().max() <= step / 2 + 1e-6
    # decoded and stored in fp16, a scale finds its own code again (what finish checks)
    assert torch.equal(kernels.log_scale_codes(back.half(), grid, 8), codes)
    # fewer bits: a coarser grid over the same range, never a worse error bound than its half step
    grid4 = kernels.log_scale_grid(scales, 4)
    assert float(grid4[1]) == pytest.approx(step * 255 / 15)


def test_log_scale_grid_limits_its_span_and_keeps_fp16_normal():
    same = torch.full((4, 4), 0.01, dtype=torch.float16)
    grid = kernels.log_scale_grid(same, 8)
    assert float(grid[1]) * 255 == pytest.approx(1.0)  # at least one octave
    assert torch.equal(kernels.log_scale_values(kernels.log_scale_codes(same, grid, 8), grid).half(), same)
    wide = torch.tensor([[2.0**-30, 0.0, 2.0**-3, 1.0]])
    grid = kernels.log_scale_grid(wide, 8)
    assert float(grid[0]) == pytest.approx(-14.0)  # 16 octaves below the largest would be -16: fp16's normal floor
    codes = kernels.log_scale_codes(wide, grid, 8)
    assert codes.tolist() == [[0, 0, round((-3 + 14) / float(grid[1])), 255]]  # below the grid (zero too): its lowest
    assert kernels.log_scale_grid(torch.tensor([[2.0**-2, 2.0**-20, 1.0]]), 8)[0] == pytest.approx(-14.0)
    assert kernels.log_scale_grid(torch.tensor([[2.0**6, 2.0**-20, 1.0]]), 8)[0] == pytest.approx(-10.0)  # 16 octaves
    with pytest.raises(SlmsearchError, match="scale codes must be 2 to 8 bits, got 9"):
        kernels.log_scale_grid(wide, 9)
    with pytest.raises(SlmsearchError, match="no positive scale"):
        kernels.log_scale_grid(torch.zeros(2, 2), 8)
