"""interrupt.py: the first Ctrl-C raises nothing where it lands (only at the next safe point), so
it is never lost inside a garbage-collection or weakref callback; SIGTERM fails fast (see also
tests/compress/test_cache.py for SIGTERM during a cache write and tests/search/test_slots.py for
a whole study)."""

from __future__ import annotations

import signal
import sys

import pytest

from slmsearch import interrupt


def test_the_first_sigint_raises_only_at_the_next_check():
    with interrupt.handling():
        signal.raise_signal(signal.SIGINT)  # no KeyboardInterrupt here
        assert interrupt.requested()
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
    assert not interrupt.requested()
    interrupt.check()  # cleared on leaving


def test_a_sigint_during_a_gc_callback_is_not_lost(monkeypatch):
    """A handler that raised landed inside ``__del__``/weakref callbacks (SQLAlchemy's
    ``_collection_gced``), where Python prints "Exception ignored in" and drops it."""
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)

    class Collected:
        def __del__(self) -> None:
            signal.raise_signal(signal.SIGINT)
            _ = [0] * 10  # the handler runs on this bytecode, inside the finaliser

    with interrupt.handling():
        Collected()  # freed at once: __del__ runs here
        assert unraisable == []
        with pytest.raises(KeyboardInterrupt):
            interrupt.check()
