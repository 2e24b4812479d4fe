"""Per-operator latency: engine, compute cycles, data movement per level, overlap, overhead.

One forward pass (a decode step or a prefill) is the sum over operators of

    cycles(op) = overhead + body
    overhead   = kernel_overhead_cycles (tiled flow) or untiled_kernel_overhead_cycles (untiled
                 flow: a different code path, operands in L2) (+ fork_join_cycles on >1 core, once
                 per tile in the tiled flow) (+ NPU job overhead)
                 + n_tiles * tile_overhead_cycles  (tiled flow only)
    body       = max(compute, dma_l2_l1, stream_l3, read_weight_mem)  (double-buffered tiles)
               = sum of the same terms                                (single buffer)
               = compute * l2_access_slowdown + stream_l3             (untiled: operands in L2)
    stream_l3  = offchip bytes / L3 bandwidth + n_tiles * L3 first-word latency
    n_tiles    = element-wise kernels with a shape: the box Deeploy's tiler picks (box_tile);
                 other kernels: working set / L1 budget, rounded up
    compute    = MACs at the engine's rate (integer SIMD by operand width, fp16 SIMD when the
                 activations are 16-bit) + dequantization of packed low-bit weights and their
                 group scales when the activations are fp16 (weight-only quantization)

and each operator runs on the engine (8-core cluster or N-EUREKA) that finishes it first among
those that support its formats. The largest term names the resource that bounds the operator
("overhead" when the fixed costs exceed the body). See docs/hwmodel.md for every constant.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

from slmsearch.hwmodel.memory import ProjBytes, layer_proj_bytes, matrix_bytes
from slmsearch.hwmodel.placement import Split
from slmsearch.hwmodel.platform import Platform
from slmsearch.hwmodel.shape import LayerShape, ModelShape

LINEAR, ATTN, ELTWISE = "linear", "attn", "eltwise"


@dataclass(frozen=True, slots=True)
class Op:
    """One kernel invocation. Matmuls: batch x [tokens, inner] @ [inner, outputs]."""

    name: str
    kind: str  # linear | attn | eltwise
    group: str  # placement group of its weights ("" = none)
    batch: int = 1
    tokens: int = 1
    inner: int = 0
    outputs: int = 0
    elements: int = 0  # eltwise only
    cycles_per_element: float = 0.0
    operand_bits: int = 16  # max(weight or KV bits, activation bits): selects the SIMD width
    weight_bits: int = 16
    compute_density: float = 1.0  # fraction of MACs executed (N:M sparse kernels; causal attention)
    floating: bool = False  # fp16 arithmetic (16-bit activations) instead of integer SIMD
    dequant_weights: int = 0  # packed low-bit weights unpacked + scaled to fp16 before use
    dequant_groups: int = 0  # their scale/zero groups (one scale load + convert each)
    npu_ok: bool = False
    weight_bytes: int = 0
    act_bytes: int = 0  # activations read + written
    kv_bytes: int = 0  # KV cache read + written
    deeploy_gemm: bool = False  # an RQGEMM of Deeploy's integer graph: priced by deeploy_gemm_cycles
    dims: tuple[int, ...] = ()  # eltwise: the tensor's shape, outer to inner; tiled as Deeploy's tiler does
    last_multiple: int = 1  # eltwise: the innermost tile dimension is a multiple of this (dims[-1] = kept whole)

    @property
    def macs(self) -> int:
        return self.batch * self.tokens * self.inner * self.outputs


@dataclass(frozen=True, slots=True)
class OpCost:
    cycles: float
    engine: str
    bound: str
    compute_cycles: float
    overhead_cycles: float
    transfer_cycles: tuple[tuple[str, float], ...]  # (resource, cycles)
    level_bytes: tuple[tuple[str, int], ...]  # bytes read/written at each memory level
    n_tiles: int
    macs: int


# ---- the formulas ---------------------------------------------------------------------------

def cluster_compute_cycles(op: Op, p: Platform) -> float:
    """Cycles of the busiest core: outputs split over cores; each output costs
    output_overhead_cycles plus ceil(inner * density / SIMD MACs per cycle). Matmuls of Deeploy's
    integer graph (``op.deeploy_gemm``) follow its kernels instead (:func:`deeploy_gemm_cycles`)."""
    cl = p.cluster
    deq = dequant_cycles(op, p)
    if op.kind == ELTWISE:
        return math.ceil(op.elements / cl.cores) * op.cycles_per_element + deq
    if op.deeploy_gemm:
        return deeploy_gemm_cycles(op, p) + deq
    outputs = op.batch * op.tokens * op.outputs
    if outputs == 0:
        return deq
    per_core = math.ceil(outputs / min(cl.cores, outputs))
    inner = math.ceil(op.inner * op.compute_density / cl.macs_per_cycle(op.operand_bits, op.floating))
    return per_core * (cl.output_overhead_cycles + inner) + deq


def deeploy_gemm_kernel(batch: int, m: int, outputs: int) -> str:
    """Which of Deeploy's RequantizedGemm kernels Siracusa runs for batch x [m, n] @ [n, outputs]
    (source B: Deeploy/Targets/PULPOpen/Platform.py maps 'RequantizedGemm' to MatrixVec, TallGEMM,
    GEMM, tried in that order; their parsers in PULPOpen/Parsers.py accept MatrixVec when m == 1 and
    batch >= 8, TallGEMM when batch < 8, m >= 8 and m % 8 < outputs % 8; the literal 8 is theirs)."""
    if m == 1 and batch >= 8:
        return "matrixvec"
    if batch < 8 and m >= 8 and m % 8 < outputs % 8:
        return "tallgemm"
    return "gemm"


def deeploy_gemm_cycles(op: Op, p: Platform) -> float:
    """Cycles of the busiest core for one RQGEMM of Deeploy's integer graph, from its kernels
    (source B, Deeploy/Targets/PULPOpen/Templates; pulp-platform/pulp-nn-mixed XpulpV2/32bit):

    - GEMM (GEMMTemplate.PULPGEMM_8_Template, forked on every core): a loop over batch x m rows,
      each one call of pulp_nn_linear, which splits the outputs over the cores
      (chunk = ceil(outputs / cores)) and ends with pi_cl_team_barrier: every core makes
      batch x m calls of ceil(outputs / cores) outputs;
    - MatrixVec (MatrixVectorTemplate): the batch split over the cores (ceil(batch / cores) each),
      each a single-core gemv_s8_s8_plp over all outputs (also ending with a team barrier);
    - TallGEMM (TallGEMMTemplate): the m rows split over the cores, batch x ceil(m / cores) gemv
      calls over all outputs each.

    Both inner kernels compute two outputs at a time: each pair costs gemm_pair_cycles (set-up,
    two noinline pulp_nn_bn_quant_i8 requantizations and stores) plus gemm_pair_step_cycles per
    SIMD step over the inner dimension (two word loads of weights, one of the input, two
    pv.sdotsp.b: 4 int8 MACs per output; narrower operands take SIMD steps of
    macs_per_cycle(operand bits) MACs); an odd output costs a pair. Each call costs
    gemm_call_cycles (the row loop with its three nops, the call of 12 arguments, the core's chunk
    bounds, the closing barrier)."""
    cl = p.cluster
    kernel = deeploy_gemm_kernel(op.batch, op.tokens, op.outputs)
    if kernel == "matrixvec":
        calls, outs = math.ceil(op.batch / cl.cores), op.outputs
    elif kernel == "tallgemm":
        calls, outs = op.batch * math.ceil(op.tokens / cl.cores), op.outputs
    else:
        calls, outs = op.batch * op.tokens, math.ceil(op.outputs / cl.cores)
    steps = math.ceil(op.inner * op.compute_density / cl.macs_per_cycle(op.operand_bits))
    pair = cl.gemm_pair_cycles + steps * cl.gemm_pair_step_cycles
    return calls * (cl.gemm_call_cycles + math.ceil(outs / 2) * pair)


def dequant_cycles(op: Op, p: Platform) -> float:
    """Unpacking packed low-bit weights to fp16 on the cluster (split over the cores): each weight
    costs dequant_cycles_per_weight, each scale/zero group one load + convert (cycles_per_element_add).
    Zero for integer kernels, which consume the quantized weights directly."""
    if not op.dequant_weights:
        return 0.0
    cl = p.cluster
    return (math.ceil(op.dequant_weights / cl.cores) * cl.dequant_cycles_per_weight
            + math.ceil(op.dequant_groups / cl.cores) * cl.cycles_per_element_add)


def npu_compute_cycles(op: Op, p: Platform) -> float:
    """N-EUREKA: spatial_tokens tokens at a time, macs_per_cycle(weight bits) when the array is full."""
    npu = p.npu
    passes = math.ceil(op.tokens / npu.spatial_tokens)
    return passes * npu.spatial_tokens * op.batch * op.inner * op.outputs / npu.macs_per_cycle(op.weight_bits)


def n_tiles(working_set_bytes: int, p: Platform) -> int:
    """Tiles so that each fits the L1 budget (halved when double-buffered)."""
    tile_bytes = p.tiling.l1_budget_bytes / (2 if p.tiling.double_buffering else 1)
    return max(1, math.ceil(working_set_bytes / tile_bytes))


WORD_BYTES = 4  # Deeploy's MemoryScheduler.byteAlignment: every tile buffer is word-aligned


def box_tile(dims: tuple[int, ...], bytes_per_element: float, budget_bytes: float,
             last_multiple: int = 1) -> tuple[int, ...] | None:
    """The tile Deeploy's tiler picks for an element-wise kernel over a tensor of shape ``dims``.

    Source B (Deeploy @bf64cfa): the tile is a box, one size per axis
    (``UnaryTileConstraint``: the same box for input and output); the tiler maximises the bytes the
    pattern keeps in L1 (``TilerExtension._setupHeuristics``: the objective DEEPLOY_PATTERN_MEM)
    subject to the word-aligned buffers summing to strictly less than the level's size
    (``MemoryScheduler``: ``cost + constantTensorOffset < size``); kernels may constrain the innermost
    axis to a multiple (``TilerModel.addTileSizeDivisibleConstraint``, e.g. the tutorial's iLeakyReLU:
    16; iRMSNorm and iSoftmax keep it whole: ``last_multiple = dims[-1]``). Among boxes of the same
    size the search (ortools, CHOOSE_FIRST_UNBOUND / ASSIGN_MAX_VALUE over the axes in order) ends
    on the one with the largest leading axes. None when no box fits."""
    if not dims:
        return None
    cap = int(budget_bytes / bytes_per_element) + 1
    while cap > 0 and math.ceil(cap * bytes_per_element / WORD_BYTES) * WORD_BYTES >= budget_bytes:
        cap -= 1
    if cap <= 0:
        return None
    last = dims[-1]
    step = min(last_multiple, last) if last >= last_multiple else 1
    last_sizes = range(last - last % step if step > 1 else last, 0, -step)
    if last_sizes[0] == last and math.prod(dims) <= cap:
        return dims  # the whole tensor fits: one tile
    best: tuple[int, tuple[int, ...]] | None = None

    def search(i: int, prod: int, chosen: tuple[int, ...]) -> None:
        nonlocal best
        if best is not None and prod * math.prod(dims[:i + 1]) < best[0]:
            return  # even the largest sizes of the axes left cannot beat the best box
        if i == 0:  # the outermost axis takes the largest size that still fits
            d0 = min(dims[0], cap // prod)
            if d0 >= 1:
                cand = (d0 * prod, (d0, *chosen))
                if best is None or cand > best:
                    best = cand
            return
        sizes = last_sizes if i == len(dims) - 1 else range(dims[i], 0, -1)
        for d in sizes:
            if prod * d <= cap:
                search(i - 1, prod * d, (d, *chosen))

    if len(dims) == 1:
        fits = [d for d in last_sizes if d <= cap]
        return (fits[0],) if fits else None
    search(len(dims) - 1, 1, ())
    return best[1] if best else None


@functools.lru_cache(maxsize=8192)
def deeploy_tiles(dims: tuple[int, ...], bytes_per_element: float, budget_bytes: float,
                  last_multiple: int = 1) -> int | None:
    """Tiles of an element-wise kernel as Deeploy tiles it (:func:`box_tile`): the product over the
    axes of ceil(size / tile size); None when no box fits the budget."""
    tile = box_tile(dims, bytes_per_element, budget_bytes, last_multiple)
    if tile is None:
        return None
    return math.prod(math.ceil(d / t) for d, t in zip(dims, tile))


def op_tiles(op: Op, p: Platform) -> int:
    """Tiles of ``op`` in the tiled flow: an element-wise kernel with a known shape as Deeploy's tiler
    cuts it (:func:`deeploy_tiles`); every other kernel by bytes over the L1 budget (:func:`n_tiles`)."""
    working = op.weight_bytes + op.act_bytes + op.kv_bytes
    if op.kind == ELTWISE and op.dims and not op.weight_bytes and op.elements:
        budget = p.tiling.l1_budget_bytes / (2 if p.tiling.double_buffering else 1)
        tiles = deeploy_tiles(op.dims, (op.act_bytes + op.kv_bytes) / op.elements, budget, op.last_multiple)
        if tiles is not None:
            return tiles
    return n_tiles(working, p)


def _level_index(p: Platform, kind: str) -> int:
    return next(i for i, lv in enumerate(p.levels) if lv.kind == kind)


def op_cost(op: Op, p: Platform, weight_split: Split, kv_split: Split) -> OpCost:
    """Cost of ``op`` with its weights and KV cache placed as given (level index, fraction)."""
    w_by_level = [(i, op.weight_bytes * f) for i, f in weight_split] if op.weight_bytes else []
    kv_by_level = [(i, op.kv_bytes * f) for i, f in kv_split] if op.kv_bytes else []
    offchip_bytes = sum(b for i, b in w_by_level + kv_by_level if p.levels[i].kind == "offchip")
    tiles = op_tiles(op, p) if p.tiling.enabled else 1
    stream = 0.0
    if offchip_bytes:
        off = p.levels[_level_index(p, "offchip")]
        stream = offchip_bytes / off.read_bw_bytes_per_cycle + tiles * off.access_latency_cycles
    best: OpCost | None = None
    for engine in ("cluster", "npu"):
        if engine == "npu" and not (op.npu_ok and p.npu.enabled and p.tiling.enabled and op.kind == LINEAR):
            continue
        cost = _engine_cost(op, p, engine, w_by_level, kv_by_level, stream, tiles)
        if best is None or cost.cycles < best.cycles:
            best = cost
    assert best is not None
    return best


def _engine_cost(op: Op, p: Platform, engine: str, w_by_level: list[tuple[int, float]],
                 kv_by_level: list[tuple[int, float]], stream: float, tiles: int) -> OpCost:
    levels = p.levels
    cl = p.cluster
    tiled = p.tiling.enabled
    kernel_fixed = cl.kernel_overhead_cycles if tiled else cl.untiled_kernel_overhead_cycles
    if engine == "npu":
        compute = npu_compute_cycles(op, p)
        fixed = kernel_fixed + p.npu.job_overhead_cycles
    else:
        compute = cluster_compute_cycles(op, p)
        # Deeploy's tiled flow forks the team once per tile (B: PULPOpen/Bindings.py ForkTransformer
        # applies ForkClosure before PULPClusterTiling, so the tile loop wraps pi_cl_team_fork)
        fixed = kernel_fixed + (cl.fork_join_cycles * tiles if cl.cores > 1 else 0.0)
    level_bytes: dict[int, float] = {}
    wmem_read = 0.0
    dma_bytes = float(op.act_bytes)
    for i, b in w_by_level:
        level_bytes[i] = level_bytes.get(i, 0.0) + b
        if engine == "npu" and levels[i].kind == "weight":
            wmem_read = max(wmem_read, b / levels[i].read_bw_bytes_per_cycle)  # read in place, no DMA
        else:
            dma_bytes += b
    for i, b in kv_by_level:
        level_bytes[i] = level_bytes.get(i, 0.0) + b
        dma_bytes += b
    act_level = _level_index(p, "l2")
    level_bytes[act_level] = level_bytes.get(act_level, 0.0) + op.act_bytes
    stream_term = f"stream:{levels[_level_index(p, 'offchip')].name}" if stream else ""
    if tiled:
        overhead = fixed + tiles * p.tiling.tile_overhead_cycles
        dma = dma_bytes / p.dma.l2_l1_bw_bytes_per_cycle
        l1 = _level_index(p, "l1")
        level_bytes[l1] = level_bytes.get(l1, 0.0) + dma_bytes  # L1 side of the DMA
        terms = [(f"compute:{engine}", compute), ("dma:l2-l1", dma)]
        if stream:
            terms.append((stream_term, stream))
        if wmem_read:
            terms.append(("read:weight_mem", wmem_read))
        body = max(t for _, t in terms) if p.tiling.double_buffering else sum(t for _, t in terms)
    else:
        overhead = fixed
        slow = compute * cl.l2_access_slowdown
        terms = [(f"compute:{engine}", slow)]
        if stream:
            terms.append((stream_term, stream))
        body = sum(t for _, t in terms)
    bound_name = max(terms, key=lambda t: t[1])[0]
    if overhead > body:
        bound_name = "overhead"
    return OpCost(
        cycles=overhead + body,
        engine=engine,
        bound=bound_name,
        compute_cycles=compute,
        overhead_cycles=overhead,
        transfer_cycles=tuple((n, v) for n, v in terms[1:]),
        level_bytes=tuple((levels[i].name, int(round(b))) for i, b in sorted(level_bytes.items())),
        n_tiles=tiles,
        macs=int(op.macs * op.compute_density) if op.kind != ELTWISE else 0,
    )


# ---- the operator list of one pass ----------------------------------------------------------

def _eltwise(name: str, group: str, elements: int, cpe: float, act_bytes_per_el: float,
             dims: tuple[int, ...] = (), whole_last: bool = False) -> Op:
    """An element-wise kernel over ``elements`` (= prod(dims) when the shape is given);
    ``whole_last``: the kernel needs whole rows (Deeploy's iRMSNorm and iSoftmax tile constraints fix
    the innermost tile dimension to the tensor's)."""
    assert not dims or math.prod(dims) == elements, (name, dims, elements)
    return Op(name, ELTWISE, group, elements=elements, cycles_per_element=cpe,
              act_bytes=int(math.ceil(elements * act_bytes_per_el)), dims=dims,
              last_multiple=dims[-1] if dims and whole_last else 1)


def _linear_ops(layer: LayerShape, pb: ProjBytes, tokens: int, act_bits: int, group: str,
                npu_act_bits: int) -> list[Op]:
    """The projection ``pb`` of ``layer``, then its adapter's two matmuls when unmerged."""
    proj, fmt = pb.name, layer.fmt(pb.name)
    sp = layer.sparsity
    density = sp.density if sp.n_m is not None else 1.0
    a = act_bits / 8
    floating = act_bits >= 16
    deq = floating and fmt.quantized
    gemm = integer_graph(act_bits)
    ops = [Op(
        proj, LINEAR, group, tokens=tokens, inner=pb.in_features, outputs=pb.out_features,
        operand_bits=max(fmt.weight_bits, act_bits), weight_bits=fmt.weight_bits, compute_density=density,
        floating=floating,
        dequant_weights=sp.stored_values(pb.in_features * pb.out_features) if deq else 0,
        dequant_groups=fmt.n_groups(pb.in_features, pb.out_features) if deq else 0,
        npu_ok=sp.format == "dense" and act_bits <= npu_act_bits,
        weight_bytes=pb.weights + pb.scales_zeros + pb.sparsity_metadata,
        act_bytes=int(math.ceil(tokens * (pb.in_features + pb.out_features) * a)), deeploy_gemm=gemm,
    )]
    if layer.adapter is not None:
        r, ab = layer.adapter.rank, layer.adapter.bits
        half = pb.adapter // 2
        ops.append(Op(proj + ".lora_a", LINEAR, group, tokens=tokens, inner=pb.in_features, outputs=r,
                      operand_bits=max(ab, act_bits), weight_bits=ab, floating=act_bits >= 16, npu_ok=act_bits <= npu_act_bits,
                      weight_bytes=half, act_bytes=int(math.ceil(tokens * (pb.in_features + r) * a)),
                      deeploy_gemm=gemm))
        ops.append(Op(proj + ".lora_b", LINEAR, group, tokens=tokens, inner=r, outputs=pb.out_features,
                      operand_bits=max(ab, act_bits), weight_bits=ab, floating=act_bits >= 16, npu_ok=act_bits <= npu_act_bits,
                      weight_bytes=pb.adapter - half,
                      act_bytes=int(math.ceil(tokens * (r + 2 * pb.out_features) * a)), deeploy_gemm=gemm))
    return ops


def integer_graph(act_bits: int) -> bool:
    """Whether a pass runs Deeploy's integer graph (activations of 8 bits or fewer).

    That graph has more kernels per layer than the operators of the mathematics. Source B's
    microLlama test networks (DeeployTest/Tests/Models/microLlama/INT8/*/network.onnx, 505 nodes for
    8 layers) after the passes Deeploy runs for Siracusa (Deeploy/Targets/PULPOpen/Platform.py
    ``PULPOptimizer``: SkipEmptyConcatPass, SkipUnityRequantPass after Concat/Reshape/Transpose,
    MergeTrueIntegerDivRequantShiftPass, iHardswishRequantMergePass, MergeConstAddAndRequantPass,
    PULPGEMMRequantMergePass, PULPMatMulRequantMergePass, PULPAddRequantMergePass; PULPOpen/Deployer.py:
    TransposeMergePass, ReshapeConstOptPass) leave per layer: 2 iRMSNorm, 7 RQGEMM projections,
    2 RoPE RQMatMuls (a constant 4x4 rotation per position), the Q/K/V/output Transposes, the
    TrueIntegerDiv (scale), an RQAdd (mask), iSoftmax and its RequantShift, 2 attention RQMatMuls,
    RQSiHardswish, Mul and its RequantShift, 2 RQAdd residuals: 26 kernels (the model's fp16 list
    has 16); a step with a KV cache also concatenates K and V onto it and transposes the whole K
    (29). Reshapes are aliases, not kernels.
    """
    return act_bits <= 8


def _scalar(name: str, group: str, dims: tuple[int, ...], p: Platform, bytes_per_el: float) -> Op:
    """One of Deeploy's scalar int8 element-wise kernels (requant, transpose, concat, mul, div)."""
    return _eltwise(name, group, math.prod(dims), p.cluster.cycles_per_element_scalar, bytes_per_el, dims)


def _rope_matmul(name: str, group: str, tokens: int, heads: int, head_dim: int) -> Op:
    """Deeploy's integer RoPE: per position, [heads, head_dim] @ a constant [head_dim, head_dim]
    rotation (the RQMatMul _MatMul/_MatMul_1 of source B's microLlama graphs), on the cluster."""
    return Op(name, ATTN, group, batch=tokens, tokens=heads, inner=head_dim, outputs=head_dim,
              operand_bits=8, weight_bits=8, deeploy_gemm=True,
              act_bytes=tokens * (2 * heads * head_dim + head_dim * head_dim))


def layer_static_ops(layer: LayerShape, hidden: int, tokens: int, act_bits: int, p: Platform,
                     idx: int) -> tuple[list[Op], list[Op]]:
    """Operators whose cost does not depend on the context: (attention-group ops, MLP-group ops).
    With integer activations, the kernels of Deeploy's integer graph (:func:`integer_graph`)."""
    cl = p.cluster
    a = act_bits / 8
    ga, gm = f"layers.{idx}.attn", f"layers.{idx}.mlp"
    q, kv = layer.n_heads * layer.head_dim, layer.n_kv_heads * layer.head_dim
    npu_a = p.npu.activation_bits
    ints = integer_graph(act_bits)
    q_pb, k_pb, v_pb, o_pb, gate_pb, up_pb, down_pb = layer_proj_bytes(layer, hidden)
    attn: list[Op] = [_eltwise("attn_norm", ga, tokens * hidden, cl.cycles_per_element_norm, 2 * a,
                                  (tokens, hidden), whole_last=True)]
    for pb in (q_pb, k_pb, v_pb):
        attn += _linear_ops(layer, pb, tokens, act_bits, ga, npu_a)
    if ints:
        attn += [_rope_matmul("rope_q", ga, tokens, layer.n_heads, layer.head_dim),
                 _rope_matmul("rope_k", ga, tokens, layer.n_kv_heads, layer.head_dim),
                 _scalar("transpose_q", ga, (tokens, q), p, 2 * a),
                 _scalar("transpose_v", ga, (tokens, kv), p, 2 * a)]
    else:
        attn.append(_eltwise("rope", ga, tokens * (q + kv), cl.cycles_per_element_rope, 2 * a, (tokens, q + kv)))
    attn += _linear_ops(layer, o_pb, tokens, act_bits, ga, npu_a)
    attn.append(_eltwise("attn_residual_add", ga, tokens * hidden, cl.cycles_per_element_add, 3 * a,
                         (tokens, hidden)))
    mlp: list[Op] = [_eltwise("mlp_norm", gm, tokens * hidden, cl.cycles_per_element_norm, 2 * a,
                               (tokens, hidden), whole_last=True)]
    for pb in (gate_pb, up_pb):
        mlp += _linear_ops(layer, pb, tokens, act_bits, gm, npu_a)
    inter = tokens * layer.intermediate
    if ints:  # RQSiHardswish, then Mul (int32 out, PULPMulBindings) and its RequantShift
        mlp += [_eltwise("act", gm, inter, cl.cycles_per_element_act, 2 * a, (tokens, layer.intermediate)),
                _scalar("mul", gm, (tokens, layer.intermediate), p, 2 * a + 4),
                _scalar("mul_requant", gm, (tokens, layer.intermediate), p, 4 + a)]
    else:
        mlp.append(_eltwise("act_mul", gm, inter, cl.cycles_per_element_act, 3 * a, (tokens, layer.intermediate)))
    mlp += _linear_ops(layer, down_pb, tokens, act_bits, gm, npu_a)
    mlp.append(_eltwise("mlp_residual_add", gm, tokens * hidden, cl.cycles_per_element_add, 3 * a,
                           (tokens, hidden)))
    return attn, mlp


def causal_pairs(tokens: int, attended: int) -> int:
    """(query, key) pairs the attention kernels compute when ``tokens`` new tokens attend to
    ``attended`` positions: the full ``tokens x attended`` score matrix, masked afterwards.

    Deeploy's MHSA kernels compute the whole matrix and mask it; counting only the causal half
    (P * (P + 1) / 2 in a prefill) raised the held-out error on the measured prefill rows from
    32% to 42% (docs/hwmodel.md), so the model follows the kernels, not the mathematics.
    """
    return tokens * attended


def layer_context_ops(layer: LayerShape, tokens: int, attended: int, act_bits: int, kv_bits: int,
                      p: Platform, idx: int, kv_stored_bits: float | None = None, rotate: bool = False) -> list[Op]:
    """Attention over the KV cache: scores, softmax, weighted sum (cost grows with ``attended``).

    Only the causal pairs are computed (``causal_pairs``): scores as batch x pairs dot products
    of length head_dim; the weighted sum as [tokens, attended] @ [attended, head_dim] with
    compute_density = pairs / (tokens * attended) (each output sums over its own prefix).
    ``kv_stored_bits``: bits moved per cached element, scales and zeros included (default ``kv_bits``).
    ``rotate``: each new query and key row is Hadamard-rotated first (a fast Walsh-Hadamard
    transform: log2(head_dim) butterfly stages of head_dim additions per row)."""
    a, k = act_bits / 8, (kv_bits if kv_stored_bits is None else kv_stored_bits) / 8
    h, hd, kvh = layer.n_heads, layer.head_dim, layer.n_kv_heads
    g = f"layers.{idx}.attn"
    kv_row = kvh * hd * k  # bytes of K (or V) for one position
    new_kv = int(math.ceil(tokens * kv_row))  # this pass writes its K (V) rows
    operand = max(act_bits, kv_bits)
    pairs = causal_pairs(tokens, attended)
    full = tokens * attended
    floating = act_bits >= 16
    scores = Op("attn_scores", ATTN, g, batch=h, tokens=1, inner=hd, outputs=pairs,
                operand_bits=operand, weight_bits=kv_bits, floating=floating,
                act_bytes=int(math.ceil((tokens * h * hd + h * pairs) * a)),
                kv_bytes=int(math.ceil(attended * kv_row)) + new_kv)
    softmax = _eltwise("softmax", g, h * pairs, p.cluster.cycles_per_element_softmax, 2 * a,
                       (h, tokens, attended) if pairs == full else (), whole_last=True)
    values = Op("attn_values", ATTN, g, batch=h, tokens=tokens, inner=attended, outputs=hd,
                operand_bits=operand, weight_bits=kv_bits, floating=floating,
                compute_density=pairs / full if full and pairs != full else 1.0,
                act_bytes=int(math.ceil((h * pairs + tokens * h * hd) * a)),
                kv_bytes=int(math.ceil(attended * kv_row)) + new_kv)
    rot = []
    if rotate:
        stages = max(1, int(math.log2(hd)))
        rot = [_eltwise("kv_rotate", g, tokens * (h + kvh) * hd * stages, p.cluster.cycles_per_element_add,
                        2 * a / stages)]
    if not integer_graph(act_bits):
        return [*rot, scores, softmax, values]
    # Deeploy's integer graph (integer_graph): K is transposed for the scores; with a cache, the new
    # K and V rows are concatenated onto it (Concat kernels) and the whole K is transposed again
    kv_el = kvh * hd
    if attended > tokens:
        k_ops = [_scalar("transpose_k", g, (tokens, kv_el), p, 2 * a),
                 _scalar("concat_k", g, (attended, kv_el), p, 2 * a),
                 _scalar("transpose_kt", g, (attended, kv_el), p, 2 * a),
                 _scalar("concat_v", g, (attended, kv_el), p, 2 * a)]
    else:  # no cache: the empty Concat is skipped and the two K transposes merge into one
        k_ops = [_scalar("transpose_k", g, (tokens, kv_el), p, 2 * a)]
    scored = h * pairs
    # the RQGEMMs as Deeploy's graph shapes them (source B's ONNX files: scores [h, tokens, hd] @
    # [h, hd, attended], values [h, tokens, attended] @ [h, attended, hd]); the full matrix is scored
    assert pairs == full, "Deeploy's integer attention scores the full tokens x attended matrix"
    scores = dataclasses.replace(scores, tokens=tokens, outputs=attended, deeploy_gemm=True)
    values = dataclasses.replace(values, deeploy_gemm=True)
    return [*rot, *k_ops, scores,
            _scalar("scale_div", g, (h, tokens, attended), p, 2 * a),
            _eltwise("mask_add", g, scored, p.cluster.cycles_per_element_add, 3 * a, (h, tokens, attended)),
            softmax,
            _scalar("softmax_requant", g, (h, tokens, attended), p, 2 * a),
            values,
            _scalar("transpose_o", g, (tokens, h * hd), p, 2 * a)]


def embedding_ops(shape: ModelShape, p: Platform, tokens: int) -> list[Op]:
    """The input lookup: one embedding row (values + its scales/zeros) per token, read from
    wherever the embedding is placed (its own group when untied, the shared one when tied). With
    wide rows (``TensorFormat.wide_rows``) every token is priced as one: an upper bound."""
    if not shape.vocab_size or tokens <= 0:
        return []
    fmt = shape.embedding_format
    v, s = matrix_bytes(1, shape.hidden, fmt)
    group = "embedding+lm_head" if shape.tie_word_embeddings else "embedding"
    a = shape.activation_bits / 8
    deq = shape.activation_bits >= 16 and fmt.quantized
    return [Op("embedding", ELTWISE, group, tokens=tokens, elements=tokens * shape.hidden,
               cycles_per_element=p.cluster.cycles_per_element_add,
               operand_bits=max(fmt.weight_bits, shape.activation_bits), weight_bits=fmt.weight_bits,
               dequant_weights=tokens * shape.hidden if deq else 0,
               dequant_groups=tokens * fmt.n_groups(shape.hidden, 1) if deq else 0,
               weight_bytes=tokens * (v + s), act_bytes=int(math.ceil(tokens * shape.hidden * a)))]


def head_ops(shape: ModelShape, p: Platform) -> list[Op]:
    """Final norm + lm_head for the last token (prefill only needs the last token's logits)."""
    a = shape.activation_bits / 8
    ops = [_eltwise("final_norm", "norms", shape.hidden, p.cluster.cycles_per_element_norm, 2 * a,
                    (1, shape.hidden), whole_last=True)]
    if shape.vocab_size:
        fmt = shape.head_format
        v, s = matrix_bytes(shape.vocab_size, shape.hidden, fmt)
        group = "embedding+lm_head" if shape.tie_word_embeddings else "lm_head"
        deq = shape.activation_bits >= 16 and fmt.quantized
        ops.append(Op("lm_head", LINEAR, group, tokens=1, inner=shape.hidden, outputs=shape.vocab_size,
                      operand_bits=max(fmt.weight_bits, shape.activation_bits), weight_bits=fmt.weight_bits,
                      floating=shape.activation_bits >= 16,
                      dequant_weights=shape.vocab_size * shape.hidden if deq else 0,
                      dequant_groups=fmt.n_groups(shape.hidden, shape.vocab_size) if deq else 0,
                      npu_ok=shape.activation_bits <= p.npu.activation_bits, weight_bytes=v + s,
                      deeploy_gemm=integer_graph(shape.activation_bits),
                      act_bytes=int(math.ceil((shape.hidden + shape.vocab_size) * a))))
    return ops


__all__ = ["Op", "OpCost", "op_cost", "cluster_compute_cycles", "npu_compute_cycles", "n_tiles",
           "layer_static_ops", "layer_context_ops", "head_ops", "embedding_ops", "causal_pairs",
           "dequant_cycles", "integer_graph", "deeploy_gemm_cycles", "deeploy_gemm_kernel"]
