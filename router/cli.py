"""`llamafleet router` (llamafleet.common.cli dispatches to it): settings as flags, then
router.main runs it."""

from __future__ import annotations

import argparse

from llamafleet.common.cli import add_settings_flags, load_settings

from .settings import RouterSettings


def setup(parser: argparse.ArgumentParser) -> None:
    add_settings_flags(parser, RouterSettings)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from llamafleet.common.logs import configure

    from .main import serve

    settings = load_settings(args, RouterSettings)
    configure(settings.log_level, settings.log_format)
    return serve(settings)
