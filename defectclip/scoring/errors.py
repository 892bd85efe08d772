"""The scorers' error: wrong use or unusable input, with a message that says what to do instead."""

from __future__ import annotations

from ..errors import DefectclipError


class ScoringError(DefectclipError):
    """A scorer used the wrong way or fed unusable input: the message says what to do instead."""
