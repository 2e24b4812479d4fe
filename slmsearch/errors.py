"""The one error type users see: a message naming the value and the fix."""


class SlmsearchError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` on one line and exits with 2."""
