"""The up-front time estimate is scaled by this machine's forward pass of the study's model."""

from __future__ import annotations

import math
import re

import pytest

from slmsearch.search import clock
from slmsearch.search.config import load_study_config
from slmsearch.search.study import estimate_trial_seconds, optimize
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


def test_the_studys_first_estimate_is_scaled_by_this_machine(tmp_path, tiny_checkpoint, data_dir, cache_env, monkeypatch):
    """A machine three times slower than the reference (the probe says so) gets three times the
    reference formula, in the first line and in the time left before a compressed trial was measured."""
    config = load_study_config(write_study(tmp_path, tiny_checkpoint, data_dir, trials=3))
    probed = []

    def slow(location, *, seqlen=512, reps=3, trust_remote_code=False):
        probed.append(location)
        return 3 * clock.REFERENCE_FORWARD_S * seqlen / clock.REFERENCE_SEQLEN

    monkeypatch.setattr(clock, "forward_seconds", slow)
    lines: list[str] = []
    optimize(config, log=lines.append, stop_after=0)
    assert len(probed) == 1  # once per run, before the first trial
    first = next(line for line in lines if "min estimated" in line)
    per_trial = float(re.search(r"~(\d+) s each", first).group(1))
    assert per_trial == round(3 * estimate_trial_seconds(config))
    assert "x3.00" in first
