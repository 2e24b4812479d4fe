"""The up-front time estimate is measured on this machine: a forward pass of the study's model scales
the evaluation, LoRA and screens; the real GPTQ stage on one and two decoder layers prices GPTQ and EoRA."""

from __future__ import annotations

import math
import re

import pytest

from slmsearch.search import clock
from slmsearch.search.config import load_study_config
from slmsearch.search.study import optimize
from test_study import write_study  # same folder


@pytest.fixture
def cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))


def test_forward_seconds_times_the_real_model(tiny_checkpoint):
    seconds = clock.forward_seconds(str(tiny_checkpoint), seqlen=64, reps=3)
    assert 0 < seconds < math.inf


def test_speed_factor_is_the_ratio_to_the_reference_per_token():
    assert clock.REFERENCE_FORWARD_S > 0
    assert clock.speed_factor(clock.REFERENCE_FORWARD_S) == pytest.approx(1.0)
    assert clock.speed_factor(3 * clock.REFERENCE_FORWARD_S) == pytest.approx(3.0)
    # half the tokens in the same time: twice as slow per token
    assert clock.speed_factor(clock.REFERENCE_FORWARD_S, seqlen=clock.REFERENCE_SEQLEN // 2) == pytest.approx(2.0)


def test_the_gptq_probe_times_the_real_stage_on_one_and_two_layers(tiny_checkpoint, data_dir, tmp_path, monkeypatch):
    from slmsearch.compress import pipeline
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.search.config import SpaceConfig

    calib = CalibSettings(n_samples=4, seqlen=64, batch=4)
    space = SpaceConfig(gptq_bits=(3, 4, 16), group_sizes=(32,), gptq_mse=(0.0,), gptq_scale_bits=(8, 16))
    clock._GPTQ_PROBES.clear()
    runs = []
    real_run = pipeline.run

    def counted(plan, *args, **kwargs):
        result = real_run(plan, *args, **kwargs)
        runs.append((plan, next(r.seconds for r in result.reports if r.name == "gptq")))
        return result

    monkeypatch.setattr(pipeline, "run", counted)
    layer_s, fixed_s = clock.gptq_stage_seconds(str(tiny_checkpoint), data_dir, calib, space=space)
    n = len(pipeline.model_geometry(str(tiny_checkpoint)).layers)
    assert [len(plan.stages[0].indices) for plan, _ in runs] == [n - 1, n - 1, n - 2]  # one layer (a warm-up, then timed), two
    gptq = runs[0][0].stages[-1]
    assert (gptq.bits, gptq.group_size, gptq.mse, gptq.scale_bits) == (4, 32, 0.0, 8)  # 8-bit scale codes, as the space searches them
    _, one, two = (seconds for _, seconds in runs)
    assert 0 < one < math.inf and 0 < two < math.inf
    assert (layer_s, fixed_s) == clock.split_stage_seconds(one, two)
    (key,) = clock._GPTQ_PROBES  # remembered for the next study of this process
    assert clock.gptq_stage_seconds(str(tiny_checkpoint), data_dir, calib, space=space) == (layer_s, fixed_s)
    assert len(runs) == 3


def test_the_stage_seconds_split_into_per_layer_and_once_paid():
    """Two layers in 17 s and one in 12 s: 5 s per layer, 7 s once; noise that leaves two layers no
    slower than one keeps a floor per layer instead of pricing 30 layers at nothing."""
    assert clock.split_stage_seconds(12.0, 17.0) == pytest.approx((5.0, 7.0))
    layer, fixed = clock.split_stage_seconds(12.0, 11.5)
    assert layer == pytest.approx(clock.MIN_LAYER_SHARE * 12.0) and fixed == pytest.approx(12.0 - layer)
    assert clock.split_stage_seconds(2.0, 6.0) == pytest.approx((4.0, 0.0))  # never a negative once-paid part


def test_trial_seconds_follow_the_probes():
    """Three times slower per token triples the forward-scaled part; the GPTQ probe prices GPTQ and
    EoRA per kept layer and GPTQ's once-paid part once; a space without GPTQ does not depend on the
    GPTQ probe."""
    from dataclasses import replace

    config = load_study_config("studies/default.yaml")
    space = replace(config.space, eora_ranks=(0,))
    fast = clock.Probe(1.0, 512, 1.0, 0.0)
    slow = clock.Probe(3.0, 512, 3.0, 0.0)
    assert clock.trial_seconds(config, slow, space=space) == pytest.approx(3 * clock.trial_seconds(config, fast, space=space))
    gptq = clock.Probe(1.0, 512, 1.0, 10.0, 7.0)
    kept = 30 - sum(space.drop_layers) / 2
    share = sum(b != 16 for b in space.gptq_bits) / len(space.gptq_bits)
    extra = clock.trial_seconds(config, gptq, space=space) - clock.trial_seconds(config, fast, space=space)
    assert extra == pytest.approx(share * (7.0 + clock.GPTQ_PER_PROBE * 10.0 * kept))
    deeper = clock.trial_seconds(config, gptq, space=space, n_layers=31) - clock.trial_seconds(config, gptq, space=space)
    assert deeper == pytest.approx(share * clock.GPTQ_PER_PROBE * 10.0)  # one more layer: the per-layer seconds only
    no_gptq = replace(space, gptq_bits=(16,))
    assert clock.trial_seconds(config, gptq, space=no_gptq) == clock.trial_seconds(config, fast, space=no_gptq)
    # the baseline compresses nothing: evaluation only, counted once
    total = clock.study_seconds(config, gptq, 3, baseline_done=False, space=space)
    assert total == pytest.approx(clock.baseline_seconds(config, gptq) + 2 * clock.trial_seconds(config, gptq, space=space))


def test_screens_due_follow_the_promotion_schedule():
    """``first`` screens before the first promotion, ``per_trial`` before each next one, less those
    that already ran; none without screening."""
    from dataclasses import replace

    config = load_study_config("studies/default.yaml")
    s = replace(config.screening, first=6, per_trial=3)
    config = replace(config, screening=s)
    assert clock.screens_due(config, promoted=0, screened=0, promotions=1) == 6
    assert clock.screens_due(config, promoted=0, screened=2, promotions=1) == 4  # resumed mid-round
    assert clock.screens_due(config, promoted=1, screened=6, promotions=1) == 3
    assert clock.screens_due(config, promoted=1, screened=6, promotions=4) == 12
    assert clock.screens_due(config, promoted=2, screened=14, promotions=1) == 0  # extra rounds ran ahead
    assert clock.screens_due(replace(config, screening=replace(s, enabled=False)), promoted=0, screened=0, promotions=3) == 0
    # the first estimate's share per compressed trial is the same schedule over the study
    assert clock.screens_per_trial(replace(config, trials=8)) == pytest.approx((6 + 3 * 6) / 7)


def test_the_studys_first_estimate_is_measured_on_this_machine(tmp_path, tiny_checkpoint, data_dir, cache_env, monkeypatch):
    """A machine three times slower than the reference (the probe says so) with a GPTQ layer of 2 s
    gets the formula at those figures in the first line, and in the time left before a compressed
    trial was measured."""
    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir, trials=3))
    probed = []

    def slow(location, *, seqlen=512, reps=3, trust_remote_code=False):
        probed.append(location)
        return 3 * clock.REFERENCE_FORWARD_S * seqlen / clock.REFERENCE_SEQLEN

    monkeypatch.setattr(clock, "forward_seconds", slow)
    monkeypatch.setattr(clock, "gptq_stage_seconds", lambda *a, **k: (2.0, 3.0))
    lines: list[str] = []
    optimize(config, log=lines.append, stop_after=0)
    assert len(probed) == 1  # once per run, before the first trial
    first = next(line for line in lines if "min estimated" in line)
    per_trial = float(re.search(r"~(\d+) s each", first).group(1))
    probe = clock.Probe(slow(""), 512, 3.0, 2.0, 3.0)
    assert per_trial == round(clock.trial_seconds(config, probe, n_layers=4))
    assert "x3.00" in first and "GPTQ 2.0 s per decoder layer + 3.0 s per stage" in first
    assert "timeout" not in first
    # a timeout shorter than the estimate is named: it, not the trial count, ends the run
    from dataclasses import replace

    lines.clear()
    optimize(replace(config, timeout_s=60.0), log=lines.append, stop_after=0)
    first = next(line for line in lines if "min estimated" in line)
    assert "(the timeout of 1 min ends it first)" in first


def test_ctrl_c_while_timing_stops_before_any_trial(tmp_path, tiny_checkpoint, data_dir, cache_env, monkeypatch):
    """The probes run a forward pass and a real GPTQ stage (seconds to a minute): Ctrl-C there ends
    the run with one line and no trial started."""
    import optuna

    from slmsearch import interrupt
    from slmsearch.search.study import Interrupted

    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir, trials=3))

    def pressed(*args, **kwargs):
        interrupt._requested.set()  # what the SIGINT handler does
        return clock.Probe(1.0, 512, 1.0, 1.0)

    monkeypatch.setattr(clock, "probe", pressed)
    try:
        with pytest.raises(Interrupted, match="while timing this machine, before any trial started"):
            optimize(config, log=lambda m: None)
    finally:
        interrupt._requested.clear()
    trials = optuna.load_study(study_name="tiny", storage=config.storage).trials
    assert all(t.state == optuna.trial.TrialState.WAITING for t in trials)  # the enqueued baseline, not started


def test_a_trial_that_cannot_end_within_the_timeout_is_not_started(tmp_path, tiny_checkpoint, data_dir, cache_env,
                                                                    monkeypatch):
    """The timeout is a limit on the run, not on when trials start: with the clock predicting the
    baseline alone at ~10 min, a 5-minute timeout starts nothing and says why; a 1-hour one runs it."""
    import optuna
    from dataclasses import replace

    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir, trials=2))
    probe = clock.Probe(1.0, 512, 1.0, 1.0)
    monkeypatch.setattr(clock, "probe", lambda *a, **k: probe)
    monkeypatch.setattr(clock, "baseline_seconds", lambda *a, **k: 600.0)
    lines: list[str] = []
    optimize(replace(config, timeout_s=300.0), log=lines.append)
    assert any(re.search(r"timeout of 300 s: \d+ s used, and the next trial would take ~600 s", line) for line in lines)
    study = optuna.load_study(study_name=config.name, storage=config.storage)
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.WAITING]  # the baseline, not started
    lines.clear()
    optimize(replace(config, timeout_s=3600.0), log=lines.append, stop_after=1)
    assert not any("timeout" in line for line in lines)
    assert study.trials[0].state == optuna.trial.TrialState.COMPLETE
