"""A study's Pareto-optimal trials as a table (md, csv or json).

Read-only: nothing here writes to the storage. "Pareto-optimal" means feasible (within the
budget), evaluated (COMPLETE, not rejected) and not dominated on the study's objectives, as
:func:`slmsearch.search.trials.pareto_trials` decides.
"""

from __future__ import annotations

import csv
import io
import json
import math
from typing import Any

from slmsearch.compress.plan import Plan
from slmsearch.errors import SlmsearchError
from slmsearch.search.storage import LocatedStudy, objective_names
from slmsearch.search.trials import BASELINE_ATTR, PLAN_ATTR, pareto_trials

FORMATS = ("md", "csv", "json")
# Hardware-model columns every table shows after the objectives, with their units.
HW_COLUMNS = (("footprint_mb", "footprint (MB)"), ("tokens_per_s", "tokens/s"), ("energy_per_token_j", "energy/token (mJ)"))
UNITS = {
    "wikitext_word_ppl": "WikiText word ppl",
    "wikitext_token_ppl": "WikiText token ppl",
    "wikitext_byte_ppl": "WikiText byte ppl",
    "wikitext_bits_per_byte": "WikiText bits/byte",
    "triviaqa_exact_match": "TriviaQA exact match",
    "triviaqa_answer_logprob": "TriviaQA answer log-prob",
    "decode_latency_s": "decode latency (s/token)",
    "energy_per_token_j": "energy (J/token)",
    "footprint_mb": "footprint (MB)",
}


def label(metric: str) -> str:
    """A metric's display name with its unit."""
    return UNITS.get(metric, metric)


def trial_row(trial: Any, objectives: list[str]) -> dict[str, Any]:
    """One table row: trial number, plan label, each objective, then the hardware columns."""
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "trial": trial.number,
        "plan": Plan.from_dict(attrs.get(PLAN_ATTR) or {}).label(),
        "baseline": bool(attrs.get(BASELINE_ATTR, False)),
    }
    for i, metric in enumerate(objectives):
        row[metric] = trial.values[i] if trial.values is not None else attrs.get(metric)
    for key, _ in HW_COLUMNS:
        row[key] = attrs.get(key)
    return row


def pareto_rows(study: Any) -> list[dict[str, Any]]:
    """The Pareto-optimal trials as rows, sorted by their first objective (best first)."""
    from optuna.study import StudyDirection

    objectives = objective_names(study)
    sign = 1.0 if study.directions[0] == StudyDirection.MINIMIZE else -1.0
    trials = sorted(pareto_trials(study), key=lambda t: (sign * t.values[0], t.number))
    return [trial_row(t, objectives) for t in trials]


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else ""
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if key == "energy_per_token_j":
            return f"{value * 1e3:.3g}"
        if key == "triviaqa_exact_match":
            return f"{100 * value:.1f}%"
        if key == "footprint_mb":
            return f"{value:.1f}"
        return f"{value:.4g}"
    return str(value)


def format_rows(rows: list[dict[str, Any]], fmt: str, objectives: list[str]) -> str:
    """``rows`` as a Markdown table, CSV (raw numbers, SI units) or JSON (a list of objects)."""
    if fmt not in FORMATS:
        raise SlmsearchError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    hw = [(k, h) for k, h in HW_COLUMNS if k not in objectives]
    keys = ["trial", "plan", *objectives, *(k for k, _ in hw), "baseline"]
    if fmt == "json":
        return json.dumps([{k: r.get(k) for k in keys} for r in rows], indent=2)
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=keys, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k) for k in keys})
        return buffer.getvalue()
    headers = ["trial", "plan", *(label(m) for m in objectives), *(h for _, h in hw)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i != 1 else "---" for i in range(len(headers))) + "|"]
    for row in rows:
        trial = f"{row['trial']} (baseline)" if row.get("baseline") else str(row["trial"])
        cells = [trial, row["plan"], *(_cell(row.get(m), m) for m in objectives), *(_cell(row.get(k), k) for k, _ in hw)]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| " + " | ".join(["-"] * len(headers)) + " |")
    return "\n".join(lines) + "\n"


def pareto_table(located: LocatedStudy, fmt: str = "md") -> str:
    """The study's Pareto table in ``fmt`` (md, csv, json)."""
    return format_rows(pareto_rows(located.study), fmt, located.objectives)
