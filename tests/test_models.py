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
