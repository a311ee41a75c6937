"""In a cluster: the replicas of one LLMService, from the EndpointSlices of its pod Service.

The `kubernetes` client is synchronous, so the list-and-watch loop runs in a daemon thread
and hands each new set of URLs to the event loop. It never stops on an error: it logs,
backs off, lists again and watches again (a 410 Gone, an expired watch, included)."""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Iterable
from typing import Any

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from kubernetes.watch import Watch
from llamafleet.common.contract import HTTP_PORT, SERVICE_NAME_LABEL, pod_service_name

log = logging.getLogger(__name__)

PORT_NAME = "http"  # the pod Service's port that serves the OpenAI API (operator/builders.py)
WATCH_SECONDS = 300  # the API server ends each watch after this; we then watch again
MAX_BACKOFF = 30.0


def api_client() -> client.ApiClient:
    """In a pod, its service account; elsewhere the kubeconfig (KUBECONFIG or ~/.kube/config)."""
    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        config.load_kube_config(client_configuration=cfg)
    return client.ApiClient(cfg)


def slice_urls(slices: Iterable[dict[str, Any]]) -> list[str]:
    """Base URLs of the ready endpoints of EndpointSlices (API dicts), merged, sorted.

    Ready = ``conditions.ready`` true; absent counts as ready, as the EndpointSlice API says.
    An endpoint's addresses are all the same pod ("fungible"; clients may use the first),
    so the first one is its URL: one pod is one replica. The port is the slice's port named
    ``http``, else the pod contract's HTTP port. Pods serve plain HTTP on it (TLS is for gRPC).
    """
    urls: set[str] = set()
    for s in slices:
        port = next((p.get("port") for p in s.get("ports") or []
                     if p.get("name") == PORT_NAME and p.get("port")), HTTP_PORT)
        ipv6 = s.get("addressType") == "IPv6"
        for endpoint in s.get("endpoints") or []:
            if (endpoint.get("conditions") or {}).get("ready") is False:
                continue
            addresses = endpoint.get("addresses") or []
            if addresses:
                host = f"[{addresses[0]}]" if ipv6 else addresses[0]
                urls.add(f"http://{host}:{port}")
    return sorted(urls)


class SliceWatch:
    """Keeps ``on_urls`` told of the ready endpoints of ``<llmservice>-pods``: a list, then
    a watch from its resourceVersion; deleted slices drop their endpoints. ``on_urls`` is
    called from the watch thread, only when the set changes."""

    def __init__(self, api: client.ApiClient, namespace: str, llmservice: str,
                 on_urls: Callable[[list[str]], None]):
        self.api = client.DiscoveryV1Api(api)
        self.namespace = namespace
        self.service = pod_service_name(llmservice)
        self.selector = f"{SERVICE_NAME_LABEL}={self.service}"
        self.on_urls = on_urls
        self.slices: dict[str, dict[str, Any]] = {}
        self.urls: list[str] | None = None
        self._stop = threading.Event()
        self._watch = Watch()
        self._thread = threading.Thread(target=self._run, name="endpointslice-watch", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        """Ends the loop at its next event or timeout; the thread is a daemon, never joined."""
        self._stop.set()
        self._watch.stop()

    def _run(self) -> None:
        log.info("watching EndpointSlices of Service %s/%s", self.namespace, self.service)
        delay = 1.0
        while not self._stop.is_set():
            try:
                version = self._list()
                delay = 1.0
                while not self._stop.is_set():  # a watch ends after WATCH_SECONDS: go on
                    version = self._watch_from(version)
            except ApiException as e:
                if e.status == 410:  # the watch's resourceVersion is too old: list again
                    log.info("EndpointSlice watch expired (410 Gone); listing again")
                    continue
                log.warning("EndpointSlices of %s/%s: API error %s %s; retrying in %g s",
                            self.namespace, self.service, e.status, e.reason, delay)
            except Exception as e:  # noqa: BLE001 - the router must outlive any API trouble
                log.warning("EndpointSlices of %s/%s: %r; retrying in %g s",
                            self.namespace, self.service, e, delay)
            self._stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)

    def _list(self) -> str:
        resp = self.api.list_namespaced_endpoint_slice(
            self.namespace, label_selector=self.selector, _preload_content=False)
        body = json.loads(resp.data)
        self.slices = {s["metadata"]["name"]: s for s in body.get("items") or []}
        self._publish()
        return (body.get("metadata") or {}).get("resourceVersion") or ""

    def _watch_from(self, version: str) -> str:
        """Applies events until the API server ends the watch; returns the last version seen."""
        stream = self._watch.stream(
            self.api.list_namespaced_endpoint_slice, self.namespace, label_selector=self.selector,
            resource_version=version, timeout_seconds=WATCH_SECONDS, allow_watch_bookmarks=True,
            _request_timeout=(10, WATCH_SECONDS + 30))
        for event in stream:
            # The client also builds a model object; we read the API's own dict. (Its
            # deserialize=False mode fails on ERROR events, so a 410 would not surface.)
            obj = event.get("raw_object") or {}
            meta = obj.get("metadata") or {}
            version = meta.get("resourceVersion") or version
            if event["type"] == "DELETED":
                self.slices.pop(meta.get("name"), None)
            elif event["type"] in ("ADDED", "MODIFIED"):
                self.slices[meta.get("name")] = obj
            else:  # BOOKMARK: only the version moves
                continue
            self._publish()
        return version

    def _publish(self) -> None:
        urls = slice_urls(self.slices.values())
        if urls != self.urls:
            log.info("ready replicas of %s/%s: %s", self.namespace, self.service,
                     ", ".join(urls) or "none")
            self.urls = urls
            self.on_urls(urls)
