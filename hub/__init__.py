"""Export and push: model folders, caption datasets, cards and the Space folder, to and from the Hub.

`python -m hub --help` lists the command-line entry points.
"""

from hub.push import PushResult, RetryPolicy, push_folder, resolve_repo_id

__all__ = ["PushResult", "RetryPolicy", "push_folder", "resolve_repo_id"]
