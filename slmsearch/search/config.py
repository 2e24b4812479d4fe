"""A study file (``studies/*.yaml``) as validated, frozen dataclasses; unknown keys are rejected.

Command-line flags override the file through :func:`with_overrides`. Every section maps onto one
dataclass; a value out of range names itself and the rule it broke.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from slmsearch.errors import SlmsearchError
from slmsearch.evals.settings import EvalSettings
from slmsearch.search.schema import check_section

if TYPE_CHECKING:  # compress.calib imports torch, which this module must not (it is imported lazily)
    from slmsearch.compress.calib import CalibSettings

STUDIES_DIR = Path(__file__).resolve().parents[2] / "studies"
SAMPLERS = ("nsga2", "tpe", "random")
DIRECTIONS = ("minimize", "maximize")
# Objective names: quality metrics from slmsearch.evals, or hardware-model outputs.
HW_OBJECTIVES = ("decode_latency_s", "energy_per_token_j", "footprint_mb", "decode_avg_latency_s", "prefill_latency_s")
# Deployment choices the hardware model prices (slmsearch.hwmodel.deployment); one value = not searched.
ACTIVATION_BITS = (16, 8)
WEIGHT_MEMORY_FIRST = ("layers", "lm_head")
KV_CACHE_LEVELS = ("l2", "l3")
GPTQ_BITS = (2, 3, 4, 8, 16)  # 16 = not quantized
GROUP_SIZES = (32, 64, 128, -1)  # -1 = one group per output channel
EMBEDDING_BITS = (16, 8, 4)
SCALE_BITS = (16, 8)  # how a GPTQ or embedding scale is stored (compress/stage.py SCALE_BITS)
EMBEDDING_GROUPS = (0, 32, 64, 128)  # 0 = one scale per row
KV_CACHE_BITS = (16, 8, 4)  # 16 = a float cache
KV_CACHE_GROUPS = (8, 16, 32, 64, 128)
WANDA_PATTERNS = ("none", "unstructured", "2:4", "4:8", "structured")
GB = 10**9  # bytes in a GB: sizes in a study file are decimal, as budget_mb's MB is 1e6 bytes
SEED_LIMIT = 2**32  # numpy's and Optuna's samplers take seeds in 0 .. 2**32 - 1
# Settings that do not change what a study's trials mean: a resumed study may change them (each
# change is recorded as a new run segment); any other change is refused (search/study.py).
RUN_KEYS = ("trials", "timeout_s", "storage", "cache_gb", "heartbeat_s", "grace_s", "data_dir", "trust_remote_code")


def _range(section: str, name: str, pair: Any, low: float, high: float) -> tuple[float, float]:
    if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
        raise SlmsearchError(f"{section}.{name} must be a [low, high] pair, got {pair!r}")
    lo, hi = pair
    if not lo <= hi:
        raise SlmsearchError(f"{section}.{name}: low <= high must hold, but got low={lo}, high={hi}")
    if lo < low or hi > high:
        raise SlmsearchError(f"{section}.{name} must lie within [{low}, {high}], got [{lo}, {hi}]")
    return (lo, hi)


def _choices(section: str, name: str, values: Any, allowed: tuple[Any, ...]) -> tuple[Any, ...]:
    if not isinstance(values, (list, tuple)) or not values:
        raise SlmsearchError(f"{section}.{name} must be a non-empty list, got {values!r}")
    for value in values:
        if value not in allowed:
            raise SlmsearchError(
                f"{section}.{name}: unsupported value {value!r}; supported: {', '.join(map(str, allowed))}"
            )
    return tuple(values)


@dataclass(frozen=True)
class SpaceConfig:
    """The search space, one entry per stage (the order of the stages is fixed)."""

    drop_layers: tuple[int, int] = (0, 12)  # depth pruning: layers dropped, inclusive range
    depth_score: str = "angular"  # which importance score picks them: angular | ppl
    wanda_patterns: tuple[str, ...] = ("none", "structured", "unstructured", "2:4")
    structured_fraction: tuple[float, float] = (0.0, 0.5)  # MLP channels removed (structured)
    kv_groups: tuple[int, int] = (0, 0)  # KV groups removed per layer (structured)
    unstructured_sparsity: tuple[float, float] = (0.1, 0.5)  # WANDA unstructured sparsity
    lora_ranks: tuple[int, ...] = (0, 4, 8, 16)  # LoRA recovery rank, 0 = none
    lora_steps: int = 10  # optimizer steps per recovery (about 2.5 s each on 2 cores)
    # the recovery's loss: kd (toward the dense model's next-token distribution) or lm (the text's tokens)
    lora_loss: tuple[str, ...] = ("kd",)
    # held-out windows for LoRA's before/after loss report; 0 = none: the trial's evaluation measures
    # quality, and 8 windows were ~7 s (4%) of a default trial on 2 cores (docs/benchmarks.md section 1)
    lora_heldout: int = 0
    gptq_bits: tuple[int, ...] = (2, 3, 4, 8, 16)  # 16 = no GPTQ
    group_sizes: tuple[int, ...] = (32, 64, 128)  # filtered to those dividing the model's dims
    act_order: tuple[bool, ...] = (False,)
    # gptqmodel's scale search norm (0 = plain min/max range): on SmolLM2-135M 3-bit g64, token ppl
    # x2.77 the dense model's without it, x1.85 with 2.4, at twice the GPTQ time (docs/benchmarks.md)
    gptq_mse: tuple[float, ...] = (2.4,)
    # how a GPTQ scale is stored: 8 = a code on a log2 grid per tensor (1.66 MB less than fp16 at
    # 3-bit g64 on SmolLM2-135M: about 4 more layers at 4 bits in 64 MB; docs/benchmarks.md), 16 = fp16
    gptq_scale_bits: tuple[int, ...] = (8,)
    eora_ranks: tuple[int, ...] = (0, 8, 16, 32)  # only with GPTQ
    embedding_bits: tuple[int, ...] = (16, 8, 4)
    # columns per 16-bit scale of a quantized embedding, 0 = one per row. On SmolLM2-135M at 4 bits,
    # token ppl x1.38 (per row), x1.21 (64), x1.16 (32) the dense model's (docs/benchmarks.md)
    embedding_groups: tuple[int, ...] = (32, 64)
    # the embedding's clipping search norm (0 = max-abs scales; kernels.rtn_codes)
    embedding_mse: tuple[float, ...] = (2.4,)
    # how a quantized embedding's scales are stored: 16 = fp16, 8 = codes on a log2 grid (0.44 MB
    # less at 4-bit g64 on SmolLM2-135M). Not the default: the minmax anchor's prior (anchors.py)
    # does not price wide rows, and with the room it frees prefers a float KV cache to them
    embedding_scale_bits: tuple[int, ...] = (16,)
    # the embedding's codes by GPTQ over the lm_head's inputs (compress/embedding.py): at 4-bit g64
    # x1.04 the dense token ppl instead of x1.16, ~60 s per new input model (docs/benchmarks.md)
    embedding_gptq: bool = True
    # the embedding's grid at 8 or 4 bits: "sym" (above) and/or "minmax" (an fp16 minimum beside each
    # group's scale, rounded to nearest: at 4-bit g32 x1.043 the dense token ppl on SmolLM2-135M
    # against x1.156 for the symmetric grid rounded; docs/benchmarks.md section 6)
    embedding_grids: tuple[str, ...] = ("sym", "minmax")
    # how the decoder Linears are quantized: "gptq" (gptq_bits, group_sizes, ... above) and/or "minmax"
    # (round-to-nearest, fp16 scale and minimum per group of minmax_group: compress/minmax.py; at 4-bit
    # g32 it re-quantizes SmolLM2-135M as shipped without loss, 5.0 bits a weight)
    layer_grids: tuple[str, ...] = ("gptq", "minmax")
    minmax_bits: tuple[int, ...] = (4,)
    minmax_group: int = 32
    # the KV cache's stored width (16 = float); quantized ones keep a 16-bit scale and zero per
    # kv_cache_group channels of each head's row (compress/kvcache.py)
    # kv_cache_group channels of each head's value row and kv_cache_key_group of its key row (keys have
    # outlier channels: at 4 bits, keys g16 + values g64 x1.030 the dense token ppl, both g32 x1.055,
    # both g64 x1.122, for 0.25 bits a value more than both g32; docs/benchmarks.md section 6)
    kv_cache_bits: tuple[int, ...] = (16, 8, 4)
    kv_cache_group: int = 64
    kv_cache_key_group: int = 16  # 0: kv_cache_group
    kv_cache_rotate: bool = False  # Hadamard-rotate each head's keys and values before rounding
    # mixed precision: the share of the layers the budget leaves room to widen (one GPTQ width up)
    # that a trial widens, chosen by sensitivity (compress/sensitivity.py); [0, 0] = uniform widths
    wider_fraction: tuple[float, float] = (0.0, 1.0)
    # the share of the room left after the layers are placed that a trial fills with 8-bit embedding
    # rows, the lowest token ids first (EmbeddingQuant.wide_rows; at 4-bit g32 minmax on SmolLM2-135M,
    # 16,384 rows take the embedding's cost from x1.061 to x1.007 on held-out windows); [0, 0] = none
    embedding_wide_fraction: tuple[float, float] = (0.0, 1.0)
    # deployment choices (priced by the hardware model; quality is the fp16 checkpoint's)
    activation_bits: tuple[int, ...] = (16,)  # 8 = integer activations: matrix work on N-EUREKA
    weight_memory_first: tuple[str, ...] = ("layers",)  # what fills the NPU weight memories first
    kv_cache_level: tuple[str, ...] = ("l2",)  # l2 (spills to l3) | l3

    def __post_init__(self) -> None:
        s = "space"
        object.__setattr__(self, "drop_layers", tuple(int(v) for v in _range(s, "drop_layers", self.drop_layers, 0, 1024)))
        if self.depth_score not in ("angular", "ppl"):
            raise SlmsearchError(f"space.depth_score must be 'angular' or 'ppl', got {self.depth_score!r}")
        object.__setattr__(self, "wanda_patterns", _choices(s, "wanda_patterns", self.wanda_patterns, WANDA_PATTERNS))
        object.__setattr__(self, "structured_fraction", _range(s, "structured_fraction", self.structured_fraction, 0.0, 0.9))
        object.__setattr__(self, "kv_groups", tuple(int(v) for v in _range(s, "kv_groups", self.kv_groups, 0, 64)))
        object.__setattr__(self, "unstructured_sparsity", _range(s, "unstructured_sparsity", self.unstructured_sparsity, 0.0, 0.95))
        object.__setattr__(self, "lora_ranks", _choices(s, "lora_ranks", self.lora_ranks, tuple(range(0, 1025))))
        object.__setattr__(self, "lora_loss", _choices(s, "lora_loss", self.lora_loss, ("lm", "kd")))
        if not 1 <= self.lora_steps <= 100_000:
            raise SlmsearchError(f"space.lora_steps must be an integer in 1..100000, got {self.lora_steps}")
        if not 0 <= self.lora_heldout <= 4096:
            raise SlmsearchError(f"space.lora_heldout must be 0 (no report) to 4096 windows, got {self.lora_heldout}")
        object.__setattr__(self, "gptq_bits", _choices(s, "gptq_bits", self.gptq_bits, GPTQ_BITS))
        object.__setattr__(self, "group_sizes", _choices(s, "group_sizes", self.group_sizes, GROUP_SIZES))
        object.__setattr__(self, "act_order", _choices(s, "act_order", self.act_order, (False, True)))
        object.__setattr__(self, "gptq_mse", _choices(s, "gptq_mse", self.gptq_mse, (0.0, 2.0, 2.4, 3.0)))
        object.__setattr__(self, "gptq_scale_bits", _choices(s, "gptq_scale_bits", self.gptq_scale_bits, SCALE_BITS))
        object.__setattr__(self, "eora_ranks", _choices(s, "eora_ranks", self.eora_ranks, tuple(range(0, 4097))))
        object.__setattr__(self, "embedding_bits", _choices(s, "embedding_bits", self.embedding_bits, EMBEDDING_BITS))
        object.__setattr__(self, "embedding_groups", _choices(s, "embedding_groups", self.embedding_groups, EMBEDDING_GROUPS))
        object.__setattr__(self, "embedding_mse", _choices(s, "embedding_mse", self.embedding_mse, (0.0, 2.0, 2.4, 3.0)))
        object.__setattr__(self, "embedding_scale_bits", _choices(s, "embedding_scale_bits", self.embedding_scale_bits, SCALE_BITS))
        object.__setattr__(self, "kv_cache_bits", _choices(s, "kv_cache_bits", self.kv_cache_bits, KV_CACHE_BITS))
        object.__setattr__(self, "wider_fraction", _range(s, "wider_fraction", self.wider_fraction, 0.0, 1.0))
        object.__setattr__(self, "embedding_wide_fraction",
                           _range(s, "embedding_wide_fraction", self.embedding_wide_fraction, 0.0, 1.0))
        for name in ("kv_cache_group", "kv_cache_key_group"):
            value = getattr(self, name)
            if value not in KV_CACHE_GROUPS and not (name == "kv_cache_key_group" and value == 0):
                raise SlmsearchError(
                    f"space.{name}: unsupported value {value!r}; supported: {', '.join(map(str, KV_CACHE_GROUPS))}"
                    + (" (or 0: the values' group)" if name == "kv_cache_key_group" else "")
                )
        from slmsearch.compress.minmax import MINMAX_BITS, MINMAX_GROUPS

        object.__setattr__(self, "embedding_grids", _choices(s, "embedding_grids", self.embedding_grids, ("sym", "minmax")))
        object.__setattr__(self, "layer_grids", _choices(s, "layer_grids", self.layer_grids, ("gptq", "minmax")))
        object.__setattr__(self, "minmax_bits", _choices(s, "minmax_bits", self.minmax_bits, MINMAX_BITS))
        if self.minmax_group not in MINMAX_GROUPS:
            raise SlmsearchError(f"space.minmax_group: unsupported value {self.minmax_group!r}; "
                                 f"supported: {', '.join(map(str, MINMAX_GROUPS))}")
        if not isinstance(self.embedding_gptq, bool):
            raise SlmsearchError(f"space.embedding_gptq must be true or false, got {self.embedding_gptq!r}")
        if not isinstance(self.kv_cache_rotate, bool):
            raise SlmsearchError(f"space.kv_cache_rotate must be true or false, got {self.kv_cache_rotate!r}")
        object.__setattr__(self, "activation_bits", _choices(s, "activation_bits", self.activation_bits, ACTIVATION_BITS))
        object.__setattr__(self, "weight_memory_first",
                           _choices(s, "weight_memory_first", self.weight_memory_first, WEIGHT_MEMORY_FIRST))
        object.__setattr__(self, "kv_cache_level", _choices(s, "kv_cache_level", self.kv_cache_level, KV_CACHE_LEVELS))


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str

    def __post_init__(self) -> None:
        from slmsearch.evals.settings import METRICS

        if self.metric not in METRICS + HW_OBJECTIVES:
            raise SlmsearchError(
                f"unknown objective metric {self.metric!r}; known: {', '.join(METRICS + HW_OBJECTIVES)}"
            )
        if self.direction not in DIRECTIONS:
            raise SlmsearchError(f"objective direction must be minimize or maximize, got {self.direction!r}")


@dataclass(frozen=True)
class PruningConfig:
    """When a trial is stopped after its first token-perplexity windows: its early perplexity is
    over ``max_ppl_ratio`` x the best early perplexity of the study's feasible evaluated trials so
    far, or (always) over ``max_baseline_ratio`` x the uncompressed baseline's (a broken model).
    Relative to the feasible trials, not the baseline alone: under a tight budget every feasible
    plan is far worse than the baseline (SmolLM2 at 64 MB: ~9x), and would all be pruned."""

    first_windows: int = 2  # token-ppl windows scored before the pruning decision
    max_ppl_ratio: float = 6.0  # x the best early token ppl among feasible evaluated trials so far
    max_baseline_ratio: float = 100.0  # x the baseline's early token ppl: pruned whatever the study holds

    def __post_init__(self) -> None:
        if self.first_windows < 1 or self.max_ppl_ratio <= 1.0 or self.max_baseline_ratio <= 1.0:
            raise SlmsearchError(
                "pruning needs first_windows >= 1, max_ppl_ratio > 1 and max_baseline_ratio > 1, got "
                f"{self.first_windows}, {self.max_ppl_ratio}, {self.max_baseline_ratio}"
            )


@dataclass(frozen=True)
class ScreeningConfig:
    """Cheap fidelity first (``search/screening.py``): candidates are scored by the proxy
    (``compress/proxy.py``: round-to-nearest in place of GPTQ, no LoRA/EoRA, seconds each) and only
    the one predicted to add most to the front is compressed and evaluated. ``enabled: false`` is
    the search without screening (every sampled plan evaluated)."""

    enabled: bool = True
    # a screen costs 14-70 s on the default study (depth/WANDA/sensitivity on first use), a full trial
    # 200-240 s: 6 first and 3 per trial keep screening near a third of a study's time; on the replay
    # grid 3 per trial reach 95% of the hypervolume in a median 10 full evaluations over 5 seeds (the
    # knee first, the best predicted second; 10.5 over 10 seeds, against 14 at 2 per trial; docs/benchmarks.md
    # section 9)
    first: int = 6  # candidates screened before the first promoted trial (the anchors among them)
    per_trial: int = 3  # more screened before each later one
    extra_rounds: int = 3  # rounds of per_trial more when no candidate is predicted to improve the front
    windows: int = 0  # token-ppl windows the proxy scores; 0 = pruning.first_windows (the same windows)
    # share of each round's screens that are one-step neighbours of the predicted front (the rest
    # the sampler proposes); on the replay grid at 6 / 2, before the optimism credit, 0.5 reached 95%
    # in 12 full evaluations, 1.0 in 14 and 0 in 19 (docs/benchmarks.md section 9)
    neighbour_share: float = 0.5

    def __post_init__(self) -> None:
        if self.first < 1 or self.per_trial < 0 or self.extra_rounds < 0 or self.windows < 0:
            raise SlmsearchError(
                "screening needs first >= 1, per_trial >= 0, extra_rounds >= 0 and windows >= 0, got "
                f"{self.first}, {self.per_trial}, {self.extra_rounds}, {self.windows}"
            )
        if not 0.0 <= float(self.neighbour_share) <= 1.0:
            raise SlmsearchError(
                f"screening.neighbour_share must be between 0 and 1, got {self.neighbour_share}; "
                "0.5 proposes half of each round's screens next to the predicted front"
            )


@dataclass(frozen=True)
class StudyConfig:
    name: str = "smollm2-135m-siracusa"
    model: str | None = None  # None = the default SmolLM2-135M-Instruct
    data_dir: str | None = None  # None = $SLMSEARCH_DATA_DIR
    platform: str = "siracusa"  # packaged platform name or a YAML path
    platform_overrides: dict[str, float] = field(default_factory=dict)
    budget_mb: float = 64.0  # deployed footprint limit, MB = 1e6 bytes
    context_len: int = 512  # KV-cache length for memory and decode latency
    prefill_len: int = 0  # prompt length priced as prefill_latency_s (its activations count in the footprint)
    objectives: tuple[Objective, ...] = (
        Objective("wikitext_word_ppl", "minimize"),
        Objective("triviaqa_exact_match", "maximize"),
        Objective("decode_latency_s", "minimize"),
    )
    space: SpaceConfig = SpaceConfig()
    # calibration windows of every stage; a study file's section starts from CalibSettings' defaults
    calibration: CalibSettings = field(default_factory=lambda: calibration_from({"n_samples": 16, "seqlen": 256, "seed": 0}))
    # what each trial evaluates; metrics () = the objectives' quality metrics + wikitext_token_ppl (drives pruning)
    evaluation: EvalSettings = EvalSettings(metrics=())
    pruning: PruningConfig = PruningConfig()
    screening: ScreeningConfig = ScreeningConfig()
    sampler: str = "nsga2"
    population_size: int = 8  # NSGA-II generation size
    anchors: bool = True  # enqueue feasible anchor plans after the baseline (search/anchors.py)
    seed: int = 0
    trials: int = 8  # evaluated trials (over-budget rejections are extra and cost < 1 s each)
    timeout_s: float | None = None
    storage: str | None = None  # None = sqlite:///<runs dir>/<name>.db
    cache_gb: float = 20.0  # stage-cache bound (LRU), GB = 1e9 bytes
    heartbeat_s: int = 10  # a running trial's heartbeat period
    grace_s: int = 30  # a trial silent this long (its worker died) is marked FAILED and retried
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.budget_mb, (int, float)) or not math.isfinite(self.budget_mb) or self.budget_mb <= 0:
            raise SlmsearchError(f"budget must be a positive number of MB, got {self.budget_mb!r}; e.g. --budget-mb 64")
        if self.sampler not in SAMPLERS:
            raise SlmsearchError(f"unknown sampler {self.sampler!r}; choose one of {', '.join(SAMPLERS)}")
        if self.trials < 1:
            raise SlmsearchError(f"trials (--trials) must be an integer >= 1, got {self.trials}")
        if self.timeout_s is not None and not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise SlmsearchError(
                f"timeout_s (--timeout) must be a positive number of seconds, or null for none, got {self.timeout_s!r}"
            )
        if self.population_size < 2:
            raise SlmsearchError(f"population_size must be an integer >= 2 (NSGA-II's generation size), got {self.population_size}")
        if not 0 <= self.seed < SEED_LIMIT:
            raise SlmsearchError(f"seed (--seed) must be an integer in 0..{SEED_LIMIT - 1}, got {self.seed}")
        if not math.isfinite(self.cache_gb) or self.cache_gb <= 0:
            raise SlmsearchError(f"cache_gb must be a positive number of GB (1e9 bytes), got {self.cache_gb!r}")
        if not self.name:
            raise SlmsearchError("name (--study-name) must be a non-empty string")
        if not self.platform:
            raise SlmsearchError("platform (--platform) must name a platform or a YAML file, got ''")
        if not self.objectives:
            raise SlmsearchError("a study needs at least one objective")
        if self.heartbeat_s < 1 or self.grace_s <= self.heartbeat_s:
            raise SlmsearchError(
                f"need heartbeat_s >= 1 and grace_s > heartbeat_s, got {self.heartbeat_s} and {self.grace_s}"
            )
        if not 0 <= self.prefill_len <= self.context_len:
            raise SlmsearchError(f"prefill_len must be in 0..context_len ({self.context_len}), got {self.prefill_len}")
        if self.prefill_len == 0 and any(o.metric == "prefill_latency_s" for o in self.objectives):
            raise SlmsearchError("objective prefill_latency_s needs a prompt length: set prefill_len (e.g. 64)")
        if self.context_len < 1:
            raise SlmsearchError(f"context_len must be >= 1, got {self.context_len}")
        wanted = [o.metric for o in self.objectives if o.metric not in HW_OBJECTIVES]
        if not self.evaluation.metrics:
            metrics = tuple(dict.fromkeys(["wikitext_token_ppl", *wanted]))  # token ppl drives pruning
            object.__setattr__(self, "evaluation", dataclasses.replace(self.evaluation, metrics=metrics))
        missing = [m for m in wanted if m not in self.evaluation.metrics]
        if missing:
            raise SlmsearchError(
                f"evaluation.metrics must include every quality objective; add {', '.join(missing)} or leave metrics out"
            )

    @property
    def directions(self) -> list[str]:
        return [o.direction for o in self.objectives]

    @property
    def cache_bytes(self) -> int:
        """The stage cache's bound in bytes."""
        return int(self.cache_gb * GB)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["objectives"] = [dataclasses.asdict(o) for o in self.objectives]
        return out


def calibration_from(raw: dict[str, Any] | None) -> CalibSettings:
    """A ``calibration`` section (or a stored one) as CalibSettings: missing keys take its
    defaults; unknown keys and values of the wrong type are rejected by name."""
    from slmsearch.compress.calib import CalibSettings

    return CalibSettings(**check_section("calibration", {} if raw is None else raw, CalibSettings))


def evaluation_from(raw: dict[str, Any] | None) -> EvalSettings:
    """An ``evaluation`` section (or a stored one) as EvalSettings: missing keys take its
    defaults, except ``metrics``, which the study's objectives decide unless the section names
    them; unknown keys and values of the wrong type are rejected by name."""
    return EvalSettings.from_dict({"metrics": (), **check_section("evaluation", {} if raw is None else raw, EvalSettings)})


_SECTIONS = ("space", "pruning", "screening", "objectives", "calibration", "evaluation")


def _objectives(raw: Any) -> tuple[Objective, ...]:
    if not isinstance(raw, (list, tuple)) or not raw:
        raise SlmsearchError(
            f"objectives must be a non-empty list of {{metric: ..., direction: ...}} mappings, got {raw!r}"
        )
    return tuple(Objective(**check_section("objectives", item, Objective)) for item in raw)


def _build(raw: dict[str, Any]) -> StudyConfig:
    """A StudyConfig from a study file's mapping: every section, key and type checked
    (:mod:`slmsearch.search.schema`), then every range (the dataclasses' own checks)."""
    top = {k: v for k, v in raw.items() if k not in _SECTIONS}
    data: dict[str, Any] = check_section("", top, StudyConfig, localns={"CalibSettings": Any})
    if "space" in raw:
        data["space"] = SpaceConfig(**check_section("space", {} if raw["space"] is None else raw["space"], SpaceConfig))
    if "pruning" in raw:
        data["pruning"] = PruningConfig(**check_section("pruning", {} if raw["pruning"] is None else raw["pruning"], PruningConfig))
    if "screening" in raw:
        data["screening"] = ScreeningConfig(**check_section("screening", {} if raw["screening"] is None else raw["screening"],
                                                            ScreeningConfig))
    if "objectives" in raw:
        data["objectives"] = _objectives(raw["objectives"])
    if "calibration" in raw:
        data["calibration"] = calibration_from(raw["calibration"])
    if "evaluation" in raw:
        data["evaluation"] = evaluation_from(raw["evaluation"])
    return StudyConfig(**data)


def load_study_config(path_or_name: str | Path | None = None) -> StudyConfig:
    """A study from a YAML path or a name in ``studies/`` (default: ``studies/default.yaml``)."""
    if path_or_name is None:
        path = STUDIES_DIR / "default.yaml"
        if not path.is_file():  # an installed (non-editable) package: the built-in defaults
            return StudyConfig()
    else:
        path = Path(path_or_name)
        if not path.exists() and (STUDIES_DIR / f"{path_or_name}.yaml").exists():
            path = STUDIES_DIR / f"{path_or_name}.yaml"
    if not path.is_file():
        raise SlmsearchError(f"study file {str(path)!r} not found; pass a YAML path or a name from studies/")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise SlmsearchError(f"study file {str(path)!r} is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise SlmsearchError(f"study file {str(path)!r} must hold a mapping of keys")
    return _build(raw)


def changed_settings(before: Any, after: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """The settings (dotted keys, e.g. ``space.lora_steps``) whose values differ between two stored
    configs (``StudyConfig.to_dict`` after a JSON round trip). A key that only one side holds (a
    setting added or removed by another version of slmsearch) is not a change."""
    if isinstance(before, dict) and isinstance(after, dict):
        out: list[tuple[str, Any, Any]] = []
        for key in before:
            if key in after:
                out += changed_settings(before[key], after[key], f"{prefix}{key}.")
        return out
    return [] if before == after else [(prefix.rstrip("."), before, after)]


def with_overrides(config: StudyConfig, **flags: Any) -> StudyConfig:
    """The config with every flag that is not None replacing its field (validated again)."""
    changes = {k: v for k, v in flags.items() if v is not None}
    if not changes:
        return config
    raw = config.to_dict()
    raw.update(changes)
    return _build(raw)
