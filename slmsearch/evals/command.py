"""`slmsearch eval`: resolve the model and data, score, and write a JSON record."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from slmsearch.data import data_hashes, resolve_data_dir
from slmsearch.errors import SlmsearchError
from slmsearch.evals.settings import METRICS, EvalSettings
from slmsearch.fsutil import write_json_atomic

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


def run_eval(
    *, model: str | None, trust_remote_code: bool, data_dir: str | None, tasks: str, metrics: str | None,
    seqlen: int, windows: str, pages: str, max_length: str, limit: str, shots: int, batch_size: int,
    dtype: str, out_path: str,
) -> dict[str, Any]:
    """Everything `slmsearch eval` does; returns the record plus its printable table."""
    from slmsearch.evals.runner import evaluate
    from slmsearch.models import load_model, resolve_model

    chosen = parse_metrics(tasks, metrics)
    settings = EvalSettings(
        metrics=chosen, token_seqlen=seqlen, token_windows=_count(windows, "--windows"),
        word_pages=_count(pages, "--pages"), word_max_length=_count(max_length, "--max-length", "model"),
        triviaqa_limit=_count(limit, "--limit"), triviaqa_shots=shots,
        logprob_limit=_count(limit, "--limit"), batch_size=batch_size,
    )
    folder = resolve_data_dir(data_dir)
    hashes = data_hashes(folder)
    location = resolve_model(model, trust_remote_code=trust_remote_code)
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
        "metrics": {k: v for k, v in values.items() if k not in {"counts", "seconds"}},
        "counts": values["counts"],
        "seconds": {"load": round(load_s, 3), **values["seconds"], "total": round(time.perf_counter() - start, 3)},
    }
    write_json_atomic(Path(out_path), record)
    return {**record, "table": format_table(values)}
