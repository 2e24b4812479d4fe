"""How long the study will take on this machine: the estimate printed before the first trial.

Two probes run before a study starts, on this machine and the study's own model:
:func:`forward_seconds` times one forward pass (float32, as evaluation runs it; one window of the
evaluation's length), and :func:`gptq_stage_seconds` times the real GPTQ stage on copies of the
model cut to one and to two decoder layers, at the space's scale search: the difference is one more
layer, the rest is paid once per stage (loading, packing, saving, the scale codes). The forward
pass scales the evaluation, LoRA and screening costs measured on the reference machine; the GPTQ
probe prices GPTQ and EoRA directly, because their speed does not follow the forward pass from one
CPU to another (an Intel Xeon with AMX ran the forward pass at x0.96 the reference's but GPTQ at
~x1.7). :func:`trial_seconds` combines them for one compressed trial; after each trial the study
re-estimates from this machine's measured trials.
"""

from __future__ import annotations

import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# One forward pass of SmolLM2-135M-Instruct over 1 x 512 tokens in float32 on the reference machine
# (2 AMD EPYC cores with avx512_bf16, torch 2.13.0+cpu, idle): forward_seconds(reps=5) three times
# on 2026-12-02 gave 1.49, 1.22 and 1.26 s; the median.
REFERENCE_FORWARD_S = 1.26
REFERENCE_SEQLEN = 512
REFERENCE_MACHINE = "2 AMD EPYC cores"


def forward_seconds(location: str, *, seqlen: int = REFERENCE_SEQLEN, reps: int = 3,
                    trust_remote_code: bool = False) -> float:
    """Median seconds of one forward pass of the model at ``location`` over ``seqlen`` tokens, after
    one warm-up pass."""
    import torch

    from slmsearch.models import load_model

    model, _ = load_model(location, trust_remote_code=trust_remote_code)
    ids = torch.randint(0, model.config.vocab_size, (1, seqlen), generator=torch.Generator().manual_seed(0))
    times = []
    with torch.no_grad():
        model(ids)  # warm-up: first-call allocations and kernel selection
        for _ in range(reps):
            start = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - start)
    del model
    return statistics.median(times)


def speed_factor(seconds: float, seqlen: int = REFERENCE_SEQLEN) -> float:
    """How many times the reference machine's time for the default model this machine needs for
    its model (``seconds`` over ``seqlen`` tokens, scaled to the reference's length)."""
    return max(seconds * REFERENCE_SEQLEN / max(seqlen, 1) / REFERENCE_FORWARD_S, 1e-3)


@dataclass(frozen=True)
class Probe:
    """What the probes measured on this machine before a study."""

    forward_s: float  # one forward pass over ``seqlen`` tokens
    seqlen: int
    factor: float  # this machine's time per token / the reference machine's (default model)
    gptq_layer_s: float | None = None  # the GPTQ stage's seconds per decoder layer; None: the space has no GPTQ
    gptq_fixed_s: float = 0.0  # the GPTQ stage's seconds paid once, whatever the layers


def probe(config: Any, location: str, data_dir: Path | None = None, space: Any = None) -> Probe:
    """Time one evaluation window's forward pass (at most the model's positions; the factor is per
    token) and, when ``space`` (default ``config.space``) quantizes layers and ``data_dir`` is
    given, the GPTQ stage on one and two decoder layers."""
    from slmsearch.search.hardware import max_positions

    seqlen, limit = config.evaluation.token_seqlen or REFERENCE_SEQLEN, max_positions(location)
    seqlen = min(seqlen, limit) if limit else seqlen
    seconds = forward_seconds(location, seqlen=seqlen, trust_remote_code=config.trust_remote_code)
    space = space if space is not None else config.space
    layer_s, fixed_s = None, 0.0
    if data_dir is not None and any(b != 16 for b in space.gptq_bits):
        layer_s, fixed_s = gptq_stage_seconds(location, data_dir, config.calibration, space=space)
    return Probe(seconds, seqlen, speed_factor(seconds, seqlen), layer_s, fixed_s)


# (location, settings) -> (per layer, per stage): a study resumed in the same process (and the
# tests' many studies of one tiny model) probe GPTQ once
_GPTQ_PROBES: dict[tuple[Any, ...], tuple[float, float]] = {}

# the second layer's seconds are at least this share of the one-layer run's: the two runs' noise
# can leave their difference near zero, and the 30 layers of a trial multiply it
MIN_LAYER_SHARE = 0.1


def split_stage_seconds(one: float, two: float) -> tuple[float, float]:
    """Seconds per decoder layer and seconds paid once, from the GPTQ stage's seconds on one and on
    two decoder layers."""
    layer = max(two - one, MIN_LAYER_SHARE * one)
    return layer, max(one - layer, 0.0)


def gptq_stage_seconds(location: str, data_dir: Path, calib: Any, *, space: Any) -> tuple[float, float]:
    """Seconds per decoder layer and seconds paid once per stage of the real GPTQ stage (gptqmodel:
    load, quantize, pack, save; the scale codes), from the model at ``location`` cut to its first
    decoder layer (twice: the first run warms up) and to its first two, at the space's widest scale
    search, its 8-bit scale codes when it searches them, 4 bits (3 when 4 is not searched) and its
    first group size that divides the model. A one-layer model has no second layer to time: all its
    seconds count per layer."""
    from slmsearch.compress import pipeline
    from slmsearch.compress.depth import DepthPrune
    from slmsearch.compress.gptq import Gptq
    from slmsearch.compress.plan import Plan
    from slmsearch.search.space import base_dims, valid_group_sizes

    shape = pipeline.model_geometry(location)
    bits = 4 if 4 in space.gptq_bits else min(b for b in space.gptq_bits if b != 16)
    group = valid_group_sizes(space, base_dims(shape))[0]
    mse = float(max(space.gptq_mse))
    scale_bits = int(min(space.gptq_scale_bits))
    key = (str(location), str(data_dir), bits, group, mse, scale_bits, tuple(sorted(calib.key().items())))
    if key not in _GPTQ_PROBES:
        n = len(shape.layers)
        gptq = Gptq(bits=bits, group_size=group, mse=mse, scale_bits=scale_bits)

        def timed(layers: int) -> float:
            cut = (DepthPrune(indices=tuple(range(layers, n))),) if n > layers else ()
            result = pipeline.run(Plan(cut + (gptq,)), location, Path(data_dir), calib)
            try:
                return next(r.seconds for r in result.reports if r.name == "gptq")
            finally:
                shutil.rmtree(result.checkpoint_dir, ignore_errors=True)

        one = timed(1)
        if n > 1:
            # the first run, the process's first GPTQ stage, also warmed gptqmodel's loading and saving
            # (2.8 s on the AVX2 EPYC, which would come off the second layer): time one layer again
            one = timed(1)
            _GPTQ_PROBES[key] = split_stage_seconds(one, timed(2))
        else:
            _GPTQ_PROBES[key] = (one, 0.0)
    return _GPTQ_PROBES[key]


def describe(probe: Probe) -> str:
    """The estimate's basis, for the study's first line."""
    text = (f"x{probe.factor:.2f} (this machine's forward pass of the model: {probe.forward_s:.2f} s for {probe.seqlen} "
            f"tokens; the reference machine's for the default model: {REFERENCE_FORWARD_S:.2f} s, {REFERENCE_MACHINE})")
    if probe.gptq_layer_s is not None:
        text += f"; GPTQ {probe.gptq_layer_s:.1f} s per decoder layer + {probe.gptq_fixed_s:.1f} s per stage here"
    return text


# Stage and evaluation costs of the default study in reference-machine seconds (this machine's
# seconds / the forward-pass factor). Re-measured from `make demo` on a 2-core Intel Xeon with AMX
# (forward-pass factor x0.96, GPTQ probe 6.9-8.1 s per layer at 4-bit g64, scale search 2.4),
# 2026-12-03, four compressed trials and 18 screens (docs/benchmarks.md section 9):
TRIAL_OVERHEAD_S = 5.0  # loading, hashing, the hardware model: a trial's seconds less its stages and evaluation
WINDOW_S = 3.0  # one token-perplexity window of 512 tokens (8-25 s for 4, lm-eval's set-up included)
PAGE_S = 5.5  # one word-perplexity page (7.8-15 s for 2)
QUESTION_S = 0.9  # one TriviaQA question, 5 shots (9.7-85.5 s for 50: a pruned model's answers run long)
LORA_S = 5.0  # LoRA's set-up, then
LORA_STEP_S = 3.5  # per step (34-47 s for 10)
EMBEDDING_GPTQ_S = 65.0  # the embedding's codes by GPTQ, once per new input model (64-65 s)
SCREEN_S = 50.0  # one proxy screen (6-108 s, mean 50 over 18)
# GPTQ and EoRA per kept layer in units of the probe's seconds per layer (the GPTQ stage on two
# layers less on one). From `make demo` on an AVX2 AMD EPYC, 2026-12-04 (docs/benchmarks.md section
# 7): the two-layer run's second layer took 6.0 s; the seven trials' GPTQ took 4.8-9.5 s per kept
# layer (mean x1.13 that; groups of 32 and 4-bit rows cost the most), EoRA r16 3.45 s (x0.57, one
# trial). There the one-layer probe of earlier sessions (11.9 s, its once-paid part included) had
# priced a 30-layer stage at ~385 s where it took 143-178 s, and a one-layer run without the
# warm-up before it came out 2.8 s slower than warm, all of it off the second layer's seconds.
GPTQ_PER_PROBE = 1.1
EORA_PER_PROBE = 0.57
# EoRA's adapters cost bytes a 64 MB plan rarely has: the two demos promoted a plan with EoRA in 2 of
# 11 compressed trials, where 3 of the space's 4 ranks have one; its share of the space is scaled by this
EORA_PROMOTED = 0.25
# the probe on the reference machine is not known: without one, a GPTQ layer is this many
# reference seconds (the Intel Xeon's one-layer probe over its forward-pass factor, once-paid part included)
REFERENCE_GPTQ_LAYER_S = 7.7


def evaluation_seconds(config: Any) -> float:
    """Reference seconds of one trial's evaluation (the study's windows, pages and questions)."""
    e = config.evaluation
    return WINDOW_S * (e.token_windows or 580) + PAGE_S * (e.word_pages or 62) + QUESTION_S * (e.triviaqa_limit or 1900)


def baseline_seconds(config: Any, probe: Probe) -> float:
    """This machine's seconds for the baseline trial: nothing compressed, evaluation only."""
    return (TRIAL_OVERHEAD_S + evaluation_seconds(config)) * probe.factor


def _share(values: Any, used: Any) -> float:
    values = list(values)
    return sum(bool(used(v)) for v in values) / len(values) if values else 0.0


def screens_per_trial(config: Any) -> float:
    """Screens per compressed trial over the study: ``first`` before the first promotion, then
    ``per_trial`` before each (the extra rounds, taken only when no candidate is worth a trial, left out)."""
    s = config.screening
    if not s.enabled:
        return 0.0
    compressed = max(1, config.trials - 1)  # the baseline is one of the trials
    return (s.first + s.per_trial * (compressed - 1)) / compressed


def screen_seconds(probe: Probe) -> float:
    """This machine's seconds for one proxy screen."""
    return SCREEN_S * probe.factor


def compressed_seconds(config: Any, probe: Probe, *, space: Any = None, n_layers: int = 30) -> float:
    """This machine's seconds for one compressed trial of ``space`` (default ``config.space``; pass
    the budget-filtered one) on a model of ``n_layers`` decoder layers, its screens not included:
    each stage's cost times the share of the space's choices that run it (GPTQ: its once-paid part
    and its seconds per kept layer)."""
    space = space if space is not None else config.space
    f = probe.factor
    layer_s = probe.gptq_layer_s if probe.gptq_layer_s is not None else REFERENCE_GPTQ_LAYER_S * f
    lo, hi = space.drop_layers
    kept = max(1.0, n_layers - (lo + hi) / 2)
    gptq = _share(space.gptq_bits, lambda b: b != 16)
    eora = gptq * _share(space.eora_ranks, lambda r: r > 0) * EORA_PROMOTED
    lora = _share(space.lora_ranks, lambda r: r > 0)
    embedding = _share(space.embedding_bits, lambda b: b != 16) if space.embedding_gptq else 0.0
    reference = (TRIAL_OVERHEAD_S + evaluation_seconds(config) + lora * (LORA_S + LORA_STEP_S * space.lora_steps)
                 + embedding * EMBEDDING_GPTQ_S * 0.5)  # about half the trials bring a new input model
    return (reference * f + gptq * (probe.gptq_fixed_s + GPTQ_PER_PROBE * layer_s * kept)
            + eora * EORA_PER_PROBE * layer_s * kept)


def trial_seconds(config: Any, probe: Probe, *, space: Any = None, n_layers: int = 30) -> float:
    """:func:`compressed_seconds` with the trial's share of the screens."""
    return (compressed_seconds(config, probe, space=space, n_layers=n_layers)
            + screens_per_trial(config) * screen_seconds(probe))


def study_seconds(config: Any, probe: Probe, remaining: int, *, baseline_done: bool, space: Any = None,
                  n_layers: int = 30) -> float:
    """This machine's seconds for the ``remaining`` trials: the baseline (when not yet done) and the
    compressed trials."""
    if remaining <= 0:
        return 0.0
    compressed = remaining if baseline_done else remaining - 1
    base = 0.0 if baseline_done else baseline_seconds(config, probe)
    return base + compressed * trial_seconds(config, probe, space=space, n_layers=n_layers)


def screens_due(config: Any, *, promoted: int, screened: int, promotions: int) -> int:
    """Screens the schedule runs before the next ``promotions`` promotions, when ``promoted`` trials
    were promoted and ``screened`` screens ran (``screen_runner.promote``'s schedule, extra rounds aside)."""
    s = config.screening
    if not s.enabled or promotions <= 0:
        return 0
    return max(0, s.first + s.per_trial * (promoted + promotions - 1) - screened)


@dataclass(frozen=True)
class Formula:
    """The formula's seconds on this machine (from the probes), before any trial was measured."""

    baseline_s: float
    compressed_s: float  # a compressed trial's stages and evaluation
    screen_s: float  # one proxy screen


def formula(config: Any, probe: Probe, *, space: Any = None, n_layers: int = 30) -> Formula:
    return Formula(baseline_seconds(config, probe), compressed_seconds(config, probe, space=space, n_layers=n_layers),
                   screen_seconds(probe))


@dataclass
class Measured:
    """What this worker measured so far: each trial's seconds (its screens apart) and whether it was
    the baseline; how many screens ran, in how many seconds."""

    trials: list[tuple[bool, float]] = field(default_factory=list)
    screens: int = 0
    screen_s: float = 0.0

    def compressed_s(self, formula: Formula) -> float:
        """The mean of the compressed trials measured (the baseline compresses nothing: it is not
        representative); before one was measured, the formula's."""
        done = [s for baseline, s in self.trials if not baseline]
        return sum(done) / len(done) if done else formula.compressed_s

    def per_screen_s(self, formula: Formula) -> float:
        return self.screen_s / self.screens if self.screens else formula.screen_s


def seconds_left(measured: Measured, formula: Formula, *, compressed: int, baseline: bool, screens: int) -> float:
    """Seconds for ``compressed`` more compressed trials, the baseline when ``baseline``, and
    ``screens`` more screens, each at this machine's measured pace (the formula's before one was measured)."""
    base = formula.baseline_s if baseline else 0.0
    return base + compressed * measured.compressed_s(formula) + screens * measured.per_screen_s(formula)
