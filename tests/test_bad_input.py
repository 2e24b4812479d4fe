"""The bad-input table, one test per row, through the real CLI: exit code 2, one line starting with
``error:`` that names the offending value, and nothing written (no study database, no stage-cache
entry, no output folder).

Related checks elsewhere: a corrupt or half-written stage-cache entry is rebuilt, never loaded
(tests/compress/test_pipeline.py::test_corrupt_entry_is_rebuilt and ::test_half_written_entry_is_ignored);
a corrupt data file (tests/test_cli.py::test_wrong_data_file); an unreachable storage
(tests/search/test_workers.py::test_unreachable_storage_is_one_clear_error).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from slmsearch.cli import main

SMALL_STUDY = """
name: bad
model: {model}
data_dir: {data}
budget_mb: 1000
context_len: 128
objectives:
  - {{metric: wikitext_token_ppl, direction: minimize}}
  - {{metric: decode_latency_s, direction: minimize}}
space:
  drop_layers: [0, 1]
  wanda_patterns: [none]
  lora_ranks: [0]
  gptq_bits: [4, 16]
  group_sizes: [32]
  eora_ranks: [0]
  embedding_bits: [16, 8]
calibration: {{n_samples: 2, seqlen: 32, seed: 0}}
evaluation: {{token_seqlen: 64, token_windows: 1, batch_size: 1}}
sampler: random
trials: 1
"""


@pytest.fixture
def sandbox(tmp_path, monkeypatch):
    """A working folder with its own runs and cache folders; ``written()`` lists what appeared."""
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    before: set[Path] = set()

    class Sandbox:
        root = tmp_path

        def mark(self) -> None:
            before.update(p for p in tmp_path.rglob("*"))

        def written(self) -> list[str]:
            new = [p for p in tmp_path.rglob("*") if p not in before and not p.is_dir()]
            return [str(p.relative_to(tmp_path)) for p in new]

    return Sandbox()


def study_file(sandbox, tiny_checkpoint, data_dir, extra: str = "", **replace: str) -> Path:
    text = SMALL_STUDY.format(model=tiny_checkpoint, data=data_dir)
    for key, value in replace.items():
        text = re.sub(rf"^{key}: .*$", f"{key}: {value}", text, flags=re.MULTILINE)
    path = sandbox.root / "study.yaml"
    path.write_text(text + extra)
    sandbox.mark()
    return path


def run_cli(sandbox, *args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    out = result.output.strip()
    assert result.exit_code == 2, (result.exit_code, out, result.exception)
    assert len(out.splitlines()) == 1 and out.startswith("error: "), out
    assert sandbox.written() == [], sandbox.written()
    assert not (sandbox.root / "runs").exists()
    return out


def test_unknown_key_in_study_file(sandbox, tiny_checkpoint, data_dir):
    path = study_file(sandbox, tiny_checkpoint, data_dir, extra="budgett: 3\n")
    out = run_cli(sandbox, "optimize", "--study", str(path))
    assert "'budgett'" in out and "unknown key" in out


def test_unknown_key_in_study_section(sandbox, tiny_checkpoint, data_dir):
    path = study_file(sandbox, tiny_checkpoint, data_dir, extra="pruning: {first_window: 2}\n")
    out = run_cli(sandbox, "optimize", "--study", str(path))
    assert "'first_window'" in out and "'pruning'" in out


@pytest.mark.parametrize("budget", ["0", "-5"])
def test_zero_or_negative_budget(sandbox, tiny_checkpoint, data_dir, budget):
    path = study_file(sandbox, tiny_checkpoint, data_dir)
    out = run_cli(sandbox, "optimize", "--study", str(path), "--budget-mb", budget)
    assert "budget must be a positive number of MB" in out and budget.lstrip("-") in out


def test_budget_below_the_smallest_reachable_footprint(sandbox, tiny_checkpoint, data_dir):
    from slmsearch.hwmodel import ModelShape, estimate, load_platform
    from slmsearch.search.config import load_study_config
    from slmsearch.search.space import most_compressed_plan

    path = study_file(sandbox, tiny_checkpoint, data_dir)
    config = load_study_config(path)
    shape = ModelShape.from_hf_config(json.loads((tiny_checkpoint / "config.json").read_text()))
    smallest = estimate(most_compressed_plan(config.space, shape, pattern="none").shape(shape),
                        load_platform("siracusa"), context_len=128).memory.total_bytes / 1e6
    out = run_cli(sandbox, "optimize", "--study", str(path), "--budget-mb", "0.01")
    assert "budget 0.01 MB is below the smallest footprint" in out
    assert f"({smallest:.2f} MB)" in out


def test_range_with_low_above_high(sandbox, tiny_checkpoint, data_dir):
    path = study_file(sandbox, tiny_checkpoint, data_dir, extra="")
    path.write_text(path.read_text().replace("drop_layers: [0, 1]", "drop_layers: [3, 1]"))
    out = run_cli(sandbox, "optimize", "--study", str(path))
    assert "space.drop_layers" in out and "low=3, high=1" in out


def test_unsupported_bits_value(sandbox, tiny_checkpoint, data_dir):
    path = study_file(sandbox, tiny_checkpoint, data_dir)
    path.write_text(path.read_text().replace("gptq_bits: [4, 16]", "gptq_bits: [4, 5]"))
    out = run_cli(sandbox, "optimize", "--study", str(path))
    assert "space.gptq_bits" in out and "unsupported value 5" in out and "2, 3, 4, 8, 16" in out


def test_model_that_is_not_llama(sandbox, tiny_checkpoint, data_dir):
    other = sandbox.root / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    path = study_file(sandbox, tiny_checkpoint, data_dir)
    out = run_cli(sandbox, "optimize", "--study", str(path), "--model", str(other))
    assert "'gpt2'" in out and "LLaMA" in out


def test_missing_data_file(sandbox, tiny_checkpoint, data_dir):
    copy = sandbox.root / "data"
    shutil.copytree(data_dir, copy)
    (copy / "triviaqa" / "triviaqa_dev_2000.jsonl").unlink()
    path = study_file(sandbox, tiny_checkpoint, copy)
    # --data-dir too: the flag reads $SLMSEARCH_DATA_DIR (set by make), which overrides the file's data_dir
    out = run_cli(sandbox, "optimize", "--study", str(path), "--data-dir", str(copy))
    assert "triviaqa_dev_2000.jsonl" in out and "missing" in out


def test_checkpoint_with_a_missing_tensor(sandbox, tiny_checkpoint, data_dir):
    from safetensors.torch import load_file, save_file

    broken = sandbox.root / "broken"
    shutil.copytree(tiny_checkpoint, broken)
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    sandbox.mark()
    out = run_cli(sandbox, "eval", "--model", str(broken), "--data-dir", str(data_dir), "--tasks", "wikitext",
                  "--metrics", "wikitext_token_ppl", "--windows", "1", "--out", str(sandbox.root / "work" / "e.json"))
    assert "'model.layers.2.mlp.up_proj.weight'" in out and "missing" in out


def test_storage_url_with_unknown_scheme(sandbox, tiny_checkpoint, data_dir):
    path = study_file(sandbox, tiny_checkpoint, data_dir)
    out = run_cli(sandbox, "optimize", "--study", str(path), "--storage", "redis://:pw@localhost:6379/0")
    assert "scheme 'redis'" in out and "pw" not in out
