"""`python -m hub COMMAND ...`: push folders, export artifacts as Hub-ready folders, build the Space folder.

    push-model|push-dataset|push-space <folder> <repo> [--dry-run] [--force] [--private]   (token: HF_TOKEN / hf auth login)
    export-tab|export-scorer|export-describer|export-clip-ada <source> <out> [card options]
    export-pipeline <out> --scorer NAME=FOLDER ... [--describer F] [--clip-ada F] [card options]
    build-space <out> [--models-repo R] [--model R ...] [--dataset R ...] [--hardware H]
"""

from __future__ import annotations

import argparse
import sys

from pathlib import Path

from defectclip.sharing.push import DEFAULT_ORG, ORG_ENV_VAR, RetryPolicy, push_folder
from hub.tokens import add_token_argument

PUSH_COMMANDS = {"push-model": "model", "push-dataset": "dataset", "push-space": "space"}
EXPORT_COMMANDS = {
    "export-tab": ("TAB backbone", "export_tab_backbone"),
    "export-scorer": ("PatchCore / PaDiM", "export_scorer"),
    "export-describer": ("AlphaCLIP region describer", "export_describer"),
    "export-clip-ada": ("CLIP-ADA", "export_clip_ada"),
}


def _add_push_command(subparsers, command: str, repo_type: str) -> None:
    parser = subparsers.add_parser(command, help=f"upload a {repo_type} folder to the Hub as one commit")
    parser.add_argument("folder", help=f"local {repo_type} folder; every file in it is uploaded")
    parser.add_argument("repo", help=f"'<namespace>/<name>', or '<name>' for ${ORG_ENV_VAR} (default {DEFAULT_ORG})")
    parser.add_argument("--dry-run", action="store_true", help="print the files and sizes; touch no network")
    parser.add_argument("--force", action="store_true",
                        help="replace the README.md on the Hub even if it was edited there since our last push")
    parser.add_argument("--private", action="store_true", help="create the repo private (if it does not exist)")
    add_token_argument(parser)
    parser.add_argument("--message", default=None, help="commit title (default: a generated one)")
    parser.add_argument("--keep-remote-files", action="store_true",
                        help="keep files on the Hub that the folder does not have (default: the commit deletes them, "
                             "so the repo holds exactly the new version)")
    parser.add_argument("--attempts", type=int, default=RetryPolicy.attempts,
                        help="tries in all when the network or the Hub fails (default %(default)s)")
    parser.add_argument("--retry-delay", type=float, default=RetryPolicy.base_delay,
                        help="seconds before the first retry; doubles each time (default %(default)s)")
    if repo_type == "space":
        parser.add_argument("--hardware", default=None,
                            help="hardware to request for the Space (default: the folder's suggested_hardware)")
    parser.set_defaults(repo_type=repo_type, handler=_run_push)


def _add_card_options(parser: argparse.ArgumentParser) -> None:
    from defectclip.region_dataset import KNOWN_SOURCES

    card = parser.add_argument_group("model card")
    card.add_argument("--repo-id", default=None,
                      help="repo the card's loading snippets name ('<org>/<name>' or '<name>'); "
                           "default: the out folder's name")
    card.add_argument("--title", default=None, help="card title (default: the repo name)")
    card.add_argument("--training-data", action="append", default=[], choices=sorted(KNOWN_SOURCES),
                      help="a dataset the model was trained on (repeatable): the card cites it with its licence")
    card.add_argument("--dataset", action="append", default=[],
                      help="a Hub dataset id for the card metadata (repeatable)")
    card.add_argument("--alphaclip-weights", action="store_true",
                      help="the model derives from official AlphaCLIP weights: the card becomes CC BY-NC 4.0")
    card.add_argument("--limitation", action="append", default=[], help="an extra limitation to state (repeatable)")
    bench = parser.add_argument_group("evaluation results (model-index), read from a benchmark JSON")
    bench.add_argument("--benchmark", type=Path, default=None, help="benchmark results JSON file")
    bench.add_argument("--metric", action="append", default=[], metavar="TYPE[:NAME]=PATH",
                       help="metric id, an optional readable name, and the number's path in the JSON, e.g. "
                            "'accuracy:top-1 caption accuracy=[variant=tuned].overall.accuracy' (repeatable)")
    bench.add_argument("--eval-dataset-name", default=None, help="readable name of the evaluation dataset")
    bench.add_argument("--eval-dataset-type", default=None, help="identifier of the evaluation dataset")
    bench.add_argument("--eval-split", default="test", help="evaluation split (default %(default)s)")
    bench.add_argument("--task-type", default="anomaly-detection", help="model-index task type (default %(default)s)")


def _add_export_command(subparsers, command: str, what: str, function: str) -> None:
    parser = subparsers.add_parser(command, help=f"write a Hub-ready {what} folder with a model card")
    parser.add_argument("source", help=f"saved {what} folder")
    parser.add_argument("out", type=Path, help="folder to write (replaced atomically)")
    if command == "export-scorer":
        parser.add_argument("--object", default=None, help="what the scorer inspects, e.g. 'magnetic tile'")
    _add_card_options(parser)
    parser.set_defaults(handler=_run_export, export_function=function)


def _add_pipeline_command(subparsers) -> None:
    parser = subparsers.add_parser("export-pipeline", help="write the app's models folder (one repo) with a card")
    parser.add_argument("out", type=Path, help="folder to write (replaced atomically)")
    parser.add_argument("--scorer", action="append", default=[], metavar="NAME=FOLDER",
                        help="a PatchCore/PaDiM folder, stored as scorers/NAME/ (repeatable)")
    parser.add_argument("--describer", default=None, help="region describer folder (stored as describer/)")
    parser.add_argument("--clip-ada", default=None, help="CLIP-ADA folder (stored as clip_ada/)")
    _add_card_options(parser)
    parser.set_defaults(handler=_run_export_pipeline)


def _add_space_command(subparsers) -> None:
    from hub.space import DEFAULT_HARDWARE, DEFAULT_MODELS_REPO

    parser = subparsers.add_parser("build-space", help="write the Gradio Space folder (push it with push-space)")
    parser.add_argument("out", type=Path, help="folder to write (replaced atomically)")
    parser.add_argument("--models-repo", default=DEFAULT_MODELS_REPO,
                        help="models repo the app downloads (default <org>/%(default)s)")
    parser.add_argument("--model", action="append", default=[],
                        help="another Hub model repo the Space uses (repeatable)")
    parser.add_argument("--dataset", action="append", default=[], help="a Hub dataset id to list (repeatable)")
    parser.add_argument("--hardware", default=DEFAULT_HARDWARE, help="suggested_hardware (default %(default)s)")
    parser.set_defaults(handler=_run_build_space)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hub", description="defectclip Hub distribution tools")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command, repo_type in PUSH_COMMANDS.items():
        _add_push_command(subparsers, command, repo_type)
    for command, (what, function) in EXPORT_COMMANDS.items():
        _add_export_command(subparsers, command, what, function)
    _add_pipeline_command(subparsers)
    _add_space_command(subparsers)
    return parser


def _run_push(args: argparse.Namespace) -> int:
    options = dict(
        dry_run=args.dry_run,
        force=args.force,
        private=True if args.private else None,
        token=args.token,
        commit_message=args.message,
        delete_stale=not args.keep_remote_files,
        retry=RetryPolicy(attempts=max(args.attempts, 1), base_delay=args.retry_delay),
    )
    if args.repo_type == "space":  # a Space is created with its hardware requested
        from hub.space import push_space

        push_space(args.folder, args.repo, args.hardware, **options)
    else:
        push_folder(args.folder, args.repo, args.repo_type, **options)
    return 0


def _card_info(args: argparse.Namespace, default_name: str):
    from defectclip.sharing.cards import ALPHACLIP_WEIGHTS, BenchmarkRef, CardInfo

    benchmarks = ()
    if args.benchmark is not None:
        benchmarks = (BenchmarkRef(
            json_path=args.benchmark, metrics=tuple(_parse_metric(text) for text in args.metric),
            dataset_name=args.eval_dataset_name or args.eval_dataset_type or args.benchmark.stem,
            dataset_type=args.eval_dataset_type or args.benchmark.stem, task_type=args.task_type,
            dataset_split=args.eval_split,
        ),)
    elif args.metric:
        raise ValueError("--metric needs --benchmark: the numbers are read from that JSON file")
    return CardInfo(
        repo_id=args.repo_id or default_name, title=args.title, training_data=tuple(args.training_data),
        benchmarks=benchmarks, base_weights=(ALPHACLIP_WEIGHTS,) if args.alphaclip_weights else (),
        datasets=tuple(args.dataset), limitations=tuple(args.limitation),
    )


def _parse_metric(text: str):
    """`TYPE=PATH` or `TYPE:NAME=PATH`; split at the first '=' because a path's [key=value] holds one too."""
    from defectclip.sharing.cards import MetricRef

    label, sep, path = text.partition("=")
    metric_type, _, name = label.partition(":")
    if not sep or not metric_type or not path:
        raise ValueError(f"--metric {text!r}: expected TYPE=PATH or TYPE:NAME=PATH")
    return MetricRef(metric_type=metric_type, path=path, name=name or None)


def _run_export(args: argparse.Namespace) -> int:
    import defectclip.sharing.export as exports

    card = _card_info(args, args.out.name)
    function = getattr(exports, args.export_function)
    kwargs = {"object_name": args.object} if args.export_function == "export_scorer" else {}
    out = function(args.source, args.out, card, **kwargs)
    print(f"Exported {args.source} to {out} (card for {card.full_repo_id}); push it with "
          f"`python -m hub push-model {out} {card.full_repo_id}`")
    return 0


def _run_export_pipeline(args: argparse.Namespace) -> int:
    from defectclip.sharing.export import export_pipeline

    scorers = {}
    for text in args.scorer:
        name, sep, folder = text.partition("=")
        if not sep or not name or not folder:
            raise ValueError(f"--scorer {text!r}: expected NAME=FOLDER")
        scorers[name] = folder
    card = _card_info(args, args.out.name)
    out = export_pipeline(args.out, scorers, describer=args.describer, clip_ada=args.clip_ada, card=card)
    print(f"Exported the pipeline to {out}; push it with `python -m hub push-model {out} {card.full_repo_id}`")
    return 0


def _run_build_space(args: argparse.Namespace) -> int:
    from hub.space import build_space_folder

    out = build_space_folder(args.out, args.models_repo, models=args.model, datasets=args.dataset,
                             hardware=args.hardware)
    print(f"Built the Space folder {out}; push it with `python -m hub push-space {out} <repo>`")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ValueError as error:  # FolderError, a bad repo id or repo type, invalid README metadata
        print(f"error: {error}", file=sys.stderr)
        return 2
    except FileNotFoundError as error:
        if args.command in PUSH_COMMANDS:  # an OSError like the push's network failures
            print(f"error: push failed: {error}", file=sys.stderr)
            return 1
        print(f"error: {error}", file=sys.stderr)  # an export source or benchmark file that is not there
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
