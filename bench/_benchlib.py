"""Shared helpers of the bench scripts: a fresh cache folder per run, and a wall-time profiler that
splits a trial into the compute it cannot avoid and everything else.

The profiler patches functions (by object identity, wherever a module imported them by name) with
timers. Each timer is one of three kinds:

* ``work``: the passes a trial cannot avoid. The model's forward (``LlamaForCausalLM.forward``, and
  ``LlamaDecoderLayer.forward`` when called outside it, as layer-by-layer calibration does),
  ``Tensor.backward``, the optimizer step, GPTQ's per-module solve, EoRA's low-rank solve, and the
  loss/log-softmax on the logits. Nested work is not counted twice (the outermost one times it).
  Each work timer is labelled with the *phase* it ran in, e.g. ``forward [compress.gptq]``.
* ``phase``: a part of the trial (a compression stage, an evaluation metric). Its own row is the
  time spent inside it that no other timer claimed (Python, tensor copies, waiting...).
* ``overhead``: a named piece of non-compute work (loading or saving a checkpoint, hashing the
  cache entry, tokenizing, building lm-eval's tasks, garbage collection).

Rows are *exclusive* times (a timer's wall time minus the timers nested in it) on each thread, so
on one thread they add up to the root timer's wall time. Work intervals from every thread are
also kept, and ``unavoidable_s`` is the wall time of their union (work that overlaps on two
threads counts once).
"""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = "/tmp/bench-cache"


def fresh_cache(bench: str, root: str | None = None) -> Path:
    """A new, empty ``$SLMSEARCH_CACHE`` for this run under ``root`` (default ``$SLMSEARCH_CACHE``
    or /tmp/bench-cache), sharing only the converted default model (``root/models``), and set
    ``SLMSEARCH_CACHE`` to it. Call before slmsearch computes any cache path."""
    base = Path(root or os.environ.get("SLMSEARCH_CACHE") or DEFAULT_ROOT).expanduser().resolve()
    base.mkdir(parents=True, exist_ok=True)
    run = base / f"{bench}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run.mkdir()
    shared_models = base / "models"
    if not shared_models.exists():
        # Reuse the converted default model of the user's own cache when there is one.
        home = Path.home() / ".cache" / "slmsearch" / "models"
        if home.is_dir() and home.resolve() != shared_models:
            shared_models.symlink_to(home, target_is_directory=True)
        else:
            shared_models.mkdir()
    (run / "models").symlink_to(shared_models, target_is_directory=True)
    os.environ["SLMSEARCH_CACHE"] = str(run)
    return run


def write_result(path: str | Path, data: Any) -> Path:
    """A bench's figures as indented JSON at ``path`` (its folder made if needed), for review in git."""
    import json

    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    return out


def quiet_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    if not os.environ.get("SLMSEARCH_DATA_DIR"):
        shared = REPO.parent / "shared" / "data"
        if (shared / "README.md").is_file():
            os.environ["SLMSEARCH_DATA_DIR"] = str(shared)


def machine() -> str:
    import platform

    import torch

    try:
        load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        load = "?"
    return (f"{cpu_model() or platform.processor() or platform.machine()}, {os.cpu_count()} CPU(s), "
            f"torch {torch.__version__} threads={torch.get_num_threads()}, load avg {load}")


def cpu_model() -> str:
    """The CPU's model name and its widest matrix extensions, from /proc/cpuinfo (as lscpu shows
    them): e.g. ``AMD EPYC (avx2)`` or ``Intel(R) Xeon(R) ... (avx512_bf16 amx_bf16)``; "" elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    wide = [f for f in ("amx_bf16", "avx512_bf16", "avx512f") if f in flags] or [f for f in ("avx2", "avx") if f in flags][:1]
    return f"{fields.get('model name', '')} ({' '.join(wide)})".strip()


@contextlib.contextmanager
def optimize_walls() -> Iterator[list[float]]:
    """Inside the block, every ``optuna.Study.optimize`` call (one per trial in slmsearch's loop)
    appends its wall time to the yielded list; whatever ``Study.optimize`` was before (e.g. a
    profiled wrapper) is what runs, and is restored afterwards."""
    import optuna.study.study as optuna_study_mod

    walls: list[float] = []
    original = optuna_study_mod.Study.optimize

    def wall_timed(self: Any, *a: Any, **k: Any) -> Any:
        start = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            walls.append(time.perf_counter() - start)

    optuna_study_mod.Study.optimize = wall_timed  # type: ignore[method-assign]
    try:
        yield walls
    finally:
        optuna_study_mod.Study.optimize = original  # type: ignore[method-assign]


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


_INHERITED = object()


class Profiler:
    """See the module docstring."""

    def __init__(self) -> None:
        self.exclusive: dict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.kind_of: dict[str, str] = {}
        self.work_intervals: list[tuple[float, float]] = []
        self.work_threads: Counter[str] = Counter()
        self._tls = threading.local()
        self._patches: list[tuple[Any, str, Any]] = []
        self._lock = threading.Lock()
        self._main = threading.get_ident()
        self.timeline: list[tuple[float, str | None]] = []  # main thread: (time, innermost label from then on)
        self.other_work: list[tuple[float, float, str]] = []  # work on other threads: (start, end, label)
        self.main_phase = "outside any phase"  # the main thread's current phase (labels other threads' work)

    def _mark(self, stack: list[Any], now: float) -> None:
        if threading.get_ident() == self._main:
            self.timeline.append((now, stack[-1][0] if stack else None))
            self.main_phase = next((f[0] for f in reversed(stack) if f[3] == "phase"), "outside any phase")

    # timing ----------------------------------------------------------------------------------
    def _state(self) -> Any:
        tls = self._tls
        if not hasattr(tls, "stack"):
            tls.stack = []
            tls.work_depth = 0
        return tls

    def _push(self, tls: Any, label: str, kind: str) -> list[Any]:
        """Open a timer frame ``[label, start, time in child timers, kind]`` on this thread."""
        frame = [label, time.perf_counter(), 0.0, kind]
        tls.stack.append(frame)
        self._mark(tls.stack, frame[1])
        return frame

    def _pop(self, tls: Any, frame: list[Any]) -> float:
        """Close ``frame``: its exclusive time to its label, its whole time to its parent; the end time."""
        end = time.perf_counter()
        tls.stack.pop()
        self._mark(tls.stack, end)
        elapsed = end - frame[1]
        with self._lock:
            self.exclusive[frame[0]] += elapsed - frame[2]
            self.calls[frame[0]] += 1
            self.kind_of[frame[0]] = frame[3]
        if tls.stack:
            tls.stack[-1][2] += elapsed
        return end

    def timed(self, fn: Callable[..., Any], name: str, kind: str) -> Callable[..., Any]:
        prof = self

        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            tls = prof._state()
            if kind == "work" and tls.work_depth:
                return fn(*args, **kwargs)  # inside another work timer: already counted
            label = name
            main = threading.get_ident() == prof._main
            if kind == "work":
                if main:
                    phase = next((f[0] for f in reversed(tls.stack) if f[3] == "phase"), "outside any phase")
                else:
                    phase = prof.main_phase
                label = f"{name} [{phase}]"
                tls.work_depth += 1
            frame = prof._push(tls, label, kind)
            try:
                return fn(*args, **kwargs)
            finally:
                end = prof._pop(tls, frame)
                if kind == "work":
                    with prof._lock:
                        prof.work_intervals.append((frame[1], end))
                        prof.work_threads["main" if main else "other"] += 1
                        if not main:
                            prof.other_work.append((frame[1], end, label))
                    tls.work_depth -= 1

        wrapper.__bench_original__ = fn  # type: ignore[attr-defined]
        return wrapper

    @contextlib.contextmanager
    def span(self, name: str, kind: str = "phase") -> Iterator[None]:
        """Time the body of a ``with`` block as one timer (e.g. the root: the whole trial)."""
        tls = self._state()
        frame = self._push(tls, name, kind)
        try:
            yield
        finally:
            self._pop(tls, frame)

    # patching --------------------------------------------------------------------------------
    def patch_attr(self, owner: Any, attr: str, name: str, kind: str) -> bool:
        """Wrap ``owner.attr`` (a function, method, classmethod or staticmethod); False if absent."""
        if isinstance(owner, type):
            raw = next((c.__dict__[attr] for c in owner.__mro__ if attr in c.__dict__), None)
        else:
            raw = getattr(owner, attr, None)
        if raw is None:
            return False
        if isinstance(raw, classmethod):
            new: Any = classmethod(self.timed(raw.__func__, name, kind))
        elif isinstance(raw, staticmethod):
            new = staticmethod(self.timed(raw.__func__, name, kind))
        else:
            new = self.timed(raw, name, kind)
        had_own = isinstance(owner, type) and attr in owner.__dict__
        self._patches.append((owner, attr, raw if had_own or not isinstance(owner, type) else _INHERITED))
        setattr(owner, attr, new)
        return True

    def patch_function(self, module: Any, attr: str, name: str, kind: str) -> bool:
        """Wrap a module-level function in its module and in every loaded module that imported it."""
        original = getattr(module, attr, None)
        if original is None:
            return False
        wrapper = self.timed(original, name, kind)
        for mod in list(sys.modules.values()):
            namespace = getattr(mod, "__dict__", None)
            if not isinstance(namespace, dict):
                continue
            for key, value in list(namespace.items()):
                if value is original:
                    self._patches.append((mod, key, value))
                    setattr(mod, key, wrapper)
        return True

    def unpatch(self) -> None:
        for owner, attr, raw in reversed(self._patches):
            if raw is _INHERITED:
                delattr(owner, attr)
            else:
                setattr(owner, attr, raw)
        self._patches.clear()

    # reporting -------------------------------------------------------------------------------
    def unavoidable_s(self) -> float:
        return union_seconds(self.work_intervals)

    def wall_rows(self) -> dict[str, float]:
        """Wall seconds per label, from the main thread's timeline; time the main thread spent in a
        non-work label while other threads did work goes to that work (it was waiting for it)."""
        out: dict[str, float] = defaultdict(float)
        by_label: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for a, b, label in self.other_work:
            by_label[label].append((a, b))
        merged = {label: _merge(iv) for label, iv in by_label.items()}
        for (t0, label), (t1, _) in zip(self.timeline, self.timeline[1:]):
            if label is None or t1 <= t0:
                continue
            span = t1 - t0
            if self.kind_of.get(label) != "work":
                for wl, iv in merged.items():
                    overlap = _overlap(iv, t0, t1)
                    if overlap > 0:
                        overlap = min(overlap, span)
                        out[wl] += overlap
                        span -= overlap
            out[label] += span
        return out

    def rows(self) -> list[tuple[str, str, float, int]]:
        walls = self.wall_rows() if self.timeline else self.exclusive
        labels = set(walls) | set(self.exclusive)
        return sorted(((k, self.kind_of.get(k, "phase"), walls.get(k, 0.0), self.calls[k]) for k in labels),
                      key=lambda r: ({"work": 0, "overhead": 1, "phase": 2}[r[1]], -r[2]))

    def reset(self) -> None:
        self.exclusive.clear()
        self.calls.clear()
        self.work_intervals.clear()
        self.work_threads.clear()
        self.timeline.clear()
        self.other_work.clear()


def _merge(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def _overlap(merged: list[tuple[float, float]], t0: float, t1: float) -> float:
    import bisect

    total = 0.0
    i = max(0, bisect.bisect_left(merged, (t0, t0)) - 1)
    while i < len(merged) and merged[i][0] < t1:
        a, b = merged[i]
        total += max(0.0, min(b, t1) - max(a, t0))
        i += 1
    return total


def instrument_trial(prof: Profiler) -> list[str]:
    """Patch everything a default-study trial runs through; returns what could not be patched."""
    import gc

    import torch
    from transformers.models.llama import modeling_llama as ml

    import slmsearch.checkpoint as checkpoint_mod
    import slmsearch.compress.cache as cache_mod
    import slmsearch.compress.calib as calib_mod
    import slmsearch.compress.lora as lora_mod
    import slmsearch.compress.pipeline as pipeline_mod
    import slmsearch.data as data_mod
    import slmsearch.evals.lmeval as lmeval_mod
    import slmsearch.evals.triviaqa as tqa_mod
    import slmsearch.evals.wikitext as wiki_mod
    import slmsearch.models as models_mod
    import slmsearch.search.objective as objective_mod
    from slmsearch.compress.plan import STAGE_TYPES

    missing: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            missing.append(what)

    # work: the passes a trial cannot avoid
    need(prof.patch_attr(ml.LlamaForCausalLM, "forward", "forward", "work"), "LlamaForCausalLM.forward")
    need(prof.patch_attr(ml.LlamaDecoderLayer, "forward", "forward (layer by layer)", "work"), "LlamaDecoderLayer.forward")
    need(prof.patch_attr(torch.Tensor, "backward", "backward", "work"), "Tensor.backward")
    need(prof.patch_attr(torch.optim.AdamW, "step", "optimizer step", "work"), "AdamW.step")
    import torch.nn.functional as F

    need(prof.patch_attr(F, "log_softmax", "log-softmax/loss on logits", "work"), "F.log_softmax")
    need(prof.patch_attr(F, "cross_entropy", "log-softmax/loss on logits", "work"), "F.cross_entropy")
    try:
        os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
        import gptqmodel  # noqa: F401
        import gptqmodel.eora.eora as eora_mod
        from gptqmodel.models.auto import GPTQModel
        from gptqmodel.models.base import BaseQModel
        from gptqmodel.quantization.gptq import GPTQ

        need(prof.patch_attr(GPTQ, "quantize", "GPTQ solve", "work"), "GPTQ.quantize")
        need(prof.patch_function(eora_mod, "eora_compute_lora", "EoRA solve", "work"), "eora_compute_lora")
        need(prof.patch_attr(GPTQModel, "load", "gptqmodel load", "overhead"), "GPTQModel.load")
        need(prof.patch_attr(BaseQModel, "save", "gptqmodel save", "overhead"), "BaseQModel.save")
        need(prof.patch_attr(BaseQModel, "quantize", "compress.gptq (gptqmodel quantize loop)", "phase"), "BaseQModel.quantize")
        need(prof.patch_attr(BaseQModel, "_eora_generate", "compress.eora (gptqmodel adapter loop)", "phase"), "_eora_generate")
        import gptqmodel.models.base as base_mod

        for attr in ("pack_model", "pack"):
            if getattr(base_mod, attr, None) is not None:
                prof.patch_function(base_mod, attr, "gptqmodel pack", "overhead")
    except ImportError as exc:
        missing.append(f"gptqmodel ({exc})")

    # phases
    for kind, cls in STAGE_TYPES.items():
        for attr in ("apply", "apply_dir"):
            if attr in cls.__dict__:
                prof.patch_attr(cls, attr, f"compress.{kind}", "phase")
    need(prof.patch_attr(lora_mod, "mean_loss", "compress.lora held-out loss (report only)", "phase"), "lora.mean_loss")
    need(prof.patch_function(pipeline_mod, "run", "compress (pipeline)", "phase"), "pipeline.run")
    need(prof.patch_function(objective_mod, "evaluate_staged", "eval (staged)", "phase"), "evaluate_staged")
    need(prof.patch_function(wiki_mod, "token_perplexity", "eval.token_ppl", "phase"), "token_perplexity")
    need(prof.patch_function(wiki_mod, "word_perplexity", "eval.word_ppl (lm-eval)", "phase"), "word_perplexity")
    need(prof.patch_function(tqa_mod, "exact_match", "eval.triviaqa_em (lm-eval)", "phase"), "exact_match")
    need(prof.patch_function(tqa_mod, "answer_logprob", "eval.triviaqa_logprob", "phase"), "answer_logprob")

    # overheads
    need(prof.patch_function(models_mod, "load_model", "load model (from_pretrained)", "overhead"), "load_model")
    need(prof.patch_function(models_mod, "model_fingerprint", "base fingerprint (sha256)", "overhead"), "model_fingerprint")
    need(prof.patch_function(checkpoint_mod, "save", "save checkpoint (save_pretrained)", "overhead"), "checkpoint.save")
    need(prof.patch_function(checkpoint_mod, "load", "load checkpoint for eval", "overhead"), "checkpoint.load")
    need(prof.patch_function(cache_mod, "write_manifest", "cache manifest (sha256 of new entry)", "overhead"), "write_manifest")
    need(prof.patch_attr(cache_mod.StageCache, "verify", "cache verify (sha256 on lookup)", "overhead"), "verify")
    need(prof.patch_attr(cache_mod.StageCache, "evict", "cache evict scan", "overhead"), "evict")
    need(prof.patch_attr(calib_mod.Calibration, "from_data", "calibration tokens", "overhead"), "Calibration.from_data")
    need(prof.patch_function(data_mod, "wikitext_ids", "tokenize wiki.test / wiki.valid (cached)", "overhead"), "wikitext_ids")
    need(prof.patch_function(lmeval_mod, "local_task_dir", "lm-eval task files", "overhead"), "local_task_dir")
    try:
        import lm_eval.evaluator as ev_mod
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        need(prof.patch_attr(TaskManager, "__init__", "lm-eval TaskManager (task index)", "overhead"), "TaskManager")
        need(prof.patch_attr(HFLM, "__init__", "lm-eval HFLM wrapper", "overhead"), "HFLM.__init__")
        need(prof.patch_attr(HFLM, "tok_encode", "lm-eval tokenize", "overhead"), "HFLM.tok_encode")
        need(prof.patch_attr(HFLM, "tok_batch_encode", "lm-eval tokenize", "overhead"), "HFLM.tok_batch_encode")
        for attr in ("get_task_dict",):
            if getattr(ev_mod, attr, None) is not None:
                prof.patch_function(ev_mod, attr, "lm-eval build tasks (datasets)", "overhead")
    except ImportError as exc:
        missing.append(f"lm_eval ({exc})")
    need(prof.patch_attr(gc, "collect", "gc.collect (optuna gc_after_trial, gptqmodel)", "overhead"), "gc.collect")
    return missing


def format_profile(prof: Profiler, total: float, unavoidable: float) -> str:
    lines = ["| part | kind | seconds | share | calls |", "|---|---|---:|---:|---:|"]
    for label, kind, seconds, calls in prof.rows():
        if seconds < 0.005 and kind != "work":
            continue
        shown = {"work": "unavoidable", "overhead": "overhead", "phase": "other (inside phase)"}[kind]
        lines.append(f"| {label} | {shown} | {seconds:.2f} | {100 * seconds / total:.1f}% | {calls} |")
    return "\n".join(lines)
