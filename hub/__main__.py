"""`python -m hub push-model|push-dataset|push-space <folder> <repo> [--dry-run] [--force] [--private] [--token T]`."""

from __future__ import annotations

import argparse
import sys

from hub.push import DEFAULT_ORG, ORG_ENV_VAR, RetryPolicy, push_folder

PUSH_COMMANDS = {"push-model": "model", "push-dataset": "dataset", "push-space": "space"}


def _add_push_command(subparsers, command: str, repo_type: str) -> None:
    parser = subparsers.add_parser(command, help=f"upload a {repo_type} folder to the Hub as one commit")
    parser.add_argument("folder", help=f"local {repo_type} folder; every file in it is uploaded")
    parser.add_argument("repo", help=f"'<namespace>/<name>', or '<name>' for ${ORG_ENV_VAR} (default {DEFAULT_ORG})")
    parser.add_argument("--dry-run", action="store_true", help="print the files and sizes; touch no network")
    parser.add_argument("--force", action="store_true",
                        help="replace the README.md on the Hub even if it was edited there since our last push")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--message", default=None, help="commit title (default: a generated one)")
    parser.add_argument("--attempts", type=int, default=RetryPolicy.attempts,
                        help="tries in all when the network or the Hub fails (default %(default)s)")
    parser.add_argument("--retry-delay", type=float, default=RetryPolicy.base_delay,
                        help="seconds before the first retry; doubles each time (default %(default)s)")
    parser.set_defaults(repo_type=repo_type, handler=_run_push)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub", description="defectclip Hub distribution tools")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, repo_type in PUSH_COMMANDS.items():
        _add_push_command(subparsers, command, repo_type)
    return parser


def _run_push(args: argparse.Namespace) -> int:
    push_folder(
        args.folder,
        args.repo,
        args.repo_type,
        dry_run=args.dry_run,
        force=args.force,
        private=True if args.private else None,
        token=args.token,
        commit_message=args.message,
        retry=RetryPolicy(attempts=max(args.attempts, 1), base_delay=args.retry_delay),
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # FolderError, a bad repo id or repo type, invalid README metadata
        print(f"error: {error}", file=sys.stderr)
        return 2
    except Exception as error:
        # HfHubHTTPError (an OSError) and httpx transport errors once the retries are spent.
        if not isinstance(error, OSError) and not _is_network_error(error):
            raise
        print(f"error: push failed: {error}", file=sys.stderr)
        return 1


def _is_network_error(error: Exception) -> bool:
    from huggingface_hub.utils import httpx

    return isinstance(error, httpx.TransportError)


if __name__ == "__main__":
    sys.exit(main())
