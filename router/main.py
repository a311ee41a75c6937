"""Runs the router: ``llamafleet router --backends URL,URL`` (fixed replicas) or
``llamafleet router --llmservice NAME`` (in a cluster: discovered, scaled from zero)."""

from __future__ import annotations

import logging

import uvicorn
from kubernetes.config import ConfigException
from llamafleet.common.http_limits import uvicorn_options

from .app import Router, create_app
from .discovery import api_client
from .settings import RouterSettings

log = logging.getLogger(__name__)


def serve(settings: RouterSettings) -> int:
    # httpx logs every request at INFO: each poll would be a line (2 per replica per second).
    logging.getLogger("httpx").setLevel(logging.WARNING)
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
