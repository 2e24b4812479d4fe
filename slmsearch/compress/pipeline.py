"""Run a plan: find the longest cached prefix, load it, apply the remaining stages, store each.

In-memory stages (depth, wanda, lora, embedding) run on one loaded model; folder stages (gptq,
eora) run on checkpoint folders. Every checkpoint written (cache entry or output) holds
``slmsearch.json`` (what the tensors cannot tell the hardware model), ``plan.json`` and
``reports.json``; :mod:`slmsearch.checkpoint` saves, loads and copies the folders.
"""

from __future__ import annotations

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slmsearch.compress.cache import StageCache, entry_key
from slmsearch.compress.calib import CalibSettings, Calibration
from slmsearch.compress.gptq import Eora, Gptq
from slmsearch.compress.plan import Plan
from slmsearch.compress.stage import StageReport
from slmsearch import checkpoint, interrupt
from slmsearch.errors import SlmsearchError
from slmsearch.fsutil import atomic_dir, owned_tmp_dir, release, sweep_stale, write_text_atomic

# Test-only: tests/search/test_slots.py sets this variable to a file path in the worker it kills or
# interrupts; the worker writes that file when it reaches its first stage to compute, then blocks
# there (answering Ctrl-C at once), so the test acts on a worker that is provably mid-trial.
TEST_BLOCK_ENV = "SLMSEARCH_TEST_ONLY_BLOCK_IN_STAGE"

if TYPE_CHECKING:
    from slmsearch.hwmodel.shape import ModelShape

_CALIB_TOKENS: dict[tuple[Any, ...], Any] = {}  # one entry: the last base model's calibration windows


@dataclass
class PipelineResult:
    """Where the compressed checkpoint is, and what each stage did."""

    checkpoint_dir: Path
    reports: list[StageReport]
    cache_hits: int = 0  # stages whose output came from the cache
    stage_seconds: dict[str, float] = field(default_factory=dict)  # stage kind -> seconds (this run)
    plan: Plan | None = None


def checkpoint_meta(plan: Plan, *, base: str = "", fingerprint: str = "", calib: CalibSettings | None = None) -> dict[str, Any]:
    """The ``slmsearch.json`` content for the output of ``plan`` (see hwmodel.checkpoint_shape):
    what its stages declare (:meth:`Plan.checkpoint_meta`), the plan, and where it started from."""
    meta = {**plan.checkpoint_meta(), "plan": plan.to_dict(), "base_model": base, "base_fingerprint": fingerprint}
    if calib is not None:
        meta["calibration"] = calib.key()
    return meta


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"[compress] {text}", file=sys.stderr, flush=True)



def _write_checkpoint(dst: Path, current_dir: Path | None, model: Any, tokenizer: Any, plan: Plan,
                      reports: list[StageReport], meta: dict[str, Any]) -> None:
    """The plan's output into ``dst``: the last folder copied, or the in-memory model saved, plus records."""
    if current_dir is not None:
        checkpoint.copy_folder(current_dir, dst)
    else:
        checkpoint.save(model, tokenizer, dst)
    checkpoint.write_records(dst, plan, reports, meta)

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
    plan.check_fits(model_geometry(location))  # before any model is loaded or stage run
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
    reports = checkpoint.read_reports(start_dir) if start_dir is not None else []
    result = PipelineResult(Path(), reports[:start], cache_hits=start, plan=plan)
    _say(progress, f"{len(stages)} stage(s), {start} from cache")

    sweep_stale(prefixes=("slmsearch-",))  # scratch folders of killed processes in the temporary folder
    scratch = owned_tmp_dir("slmsearch-compress-") if cache is None else None  # with a cache, stages go there
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
        calibration.base_location = location

        for i in range(start, len(stages)):
            stage = stages[i]
            prefix = Plan(stages[: i + 1])
            meta = checkpoint_meta(prefix, base=location, fingerprint=fingerprint, calib=calib)
            _say(progress, f"stage {i + 1}/{len(stages)}: {stage.kind} {stage.to_dict()}")
            _test_only_block(stage.kind)
            interrupt.check()
            if not stage.works_on_dirs:
                report = stage.apply(model, calibration)
                interrupt.check()  # a Ctrl-C a library swallowed: never cache what it interrupted
                result.reports.append(report)
                next_is_dir = i + 1 < len(stages) and stages[i + 1].works_on_dirs
                if cache is not None or next_is_dir:
                    fill = _fill_model(model, tokenizer, prefix, result.reports, meta)
                    current_dir = cache.put(keys[i], fill) if cache is not None else _scratch_put(scratch, i, fill)  # type: ignore[arg-type]
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
                    checkpoint.carry_packed(src, tmp)  # a quantized embedding's codes, past gptqmodel
                    checkpoint.write_records(tmp, prefix, result.reports + [holder["r"]], meta)

                current_dir = cache.put(keys[i], fill) if cache is not None else _scratch_put(scratch, i, fill)  # type: ignore[arg-type]
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
                _write_checkpoint(tmp, current_dir, model, tokenizer, plan, result.reports, final_meta)
                checkpoint.finish(tmp)  # a quantized embedding stored packed only: the size the footprint counts
            result.checkpoint_dir = out
        elif current_dir is not None and (cache is not None and current_dir.parent == cache.root):
            result.checkpoint_dir = current_dir
        elif not stages and current_dir is not None:
            result.checkpoint_dir = current_dir  # nothing to do: the base checkpoint itself
        else:
            target = owned_tmp_dir("slmsearch-ckpt-")  # the caller's until this process ends
            _write_checkpoint(target, current_dir, model, tokenizer, plan, result.reports, final_meta)
            result.checkpoint_dir = target
        return result
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
            release(scratch)


def _test_only_block(kind: str) -> None:
    """Test-only (see :data:`TEST_BLOCK_ENV`): write the marker file, then wait until killed or
    interrupted. Does nothing unless the variable is set."""
    marker = os.environ.get(TEST_BLOCK_ENV)
    if not marker:
        return
    import json
    import time

    write_text_atomic(Path(marker), json.dumps({"pid": os.getpid(), "stage": kind}) + "\n")
    while True:
        interrupt.check()
        time.sleep(0.05)


def _fill_model(model: Any, tokenizer: Any, prefix: Plan, reports: list[StageReport], meta: dict[str, Any]) -> Any:
    def fill(tmp: Path) -> None:
        checkpoint.save(model, tokenizer, tmp)
        checkpoint.write_records(tmp, prefix, reports, meta)

    return fill


def _scratch_put(scratch: Path, index: int, fill: Any) -> Path:
    folder = scratch / f"stage{index}"
    folder.mkdir()
    fill(folder)
    return folder


def model_geometry(location: str) -> ModelShape:
    """The shape of the model at ``location`` (a folder or a hub id) from its config alone: enough
    to check a plan against (:meth:`Plan.check_fits`) without reading a weight."""
    from slmsearch.hwmodel.shape import ModelShape
    from slmsearch.models import model_config

    return ModelShape.from_hf_config(model_config(location))


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
    from slmsearch.outputs import check_output_dir

    check_output_dir(out_dir)  # first: a bad --out costs nothing
    if not isinstance(plan, Plan):
        plan = Plan.load(plan)
    data = resolve_data_dir(data_dir)
    if data is None:
        raise SlmsearchError("compress needs the data folder (calibration text): pass --data-dir or set SLMSEARCH_DATA_DIR")
    from slmsearch.models import check_tensors, resolve_model

    location = resolve_model(model_spec)
    plan.check_fits(model_geometry(location))  # the plan fits the model, and the model is whole,
    check_tensors(location)  # before anything is loaded or printed
    return run(plan, model_spec, data, calib, cache=cache, out=Path(out_dir), progress=progress)
