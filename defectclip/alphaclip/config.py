"""Constants of the alpha input and the describer folder, and the error every part raises."""

from __future__ import annotations

from ..errors import DefectclipError, UnknownObjectError  # noqa: F401 - re-exported for the describer

ALPHA_MEAN = 0.5
ALPHA_STD = 0.26
CONFIG_NAME = "describer_config.json"
WEIGHTS_NAME = "describer.safetensors"
MERGED_WEIGHTS_NAME = "model.safetensors"
ADAPTER_DIR = "adapter"
OFFICIAL_WEIGHTS = "alphaclip"  # `weights_from` of a tower loaded from official AlphaCLIP weights (CC BY-NC 4.0)
FORMAT = "defectclip-alphaclip-describer"
DEFAULT_TEMPERATURE = 0.07


class AlphaClipError(DefectclipError):
    """A checkpoint, folder or input that does not fit the describer; the message says what is wrong."""
