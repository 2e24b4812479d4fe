"""Progress lines (slmsearch/progress.py) and the browser helper's CI rule (tests/browser.py)."""

from __future__ import annotations

import io

import pytest

import browser
from slmsearch.progress import Ticker


def test_every_item_is_a_line_when_every_s_is_zero():
    out = io.StringIO()
    ticker = Ticker("lora", 3, "step", every_s=0, stream=out)
    for loss in (3.5, 3.25, 3.0):
        ticker.tick(note=f"loss {loss}")
    lines = out.getvalue().splitlines()
    assert [line.split(" (")[0] for line in lines] == [
        "[lora] step 1/3 loss 3.5", "[lora] step 2/3 loss 3.25", "[lora] step 3/3 loss 3.0"]


def test_a_long_interval_prints_the_first_and_the_last_item_only():
    out = io.StringIO()
    ticker = Ticker("gptq", 50, "layer", every_s=1e9, stream=out)
    for _ in range(50):
        ticker.tick()
    assert [line.split(" (")[0] for line in out.getvalue().splitlines()] == ["[gptq] layer 1/50", "[gptq] layer 50/50"]


def test_an_unknown_total_is_said_in_words():
    out = io.StringIO()
    Ticker("lm-eval", None, "loglikelihood windows", every_s=0, stream=out, note_total="4 pages").tick(8)
    assert out.getvalue().startswith("[lm-eval] loglikelihood windows 8 (4 pages)")


def test_a_missing_chromium_fails_under_ci_and_skips_elsewhere(monkeypatch):
    monkeypatch.setattr(browser.shutil, "which", lambda name: None)
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI is set and no chromium"):
        browser.chromium()
    monkeypatch.setenv("CI", "")
    with pytest.raises(pytest.skip.Exception, match="no chromium"):
        browser.chromium()
