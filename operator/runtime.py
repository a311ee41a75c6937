"""What the operator sets up once, at start, and every handler then shares through kopf's
memo: kopf's own settings, the OperatorSettings, the Kubernetes client and the
per-LLMService reconcile locks."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator

import kopf
from kubernetes import config as k8s_config
from kubernetes.client import ApiClient
from kubernetes.dynamic import DynamicClient

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
    memo.dyn = DynamicClient(api_client(memo.settings))
    memo.locks = KeyedLocks()
    # Series of an LLMService that no round refreshed for three rounds are gone (deleted, or
    # no longer scaled by the builtin autoscaler).
    memo.metrics = metrics.OperatorMetrics(
        conditions_ttl=3 * memo.settings.resync_seconds + 60,
        autoscaler_ttl=3 * memo.settings.autoscale_interval + 60)
    metrics.serve(memo.metrics, memo.settings.metrics_port, memo.settings.metrics_host)


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
