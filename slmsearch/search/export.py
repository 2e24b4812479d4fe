"""`slmsearch export`: one folder per trial with the compressed checkpoint and a model card.

The checkpoint is rebuilt by the compression pipeline from the trial's recorded plan, reusing the
stage cache where entries survive and recomputing the rest. Each folder holds the checkpoint in
the format its stages produce (plain transformers safetensors, or gptqmodel's format with the
EoRA adapter in ``adapter/``), ``README.md`` (a model card: a two-line loading snippet, the plan, the
measured metrics, the hardware estimate, data hashes and seeds) and ``trial.json`` (the same
record, machine-readable). A folder is complete or absent: it is written under a temporary name,
with a ``MANIFEST.json`` of every file's size and sha256, and renamed at the end; an existing
``trial-NNNN`` folder is kept only when it matches its manifest, and is rebuilt otherwise (left
half-written by a killed export of an older version, or changed since). Remote code runs only
with ``--trust-remote-code`` on the export's own command line, never because the study says so.
The card names the base model and the storage without local paths (the model's folder name or hub
id, the SQLite file's name).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmsearch.errors import SlmsearchError
from slmsearch.search.config import GB, calibration_from, evaluation_from
from slmsearch.search.pareto import baseline_trial, label, ratio, samples_text
from slmsearch.search.storage import LocatedStudy, redact
from slmsearch.search.trials import (
    BASELINE_ATTR, EARLY_PPL_ATTR, EVAL_COUNTS_ATTR, FAILED, HW_ATTRS, OVER_BUDGET, OVER_BUDGET_ATTR, PLAN_ATTR, QUALITY_ATTRS,
    REJECTED, REJECTED_ATTR, RUNNING, SURPLUS, WAITING, pareto_trials, status,
)


@dataclass(frozen=True)
class Exported:
    """One exported trial: its number, folder, and whether it was written now or found complete."""

    trial: int
    folder: Path
    written: bool
    checkpoint_format: str = ""
    stages_from_cache: int = 0  # pipeline stages read from the stage cache instead of recomputed
    replaced: bool = False  # an existing folder did not match its manifest and was rebuilt


def folder_name(number: int) -> str:
    return f"trial-{number:04d}"


def exportable(trial: Any) -> None:
    """Raise a one-line error unless ``trial`` is an evaluated trial within the budget."""
    from optuna.trial import TrialState

    n = trial.number
    hint = "export an evaluated trial within the budget, e.g. one that `slmsearch pareto` lists"
    outcome = status(trial)
    if outcome == REJECTED:
        reason = trial.user_attrs.get(REJECTED_ATTR) or "footprint over budget"
        raise SlmsearchError(f"trial {n} was over budget ({reason}) and never compressed or evaluated; {hint}")
    if outcome == OVER_BUDGET:  # the uncompressed baseline, evaluated for reference
        reason = trial.user_attrs.get(OVER_BUDGET_ATTR) or "footprint over budget"
        raise SlmsearchError(f"trial {n} was over budget ({reason}): the baseline, evaluated for reference only; {hint}")
    if outcome in (FAILED, SURPLUS):
        raise SlmsearchError(f"trial {n} failed, so nothing was measured to stand behind; {hint}")
    if trial.state == TrialState.PRUNED:  # pruned, or a repeat of a pruned plan
        ppl = trial.user_attrs.get(EARLY_PPL_ATTR)
        at = f" (early token ppl {ppl:.1f})" if isinstance(ppl, (int, float)) else ""
        raise SlmsearchError(f"trial {n} was pruned by the early perplexity check{at}; {hint}")
    if outcome in (RUNNING, WAITING):
        raise SlmsearchError(f"trial {n} is {outcome}, not finished; wait for it or {hint}")
    if trial.values is None or not all(math.isfinite(v) for v in trial.values):
        raise SlmsearchError(f"trial {n} has no finite objective values; {hint}")
    if not isinstance(trial.user_attrs.get(PLAN_ATTR), dict):
        raise SlmsearchError(f"trial {n} has no recorded plan (user attribute 'plan'); it cannot be rebuilt")


def select_trials(located: LocatedStudy, *, pareto: bool = False, numbers: tuple[int, ...] = ()) -> list[Any]:
    """The trials to export: the Pareto-optimal ones and/or the numbered ones (each checked)."""
    if not pareto and not numbers:
        raise SlmsearchError("say what to export: --pareto (every Pareto-optimal trial) or --trial N")
    trials = located.study.get_trials(deepcopy=False)
    by_number = {t.number: t for t in trials}
    chosen: dict[int, Any] = {}
    if pareto:
        front = pareto_trials(located.study)
        if not front:
            raise SlmsearchError(f"study {located.name!r} has no Pareto-optimal trial yet; run `slmsearch optimize` longer")
        chosen.update((t.number, t) for t in front)
    for n in numbers:
        if n not in by_number:
            span = f"0-{max(by_number)}" if by_number else "none"
            raise SlmsearchError(f"no trial {n} in study {located.name!r} (trials: {span})")
        chosen[n] = by_number[n]
    for trial in chosen.values():
        exportable(trial)
    return [chosen[n] for n in sorted(chosen)]


def _checkpoint_format(folder: Path) -> str:
    from slmsearch.checkpoint import derived_gptq, has_adapter, has_packed_embedding, is_gptq_folder
    from slmsearch.compress.kvcache import folder_kv_settings

    adapter = has_adapter(folder)
    if is_gptq_folder(folder):
        fmt = ("gptq+eora" if adapter else "gptq") + (COMPACT_SUFFIX if derived_gptq(folder) else "")
    else:
        fmt = "hf+lora-adapter" if adapter else "hf"
    fmt += PACKED_SUFFIX if has_packed_embedding(folder) else ""
    kv = folder_kv_settings(folder)
    return fmt + (f"{KV_SUFFIX}{kv.bits}" if kv else "")


PACKED_SUFFIX = "+packed-embedding"  # the embedding is stored as packed codes + scales (slmsearch.checkpoint)
COMPACT_SUFFIX = "+compact"  # GPTQ tensors left out (slmsearch.gptq_compact): slmsearch.checkpoint.load rebuilds them
KV_SUFFIX = "+kv"  # the deployed KV cache is quantized: slmsearch.checkpoint.load computes with it


def load_snippet(name: str, fmt: str, adapter_rank: int | None) -> list[str]:
    """Two lines of Python that load the folder ``name`` in format ``fmt``."""
    from slmsearch.checkpoint import ADAPTER_DIR
    if PACKED_SUFFIX in fmt or KV_SUFFIX in fmt or COMPACT_SUFFIX in fmt:  # neither transformers nor gptqmodel reads these
        return ["from slmsearch.checkpoint import load",
                f'model, tokenizer = load("{name}")  # unpacks the embedding, rebuilds left-out GPTQ tensors; '
                "GPTQ through gptqmodel, adapters applied; attention on the KV cache's rounded keys and values"]
    if fmt == "gptq+eora":
        return ["from gptqmodel import GPTQModel; from gptqmodel.adapter.adapter import Lora",
                f'model = GPTQModel.load("{name}", adapter=Lora(path="{name}/{ADAPTER_DIR}", rank={adapter_rank}))']
    if fmt == "gptq":
        return ["from gptqmodel import GPTQModel", f'model = GPTQModel.load("{name}")']
    if fmt == "hf+lora-adapter":
        return ["from transformers import AutoModelForCausalLM; from peft import PeftModel",
                f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{name}"), "{name}/{ADAPTER_DIR}")']
    return ["from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model, tokenizer = AutoModelForCausalLM.from_pretrained("{name}"), AutoTokenizer.from_pretrained("{name}")']


def model_display(spec: Any, location: str) -> str:
    """The base model as a card shows it: a hub id as given, the default model by name, a local
    checkpoint by its folder's name (never an absolute local path)."""
    from slmsearch.models import DEFAULT_ALIASES, DEFAULT_MODEL

    if spec in (None, "") or str(spec) in DEFAULT_ALIASES:
        return f"SmolLM2-135M-Instruct (slmsearch default model {DEFAULT_MODEL!r})"
    path = Path(str(location))
    return path.name if path.is_absolute() or path.exists() else str(spec)


def storage_display(url: str) -> str:
    """The storage as a card shows it: a SQLite file by its name, any other URL redacted."""
    from slmsearch.search.storage import sqlite_path

    path = sqlite_path(url)
    return f"sqlite:///{path.name}" if path is not None else redact(url)


def trial_record(located: LocatedStudy, trial: Any, *, data_dir: Path, fmt: str, base: str, fingerprint: str) -> dict[str, Any]:
    """Everything the model card states, as JSON-able data."""
    import optuna

    import slmsearch
    from slmsearch.data import data_hashes

    a = trial.user_attrs
    cfg = located.config
    calibration = calibration_from(cfg.get("calibration"))
    evaluation = evaluation_from(cfg.get("evaluation"))
    return {
        "study": located.name,
        "storage": storage_display(located.url),
        "trial": trial.number,
        "baseline": bool(a.get(BASELINE_ATTR, False)),
        "params": dict(trial.params),
        "plan": a[PLAN_ATTR],
        "objectives": dict(zip(located.objectives, trial.values)),
        "metrics": {k: a[k] for k in QUALITY_ATTRS if k in a},
        "eval_counts": a.get(EVAL_COUNTS_ATTR, {}),
        "eval_settings": evaluation.to_dict(),
        "reference": reference_record(located.study),
        "hardware": {
            "platform": cfg.get("platform"), "platform_overrides": cfg.get("platform_overrides") or {},
            "context_len": cfg.get("context_len"), "budget_mb": cfg.get("budget_mb"),
            **{k: a.get(k) for k in HW_ATTRS}, "memory_bytes": a.get("memory_bytes"), "placement": a.get("placement"),
        },
        "seeds": {
            "sampler": cfg.get("seed"), "calibration": calibration.seed, "evaluation_fewshot": evaluation.seed,
        },
        "calibration": calibration.to_dict(),
        "data_sha256": data_hashes(data_dir),
        "base_model": model_display(cfg.get("model"), base),
        "base_fingerprint": fingerprint,
        "checkpoint_format": fmt,
        "versions": {"slmsearch": getattr(slmsearch, "__version__", "?"), "optuna": optuna.__version__},
    }


def reference_record(study: Any) -> dict[str, Any] | None:
    """The study's evaluated uncompressed baseline, what the card compares with (None: none evaluated)."""
    base = baseline_trial(study)
    if base is None:
        return None
    a = base.user_attrs
    return {"trial": base.number, "status": status(base), "footprint_mb": a.get("footprint_mb"),
            "metrics": {k: a[k] for k in QUALITY_ATTRS if k in a}, "eval_counts": a.get(EVAL_COUNTS_ATTR, {})}


def quality_table(record: dict[str, Any]) -> list[str]:
    """The card's quality rows: this model, the baseline, the ratio, and what each was measured on."""
    ref = record.get("reference")
    if not ref:
        rows = [f"| {label(k)} (`{k}`) | {_fmt(v, k)} | {samples_text(k, record['eval_counts']) or '-'} |"
                for k, v in record["metrics"].items()]
        return ["No evaluated baseline in this study to compare with.", "", "| metric | value | measured on |",
                "|---|---:|---|", *rows]
    where = "over budget, evaluated for reference" if ref["status"] == OVER_BUDGET else "within the budget"
    lines = [f"Beside the uncompressed baseline (trial {ref['trial']}, {_fmt(ref['footprint_mb'])} MB, {where}), "
             "measured on the same data; ratio = this model / baseline.", "",
             f"| metric | this model | baseline (trial {ref['trial']}) | ratio | measured on |", "|---|---:|---:|---:|---|"]
    for key, value in record["metrics"].items():
        reference = ref["metrics"].get(key)
        share = ratio(value, reference)
        lines.append(f"| {label(key)} (`{key}`) | {_fmt(value, key)} | {'-' if reference is None else _fmt(reference, key)} "
                     f"| {'-' if share is None else f'{share:.2f}x'} | {samples_text(key, record['eval_counts']) or '-'} |")
    return lines


def _fmt(value: Any, key: str = "") -> str:
    if isinstance(value, float):
        if key == "triviaqa_exact_match":
            return f"{100 * value:.1f}% ({value:.4f})"
        if key == "energy_per_token_j":
            return f"{value * 1e3:.3f} mJ"
        return f"{value:.6g}"
    return str(value)


DEPLOYED_WEIGHT_KINDS = ("embedding", "lm_head", "attention", "mlp", "norms", "scales_zeros", "sparsity_metadata", "adapters")


def size_section(record: dict[str, Any]) -> list[str]:
    """The card's "Size" section: bytes on disk beside the deployed bytes the footprint counts."""
    disk = record.get("disk_bytes")
    hw = record["hardware"]
    memory = hw.get("memory_bytes") or {}
    if not disk or not memory:
        return []
    weights = sum(int(memory.get(k, 0)) for k in DEPLOYED_WEIGHT_KINDS)
    kv, act = int(memory.get("kv_cache", 0)), int(memory.get("activations_peak", 0))

    def mb(n: int) -> str:
        return f"{n / 1e6:.2f} MB"

    gap = (disk["weights"] - weights) / weights if weights else 0.0
    return [
        "## Size: on disk and deployed",
        "",
        "| bytes | where | size |",
        "|---|---|---:|",
        f"| weight files (`*.safetensors`, adapter and packed embedding included) | on disk | {mb(disk['weights'])} |",
        f"| config, tokenizer and records (this card and `trial.json` not counted) | on disk | {mb(disk['other'])} |",
        f"| weights + scales/zeros + sparsity metadata + adapters | deployed | {mb(weights)} |",
        f"| KV cache ({hw.get('context_len')} positions, {_kv_width(record)}) | deployed | {mb(kv)} |",
        f"| peak activations (one decode step / prefill) | deployed | {mb(act)} |",
        f"| footprint (what the budget is compared with) | deployed | {mb(weights + kv + act)} |",
        "| code and runtime buffers | deployed | not counted: the platform's memory levels reserve space for them |",
        "",
        f"Why they differ: the weight files hold the weights the footprint counts ({100 * gap:+.1f}% apart: "
        "safetensors headers, and any tensor the files store in another width than the hardware model prices); "
        "a quantized embedding is stored as packed codes + 16-bit scales, as "
        "deployed (`slmsearch.checkpoint.load` unpacks it). The KV cache and activations exist only while the "
        "model runs, so they are in the footprint and not on disk; the tokenizer and config are on disk and not "
        "in the footprint.",
        "",
    ]


def _kv_width(record: dict[str, Any]) -> str:
    for stage in (record.get("plan") or {}).get("stages", []):
        if stage.get("stage") == "kv_cache" and int(stage.get("bits", 16)) < 16:
            return f"{stage['bits']}-bit, a 16-bit scale and zero per {stage.get('group_size')} channels"
    return "16-bit"


def model_card(record: dict[str, Any], name: str, adapter_rank: int | None) -> str:
    """The folder's README.md."""
    import yaml

    hw = record["hardware"]
    snippet = load_snippet(name, record["checkpoint_format"], adapter_rank)
    lines = [
        f"# {record['study']}: trial {record['trial']}" + (" (uncompressed baseline)" if record["baseline"] else ""),
        "",
        f"A compressed `{record['base_model']}` found by slmsearch (Optuna study `{record['study']}`, storage "
        f"`{record['storage']}`). Checkpoint format: **{record['checkpoint_format']}**.",
        "",
        "## Load it",
        "",
        "Run from the folder that holds this one (or replace the name with its path):",
        "",
        "```python",
        *snippet,
        "```",
        "",
        "Or `slmsearch.checkpoint.load(path)` for (model, tokenizer) in any format.",
        "",
        "## Plan",
        "",
        "```yaml",
        yaml.safe_dump(record["plan"], sort_keys=False).rstrip(),
        "```",
        "",
        "## Measured quality",
        "",
        *quality_table(record),
        "",
        f"Evaluation settings: `{json.dumps(record['eval_settings'], sort_keys=True)}`; "
        f"counts: `{json.dumps(record['eval_counts'], sort_keys=True)}`. `slmsearch eval --model {name}` "
        "re-scores with these settings (kept in `trial.json`) unless its flags say otherwise.",
        "",
        f"## Hardware estimate ({hw['platform']}, analytical model, context {hw['context_len']} tokens)",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| footprint (budget {_fmt(hw['budget_mb'])} MB) | {_fmt(hw['footprint_mb'])} MB |",
        f"| decode latency | {_fmt(hw['decode_latency_s'])} s/token |",
        f"| throughput | {_fmt(hw['tokens_per_s'])} tokens/s |",
        f"| energy | {_fmt(hw['energy_per_token_j'], 'energy_per_token_j')} per token |",
        "",
        "Memory (bytes by kind): `" + json.dumps(hw.get("memory_bytes"), sort_keys=True) + "`; placement: `"
        + json.dumps(hw.get("placement"), sort_keys=True, default=str) + "`.",
        "",
        *size_section(record),
        "## Reproducibility",
        "",
        f"- seeds: `{json.dumps(record['seeds'], sort_keys=True)}`; calibration: `{json.dumps(record['calibration'], sort_keys=True)}`",
        f"- base model fingerprint (sha256 of config + weights): `{record['base_fingerprint']}`",
        *(f"- data `{k}` sha256 `{v}`" for k, v in record["data_sha256"].items()),
        f"- trial parameters: `{json.dumps(record['params'], sort_keys=True)}`",
        f"- versions: `{json.dumps(record['versions'], sort_keys=True)}`",
        "",
        "`plan.json`, `reports.json` (what each stage did) and `slmsearch.json` (what the hardware model reads) "
        "sit beside the weights; `trial.json` holds this card's data.",
        "",
    ]
    return "\n".join(lines)


def export_trial(
    located: LocatedStudy, trial: Any, out_dir: Path, *, data_dir: Path, cache: Any = None, progress: bool = True,
    trust_remote_code: bool = False,
) -> Exported:
    """Rebuild ``trial``'s checkpoint (stage cache first) into ``out_dir/trial-NNNN`` with its card."""
    from slmsearch import checkpoint
    from slmsearch.compress import pipeline
    from slmsearch.compress.plan import Plan
    from slmsearch.compress.cache import check_manifest, write_manifest
    from slmsearch.fsutil import atomic_dir, owner_tag
    from slmsearch.models import model_fingerprint, resolve_model

    exportable(trial)
    final = Path(out_dir) / folder_name(trial.number)
    replaced = False
    if final.exists():
        if final.is_dir() and check_manifest(final) is not None:
            return Exported(trial.number, final, written=False)
        stale = final.parent / f".{final.name}.stale-{owner_tag()}-{time.monotonic_ns()}"
        os.rename(final, stale)  # half-written or changed: out of the way, then removed
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink()
        replaced = True
    cfg = located.config
    plan = Plan.from_dict(trial.user_attrs[PLAN_ATTR])
    location = resolve_model(cfg.get("model"), trust_remote_code=trust_remote_code)
    with atomic_dir(final) as tmp:
        result = pipeline.run(plan, location, data_dir, calibration_from(cfg.get("calibration")), cache=cache, out=tmp, progress=progress)
        fmt = _checkpoint_format(tmp)
        rank = checkpoint.adapter_rank(tmp)
        record = trial_record(located, trial, data_dir=data_dir, fmt=fmt, base=location, fingerprint=model_fingerprint(location))
        record["disk_bytes"] = checkpoint.disk_bytes(tmp)  # before this card and trial.json are written
        (tmp / "trial.json").write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
        (tmp / "README.md").write_text(model_card(record, final.name, rank), encoding="utf-8")
        write_manifest(tmp)  # last: an export is kept later only when every file matches it
    return Exported(trial.number, final, written=True, checkpoint_format=fmt, stages_from_cache=int(result.cache_hits),
                    replaced=replaced)


def export(
    located: LocatedStudy, out_dir: str | os.PathLike[str], *, pareto: bool = False, numbers: tuple[int, ...] = (),
    data_dir: str | os.PathLike[str] | None = None, cache: Any = None, progress: bool = True, log: Any = print,
    trust_remote_code: bool = False,
) -> list[Exported]:
    """Export the chosen trials (all checked before any work starts). ``trust_remote_code`` comes
    from the export's command line only (never from the study's stored configuration)."""
    from slmsearch.fsutil import sweep_stale

    from slmsearch.compress.cache import StageCache
    from slmsearch.data import resolve_data_dir

    trials = select_trials(located, pareto=pareto, numbers=numbers)
    folder = resolve_data_dir(data_dir if data_dir is not None else located.config.get("data_dir"))
    if folder is None:
        raise SlmsearchError("export needs the data folder the study calibrated on; pass --data-dir or set SLMSEARCH_DATA_DIR")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlmsearchError(f"--out {str(out)!r} is a file; pass a folder")
    if cache is None:
        cache_gb = located.config.get("cache_gb")
        cache = StageCache(max_bytes=int(float(cache_gb) * GB)) if cache_gb else StageCache()
    done = []
    if out.is_dir():
        sweep_stale(out)  # temporary folders of an export that was killed
    for trial in trials:
        item = export_trial(located, trial, out, data_dir=folder, cache=cache, progress=progress,
                            trust_remote_code=trust_remote_code)
        if item.replaced:
            log(f"trial {trial.number}: {item.folder} did not match its manifest (half-written or changed); rebuilt")
        if item.written:
            log(f"trial {trial.number}: wrote {item.folder} ({item.checkpoint_format}; {item.stages_from_cache} stage(s) from the cache)")
        else:
            log(f"trial {trial.number}: {item.folder} exists (complete), kept; delete it to export again")
        done.append(item)
    return done
