import json
from pathlib import Path

import pytest

from slmsearch.errors import SlmsearchError
from slmsearch.models import check_llama, model_fingerprint, resolve_model


def test_default_model_loads_offline_with_sane_perplexity(default_model, data_dir):
    from slmsearch.evals.wikitext import token_perplexity

    model, tokenizer = default_model
    assert model.config.model_type == "llama" and model.config.num_hidden_layers == 30
    ppl, windows = token_perplexity(model, tokenizer, data_dir, seqlen=512, n_windows=4)
    assert windows == 4
    # A Q/K un-permutation mistake in GGUF loading gives about 280.
    assert 10 < ppl < 40


def test_default_checkpoint_is_plain_safetensors(default_model):
    folder = Path(resolve_model(None))
    assert (folder / "model.safetensors").is_file()
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert len(model_fingerprint(str(folder))) == 64


def test_missing_path_is_one_clear_error(tmp_path):
    with pytest.raises(SlmsearchError, match="does not exist"):
        resolve_model(str(tmp_path / "nope"))


def test_non_llama_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(SlmsearchError, match="LLaMA-architecture"):
        resolve_model(str(tmp_path))
    with pytest.raises(SlmsearchError, match="'mistral'"):
        check_llama({"model_type": "mistral"}, "x")


def test_a_converted_checkpoint_is_used_only_while_it_matches_its_recorded_fingerprint(tmp_path):
    """The cached conversion of the default model is a cache entry: a planted change to its
    weights (or a missing record) makes it unusable, so it is converted again, never loaded."""
    from slmsearch.models import SOURCE_FILE, converted_is_intact

    folder = tmp_path / "converted"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama"}')
    (folder / "model.safetensors").write_bytes(b"weights" * 100)
    assert not converted_is_intact(folder)  # no record of the conversion
    (folder / SOURCE_FILE).write_text(json.dumps({"fingerprint": model_fingerprint(str(folder))}))
    assert converted_is_intact(folder)
    (folder / "model.safetensors").write_bytes(b"planted" * 100)  # same size, other content
    assert not converted_is_intact(folder)
    (folder / SOURCE_FILE).write_text("{not json")
    assert not converted_is_intact(folder)


@pytest.mark.slow
def test_a_planted_weight_in_the_converted_default_model_is_never_loaded(tmp_path, monkeypatch):
    """End to end, on the real GGUF: plant a change in the cached conversion; the next resolve
    converts again and the weights are the GGUF's again."""
    from safetensors.torch import load_file, save_file

    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path))
    folder = Path(resolve_model(None))
    clean = load_file(folder / "model.safetensors")
    planted = {name: t.clone() for name, t in clean.items()}
    first = sorted(planted)[0]
    planted[first].zero_()
    save_file(planted, folder / "model.safetensors", metadata={"format": "pt"})
    assert Path(resolve_model(None)) == folder
    again = load_file(folder / "model.safetensors")
    assert all((again[n] == clean[n]).all() for n in clean)
