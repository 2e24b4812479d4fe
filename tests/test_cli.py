"""Bad input through the real CLI: one clear error line and exit code 2."""

import json
import shutil

import pytest
from click.testing import CliRunner

from slmsearch.cli import main


def _run(*args):
    result = CliRunner().invoke(main, list(args))
    return result.exit_code, result.output.strip()


def test_missing_model_path(tmp_path):
    code, out = _run("eval", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "e.json"))
    assert code == 2 and out.startswith("error:") and "missing" in out and len(out.splitlines()) == 1
    assert not (tmp_path / "e.json").exists()


def test_non_llama_model(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt_neox"}))
    code, out = _run("eval", "--model", str(tmp_path))
    assert code == 2 and "gpt_neox" in out and len(out.splitlines()) == 1


def test_wrong_data_file(tmp_path, data_dir):
    copy = tmp_path / "data"
    shutil.copytree(data_dir, copy)
    bad = copy / "wikitext-2" / "wiki.test.raw"
    bad.chmod(0o644)
    bad.write_text("not wikitext\n")
    code, out = _run("eval", "--data-dir", str(copy), "--out", str(tmp_path / "e.json"))
    assert code == 2 and "wiki.test.raw" in out and "sha256" in out and len(out.splitlines()) == 1


def test_unknown_task():
    code, out = _run("eval", "--tasks", "hellaswag")
    assert code == 2 and "'hellaswag'" in out and "wikitext" in out


def test_eval_writes_json(tmp_path, data_dir, default_model):
    out_file = tmp_path / "eval.json"
    code, out = _run(
        "eval", "--data-dir", str(data_dir), "--tasks", "wikitext", "--metrics", "wikitext_token_ppl",
        "--windows", "1", "--out", str(out_file),
    )
    assert code == 0, out
    record = json.loads(out_file.read_text())
    assert record["metrics"]["wikitext_token_ppl"] > 1
    assert record["counts"]["wikitext_token_windows"] == 1
    assert set(record["data_sha256"]) == {"wikitext_test_raw", "wikitext_test_pages", "wikitext_valid_tokens", "triviaqa_dev"}


@pytest.mark.parametrize(
    "exc",
    [
        OSError(28, "No space left on device", "/cache/stages/x/model.safetensors"),
        # safetensors' own error type carries the OS error only in its text
        type("SafetensorError", (Exception,), {})("Error while serializing: I/O error: No space left on device (os error 28)"),
    ],
)
def test_a_full_disk_is_one_error_line_that_says_how_to_resume(exc):
    import click

    from slmsearch.cli import user_errors

    @click.command()
    @user_errors
    def writes() -> None:
        try:
            raise exc
        except Exception as inner:
            raise RuntimeError("stage cache fill failed") from inner

    result = CliRunner().invoke(writes, [])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no space left on device (")
    assert "No space left on device" in lines[0] and "SLMSEARCH_CACHE" in lines[0] and "resume" in lines[0]


def test_other_unexpected_errors_keep_their_traceback():
    import click

    from slmsearch.cli import user_errors

    @click.command()
    @user_errors
    def broken() -> None:
        raise ValueError("a bug")

    result = CliRunner().invoke(broken, [])
    assert isinstance(result.exception, ValueError) and result.exit_code == 1


def test_hw_writes_the_report_it_prints(tmp_path, tiny_checkpoint):
    from slmsearch.hwmodel.summary import format_report
    from slmsearch.search.hardware import write_hw_report

    plan = tmp_path / "plan.yaml"
    plan.write_text("stages:\n  - {stage: embedding, bits: 4}\n")
    out = tmp_path / "hw.json"
    code, text = _run("hw", "--model", str(tiny_checkpoint), "--plan", str(plan), "--set", "memory.l3.read_bw_bytes_per_cycle=2",
                      "--context", "64", "--out", str(out))
    assert code == 0, text
    written = json.loads(out.read_text())
    expected = write_hw_report(tmp_path / "again.json", model=str(tiny_checkpoint), plan_file=plan,
                               overrides={"memory.l3.read_bw_bytes_per_cycle": 2.0}, context_len=64)
    assert written == json.loads(json.dumps(expected))
    assert text == format_report(expected).strip() + f"\nwrote {out}"


@pytest.mark.parametrize("item", ["memory.l3.read_bw_bytes_per_cycle", "memory.l3.read_bw_bytes_per_cycle=fast"])
def test_hw_set_needs_key_equals_number(tmp_path, item):
    code, out = _run("hw", "--set", item, "--out", str(tmp_path / "hw.json"))
    assert code == 2 and out == f"error: --set needs KEY=NUMBER, got {item!r}"
    assert not (tmp_path / "hw.json").exists()


def test_compress_without_a_data_folder_is_one_error_line(tmp_path, monkeypatch):
    monkeypatch.delenv("SLMSEARCH_DATA_DIR", raising=False)
    plan = tmp_path / "plan.yaml"
    plan.write_text("stages:\n  - {stage: embedding, bits: 8}\n")
    code, out = _run("compress", "--plan", str(plan), "--out", str(tmp_path / "out"))
    assert code == 2 and out.startswith("error: compress needs the data folder") and "--data-dir" in out
    assert len(out.splitlines()) == 1 and not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, claimed_mb, budget_mb", [("plan-64mb-levers.yaml", 63.95, 64), ("plan-96mb.yaml", 95.76, 96)])
def test_the_example_plans_are_the_size_their_header_says(tmp_path, name, claimed_mb, budget_mb):
    """``slmsearch hw --plan examples/<name>`` as the file's header tells a user to type it (the
    default model): the footprint the header claims, within its budget."""
    from pathlib import Path

    example = Path(__file__).parents[1] / "examples" / name
    assert f"{claimed_mb}" in example.read_text().split("stages:")[0]
    out = tmp_path / "hw.json"
    code, text = _run("hw", "--plan", str(example), "--out", str(out))
    assert code == 0, text
    total_mb = json.loads(out.read_text())["memory"]["total_bytes"] / 1e6
    assert abs(total_mb - claimed_mb) < 0.01 + 0.5 * 10 ** -len(str(claimed_mb).split(".")[1]), total_mb
    assert total_mb <= budget_mb
