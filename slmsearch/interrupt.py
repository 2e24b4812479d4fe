"""Ctrl-C (SIGINT) and SIGTERM that always stop a study: SIGINT cleanly at the next safe point, at
once if pressed twice; SIGTERM at once.

Why not a plain ``KeyboardInterrupt``: a process started in the background by a non-interactive
shell (``slmsearch optimize ... &`` in a script) inherits SIGINT *ignored*, so Python never raises
it (the study ran on through GPTQ and every later trial); library loops that catch
``BaseException`` (gptqmodel has several) eat it; and an exception raised by a signal handler lands
wherever the main thread happens to be, including inside a garbage-collection or weakref callback
(SQLAlchemy's ``_collection_gced``), where Python prints "Exception ignored in ..." with a
traceback and drops it.

So inside :func:`handling` (installed by the study loop) the handler raises nothing on the first
SIGINT: it records the request and says so, and :func:`check`, called at every safe point (between
stages, before a cache entry is committed, between evaluation chunks, before a trial starts),
raises ``KeyboardInterrupt`` there; the study then marks its trial FAILED and exits with 130.

A second SIGINT, or a SIGTERM (what ``kill``, systemd and batch schedulers send), does not wait: it
runs ``on_force`` (the study marks its running trial FAILED, on a helper thread so that it never
re-enters a database session the main thread holds), removes this process's temporary folders
(:func:`slmsearch.fsutil.remove_owned`) and exits at once with 130 (SIGINT) or 143 (SIGTERM, 128 + 15).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from slmsearch.fsutil import remove_owned

EXIT_CODE = 130  # 128 + SIGINT
EXIT_CODE_TERM = 143  # 128 + SIGTERM
FORCE_TIMEOUT_S = 20.0  # how long a forced stop waits for the storage to record the failed trial
_requested = threading.Event()


def check() -> None:
    """Raise ``KeyboardInterrupt`` when Ctrl-C was pressed (a no-op otherwise: call it freely)."""
    if _requested.is_set():
        raise KeyboardInterrupt


def requested() -> bool:
    """True once a stop was asked for (the next :func:`check` raises)."""
    return _requested.is_set()


def _force_stop(on_force: Callable[[], str] | None, code: int) -> None:
    """Fail the running trial (on a helper thread, bounded), remove temporary folders, exit ``code``."""
    result: dict[str, str] = {}

    def run() -> None:
        try:
            result["message"] = on_force() if on_force is not None else "interrupted"
        except Exception as exc:  # the storage went away: the heartbeat check fails the trial later
            result["message"] = (f"interrupted ({type(exc).__name__}); the running trial is failed after "
                                 "the grace period; re-run the same command to resume")

    worker = threading.Thread(target=run, name="slmsearch-force-stop", daemon=True)
    worker.start()
    worker.join(FORCE_TIMEOUT_S)
    message = result.get("message", "interrupted; the storage did not answer in time; the running trial is "
                                    "failed after the grace period; re-run the same command to resume")
    remove_owned()
    sys.stderr.write(f"\nerror: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(code)


@contextmanager
def handling(on_force: Callable[[], str] | None = None) -> Iterator[None]:
    """Install the SIGINT/SIGTERM handlers for the body (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def on_sigint(signum: int, frame: Any) -> None:
        if _requested.is_set():
            _force_stop(on_force, EXIT_CODE)
        _requested.set()  # raised by check() at the next safe point, never here
        sys.stderr.write("\nCtrl-C: stopping after the current step; press Ctrl-C again to stop at once\n")
        sys.stderr.flush()

    def on_sigterm(signum: int, frame: Any) -> None:
        _requested.set()
        _force_stop(on_force, EXIT_CODE_TERM)

    _requested.clear()
    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        _requested.clear()


def terminate_cleanly() -> None:
    """For commands without a study (compress, export, eval): SIGTERM removes this process's
    temporary folders and exits with 143 instead of leaving them behind."""
    if threading.current_thread() is not threading.main_thread():
        return

    def on_sigterm(signum: int, frame: Any) -> None:
        remove_owned()
        sys.stderr.write("\nerror: terminated (SIGTERM); temporary folders removed\n")
        sys.stderr.flush()
        os._exit(EXIT_CODE_TERM)

    if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
        signal.signal(signal.SIGTERM, on_sigterm)
