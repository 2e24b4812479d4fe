"""`slmsearch eval`: resolve the model and data, score, and write a JSON record.

On a folder that `slmsearch export` wrote, the defaults are the study's own evaluation settings
(from its ``trial.json``), so that the numbers are comparable with the model card's; a flag given
on the command line overrides its setting. Elsewhere the defaults are ``DEFAULTS``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from slmsearch.data import data_hashes, resolve_data_dir
from slmsearch.errors import SlmsearchError
from slmsearch.evals.settings import METRICS, EvalSettings
from slmsearch.fsutil import write_json_atomic

EXPORT_RECORD = "trial.json"  # the model card's data in an exported folder (search/export.py writes it)
# The defaults when the model is not an export: the command line's words for each option.
DEFAULTS = {"tasks": "wikitext,triviaqa", "seqlen": 512, "windows": "8", "pages": "4", "max_length": "2048",
            "limit": "100", "shots": 5, "batch_size": 8}

TASK_METRICS = {
    "wikitext": ("wikitext_word_ppl", "wikitext_token_ppl"),
    "triviaqa": ("triviaqa_exact_match", "triviaqa_answer_logprob"),
}


def _count(text: str, name: str, all_word: str = "all") -> int | None:
    if text in (all_word, "model"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise SlmsearchError(f"{name} must be an integer or '{all_word}', got {text!r}") from None
    if value < 1:
        raise SlmsearchError(f"{name} must be >= 1, got {value}")
    return value


def parse_metrics(tasks: str, metrics: str | None) -> tuple[str, ...]:
    """The metric tuple for a comma list of tasks (and optionally metrics); unknown names rejected."""
    chosen: list[str] = []
    for task in (t.strip() for t in tasks.split(",") if t.strip()):
        if task not in TASK_METRICS:
            raise SlmsearchError(f"unknown task {task!r}; known tasks: {', '.join(TASK_METRICS)}")
        chosen.extend(TASK_METRICS[task])
    if metrics:
        wanted = [m.strip() for m in metrics.split(",") if m.strip()]
        for name in wanted:
            if name not in METRICS:
                raise SlmsearchError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        chosen = [m for m in chosen if m in wanted] or wanted
    if not chosen:
        raise SlmsearchError("no metric chosen; pass --tasks wikitext,triviaqa")
    return tuple(chosen)


def format_table(values: dict[str, Any]) -> str:
    rows = [(k, v) for k, v in values.items() if k not in {"counts", "seconds"}]
    width = max(len(k) for k, _ in rows) if rows else 10
    lines = [f"{'metric':<{width}}  value", f"{'-' * width}  ----------"]
    lines += [f"{k:<{width}}  {v:.4f}" for k, v in rows]
    counts = values.get("counts", {})
    if counts:
        lines.append("samples: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
    return "\n".join(lines)


def export_settings(location: str) -> EvalSettings | None:
    """The evaluation settings an exported folder was scored with (its ``trial.json``), or None."""
    record_path = Path(location) / EXPORT_RECORD
    if not record_path.is_file():
        return None
    try:
        stored = json.loads(record_path.read_text(encoding="utf-8")).get("eval_settings")
    except (OSError, ValueError, AttributeError):
        raise SlmsearchError(f"{record_path} is not a readable export record; re-export the trial or pass every eval flag") from None
    return EvalSettings.from_dict(stored) if isinstance(stored, dict) else None


def eval_settings(
    stored: EvalSettings | None, *, tasks: str | None, metrics: str | None, seqlen: int | None, windows: str | None,
    pages: str | None, max_length: str | None, limit: str | None, shots: int | None, batch_size: int | None,
) -> EvalSettings:
    """``stored`` (an export's settings) or today's ``DEFAULTS``, with every option given (not None) applied."""
    if stored is None:
        given = {"tasks": tasks, "seqlen": seqlen, "windows": windows, "pages": pages, "max_length": max_length,
                 "limit": limit, "shots": shots, "batch_size": batch_size}
        merged = {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
        return eval_settings(EvalSettings(metrics=parse_metrics(str(merged["tasks"]), metrics)), metrics=None,
                             **{**merged, "tasks": None})
    changes: dict[str, Any] = {}
    if tasks is not None or metrics is not None:
        changes["metrics"] = parse_metrics(tasks or DEFAULTS["tasks"], metrics)
    if seqlen is not None:
        changes["token_seqlen"] = seqlen
    if windows is not None:
        changes["token_windows"] = _count(windows, "--windows")
    if pages is not None:
        changes["word_pages"] = _count(pages, "--pages")
    if max_length is not None:
        changes["word_max_length"] = _count(max_length, "--max-length", "model")
    if limit is not None:
        changes["triviaqa_limit"] = changes["logprob_limit"] = _count(limit, "--limit")
    if shots is not None:
        changes["triviaqa_shots"] = shots
    if batch_size is not None:
        changes["batch_size"] = batch_size
    return dataclasses.replace(stored, **changes)


def run_eval(
    *, model: str | None, trust_remote_code: bool, data_dir: str | None, tasks: str | None, metrics: str | None,
    seqlen: int | None, windows: str | None, pages: str | None, max_length: str | None, limit: str | None,
    shots: int | None, batch_size: int | None, dtype: str, out_path: str,
) -> dict[str, Any]:
    """Everything `slmsearch eval` does; returns the record plus its printable table. An option left
    None takes the exported folder's setting, else ``DEFAULTS``."""
    from slmsearch.evals.runner import evaluate
    from slmsearch.models import load_model, resolve_model

    given = dict(tasks=tasks, metrics=metrics, seqlen=seqlen, windows=windows, pages=pages, max_length=max_length,
                 limit=limit, shots=shots, batch_size=batch_size)
    eval_settings(None, **given)  # bad flags are one error line before any model is resolved
    location = resolve_model(model, trust_remote_code=trust_remote_code)
    stored = export_settings(location)
    settings = eval_settings(stored, **given)
    folder = resolve_data_dir(data_dir)
    hashes = data_hashes(folder)
    start = time.perf_counter()
    lm, tokenizer = load_model(location, dtype=dtype, trust_remote_code=trust_remote_code)
    load_s = time.perf_counter() - start
    values = evaluate(lm, tokenizer, folder, settings, log=lambda m: print(m, flush=True))
    record = {
        "model": location,
        "dtype": dtype,
        "data_dir": str(folder) if folder else None,
        "data_sha256": hashes,
        "settings": settings.to_dict(),
        "settings_from": f"{EXPORT_RECORD} of the export (flags given override)" if stored else "the eval defaults",
        "metrics": {k: v for k, v in values.items() if k not in {"counts", "seconds"}},
        "counts": values["counts"],
        "seconds": {"load": round(load_s, 3), **values["seconds"], "total": round(time.perf_counter() - start, 3)},
    }
    write_json_atomic(Path(out_path), record)
    return {**record, "table": f"settings: {record['settings_from']}\n" + format_table(values)}
