"""Third-party log lines that tell a slmsearch user nothing, silenced in one place.

Importing transformers' model classes imports torchao, which logs a warning for every optional
CUDA kernel library it cannot load on a CPU machine, and torch then logs a deprecation warning for
each Enum torchao registers: four lines before anything slmsearch prints (before the one
``error:`` line of a bad input, for instance). They go through Python's logging, so raising those
loggers' levels before the import silences them; errors still show.
"""

from __future__ import annotations

import logging

# logger name -> why its warnings are noise here
QUIET_LOGGERS: dict[str, str] = {
    "torchao": "'Failed to load .../torchao/_C_*.so': optional CUDA kernels, absent on a CPU build",
    "torch.utils._pytree": "'<enum ...> is an Enum subclass ...': a deprecation torchao triggers on import",
}


# warning message (a regular expression) -> why it is noise here
QUIET_WARNINGS: dict[str, str] = {
    r"`is_gradient_checkpointing` is deprecated": "transformers' own deprecation, raised inside peft's LoRA set-up",
}


def quiet_third_party() -> None:
    """Show only errors from the loggers in :data:`QUIET_LOGGERS` and none of the warnings in
    :data:`QUIET_WARNINGS` (call before importing torch). gptqmodel's own output is tamed where it
    runs (compress/gptqmodel_runtime.py: its log level, its progress bars, its config dump)."""
    import warnings

    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    for message in QUIET_WARNINGS:
        warnings.filterwarnings("ignore", message=message)
