"""A plan's cheap stand-in, scored in seconds: what the search screens candidates with.

The proxy of a plan keeps what decides its structure and swaps what is expensive:

- depth and WANDA run for real, through the stage cache (the plan's full compression then
  starts from the same cached folders);
- the embedding is rounded as the plan rounds it (in memory, seconds), to nearest where the plan
  uses GPTQ's error feedback (as for the layers);
- the minmax stage runs as it is (round-to-nearest is what it does: the proxy is exact there);
- GPTQ becomes round-to-nearest on GPTQ's symmetric grid (:func:`kernels.rtn_codes`) at the
  same per-layer widths (the same cached sensitivity ranking picks the wider layers), group size
  and scale search; its Hessian-aware error compensation is what the proxy leaves out;
- LoRA and EoRA are left out (each only recovers quality; the search learns by how much from the
  plans it evaluates fully: ``search/screening.py``);
- the KV cache is rounded as deployed (:func:`kvcache.install`).

The score is the token perplexity on the first evaluation windows, the same windows the full
evaluation decides pruning on, so a proxy and a full result of one plan are directly comparable.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmsearch.compress.calib import CalibSettings
from slmsearch.compress.plan import Plan

STRUCTURAL = ("depth", "wanda")  # stages the proxy runs for real
RECOVERY = ("lora", "eora")  # stages the proxy leaves out


@dataclass(frozen=True)
class ProxyScore:
    """The proxy's token perplexity of one plan, on ``windows`` windows of ``seqlen`` tokens."""

    token_ppl: float
    seconds: float
    windows: int
    seqlen: int


def structural_part(plan: Plan) -> Plan:
    """The stages the proxy runs for real (depth, WANDA), in order."""
    return Plan(tuple(s for s in plan.effective().stages if s.kind in STRUCTURAL))


# The clip search's scales of this process, by (the Linear's weights, bits, group, mse): the search
# is a screen's costliest step (25 trial roundings of every weight), and a layer's scales at a width
# depend only on its weights, which dropping other layers leaves alone, so the screens of one study
# search each (layer, width, group) once, whatever they drop. Rounding with known scales is one
# pass. Oldest dropped past _SCALES_KEPT modules (about 10 whole-model settings of SmolLM2-135M,
# 3-7 MB of fp16 scales each).
_SCALES: OrderedDict[tuple[str, int, int, float], Any] = OrderedDict()
_SCALES_KEPT = 2100


def weights_digest(weight: Any) -> str:
    """A content key of a tensor: its shape, dtype and bytes (blake2b)."""
    import hashlib

    import torch

    data = weight.detach().cpu().contiguous()
    digest = hashlib.blake2b(f"{tuple(data.shape)}{data.dtype}".encode(), digest_size=20)
    digest.update(memoryview(data.view(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def round_linears(model: Any, widths: tuple[int, ...], group_size: int, mse: float) -> None:
    """Round every decoder layer's Linear weights in place to its width (``widths[i]`` for layer
    ``i``; 16 leaves the layer as it is) on GPTQ's symmetric grid, with the scale search ``mse``
    (its scales remembered by the weights' content, and reused bit for bit)."""
    import torch

    from slmsearch.compress.kernels import grid_codes, rtn_codes, rtn_dequantize
    from slmsearch.compress.surgery import decoder_layers

    group = None if group_size == -1 else group_size
    with torch.no_grad():
        for layer, bits in zip(decoder_layers(model), widths):
            if bits >= 16:
                continue
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight.data
                    key = (weights_digest(w), bits, group_size, float(mse)) if mse > 0 else None
                    scales = _SCALES.get(key) if key is not None else None
                    if scales is None:
                        codes, scales = rtn_codes(w, bits, group, scale_dtype=torch.float16, mse=mse)
                        if key is not None:
                            _remember(key, scales)
                    else:
                        _SCALES.move_to_end(key)
                        codes = grid_codes(w, scales, bits)
                    w.copy_(rtn_dequantize(codes, scales, bits, w.dtype))


def _remember(key: tuple[str, int, int, float], scales: Any) -> None:
    _SCALES[key] = scales
    while len(_SCALES) > _SCALES_KEPT:
        _SCALES.popitem(last=False)


def proxy_model(plan: Plan, base_location: str, data_dir: Path, calib: CalibSettings = CalibSettings(), *,
                cache: Any = None) -> tuple[Any, Any]:
    """``(model, tokenizer)``: ``plan``'s proxy before the KV cache is rounded (see the module
    docstring); :func:`score_plan` scores it."""
    from slmsearch.compress import pipeline
    from slmsearch.compress.calib import Calibration
    from slmsearch.compress.gptq import WIDER, Gptq
    from slmsearch.compress.sensitivity import cached_layer_sensitivity, most_sensitive
    from slmsearch.models import load_model, model_fingerprint

    stages = plan.effective().stages
    structural = structural_part(plan)
    folder = base_location
    if structural.stages:
        folder = str(pipeline.run(structural, base_location, data_dir, calib, cache=cache).checkpoint_dir)
    model, tokenizer = load_model(folder)
    model.eval()
    done = list(structural.stages)
    for stage in stages:
        if stage.kind == "embedding":
            _round_embedding(model, dataclasses.replace(stage, gptq=False))
            done.append(stage)
    gptq = next((s for s in stages if isinstance(s, Gptq)), None)
    if gptq is not None:
        n = len(model.model.layers)
        widths = tuple(gptq.layer_bits) if gptq.layer_bits else gptq.widths(n)
        if gptq.wider_layers:
            fingerprint = model_fingerprint(base_location)
            score_dir = cache.score_dir() if cache is not None else None
            calibration = Calibration.from_data(tokenizer, data_dir, calib, score_dir=score_dir, model_key=fingerprint)
            # the id GPTQ gives its input folder when no LoRA precedes it: the same cached ranking
            model_id = json.dumps({"base": fingerprint, "plan": Plan(tuple(done)).to_dict()}, sort_keys=True)
            scores = cached_layer_sensitivity(lambda: model, calibration, gptq.bits, gptq.group_size, model_id)
            raised = set(most_sensitive(scores, gptq.wider_layers))
            widths = tuple(WIDER[gptq.bits] if i in raised else gptq.bits for i in range(n))
        round_linears(model, widths, gptq.group_size, gptq.mse)
    minmax = next((s for s in stages if s.kind == "minmax"), None)
    if minmax is not None:
        minmax_linears(model, minmax.bits, minmax.group_size)  # type: ignore[attr-defined]
    return model, tokenizer


def minmax_linears(model: Any, bits: int, group_size: int) -> None:
    """Every decoder Linear on the minmax stage's grid, in place (what the stage stores)."""
    import torch

    from slmsearch.compress.kernels import minmax_codes, minmax_dequantize
    from slmsearch.compress.surgery import decoder_layers

    with torch.no_grad():
        for layer in decoder_layers(model):
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    w = module.weight.data
                    w.copy_(minmax_dequantize(*minmax_codes(w, bits, group_size), w.dtype))


# The rounded embeddings of this process, by (weights, setting): the embedding is the same in every
# plan of a study (depth and WANDA leave it alone) and a study samples a few settings (bits x
# group), each rounded once; the scale search makes rounding the proxy's costliest step (~10 s on
# SmolLM2-135M's 49152 x 576 table). Oldest dropped past _EMBEDDINGS_KEPT.
_EMBEDDINGS: dict[tuple[str, str], Any] = {}
_EMBEDDINGS_KEPT = 6


def _round_embedding(model: Any, stage: Any) -> None:
    import torch

    weight = model.get_input_embeddings().weight
    memo = (weights_digest(weight), json.dumps(stage.to_dict(), sort_keys=True))
    if memo in _EMBEDDINGS:
        with torch.no_grad():
            weight.data.copy_(_EMBEDDINGS[memo])
        return
    stage.apply(model)
    while len(_EMBEDDINGS) >= _EMBEDDINGS_KEPT:
        del _EMBEDDINGS[next(iter(_EMBEDDINGS))]
    _EMBEDDINGS[memo] = weight.detach().clone()


def score_model(model: Any, tokenizer: Any, data_dir: Path, kv: Any = None, *, seqlen: int = 512, windows: int = 2,
                batch_size: int = 8) -> float:
    """Token perplexity of a proxy model on the first ``windows`` windows, its KV cache rounded as
    the KV-cache stage ``kv`` says (None: 16-bit)."""
    from slmsearch.compress.kvcache import install_stage, set_attention
    from slmsearch.evals.wikitext import token_perplexity

    if kv is not None and not kv.is_noop():
        install_stage(model, kv)
    else:
        set_attention(model, "sdpa")
    ppl, _ = token_perplexity(model, tokenizer, data_dir, seqlen=seqlen, n_windows=windows, batch_size=batch_size)
    return float(ppl)


def score_plan(plan: Plan, base_location: str, data_dir: Path, calib: CalibSettings = CalibSettings(), *,
               cache: Any = None, seqlen: int = 512, windows: int = 2, batch_size: int = 8) -> ProxyScore:
    """The proxy token perplexity of ``plan`` applied to the model at ``base_location``."""
    from slmsearch.compress.kvcache import KvCacheQuant

    start = time.perf_counter()
    model, tokenizer = proxy_model(plan, base_location, data_dir, calib, cache=cache)
    kv = next((s for s in plan.effective().stages if isinstance(s, KvCacheQuant)), None)
    ppl = score_model(model, tokenizer, data_dir, kv, seqlen=seqlen, windows=windows, batch_size=batch_size)
    return ProxyScore(token_ppl=ppl, seconds=time.perf_counter() - start, windows=windows, seqlen=seqlen)
