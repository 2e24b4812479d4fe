"""`slmsearch report`: self-contained HTML (every image a data: URI) + Markdown twin, rendered in
headless Chromium with every image decoded."""

from __future__ import annotations

import base64
import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from test_pareto import OBJECTIVES, build_study  # same folder (pytest's rootdir-relative import)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from slmsearch.search.storage import locate_study
    from slmsearch.search.report import write_report

    root = tmp_path_factory.mktemp("report")
    build_study(root / "demo.db")
    write_report(locate_study(storage=f"sqlite:///{root / 'demo.db'}"), root / "out")
    return root / "out"


def _chromium_cmd(binary: str, *extra: str) -> list[str]:
    return [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}",
            *extra]


def test_html_embeds_every_image(report_dir: Path) -> None:
    html = (report_dir / "report.html").read_text(encoding="utf-8")
    srcs = re.findall(r"<img [^>]*src=\"([^\"]+)\"", html)
    assert len(srcs) == 4
    for src in srcs:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(PNG_MAGIC)
    assert not re.search(r"(src|href)=\"(?!data:|#)", html), "the page must not reference other files"
    for heading in ("Pareto fronts", "Every trial by bits and by depth", "Parameter importances", "Time per stage", "Pareto table"):
        assert heading in html
    assert "budget" in html and "64 MB" in html


def test_markdown_twin(report_dir: Path) -> None:
    md = (report_dir / "report.md").read_text(encoding="utf-8")
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert len(images) == 4
    for image in images:
        assert (report_dir / image).read_bytes().startswith(PNG_MAGIC)
    assert "| trial | plan | WikiText word ppl" in md


def test_few_trials_say_so(tmp_path: Path) -> None:
    from slmsearch.search.storage import locate_study
    from slmsearch.search.report import importances, write_report

    build_study(tmp_path / "few.db", n_trials=4, budget_mb=300.0, name="few")
    located = locate_study(storage=f"sqlite:///{tmp_path / 'few.db'}")
    values, reason = importances(located.study, OBJECTIVES)
    assert values == {} and reason.startswith("not enough trials")
    report = write_report(located, tmp_path / "out")
    assert "not enough trials" in report.html_path.read_text(encoding="utf-8")


def test_cli_report(tmp_path: Path) -> None:
    from slmsearch.cli import main

    build_study(tmp_path / "demo.db", n_trials=12)
    result = CliRunner().invoke(main, ["report", "--storage", f"sqlite:///{tmp_path / 'demo.db'}", "--out", str(tmp_path / "r")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "r" / "report.html").is_file() and (tmp_path / "r" / "report.md").is_file()
    assert str(tmp_path / "r" / "report.html") in result.stdout


def test_chromium_loads_every_image(report_dir: Path) -> None:
    """Render in headless Chromium: every <img> decodes (naturalWidth > 0); keep a screenshot
    (its path printed) that decodes as a PNG. Fails under CI without Chromium (tests/browser.py)."""
    from browser import chromium, decoded_png, screenshot

    binary = chromium()
    probe = report_dir / "probe.html"  # a copy with a script that writes the image count into the DOM
    probe.write_text((report_dir / "report.html").read_text(encoding="utf-8").replace(
        "</body>",
        "<script>window.addEventListener('load',()=>{const i=[...document.images];"
        "document.body.setAttribute('data-images',i.length+'/'+i.filter(x=>x.complete&&x.naturalWidth>0).length);});"
        "</script></body>"), encoding="utf-8")
    env = {**os.environ, "HOME": tempfile.mkdtemp(prefix="chromium-home-")}
    dom = subprocess.run(_chromium_cmd(binary, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()),
                         capture_output=True, text=True, timeout=120, env=env)
    match = re.search(r'data-images="(\d+)/(\d+)"', dom.stdout)
    assert match, f"chromium did not run the probe: {dom.stderr[-500:]}"
    assert match.group(1) == match.group(2) == "4"
    rendered = re.sub(r"<[^>]+>", " ", dom.stdout)  # the text the browser laid out
    for text in ("slmsearch report: demo", "Pareto fronts", "Time per stage", "Pareto table", "64 MB",
                 "Same footprint, different hardware cost"):
        assert text in rendered, text
    shot = screenshot(binary, (report_dir / "report.html").as_uri(), report_dir / "report.png", height=4000)
    width, height, colours = decoded_png(shot)
    assert (width, height) == (1280, 4000) and shot.stat().st_size > 50_000
    assert colours != 1  # not a blank page (0: PIL absent, header checked only)


def narrow_study(path: Path) -> None:
    """A real SQLite study written by hand, whose values span less than a decade: perplexities
    26-38, exact match 0-3%, latencies 0.40-0.55 s; the baseline over budget but evaluated
    (ended PRUNED, metrics in its attributes, as the objective stores it); two rejections."""
    import optuna
    from optuna.trial import TrialState, create_trial

    from slmsearch.search.config import StudyConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="narrow", storage=f"sqlite:///{path}", directions=["minimize", "maximize", "minimize"])
    study.set_user_attr("config", StudyConfig(name="narrow", budget_mb=64.0).to_dict())
    study.set_user_attr("objectives", OBJECTIVES)
    counts = {"wikitext_token_windows": 4, "wikitext_pages": 2, "triviaqa_questions": 50}
    hw = {"memory_bytes": {}, "placement": {}, "tokens_per_s": 2.0, "energy_per_token_j": 0.045}
    study.add_trial(create_trial(state=TrialState.PRUNED, constraints={"footprint_over_budget_mb": 213.6}, user_attrs={
        "plan": {"stages": []}, "baseline": True, "over_budget": "footprint 277.60 MB > budget 64 MB", **hw,
        "footprint_mb": 277.6, "decode_latency_s": 0.58, "wikitext_word_ppl": 26.0, "wikitext_token_ppl": 17.0,
        "early_token_ppl": 16.0, "triviaqa_exact_match": 0.02, "eval_counts": counts, "eval_seconds": {"total": 80.0},
        "stage_seconds": {}}))
    for i, (bits, drop, ppl, em, lat, mb) in enumerate([(4, 0, 28.0, 0.02, 0.52, 60.0), (4, 2, 31.0, 0.0, 0.47, 55.0),
                                                        (3, 0, 33.5, 0.01, 0.45, 50.0), (3, 2, 36.0, 0.0, 0.42, 47.0),
                                                        (8, 4, 38.0, 0.03, 0.55, 62.0), (4, 4, 35.0, 0.0, 0.40, 45.0)]):
        plan = {"stages": [{"stage": "depth", "drop": drop}] * bool(drop) + [{"stage": "gptq", "bits": bits, "group_size": 64}]}
        study.add_trial(create_trial(values=[ppl, em, lat], constraints={"footprint_over_budget_mb": mb - 64.0}, user_attrs={
            "plan": plan, **hw, "footprint_mb": mb, "decode_latency_s": lat, "wikitext_word_ppl": ppl,
            "wikitext_token_ppl": ppl * 0.65, "early_token_ppl": ppl * 0.6, "triviaqa_exact_match": em,
            "eval_counts": counts, "eval_seconds": {"total": 90.0}, "stage_seconds": {"gptq": 60.0 + i}}))
    for mb in (90.0, 130.0):
        study.add_trial(create_trial(state=TrialState.PRUNED, constraints={"footprint_over_budget_mb": mb - 64.0}, user_attrs={
            "plan": {"stages": [{"stage": "gptq", "bits": 8, "group_size": 64}]}, **hw, "footprint_mb": mb,
            "decode_latency_s": 0.9, "rejected": f"footprint {mb:.2f} MB > budget 64 MB"}))


@pytest.fixture(scope="module")
def narrow(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[Any]]:
    from slmsearch.search.report import build_figures, trials_frame
    from slmsearch.search.storage import locate_study

    root = tmp_path_factory.mktemp("narrow")
    narrow_study(root / "narrow.db")
    located = locate_study(storage=f"sqlite:///{root / 'narrow.db'}")
    return located, build_figures(located, trials_frame(located.study, located.objectives))


def test_every_axis_has_labelled_ticks_when_values_span_less_than_a_decade(narrow: tuple[Any, list[Any]]) -> None:
    _, figures = narrow
    drawn = [f for f in figures if f.png]
    assert {f.name for f in drawn} >= {"fronts", "trials", "stage_times"}
    for fig in drawn:
        assert fig.ticks, fig.name
        for axis, labels in fig.ticks.items():
            assert len(labels) >= 2, (fig.name, axis, labels)
    fronts = next(f for f in drawn if f.name == "fronts")
    assert fronts.ticks["exact match vs perplexity: y"][0] == "0%"  # exact match from 0, not -4%


def test_text_is_readable_at_1280_px(narrow: tuple[Any, list[Any]]) -> None:
    from slmsearch.search.report import MIN_TEXT_PX

    for fig in (f for f in narrow[1] if f.png):
        assert fig.text_px_on_page() >= MIN_TEXT_PX, (fig.name, fig.min_font_pt, fig.width_px)


def test_bit_widths_have_distinct_colour_blind_safe_colours() -> None:
    from matplotlib.colors import to_rgb

    from slmsearch.search.report import BITS_COLORS

    okabe_ito = {"#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#000000"}
    assert set(BITS_COLORS) <= okabe_ito and len(set(BITS_COLORS)) == len(BITS_COLORS)
    for a, b in zip(BITS_COLORS, BITS_COLORS[1:]):  # neighbours (3 and 4 bits, ...) far apart
        assert sum(abs(x - y) for x, y in zip(to_rgb(a), to_rgb(b))) > 0.6, (a, b)


def test_report_opens_with_the_answer_and_draws_the_baseline(narrow: tuple[Any, list[Any]], tmp_path: Path) -> None:
    from slmsearch.search.report import write_report

    located, _ = narrow
    md = write_report(located, tmp_path / "out").md_path.read_text(encoding="utf-8")
    answer = md.split("## Answer", 1)[1].split("##", 1)[0]
    assert "trial 1 (w4g64)" in answer and "60.0 MB of 64 MB" in answer  # the lowest perplexity of the front
    assert "WikiText word ppl 28 vs 26 (1.08x), n = 2 pages" in answer and "n = 50 questions" in answer
    assert "277.6 MB, over budget" in answer and "decode latency 0.52 s/token" in answer and "45 mJ/token" in answer
    table = md.split("## Pareto table", 1)[1]
    assert "| 0 (baseline, over budget) | baseline | 26 | 2.0 | 0.58 | 277.6 |" in table
    assert "| 1 | w4g64 | 28 (1.08x) | 2.0 (1.00x) |" in table


def test_empty_sections_are_left_out_with_a_reason(tmp_path: Path) -> None:
    from slmsearch.search.report import write_report
    from slmsearch.search.storage import locate_study

    narrow_study(tmp_path / "n.db")
    html = write_report(locate_study(storage=f"sqlite:///{tmp_path / 'n.db'}"), tmp_path / "out").html_path.read_text()
    assert html.count("<img ") == 3  # fronts, trials, stage times; importances need sampled parameters
    assert "Left out: not enough trials" in html


def test_report_shows_plans_of_the_same_footprint_that_the_hardware_model_prices_apart(tmp_path: Path) -> None:
    """Two trials 0.4 MB apart, one deployed with int8 activations: listed with what differs; a pair
    1.1x apart and one 3 MB apart are not. The best model's own deployments come from the hardware
    model on the study's model (the default SmolLM2-135M)."""
    import optuna
    from optuna.trial import create_trial

    from slmsearch.compress.plan import Plan
    from slmsearch.search.config import StudyConfig
    from slmsearch.search.hw_pairs import trial_pairs
    from slmsearch.search.report import write_report
    from slmsearch.search.storage import locate_study

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="pairs", storage=f"sqlite:///{tmp_path / 'pairs.db'}",
                                directions=["minimize", "maximize", "minimize"])
    study.set_user_attr("config", StudyConfig(name="pairs", budget_mb=64.0).to_dict())
    study.set_user_attr("objectives", OBJECTIVES)
    anchor = Plan.load(Path(__file__).parents[2] / "examples" / "plan-64mb-levers.yaml").to_dict()
    dist = {"activation_bits": optuna.distributions.CategoricalDistribution([16, 8])}
    for act, mb, lat, energy, ppl in [(16, 63.6, 0.60, 0.20, 60.0), (8, 63.2, 0.42, 0.15, 70.0),
                                      (16, 60.0, 0.55, 0.19, 75.0), (16, 59.8, 0.52, 0.18, 80.0)]:
        study.add_trial(create_trial(
            values=[ppl, 0.01, lat], params={"activation_bits": act}, distributions=dist,
            constraints={"footprint_over_budget_mb": mb - 64.0},
            user_attrs={"plan": anchor, "footprint_mb": mb, "decode_latency_s": lat, "energy_per_token_j": energy,
                        "tokens_per_s": 1 / lat, "deployment": {"activation_bits": act}, "wikitext_word_ppl": ppl}))
    pairs = trial_pairs(study)
    assert [p["trials"] for p in pairs] == [(1, 0)]  # sorted by footprint: 63.2 MB first
    assert pairs[0]["reason"] == "activation_bits: 8 vs 16" and round(pairs[0]["latency_ratio"], 2) == 1.43

    out = tmp_path / "report"
    write_report(locate_study(storage=f"sqlite:///{tmp_path / 'pairs.db'}"), out)
    md = (out / "report.md").read_text(encoding="utf-8")
    section = md.split("## Same footprint, different hardware cost", 1)[1]
    assert "Trials 1 and 0: 63.2 / 63.6 MB, decode 420 / 600 ms per token" in section
    assert "Trials 3 and 2" not in section and "Trials 2 and 0" not in section
    best = [line for line in section.splitlines() if "deployed two ways" in line]
    assert best and all("activation_bits: 16 vs 8" in line for line in best)
    assert "Same footprint, different hardware cost" in (out / "report.html").read_text(encoding="utf-8")
