"""Progress lines for the long steps (LoRA steps, GPTQ layers, evaluation requests).

One short line on stderr at the first item, then at most one every ``every_s`` seconds, and at
the last: ``[lora] step 40/124 loss 3.21 (12 s)``. The standard library only, so every room may
use it.
"""

from __future__ import annotations

import sys
import time
from typing import IO

DEFAULT_EVERY_S = 10.0


class Ticker:
    """Counts the items of one step and prints a line now and then (``every_s=0``: every item)."""

    def __init__(self, label: str, total: int | None, unit: str = "", *, every_s: float = DEFAULT_EVERY_S,
                 stream: IO[str] | None = None, enabled: bool = True, note_total: str = "") -> None:
        self.label, self.total, self.unit = label, total, unit
        self.note_total = note_total  # said instead of "/total" when the total is not known (e.g. "4 pages")
        self.every_s = every_s
        self.stream = stream
        self.enabled = enabled
        self.start = time.monotonic()
        self.last: float | None = None
        self.done = 0

    def tick(self, n: int = 1, note: str = "") -> None:
        """``n`` more items done; ``note`` (e.g. ``loss 3.21``) ends the line if one is printed."""
        self.done += n
        now = time.monotonic()
        final = self.total is not None and self.done >= self.total
        if not self.enabled or not (self.last is None or final or now - self.last >= self.every_s):
            return
        self.last = now
        of = f"/{self.total}" if self.total is not None else (f" ({self.note_total})" if self.note_total else "")
        unit = f"{self.unit} " if self.unit else ""
        extra = f" {note}" if note else ""
        print(f"[{self.label}] {unit}{self.done}{of}{extra} ({now - self.start:.0f} s)",
              file=self.stream or sys.stderr, flush=True)
