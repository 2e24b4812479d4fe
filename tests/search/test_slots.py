"""Many workers on one study: real `slmsearch optimize` processes against a real PostgreSQL server.

The server is started by the ``postgres_server`` fixture (tests/postgres.py); the model is the tiny
random LLaMA with a real tokenizer; evaluation is token perplexity on two short windows, so a trial
takes about a second and the cost is mostly process start-up.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from postgres import PASSWORD, postgres_server  # noqa: F401  (a fixture)
from slmsearch.search.trials import REJECTED_ATTR, SLOT_ATTR, SURPLUS_ATTR

WORKER_STUDY = """
name: {name}
model: {model}
data_dir: {data}
budget_mb: 1000
context_len: 128
objectives:
  - {{metric: wikitext_token_ppl, direction: minimize}}
  - {{metric: decode_latency_s, direction: minimize}}
space:
  drop_layers: [0, 2]
  wanda_patterns: [none, unstructured]
  unstructured_sparsity: [0.1, 0.5]
  lora_ranks: [0]
  gptq_bits: [16]
  eora_ranks: [0]
  embedding_bits: [16, 8]
calibration: {{n_samples: 2, seqlen: 32, seed: 0}}
evaluation: {{token_seqlen: 64, token_windows: {windows}, batch_size: 2}}
pruning: {{first_windows: 1, max_ppl_ratio: 1000.0}}
screening: {{enabled: false}}  # these tests stop workers inside full trials (screens: test_screen_runner.py)
sampler: random
seed: 0
trials: {trials}
storage: {storage}
heartbeat_s: 1
grace_s: 4
cache_gb: 1
"""


def write_worker_study(tmp_path: Path, tiny_checkpoint: Path, data_dir: Path, *, storage: str, trials: int,
                       name: str = "many", windows: int = 2) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(WORKER_STUDY.format(name=name, model=tiny_checkpoint, data=data_dir, trials=trials,
                                        storage=storage, windows=windows))
    return path


def start_worker(study_file: Path, cache: Path, log: Path, *extra: str, block_at: Path | None = None) -> subprocess.Popen:
    """One `slmsearch optimize` process with its own stage cache (as on its own machine). With
    ``block_at``, the worker writes that file when it reaches the first stage it computes and then
    blocks there until it is killed or interrupted (a test-only hook: compress.pipeline.TEST_BLOCK_ENV)."""
    from slmsearch.compress.pipeline import TEST_BLOCK_ENV

    env = {**os.environ, "SLMSEARCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "MKL_NUM_THREADS": "1"}
    env.pop(TEST_BLOCK_ENV, None)
    if block_at is not None:
        env[TEST_BLOCK_ENV] = str(block_at)
    cmd = [sys.executable, "-m", "slmsearch", "optimize", "--study", str(study_file), *extra]
    handle = log.open("w")
    return subprocess.Popen(cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, text=True)


def wait_until_blocked(proc: subprocess.Popen, marker: Path, log: Path, timeout: float = 600) -> None:
    """Wait for the event: the worker wrote ``marker`` (it is mid-trial, blocked in a stage)."""
    deadline = time.time() + timeout  # only a guard against a hang; nothing is timed
    while not marker.exists():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            pytest.fail("the worker never reached a stage:\n" + log.read_text()[-3000:])
        time.sleep(0.05)


def running_trial_of(storage: object, name: str, pid: int) -> object:
    """The one RUNNING trial of worker ``pid`` (read through the test's one storage handle)."""
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    mine = [t for t in trials if t.state == TrialState.RUNNING and str(t.user_attrs.get("worker", "")).endswith(f":{pid}")]
    assert len(mine) == 1, [(t.number, t.state.name, t.user_attrs.get("worker")) for t in trials]
    return mine[0]



def blocked_sqlite_worker(tmp_path: Path, tiny_checkpoint: Path, data_dir: Path, name: str) -> tuple:
    """A worker of a SQLite study ``name``, started alone and waited on until it is blocked mid-trial:
    (process, its log, the test's one storage handle, its RUNNING trial)."""
    from slmsearch.search.storage import open_storage

    storage_url = f"sqlite:///{tmp_path / (name + '.db')}"
    study_file = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage=storage_url, trials=50, name=name)
    log, marker = tmp_path / "worker.log", tmp_path / "mid-trial.json"
    proc = start_worker(study_file, tmp_path / "cache", log, block_at=marker)
    wait_until_blocked(proc, marker, log)
    storage = open_storage(storage_url)
    return proc, log, storage, running_trial_of(storage, name, proc.pid)

def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> list[str]:
    deadline = time.time() + timeout
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for other in procs:
                other.kill()
            pytest.fail("workers did not finish:\n" + "\n".join(log.read_text()[-3000:] for log in logs))
    return [log.read_text() for log in logs]


def evaluated(trials: list) -> list:
    """The trials that count: evaluated, neither a budget rejection nor a repeat of an earlier plan."""
    return [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            and "rejected" not in t.user_attrs and "repeat_of" not in t.user_attrs]


@pytest.mark.postgres
def test_three_workers_run_one_study_to_the_exact_count(tmp_path, tiny_checkpoint, data_dir, postgres_server):
    url = postgres_server.create_database()
    study_file = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage=url, trials=12)
    logs = [tmp_path / f"worker{i}.log" for i in range(3)]
    procs = [start_worker(study_file, tmp_path / f"cache{i}", logs[i]) for i in range(3)]
    outputs = wait_all(procs, logs)
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        assert PASSWORD not in out  # the storage URL is printed redacted
        assert "postgres:***@127.0.0.1" in out
    from slmsearch.search.storage import open_storage

    trials = optuna.load_study(study_name="many", storage=open_storage(url)).trials  # the README's URL, as slmsearch opens it
    done = evaluated(trials)
    assert len(done) == 12, [(t.number, t.state.name, t.user_attrs.get(SURPLUS_ATTR)) for t in trials]
    assert sum(t.state == TrialState.COMPLETE for t in done) == 12  # generous pruning: none pruned
    numbers = [t.number for t in trials]
    assert len(set(numbers)) == len(numbers) and len({t.number for t in done}) == 12
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    # Anything beyond the 12 did no work: a surplus trial (FAILED) or a plan sampled again (answered
    # from its first trial); no stage ran for either.
    for t in trials:
        if t not in done:
            assert "stage_seconds" not in t.user_attrs
            assert (t.state == TrialState.FAIL and SURPLUS_ATTR in t.user_attrs) or "repeat_of" in t.user_attrs
    assert all(t.user_attrs[SLOT_ATTR] == t.number for t in done)
    assert len({t.user_attrs["worker"] for t in done}) >= 2, "the work was shared"
    assert sum(bool(t.user_attrs.get("baseline")) for t in trials) >= 1
    # Each worker used its own stage cache.
    assert all((tmp_path / f"cache{i}" / "stages").is_dir() for i in range(3))


@pytest.mark.postgres
def test_sigkilled_worker_trial_fails_and_is_retried(tmp_path, tiny_checkpoint, data_dir, postgres_server):
    """The victim blocks in a stage of a trial that holds a slot until SIGKILL; a second worker,
    started only then, fails that trial by the heartbeat check, retries it and ends the study."""
    from slmsearch.search.storage import open_storage

    url = postgres_server.create_database()
    study_file = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage=url, trials=5, name="kill")
    logs = [tmp_path / f"worker{i}.log" for i in range(2)]
    marker = tmp_path / "victim-mid-trial.json"
    victim = start_worker(study_file, tmp_path / "cache0", logs[0], block_at=marker)
    wait_until_blocked(victim, marker, logs[0])
    storage = open_storage(url)  # the test's one storage handle (one connection pool)
    trial = running_trial_of(storage, "kill", victim.pid)
    assert trial.user_attrs.get(SLOT_ATTR) == trial.number  # mid-trial: it holds a slot, its stages run
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    killed = trial.number
    assert optuna.load_study(study_name="kill", storage=storage).trials[killed].state == TrialState.RUNNING
    survivor = start_worker(study_file, tmp_path / "cache1", logs[1])
    (out,) = wait_all([survivor], logs[1:])
    assert survivor.returncode == 0, out[-3000:]
    trials = optuna.load_study(study_name="kill", storage=storage).trials
    assert trials[killed].state == TrialState.FAIL  # failed by the heartbeat check after the grace period
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed]
    assert len(retries) == 1 and retries[0].params == trials[killed].params
    assert retries[0].state in (TrialState.COMPLETE, TrialState.PRUNED)
    assert len(evaluated(trials)) == 5
    assert not [t for t in trials if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert not [p for p in (tmp_path / "cache1" / "stages").iterdir() if p.name.startswith(".")]


def test_sqlite_default_single_worker(tmp_path, tiny_checkpoint, data_dir, monkeypatch):
    """No --storage: a SQLite file in the runs folder; the count is exact; nothing is surplus."""
    from slmsearch.search.config import load_study_config
    from slmsearch.search.storage import storage_url
    from slmsearch.search.study import optimize

    monkeypatch.setenv("SLMSEARCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("SLMSEARCH_RUNS", str(tmp_path / "runs"))
    study_file = write_worker_study(tmp_path, tiny_checkpoint, data_dir, storage="null", trials=3, name="solo")
    config = load_study_config(study_file)
    assert config.storage is None and storage_url(config) == f"sqlite:///{(tmp_path / 'runs' / 'solo.db').resolve()}"
    summary = optimize(config, log=lambda m: None)
    assert summary["completed"] + summary["pruned"] == 3 and summary["surplus"] == 0 and summary["failed"] == 0
    trials = optuna.load_study(study_name="solo", storage=storage_url(config)).trials
    assert len(evaluated(trials)) == 3 and all(t.user_attrs[SLOT_ATTR] == t.number for t in trials)
    again = optimize(config, log=lambda m: None)  # resuming a finished study starts nothing
    assert again["trials"] == len(trials)


def test_ctrl_c_fails_the_running_trial_and_exits_130(tmp_path, tiny_checkpoint, data_dir):
    """SIGINT to a worker blocked mid-trial (in a stage, holding a slot): exit 130, the trial
    FAILED, one last line saying so, no traceback, no temporary folder left in the cache."""
    proc, log, storage, running = blocked_sqlite_worker(tmp_path, tiny_checkpoint, data_dir, "stop")
    assert running.user_attrs.get(SLOT_ATTR) == running.number
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 130, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last == f"error: interrupted; trial {running.number} marked failed; re-run the same command to resume", out[-3000:]
    assert "Traceback" not in out and "Exception ignored" not in out
    trials = optuna.load_study(study_name="stop", storage=storage).trials
    assert not [t for t in trials if t.state == TrialState.RUNNING]
    assert trials[running.number].state == TrialState.FAIL
    assert not [p for p in (tmp_path / "cache" / "stages").iterdir() if p.name.startswith(".")]


def test_sigterm_fails_the_running_trial_at_once_and_exits_143(tmp_path, tiny_checkpoint, data_dir):
    """SIGTERM (kill, systemd, a batch scheduler) to a worker blocked mid-trial: the trial is
    FAILED now (not left RUNNING until the heartbeat grace period), exit 143, no traceback."""
    proc, log, storage, running = blocked_sqlite_worker(tmp_path, tiny_checkpoint, data_dir, "term")
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    out = log.read_text()
    assert proc.returncode == 143, out[-3000:]
    assert out.strip().splitlines()[-1] == (f"error: interrupted; trial {running.number} marked failed; "
                                            "re-run the same command to resume"), out[-3000:]
    assert "Traceback" not in out
    trials = optuna.load_study(study_name="term", storage=storage).trials
    assert trials[running.number].state == TrialState.FAIL
    assert not [t for t in trials if t.state == TrialState.RUNNING]


GPTQ_STUDY_CHANGES = {
    "  gptq_bits: [16]": "  gptq_bits: [4, 16]\n  group_sizes: [32]",
    "  drop_layers: [0, 2]": "  drop_layers: [0, 0]",
    "  wanda_patterns: [none, unstructured]": "  wanda_patterns: [none]",
    "  embedding_bits: [16, 8]": "  embedding_bits: [16]",
    "calibration: {n_samples: 2, seqlen: 32, seed: 0}": "calibration: {n_samples: 256, seqlen: 256, seed: 0}",
}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory, tiny_checkpoint):
    """A somewhat larger random LLaMA (6 layers, hidden 256): GPTQ on it takes a few seconds."""
    import json
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("small-llama")
    config = json.loads((tiny_checkpoint / "config.json").read_text())
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        num_hidden_layers=6, vocab_size=config["vocab_size"], hidden_size=256, intermediate_size=512,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        bos_token_id=config["bos_token_id"], eos_token_id=config["eos_token_id"],
    )).save_pretrained(folder)
    for path in tiny_checkpoint.iterdir():
        if "token" in path.name or path.suffix == ".jinja":
            shutil.copy2(path, folder / path.name)
    return folder


@pytest.mark.parametrize("presses", [1, 2])
def test_ctrl_c_during_gptq_stops_a_background_worker(tmp_path, small_checkpoint, data_dir, presses):
    """A worker started in the background by a script inherits SIGINT *ignored* (what a
    non-interactive shell does to `cmd &`); Python then never raises KeyboardInterrupt and the study
    ran on through GPTQ and every later trial. The study installs its own handler: one SIGINT stops
    it at the next safe point (the interrupted GPTQ output is not cached), a second at once; either
    way exit 130, the trial FAILED, nothing left RUNNING."""
    storage = f"sqlite:///{tmp_path / 'gptq.db'}"
    study_file = write_worker_study(tmp_path, small_checkpoint, data_dir, storage=storage, trials=50, name="gptq")
    text = study_file.read_text()
    for old, new in GPTQ_STUDY_CHANGES.items():
        assert old in text
        text = text.replace(old, new)
    study_file.write_text(text)
    log = tmp_path / "worker.log"
    cache = tmp_path / "cache"
    # gptqmodel's INFO log ("Quantizing layer ...") tells the test that GPTQ is running
    env = {**os.environ, "SLMSEARCH_CACHE": str(cache), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1",
           "SLMSEARCH_GPTQMODEL_LOG": "INFO"}
    with log.open("w") as handle:
        proc = subprocess.Popen(
            [sys.executable, "-m", "slmsearch", "optimize", "--study", str(study_file)], env=env,
            stdout=handle, stderr=subprocess.STDOUT, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
        )
    deadline = time.time() + 300
    # a trial's GPTQ: the clock's GPTQ probe, before the first trial, logs the same line
    while "Quantizing layer" not in log.read_text().partition("[compress]")[2]:
        assert proc.poll() is None and time.time() < deadline, log.read_text()[-3000:]
        time.sleep(0.05)
    for _ in range(presses):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.3)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the worker ignored SIGINT")
    out = log.read_text()
    assert proc.returncode == 130, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: interrupted; trial ") and "marked failed" in last, out[-3000:]
    assert "Traceback" not in out
    trials = optuna.load_study(study_name="gptq", storage=storage).trials
    assert trials[-1].state == TrialState.FAIL and trials[-1].params["gptq_bits"] == 4
    assert all(t.state == TrialState.COMPLETE for t in trials[:-1])
    assert not any((cache / "stages").glob("*/quantize_config.json"))  # the interrupted GPTQ was not cached


def _running_trials(storage_url: str, name: str, n: int) -> tuple[object, list]:
    """The storage (its own connection pool, as another machine's) and ``n`` running trials on it."""
    from slmsearch.search.storage import open_storage

    storage = open_storage(storage_url)
    study = optuna.create_study(study_name=name, storage=storage, load_if_exists=True)
    return storage, [study.ask() for _ in range(n)]


@pytest.mark.parametrize("locked", [True, False], ids=["under-the-study-lock", "one-process"])
def test_slots_free_up_when_a_slot_holder_fails(tmp_path, locked):
    from slmsearch.search.slots import claim_slot

    storage, trials = _running_trials(f"sqlite:///{tmp_path / 's.db'}", "slots", 4)

    def claim(trial: object) -> bool:
        return claim_slot(trial, 2, storage if locked else None)

    assert [claim(t) for t in trials[:3]] == [True, True, False]
    study = trials[0].study
    study.tell(trials[0], 1.0)  # counted: still takes its slot
    assert not claim(trials[3])
    study.tell(trials[1], state=TrialState.FAIL)  # a failed slot holder frees its slot
    assert claim(trials[3])
    study.tell(trials[2], state=TrialState.FAIL)
    rejected = study.ask()
    rejected.set_user_attr(REJECTED_ATTR, "over budget")
    study.tell(rejected, 1.0)  # a budget rejection never takes a slot
    assert not claim(study.ask())
    held = [t.number for t in optuna.load_study(study_name="slots", storage=storage).trials if t.user_attrs.get(SLOT_ATTR) == t.number]
    assert held == [0, 1, 3]
    if locked:  # a trial failed meanwhile (by a heartbeat check) takes no slot, though one is free
        finished = study.ask()
        study.tell(finished, state=TrialState.FAIL)
        assert not claim_slot(finished, 3, storage) and claim_slot(study.ask(), 3, storage)


@pytest.mark.postgres
def test_concurrent_claims_take_exactly_the_free_slots(postgres_server):
    """Eight claims at once from eight connections (as from eight machines): exactly three win."""
    from concurrent.futures import ThreadPoolExecutor

    from slmsearch.search.slots import claim_slot

    url = postgres_server.create_database()
    from slmsearch.search.storage import open_storage

    storage = open_storage(url)  # the README's URL, as slmsearch opens it
    optuna.create_study(study_name="race", storage=storage)
    claims = [_running_trials(url, "race", 1) for _ in range(8)]  # one storage (connection pool) each
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda c: claim_slot(c[1][0], 3, c[0]), claims))
    assert sum(won) == 3
    held = [t for t in optuna.load_study(study_name="race", storage=storage).trials if t.user_attrs.get(SLOT_ATTR) == t.number]
    assert len(held) == 3
