"""In-memory stages at Llama-3.2-1B shape on a GPU (random weights: timing, memory, mechanics).

    .venv/bin/python bench/stages_1b_gpu.py DATA_DIR OUT.json [tiny]

Prints one JSON line per stage (seconds, peak GPU memory, the stage's metrics; for two stages a
save/reload check) and writes them all to OUT.json.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "compress"))
from conftest import byte_tokenizer  # noqa: E402  (the tests' 256-symbol tokenizer: ids fit any vocabulary)

from slmsearch.compress.calib import CalibSettings, Calibration  # noqa: E402
from slmsearch.compress.depth import DepthPrune  # noqa: E402
from slmsearch.compress.embedding import EmbeddingQuant  # noqa: E402
from slmsearch.compress.lora import LoraRecovery  # noqa: E402
from slmsearch.compress.wanda import Wanda  # noqa: E402

LLAMA32_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                  max_position_embeddings=4096, rope_theta=500000.0)
TINY = dict(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True)


def main(data_dir: str, out: str, size: str = "1b") -> None:
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = LlamaConfig(**(TINY if size == "tiny" else LLAMA32_1B))
    tok = byte_tokenizer()
    settings = CalibSettings(n_samples=32 if size != "tiny" else 4, seqlen=256 if size != "tiny" else 32, batch=8)
    calib = Calibration.from_data(tok, Path(data_dir), settings)
    rows = []

    def fresh():
        torch.manual_seed(0)
        with torch.device(dev):
            model = LlamaForCausalLM(copy.deepcopy(cfg))
        return model.float().eval()

    stages = {
        "depth drop2 angular": DepthPrune(drop=2),
        "depth drop2 ppl": DepthPrune(drop=2, by="ppl"),
        "wanda 50%": Wanda(sparsity=0.5),
        "wanda 2:4": Wanda(pattern="2:4"),
        "wanda structured mlp25% kv4": Wanda(pattern="structured", mlp_fraction=0.25, kv_groups=4),
        "lora r8 20 steps": LoraRecovery(rank=8, steps=20, batch=4, seqlen=256 if size != "tiny" else 32),
        "embedding 4 bit": EmbeddingQuant(bits=4),
    }
    for name, stage in stages.items():
        model = fresh()
        if dev == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        report = stage.apply(model, calib)
        if dev == "cuda":
            torch.cuda.synchronize()
        row = {"stage": name, "seconds": round(time.perf_counter() - t, 2),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if dev == "cuda" else None,
               "metrics": {k: v for k, v in report.metrics.items() if not isinstance(v, list) or len(v) < 20}}
        if name.startswith("wanda structured") or name.startswith("depth drop2 angular"):
            folder = Path("/tmp/slmsearch-stages-1b-gpu-ckpt")
            model.save_pretrained(folder)
            again = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(dev).eval()
            prompt = torch.tensor([[3, 14, 15, 92, 65]], device=dev)
            with torch.no_grad():
                same = torch.allclose(again(prompt).logits, model(prompt).logits, atol=1e-4)
                gen = again.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
                ids = prompt
                for _ in range(6):
                    ids = torch.cat([ids, again(ids, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)], 1)
            row["reload_same_logits"] = bool(same)
            row["generate_cache_equals_loop"] = bool(torch.equal(gen, ids))
            row["config"] = {k: getattr(again.config, k) for k in ("num_hidden_layers", "intermediate_size", "num_attention_heads", "num_key_value_heads")}
        rows.append(row)
        print(json.dumps(row), flush=True)
        del model
        if dev == "cuda":
            torch.cuda.empty_cache()
    Path(out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:])
