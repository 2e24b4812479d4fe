"""Measure each stage alone on the default model (SmolLM2-135M): token ppl, size, wall time.

Run under the heavy lock:  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/stages_default_model.py OUT.json [NAME ...]
Prints one JSON line per configuration and writes them all to OUT.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from slmsearch.compress import kernels
from slmsearch.compress.cache import StageCache
from slmsearch.compress.calib import CalibSettings
from slmsearch import checkpoint
from slmsearch.compress.pipeline import run
from slmsearch.compress.plan import Plan
from slmsearch.evals.wikitext import token_perplexity

DATA = Path("/work/shared/data")
SEQLEN, WINDOWS = 512, 8
CALIB = CalibSettings(n_samples=32, seqlen=256, seed=0, batch=8)

CONFIGS = {
    "base": [],
    "depth drop2 angular": [{"stage": "depth", "drop": 2}],
    "depth drop4 angular": [{"stage": "depth", "drop": 4}],
    "depth drop4 angular block4": [{"stage": "depth", "drop": 4, "block": 4}],
    "depth drop4 ppl": [{"stage": "depth", "drop": 4, "by": "ppl"}],
    "wanda 50% unstructured": [{"stage": "wanda", "sparsity": 0.5}],
    "magnitude 50% unstructured": [{"stage": "wanda", "sparsity": 0.5, "score": "magnitude"}],
    "wanda 2:4": [{"stage": "wanda", "pattern": "2:4"}],
    "wanda 4:8": [{"stage": "wanda", "pattern": "4:8"}],
    "wanda structured mlp 25%": [{"stage": "wanda", "pattern": "structured", "mlp_fraction": 0.25}],
    "wanda structured 1 kv group": [{"stage": "wanda", "pattern": "structured", "kv_groups": 1}],
    "embedding 8 bit": [{"stage": "embedding", "bits": 8}],
    "embedding 4 bit": [{"stage": "embedding", "bits": 4}],
    "embedding 4 bit group64": [{"stage": "embedding", "bits": 4, "group_size": 64}],
    "depth drop4 angular + lora r8 60 steps": [{"stage": "depth", "drop": 4}, {"stage": "lora", "rank": 8, "steps": 60, "lr": 5e-4}],
    "gptq 4 bit g64": [{"stage": "gptq", "bits": 4, "group_size": 64}],
    "gptq 3 bit g64": [{"stage": "gptq", "bits": 3, "group_size": 64}],
    "gptq 3 bit g64 + eora r32": [{"stage": "gptq", "bits": 3, "group_size": 64}, {"stage": "eora", "rank": 32}],
    "wanda 50% + gptq 4 bit g64": [{"stage": "wanda", "sparsity": 0.5}, {"stage": "gptq", "bits": 4, "group_size": 64}],
}
RTN = {"rtn 4 bit g64": (4, 64), "rtn 3 bit g64": (3, 64)}


def size_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def hw_bytes(folder: Path) -> int | None:
    try:
        from slmsearch.hwmodel import ModelShape
        from slmsearch.hwmodel.memory import static_bytes

        return static_bytes(ModelShape.from_checkpoint(folder)).static_total
    except Exception as exc:  # report, do not stop the measurement
        print(f"hwmodel: {exc}", file=sys.stderr)
        return None


def zero_fraction(model) -> float:
    """Fraction of the decoder Linear weights that are exactly zero. A GPTQ module's dequantized
    weight is zero exactly where its integer equals its group's zero point."""
    zeros = total = 0
    with torch.no_grad():
        for name, module in model.named_modules():
            if ".layers." not in name:
                continue
            if hasattr(module, "dequantize_weight"):  # gptqmodel's quantized Linear (its EoRA adapter not added)
                w = module.dequantize_weight()
            elif isinstance(module, torch.nn.Linear):
                w = module.weight
            else:
                continue
            zeros += int((w == 0).sum())
            total += w.numel()
    return zeros / max(total, 1)


def main(out_path: str, only: list[str]) -> None:
    cache = StageCache(Path("/tmp/slmsearch-measure-cache/stages"), max_bytes=40 * 1024**3)
    rows = []
    for name, stages in CONFIGS.items():
        if only and not any(o in name for o in only):
            continue
        t0 = time.perf_counter()
        result = run(Plan.from_dict(stages), None, DATA, CALIB, cache=cache, progress=True)
        wall = time.perf_counter() - t0
        model, tok = checkpoint.load(result.checkpoint_dir)
        t1 = time.perf_counter()
        with torch.no_grad():
            ppl, n = token_perplexity(model, tok, DATA, seqlen=SEQLEN, n_windows=WINDOWS)
        row = {
            "config": name,
            "token_ppl": round(ppl, 3),
            "windows": f"{n}x{SEQLEN}",
            "safetensors_bytes": size_bytes(result.checkpoint_dir),
            "hwmodel_static_bytes": hw_bytes(result.checkpoint_dir),
            "zero_fraction": round(zero_fraction(model), 4),
            "pipeline_s": round(wall, 1),
            "stage_s": {k: round(v, 1) for k, v in result.stage_seconds.items()},
            "cache_hits": result.cache_hits,
            "eval_s": round(time.perf_counter() - t1, 1),
            "metrics": {r.name: {k: v for k, v in r.metrics.items() if k in ("dropped", "sparsity_achieved", "heldout_loss_before", "heldout_loss_after_merge", "zeros_restored", "mlp_channels_removed", "intermediate_size", "num_key_value_heads", "embedding_rel_error")} for r in result.reports},
        }
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        Path(out_path).write_text(json.dumps(rows, indent=1))
        del model
    from slmsearch.models import load_model

    for name, (bits, group) in RTN.items():
        if only and not any(o in name for o in only):
            continue
        model, tok = load_model(None)
        t0 = time.perf_counter()
        with torch.no_grad():
            for mod_name, module in model.named_modules():
                if isinstance(module, torch.nn.Linear) and ".layers." in mod_name:
                    module.weight.copy_(kernels.rtn_quantize(module.weight, bits, group))
        quant_s = time.perf_counter() - t0
        with torch.no_grad():
            ppl, n = token_perplexity(model, tok, DATA, seqlen=SEQLEN, n_windows=WINDOWS)
        row = {"config": name, "token_ppl": round(ppl, 3), "windows": f"{n}x{SEQLEN}", "pipeline_s": round(quant_s, 1)}
        rows.append(row)
        print("ROW " + json.dumps(row), flush=True)
        Path(out_path).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
