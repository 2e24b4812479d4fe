"""Shared fixtures: the offline data folder, the real default model, a tiny random LLaMA."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    raw = os.environ.get("SLMSEARCH_DATA_DIR") or str(REPO.parent / "shared" / "data")
    path = Path(raw)
    if not (path / "README.md").is_file():
        pytest.fail(f"data folder {path} not found: set SLMSEARCH_DATA_DIR (make test does)")
    return path


@pytest.fixture(scope="session")
def default_model() -> tuple[Any, Any]:
    """The real SmolLM2-135M-Instruct from the GGUF (converted once into the cache), fp32, eval mode."""
    from slmsearch.models import load_model

    return load_model(None)


def make_tiny_llama(tmp: Path | None = None, *, seed: int = 0, layers: int = 4, **overrides: Any) -> Any:
    """A tiny random LlamaForCausalLM (saved with a tokenizer-free config to ``tmp`` when given)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    settings: dict[str, Any] = dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=256, max_position_embeddings=256, tie_word_embeddings=True,
    )
    settings.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**settings)).eval()
    if tmp is not None:
        model.save_pretrained(tmp)
    return model


@pytest.fixture
def tiny_llama() -> Any:
    return make_tiny_llama()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaMA saved with the default model's real tokenizer (so every evaluation,
    calibration and GPTQ path runs for real, in seconds). Dimensions divide group size 32/64."""
    from transformers import AutoTokenizer

    from slmsearch.models import resolve_model

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(None))
    make_tiny_llama(
        folder, layers=4, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    tokenizer.save_pretrained(folder)
    return folder
