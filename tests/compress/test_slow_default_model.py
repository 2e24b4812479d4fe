"""Orderings every correct implementation reproduces on a real model (SmolLM2-135M, CPU).

Minutes each; run under the heavy lock:
    flock /tmp/slmsearch-heavy.lock .venv/bin/python -m pytest tests/compress -m slow
Stage outputs are cached (``$SLMSEARCH_COMPRESS_TEST_CACHE``, default the user cache), so a
rerun only re-evaluates.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from slmsearch.compress import kernels
from slmsearch.compress.cache import StageCache
from slmsearch.compress.calib import CalibSettings
from slmsearch import checkpoint
from slmsearch.compress.pipeline import run
from slmsearch.compress.plan import Plan
from slmsearch.fsutil import cache_dir

pytestmark = pytest.mark.slow

DATA = Path(os.environ.get("SLMSEARCH_DATA_DIR", "/work/shared/data"))
CALIB = CalibSettings(n_samples=32, seqlen=256, seed=0, batch=8)
WINDOWS, SEQLEN = 8, 512


@pytest.fixture(scope="module")
def cache():
    root = os.environ.get("SLMSEARCH_COMPRESS_TEST_CACHE")
    return StageCache(Path(root) if root else cache_dir("stages"), max_bytes=40 * 1024**3)


def ppl(model, tokenizer) -> float:
    from slmsearch.evals.wikitext import token_perplexity

    with torch.no_grad():
        return token_perplexity(model, tokenizer, DATA, seqlen=SEQLEN, n_windows=WINDOWS)[0]


def plan_ppl(cache, stages) -> float:
    result = run(Plan.from_dict(stages), None, DATA, CALIB, cache=cache)
    return ppl(*checkpoint.load(result.checkpoint_dir))


def test_wanda_beats_magnitude(cache):
    wanda = plan_ppl(cache, [{"stage": "wanda", "sparsity": 0.5}])
    magnitude = plan_ppl(cache, [{"stage": "wanda", "sparsity": 0.5, "score": "magnitude"}])
    print(f"50% unstructured: wanda {wanda:.2f}, magnitude {magnitude:.2f}")
    assert wanda < magnitude


def test_gptq_beats_rtn_at_3_bits(cache):
    from slmsearch.models import load_model

    gptq = plan_ppl(cache, [{"stage": "gptq", "bits": 3, "group_size": 64}])
    model, tok = load_model(None)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and ".layers." in name:
                module.weight.copy_(kernels.rtn_quantize(module.weight, 3, 64))
    rtn = ppl(model, tok)
    print(f"3 bit g64: gptq {gptq:.2f}, rtn {rtn:.2f}")
    assert gptq < rtn


def test_eora_lowers_gptq_3bit(cache):
    gptq = plan_ppl(cache, [{"stage": "gptq", "bits": 3, "group_size": 64}])
    eora = plan_ppl(cache, [{"stage": "gptq", "bits": 3, "group_size": 64}, {"stage": "eora", "rank": 32}])
    print(f"3 bit g64: gptq {gptq:.2f}, + eora r32 {eora:.2f}")
    assert eora < gptq


def test_lora_recovers_depth_pruning(cache):
    dropped = plan_ppl(cache, [{"stage": "depth", "drop": 4}])
    recovered = plan_ppl(cache, [{"stage": "depth", "drop": 4}, {"stage": "lora", "rank": 8, "steps": 60, "lr": 5e-4}])
    print(f"drop 4 layers: {dropped:.2f}, + lora {recovered:.2f}")
    assert recovered < dropped
