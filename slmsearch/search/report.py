"""`slmsearch report`: a self-contained HTML page (images embedded) and its Markdown twin.

The page opens with the answer: the best model under the budget, its quality against the
uncompressed baseline (ratios, sample sizes) and its hardware estimate. Then: the Pareto fronts
(quality vs footprint with the budget line, quality vs latency, exact match vs perplexity),
every trial coloured by GPTQ bits and by layers dropped, parameter importances per objective
(Optuna's PED-ANOVA evaluator), the time spent per stage, and the Pareto table with the baseline's
row. The baseline is drawn in every plot, marked over budget when it is. A section without data
is left out with one line saying why. Reads the storage only.
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
from slmsearch.search.hw_pairs import pair_lines
from slmsearch.search.pareto import (
    baseline_row, format_rows, label, pareto_rows, samples_text, table_note,
)
from slmsearch.search.storage import LocatedStudy, redact
from slmsearch.search.trials import (
    BASELINE_ATTR, CACHE_HITS_ATTR, EVAL_COUNTS_ATTR, EVAL_SECONDS_ATTR, EVALUATED, FAILED, HW_ATTRS, OVER_BUDGET,
    PLAN_ATTR, PRUNED, QUALITY_ATTRS, REJECTED, STAGE_SECONDS_ATTR, feasible_evaluated, pareto_trials, status,
)

MIN_IMPORTANCE_TRIALS = 6  # PED-ANOVA wants a few trials in the top quantile; fewer says "not enough"
# The outcomes the report shows (trials.status; a rejected trial shows as over budget). Repeats and
# surplus trials did no work of their own, running and waiting ones have nothing measured yet.
STATUS_ORDER = (EVALUATED, OVER_BUDGET, PRUNED, FAILED)
STATUS_MARKERS = {EVALUATED: "o", OVER_BUDGET: "X", PRUNED: "v", FAILED: "s"}
BITS_ORDER = (2, 3, 4, 8, 16)
# Okabe & Ito's colour-blind-safe palette, ordered so that neighbouring bit widths differ in hue
# and lightness: orange, sky blue, vermillion, bluish green, reddish purple.
BITS_COLORS = ("#E69F00", "#56B4E9", "#D55E00", "#009E73", "#CC79A7")
STAGE_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")  # Okabe-Ito
DPI = 110
PAGE_PX = 1240  # the report's content width in a 1280 px window (body padding): figures are drawn to read there
MIN_TEXT_PX = 11  # smallest text size on the page at that width
BITS, DEPTH, OUTCOME = "GPTQ weights", "layers dropped", "outcome"  # legend titles = column names


@dataclass
class Figure:
    """One rendered figure: a file name, a title, a caption and the PNG bytes (empty: a section
    left out, ``caption`` says why), plus what a reader can check: each axis's labelled ticks and
    the smallest text size."""

    name: str
    title: str
    caption: str
    png: bytes
    ticks: dict[str, list[str]] = field(default_factory=dict)  # "panel title: x" -> tick labels shown
    min_font_pt: float = 0.0
    width_px: int = 0

    def text_px_on_page(self, page_px: int = PAGE_PX) -> float:
        """The smallest text's height in screen pixels when the image is shown ``page_px`` wide at most."""
        return self.min_font_pt * DPI / 72 * min(1.0, page_px / max(1, self.width_px))


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
            "rejected": status(t) == REJECTED, "samples": dict(a.get(EVAL_COUNTS_ATTR) or {}),
            "plan": plan.label(), **plan.columns(),
            "stage_seconds": dict(a.get(STAGE_SECONDS_ATTR) or {}),
            "cache_hits": [str(h) for h in a[CACHE_HITS_ATTR]] if isinstance(a.get(CACHE_HITS_ATTR), list) else [],
            "eval_seconds": float((a.get(EVAL_SECONDS_ATTR) or {}).get("total", 0.0)),
        }
        for key in HW_ATTRS + QUALITY_ATTRS:
            value = a.get(key)
            usable = isinstance(value, (int, float)) and not isinstance(value, bool)  # measured (a rejection has none)
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

def _axes_ticks(fig: Any) -> dict[str, list[str]]:
    """Per visible axis of a drawn figure, the tick labels a reader sees (inside the view, non-empty)."""
    out: dict[str, list[str]] = {}
    for i, ax in enumerate(fig.axes):
        if not ax.axison:
            continue
        for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
            lo, hi = sorted(axis.get_view_interval())
            span = (hi - lo) * 1e-9
            shown = [
                text.get_text() for loc, text in zip(axis.get_majorticklocs(), axis.get_majorticklabels())
                if lo - span <= loc <= hi + span and text.get_visible() and text.get_text().strip()
            ]
            out[f"{ax.get_title() or f'axes {i}'}: {name}"] = shown
    return out


def _render(name: str, title: str, caption: str, fig: Any) -> Figure:
    """Draw ``fig`` once, record its ticks and smallest text, and keep the PNG."""
    from matplotlib.text import Text

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    png = buffer.getvalue()
    sizes = [t.get_fontsize() for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]
    width = int.from_bytes(png[16:20], "big")  # the PNG header's width field
    return Figure(name, title, caption, png, ticks=_axes_ticks(fig), min_font_pt=min(sizes, default=0.0), width_px=width)


def _omitted(name: str, title: str, why: str) -> Figure:
    """A section left out: no image, one line saying why."""
    return Figure(name, title, why, b"")


def _new_figure(rows: int, cols: int, width: float, height: float) -> tuple[Any, Any]:
    import seaborn as sns
    from matplotlib.figure import Figure as MplFigure

    sns.set_theme(style="whitegrid", context="notebook")  # 11-12 pt text: >= 11 px at the page's width
    fig = MplFigure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False)
    return fig, axes


def _bits_palette() -> dict[str, str]:
    return {_bits_label(b): c for b, c in zip(BITS_ORDER, BITS_COLORS)}


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
    """Pareto rings and the 2-D front staircase on one axes."""
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


def _baseline(frame: Any) -> Any | None:
    base = frame[frame["baseline"]] if not frame.empty else frame
    return base.iloc[0] if len(base) else None


def _baseline_label(base: Any) -> str:
    over = ", over budget" if base["status"] == OVER_BUDGET else ""
    return f"baseline (uncompressed, {base['footprint_mb']:.0f} MB{over})"


def _draw_baseline(ax: Any, frame: Any, x: str, y: str, *, quality_y: bool) -> None:
    """The baseline's star at its measured point, over budget or not. Beyond the x range (the
    footprint axis stops near the budget) it sits on the right edge with its value written; a
    dotted line carries its quality across the panel."""
    from matplotlib.transforms import blended_transform_factory

    base = _baseline(frame)
    if base is None or not (math.isfinite(base.get(x, math.nan)) and math.isfinite(base.get(y, math.nan))):
        return
    bx, by = float(base[x]), float(base[y])
    star = dict(marker="*", s=380, color="gold", edgecolors="black", linewidths=1.0, zorder=6, label=_baseline_label(base))
    if quality_y:
        ax.axhline(by, color="0.35", ls=":", lw=1.4, zorder=1)
    lo, hi = ax.get_xlim()
    if lo <= bx <= hi or ax.get_autoscalex_on():
        ax.scatter([bx], [by], **star)
        return
    edge = blended_transform_factory(ax.transAxes, ax.transData)
    ax.scatter([0.97], [by], transform=edge, clip_on=False, **star)
    ax.annotate(f"baseline at {bx:.0f} MB", xy=(0.95, by), xycoords=edge, ha="right", va="bottom", fontsize=11,
                color="0.2", xytext=(0, 6), textcoords="offset points")


def _log_axis(axis: Any) -> None:
    """Log scale with 3-8 plain-number ticks (25, 30, 40) instead of 10^1 and nothing else; call
    after plotting. Values spanning less than a decade get evenly spaced round ticks."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, MaxNLocator, NullFormatter, NullLocator

    lo, hi = sorted(axis.get_view_interval())
    if not (lo > 0 and hi > lo):
        return
    ticks: list[float] = []
    for subs in ((1.0,), (1.0, 3.0), (1.0, 2.0, 5.0), (1.0, 1.5, 2.0, 3.0, 5.0, 7.0), (1.0, 1.2, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0)):
        ticks = [m * 10.0**k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1) for m in subs]
        ticks = [t for t in ticks if lo <= t <= hi]
        if len(ticks) >= 4:
            break
    if len(ticks) < 3:  # less than a decade: round numbers on a linear grid inside the view
        ticks = [float(t) for t in MaxNLocator(nbins=5, steps=[1, 2, 2.5, 5, 10]).tick_values(lo, hi) if lo <= t <= hi]
    step = max(1, math.ceil(len(ticks) / 8))
    axis.set_major_locator(FixedLocator(ticks[::step]))
    axis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    axis.set_minor_locator(NullLocator())
    axis.set_minor_formatter(NullFormatter())


def _percent_axis(ax: Any, frame: Any, column: str) -> None:
    """Exact match from 0 (a share of questions) to a little above the largest value."""
    values = frame[column].dropna()
    top = float(values.max()) if len(values) else 0.0
    ax.set_ylim(0.0, top * 1.15 if top > 0 else 0.05)
    ax.yaxis.set_major_formatter(_percent())


def _legend_outside(ax: Any, handles: list[Any] | None = None, labels: list[str] | None = None) -> None:
    if handles is None:
        handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=11, frameon=True)


def _legend_below(ax: Any, ncol: int = 2) -> None:
    """The axes' legend under it (beside it, it squeezes the panel)."""
    handles, labels = ax.get_legend_handles_labels()
    if ax.get_legend() is not None:
        ax.get_legend().remove()
    if handles:
        ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=ncol, fontsize=11, frameon=False)


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
    """Footprint axis around the evaluated trials and the budget; trials rejected by the budget as
    red ticks (those beyond the axis counted in a note)."""
    ev = frame[frame["status"] == EVALUATED]["footprint_mb"].dropna()
    rej = frame[frame["rejected"]]
    right = max([*ev, budget_mb or 0.0]) * 1.25 if len(ev) or budget_mb else None
    left = min(ev) * 0.9 if len(ev) else None
    if len(rej):
        shown = rej[rej["footprint_mb"] <= right] if right else rej
        if len(shown):
            ax.plot(shown["footprint_mb"], [0.02] * len(shown), "|", transform=ax.get_xaxis_transform(), color="crimson",
                    ms=14, mew=1.6, label="over budget: not evaluated")
        note = (f"red ticks: {len(rej)} trial(s) over budget, not evaluated "
                f"({rej['footprint_mb'].min():.0f}-{rej['footprint_mb'].max():.0f} MB)")
        ax.set_xlabel(ax.get_xlabel() + "\n" + note, fontsize=11)
    if right:
        ax.set_xlim(left, right)


def _quality_panel(ax: Any, frame: Any, x: str, y: str, hue: str, palette: Any, budget_mb: float | None,
                   *, x_min: bool = True, y_min: bool = True, legend: bool = True, **kwargs: Any) -> bool:
    """Evaluated trials of ``y`` against ``x``, with fronts, budget, baseline and readable axes.
    Returns False (and says so on the axes) when nothing was evaluated."""
    import seaborn as sns

    ev = frame[frame["status"] == EVALUATED].dropna(subset=[x, y])
    if ev.empty:
        ax.text(0.5, 0.5, "no evaluated trials yet", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return False
    sns.scatterplot(data=ev, x=x, y=y, hue=hue, palette=palette, s=70, ax=ax, zorder=3, edgecolor="white",
                    legend=legend, **kwargs)
    _mark_common(ax, frame, x, y, x_min=x_min, y_min=y_min)
    if x == "footprint_mb":
        _budget_line(ax, budget_mb)
        _footprint_axis(ax, frame, budget_mb)
    _draw_baseline(ax, frame, x, y, quality_y=y in QUALITY_ATTRS)
    for metric, axis, scale in ((y, ax.yaxis, ax.set_yscale), (x, ax.xaxis, ax.set_xscale)):
        if metric.endswith("_ppl"):
            scale("log")
            _log_axis(axis)
    if y == "triviaqa_exact_match":
        _percent_axis(ax, frame[frame["status"].isin([EVALUATED, OVER_BUDGET])], y)
    return True


def _with_samples(text: str, metric: str, frame: Any) -> str:
    counts = {samples_text(metric, c) for c in frame["samples"]} - {""}
    return text + (f" (n = {' / '.join(sorted(counts))})" if counts else "")


def fronts_figure(frame: Any, ppl: str, budget_mb: float | None) -> Figure:
    """Quality vs footprint (budget line), quality vs latency, exact match vs perplexity."""
    fig, axes = _new_figure(2, 2, 13.0, 10.0)
    ppl_label = _with_samples(label(ppl), ppl, frame) + ", log scale"
    em_label = _with_samples("TriviaQA exact match", "triviaqa_exact_match", frame)
    panels = [
        ("footprint_mb", ppl, True, True, "footprint (MB)", ppl_label, "quality vs footprint"),
        ("decode_latency_s", ppl, True, True, "decode latency (s/token, Siracusa model)", ppl_label, "quality vs latency"),
        (ppl, "triviaqa_exact_match", True, False, ppl_label, em_label, "exact match vs perplexity"),
    ]
    flat = [axes[0][0], axes[0][1], axes[1][0]]
    for ax, (x, y, x_min, y_min, xl, yl, title) in zip(flat, panels):
        ax.set(xlabel=xl, ylabel=yl, title=title)
        if y not in frame or x not in frame:
            ax.text(0.5, 0.5, f"{label(y)} was not measured", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
            continue
        _quality_panel(ax, frame, x, y, BITS, _bits_palette(), budget_mb, x_min=x_min, y_min=y_min)
    handles, labels = _merged_handles(flat)
    legend_ax = axes[1][1]
    legend_ax.set_axis_off()
    if handles:
        legend_ax.legend(handles, labels, loc="center", fontsize=11, title="GPTQ weights and marks", frameon=False)
    fig.suptitle("Pareto fronts (lower perplexity, higher exact match, smaller and faster are better)", fontsize=14)
    return _render("fronts", "Pareto fronts",
                   "Each dot is an evaluated trial, coloured by GPTQ bits. Rings: Pareto-optimal on all the study's "
                   "objectives; dashed: the front of the two plotted quantities; star and dotted line: the uncompressed "
                   "baseline's measured quality (drawn even when it is over the budget; on the right edge when its "
                   "footprint is beyond the axis); red ticks: trials rejected before compression because their "
                   "footprint exceeds the budget.", fig)


def _percent() -> Any:
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda v, _: f"{100 * v:.0f}%" if abs(100 * v - round(100 * v)) < 1e-9 else f"{100 * v:.1f}%")


def settings_figure(frame: Any, ppl: str, budget_mb: float | None) -> Figure:
    """Every trial on the hardware axes, and the evaluated ones on quality, by bits and by depth."""
    import seaborn as sns

    fig, axes = _new_figure(2, 2, 13.0, 15.0)
    statuses = [st for st in STATUS_ORDER if st in set(frame[OUTCOME])]
    depth_norm = (0, max(1, int(frame[DEPTH].max())))
    for row, (hue, kwargs) in enumerate(((BITS, {"palette": _bits_palette()}), (DEPTH, {"palette": "flare", "hue_norm": depth_norm}))):
        ax = axes[row][0]
        sns.scatterplot(data=frame.dropna(subset=["footprint_mb", "decode_latency_s"]), x="footprint_mb", y="decode_latency_s",
                        hue=hue, style=OUTCOME, style_order=statuses, markers=STATUS_MARKERS, s=70, ax=ax, **kwargs)
        _budget_line(ax, budget_mb)
        _draw_baseline(ax, frame, "footprint_mb", "decode_latency_s", quality_y=False)
        ax.set(xlabel="footprint (MB)", ylabel="decode latency (s/token)", title=f"every trial, by {hue}")
        _legend_below(ax, ncol=3)
        ax = axes[row][1]
        palette = kwargs.pop("palette")
        ax.set(xlabel="footprint (MB)", ylabel=_with_samples(label(ppl), ppl, frame) + ", log", title=f"evaluated trials, by {hue}")
        _quality_panel(ax, frame, "footprint_mb", ppl, hue, palette, budget_mb, legend=False, **kwargs)
        _legend_below(ax, ncol=1)
    fig.suptitle("Every trial by GPTQ bits (top) and by layers dropped (bottom)", fontsize=14)
    return _render("trials", "Every trial by bits and by depth",
                   "Left: all trials on the hardware model (Siracusa; marker = outcome: evaluated, over budget, pruned "
                   "by the early perplexity check, failed). Right: the evaluated trials' perplexity against footprint. "
                   "Star: the uncompressed baseline.", fig)


def importance_figure(values: dict[str, dict[str, float]], reason: str, objectives: list[str]) -> Figure:
    """One bar chart of parameter importances per objective that has them; none: left out, with the reason."""
    import seaborn as sns

    title = "Parameter importances"
    shown = [m for m in objectives if values.get(m)]
    if not shown:
        return _omitted("importances", title, f"Left out: {reason or 'no importances could be computed'}.")
    fig, axes = _new_figure(1, len(shown), 4.4 * len(shown), 4.4)
    for ax, metric in zip(axes[0], shown):
        imp = values[metric]
        names = list(imp)
        sns.barplot(x=[imp[n] for n in names], y=names, ax=ax, color="#0072B2", orient="h")
        ax.set(xlabel="importance (sums to 1)", ylabel="", title=label(metric))
        ax.set_xlim(0, 1)
    fig.suptitle("Parameter importances per objective (PED-ANOVA, feasible evaluated trials)", fontsize=14)
    missing = [label(m) for m in objectives if m not in shown]
    return _render("importances", title,
                   "How much each search parameter explains reaching the top quantile of each objective "
                   "(optuna.importance, PED-ANOVA)."
                   + (f" Not shown: {', '.join(missing)} ({reason or 'no importances'})." if missing else ""), fig)


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
    ran = frame[frame["status"].isin([EVALUATED, OVER_BUDGET, PRUNED, FAILED])]
    ran = ran[ran["stage_seconds"].map(bool) | (ran["eval_seconds"] > 0)]
    title = "Time per stage"
    if ran.empty:
        return _omitted("stage_times", title, "Left out: no trial ran the compression pipeline or an evaluation.")
    fig, axes = _new_figure(1, 1, 11.5, max(3.0, 0.36 * len(ran) + 1.8))
    ax = axes[0][0]
    totals = stage_totals(ran)
    kinds = [*CANONICAL_ORDER, *sorted({k for d in ran["stage_seconds"] for k in d} - set(CANONICAL_ORDER)), "evaluation"]
    labels = [f"trial {t}" + (" (baseline)" if b else "") + ("" if st == EVALUATED else f" [{st}]")
              for t, b, st in zip(ran["trial"], ran["baseline"], ran["status"])]
    left = [0.0] * len(ran)
    for i, stage in enumerate(kinds):
        widths = [r["eval_seconds"] if stage == "evaluation" else float(r["stage_seconds"].get(stage, 0.0))
                  for _, r in ran.iterrows()]
        if any(widths):
            ax.barh(labels, widths, left=left, color=STAGE_COLORS[i % len(STAGE_COLORS)], label=stage, edgecolor="white")
            left = [a + b for a, b in zip(left, widths)]
    for y, (end, hits) in enumerate(zip(left, ran["cache_hits"])):
        if hits:
            ax.text(end, y, f"  cached: {', '.join(hits)}", va="center", fontsize=11, color="0.3")
    ax.set_xlim(0, max(left) * 1.3)
    ax.invert_yaxis()
    ax.set(xlabel="wall time (s)", ylabel="", title="Time per stage (compression stages, then evaluation)")
    _legend_outside(ax)
    summary = "; ".join(f"{k} {sec:.0f} s" + (f" ({hits} cache hits)" if hits else "") for k, (sec, hits) in totals.items())
    return _render("stage_times", title,
                   "Wall seconds each trial spent in each compression stage and in evaluation; a stage read from the "
                   "stage cache is named after its bar. Trials rejected by the budget take under a second and are left "
                   "out. Totals: " + (summary or "none") + ".", fig)


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


def _range(value: Any, scale: float, spec: str) -> str:
    """A stated uncertainty range ([low, high] or {"low", "high"}) as text, or ""."""
    if isinstance(value, dict):
        value = [value.get("low", value.get("min")), value.get("high", value.get("max"))]
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
        return f" (range {format(value[0] * scale, spec)}-{format(value[1] * scale, spec)})"
    return ""


def _quality_text(metric: str, value: float | None) -> str:
    if value is None:
        return "-"
    if metric == "triviaqa_exact_match":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def answer_lines(located: LocatedStudy) -> list[str]:
    """The report's opening: the best model under the budget, its quality against the baseline
    (ratios and sample sizes), and its hardware estimate with the model's stated ranges."""
    from optuna.study import StudyDirection

    study = located.study
    cfg = located.config
    budget = cfg.get("budget_mb")
    rows = pareto_rows(study)
    base = baseline_row(study)
    budget_text = f"the {budget:g} MB budget" if budget else "the budget"
    if not rows:
        head = f"No model within {budget_text} has been evaluated yet: nothing to recommend."
        if base is not None:
            head += f" The baseline (trial {base['trial']}, {base['footprint_mb']:.1f} MB) is {base['status']}."
        return [head]
    best = rows[0]
    first = located.objectives[0]
    word = "lowest" if study.directions[0] == StudyDirection.MINIMIZE else "highest"
    lines = [f"Best model under {budget_text}: trial {best['trial']} ({best['plan']}), the {word} {label(first)} "
             f"of the {len(rows)} Pareto-optimal trial(s)."]
    trial = next(t for t in study.get_trials(deepcopy=False) if t.number == best["trial"])
    attrs = trial.user_attrs
    shown = [m for m in dict.fromkeys([*located.objectives, "wikitext_token_ppl"]) if m in QUALITY_ATTRS and m in attrs]
    base_attrs = (next(t for t in study.get_trials(deepcopy=False) if t.number == base["trial"]).user_attrs
                  if base is not None else {})
    parts = []
    for metric in shown:
        value = float(attrs[metric])
        text = f"{label(metric)} {_quality_text(metric, value)}"
        reference = base_attrs.get(metric)
        if isinstance(reference, (int, float)):
            text += f" vs {_quality_text(metric, float(reference))}"
            text += f" ({value / reference:.2f}x)" if reference else " (baseline 0: no ratio)"
        n = samples_text(metric, attrs.get(EVAL_COUNTS_ATTR))
        parts.append(text + (f", n = {n}" if n else ""))
    if base is not None:
        where = "over budget" if base["status"] == OVER_BUDGET else "within the budget"
        lines.append(f"Its cost in quality against the uncompressed baseline (trial {base['trial']}, "
                     f"{base['footprint_mb']:.1f} MB, {where}): " + "; ".join(parts) + ".")
    else:
        lines.append("Quality (no evaluated baseline to compare with): " + "; ".join(parts) + ".")
    latency, energy = attrs.get("decode_latency_s"), attrs.get("energy_per_token_j")
    ranges = _range(attrs.get("decode_latency_s_range"), 1.0, ".3g") + _range(attrs.get("energy_per_token_j_range"), 1e3, ".3g")
    hw = [f"footprint {attrs.get('footprint_mb', math.nan):.1f} MB" + (f" of {budget:g} MB" if budget else "")]
    if isinstance(latency, (int, float)):
        hw.append(f"decode latency {latency:.3g} s/token{_range(attrs.get('decode_latency_s_range'), 1.0, '.3g')}")
    if isinstance(energy, (int, float)):
        hw.append(f"energy {energy * 1e3:.3g} mJ/token{_range(attrs.get('energy_per_token_j_range'), 1e3, '.3g')}")
    platform = cfg.get("platform", "?")
    stated = "" if ranges else " (point estimates: the hardware model stated no range for this trial)"
    lines.append(f"Hardware estimate ({platform}, analytical model, context {cfg.get('context_len', '?')} tokens): "
                 + ", ".join(hw) + stated + ".")
    return lines


CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1500px;margin:24px auto;padding:0 20px;color:#222}
h1{margin-bottom:4px}h2{margin-top:36px;border-bottom:1px solid #ddd;padding-bottom:4px}
table{border-collapse:collapse;font-size:14px}td,th{border:1px solid #ccc;padding:4px 8px}th{background:#f3f3f3}
td.num{text-align:right;font-variant-numeric:tabular-nums}dl.summary{display:grid;grid-template-columns:max-content auto;gap:2px 16px}
dl.summary dt{font-weight:600}dl.summary dd{margin:0}figure{margin:0}img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#555;font-size:14px;margin-top:4px}p.note{color:#555}section.answer p{font-size:17px;margin:6px 0}
"""


def _table_lines(md: str) -> list[str]:
    return [line for line in md.splitlines() if line.startswith("|")]


def _html_table(md: str) -> str:
    lines = [line.strip().strip("|").split("|") for line in _table_lines(md)]
    head, body = lines[0], lines[2:]
    out = ["<table><thead><tr>" + "".join(f"<th>{html.escape(c.strip())}</th>" for c in head) + "</tr></thead><tbody>"]
    for row in body:
        cells = "".join(
            f"<td{'' if i == 1 else ' class=num'}>{html.escape(c.strip())}</td>" for i, c in enumerate(row)
        )
        out.append(f"<tr>{cells}</tr>")
    return "".join(out) + "</tbody></table>"


@dataclass
class Page:
    """What both documents show, in order."""

    title: str
    answer: list[str]
    items: list[tuple[str, str]]
    figures: list[Figure]
    table_md: str
    table_note: str
    n_pareto: int
    pairs: list[str] = field(default_factory=list)  # same footprint, different hardware cost (hw_pairs.py)


NO_FRONT = "No feasible evaluated trial yet: nothing is Pareto-optimal."
PAIRS_TITLE = "Same footprint, different hardware cost"
PAIRS_NOTE = ("Pairs within 1 MB of each other whose decode latency or energy per token differ by 20% or more, "
              "as the analytical hardware model prices them (ms and mJ per token, worst-case decode step).")
UNITS_NOTE = ("Energy in mJ per generated token; latency and energy come from the analytical hardware model, quality "
              "from the real evaluations; n = the windows, pages or questions each metric was measured on.")


def render_html(page: Page) -> str:
    """The report page with every figure embedded as a ``data:image/png;base64`` URI."""
    parts = [f"<!doctype html><html lang=en><head><meta charset=utf-8><title>{html.escape(page.title)}</title>",
             f"<style>{CSS}</style></head><body><h1>{html.escape(page.title)}</h1>",
             "<section class=answer id=answer><h2>Answer</h2>"]
    parts += [f"<p>{html.escape(line)}</p>" for line in page.answer]
    parts.append("</section><h2 id=study>The study</h2><dl class=summary>")
    parts += [f"<dt>{html.escape(k)}</dt><dd>{html.escape(v)}</dd>" for k, v in page.items]
    parts.append("</dl>")
    for fig in page.figures:
        parts.append(f"<h2 id={fig.name}>{html.escape(fig.title)}</h2>")
        if not fig.png:
            parts.append(f"<p class=note>{html.escape(fig.caption)}</p>")
            continue
        data = base64.b64encode(fig.png).decode("ascii")
        parts.append(f"<figure><img src=\"data:image/png;base64,{data}\" alt=\"{html.escape(fig.title)}\">"
                     f"<figcaption>{html.escape(fig.caption)}</figcaption></figure>")
    parts.append("<h2 id=pareto>Pareto table</h2>")
    if not page.n_pareto:
        parts.append(f"<p class=note>{NO_FRONT}</p>")
    parts.append(_html_table(page.table_md))
    if page.table_note:
        parts.append(f"<p class=note>{html.escape(page.table_note)}</p>")
    parts.append(f"<p class=note>{UNITS_NOTE}</p>")
    if page.pairs:
        parts.append(f"<h2 id=pairs>{PAIRS_TITLE}</h2><p class=note>{html.escape(PAIRS_NOTE)}</p><ul>")
        parts += [f"<li>{html.escape(line)}</li>" for line in page.pairs]
        parts.append("</ul>")
    parts.append("</body></html>")
    return "".join(parts)


def render_markdown(page: Page) -> str:
    """The Markdown twin: the same sections, images as files in ``figures/``."""
    lines = [f"# {page.title}", "", "## Answer", ""]
    lines += [f"- {line}" for line in page.answer]
    lines += ["", "## The study", ""]
    lines += [f"- **{k}**: {v}" for k, v in page.items]
    for fig in page.figures:
        lines += ["", f"## {fig.title}", ""]
        lines += [fig.caption] if not fig.png else [f"![{fig.title}](figures/{fig.name}.png)", "", fig.caption]
    lines += ["", "## Pareto table", ""]
    if not page.n_pareto:
        lines += [NO_FRONT, ""]
    lines += _table_lines(page.table_md)
    lines += ["", page.table_note, "", UNITS_NOTE, ""]
    if page.pairs:
        lines += [f"## {PAIRS_TITLE}", "", PAIRS_NOTE, ""] + [f"- {line}" for line in page.pairs] + [""]
    return "\n".join(lines)


def build_figures(located: LocatedStudy, frame: Any) -> list[Figure]:
    """Every figure of the report, in page order (a section without data: an image-less Figure saying why)."""
    objectives = located.objectives
    ppl = quality_metric(objectives, frame)
    budget = located.config.get("budget_mb")
    values, reason = importances(located.study, objectives)
    evaluated = frame[frame["status"].isin([EVALUATED, OVER_BUDGET])]
    if evaluated.empty:
        why = "Left out: no trial has been evaluated yet (every one was rejected by the budget, pruned or failed)."
        fronts = [_omitted("fronts", "Pareto fronts", why)]
    else:
        fronts = [fronts_figure(frame, ppl, budget)]
    return [
        *fronts,
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
    base = baseline_row(located.study)
    best = None
    if rows:
        best_trial = next(t for t in located.study.get_trials(deepcopy=False) if t.number == rows[0]["trial"])
        best = {"trial": rows[0]["trial"], "plan": best_trial.user_attrs.get(PLAN_ATTR, {})}
    page = Page(
        title=f"slmsearch report: {located.name}", answer=answer_lines(located), items=_summary_items(located, frame),
        figures=figures, table_md=format_rows(rows, "md", located.objectives, base),
        table_note=table_note(base, rows, located.objectives), n_pareto=len(rows),
        pairs=pair_lines(located.study, located.config, best),
    )
    (out / "figures").mkdir(parents=True, exist_ok=True)
    paths = []
    for fig in figures:
        if fig.png:
            path = out / "figures" / f"{fig.name}.png"
            path.write_bytes(fig.png)
            paths.append(path)
    html_path, md_path = out / "report.html", out / "report.md"
    html_path.write_text(render_html(page), encoding="utf-8")
    md_path.write_text(render_markdown(page), encoding="utf-8")
    return Report(html_path=html_path, md_path=md_path, figures=paths)
