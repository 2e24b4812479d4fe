"""Calibration (compress/calib.py): settings checked, windows only from wiki.valid (never the test
split), deterministic by seed; layer-by-layer capture equals the model's own forward pass."""

from __future__ import annotations

import pytest
import torch

from conftest import DATA_DIR, TINY_CALIB
from slmsearch.compress.calib import CalibSettings, Calibration, layerwise
from slmsearch.errors import SlmsearchError

pytestmark = pytest.mark.skipif(not (DATA_DIR / "wikitext-2" / "wiki.valid.tokens").is_file(), reason=f"no data dir at {DATA_DIR}")


def as_bytes(ids: torch.Tensor) -> bytes:
    """Token ids of the 256-symbol tokenizer as a byte string, for sub-sequence search."""
    return bytes(ids.tolist())


@pytest.mark.parametrize("field, value", [("n_samples", 0), ("seqlen", 1), ("batch", 0)])
def test_settings_out_of_range_are_one_error_naming_the_values(field, value):
    with pytest.raises(SlmsearchError, match=f"{field}={value}"):
        CalibSettings(**{**TINY_CALIB, field: value})


def test_batch_is_not_part_of_the_key_and_does_not_change_the_windows(tokenizer):
    a = CalibSettings(**{**TINY_CALIB, "batch": 1})
    b = CalibSettings(**{**TINY_CALIB, "batch": 8})
    assert a.key() == b.key() == {"n_samples": 8, "seqlen": 64, "seed": 0}
    torch.testing.assert_close(Calibration.from_data(tokenizer, DATA_DIR, a).tokens,
                               Calibration.from_data(tokenizer, DATA_DIR, b).tokens, rtol=0, atol=0)
    assert [t.shape[0] for t in Calibration.from_data(tokenizer, DATA_DIR, b).token_batches()] == [8]
    assert [t.shape[0] for t in Calibration.from_data(tokenizer, DATA_DIR, CalibSettings(n_samples=5, seqlen=8, batch=2)).token_batches()] == [2, 2, 1]


def test_windows_are_deterministic_by_seed(tokenizer):
    first = Calibration.from_data(tokenizer, DATA_DIR, CalibSettings(**TINY_CALIB)).tokens
    again = Calibration.from_data(tokenizer, DATA_DIR, CalibSettings(**TINY_CALIB)).tokens
    other = Calibration.from_data(tokenizer, DATA_DIR, CalibSettings(**{**TINY_CALIB, "seed": 1})).tokens
    assert first.shape == (8, 64)
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_windows_come_from_the_first_90_percent_of_wiki_valid_and_never_the_test_split(tokenizer, monkeypatch):
    from slmsearch import data

    valid = data.wikitext_ids("valid", DATA_DIR, tokenizer)
    test = data.wikitext_ids("test", DATA_DIR, tokenizer)
    cut = int(valid.numel() * 0.9)
    calib = Calibration.from_data(tokenizer, DATA_DIR, CalibSettings(**TINY_CALIB))
    for window in calib.tokens:
        assert as_bytes(window) in as_bytes(valid[:cut])
        assert as_bytes(window) not in as_bytes(test)
    for window in calib.samples(4, part="heldout"):  # LoRA's held-out loss: the last 10%
        assert as_bytes(window) in as_bytes(valid[cut:])

    def no_test_split(*args, **kwargs):
        raise AssertionError("calibration read the test split")

    monkeypatch.setitem(data._SPLIT_TEXT, "test", no_test_split)
    data._TOKEN_IDS.clear()  # tokenize again, so that a read of the test text would happen now
    Calibration.from_data(tokenizer, DATA_DIR, CalibSettings(**TINY_CALIB)).samples(2, part="heldout")


def test_samples_need_the_data_folder_and_tokenizer():
    calib = Calibration(CalibSettings(**TINY_CALIB), torch.zeros(8, 64, dtype=torch.long))
    with pytest.raises(SlmsearchError, match="Calibration.from_data"):
        calib.samples(2)


def test_layerwise_feeds_each_layer_the_output_of_the_layer_before_as_changed(model, calib):
    """Unchanged layers: each layer's captured input equals the model's own hidden state. A layer
    changed by ``visit`` feeds its changed output on, as the WANDA/GPTQ reference code does."""
    seen: dict[int, torch.Tensor] = {}

    def record(i, layer, inputs):
        seen[i] = torch.cat(inputs.hidden)

    layerwise(model, calib, record)
    with torch.no_grad():
        hidden = model(calib.tokens, output_hidden_states=True).hidden_states
    for i in range(len(model.model.layers)):
        torch.testing.assert_close(seen[i], hidden[i])

    def change_first(i, layer, inputs):
        if i == 0:
            with torch.no_grad():
                layer.mlp.down_proj.weight.mul_(0.5)
        seen[i] = torch.cat(inputs.hidden)

    layerwise(model, calib, change_first)
    with torch.no_grad():
        changed = model(calib.tokens, output_hidden_states=True).hidden_states
    assert not torch.allclose(changed[1], hidden[1])
    torch.testing.assert_close(seen[1], changed[1])
