import json

from slmsearch.hwmodel import load_platform
from slmsearch.hwmodel.shape import smollm2_135m
from slmsearch.hwmodel.summary import format_report, hw_report


def test_hw_report_is_json_and_formats():
    d = hw_report(smollm2_135m(), "siracusa", context_len=256, prefill_len=16)
    json.dumps(d)
    text = format_report(d)
    assert "memory" in text and "placement" in text and "decode" in text and "prefill" in text
    assert f"{d['memory']['total_bytes'] / 1e6:10.3f} MB" in text
    assert d["decode"]["ops"] and d["assumptions"]


def test_hw_report_lists_overrides_among_the_assumptions():
    p = load_platform("siracusa", {"memory.l3.read_bw_bytes_per_cycle": 2.0})
    d = hw_report(smollm2_135m(), p, context_len=64)
    assert d["assumptions"]["memory.l3.read_bw_bytes_per_cycle"].startswith("source: override")
    assert d["prefill"] is None and "prefill" not in format_report(d).split("placement:")[1]
