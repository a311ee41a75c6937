"""Runs the router: ``llamafleet router --backends URL,URL --host H --port N``."""

from __future__ import annotations

import uvicorn

from .app import Router, create_app
from .settings import RouterSettings


def serve(settings: RouterSettings) -> int:
    app = create_app(Router(settings))
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                access_log=False, timeout_graceful_shutdown=10)
    return 0
