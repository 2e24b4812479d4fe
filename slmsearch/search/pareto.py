"""A study's Pareto-optimal trials as a table (md, csv or json), beside the uncompressed baseline.

Read-only: nothing here writes to the storage. "Pareto-optimal" means feasible (within the
budget), evaluated (COMPLETE, not rejected) and not dominated on the study's objectives, as
:func:`slmsearch.search.trials.pareto_trials` decides. The baseline (the enqueued uncompressed
model, evaluated even when over the budget) is the table's first row, every objective of the
other rows carries its ratio to the baseline's, and every quality metric says how many windows,
pages or questions it was measured on. The three formats hold the same numbers in the same units.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from typing import Any

from slmsearch.compress.plan import Plan
from slmsearch.errors import SlmsearchError
from slmsearch.search.storage import LocatedStudy, objective_names
from slmsearch.search.trials import (
    BASELINE_ATTR, EVAL_COUNTS_ATTR, EVALUATED, OVER_BUDGET, PLAN_ATTR, pareto_trials, status,
)

FORMATS = ("md", "csv", "json")
# Hardware-model columns every table shows after the objectives.
HW_COLUMNS = ("footprint_mb", "tokens_per_s", "energy_per_token_j")
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
    "tokens_per_s": "tokens/s",
}
# What each quality metric was measured on: its key in a trial's ``eval_counts`` and the noun.
SAMPLES = {
    "wikitext_token_ppl": ("wikitext_token_windows", "windows"),
    "wikitext_word_ppl": ("wikitext_pages", "pages"),
    "wikitext_byte_ppl": ("wikitext_pages", "pages"),
    "wikitext_bits_per_byte": ("wikitext_pages", "pages"),
    "triviaqa_exact_match": ("triviaqa_questions", "questions"),
    "triviaqa_answer_logprob": ("triviaqa_logprob_questions", "questions"),
}


@dataclass(frozen=True)
class Column:
    """A metric as every format shows it: csv/json field, Markdown header (with the unit), scale."""

    metric: str
    field: str
    header: str
    scale: float = 1.0
    spec: str = ".4g"  # Markdown number format

    def value(self, raw: Any) -> float | None:
        return None if raw is None else float(raw) * self.scale


COLUMNS = {
    "triviaqa_exact_match": Column("triviaqa_exact_match", "triviaqa_exact_match_pct", "TriviaQA exact match (%)", 100.0, ".1f"),
    "energy_per_token_j": Column("energy_per_token_j", "energy_per_token_mj", "energy/token (mJ)", 1e3, ".3g"),
    "footprint_mb": Column("footprint_mb", "footprint_mb", "footprint (MB)", 1.0, ".1f"),
}


def column(metric: str) -> Column:
    return COLUMNS.get(metric) or Column(metric, metric, label(metric))


def label(metric: str) -> str:
    """A metric's display name with its unit."""
    return UNITS.get(metric, metric)


def samples_text(metric: str, counts: dict[str, Any] | None) -> str:
    """How much data ``metric`` was measured on ("2 pages"), or "" when not recorded."""
    key, noun = SAMPLES.get(metric, ("", ""))
    n = (counts or {}).get(key)
    return f"{n} {noun}" if isinstance(n, int) else ""


def ratio(value: Any, reference: Any) -> float | None:
    """``value / reference``, or None when either is missing or the reference is 0."""
    if not isinstance(value, (int, float)) or not isinstance(reference, (int, float)) or reference == 0:
        return None
    out = float(value) / float(reference)
    return out if math.isfinite(out) else None


def metric_value(trial: Any, metric: str, objectives: list[str]) -> float | None:
    """What was measured for ``metric``: the user attribute the objective writes, else the
    objective value of a complete trial. None when nothing was measured."""
    value = trial.user_attrs.get(metric)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if metric in objectives and trial.values is not None and status(trial) == EVALUATED:
        return float(trial.values[objectives.index(metric)])
    return None


def baseline_trial(study: Any) -> Any | None:
    """The evaluated uncompressed baseline (within the budget or not), if the study has one."""
    for t in study.get_trials(deepcopy=False):
        if t.user_attrs.get(BASELINE_ATTR) and status(t) in (EVALUATED, OVER_BUDGET):
            return t
    return None


def trial_row(trial: Any, objectives: list[str], baseline: Any | None = None) -> dict[str, Any]:
    """One row: trial number, plan label, status, each objective and hardware value (raw units),
    each objective's ratio to ``baseline``'s, and the sample counts."""
    attrs = trial.user_attrs
    row: dict[str, Any] = {
        "trial": trial.number,
        "plan": Plan.from_dict(attrs.get(PLAN_ATTR) or {}).label(),
        "status": status(trial),
        "baseline": bool(attrs.get(BASELINE_ATTR, False)),
        "samples": dict(attrs.get(EVAL_COUNTS_ATTR) or {}),
        "ratios": {},
    }
    for metric in (*objectives, *HW_COLUMNS):
        row[metric] = metric_value(trial, metric, objectives)
    if baseline is not None:
        row["ratios"] = {m: ratio(row[m], metric_value(baseline, m, objectives)) for m in objectives}
    return row


def pareto_rows(study: Any) -> list[dict[str, Any]]:
    """The Pareto-optimal trials as rows, sorted by their first objective (best first), with
    ratios to the baseline when the study has an evaluated one."""
    from optuna.study import StudyDirection

    objectives = objective_names(study)
    sign = 1.0 if study.directions[0] == StudyDirection.MINIMIZE else -1.0
    trials = sorted(pareto_trials(study), key=lambda t: (sign * t.values[0], t.number))
    base = baseline_trial(study)
    return [{**trial_row(t, objectives, base), "pareto": True} for t in trials]


def baseline_row(study: Any) -> dict[str, Any] | None:
    """The baseline's row (its own ratios are 1), or None when it was not evaluated."""
    base = baseline_trial(study)
    if base is None:
        return None
    on_front = base.number in {t.number for t in pareto_trials(study)}
    return {**trial_row(base, objective_names(study), base), "pareto": on_front}


def _number(value: float | None, spec: str) -> str:
    if value is None:
        return "-"
    return format(value, spec) if math.isfinite(value) else str(value)


def _sample_keys(rows: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in rows for k in r.get("samples", {})))


def _header(col: Column, rows: list[dict[str, Any]]) -> str:
    texts = sorted({samples_text(col.metric, r.get("samples")) for r in rows} - {""})
    return col.header + (f" [n = {' / '.join(texts)}]" if texts else "")


def flat_record(row: dict[str, Any], objectives: list[str]) -> dict[str, Any]:
    """A row as the csv/json fields: the same numbers, in the same units, as the Markdown table."""
    columns = [column(m) for m in objectives] + [column(k) for k in HW_COLUMNS if k not in objectives]
    out: dict[str, Any] = {key: row.get(key) for key in ("trial", "plan", "status", "baseline", "pareto")}
    for col in columns:
        out[col.field] = col.value(row.get(col.metric))
    for metric in objectives:
        out[f"{column(metric).field}_vs_baseline"] = row.get("ratios", {}).get(metric)
    return out


def format_rows(rows: list[dict[str, Any]], fmt: str, objectives: list[str], baseline: dict[str, Any] | None = None) -> str:
    """The baseline (when given) and ``rows`` as a Markdown table with a note, CSV or JSON.

    Units are the Markdown headers' in every format (exact match in %, energy in mJ); ratios are
    to the baseline's value (``*_vs_baseline``); ``samples`` are the windows/pages/questions."""
    if fmt not in FORMATS:
        raise SlmsearchError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if baseline is not None:
        rows = [baseline, *(r for r in rows if r["trial"] != baseline["trial"])]
    records = [flat_record(r, objectives) for r in rows]
    sample_keys = _sample_keys(rows)
    if fmt == "json":
        return json.dumps([{**rec, "samples": r.get("samples", {})} for rec, r in zip(records, rows)], indent=2)
    if fmt == "csv":
        keys = list(records[0]) if records else list(flat_record(_EMPTY_ROW, objectives))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=[*keys, *(f"n_{k}" for k in sample_keys)], lineterminator="\n")
        writer.writeheader()
        for rec, r in zip(records, rows):
            writer.writerow({**rec, **{f"n_{k}": r.get("samples", {}).get(k) for k in sample_keys}})
        return buffer.getvalue()
    obj_cols = [column(m) for m in objectives]
    hw_cols = [column(k) for k in HW_COLUMNS if k not in objectives]
    headers = ["trial", "plan", *(_header(c, rows) for c in obj_cols), *(c.header for c in hw_cols)]
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" if i != 1 else "---" for i in range(len(headers))) + "|"]
    for r in rows:
        name = str(r["trial"])
        if r["baseline"]:
            name += " (baseline" + (", over budget)" if r["status"] == OVER_BUDGET else ")")
        cells = [name, r["plan"] or "uncompressed"]
        for c in obj_cols:
            cell = _number(c.value(r.get(c.metric)), c.spec)
            share = r.get("ratios", {}).get(c.metric)
            if share is not None and not r["baseline"] and baseline is not None:
                cell += f" ({share:.2f}x)"
            cells.append(cell)
        cells += [_number(c.value(r.get(c.metric)), c.spec) for c in hw_cols]
        lines.append("| " + " | ".join(cells) + " |")
    if not rows:
        lines.append("| " + " | ".join(["-"] * len(headers)) + " |")
    note = table_note(baseline, rows, objectives)
    return "\n".join(lines) + "\n" + (f"\n{note}\n" if note else "")


_EMPTY_ROW: dict[str, Any] = {"trial": None, "plan": None, "status": None, "baseline": None, "pareto": None}


def table_note(baseline: dict[str, Any] | None, rows: list[dict[str, Any]], objectives: list[str]) -> str:
    """One line under the Markdown table: what the ratios are to, and the sample sizes."""
    parts = []
    if baseline is not None:
        where = "over budget, shown for reference" if baseline["status"] == OVER_BUDGET else "within the budget"
        parts.append(f"(Nx) = the value divided by the baseline's (trial {baseline['trial']}, uncompressed, "
                     f"{_number(baseline.get('footprint_mb'), '.1f')} MB, {where}).")
    else:
        parts.append("No evaluated baseline in this study: no ratios.")
    quality = [m for m in objectives if m in SAMPLES]
    if quality and not any(r.get("samples") for r in rows):
        parts.append("Sample sizes were not recorded.")
    return " ".join(parts)


def pareto_table(located: LocatedStudy, fmt: str = "md") -> str:
    """The study's Pareto table in ``fmt`` (md, csv, json), the baseline first."""
    return format_rows(pareto_rows(located.study), fmt, located.objectives, baseline_row(located.study))
