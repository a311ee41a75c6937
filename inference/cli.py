"""The `llamafleet` command: serve, bench, operator."""

from __future__ import annotations

import argparse
import faulthandler
import sys
import typing
from pathlib import Path

from llamafleet.common.contract import ENV_PREFIX, ROUTER_ENV_PREFIX
from pydantic import ValidationError


def _flag_type(annotation: object) -> typing.Callable[[str], object]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    if base in (int, float):
        return base  # type: ignore[return-value]
    if base is Path:
        return Path
    return str


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls=None) -> None:
    """One --flag per settings field (``llamafleet serve``'s Settings unless another class
    is given); help = the field's description and env var."""
    if settings_cls is None:
        from .settings import Settings as settings_cls
    prefix = settings_cls.model_config["env_prefix"]

    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = prefix + name.upper()
        help_ = f"{field.description} [env {env}]"
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, type=_flag_type(field.annotation),
                                default=None, help=help_)


def load_settings(args: argparse.Namespace, settings_cls=None):
    from .settings import Settings, describe_errors

    settings_cls = settings_cls or Settings
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k in settings_cls.model_fields}
    try:
        return settings_cls(**overrides)
    except ValidationError as e:
        for line in describe_errors(e, settings_cls.model_config["env_prefix"]):
            print(f"llamafleet: {line}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(args: argparse.Namespace) -> int:
    from llamafleet.common.logs import configure

    from .server import serve

    settings = load_settings(args)
    configure(settings.log_level, settings.effective_log_format)
    return serve(settings)


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import main as bench_main

    return bench_main(args)


def cmd_fetch(args: argparse.Namespace) -> int:
    from .fetch import FetchError, fetch

    try:
        fetch(args.url, args.sha256, args.out)
    except FetchError as e:
        print(f"llamafleet fetch: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_router(args: argparse.Namespace) -> int:
    from llamafleet.common.logs import configure
    from llamafleet.router.main import serve
    from llamafleet.router.settings import RouterSettings

    settings = load_settings(args, RouterSettings)
    configure(settings.log_level, settings.log_format)
    return serve(settings)


def cmd_operator(args: argparse.Namespace) -> int:
    from llamafleet.operator.main import main as operator_main

    return operator_main(args.rest)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    if args_in[:1] == ["serve"]:
        # A crash inside llama.cpp (e.g. during the start-up self-test) then prints the
        # Python stack that led there, instead of a bare "Segmentation fault".
        if sys.__stderr__ is not None:
            faulthandler.enable(file=sys.__stderr__)
        # Load llama.cpp's shared libraries before grpc's and numpy's (server.init_backends
        # says why).
        import llama_cpp  # noqa: F401
    parser = argparse.ArgumentParser(prog="llamafleet", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="serve a GGUF model (OpenAI HTTP, gRPC, metrics, studio)",
                       description=f"Every flag also reads {ENV_PREFIX}<NAME>; flags win.")
    add_settings_flags(p)
    p.set_defaults(func=cmd_serve)
    b = sub.add_parser("bench", help="load-test an OpenAI-compatible server")
    from .bench import add_arguments

    add_arguments(b)
    b.set_defaults(func=cmd_bench)
    f = sub.add_parser("fetch", help="download a model and check its sha256 (init container)")
    f.add_argument("--url", required=True)
    f.add_argument("--sha256", required=True)
    f.add_argument("--out", type=Path, required=True)
    f.set_defaults(func=cmd_fetch)
    from llamafleet.router.settings import RouterSettings

    r = sub.add_parser("router", help="route OpenAI requests over replicas by prefix and load",
                       description=f"Every flag also reads {ROUTER_ENV_PREFIX}<NAME>; flags win.")
    add_settings_flags(r, RouterSettings)
    r.set_defaults(func=cmd_router)
    o = sub.add_parser("operator", help="run the Kubernetes operator (kopf)")
    o.add_argument("rest", nargs=argparse.REMAINDER, help="operator options (see --help)")
    o.set_defaults(func=cmd_operator)
    args = parser.parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
