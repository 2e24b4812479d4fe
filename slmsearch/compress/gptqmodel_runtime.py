"""How gptqmodel is run here: its environment, its worker threads, its progress bars, its device.

gptqmodel and logbar are imported inside the functions that need them (heavy imports), and
``gptqmodel_env`` must run before the first ``import gptqmodel``.
"""

from __future__ import annotations

import os
import sys
import threading

import torch


def gptqmodel_env() -> None:
    """Environment gptqmodel needs on small CPU machines; call before importing it."""
    os.environ.setdefault("GPTQMODEL_CPU_WORKERS", "2")
    os.environ.setdefault("GPTQMODEL_DISABLE_PACK_EXT", "1")
    no_progress_bars_off_a_terminal()


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


_LIMITED_POOLS: set[int] = set()  # id() of the gptqmodel thread pools whose workers were limited


def limit_worker_threads() -> int:
    """Give each of gptqmodel's CPU worker threads ``cores // workers`` torch threads; returns that.

    gptqmodel solves modules (GPTQ's column loop, EoRA's eigendecomposition and SVD) on its own
    worker threads, ``GPTQMODEL_CPU_WORKERS`` of them, and each starts with torch's default thread
    count (all cores): 2 workers x 2 threads on 2 cores oversubscribe them, and LAPACK's SVD runs
    ~6x slower (EoRA stage 86 s -> 62 s when limited; docs/benchmarks.md section 1). torch's thread
    count is per thread, so it is set on each worker, by a task run on it; the caller's own count
    (calibration forwards run on it) is left as it was. Once per pool; call after importing gptqmodel.
    """
    import gptqmodel

    pool = gptqmodel.get_device_thread_pool()
    workers = len(getattr(pool, "_worker_groups", {}).get("cpu", ())) or int(os.environ.get("GPTQMODEL_CPU_WORKERS", "1"))
    own = torch.get_num_threads()
    per_worker = max(1, own // workers)
    if id(pool) in _LIMITED_POOLS:
        return per_worker
    barrier = threading.Barrier(workers)

    def limit() -> int:
        # Runs on a worker: it must not raise (a failed task makes gptqmodel end the process).
        try:
            barrier.wait(timeout=30)  # hold each worker until all have one task: one task per worker
        except threading.BrokenBarrierError:
            pass
        torch.ones(1 << 16).add_(1)  # torch fixes a thread's count at its first parallel op: do it first
        torch.set_num_threads(per_worker)
        return torch.get_num_threads()

    try:
        futures = [pool.submit(torch.device("cpu"), limit) for _ in range(workers)]
        for future in futures:
            future.result(timeout=60)
    except Exception:  # a speed-up only: a pool without CPU workers (or a stuck one) must not fail a stage
        return per_worker
    finally:
        torch.set_num_threads(own)  # set_num_threads also moves torch's default for new threads
    _LIMITED_POOLS.add(id(pool))
    return per_worker


def compute_device() -> str:
    return "cuda:0" if torch.cuda.is_available() else "cpu"
