"""`llamafleet operator`: run the kopf operator (cluster-wide or in listed namespaces)."""

from __future__ import annotations

import argparse
import logging

from llamafleet.common.contract import OPERATOR_ENV_PREFIX


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="llamafleet operator",
        description=f"Reconcile LLMService resources. Settings: {OPERATOR_ENV_PREFIX}* env vars "
        "(see llamafleet.operator.settings).")
    p.add_argument("-n", "--namespace", action="append", default=[],
                   help="watch this namespace (repeatable); default: the whole cluster")
    p.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                   help="liveness endpoint URL")
    p.add_argument("--log-format", choices=["json", "console"], default="json")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)

    import kopf
    from llamafleet.common.logs import configure
    from llamafleet.operator.settings import OperatorSettings

    configure("debug" if args.verbose else "info", args.log_format)
    namespaces = args.namespace or OperatorSettings().namespaces
    from llamafleet.operator import handlers  # noqa: F401 - registers the handlers

    logging.getLogger(__name__).info("watching %s", namespaces or "the whole cluster")
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=args.liveness)
    return 0
