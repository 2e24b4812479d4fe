"""`slmsearch report`: a self-contained HTML page (images embedded) and its Markdown twin.

Sections: the study at a glance, the Pareto fronts (quality vs footprint with the budget line,
quality vs latency, exact match vs perplexity), every trial coloured by GPTQ bits and by layers
dropped, parameter importances per objective (Optuna's PED-ANOVA evaluator), the time spent per
stage, and the Pareto table. Reads the storage only.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmsearch.compress.plan import CANONICAL_ORDER, Plan
from slmsearch.errors import SlmsearchError
from slmsearch.search.pareto import format_rows, label, pareto_rows
from slmsearch.search.storage import LocatedStudy, redact
from slmsearch.search.trials import (
    BASELINE_ATTR, CACHE_HITS_ATTR, EVAL_SECONDS_ATTR, EVALUATED, FAILED, HW_ATTRS, OVER_BUDGET, PLAN_ATTR, PRUNED,
    QUALITY_ATTRS, REJECTED, STAGE_SECONDS_ATTR, feasible_evaluated, pareto_trials, status,
)

MIN_IMPORTANCE_TRIALS = 6  # PED-ANOVA wants a few trials in the top quantile; fewer says "not enough"
# The outcomes the report shows (trials.status; a rejected trial shows as over budget). Repeats and
# surplus trials did no work of their own, running and waiting ones have nothing measured yet.
STATUS_ORDER = (EVALUATED, OVER_BUDGET, PRUNED, FAILED)
STATUS_MARKERS = {EVALUATED: "o", OVER_BUDGET: "X", PRUNED: "v", FAILED: "s"}
BITS_ORDER = (2, 3, 4, 8, 16)
DPI = 110
BITS, DEPTH, OUTCOME = "GPTQ weights", "layers dropped", "outcome"  # legend titles = column names


@dataclass
class Figure:
    """One rendered figure: a file name, a title, a caption and the PNG bytes."""

    name: str
    title: str
    caption: str
    png: bytes


@dataclass
class Report:
    """What :func:`write_report` wrote."""

    html_path: Path
    md_path: Path
    figures: list[Path] = field(default_factory=list)


# --- data ------------------------------------------------------------------------------------

def trials_frame(study: Any, objectives: list[str]) -> Any:
    """One row per trial with an outcome the report shows (``STATUS_ORDER``): status, baseline/Pareto
    flags, the plan's label and per-stage columns (``Plan.columns``), and every metric."""
    import pandas as pd

    front = {t.number for t in pareto_trials(study)}
    rows = []
    for t in study.get_trials(deepcopy=False):
        outcome = status(t)
        outcome = OVER_BUDGET if outcome == REJECTED else outcome
        if outcome not in STATUS_ORDER:
            continue
        a = t.user_attrs
        plan = Plan.from_dict(a.get(PLAN_ATTR) or {})
        row: dict[str, Any] = {
            "trial": t.number, "status": outcome, "baseline": bool(a.get(BASELINE_ATTR)), "pareto": t.number in front,
            "plan": plan.label(), **plan.columns(),
            "stage_seconds": dict(a.get(STAGE_SECONDS_ATTR) or {}),
            "cache_hits": [str(h) for h in a[CACHE_HITS_ATTR]] if isinstance(a.get(CACHE_HITS_ATTR), list) else [],
            "eval_seconds": float((a.get(EVAL_SECONDS_ATTR) or {}).get("total", 0.0)),
        }
        for key in HW_ATTRS + QUALITY_ATTRS:
            value = a.get(key)
            usable = isinstance(value, (int, float)) and not isinstance(value, bool) and (key in HW_ATTRS or outcome != OVER_BUDGET)
            row[key] = float(value) if usable else math.nan
        for metric, value in zip(objectives, t.values or ()):
            if outcome == EVALUATED and math.isnan(row.get(metric, math.nan)):
                row[metric] = float(value)
        rows.append(row)
    frame = pd.DataFrame(rows)
    if frame.empty:
        return frame
    frame[BITS] = pd.Categorical(frame["gptq_bits"].map(_bits_label), categories=[_bits_label(b) for b in BITS_ORDER], ordered=True)
    frame[DEPTH] = frame["drop_layers"]
    frame[OUTCOME] = frame["status"]
    return frame


def _bits_label(bits: int) -> str:
    return "16 (no GPTQ)" if bits == 16 else f"{bits}-bit"


def quality_metric(objectives: list[str], frame: Any) -> str:
    """The perplexity the plots use: the first perplexity objective, else WikiText word/token ppl."""
    for metric in objectives:
        if metric.endswith("_ppl"):
            return metric
    for metric in ("wikitext_word_ppl", "wikitext_token_ppl"):
        if metric in frame and frame[metric].notna().any():
            return metric
    return "wikitext_word_ppl"


def importances(study: Any, objectives: list[str]) -> tuple[dict[str, dict[str, float]], str]:
    """Per objective, each parameter's PED-ANOVA importance over feasible evaluated trials.

    Returns ``({}, reason)`` when there are too few trials; ``reason`` is empty otherwise.
    """
    import optuna
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.trial import TrialState

    trials = [
        t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        if feasible_evaluated(t) and t.values is not None and all(math.isfinite(v) for v in t.values) and t.params
    ]
    if len(trials) < MIN_IMPORTANCE_TRIALS:
        return {}, f"not enough trials: {len(trials)} feasible evaluated, importances need at least {MIN_IMPORTANCE_TRIALS}"
    sub = optuna.create_study(directions=study.directions)  # in memory: only the trials that count
    sub.add_trials(trials)
    quantile = min(0.5, max(0.1, 5 / len(trials)))  # at least ~5 trials in the top quantile
    varied = [p for p in {p for t in trials for p in t.params}
              if len({repr(t.params[p]) for t in trials if p in t.params}) > 1]
    out: dict[str, dict[str, float]] = {}
    problems = []
    for i, metric in enumerate(objectives):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                out[metric] = get_param_importances(
                    sub, target=lambda t, i=i: t.values[i], params=sorted(varied),
                    evaluator=PedAnovaImportanceEvaluator(target_quantile=quantile),
                )
        except (RuntimeError, ValueError, ZeroDivisionError) as exc:
            problems.append(f"{metric}: {exc}")
    return out, "; ".join(problems)


# --- figures ---------------------------------------------------------------------------------

def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def _new_figure(rows: int, cols: int, width: float, height: float) -> tuple[Any, Any]:
    import seaborn as sns
    from matplotlib.figure import Figure as MplFigure

    sns.set_theme(style="whitegrid", context="notebook")
    fig = MplFigure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _front_2d(frame: Any, x: str, y: str, x_min: bool, y_min: bool) -> Any:
    """The non-dominated points of two columns, sorted by x (for a staircase line)."""
    pts = frame[[x, y]].dropna().to_numpy()
    keep = []
    for i, (a, b) in enumerate(pts):
        dominated = False
        for j, (c, d) in enumerate(pts):
            if i == j:
                continue
            better_x = c <= a if x_min else c >= a
            better_y = d <= b if y_min else d >= b
            strict = (c != a) or (d != b)
            if better_x and better_y and strict:
                dominated = True
                break
        if not dominated:
            keep.append((a, b))
    return sorted(set(keep))


def _mark_common(ax: Any, frame: Any, x: str, y: str, *, x_min: bool, y_min: bool) -> None:
    """Pareto rings, the 2-D front staircase and the baseline star on one axes."""
    ev = frame[frame["status"] == EVALUATED].dropna(subset=[x, y])
    front = _front_2d(ev, x, y, x_min, y_min)
    if len(front) > 1:
        xs, ys = zip(*front)
        ax.plot(xs, ys, drawstyle="steps-post" if x_min == y_min else "steps-pre", color="0.25", lw=1.2, ls="--",
                zorder=2, label="front of this pair")
    par = ev[ev["pareto"]]
    if len(par):
        ax.scatter(par[x], par[y], s=170, facecolors="none", edgecolors="black", linewidths=1.6, zorder=4,
                   label="Pareto-optimal (all objectives)")
    base = ev[ev["baseline"]]
    if len(base):
        ax.scatter(base[x], base[y], marker="*", s=380, color="gold", edgecolors="black", linewidths=1.0, zorder=5,
                   label="baseline (uncompressed)")


def _log_axis(axis: Any) -> None:
    """Log scale with 4-8 plain-number ticks (60, 80, 100) instead of 6x10^1; call after plotting."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    ticks: list[float] = []
    for subs in ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0), (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)):
        ticks = [m * 10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in subs]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 4:
            break
    step = max(1, math.ceil(len(ticks) / 8))
    axis.set_ticks(ticks[::step])
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _legend_outside(ax: Any, handles: list[Any] | None = None, labels: list[str] | None = None) -> None:
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=9, frameon=True)


def _merged_handles(axes: Any) -> tuple[list[Any], list[str]]:
    seen: dict[str, Any] = {}
    for ax in axes:
        for handle, text in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(text, handle)
        if ax.get_legend() is not None:
            ax.get_legend().remove()
    return list(seen.values()), list(seen)


def _budget_line(ax: Any, budget_mb: float | None) -> None:
    if budget_mb:
        ax.axvline(budget_mb, color="crimson", ls="-", lw=1.6, zorder=1, label=f"budget {budget_mb:g} MB")


def _footprint_axis(ax: Any, frame: Any, budget_mb: float | None) -> None:
    """Footprint axis around the evaluated trials and the budget; over-budget trials as red ticks
    (those beyond the axis counted in a note)."""
    ev = frame[frame["status"] == EVALUATED]["footprint_mb"].dropna()
    rej = frame[frame["status"] == OVER_BUDGET]
    right = max([*ev, budget_mb or 0.0]) * 1.25 if len(ev) or budget_mb else None
    left = min(ev) * 0.9 if len(ev) else None
    if len(rej):
        shown = rej[rej["footprint_mb"] <= right] if right else rej
        if len(shown):
            ax.plot(shown["footprint_mb"], [0.02] * len(shown), "|", transform=ax.get_xaxis_transform(), color="crimson",
                    ms=14, mew=1.6, label="over budget: not evaluated")
        base = rej[rej["baseline"]]
        note = (f"red ticks: {len(rej)} trial(s) over budget, not evaluated "
                f"({rej['footprint_mb'].min():.0f}-{rej['footprint_mb'].max():.0f} MB"
                + (f"; baseline {base['footprint_mb'].iloc[0]:.0f} MB)" if len(base) else ")"))
        ax.set_xlabel(ax.get_xlabel() + "\n" + note, fontsize=10)
    if right:
        ax.set_xlim(left, right)


def fronts_figure(frame: Any, ppl: str, budget_mb: float | None) -> Figure:
    """Quality vs footprint (budget line), quality vs latency, exact match vs perplexity."""
    import seaborn as sns

    fig, axes = _new_figure(1, 3, 18.5, 5.6)
    ev = frame[frame["status"] == EVALUATED]
    panels = [
        ("footprint_mb", ppl, True, True, "footprint (MB)", label(ppl) + ", log scale", "quality vs footprint"),
        ("decode_latency_s", ppl, True, True, "decode latency (s/token, Siracusa model)", label(ppl) + ", log scale", "quality vs latency"),
        (ppl, "triviaqa_exact_match", True, False, label(ppl) + ", log scale", "TriviaQA exact match (%)", "exact match vs perplexity"),
    ]
    for ax, (x, y, x_min, y_min, xl, yl, title) in zip(axes[0], panels):
        data = ev.dropna(subset=[x, y])
        if data.empty:
            ax.text(0.5, 0.5, "no evaluated trials yet", ha="center", va="center", transform=ax.transAxes)
        else:
            sns.scatterplot(data=data, x=x, y=y, hue=BITS, palette="viridis", s=60, ax=ax, zorder=3, edgecolor="white")
            _mark_common(ax, frame, x, y, x_min=x_min, y_min=y_min)
        ax.set(xlabel=xl, ylabel=yl, title=title)
        if x == "footprint_mb":
            _budget_line(ax, budget_mb)
            _footprint_axis(ax, frame, budget_mb)
        if y == ppl and not data.empty:
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
        if x == ppl and not data.empty:
            ax.set_xscale("log")
            _log_axis(ax.xaxis)
        if y == "triviaqa_exact_match":
            ax.yaxis.set_major_formatter(_percent())
    handles, labels = _merged_handles(axes[0])
    fig.legend(handles, labels, loc="outside right upper", fontsize=9)
    fig.suptitle("Pareto fronts (lower perplexity, higher exact match, smaller and faster are better)", fontsize=13)
    return Figure("fronts", "Pareto fronts",
                  "Each dot is an evaluated trial, coloured by GPTQ bits. Rings: Pareto-optimal on all the study's "
                  "objectives; dashed: the front of the two plotted quantities; star: the uncompressed baseline; red "
                  "ticks: trials rejected before compression because their footprint exceeds the budget.", _png(fig))


def _percent() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{100 * v:.0f}%" if abs(100 * v - round(100 * v)) < 1e-9 else f"{100 * v:.1f}%")


def settings_figure(frame: Any, ppl: str, budget_mb: float | None) -> Figure:
    """Every trial on the hardware axes, and the evaluated ones on quality, by bits and by depth."""
    import seaborn as sns

    fig, axes = _new_figure(2, 2, 16.5, 10.5)
    statuses = [st for st in STATUS_ORDER if st in set(frame[OUTCOME])]
    ev = frame[frame["status"] == EVALUATED].dropna(subset=[ppl])
    depth_norm = (0, max(1, int(frame[DEPTH].max())))
    for row, (hue, kwargs) in enumerate(((BITS, {"palette": "viridis"}), (DEPTH, {"palette": "flare", "hue_norm": depth_norm}))):
        ax = axes[row][0]
        sns.scatterplot(data=frame.dropna(subset=["footprint_mb", "decode_latency_s"]), x="footprint_mb", y="decode_latency_s",
                        hue=hue, style=OUTCOME, style_order=statuses, markers=STATUS_MARKERS, s=70, ax=ax, **kwargs)
        _budget_line(ax, budget_mb)
        ax.set(xlabel="footprint (MB)", ylabel="decode latency (s/token, Siracusa model)",
               title=f"every trial on the hardware model, coloured by {hue}")
        _legend_outside(ax)
        ax = axes[row][1]
        if ev.empty:
            ax.text(0.5, 0.5, "no evaluated trials yet", ha="center", va="center", transform=ax.transAxes)
        else:
            sns.scatterplot(data=ev, x="footprint_mb", y=ppl, hue=hue, s=70, ax=ax, legend=False, **kwargs)
            _mark_common(ax, frame, "footprint_mb", ppl, x_min=True, y_min=True)
            ax.set_yscale("log")
            _log_axis(ax.yaxis)
        _budget_line(ax, budget_mb)
        ax.set(xlabel="footprint (MB)", ylabel=label(ppl) + ", log scale", title=f"evaluated trials, coloured by {hue}")
        _legend_outside(ax)
    fig.suptitle("Every trial by GPTQ bits (top) and by layers dropped (bottom)", fontsize=13)
    return Figure("trials", "Every trial by bits and by depth",
                  "Left: all trials on the hardware model (marker = outcome: evaluated, over budget, pruned by the early "
                  "perplexity check, failed). Right: the evaluated trials' perplexity against footprint.", _png(fig))


def importance_figure(values: dict[str, dict[str, float]], reason: str, objectives: list[str]) -> Figure:
    """One bar chart of parameter importances per objective (or the reason there is none)."""
    import seaborn as sns

    fig, axes = _new_figure(1, max(1, len(objectives)), 5.6 * max(1, len(objectives)), 4.2)
    for ax, metric in zip(axes[0], objectives):
        imp = values.get(metric)
        if not imp:
            ax.text(0.5, 0.5, "not enough trials" if not reason else reason.replace("; ", "\n")[:160], ha="center",
                    va="center", wrap=True, transform=ax.transAxes, fontsize=10)
            ax.set_axis_off()
        else:
            names = list(imp)
            sns.barplot(x=[imp[n] for n in names], y=names, ax=ax, color="steelblue", orient="h")
            ax.set(xlabel="importance (PED-ANOVA, sums to 1)", ylabel="")
            ax.set_xlim(0, 1)
        ax.set_title(label(metric))
    fig.suptitle("Parameter importances per objective (feasible evaluated trials)", fontsize=13)
    return Figure("importances", "Parameter importances",
                  "How much each search parameter explains reaching the top quantile of each objective "
                  "(optuna.importance, PED-ANOVA). " + (reason or ""), _png(fig))


def stage_totals(frame: Any) -> dict[str, tuple[float, int]]:
    """Per stage (and ``evaluation``): total wall seconds over all trials and the number of cache hits."""
    out: dict[str, tuple[float, int]] = {}
    for _, r in frame.iterrows():
        for stage, seconds in r["stage_seconds"].items():
            total, hits = out.get(stage, (0.0, 0))
            out[stage] = (total + float(seconds), hits + (stage in r["cache_hits"]))
    evaluation = float(frame["eval_seconds"].sum()) if len(frame) else 0.0
    if evaluation:
        out["evaluation"] = (evaluation, 0)
    rank = {s: i for i, s in enumerate((*CANONICAL_ORDER, "evaluation"))}
    return dict(sorted(out.items(), key=lambda kv: rank.get(kv[0], 99)))


def stage_time_figure(frame: Any) -> Figure:
    """Seconds per stage for every trial that ran the pipeline, stacked; cache hits named."""
    import matplotlib as mpl

    ran = frame[frame["status"].isin([EVALUATED, PRUNED, FAILED])]
    ran = ran[ran["stage_seconds"].map(bool) | (ran["eval_seconds"] > 0)]
    fig, axes = _new_figure(1, 1, 13.0, max(3.0, 0.34 * len(ran) + 1.8))
    ax = axes[0][0]
    totals = stage_totals(ran) if len(ran) else {}
    if ran.empty:
        ax.text(0.5, 0.5, "no trial ran the compression pipeline", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        kinds = [*CANONICAL_ORDER, *sorted({k for d in ran["stage_seconds"] for k in d} - set(CANONICAL_ORDER)), "evaluation"]
        palette = mpl.colormaps["tab10"].colors
        labels = [f"trial {t}" + (" (baseline)" if b else "") + ("" if st == EVALUATED else f" [{st}]")
                  for t, b, st in zip(ran["trial"], ran["baseline"], ran["status"])]
        left = [0.0] * len(ran)
        for i, stage in enumerate(kinds):
            widths = [r["eval_seconds"] if stage == "evaluation" else float(r["stage_seconds"].get(stage, 0.0))
                      for _, r in ran.iterrows()]
            if any(widths):
                ax.barh(labels, widths, left=left, color=palette[i % len(palette)], label=stage, edgecolor="white")
                left = [a + b for a, b in zip(left, widths)]
        for y, (end, hits) in enumerate(zip(left, ran["cache_hits"])):
            if hits:
                ax.text(end, y, f"  cached: {', '.join(hits)}", va="center", fontsize=8, color="0.3")
        ax.set_xlim(0, max(left) * 1.25)
        ax.invert_yaxis()
        ax.set(xlabel="wall time (s)", ylabel="", title="Time per stage (compression stages, then evaluation)")
        _legend_outside(ax)
    summary = "; ".join(f"{k} {sec:.0f} s" + (f" ({hits} cache hits)" if hits else "") for k, (sec, hits) in totals.items())
    return Figure("stage_times", "Time per stage",
                  "Wall seconds each trial spent in each compression stage and in evaluation; a stage read from the "
                  "stage cache is named after its bar. Trials rejected by the budget take under a second and are left "
                  "out. Totals: " + (summary or "none") + ".", _png(fig))


# --- documents -------------------------------------------------------------------------------

def _counts(frame: Any) -> dict[str, int]:
    if frame.empty:
        return {s: 0 for s in STATUS_ORDER}
    return {s: int((frame["status"] == s).sum()) for s in STATUS_ORDER}


def _summary_items(located: LocatedStudy, frame: Any) -> list[tuple[str, str]]:
    from optuna.study import StudyDirection

    cfg = located.config
    directions = ["min" if d == StudyDirection.MINIMIZE else "max" for d in located.study.directions]
    counts = _counts(frame)
    base = frame[frame["baseline"]] if not frame.empty else frame
    base_note = "none enqueued"
    if len(base):
        b = base.iloc[0]
        base_note = f"trial {int(b['trial'])}, {b['status']}, {b['footprint_mb']:.1f} MB"
    return [
        ("study", located.name),
        ("storage", redact(located.url)),
        ("model", str(cfg.get("model") or "SmolLM2-135M-Instruct (default)")),
        ("platform", str(cfg.get("platform", "?"))),
        ("budget", f"{cfg['budget_mb']:g} MB" if cfg.get("budget_mb") else "?"),
        ("objectives", ", ".join(f"{label(m)} ({d})" for m, d in zip(located.objectives, directions))),
        ("trials", ", ".join(f"{n} {s}" for s, n in counts.items())),
        ("baseline", base_note),
        ("generated", dt.datetime.now().strftime("%Y-%m-%d %H:%M")),
    ]


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1500px;margin:24px auto;padding:0 20px;color:#222}
h1{margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 16px}
dl.summary dt{font-weight:600}dl.summary dd{margin:0}figure{margin:0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:14px;margin-top:4px}p.note{color:#555}
"""


def _html_table(md: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in md.strip().splitlines()]
    head, body = lines[0], lines[2:]
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr></thead><tbody>"]
    for row in body:
        cells = "".join(
            f"<td{'' if i == 1 else ' class=num'}>{html.escape(c.strip())}</td>" for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    return "".join(out) + "</tbody></table>"


def render_html(title: str, items: list[tuple[str, str]], figures: list[Figure], table_md: str, n_rows: int) -> str:
    """The report page with every figure embedded as a ``data:image/png;base64`` URI."""
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(title)}</h1><dl class=summary>"]
    parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in items]
    parts.append("</dl>")
    for fig in figures:
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(f"<h2 id={fig.name}>{html.escape(fig.title)}</h2><figure><img src=\"data:image/png;base64,{data}\" "
                     f"alt=\"{html.escape(fig.title)}\"><figcaption>{html.escape(fig.caption)}</figcaption></figure>")
    parts.append("<h2 id=pareto>Pareto table</h2>")
    if n_rows:
        parts.append(_html_table(table_md))
    else:
        parts.append("<p class=note>No feasible evaluated trial yet: nothing is Pareto-optimal.</p>")
    parts.append("<p class=note>Energy in mJ per generated token; latency and energy come from the analytical "
                 "hardware model, quality from the real evaluations.</p></body></html>")
    return "".join(parts)


def render_markdown(title: str, items: list[tuple[str, str]], figures: list[Figure], table_md: str, n_rows: int) -> str:
    """The Markdown twin: the same sections, images as files in ``figures/``."""
    lines = [f"# {title}", ""]
    lines += [f"- **{k}**: {v}" for k, v in items]
    for fig in figures:
        lines += ["", f"## {fig.title}", "", f"![{fig.title}](figures/{fig.name}.png)", "", fig.caption]
    lines += ["", "## Pareto table", ""]
    lines.append(table_md if n_rows else "No feasible evaluated trial yet: nothing is Pareto-optimal.")
    lines += ["", "Energy in mJ per generated token; latency and energy come from the analytical hardware model, "
              "quality from the real evaluations.", ""]
    return "\n".join(lines)


def build_figures(located: LocatedStudy, frame: Any) -> list[Figure]:
    """Every figure of the report, in page order."""
    objectives = located.objectives
    ppl = quality_metric(objectives, frame)
    budget = located.config.get("budget_mb")
    values, reason = importances(located.study, objectives)
    return [
        fronts_figure(frame, ppl, budget),
        settings_figure(frame, ppl, budget),
        importance_figure(values, reason, objectives),
        stage_time_figure(frame),
    ]


def write_report(located: LocatedStudy, out_dir: str | Path) -> Report:
    """Write ``report.html`` (self-contained), ``report.md`` and ``figures/*.png`` into ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise SlmsearchError(f"--out {str(out)!r} is a file; pass a folder for the report")
    frame = trials_frame(located.study, located.objectives)
    if frame.empty:
        raise SlmsearchError(f"study {located.name!r} has no finished trial yet; run `slmsearch optimize` first")
    figures = build_figures(located, frame)
    rows = pareto_rows(located.study)
    table_md = format_rows(rows, "md", located.objectives)
    title = f"slmsearch report: {located.name}"
    items = _summary_items(located, frame)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for fig in figures:
        path = out / "figures" / f"{fig.name}.png"
        path.write_bytes(fig.png)
        paths.append(path)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(title, items, figures, table_md, len(rows)), encoding="utf-8")
    md_path.write_text(render_markdown(title, items, figures, table_md, len(rows)), encoding="utf-8")
    return Report(html_path=html_path, md_path=md_path, figures=paths)
