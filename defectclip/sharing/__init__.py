"""Sharing artifacts: model cards, Hub-ready export folders and the push (one commit, stale files deleted).

The objects' own `push_to_hub` (defectclip.artifacts) and the `python -m hub` commands both come through here,
so a pushed repo always carries its card. Imported only when something is exported or pushed.
"""

from .cards import ALPHACLIP_WEIGHTS, BenchmarkRef, CardInfo, MetricRef
from .export import export_artifact
from .push import PushResult, RetryPolicy, push_folder, resolve_repo_id

__all__ = ["ALPHACLIP_WEIGHTS", "BenchmarkRef", "CardInfo", "MetricRef", "PushResult", "RetryPolicy", "export_artifact",
           "push_folder", "resolve_repo_id"]
