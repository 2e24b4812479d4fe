"""Per-operator latency: engine choice, the bounding resource, tiles, the operator list of a pass."""

import dataclasses
import json
import math

import pytest

from slmsearch.hwmodel import TensorFormat, estimate, load_platform
from slmsearch.hwmodel.latency import (ELTWISE, LINEAR, Op, box_tile, causal_pairs, cluster_compute_cycles,
                                       deeploy_tiles, embedding_ops, n_tiles, op_cost, op_tiles)
from slmsearch.hwmodel.shape import smollm2_135m

P = load_platform("siracusa")
SRAM, L2, L3 = 1, 3, 4


def test_report_rows_name_engine_and_bound():
    e = estimate(smollm2_135m().with_linear_format(TensorFormat(8, 128)).with_activation_bits(8), P,
                 context_len=64, prefill_len=64)
    engines = {r.engine for r in e.prefill.ops}
    assert engines == {"cluster", "npu"}  # 8-bit weights + 8-bit activations use N-EUREKA
    assert all(r.bound for r in e.decode.ops)
    assert e.decode.energy_j_per_token > 0 and e.decode.tokens_per_s > 0
    json.dumps(e.to_dict())


def test_a_pass_is_the_sum_of_its_operators():
    e = estimate(smollm2_135m(), P, context_len=256, prefill_len=32)
    for pas in (e.decode, e.prefill):
        assert pas.cycles == sum(r.cycles for r in pas.ops)
        assert pas.latency_s == pas.cycles / P.operating_point.freq_hz
        assert math.isclose(sum(pas.cycles_by_bound.values()), pas.cycles, rel_tol=1e-12)
        assert math.isclose(sum(pas.energy_by.values()), pas.energy_j, rel_tol=1e-12)
    assert len([r for r in e.decode.ops if r.name == "q_proj"]) == 30


def test_weights_streamed_from_offchip_bound_the_operator():
    op = Op("down_proj", LINEAR, "layers.0.mlp", tokens=1, inner=1536, outputs=576, weight_bytes=1536 * 576 * 2,
            act_bytes=(1536 + 576) * 2)
    off = op_cost(op, P, ((L3, 1.0),), ())
    l3 = P.level("l3")
    stream = op.weight_bytes / l3.read_bw_bytes_per_cycle + off.n_tiles * l3.access_latency_cycles
    assert off.bound == "stream:l3" and off.cycles >= stream and l3.access_latency_cycles > 0
    assert dict(off.transfer_cycles)["stream:l3"] == stream
    half = op_cost(op, P, ((L2, 0.5), (L3, 0.5)), ())
    on = op_cost(op, P, ((L2, 1.0),), ())
    assert on.cycles < half.cycles < off.cycles
    assert on.bound != "stream:l3" and dict(on.level_bytes)["l2"] == op.weight_bytes + op.act_bytes
    assert on.engine == "cluster" and on.macs == 1536 * 576


def test_npu_reads_weight_memory_in_place_when_it_is_faster():
    op = Op("q_proj", LINEAR, "layers.0.attn", tokens=64, inner=576, outputs=576, operand_bits=8, weight_bits=8,
            npu_ok=True, weight_bytes=576 * 576, act_bytes=64 * 2 * 576)
    c = op_cost(op, P, ((SRAM, 1.0),), ())
    assert c.engine == "npu" and "read:weight_mem" in dict(c.transfer_cycles)
    cluster_only = op_cost(op, load_platform("siracusa", {"npu.enabled": 0}), ((SRAM, 1.0),), ())
    assert cluster_only.engine == "cluster" and cluster_only.cycles > c.cycles


def test_cluster_cycles_and_tiles_by_hand():
    cl = P.cluster
    op = Op("o_proj", LINEAR, "", tokens=1, inner=576, outputs=576, operand_bits=16)
    per_core = math.ceil(576 / cl.cores)
    assert cluster_compute_cycles(op, P) == per_core * (cl.output_overhead_cycles + math.ceil(576 / cl.macs_per_cycle(16)))
    fp = dataclasses.replace(op, floating=True)  # fp16 activations: the smallFloat rate, not int16 SIMD
    assert cluster_compute_cycles(fp, P) == per_core * (cl.output_overhead_cycles + math.ceil(576 / cl.fp16_macs_per_cycle_per_core))
    deq = dataclasses.replace(fp, dequant_weights=576 * 576, dequant_groups=576 * 576 // 128)
    assert cluster_compute_cycles(deq, P) == cluster_compute_cycles(fp, P) + (
        576 * 576 // cl.cores * cl.dequant_cycles_per_weight + 576 * 576 // 128 // cl.cores * cl.cycles_per_element_add)
    double = load_platform("siracusa", {"tiling.double_buffering": 1})
    budget = double.tiling.l1_budget_bytes // 2  # double-buffered: half the budget per tile
    assert n_tiles(1, double) == 1 and n_tiles(budget, double) == 1 and n_tiles(budget + 1, double) == 2
    assert n_tiles(budget + 1, P) == 1  # the packaged file is single-buffered


def test_decode_reads_one_embedding_row_and_prefill_scores_the_full_matrix():
    s = smollm2_135m()
    for shape in (s, s.with_embedding_format(TensorFormat(4, None, zero_bits=0))):
        e = estimate(shape, P, context_len=64, prefill_len=16)
        row = [r for r in e.decode.ops if r.name == "embedding"]
        assert len(row) == 1 and row[0].layer is None and row[0].cycles > 0
        assert len([r for r in e.prefill.ops if r.name == "embedding"]) == 1
    op = embedding_ops(s.with_embedding_format(TensorFormat(4, None, zero_bits=0)), P, 1)[0]
    assert op.weight_bytes == 576 * 4 // 8 + 2  # one 4-bit row + its fp16 scale
    untied = dataclasses.replace(s, tie_word_embeddings=False)
    assert embedding_ops(untied, P, 3)[0].group == "embedding"
    assert embedding_ops(untied, P, 3)[0].weight_bytes == 3 * 576 * 2
    assert causal_pairs(1, 512) == 512 and causal_pairs(64, 64) == 64 * 64  # masked, not skipped
    pre = estimate(s, P, context_len=64, prefill_len=64).prefill
    scores = [r for r in pre.ops if r.name == "attn_scores"][0]
    layer = s.layers[0]
    assert scores.macs == layer.n_heads * layer.head_dim * 64 * 64
    values = [r for r in pre.ops if r.name == "attn_values"][0]
    assert values.macs == layer.n_heads * layer.head_dim * 64 * 64


def test_deeploy_gemm_dispatch_and_cycles_by_hand():
    """Deeploy's RQGEMM kernels on microLlama's shapes (source B's ONNX files and parsers)."""
    from slmsearch.hwmodel.latency import deeploy_gemm_cycles, deeploy_gemm_kernel
    assert deeploy_gemm_kernel(16, 1, 65) == "matrixvec"  # decode scores [16, 1, 4] @ [16, 4, 65]
    assert deeploy_gemm_kernel(1, 16, 4) == "tallgemm"  # decode RoPE [1, 16, 4] @ [1, 4, 4]
    assert deeploy_gemm_kernel(1, 15, 4) == "gemm"  # 15 % 8 is not < 4 % 8
    assert deeploy_gemm_kernel(16, 64, 64) == "gemm"  # prefill scores
    cl = P.cluster
    pair = cl.gemm_pair_cycles + cl.gemm_pair_step_cycles  # inner 4 = one SIMD step
    scores = Op("attn_scores", "attn", "", batch=16, tokens=64, inner=4, outputs=64, operand_bits=8,
                weight_bits=8, deeploy_gemm=True)
    # GEMM: 16 x 64 calls on every core, 64 / 8 = 8 outputs (4 pairs) each
    assert deeploy_gemm_cycles(scores, P) == 16 * 64 * (cl.gemm_call_cycles + 4 * pair)
    assert cluster_compute_cycles(scores, P) == deeploy_gemm_cycles(scores, P)
    decode = dataclasses.replace(scores, tokens=1, outputs=65)
    # MatrixVec: 2 heads per core, 65 outputs (33 pairs) each
    assert deeploy_gemm_cycles(decode, P) == 2 * (cl.gemm_call_cycles + 33 * pair)


def test_box_tile_is_the_tile_deeploys_tiler_generated_for_the_tutorial_row():
    """Deeploy's own code generation for the tutorial's iLeakyReLU (1, 16, 64, 64) at L1 32,768 B with
    the multiple-of-16 constraint tiled it as (1, 11, 31, 48): 2 x 3 x 2 = 12 tiles (docs/hwmodel.md),
    where bytes over the budget alone give 4."""
    assert box_tile((1, 16, 64, 64), 2.0, 32768, 16) == (1, 11, 31, 48)
    assert deeploy_tiles((1, 16, 64, 64), 2.0, 32768, 16) == 12
    assert n_tiles(2 * 65536, load_platform("siracusa", {"tiling.l1_budget_bytes": 32768})) == 4


def test_box_tile_budget_is_strict_word_aligned_and_whole_rows_stay_whole():
    # in + out of 16,384 int8 elements is exactly 32,768 B: the tiler's memory constraint is strict
    assert deeploy_tiles((16384,), 2.0, 32768) == 2
    assert deeploy_tiles((16384,), 2.0, 32772) == 1
    assert deeploy_tiles((5,), 1.0, 8) == 2  # 5 B round up to 8, which is not below 8
    # iRMSNorm / iSoftmax keep the innermost axis whole: only rows are split
    assert box_tile((64, 576), 2.0, 64000, 576) == (55, 576)
    assert deeploy_tiles((64, 576), 2.0, 64000, 576) == 2
    assert box_tile((4, 40000), 2.0, 64000, 40000) is None  # one row does not fit


def test_box_tile_is_the_largest_box_with_the_largest_leading_axes():
    """Against brute force over every box of small shapes."""
    import itertools
    import random

    rng = random.Random(3)
    for _ in range(150):
        dims = tuple(rng.randint(1, 9) for _ in range(rng.randint(1, 3)))
        bpe = rng.choice([1.0, 2.0, 3.0])
        budget = rng.randint(2, 3 * math.prod(dims))
        mult = rng.choice([1, 2, 4, dims[-1]])
        boxes = []
        for box in itertools.product(*(range(1, d + 1) for d in dims)):
            step = min(mult, dims[-1]) if dims[-1] >= mult else 1
            if box[-1] % step or math.ceil(math.prod(box) * bpe / 4) * 4 >= budget:
                continue
            boxes.append((math.prod(box), box))
        want = max(boxes)[1] if boxes else None
        assert box_tile(dims, bpe, budget, mult) == want, (dims, bpe, budget, mult)


def test_tiled_kernels_fork_the_cluster_once_per_tile():
    """Deeploy's ForkTransformer puts pi_cl_team_fork inside the tile loop: each tile pays a fork."""
    p = load_platform("siracusa", {"tiling.l1_budget_bytes": 32768, "npu.enabled": 0})
    op = Op("leaky", ELTWISE, "", elements=65536, cycles_per_element=1.0, operand_bits=8, weight_bits=8,
            act_bytes=2 * 65536, dims=(1, 16, 64, 64), last_multiple=16)
    cost = op_cost(op, p, (), ())
    assert op_tiles(op, p) == cost.n_tiles == 12
    cl = p.cluster
    assert cost.overhead_cycles == pytest.approx(
        cl.kernel_overhead_cycles + 12 * (cl.fork_join_cycles + p.tiling.tile_overhead_cycles))
    shapeless = dataclasses.replace(op, dims=())
    assert op_cost(shapeless, p, (), ()).n_tiles == 4  # no shape: bytes over the budget
    one_core = load_platform("siracusa", {"tiling.l1_budget_bytes": 32768, "npu.enabled": 0, "cluster.cores": 1})
    assert op_cost(op, one_core, (), ()).overhead_cycles == pytest.approx(
        cl.kernel_overhead_cycles + 12 * p.tiling.tile_overhead_cycles)
