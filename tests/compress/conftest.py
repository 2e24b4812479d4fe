"""Shared fixtures: a tiny random LLaMA and a 256-symbol byte-level tokenizer, built in seconds."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

DATA_DIR = Path(os.environ.get("SLMSEARCH_DATA_DIR", "/work/shared/data"))


def byte_tokenizer():
    """A real (saveable) fast tokenizer whose 256 tokens are the byte-level alphabet."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=alphabet[0], pad_token=alphabet[0])
    fast.name_or_path = "slmsearch-test-bytes"
    return fast


def tiny_config(**overrides):
    from transformers import LlamaConfig

    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def tiny_model(seed: int = 0, **overrides):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(tiny_config(**overrides)).float().eval()
    return model


@pytest.fixture
def model():
    return tiny_model()


@pytest.fixture(scope="session")
def tokenizer():
    return byte_tokenizer()


@pytest.fixture
def calib(tokenizer):
    from slmsearch.compress.calib import CalibSettings, Calibration

    if not (DATA_DIR / "wikitext-2" / "wiki.valid.tokens").is_file():
        pytest.skip(f"no data dir at {DATA_DIR}")
    return Calibration.from_data(tokenizer, DATA_DIR, CalibSettings(n_samples=8, seqlen=64, seed=0, batch=4))


@pytest.fixture(scope="session")
def tiny_base(tmp_path_factory):
    """A tiny LLaMA checkpoint folder (fp32 + byte tokenizer) that the pipeline can start from."""
    folder = tmp_path_factory.mktemp("tiny-base")
    tiny_model().save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def finished_copy(folder: Path, dest: Path) -> Path:
    """A copy of the checkpoint ``folder`` (e.g. a stage-cache entry) made a finished checkpoint
    (``checkpoint.finish``: what an export or ``compress --out`` writes)."""
    from slmsearch import checkpoint

    checkpoint.copy_folder(folder, dest)
    checkpoint.finish(dest)
    return dest


TINY_CALIB = dict(n_samples=8, seqlen=64, seed=0, batch=4)


@pytest.fixture(scope="session")
def quantized(tiny_base, tmp_path_factory):
    """GPTQ plans of the tiny base, run once per session through the pipeline and its cache,
    from an empty working directory: ``plans[name]`` is the PipelineResult of "gptq", "eora"
    (gptq + EoRA), "sparse" (WANDA + gptq), "mixed" (the most sensitive layer one bit wider)
    "sparse_mixed" (WANDA + gptq with given per-layer widths), "asym", and "gptq3" / "scales8" (3-bit
    with fp16 scales / with 8-bit scale codes); ``plans["cwd_after"]`` lists what the runs left in
    the working directory."""
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import CalibSettings
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan

    cache = StageCache(tmp_path_factory.mktemp("cache") / "stages")
    settings = CalibSettings(**TINY_CALIB)
    workdir = tmp_path_factory.mktemp("workdir")
    plans = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for name, text in {
            "gptq": "[{stage: gptq, bits: 4, group_size: 32}]",
            "eora": "[{stage: gptq, bits: 4, group_size: 32}, {stage: eora, rank: 16}]",
            "sparse": "[{stage: wanda, sparsity: 0.5}, {stage: gptq, bits: 3, group_size: 32}]",
            "mixed": "[{stage: gptq, bits: 3, group_size: 32, wider_layers: 1}]",
            "sparse_mixed": "[{stage: wanda, sparsity: 0.5}, {stage: gptq, bits: 3, group_size: 32, layer_bits: [3, 4, 3, 8]}]",
            "asym": "[{stage: gptq, bits: 3, group_size: 32, sym: false}]",
            "gptq3": "[{stage: gptq, bits: 3, group_size: 32}]",
            "scales8": "[{stage: gptq, bits: 3, group_size: 32, scale_bits: 8}]",
        }.items():
            plans[name] = run(Plan.from_yaml(text), str(tiny_base), DATA_DIR, settings, cache=cache)
    plans["cwd_after"] = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    return plans
