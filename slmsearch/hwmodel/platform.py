"""A hardware platform as data: a YAML file loaded into frozen, validated dataclasses.

Every leaf of the YAML file is ``{value: X, source: "..."}`` or ``{value: X, assumed: "..."}``,
and every assumed value also states how far it may be off: ``range: [low, high]`` or
``uncertainty_pct: P`` (a sourced value may carry one too). ``Platform.ranges`` lists them; the
sensitivity table and the latency/energy ranges (sensitivity.py) move each value across its range.
A leaf the model does not read is rejected, so nothing is loaded but unused. Field names carry their unit (``size_bytes``, ``read_bw_bytes_per_cycle``, ``freq_hz``,
``energy_pj_per_byte``, ``*_cycles``). ``load_platform`` accepts dotted-key overrides that replace
any value before validation, e.g. ``{"memory.l3.read_bw_bytes_per_cycle": 2.0}``.
"""

from __future__ import annotations

import copy
import math
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slmsearch.errors import SlmsearchError

PLATFORM_DIR = Path(__file__).parent / "platforms"
LEVEL_KINDS = ("l1", "l2", "weight", "offchip")


@dataclass(frozen=True)
class MemoryLevel:
    name: str
    kind: str  # l1 | l2 | weight | offchip
    size_bytes: int
    reserved_bytes: int
    read_bw_bytes_per_cycle: float  # weight and offchip levels (l1/l2 traffic is priced by dma.*)
    energy_pj_per_byte: float
    access_latency_cycles: float = 0.0  # offchip only: first-word latency of one transfer

    @property
    def usable_bytes(self) -> int:
        return max(0, self.size_bytes - self.reserved_bytes)


@dataclass(frozen=True)
class Cluster:
    cores: int
    macs_per_cycle_per_core: tuple[tuple[int, float], ...]  # integer SIMD: (operand bits, MACs/cycle/core), ascending
    fp16_macs_per_cycle_per_core: float  # floating point (fp16 activations), smallFloat SIMD
    dequant_cycles_per_weight: float  # unpack + scale one packed low-bit weight to fp16 (weight-only quantization)
    kernel_overhead_cycles: float  # fixed cost of one kernel in the tiled flow (tile loop, DMA set-up, call)
    untiled_kernel_overhead_cycles: float  # fixed cost of one kernel in the untiled flow (operands in L2)
    fork_join_cycles: float
    output_overhead_cycles: float  # per output of a matmul outside Deeploy's integer graph (fp16)
    gemm_call_cycles: float  # per pulp_nn_linear / gemv call of Deeploy's RQGEMM kernels (row loop, call, barrier)
    gemm_pair_cycles: float  # per pair of outputs in those kernels (set-up, two requantizations, stores)
    gemm_pair_step_cycles: float  # per SIMD step over the inner dimension of a pair of outputs
    l2_access_slowdown: float
    cycles_per_element_add: float
    cycles_per_element_norm: float
    cycles_per_element_softmax: float
    cycles_per_element_act: float
    cycles_per_element_rope: float
    cycles_per_element_scalar: float  # Deeploy's scalar int8 element-wise kernels (requant, transpose, concat, mul, div)
    energy_pj_per_mac: float

    def macs_per_cycle(self, bits: int, floating: bool = False) -> float:
        """Peak MACs/cycle/core for operands of ``bits``: the narrowest integer SIMD width that holds
        them, or the fp16 rate when the operation is floating point (16-bit activations)."""
        if floating:
            return self.fp16_macs_per_cycle_per_core
        for b, macs in self.macs_per_cycle_per_core:
            if bits <= b:
                return macs
        return self.macs_per_cycle_per_core[-1][1]


@dataclass(frozen=True)
class Npu:
    enabled: bool
    min_weight_bits: int
    max_weight_bits: int
    activation_bits: int
    macs_per_cycle_8bit: float
    spatial_tokens: int
    job_overhead_cycles: float
    energy_pj_per_mac: float

    def macs_per_cycle(self, weight_bits: int) -> float:
        """Bit-serial weights: throughput scales with 8 / weight_bits."""
        return self.macs_per_cycle_8bit * 8.0 / max(weight_bits, self.min_weight_bits)


@dataclass(frozen=True)
class Dma:
    l2_l1_bw_bytes_per_cycle: float


@dataclass(frozen=True)
class Tiling:
    enabled: bool
    l1_budget_bytes: int
    double_buffering: bool
    tile_overhead_cycles: float


@dataclass(frozen=True)
class OperatingPoint:
    freq_hz: float
    background_power_w: float


@dataclass(frozen=True)
class Platform:
    name: str
    description: str
    operating_point: OperatingPoint
    levels: tuple[MemoryLevel, ...]  # fastest first
    cluster: Cluster
    npu: Npu
    dma: Dma
    tiling: Tiling
    provenance: tuple[tuple[str, str], ...]  # (dotted key, "source: ..." | "assumed: ..." | "override")
    ranges: tuple[tuple[str, float, float, float], ...] = ()  # (dotted key, value, low, high) of uncertain values
    path: str = ""  # the file it was loaded from
    overrides: tuple[tuple[str, float], ...] = ()  # what load_platform replaced

    def with_overrides(self, changes: dict[str, float]) -> Platform:
        """The same platform file loaded again with ``changes`` on top of this one's overrides."""
        return load_platform(self.path, {**dict(self.overrides), **changes})

    def assumed_ranges(self) -> tuple[tuple[str, float, float, float], ...]:
        """(key, value, low, high) of every assumed value whose range is not a single point and that
        was not overridden (an override is the user's number, not ours)."""
        over = dict(self.overrides)
        return tuple(r for r in self.ranges if r[2] != r[3] and r[0] not in over
                     and self.provenance_of(r[0]).startswith("assumed"))

    def level(self, name: str) -> MemoryLevel:
        for lv in self.levels:
            if lv.name == name:
                return lv
        raise SlmsearchError(f"platform {self.name} has no memory level {name!r}")

    def provenance_of(self, key: str) -> str:
        return dict(self.provenance).get(key, "")


# ---- loading -------------------------------------------------------------------------------

def _resolve(name_or_path: str | Path) -> Path:
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.is_file():
            raise SlmsearchError(f"platform file {str(p)!r} does not exist; give a YAML path or a packaged name")
        return p
    packaged = PLATFORM_DIR / f"{name_or_path}.yaml"
    if not packaged.is_file():
        names = sorted(x.stem for x in PLATFORM_DIR.glob("*.yaml"))
        raise SlmsearchError(f"unknown platform {str(name_or_path)!r}; use one of {names} or a YAML file path")
    return packaged


@functools.lru_cache(maxsize=32)
def _read_yaml(path: str, mtime_ns: int) -> Any:
    try:
        return yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as e:
        raise SlmsearchError(f"{path} is not valid YAML: {str(e).splitlines()[0]}") from None


def _leaves(node: Any, prefix: str, out: dict[str, dict[str, Any]], where: str) -> None:
    if isinstance(node, dict) and "value" in node:
        extra = set(node) - {"value", "source", "assumed", "range", "uncertainty_pct"}
        has = [k for k in ("source", "assumed") if k in node]
        if extra or len(has) != 1 or not str(node[has[0]]).strip():
            raise SlmsearchError(
                f"{where}: {prefix} must be {{value: ..., source: '...'}} or {{value: ..., assumed: '...'}}"
                f" with a non-empty reason, but got keys {sorted(node)}"
            )
        if "range" in node and "uncertainty_pct" in node:
            raise SlmsearchError(f"{where}: {prefix} has both range and uncertainty_pct; keep one")
        numeric = isinstance(node["value"], (int, float)) and not isinstance(node["value"], bool)
        if has[0] == "assumed" and numeric and "range" not in node and "uncertainty_pct" not in node:
            raise SlmsearchError(
                f"{where}: {prefix} is assumed, so it needs range: [low, high] or uncertainty_pct: P "
                f"(how far it may be off)"
            )
        out[prefix] = node
        return
    if isinstance(node, dict):
        for k, v in node.items():
            _leaves(v, f"{prefix}.{k}" if prefix else str(k), out, where)
        return
    raise SlmsearchError(f"{where}: {prefix} must be {{value: ..., source|assumed: '...'}}, but got {node!r}")


def _range_of(key: str, node: dict[str, Any], where: str) -> tuple[float, float] | None:
    """(low, high) of a leaf from ``range`` or ``uncertainty_pct``; None when it states neither."""
    v = node["value"]
    if "range" in node:
        r = node["range"]
        ok = isinstance(r, (list, tuple)) and len(r) == 2 and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in r)
        if not ok or not (r[0] <= v <= r[1]):
            raise SlmsearchError(f"{where}: {key}.range must be [low, high] with low <= value ({v}) <= high, "
                                 f"but got {r!r}")
        return float(r[0]), float(r[1])
    if "uncertainty_pct" in node:
        u = node["uncertainty_pct"]
        if isinstance(u, bool) or not isinstance(u, (int, float)) or not 0 <= u < 100:
            raise SlmsearchError(f"{where}: {key}.uncertainty_pct must be a number in [0, 100), but got {u!r}")
        return float(v) * (1 - u / 100), float(v) * (1 + u / 100)
    return None


class _Used(dict):
    """The leaves, remembering which keys the builder read (an unread leaf is an error)."""

    def __init__(self, *a: Any) -> None:
        super().__init__(*a)
        self.read: set[str] = set()

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str) and dict.__contains__(self, key):
            self.read.add(key)
            return True
        return False

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return dict.__getitem__(self, key)

    def get(self, key: str, default: Any = None) -> Any:  # type: ignore[override]
        if dict.__contains__(self, key):
            self.read.add(key)
        return dict.get(self, key, default)


def _num(leaves: dict[str, dict[str, Any]], key: str, where: str, *, kind: type = float,
         minimum: float | None = 0.0, strictly: bool = False) -> Any:
    if key not in leaves:
        raise SlmsearchError(f"{where}: missing field {key}; add it as {{value: ..., source|assumed: '...'}}")
    v = leaves[key]["value"]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise SlmsearchError(f"{where}: {key} must be a finite number, but got {v!r}")
    if kind is int:
        if float(v) != int(v):
            raise SlmsearchError(f"{where}: {key} must be an integer, but got {v!r}")
        v = int(v)
    else:
        v = float(v)
    if minimum is not None and (v < minimum or (strictly and v <= minimum)):
        rule = ">" if strictly else ">="
        raise SlmsearchError(f"{where}: {key} must be {rule} {minimum}, but got {v}")
    return v


def _flag(leaves: dict[str, dict[str, Any]], key: str, where: str) -> bool:
    v = _num(leaves, key, where, kind=int)
    if v not in (0, 1):
        raise SlmsearchError(f"{where}: {key} must be 0 or 1, but got {v}")
    return bool(v)


def load_platform(name_or_path: str | Path = "siracusa", overrides: dict[str, float] | None = None) -> Platform:
    """Load a packaged platform by name (``platforms/<name>.yaml``) or a YAML file by path.

    ``overrides`` maps dotted keys (as in the file) to new values; an unknown key is an error.
    """
    path = _resolve(name_or_path)
    where = str(path)
    raw = _read_yaml(str(path.resolve()), path.stat().st_mtime_ns)
    if not isinstance(raw, dict):
        raise SlmsearchError(f"{where}: a platform file is a mapping with name, operating_point, memory, ...")
    raw = copy.deepcopy(raw)
    name = str(raw.pop("name", path.stem))
    description = str(raw.pop("description", ""))
    leaves: dict[str, dict[str, Any]] = {}
    _leaves(raw, "", leaves, where)
    for key, value in (overrides or {}).items():
        if key not in leaves:
            raise SlmsearchError(
                f"unknown platform override key {key!r}; keys look like 'memory.l3.read_bw_bytes_per_cycle' "
                f"(see {where})"
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SlmsearchError(f"platform override {key}={value!r} must be a finite number (e.g. --set {key}=2)")
        leaves[key] = {"value": value, "source": f"override (file value {leaves[key]['value']!r})"}
    used = _Used(leaves)
    plat = _build(name, description, used, where)
    unused = sorted(set(leaves) - used.read)
    if unused:
        raise SlmsearchError(f"{where}: the model does not use {', '.join(unused)}; remove it from the file")
    ranges = []
    for key, node in leaves.items():
        r = _range_of(key, node, where)
        if r is not None:
            ranges.append((key, float(node["value"]), r[0], r[1]))
    import dataclasses

    return dataclasses.replace(plat, ranges=tuple(ranges), path=str(path),
                               overrides=tuple(sorted((overrides or {}).items())))


def _build(name: str, description: str, leaves: dict[str, dict[str, Any]], where: str) -> Platform:
    op = OperatingPoint(
        freq_hz=_num(leaves, "operating_point.freq_hz", where, strictly=True),
        background_power_w=_num(leaves, "operating_point.background_power_w", where),
    )
    level_names = list(dict.fromkeys(k.split(".")[1] for k in leaves if k.startswith("memory.")))
    if not level_names:
        raise SlmsearchError(f"{where}: missing section memory with at least an l2 level")
    levels = []
    for ln in level_names:
        p = f"memory.{ln}"
        kind = leaves.get(f"{p}.kind", {}).get("value")
        if kind not in LEVEL_KINDS:
            raise SlmsearchError(f"{where}: {p}.kind must be one of {LEVEL_KINDS}, but got {kind!r}")
        streamed = kind in ("weight", "offchip")  # l1/l2 traffic is priced by the cluster DMA
        levels.append(
            MemoryLevel(
                name=ln,
                kind=kind,
                size_bytes=_num(leaves, f"{p}.size_bytes", where, kind=int),
                reserved_bytes=_num(leaves, f"{p}.reserved_bytes", where, kind=int),
                read_bw_bytes_per_cycle=(_num(leaves, f"{p}.read_bw_bytes_per_cycle", where, strictly=True)
                                         if streamed else 0.0),
                energy_pj_per_byte=_num(leaves, f"{p}.energy_pj_per_byte", where),
                access_latency_cycles=(_num(leaves, f"{p}.access_latency_cycles", where)
                                       if kind == "offchip" else 0.0),
            )
        )
    kinds = [lv.kind for lv in levels]
    for k in ("l1", "l2"):
        if kinds.count(k) != 1:
            raise SlmsearchError(f"{where}: memory needs exactly one level of kind {k}, found {kinds.count(k)}")
    if kinds.count("offchip") > 1:
        raise SlmsearchError(f"{where}: memory has {kinds.count('offchip')} offchip levels; at most one is modelled")
    bits_keys = sorted(
        (int(k.rsplit("bits_", 1)[1]), k) for k in leaves if k.startswith("cluster.macs_per_cycle_per_core.bits_")
    )
    if not bits_keys:
        raise SlmsearchError(f"{where}: missing cluster.macs_per_cycle_per_core.bits_8 (and other widths)")
    macs = tuple((b, _num(leaves, k, where, strictly=True)) for b, k in bits_keys)
    c = "cluster."
    cluster = Cluster(
        cores=_num(leaves, c + "cores", where, kind=int, minimum=1),
        macs_per_cycle_per_core=macs,
        fp16_macs_per_cycle_per_core=_num(leaves, c + "fp16_macs_per_cycle_per_core", where, strictly=True),
        dequant_cycles_per_weight=_num(leaves, c + "dequant_cycles_per_weight", where),
        **{f: _num(leaves, c + f, where) for f in (
            "kernel_overhead_cycles", "untiled_kernel_overhead_cycles", "fork_join_cycles", "output_overhead_cycles",
            "gemm_call_cycles", "gemm_pair_cycles", "gemm_pair_step_cycles",
            "cycles_per_element_add", "cycles_per_element_norm", "cycles_per_element_softmax",
            "cycles_per_element_act", "cycles_per_element_rope", "cycles_per_element_scalar",
            "energy_pj_per_mac")},
        l2_access_slowdown=_num(leaves, c + "l2_access_slowdown", where, minimum=1.0),
    )
    n = "npu."
    if any(k.startswith(n) for k in leaves):
        npu = Npu(
            enabled=_flag(leaves, n + "enabled", where),
            min_weight_bits=_num(leaves, n + "min_weight_bits", where, kind=int, minimum=1),
            max_weight_bits=_num(leaves, n + "max_weight_bits", where, kind=int, minimum=1),
            activation_bits=_num(leaves, n + "activation_bits", where, kind=int, minimum=1),
            macs_per_cycle_8bit=_num(leaves, n + "macs_per_cycle_8bit", where, strictly=True),
            spatial_tokens=_num(leaves, n + "spatial_tokens", where, kind=int, minimum=1),
            job_overhead_cycles=_num(leaves, n + "job_overhead_cycles", where),
            energy_pj_per_mac=_num(leaves, n + "energy_pj_per_mac", where),
        )
    else:  # a platform without an NPU
        npu = Npu(False, 1, 0, 0, 1.0, 1, 0.0, 0.0)
    dma = Dma(l2_l1_bw_bytes_per_cycle=_num(leaves, "dma.l2_l1_bw_bytes_per_cycle", where, strictly=True))
    tiling = Tiling(
        enabled=_flag(leaves, "tiling.enabled", where),
        l1_budget_bytes=_num(leaves, "tiling.l1_budget_bytes", where, kind=int, minimum=1),
        double_buffering=_flag(leaves, "tiling.double_buffering", where),
        tile_overhead_cycles=_num(leaves, "tiling.tile_overhead_cycles", where),
    )
    l1 = next(lv for lv in levels if lv.kind == "l1")
    if tiling.l1_budget_bytes > l1.size_bytes:
        raise SlmsearchError(
            f"{where}: tiling.l1_budget_bytes ({tiling.l1_budget_bytes}) exceeds memory.{l1.name}.size_bytes "
            f"({l1.size_bytes}); lower the budget"
        )
    prov = tuple(
        (k, ("source: " + str(v["source"])) if "source" in v else ("assumed: " + str(v["assumed"])))
        for k, v in leaves.items()
    )
    return Platform(name, description, op, tuple(levels), cluster, npu, dma, tiling, prov)
