"""Certificate files that are renewed in place (a Kubernetes Secret update), picked up by
new TLS handshakes without a restart: gRPC (grpc_server.ReloadingCredentials) and HTTP."""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class WatchedFiles:
    """The content of a few files, re-read on demand; says when it changed."""

    def __init__(self, *paths: Path):
        self.paths = paths
        self.current = self.read()

    def read(self) -> tuple[bytes, ...]:
        return tuple(p.read_bytes() for p in self.paths)

    def changed(self) -> tuple[bytes, ...] | None:
        """The new content, or None when it is the same (or unreadable: mid-swap). The
        caller :meth:`commit`s it once it has put the new files to use."""
        try:
            material = self.read()
        except OSError as e:
            log.warning("certificate files unreadable, keeping the current ones: %s", e)
            return None
        return None if material == self.current else material

    def commit(self, material: tuple[bytes, ...]) -> None:
        self.current = material
        log.info("certificate files changed; new handshakes use the new certificate")


class ReloadingSSLContext:
    """uvicorn's ``ssl_context_factory``: the listening context checks the files on each
    TLS client hello and hands the connection a context built from the new files when they
    changed. Open connections keep the certificate they began with."""

    def __init__(self, cert: Path, key: Path):
        self.files = WatchedFiles(cert, key)
        self._build: Callable[[], ssl.SSLContext] | None = None
        self._active: ssl.SSLContext | None = None

    def __call__(self, _config: Any, build: Callable[[], ssl.SSLContext]) -> ssl.SSLContext:
        self._build = build  # uvicorn's own factory: its options, ALPN, the configured paths
        self._active = listening = build()
        listening.sni_callback = self._on_client_hello
        return listening

    def _on_client_hello(self, conn: ssl.SSLObject, _name: str | None, _ctx: ssl.SSLContext
                         ) -> None:
        material = self.files.changed()
        if material is not None and self._build is not None:
            try:
                fresh = self._build()
            except (OSError, ssl.SSLError) as e:  # a half-written pair: try again next time
                log.warning("could not load the new certificate files yet: %s", e)
            else:
                self.files.commit(material)
                self._active = fresh
        if self._active is not None and conn.context is not self._active:
            conn.context = self._active
