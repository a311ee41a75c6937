"""`llamafleet operator` (llamafleet.common.cli dispatches to it): the rest of the command
line goes to operator.main, which parses it."""

from __future__ import annotations

import argparse


def setup(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="operator options (see --help)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from .main import main

    return main(args.rest)
