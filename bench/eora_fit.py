"""EoRA on the default model: what the adapter recovers and what it costs, beside the GPTQ stage
it corrects (the clock prices EoRA in units of GPTQ's seconds per layer).

Runs ``gptq 3-bit g64`` and then ``eora`` at each rank through the pipeline (the default study's
calibration, a fresh stage cache), scores every result on the first 4 x 512 WikiText test windows
(held out: calibration reads wiki.valid) beside the dense model, and times each stage per decoder
layer. With ``--gptqmodel`` the same adapters are also made by gptqmodel's ``adapter.generate``
(the path slmsearch used before its own float32 fit; bf16 kernels, ~48 s a layer where bf16 is
emulated) on the same GPTQ folder, scored on the same windows. Writes bench/results/eora_fit.json.

Run (real model; ~6 min on 2 cores without --gptqmodel):
  flock /tmp/slmsearch-heavy.lock .venv/bin/python bench/eora_fit.py [--ranks 8 16] [--gptqmodel]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _benchlib import REPO, fresh_cache, machine, quiet_env, write_result  # noqa: E402

OUT = REPO / "bench" / "results" / "eora_fit.json"
GPTQ = {"stage": "gptq", "bits": 3, "group_size": 64}


def score(folder: Path, data: Path) -> float:
    from slmsearch import checkpoint
    from slmsearch.evals.wikitext import token_perplexity

    model, tok = checkpoint.load(folder, dense=True)
    ppl, _ = token_perplexity(model, tok, data, seqlen=512, n_windows=4)
    return float(ppl)


def gptqmodel_adapter(gptq_dir: Path, base_dir: Path, calib, rank: int, out: Path) -> float:
    """gptqmodel's EoRA on ``gptq_dir`` into a copy at ``out``; returns its seconds."""
    import torch

    from slmsearch.checkpoint import ADAPTER_DIR, copy_folder
    from slmsearch.compress import gptqmodel_runtime as runtime
    from slmsearch.compress.gptq import calibration_rows

    copy_folder(gptq_dir, out)
    runtime.gptqmodel_env()
    from gptqmodel import GPTQModel
    from gptqmodel.adapter.adapter import Lora

    runtime.limit_worker_threads()
    start = time.perf_counter()
    with runtime.module_logs_out_of_the_working_directory():
        GPTQModel.adapter.generate(adapter=Lora(path=str(out / ADAPTER_DIR), rank=rank), model_id_or_path=str(base_dir),
                                   quantized_model_id_or_path=str(gptq_dir), calibration_dataset=calibration_rows(calib),
                                   batch_size=calib.settings.batch, tokenizer=calib.tokenizer, dtype=torch.bfloat16,
                                   device=runtime.compute_device())
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--gptqmodel", action="store_true", help="also gptqmodel's adapter.generate, side by side")
    args = parser.parse_args()
    quiet_env()
    fresh_cache("eora-fit")
    from slmsearch.compress.cache import StageCache
    from slmsearch.compress.calib import Calibration
    from slmsearch.compress.gptqmodel_runtime import compute_dtype
    from slmsearch.compress.pipeline import run
    from slmsearch.compress.plan import Plan
    from slmsearch.data import resolve_data_dir
    from slmsearch.models import resolve_model
    from slmsearch.search.config import load_study_config

    data = resolve_data_dir(None)
    settings = load_study_config(None).calibration
    base = Path(resolve_model(None))
    layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    cache = StageCache()
    rows = [{"name": "dense", "token_ppl": round(score(base, data), 3)}]
    dense = rows[0]["token_ppl"]
    gptq = run(Plan.from_dict([GPTQ]), None, data, settings, cache=cache)
    gptq_s = gptq.stage_seconds["gptq"]
    rows.append({"name": "gptq 3-bit g64", "token_ppl": round(score(gptq.checkpoint_dir, data), 3),
                 "stage_s": round(gptq_s, 1), "s_per_layer": round(gptq_s / layers, 2)})
    for rank in args.ranks:
        result = run(Plan.from_dict([GPTQ, {"stage": "eora", "rank": rank}]), None, data, settings, cache=cache)
        seconds = result.stage_seconds["eora"]
        rows.append({"name": f"+ eora {rank} (slmsearch, float32)", "token_ppl": round(score(result.checkpoint_dir, data), 3),
                     "stage_s": round(seconds, 1), "s_per_layer": round(seconds / layers, 2),
                     "per_gptq_layer": round(seconds / gptq_s, 3)})
        if args.gptqmodel:
            from transformers import AutoTokenizer

            calib = Calibration.from_data(AutoTokenizer.from_pretrained(str(base)), data, settings)
            with tempfile.TemporaryDirectory(prefix="eora-gptqmodel-") as tmp:
                seconds = gptqmodel_adapter(gptq.checkpoint_dir, base, calib, rank, Path(tmp) / "out")
                rows.append({"name": f"+ eora {rank} (gptqmodel, bf16)", "token_ppl": round(score(Path(tmp) / "out", data), 3),
                             "stage_s": round(seconds, 1), "s_per_layer": round(seconds / layers, 2),
                             "per_gptq_layer": round(seconds / gptq_s, 3)})
    for row in rows:
        row["ratio_to_dense"] = round(row["token_ppl"] / dense, 3)
        print(json.dumps(row), flush=True)
    write_result(OUT, {"machine": machine(), "compute_dtype": str(compute_dtype()).removeprefix("torch."),
                       "windows": "first 4 x 512 of wiki.test", "calibration": settings.to_dict(), "rows": rows})


if __name__ == "__main__":
    main()
