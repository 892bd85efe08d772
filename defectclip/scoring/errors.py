"""The scoring package's error, in a module of its own so that every scoring module can raise it
without importing the others (common.py imports plan.py, which needs the error too)."""

from ..errors import DefectclipError


class ScoringError(DefectclipError):
    """A scorer used the wrong way or fed unusable input: the message says what to do instead."""
