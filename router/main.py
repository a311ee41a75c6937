"""Runs the router: ``llamafleet router --backends URL,URL`` (fixed replicas) or
``llamafleet router --llmservice NAME`` (in a cluster: discovered, scaled from zero)."""

from __future__ import annotations

import logging

import uvicorn
from kubernetes.config import ConfigException
from llamafleet.common import malloc, tracing
from llamafleet.common.http_limits import uvicorn_options

from .app import Router, create_app
from .discovery import api_client
from .settings import RouterSettings

log = logging.getLogger(__name__)


def return_freed_memory() -> None:
    """Large buffers (request bodies) go back to the OS when freed. With glibc's moving
    threshold, after a flood of 1 MiB bodies later ones came from the heap and the heap
    stayed grown: 300 held 1 MiB requests left the router about 500 MiB larger. A fixed
    128 KiB threshold keeps every body in its own mapping."""
    malloc.set_thresholds(128 * 1024)


def serve(settings: RouterSettings) -> int:
    return_freed_memory()
    # httpx logs every request at INFO: each poll would be a line (2 per replica per second).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    tracing.setup("llamafleet-router")  # off unless OTEL_* asks (docs/observability.md)
    kube = None
    if settings.llmservice:
        try:
            kube = api_client()
        except ConfigException as e:
            log.error("--llmservice needs the Kubernetes API: no in-cluster service account "
                      "and no usable kubeconfig (KUBECONFIG or ~/.kube/config): %s", e)
            return 2
    app = create_app(Router(settings, kube=kube))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                access_log=False, timeout_graceful_shutdown=10,
                **uvicorn_options(settings.read_limits))
    return 0
