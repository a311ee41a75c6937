"""Runs the router: ``llamafleet router --backends URL,URL`` (fixed replicas) or
``llamafleet router --llmservice NAME`` (in a cluster: discovered, scaled from zero)."""

from __future__ import annotations

import ctypes
import logging

import uvicorn
from kubernetes.config import ConfigException
from llamafleet.common.http_limits import uvicorn_options

from .app import Router, create_app
from .discovery import api_client
from .settings import RouterSettings

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc's malloc.h


def return_freed_memory() -> None:
    """Large buffers (request bodies) go back to the OS when freed. glibc serves allocations
    over its mmap threshold (128 KiB) with mmap, but raises the threshold to the size of
    each such block freed, so after a flood of 1 MiB bodies later ones come from the heap
    and the heap stays grown: 300 held 1 MiB requests left the router about 500 MiB larger.
    A threshold set explicitly is never raised (mallopt(3)). Elsewhere than glibc: nothing."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, 128 * 1024)
    except (OSError, AttributeError):
        pass


def serve(settings: RouterSettings) -> int:
    return_freed_memory()
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
