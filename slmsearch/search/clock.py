"""How fast this machine runs the study's model: the scale of the time estimate printed before the
first trial.

The per-trial formula (:func:`slmsearch.search.study.estimate_trial_seconds`) holds the stage and
evaluation costs measured on the reference machine for the default model. Before a study starts,
:func:`forward_seconds` times one forward pass of the study's own model on this machine (float32,
as evaluation runs it; one window of the evaluation's length); its ratio to the reference
machine's time for the default model scales the formula, so a slower CPU (bf16 emulated, fewer
cores) or a larger model gets a proportionally larger estimate from the first line. After each
trial the study re-estimates from this machine's measured trials.
"""

from __future__ import annotations

import statistics
import time
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


def describe(seconds: float, seqlen: int, factor: float) -> str:
    """The estimate's basis, for the study's first line."""
    return (f"x{factor:.2f} (this machine's forward pass of the model: {seconds:.2f} s for {seqlen} tokens; the "
            f"reference machine's for the default model: {REFERENCE_FORWARD_S:.2f} s, {REFERENCE_MACHINE})")


def probe(config: Any, location: str) -> tuple[float, int, float]:
    """``(seconds, seqlen, factor)`` for the study ``config`` on the model at ``location``: one
    evaluation window, at most the model's positions (the factor is per token)."""
    from slmsearch.search.hardware import max_positions

    seqlen, limit = config.evaluation.token_seqlen or REFERENCE_SEQLEN, max_positions(location)
    seqlen = min(seqlen, limit) if limit else seqlen
    seconds = forward_seconds(location, seqlen=seqlen, trust_remote_code=config.trust_remote_code)
    return seconds, seqlen, speed_factor(seconds, seqlen)
