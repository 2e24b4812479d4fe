"""Ctrl-C (SIGINT) that always stops a study, cleanly if it can, at once if asked twice.

Two ways a plain ``KeyboardInterrupt`` fails a long study: a process started in the background by
a non-interactive shell (``slmsearch optimize ... &`` in a script) inherits SIGINT *ignored*, so
Python never raises it (the study then ran on through GPTQ and every later trial, and looked as
if gptqmodel had swallowed the signal); and library loops that catch ``BaseException`` (gptqmodel
has several) can eat it. Inside :func:`handling` (installed by the study loop) the first SIGINT
raises ``KeyboardInterrupt`` where the main thread is and records the request; :func:`check`,
called at every safe point (between stages, before a cache entry is committed, between evaluation
chunks, before a trial starts), raises it again if it was lost. A second SIGINT does not wait: it
runs ``on_force`` (the study marks its running trial FAILED) and exits with 130 at once.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

EXIT_CODE = 130
_requested = threading.Event()


def check() -> None:
    """Raise ``KeyboardInterrupt`` when Ctrl-C was pressed (a no-op otherwise: call it freely)."""
    if _requested.is_set():
        raise KeyboardInterrupt


@contextmanager
def handling(on_force: Callable[[], str] | None = None) -> Iterator[None]:
    """Install the two-step SIGINT handler for the body (main thread only; a no-op elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGINT)

    def handler(signum: int, frame: Any) -> None:
        if _requested.is_set():
            try:
                message = on_force() if on_force is not None else "interrupted"
            except Exception as exc:  # the storage went away: the heartbeat check fails the trial later
                message = f"interrupted ({type(exc).__name__}); the running trial is failed after the grace period"
            sys.stderr.write(f"\nerror: {message}\n")
            sys.stderr.flush()
            sys.stdout.flush()
            os._exit(EXIT_CODE)
        _requested.set()
        sys.stderr.write("\nCtrl-C: stopping after the current step; press Ctrl-C again to stop at once\n")
        sys.stderr.flush()
        raise KeyboardInterrupt

    _requested.clear()
    signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _requested.clear()
