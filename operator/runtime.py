"""What the operator sets up once, at start, and every handler then shares through kopf's
memo: kopf's own settings, the OperatorSettings, the Kubernetes client and the
per-LLMService reconcile locks."""

from __future__ import annotations

import contextlib
import logging
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import kopf
from kubernetes import config as k8s_config
from kubernetes.client import ApiClient
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.discovery import LazyDiscoverer

from . import metrics
from .settings import OperatorSettings


def start(settings: kopf.OperatorSettings, memo: kopf.Memo) -> None:
    """kopf's posting, persistence and retry settings; memo.settings (unless kopf.run(memo=...)
    brought them), memo.dyn, memo.locks and memo.metrics (served on settings.metrics_port)."""
    settings.posting.level = logging.INFO
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="llamafleet.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="llamafleet.io")
    settings.networking.error_backoffs = [1, 2, 5, 10, 30, 60]
    if "settings" not in memo:
        memo.settings = OperatorSettings()
    # A discovery cache of this process's own: the client's default file is keyed by the API
    # server's URL alone, so a process could start from what another API server at the same
    # address offered (another cluster, or a test's emulator on a reused port) and miss a CRD
    # installed since, or see one that is gone.
    cache = Path(tempfile.mkdtemp(prefix="llamafleet-operator-")) / "discovery.json"
    memo.dyn = DynamicClient(api_client(memo.settings), cache_file=str(cache),
                             discoverer=ThreadSafeDiscoverer)
    memo.locks = KeyedLocks()
    # Series of an LLMService that no round refreshed for three rounds are gone (deleted, or
    # no longer scaled by the builtin autoscaler).
    memo.metrics = metrics.OperatorMetrics(
        conditions_ttl=3 * memo.settings.resync_seconds + 60,
        autoscaler_ttl=3 * memo.settings.autoscale_interval + 60)
    metrics.serve(memo.metrics, memo.settings.metrics_port, memo.settings.metrics_host)


class ThreadSafeDiscoverer(LazyDiscoverer):
    """The Kubernetes client's discoverer, one lookup at a time.

    On a miss (a kind the cluster does not serve, such as a CRD not installed) the client
    rebuilds its whole cache in place; two of kopf's handler threads doing so at once
    corrupt it (``KeyError: 'resources'``), and the handler that hit it then waits out
    kopf's error backoff. Lookups are cheap once cached, so one lock costs nothing."""

    def __init__(self, client, cache_file):
        self._lock = threading.RLock()
        super().__init__(client, cache_file)

    def search(self, **kwargs):
        with self._lock:
            return super().search(**kwargs)

    def invalidate_cache(self) -> None:
        with self._lock:
            super().invalidate_cache()


def api_client(settings: OperatorSettings) -> ApiClient:
    """From settings.kubeconfig, else the in-cluster account, else ~/.kube/config."""
    if settings.kubeconfig:
        return k8s_config.new_client_from_config(config_file=settings.kubeconfig)
    try:
        k8s_config.load_incluster_config()
    except k8s_config.ConfigException:
        k8s_config.load_kube_config()
    return ApiClient()


class KeyedLocks:
    """One lock per key (an LLMService's uid), kept only while a reconcile holds or waits
    for it: the last one to leave drops the entry. So the map never outgrows the reconciles
    in flight (kopf's worker threads), deleted LLMServices leave nothing behind, and no
    delete handler is needed (one would need a finalizer to be sure to run)."""

    def __init__(self) -> None:
        self._guard = threading.Lock()
        self._locks: dict[str, tuple[threading.Lock, int]] = {}  # key -> (lock, users)

    def __len__(self) -> int:
        return len(self._locks)

    @contextlib.contextmanager
    def hold(self, key: str) -> Iterator[None]:
        with self._guard:
            lock, users = self._locks.get(key, (None, 0))
            lock = lock or threading.Lock()
            self._locks[key] = (lock, users + 1)
        try:
            with lock:
                yield
        finally:
            with self._guard:
                lock, users = self._locks[key]
                if users == 1:
                    del self._locks[key]
                else:
                    self._locks[key] = (lock, users - 1)
