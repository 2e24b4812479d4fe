"""How gptqmodel is run here: its environment, its worker threads, its progress bars, its device.

gptqmodel and logbar are imported inside the functions that need them (heavy imports), and
``gptqmodel_env`` must run before the first ``import gptqmodel``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch

from slmsearch.errors import SlmsearchError

T = TypeVar("T")


LOG_LEVEL_ENV = "SLMSEARCH_GPTQMODEL_LOG"  # gptqmodel's log level: WARNING by default, INFO for its tables


def gptqmodel_env() -> None:
    """Environment gptqmodel needs on small CPU machines; call before importing it."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    no_progress_bars_off_a_terminal()
    gptqmodel_log_level()


def gptqmodel_log_level() -> str:
    """Show gptqmodel's warnings and errors only, unless ``$SLMSEARCH_GPTQMODEL_LOG`` names another
    level (e.g. INFO); returns the level set.

    At INFO gptqmodel prints a banner, its load reports and a table row per quantized module:
    11,109 of the 13,400 lines `make demo` printed (1,474 lines in all with this; the study's own
    progress is a few dozen of them). It logs through logbar's one shared logger, which logbar creates at
    INFO; this sets that logger's level (creating it first, so gptqmodel's import finds it set),
    and the level of tokenicer, gptqmodel's tokenizer helper, which logs through the standard
    ``logging`` at INFO (its import calls ``logging.basicConfig(level=INFO)``). Does nothing to
    logbar if it is absent.
    """
    level = os.environ.get(LOG_LEVEL_ENV, "WARNING").strip().upper() or "WARNING"
    try:
        logging.getLogger("tokenicer").setLevel(level)
        from logbar import LogBar

        LogBar.shared().setLevel(level)
    except ImportError:
        return level
    except (ValueError, TypeError):
        raise SlmsearchError(
            f"{LOG_LEVEL_ENV}={os.environ.get(LOG_LEVEL_ENV)!r} is not a log level; use DEBUG, INFO, WARNING or ERROR"
        ) from None
    return level


def no_progress_bars_off_a_terminal() -> None:
    """Let gptqmodel's progress bars (drawn by logbar) render only when stdout is a terminal.

    logbar stops redrawing in CI or agent environments but not when stdout is a file or a pipe:
    there a GPTQ + EoRA stage pair wrote 1.3 MB of redrawn bars and took ~7 s longer on 2 cores
    (110 s -> 103 s, docs/benchmarks.md section 1). logbar has no switch for it, so its
    environment check is wrapped to also answer "headless" off a terminal; nothing else of
    logbar's output changes. Idempotent; does nothing if logbar is absent or has changed.
    """
    try:
        from logbar import terminal
    except ImportError:
        return
    check = getattr(terminal, "_is_headless_environment", None)
    if check is None or getattr(check, "slmsearch_wrapped", False):
        return

    def headless(*, notebook: bool = False) -> bool:
        isatty = getattr(sys.stdout, "isatty", None)
        return check(notebook=notebook) or not (callable(isatty) and isatty())

    headless.slmsearch_wrapped = True  # type: ignore[attr-defined]
    terminal._is_headless_environment = headless


@contextmanager
def module_logs_out_of_the_working_directory() -> Iterator[Path | None]:
    """Send the per-module logs gptqmodel writes during a quantize run to a temporary
    folder, removed afterwards, instead of ``./logs`` of whatever directory slmsearch was started in.

    gptqmodel appends one JSON record per module (loss, time, samples) to
    ``logs/<processor>_log_<random>_time_<date>.log`` relative to the working directory, two new
    files per trial, and has no setting for it; a study left hundreds of them in the user's folder.
    The GPTQ loss per module is also in the checkpoint's ``quant_log.csv``, so nothing is lost.
    The records are written by one of gptqmodel's worker threads after the module is done, so the
    folder is removed only once that pool has drained; after a failure it is left in the
    temporary directory rather than pulled from under a write still queued. Yields the folder
    (None, and changes nothing, if gptqmodel has moved the setting). Call after gptqmodel_env.
    """
    import gptqmodel
    from gptqmodel.looper import loop_processor

    previous = getattr(loop_processor, "_PROJECT_LOG_DIR", None)
    if not isinstance(previous, Path):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="slmsearch-gptqmodel-logs-"))
    loop_processor._PROJECT_LOG_DIR = folder
    try:
        yield folder
        gptqmodel.get_device_thread_pool().wait("cpu")  # the queued log writes land before removal
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        loop_processor._PROJECT_LOG_DIR = previous


def _cpu_workers(pool: Any) -> int:
    """How many CPU worker threads gptqmodel's pool runs (its own count, else the setting)."""
    return len(getattr(pool, "_worker_groups", {}).get("cpu", ())) or int(os.environ.get("GPTQMODEL_CPU_WORKERS", "1"))


def on_each_cpu_worker(fn: Callable[[], T], *, timeout_s: float = 60.0) -> list[T]:
    """Run ``fn`` once on each of gptqmodel's CPU worker threads; returns the results in no order.

    gptqmodel hands tasks to its workers itself, so each task first waits at a barrier until every
    worker holds one: no worker gets two. A task that raises makes gptqmodel end the process, so
    an exception of ``fn`` is carried back and raised here instead. Call after importing gptqmodel.
    """
    import gptqmodel

    pool = gptqmodel.get_device_thread_pool()
    workers = _cpu_workers(pool)
    barrier = threading.Barrier(workers)

    def task() -> tuple[bool, Any]:
        try:
            barrier.wait(timeout=timeout_s / 2)
        except threading.BrokenBarrierError:
            pass  # a worker that never came: run here all the same
        try:
            return True, fn()
        except BaseException as exc:  # noqa: BLE001 - carried to the caller, never raised on a worker
            return False, exc

    results = []
    for future in [pool.submit(torch.device("cpu"), task) for _ in range(workers)]:
        ok, value = future.result(timeout=timeout_s)
        if not ok:
            raise value
        results.append(value)
    return results


_LIMITED_POOLS: set[int] = set()  # id() of the gptqmodel thread pools whose workers were limited


def limit_worker_threads() -> int:
    """Give each of gptqmodel's CPU worker threads ``cores // workers`` torch threads; returns that.

    gptqmodel solves modules (GPTQ's column loop; EoRA's solves too, when gptqmodel ran EoRA) on its own
    worker threads, ``GPTQMODEL_CPU_WORKERS`` of them, and each starts with torch's default thread
    count (all cores): 2 workers x 2 threads on 2 cores oversubscribe them, and LAPACK's SVD runs
    ~6x slower (EoRA stage 86 s -> 62 s when limited; docs/benchmarks.md section 1). torch's thread
    count is per thread, so it is set on each worker, by a task run on it; the caller's own count
    (calibration forwards run on it) is left as it was. Once per pool; call after importing gptqmodel.
    """
    import gptqmodel

    pool = gptqmodel.get_device_thread_pool()
    own = torch.get_num_threads()
    per_worker = max(1, own // _cpu_workers(pool))
    if id(pool) in _LIMITED_POOLS:
        return per_worker

    def limit() -> int:
        torch.ones(1 << 16).add_(1)  # torch fixes a thread's count at its first parallel op: do it first
        torch.set_num_threads(per_worker)
        return torch.get_num_threads()

    try:
        on_each_cpu_worker(limit)
    except Exception:  # a speed-up only: a pool without CPU workers (or a stuck one) must not fail a stage
        return per_worker
    finally:
        torch.set_num_threads(own)  # set_num_threads also moves torch's default for new threads
    _LIMITED_POOLS.add(id(pool))
    return per_worker


ENV_COMPUTE_DTYPE = "SLMSEARCH_COMPUTE_DTYPE"  # bfloat16 | float32: overrides the measured choice
_DTYPE_CHOICE: list[str] = []


def compute_dtype() -> Any:
    """The dtype gptqmodel computes in: bfloat16 where the CPU has it natively (or on a GPU),
    float32 where bfloat16 is emulated and slower (x86 without AVX-512 bf16 / AMX: 4-10x), chosen
    once per process by timing the same matmul in both (:func:`choose_dtype`);
    ``$SLMSEARCH_COMPUTE_DTYPE`` overrides it."""
    import torch

    forced = os.environ.get(ENV_COMPUTE_DTYPE, "").strip()
    if forced:
        if forced not in ("bfloat16", "float32"):
            raise SlmsearchError(f"{ENV_COMPUTE_DTYPE}={forced!r}: use bfloat16 or float32")
        return getattr(torch, forced)
    if not _DTYPE_CHOICE:
        _DTYPE_CHOICE.append("bfloat16" if torch.cuda.is_available() else choose_dtype(*matmul_seconds()))
    return getattr(torch, _DTYPE_CHOICE[0])


def kernel_dtype(compute: Any | None = None) -> Any:
    """The dtype a quantized checkpoint is loaded in through gptqmodel, for ``compute``
    (:func:`compute_dtype` by default): bfloat16 stays bfloat16; for float32 it is float16.

    gptqmodel's torch kernel, the one that takes every width (2-8 bits) and an EoRA adapter,
    computes in float16 or bfloat16 only, and its one float32 kernel on a CPU (TorchFusedLinear)
    takes 4-bit layers only: loaded in float32, a plan with a 3-bit layer cannot load at all. float16
    holds the stored float16 scales exactly, so the float32 dense copy that
    :func:`slmsearch.checkpoint.load` builds from it is the grid's values exactly."""
    compute = compute_dtype() if compute is None else compute
    return torch.float16 if compute == torch.float32 else compute


def matmul_seconds(rows: int = 256, inner: int = 576, cols: int = 1536, reps: int = 5) -> tuple[float, float]:
    """Best-of-``reps`` seconds of one [rows, inner] @ [inner, cols] matmul in bfloat16, then float32
    (a decoder MLP's shape at the default model's width)."""
    import time

    import torch

    out = []
    for dtype in (torch.bfloat16, torch.float32):
        a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(reps):
            start = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - start)
        out.append(best)
    return out[0], out[1]


def choose_dtype(bf16_s: float, fp32_s: float, *, margin: float = 1.2) -> str:
    """float32 when bfloat16 is more than ``margin`` times slower (emulated), else bfloat16."""
    return "float32" if bf16_s > margin * fp32_s else "bfloat16"


def compute_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def layer_progress(label: str, n_layers: int) -> Callable[..., None]:
    """A gptqmodel layer callback (``model.layer_callback``: gptqmodel calls it when a decoder
    layer is quantized, then again when it is packed) printing ``[gptq] layer i/n`` once per layer,
    since gptqmodel's own per-module log is off at the default level (:func:`gptqmodel_log_level`)."""
    from slmsearch.progress import Ticker

    ticker = Ticker(label, n_layers, "layer", every_s=0)
    seen: set[int] = set()
    lock = threading.Lock()

    def layer_complete(*, layer_idx: int, submodule_finalized: bool = False, **_: Any) -> None:
        with lock:
            if layer_idx in seen or layer_idx >= n_layers:
                return
            seen.add(layer_idx)
            ticker.tick()

    return layer_complete


@contextmanager
def stdout_to_nothing() -> Iterator[None]:
    """Drop what gptqmodel ``print``s meanwhile: its ``save`` prints the saved folder's file names and
    the whole ``generation_config.json`` and ``config.json`` (~100 lines per GPTQ stage), with no
    setting to turn that off. Its logger (warnings, errors) is not stdout's and still shows."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):
        yield
