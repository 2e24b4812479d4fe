"""Run a plan: find the longest cached prefix, load it, apply the remaining stages, store each.

In-memory stages (depth, wanda, lora, embedding) run on one loaded model; folder stages (gptq,
eora) run on checkpoint folders. Every checkpoint written (cache entry or output) holds
``slmsearch.json`` (what the tensors cannot tell the hardware model), ``plan.json`` and
``reports.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmsearch.compress.cache import StageCache, entry_key
from slmsearch.compress.calib import CalibSettings, Calibration
from slmsearch.compress.gptq import EORA_DIR, Eora, Gptq, is_gptq_folder
from slmsearch.compress.gptqmodel_runtime import compute_device, gptqmodel_env
from slmsearch.compress.lora import ADAPTER_ATTR, LoraRecovery
from slmsearch.compress.plan import Plan
from slmsearch.compress.stage import StageReport
from slmsearch.compress.wanda import Wanda
from slmsearch.compress.embedding import EmbeddingQuant
from slmsearch import interrupt
from slmsearch.errors import SlmsearchError
from slmsearch.fsutil import atomic_dir, write_text_atomic

META_FILE = "slmsearch.json"
_CALIB_TOKENS: dict[tuple[Any, ...], Any] = {}  # one entry: the last base model's calibration windows
ADAPTER_DIR = EORA_DIR  # one adapter folder per checkpoint: EoRA (GPTQ) or a kept LoRA (peft)


@dataclass
class PipelineResult:
    """Where the compressed checkpoint is, and what each stage did."""

    checkpoint_dir: Path
    reports: list[StageReport]
    cache_hits: int = 0  # stages whose output came from the cache
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stage kind -> seconds (this run)
    plan: Plan | None = None


def checkpoint_meta(plan: Plan, *, base: str = "", fingerprint: str = "", calib: CalibSettings | None = None) -> dict[str, Any]:
    """The ``slmsearch.json`` content for the output of ``plan`` (see hwmodel.checkpoint_shape)."""
    # "embedding" is written only when a stage quantized it: otherwise the tensors' own dtype
    # (fp32 here) is the truth, and hwmodel uses a declared width only when it is smaller.
    meta: dict[str, Any] = {
        "sparsity": {"format": "dense", "density": 1.0},
        "plan": plan.to_dict(),
        "base_model": base,
        "base_fingerprint": fingerprint,
    }
    if calib is not None:
        meta["calibration"] = calib.key()
    for stage in plan.stages:
        if stage.is_noop():
            continue
        if isinstance(stage, Wanda) and stage.pattern != "structured":
            meta["sparsity"] = {"format": stage.pattern, "density": stage.density}
        elif isinstance(stage, EmbeddingQuant):
            meta["embedding"] = {"bits": stage.bits, "group_size": stage.group_size, "zero_bits": 0}
        elif isinstance(stage, LoraRecovery) and not stage.merge:
            meta["adapter"] = {"rank": stage.rank, "bits": 16}
        elif isinstance(stage, Eora):
            meta["adapter"] = {"rank": stage.rank, "bits": 16}
    return meta


def save_checkpoint(model: Any, tokenizer: Any, folder: Path) -> None:
    """``save_pretrained`` of model + tokenizer, and a kept LoRA adapter under ``adapter/``."""
    folder = Path(folder)
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    adapter = getattr(model, ADAPTER_ATTR, None)
    if adapter is not None:
        from safetensors.torch import save_file

        (folder / ADAPTER_DIR).mkdir(exist_ok=True)
        adapter["config"].save_pretrained(str(folder / ADAPTER_DIR))
        save_file({k: v.contiguous() for k, v in adapter["state"].items()}, str(folder / ADAPTER_DIR / "adapter_model.safetensors"))


def load_checkpoint(folder: str | os.PathLike[str], *, dtype: str = "float32", dense: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, tokenizer) for any pipeline output: plain HF (with a kept LoRA
    adapter applied through peft) or GPTQ (through gptqmodel, with its EoRA adapter).

    ``dtype`` is a plain model's; a GPTQ model computes in gptqmodel's dtype (bf16 on a CPU).
    ``dense``: a GPTQ model's quantized Linears become plain Linears in that dtype holding the
    dequantized weights, EoRA merged (:func:`slmsearch.compress.gptq.dequantize_to_dense`): the
    kernel model's function without its per-call dequantization. Evaluation uses it."""
    import torch
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SlmsearchError(f"{folder} is not a checkpoint folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    adapter_dir = folder / ADAPTER_DIR
    has_adapter = (adapter_dir / "adapter_config.json").is_file()
    if is_gptq_folder(folder):
        gptqmodel_env()
        from gptqmodel import GPTQModel
        from gptqmodel.adapter.adapter import Lora

        kwargs: dict[str, Any] = {}
        if has_adapter:
            rank = int(json.loads((adapter_dir / "adapter_config.json").read_text())["r"])
            kwargs["adapter"] = Lora(path=str(adapter_dir), rank=rank)
        wrapped = GPTQModel.load(str(folder), device=compute_device(), **kwargs)
        model = wrapped.model
        if dense:
            from slmsearch.compress.gptq import dequantize_to_dense

            dequantize_to_dense(model, model.dtype)  # the kernel's compute dtype (bf16 on a CPU)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=getattr(torch, dtype))
        if has_adapter:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter_dir))
    model.eval()
    return model, tokenizer


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[compress] {text}", file=sys.stderr, flush=True)


def _write_records(folder: Path, plan: Plan, reports: list[StageReport], meta: dict[str, Any]) -> None:
    write_text_atomic(folder / "plan.json", plan.to_json())
    write_text_atomic(folder / "reports.json", json.dumps([r.to_dict() for r in reports], indent=1, default=str))
    write_text_atomic(folder / META_FILE, json.dumps(meta, indent=1, sort_keys=True))


def _read_reports(folder: Path) -> list[StageReport]:
    path = folder / "reports.json"
    if not path.is_file():
        return []
    return [StageReport.from_dict(r) for r in json.loads(path.read_text())]


def run(
    plan: Plan,
    model_spec: str | os.PathLike[str] | None,
    data_dir: Path,
    calib: CalibSettings = CalibSettings(),
    *,
    cache: StageCache | None = None,
    out: Path | None = None,
    progress: bool = False,
) -> PipelineResult:
    """Compress ``model_spec`` with ``plan``; the checkpoint is in the cache, in ``out``, or both.

    With neither a cache nor ``out``, the checkpoint goes to a fresh temporary folder that the
    caller owns.
    """
    from slmsearch.models import load_model, model_fingerprint, resolve_model

    location = resolve_model(model_spec)
    fingerprint = model_fingerprint(location)
    work = plan.effective()
    stages = work.stages
    calib_key = calib.key()
    keys = [entry_key(fingerprint, p.to_dict(), calib_key) for p in work.prefixes()]
    gptq_idx = next((i for i, s in enumerate(stages) if isinstance(s, Gptq)), None)
    eora_idx = next((i for i, s in enumerate(stages) if isinstance(s, Eora)), None)

    # 1. The longest usable cached prefix.
    start, start_dir = 0, None
    if cache is not None:
        for i in range(len(stages), 0, -1):
            if eora_idx is not None and i > (gptq_idx or 0) and i <= eora_idx:
                # eora needs the dense checkpoint gptq read: cached too, or base itself
                dense_ok = gptq_idx == 0 or (cache.verify(keys[gptq_idx - 1]))
                if not dense_ok:
                    continue
            hit = cache.get(keys[i - 1])
            if hit is not None:
                start, start_dir = i, hit
                break
    reports = _read_reports(start_dir) if start_dir is not None else []
    result = PipelineResult(Path(), reports[:start], cache_hits=start, plan=plan)
    _say(progress, f"{len(stages)} stage(s), {start} from cache")

    scratch = Path(tempfile.mkdtemp(prefix="slmsearch-compress-"))
    try:
        current_dir: Path | None = start_dir if start_dir is not None else (Path(location) if Path(location).is_dir() else None)
        dense_dir: Path | None = None  # the folder gptq quantized (eora's base)
        if gptq_idx is not None and start > gptq_idx:
            dense_dir = cache.path(keys[gptq_idx - 1]) if (cache is not None and gptq_idx > 0) else Path(location)
        model = tokenizer = None
        memory_stages = [i for i in range(start, len(stages)) if not stages[i].works_on_dirs]
        needs_model = bool(memory_stages)
        if needs_model:
            model, tokenizer = load_model(start_dir if start_dir is not None else location)
            import torch

            if torch.cuda.is_available():
                model.to("cuda")
        else:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(current_dir) if current_dir is not None else location)
        score_dir = cache.score_dir() if cache is not None else None
        token_key = (fingerprint, str(data_dir), tuple(sorted(calib_key.items())))
        if token_key in _CALIB_TOKENS:  # same base model + settings: same tokenizer, same windows
            calibration = Calibration(calib, _CALIB_TOKENS[token_key], tokenizer, Path(data_dir), score_dir, fingerprint)
        else:
            calibration = Calibration.from_data(tokenizer, data_dir, calib, score_dir=score_dir, model_key=fingerprint)
            _CALIB_TOKENS.clear()
            _CALIB_TOKENS[token_key] = calibration.tokens

        for i in range(start, len(stages)):
            stage = stages[i]
            prefix = Plan(stages[: i + 1])
            meta = checkpoint_meta(prefix, base=location, fingerprint=fingerprint, calib=calib)
            _say(progress, f"stage {i + 1}/{len(stages)}: {stage.kind} {stage.to_dict()}")
            interrupt.check()
            if not stage.works_on_dirs:
                report = stage.apply(model, calibration)
                interrupt.check()  # a Ctrl-C a library swallowed: never cache what it interrupted
                result.reports.append(report)
                next_is_dir = i + 1 < len(stages) and stages[i + 1].works_on_dirs
                if cache is not None or next_is_dir:
                    fill = _fill_model(model, tokenizer, prefix, result.reports, meta)
                    current_dir = cache.put(keys[i], fill) if cache is not None else _scratch_put(scratch, i, fill)
                else:
                    current_dir = None  # in memory only
            else:
                if current_dir is None:
                    raise SlmsearchError("internal: a folder stage has no input folder")
                if isinstance(stage, Gptq):
                    dense_dir = current_dir
                holder: dict[str, StageReport] = {}

                def fill(tmp: Path, stage: Any = stage, src: Path = current_dir, prefix: Plan = prefix, meta: dict[str, Any] = meta) -> None:
                    holder["r"] = stage.apply_dir(src, tmp, calibration, dense_dir)
                    interrupt.check()  # a Ctrl-C the library caught: do not commit its output
                    _write_records(tmp, prefix, result.reports + [holder["r"]], meta)

                current_dir = cache.put(keys[i], fill) if cache is not None else _scratch_put(scratch, i, fill)
                result.reports.append(holder["r"])
            result.stage_seconds[stage.kind] = result.reports[-1].seconds
            _say(progress, f"  {stage.kind}: {result.reports[-1].seconds:.1f} s")

        # 2. The output folder.
        final_meta = checkpoint_meta(work, base=location, fingerprint=fingerprint, calib=calib)
        if out is not None:
            out = Path(out)
            if out.exists() and any(out.iterdir()):
                raise SlmsearchError(f"output folder {out} exists and is not empty; choose a new --out")
            if out.exists():
                out.rmdir()
            with atomic_dir(out) as tmp:
                if current_dir is not None:
                    _copy_checkpoint(current_dir, tmp)
                else:
                    save_checkpoint(model, tokenizer, tmp)
                _write_records(tmp, plan, result.reports, final_meta)
            result.checkpoint_dir = out
        elif current_dir is not None and (cache is not None and current_dir.parent == cache.root):
            result.checkpoint_dir = current_dir
        elif not stages and current_dir is not None:
            result.checkpoint_dir = current_dir  # nothing to do: the base checkpoint itself
        else:
            target = Path(tempfile.mkdtemp(prefix="slmsearch-ckpt-"))
            if current_dir is not None:
                _copy_checkpoint(current_dir, target)
            else:
                save_checkpoint(model, tokenizer, target)
            _write_records(target, plan, result.reports, final_meta)
            result.checkpoint_dir = target
        return result
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _fill_model(model: Any, tokenizer: Any, prefix: Plan, reports: list[StageReport], meta: dict[str, Any]) -> Any:
    def fill(tmp: Path) -> None:
        save_checkpoint(model, tokenizer, tmp)
        _write_records(tmp, prefix, reports, meta)

    return fill


def _scratch_put(scratch: Path, index: int, fill: Any) -> Path:
    folder = scratch / f"stage{index}"
    folder.mkdir()
    fill(folder)
    return folder


def _copy_checkpoint(src: Path, dst: Path) -> None:
    """Copy a checkpoint folder's files (not the cache bookkeeping) into ``dst``."""
    from slmsearch.compress.cache import LAST_USED, MANIFEST

    for path in Path(src).rglob("*"):
        rel = path.relative_to(src)
        if path.name in (MANIFEST, LAST_USED) or path.is_dir():
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dst / rel)


def compress_to_dir(
    plan: Plan | str | os.PathLike[str],
    model_spec: str | os.PathLike[str] | None,
    data_dir: Path | str | None,
    out_dir: Path | str,
    calib: CalibSettings = CalibSettings(),
    *,
    cache: StageCache | None = None,
    progress: bool = True,
) -> PipelineResult:
    """``slmsearch compress --plan plan.yaml --out DIR``: checkpoint + plan.json + reports.json +
    slmsearch.json in ``out_dir``, written atomically (nothing half-written on failure)."""
    from slmsearch.data import resolve_data_dir

    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    data = resolve_data_dir(data_dir)
    if data is None:
        raise SlmsearchError("compress needs the data folder (calibration text): pass --data-dir or set SLMSEARCH_DATA_DIR")
    return run(plan, model_spec, data, calib, cache=cache, out=Path(out_dir), progress=progress)
