"""The `llamafleet` command: serve, bench, operator."""

# The dispatcher names each part's command module by string and imports only the one given
# (`llamafleet router --help` never loads llama.cpp, `llamafleet operator` never loads the
# pod): each part's `cli` module adds its command's arguments and sets ``func``. Below it, the
# helpers that turn a pydantic-settings class into flags, shared by `serve` and `router`.

from __future__ import annotations

import argparse
import importlib
import sys
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from pydantic import ValidationError

from .contract import ENV_PREFIX, ROUTER_ENV_PREFIX

DESCRIPTION = __doc__


@dataclass(frozen=True)
class Command:
    """A subcommand. ``setup`` ("module:function") is imported only when the command is the
    one given: it adds the command's arguments to its parser and sets ``func`` (args -> exit
    status)."""

    setup: str
    help: str
    description: str | None = None


COMMANDS: dict[str, Command] = {
    "serve": Command("llamafleet.inference.cli:setup_serve",
                     "serve a GGUF model (OpenAI HTTP, gRPC, metrics, studio)",
                     f"Every flag also reads {ENV_PREFIX}<NAME>; flags win."),
    "bench": Command("llamafleet.bench.cli:setup", "load-test an OpenAI-compatible server"),
    "fetch": Command("llamafleet.inference.cli:setup_fetch",
                     "download a model and check its sha256 (init container)"),
    "router": Command("llamafleet.router.cli:setup",
                      "route OpenAI requests over replicas by prefix and load",
                      f"Every flag also reads {ROUTER_ENV_PREFIX}<NAME>; flags win."),
    "operator": Command("llamafleet.operator.cli:setup", "run the Kubernetes operator (kopf)"),
}


def _setup(target: str) -> Callable[[argparse.ArgumentParser], None]:
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def main(argv: list[str] | None = None) -> int:
    args_in = sys.argv[1:] if argv is None else argv
    # The command is the first word (the top level has no option that takes a value).
    given = next((a for a in args_in if not a.startswith("-")), None)
    parser = argparse.ArgumentParser(prog="llamafleet", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        p = sub.add_parser(name, help=command.help, description=command.description)
        if name == given:
            _setup(command.setup)(p)
    args = parser.parse_args(args_in)
    return int(args.func(args) or 0)


# --- settings as flags ------------------------------------------------------------------------

def _flag_type(annotation: object) -> Callable[[str], object]:
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    base = args[0]
    if base in (int, float):
        return base  # type: ignore[return-value]
    if base is Path:
        return Path
    return str


def add_settings_flags(parser: argparse.ArgumentParser, settings_cls: type) -> None:
    """One --flag per field of a pydantic-settings class; help = the field's description and
    its env var."""
    prefix = settings_cls.model_config["env_prefix"]

    for name, field in settings_cls.model_fields.items():
        flag = "--" + name.replace("_", "-")
        env = prefix + name.upper()
        help_ = f"{field.description} [env {env}]"
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if field.annotation is bool:
            parser.add_argument(flag, dest=name, action=argparse.BooleanOptionalAction,
                                default=None, help=help_)
        elif typing.get_origin(field.annotation) in (list, tuple):
            # Repeatable, under its own short name when it has one (--lora for lora_adapters).
            flags = [str(extra["flag"]), flag] if "flag" in extra else [flag]
            parser.add_argument(*flags, dest=name, action="append", default=None, help=help_)
        else:
            parser.add_argument(flag, dest=name, type=_flag_type(field.annotation),
                                default=None, help=help_)


def describe_errors(err: ValidationError, prefix: str = ENV_PREFIX) -> list[str]:
    """One line per invalid setting, naming the environment variable."""
    lines = []
    for e in err.errors():
        if not e["loc"]:  # a rule over several settings (a model validator)
            lines.append(f"invalid settings: {e['msg']}")
            continue
        name = ".".join(str(p) for p in e["loc"])
        lines.append(f"invalid setting {prefix + name.upper()}: {e['msg']}")
    return lines


def load_settings(args: argparse.Namespace, settings_cls: type) -> typing.Any:
    """The settings from the environment, with the flags given on top; an invalid value stops
    with one line per setting and exit status 2."""
    overrides = {k: v for k, v in vars(args).items()
                 if v is not None and k in settings_cls.model_fields}
    try:
        return settings_cls(**overrides)
    except ValidationError as e:
        for line in describe_errors(e, settings_cls.model_config["env_prefix"]):
            print(f"llamafleet: {line}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    raise SystemExit(main())
