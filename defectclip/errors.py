"""The one family of errors defectclip raises on purpose.

Every failure that comes from the user's input (an image, a dataset folder, a saved artifact, a
checkpoint) is a `DefectclipError` whose message names the input and says what to do; anything else
escaping the library is a bug. Callers that want "bad input, tell the user" catch this one class.

It derives from ValueError because the first subclasses did, and callers already catch those.
"""

from __future__ import annotations


class DefectclipError(ValueError):
    """Base of every deliberate defectclip error: the message names the input and what to do."""


class ArtifactError(DefectclipError):
    """A saved artifact (config.json, safetensors, inspection.json, checkpoint) is damaged or unusable."""


class CheckpointError(ArtifactError):
    """A training checkpoint that cannot be written or resumed from."""


class UnknownObjectError(DefectclipError):
    """A describer was asked about an object it has no captions for; the message lists the objects it knows."""
