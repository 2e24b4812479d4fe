"""The bad-input table: every row is one command with one bad input, run through the real CLI.

Each row must give exit code 2 and exactly one line of output (stdout and stderr together), that
line starting with ``error:`` and naming the offending key or value (the row's ``needles``);
nothing written (no file in the working folder, the runs folder or the cache; no study
database); and no model loaded (every Hugging Face ``from_pretrained`` is counted, not timed).
Rows run in-process with click's CliRunner; rows marked ``subprocess`` run again as a real
process, where the third-party import-time log lines would show (slmsearch/quiet.py).

Related checks elsewhere: a corrupt or half-written stage-cache entry is rebuilt, never loaded
(tests/compress/test_pipeline.py); an unreachable storage (tests/search/test_storage.py::
test_unreachable_storage_is_one_clear_error).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from slmsearch.cli import main

STUDY: dict[str, Any] = {
    "name": "bad",
    "budget_mb": 1000,
    "context_len": 128,
    "objectives": [{"metric": "wikitext_token_ppl", "direction": "minimize"},
                   {"metric": "decode_latency_s", "direction": "minimize"}],
    "space": {"drop_layers": [0, 1], "wanda_patterns": ["none"], "lora_ranks": [0], "gptq_bits": [4, 16],
              "group_sizes": [32], "eora_ranks": [0], "embedding_bits": [16, 8]},
    "calibration": {"n_samples": 2, "seqlen": 32, "seed": 0},
    "evaluation": {"token_seqlen": 64, "token_windows": 1, "batch_size": 1},
    "sampler": "random",
    "trials": 1,
}


def unwritable_dir(tmp: Path) -> Path:
    """An existing folder this process cannot create files in: a read-only folder, or for root
    (whom permission bits do not stop) a sysfs folder, where the kernel refuses new files."""
    if os.geteuid() != 0:
        folder = tmp / "read-only"
        folder.mkdir()
        folder.chmod(0o555)
        return folder
    folder = Path("/sys/kernel")
    try:
        (folder / "slmsearch-probe").touch()
    except OSError:
        return folder
    pytest.skip("no folder refuses root's writes on this machine")


@dataclass
class Env:
    """What a row may use: the sandbox root, the tiny checkpoint, the data folder."""

    root: Path
    model: Path
    data: Path
    env: dict[str, str] = field(default_factory=dict)

    def study(self, changes: dict[str, Any] | None = None, drop: tuple[str, ...] = ()) -> str:
        """The small study file with ``changes`` (dotted keys: ``space.lora_steps``) applied."""
        raw = copy.deepcopy(STUDY)
        raw.update(model=str(self.model), data_dir=str(self.data))
        for dotted, value in (changes or {}).items():
            *parents, key = dotted.split(".")
            node = raw
            for part in parents:
                node = node[part]
            node[key] = value
        for key in drop:
            raw.pop(key)
        path = self.root / f"study-{len(list(self.root.glob('study-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return str(path)

    def plan(self, stages: list[dict[str, Any]]) -> str:
        path = self.root / f"plan-{len(list(self.root.glob('plan-*.yaml')))}.yaml"
        path.write_text(yaml.safe_dump({"stages": stages}))
        return str(path)

    def copy_model(self, name: str) -> Path:
        target = self.root / name
        shutil.copytree(self.model, target)
        return target

    def optimize(self, *args: str, study: str | None = None) -> list[str]:
        return ["optimize", "--study", study or self.study(), "--data-dir", str(self.data), *args]

    def hw(self, *args: str) -> list[str]:
        return ["hw", "--model", str(self.model), "--out", str(self.root / "work" / "hw.json"), *args]


@dataclass(frozen=True)
class Row:
    id: str
    argv: Callable[[Env], list[str]]
    needles: tuple[str, ...]  # each must appear in the error line
    subprocess: bool = False  # also run as a real process (third-party output would show there)


def truncated_model(env: Env) -> Path:
    """The tiny checkpoint with its weights file cut short: the header is intact, the data is not."""
    broken = env.copy_model("truncated")
    weights = broken / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return broken


def missing_tensor_model(env: Env) -> Path:
    from safetensors.torch import load_file, save_file

    broken = env.copy_model("missing-tensor")
    weights = load_file(broken / "model.safetensors")
    del weights["model.layers.2.mlp.up_proj.weight"]
    save_file(weights, broken / "model.safetensors", metadata={"format": "pt"})
    return broken


def not_llama(env: Env) -> Path:
    other = env.root / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    return other


def data_without_triviaqa(env: Env) -> Path:
    copy_ = env.root / "data"
    shutil.copytree(env.data, copy_)
    (copy_ / "triviaqa" / "triviaqa_dev_2000.jsonl").unlink()
    return copy_


def existing_study(env: Env) -> str:
    """A study file whose study already exists in the runs folder (as after a first run)."""
    from slmsearch.search.config import load_study_config
    from slmsearch.search.storage import open_storage, storage_url
    from slmsearch.search.study import open_study

    path = env.study()
    config = load_study_config(path)
    open_study(config, open_storage(storage_url(config)))
    return path


def read_only_cache(env: Env) -> list[str]:
    env.env["SLMSEARCH_CACHE"] = str(unwritable_dir(env.root))
    return env.optimize()


def compress(env: Env, stages: list[dict[str, Any]], *, out: str | None = None, model: Path | None = None) -> list[str]:
    return ["compress", "--plan", env.plan(stages), "--out", out or str(env.root / "work" / "ckpt"),
            "--model", str(model or env.model), "--data-dir", str(env.data)]


def nonempty_folder(env: Env) -> str:
    folder = env.root / "work" / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("mine")
    return str(folder)


ROWS: list[Row] = [
    # --- the study file: sections, keys, types, ranges ---------------------------------------------
    Row("unknown-key", lambda e: e.optimize(study=e.study({"budgett": 3})), ("unknown key 'budgett'",)),
    Row("unknown-key-in-section", lambda e: e.optimize(study=e.study({"pruning": {"first_window": 2}})),
        ("'first_window'", "'pruning'")),
    Row("section-not-a-mapping", lambda e: e.optimize(study=e.study({"space": 3})), ("study section 'space'", "3")),
    Row("objectives-not-a-list", lambda e: e.optimize(study=e.study({"objectives": 3})), ("objectives must be", "3")),
    Row("lora-steps-text", lambda e: e.optimize(study=e.study({"space.lora_steps": "ten"})),
        ("space.lora_steps must be an integer", "'ten'")),
    Row("calibration-samples-text", lambda e: e.optimize(study=e.study({"calibration.n_samples": "x"})),
        ("calibration.n_samples must be an integer", "'x'")),
    Row("pruning-windows-quoted", lambda e: e.optimize(study=e.study({"pruning": {"first_windows": "2"}})),
        ("pruning.first_windows must be an integer", "'2'", "drop the quotes")),
    Row("space-pair-holding-text", lambda e: e.optimize(study=e.study({"space.drop_layers": [0, "x"]})),
        ("space.drop_layers must be a [low, high] pair of integers", "'x'")),
    Row("space-kv-width-unsupported", lambda e: e.optimize(study=e.study({"space.kv_cache_bits": [16, 5]})),
        ("space.kv_cache_bits", "5", "16, 8, 4")),
    Row("space-scale-bits-unsupported", lambda e: e.optimize(study=e.study({"space.gptq_scale_bits": [8, 4]})),
        ("gptq_scale_bits", "4")),
    Row("space-list-holding-text", lambda e: e.optimize(study=e.study({"space.gptq_bits": [4, "8"]})),
        ("space.gptq_bits must be a list of integers", "'8'")),
    Row("token-windows-text", lambda e: e.optimize(study=e.study({"evaluation.token_windows": "four"})),
        ("evaluation.token_windows must be an integer or null", "'four'")),
    Row("token-windows-zero", lambda e: e.optimize(study=e.study({"evaluation.token_windows": 0})),
        ("token_windows must be >= 1", "got 0")),
    Row("population-zero", lambda e: e.optimize(study=e.study({"population_size": 0})),
        ("population_size must be an integer >= 2", "got 0")),
    Row("trials-text", lambda e: e.optimize(study=e.study({"trials": "eight"})), ("trials must be an integer", "'eight'")),
    Row("trials-fraction", lambda e: e.optimize(study=e.study({"trials": 2.5})), ("trials must be an integer", "2.5")),
    Row("budget-exponent-text", lambda e: e.optimize(study=e.study({"budget_mb": "1e3"})),
        ("budget_mb must be a finite number", "'1e3'", "1.0e+3")),
    Row("anchors-text", lambda e: e.optimize(study=e.study({"anchors": "yes"})), ("anchors must be true or false", "'yes'")),
    Row("cache-gb-zero", lambda e: e.optimize(study=e.study({"cache_gb": 0})), ("cache_gb must be a positive number", "0")),
    Row("range-low-above-high", lambda e: e.optimize(study=e.study({"space.drop_layers": [3, 1]})),
        ("space.drop_layers", "low=3, high=1")),
    Row("unsupported-bits", lambda e: e.optimize(study=e.study({"space.gptq_bits": [4, 5]})),
        ("space.gptq_bits", "unsupported value 5", "2, 3, 4, 8, 16")),
    Row("platform-override-nan", lambda e: e.optimize(study=e.study({"platform_overrides": {"memory.l3.read_bw_bytes_per_cycle": float("nan")}})),
        ("memory.l3.read_bw_bytes_per_cycle", "nan", "finite number")),
    Row("context-beyond-the-model", lambda e: e.optimize(study=e.study({"context_len": 100_000})),
        ("context_len 100000", "1..1024"), subprocess=True),
    # --- optimize's flags ---------------------------------------------------------------------------
    Row("budget-zero", lambda e: e.optimize("--budget-mb", "0"), ("budget must be a positive number of MB", "0")),
    Row("budget-negative", lambda e: e.optimize("--budget-mb", "-5"), ("budget must be a positive number of MB", "-5")),
    Row("budget-nan", lambda e: e.optimize("--budget-mb", "nan"), ("budget_mb must be a finite number", "nan")),
    Row("budget-text", lambda e: e.optimize("--budget-mb", "lots"), ("--budget-mb", "'lots'")),
    Row("timeout-negative", lambda e: e.optimize("--timeout", "-1"), ("--timeout", "-1")),
    Row("trials-zero", lambda e: e.optimize("--trials", "0"), ("--trials", "got 0")),
    Row("seed-negative", lambda e: e.optimize("--seed", "-1"), ("--seed", "got -1")),
    Row("unknown-sampler", lambda e: e.optimize("--sampler", "cmaes"), ("--sampler", "'cmaes'")),
    Row("storage-unknown-scheme", lambda e: e.optimize("--storage", "redis://:pw@localhost:6379/0"), ("scheme 'redis'",)),
    Row("storage-driver-missing", lambda e: e.optimize("--storage", "mysql://u@localhost/db"),
        ("'pymysql'", "pip install PyMySQL")),
    Row("budget-below-smallest-footprint", lambda e: e.optimize("--budget-mb", "0.01"),
        ("budget 0.01 MB is below the smallest footprint",)),
    Row("model-not-llama", lambda e: e.optimize("--model", str(not_llama(e))), ("'gpt2'", "LLaMA")),
    Row("data-file-missing", lambda e: ["optimize", "--study", e.study(), "--data-dir", str(data_without_triviaqa(e))],
        ("triviaqa_dev_2000.jsonl", "missing")),
    Row("model-truncated", lambda e: e.optimize("--model", str(truncated_model(e))), ("model.safetensors", "truncated")),
    Row("cache-read-only", read_only_cache, ("SLMSEARCH_CACHE", "cannot be written")),
    Row("resume-other-budget", lambda e: e.optimize("--budget-mb", "500", study=existing_study(e)),
        ("budget_mb=1000.0", "budget_mb=500.0", "--study-name")),
    Row("resume-other-sampler-and-seed", lambda e: e.optimize("--sampler", "tpe", "--seed", "3", study=existing_study(e)),
        ("sampler='random'", "sampler='tpe'", "1 more: seed")),
    # --- hw ------------------------------------------------------------------------------------------
    Row("hw-set-nan", lambda e: e.hw("--set", "memory.l3.read_bw_bytes_per_cycle=nan"),
        ("memory.l3.read_bw_bytes_per_cycle=nan", "finite number")),
    Row("hw-set-negative", lambda e: e.hw("--set", "memory.l3.read_bw_bytes_per_cycle=-2"),
        ("memory.l3.read_bw_bytes_per_cycle", "-2.0")),
    Row("hw-set-unknown-key", lambda e: e.hw("--set", "memory.l9.size_bytes=1"), ("'memory.l9.size_bytes'",)),
    Row("hw-set-not-a-number", lambda e: e.hw("--set", "memory.l3.size_bytes=big"), ("memory.l3.size_bytes=big",)),
    Row("hw-context-beyond-the-model", lambda e: e.hw("--context", "100000000000"), ("--context 100000000000", "1..1024")),
    Row("hw-context-zero", lambda e: e.hw("--context", "0"), ("--context 0", "1..1024")),
    Row("hw-context-exponent", lambda e: e.hw("--context", "1e11"), ("--context", "'1e11'")),
    Row("hw-prefill-negative", lambda e: e.hw("--prefill", "-1"), ("--prefill -1",)),
    Row("hw-out-a-folder", lambda e: [*e.hw()[:-2], "--out", str(e.root / "work")], ("--out", "is a folder")),
    Row("hw-out-read-only", lambda e: [*e.hw()[:-2], "--out", str(unwritable_dir(e.root) / "hw.json")],
        ("--out", "cannot be written")),
    Row("hw-plan-too-deep", lambda e: e.hw("--plan", e.plan([{"stage": "depth", "drop": 40}])), ("depth.drop=40", "4 layers")),
    # --- compress: --out first, then the plan against the model's shape, before any stage ---------------
    Row("compress-out-not-empty", lambda e: compress(e, [{"stage": "depth", "drop": 40}], out=nonempty_folder(e)),
        ("exists and is not empty", "--out")),
    Row("compress-out-read-only", lambda e: compress(e, [{"stage": "depth", "drop": 1}], out=str(unwritable_dir(e.root) / "ckpt")),
        ("--out", "cannot be written")),
    Row("compress-drop-more-layers-than-exist", lambda e: compress(e, [{"stage": "depth", "drop": 40}]),
        ("depth.drop=40", "4 layers")),
    Row("compress-group-size-does-not-divide", lambda e: compress(e, [{"stage": "gptq", "bits": 4, "group_size": 128}]),
        ("gptq.group_size=128", "64 (gate_proj, k_proj, o_proj, q_proj, up_proj, v_proj)")),
    Row("compress-kv-width-unsupported", lambda e: compress(e, [{"stage": "kv_cache", "bits": 5}]),
        ("kv_cache.bits must be one of 16, 8, 4, got 5",)),
    Row("compress-kv-group-does-not-divide", lambda e: compress(e, [{"stage": "kv_cache", "bits": 4, "group_size": 32}]),
        ("kv_cache.group_size=32", "head size 16")),
    Row("compress-kv-key-group-does-not-divide",
        lambda e: compress(e, [{"stage": "kv_cache", "bits": 4, "group_size": 16, "key_group_size": 32}]),
        ("kv_cache.key_group_size=32", "head size 16")),
    Row("compress-embedding-gptq-not-a-flag", lambda e: compress(e, [{"stage": "embedding", "bits": 4, "gptq": "yes"}]),
        ("embedding.gptq must be true or false, got 'yes'",)),
    Row("compress-layer-bits-wrong-length", lambda e: compress(e, [{"stage": "gptq", "bits": 3, "group_size": 32, "layer_bits": [3, 4]}]),
        ("gptq.layer_bits has 2 entries", "4 decoder layers")),
    Row("compress-scale-bits-unsupported", lambda e: compress(e, [{"stage": "gptq", "bits": 3, "group_size": 32, "scale_bits": 6}]),
        ("gptq.scale_bits", "6", "16, 8")),
    Row("compress-embedding-scale-bits-unsupported", lambda e: compress(e, [{"stage": "embedding", "bits": 4, "scale_bits": 4}]),
        ("embedding.scale_bits", "4", "16, 8")),
    Row("compress-autoround-not-offered", lambda e: compress(e, [{"stage": "gptq", "bits": 3, "method": "autoround"}]),
        ("stage 'gptq' has no setting(s) 'method'", "mse")),
    Row("compress-model-truncated", lambda e: compress(e, [{"stage": "depth", "drop": 1}], model=truncated_model(e)),
        ("model.safetensors", "truncated")),
    # --- eval ------------------------------------------------------------------------------------------
    Row("eval-missing-tensor", lambda e: ["eval", "--model", str(missing_tensor_model(e)), "--data-dir", str(e.data),
                                          "--tasks", "wikitext", "--metrics", "wikitext_token_ppl", "--windows", "1",
                                          "--out", str(e.root / "work" / "e.json")],
        ("'model.layers.2.mlp.up_proj.weight'", "missing")),
    Row("eval-out-a-folder", lambda e: ["eval", "--model", str(e.model), "--data-dir", str(e.data), "--out", str(e.root / "work")],
        ("--out", "is a folder")),
    # --- report / export: the output folder before the study is opened -----------------------------------
    Row("report-out-a-file", lambda e: ["report", "--storage", f"sqlite:///{e.root / 'none.db'}", "--out", existing_file(e)],
        ("--out", "is a file")),
    Row("export-out-read-only", lambda e: ["export", "--storage", f"sqlite:///{e.root / 'none.db'}", "--pareto",
                                           "--out", str(unwritable_dir(e.root) / "export")],
        ("--out", "cannot be written")),
    # --- click's own checks, one line too --------------------------------------------------------------
    Row("missing-option", lambda e: ["compress", "--plan", e.plan([])], ("Missing option '--out'",)),
]


def existing_file(e: Env) -> str:
    path = e.root / "a-file.txt"
    path.write_text("not a folder")
    return str(path)


@pytest.fixture
def model_loads(monkeypatch) -> list[str]:
    """Every Hugging Face model loaded from a checkpoint in this process (by class name)."""
    from transformers.modeling_utils import PreTrainedModel

    loads: list[str] = []
    original = PreTrainedModel.from_pretrained.__func__

    def counting(cls: type, *args: Any, **kwargs: Any) -> Any:
        loads.append(cls.__name__)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(counting))
    return loads


@pytest.fixture
def sandbox(tmp_path, monkeypatch, tiny_checkpoint, data_dir) -> Env:
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    return Env(root=tmp_path, model=tiny_checkpoint, data=data_dir)


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if not p.is_dir()}


def _check(exit_code: int, output: str, row: Row) -> str:
    lines = [line for line in output.splitlines() if line.strip()]
    assert exit_code == 2, (exit_code, output)
    assert len(lines) == 1 and lines[0].startswith("error: "), output
    for needle in row.needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input_is_one_error_line_before_any_work(row, sandbox, model_loads, monkeypatch):
    argv = row.argv(sandbox)
    for key, value in sandbox.env.items():
        monkeypatch.setenv(key, value)
    runs_before = (sandbox.root / "runs").exists()
    before = _files(sandbox.root)
    result = CliRunner().invoke(main, argv)
    _check(result.exit_code, result.output, row)
    assert _files(sandbox.root) == before, sorted(map(str, _files(sandbox.root) - before))
    assert (sandbox.root / "runs").exists() == runs_before  # no study database, not even its folder
    assert model_loads == [], model_loads
    if row.subprocess:  # the same command as a process: nothing but the one line
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        done = subprocess.run([sys.executable, "-m", "slmsearch", *argv], capture_output=True, text=True, env=env,
                              cwd=sandbox.root / "work", timeout=300)
        _check(done.returncode, done.stdout + done.stderr, row)
        assert _files(sandbox.root) == before


def test_the_table_holds_every_reported_case():
    """The inputs issue #20 listed, each a row (so that none is dropped unnoticed)."""
    ids = {r.id for r in ROWS}
    reported = {"lora-steps-text", "calibration-samples-text", "pruning-windows-quoted", "space-pair-holding-text",
                "token-windows-text", "population-zero", "trials-text", "trials-fraction", "budget-nan",
                "timeout-negative", "hw-set-nan", "hw-context-beyond-the-model", "hw-out-a-folder", "hw-out-read-only",
                "compress-out-not-empty", "compress-group-size-does-not-divide", "compress-drop-more-layers-than-exist",
                "model-truncated", "cache-read-only", "resume-other-budget", "context-beyond-the-model"}
    assert reported <= ids, reported - ids


def test_the_model_load_counter_counts(model_loads, tiny_checkpoint):
    """The counter the table relies on sees a real load (so an empty count means something)."""
    from slmsearch.models import load_model

    load_model(str(tiny_checkpoint))
    assert model_loads == ["LlamaForCausalLM"]
