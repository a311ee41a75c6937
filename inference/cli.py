"""The pod's commands, `llamafleet serve` and `llamafleet fetch` (llamafleet.common.cli
dispatches to them)."""

from __future__ import annotations

import argparse
import faulthandler
import sys
from pathlib import Path

from llamafleet.common.cli import add_settings_flags, load_settings


def setup_serve(parser: argparse.ArgumentParser) -> None:
    # A crash inside llama.cpp (e.g. during the start-up self-test) then prints the Python
    # stack that led there, instead of a bare "Segmentation fault".
    if sys.__stderr__ is not None:
        faulthandler.enable(file=sys.__stderr__)
    # Load llama.cpp's shared libraries before grpc's and numpy's (main.init_backends says
    # why).
    import llama_cpp  # noqa: F401

    from .settings import Settings

    add_settings_flags(parser, Settings)
    parser.set_defaults(func=serve)


def serve(args: argparse.Namespace) -> int:
    from llamafleet.common.logs import configure

    from . import main
    from .settings import Settings

    settings = load_settings(args, Settings)
    configure(settings.log_level, settings.effective_log_format)
    return main.serve(settings)


def setup_fetch(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--url", required=True)
    parser.add_argument("--sha256", required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--retries", type=int, default=5,
                        help="resume a download cut short this many times (HTTP Range)")
    parser.set_defaults(func=fetch)


def fetch(args: argparse.Namespace) -> int:
    from .fetch import FetchError, progress_line
    from .fetch import fetch as fetch_model

    def progress(done: int, total: int | None) -> None:
        # JSON lines on stdout: the operator reads the last one from the Job's pod log.
        print(progress_line(done, total), flush=True)

    try:
        fetch_model(args.url, args.sha256, args.out, retries=args.retries, progress=progress)
    except FetchError as e:
        from llamafleet.common.contract import FETCH_EXIT_PERMANENT

        print(f"llamafleet fetch: {e}", file=sys.stderr)
        return FETCH_EXIT_PERMANENT if e.permanent else 1
    return 0
