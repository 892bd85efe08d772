"""`--token` on the command line is refused: the Hub token comes from HF_TOKEN or the saved login."""

from __future__ import annotations

import argparse

TOKEN_HELP = "not accepted: set HF_TOKEN or run `hf auth login` (a token in argv is visible in `ps`)"


class RefuseTokenArgument(argparse.Action):
    """`--token` is refused: a secret in argv is visible to every user in `ps` and kept in shell history.

    The push reads the token the way huggingface_hub does: HF_TOKEN, else the saved login.
    """

    def __call__(self, parser, namespace, values, option_string=None):
        parser.error(
            f"{option_string} is not accepted: a token on the command line is visible to every user of this "
            "machine in `ps` and stays in shell history. Set HF_TOKEN in the environment, or run "
            "`hf auth login` once."
        )


def add_token_argument(parser: argparse.ArgumentParser) -> None:
    """`--token` kept only to explain where the token goes now (args.token stays None)."""
    parser.add_argument("--token", action=RefuseTokenArgument, nargs="?", default=None, help=TOKEN_HELP)
