"""`llamafleet bench` (llamafleet.common.cli dispatches to it; bench.load measures)."""

from __future__ import annotations

import argparse

from . import load


def setup(parser: argparse.ArgumentParser) -> None:
    load.add_arguments(parser)
    parser.set_defaults(func=load.main)
