"""Ownership and drift: the children one LLMService controls, read once per reconcile.

Children are only written or deleted when this LLMService is their controller; any
same-named object it does not control blocks the whole reconcile (:meth:`Children.conflicts`)
before anything is changed. Each child carries a content hash, and it is replaced (not
merge-patched) when it drifted, so that fields removed from the desired object disappear
from the live one; an unchanged plan never rolls the pods.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from typing import Any

import kopf
from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import NotFoundError, ResourceNotFoundError
from kubernetes.utils import parse_quantity

from . import builders as B
from .status import Key

log = logging.getLogger(__name__)

# What to install when the cluster does not serve a kind the spec asks for.
INSTALL_HINT = {
    "InferencePool": "install the Gateway API Inference Extension CRDs, or disable "
                     "spec.routing.inferencePool",
    "ScaledObject": "install KEDA, or use spec.scaling.mode builtin or hpa",
}


class MissingAPI(Exception):
    """The cluster does not serve a kind the spec asks for (its CRD is not installed)."""


def controller_uid(obj: dict) -> str | None:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


class Children:
    """The objects one LLMService owns, read once per reconcile.

    Only objects whose controller ownerReference is this LLMService's UID are ever
    written or deleted. Writes are read-compare-replace: when the live object differs
    from the desired one (content hash, or any desired field changed or missing), it is
    replaced (PUT, guarded by resourceVersion), which also removes fields that the
    desired object no longer has. Fields the desired object never sets (server
    defaults, other controllers' annotations) do not count as drift.
    """

    def __init__(self, dyn: DynamicClient, names: B.Names, uid: str):
        self.dyn, self.names, self.uid = dyn, names, uid
        self.live: dict[Key, dict | None] = {}
        self.writes: set[Key] = set()

    def _key(self, key: Key) -> Key:
        return key if key[2] else (key[0], key[1], self.names.name)

    def _api(self, key: Key) -> Any:
        return self.dyn.resources.get(api_version=key[0], kind=key[1])

    def read(self, writes: Iterable[Key], deletes: Iterable[Key]) -> dict[Key, dict | None]:
        """Read every child the reconcile writes, and those it deletes if they are ours
        (:func:`llamafleet.operator.reconcile_steps.child_keys`)."""
        writes, deletes = [self._key(k) for k in writes], [self._key(k) for k in deletes]
        self.writes = set(writes)
        for key in writes + deletes:
            try:
                self.live[key] = self._api(key).get(
                    name=key[2], namespace=self.names.namespace).to_dict()
            except NotFoundError:
                self.live[key] = None
            except ResourceNotFoundError:  # not served here: nothing of ours to delete
                if key in self.writes:
                    hint = INSTALL_HINT.get(key[1], "install its CRD")
                    raise MissingAPI(f"the cluster does not serve {key[0]} {key[1]}: "
                                     f"{hint}") from None
                self.live[key] = None
        return self.live

    def get(self, key: Key) -> dict | None:
        return self.live.get(self._key(key))

    def conflicts(self) -> list[str]:
        """Existing objects with our names that this LLMService does not control."""
        out = []
        for (api_version, kind, name), obj in self.live.items():
            if (api_version, kind, name) not in self.writes:
                continue  # a same-named object we would only delete if ours: left alone
            if obj is not None and controller_uid(obj) != self.uid:
                out.append(f"{kind} {self.names.namespace}/{name} exists and is not controlled "
                           f"by this LLMService ({_controller_of(obj)})")
        return out

    def owned(self, key: Key) -> bool:
        obj = self.get(key)
        return obj is not None and controller_uid(obj) == self.uid

    def apply(self, owner: kopf.Body, obj: dict, logger: logging.Logger,
              event: bool = True) -> None:
        """Create the object, or replace it when the live one drifted from it."""
        kopf.adopt(obj, owner=owner)
        key = (obj["apiVersion"], obj["kind"], obj["metadata"]["name"])
        live = self.get(key)
        api, ns = self._api(key), self.names.namespace
        if live is None:
            self.live[key] = api.create(body=obj, namespace=ns).to_dict()
            verb = "created"
        elif controller_uid(live) != self.uid:  # read() reports these before any write
            raise kopf.TemporaryError(f"{key[1]} {key[2]} is not ours", delay=60)
        elif drifted(obj, live):
            body = json.loads(json.dumps(obj))
            meta = body["metadata"]
            meta["resourceVersion"] = live["metadata"].get("resourceVersion")
            if live["metadata"].get("finalizers"):
                meta["finalizers"] = live["metadata"]["finalizers"]
            if "status" in live:  # ignored by the API server; kept for emulators
                body["status"] = live["status"]
            if obj["kind"] == "Service":  # immutable, allocated by the API server
                for field in ("clusterIP", "clusterIPs"):
                    if field in (live.get("spec") or {}):
                        body["spec"][field] = live["spec"][field]
            self.live[key] = api.replace(body=body, name=key[2], namespace=ns).to_dict()
            verb = "updated"
        else:
            return
        if event:
            logger.info("%s %s %s", verb, obj["kind"], key[2])
        else:
            log.info("%s %s %s/%s", verb, obj["kind"], ns, key[2])

    def remove(self, key: Key, logger: logging.Logger) -> None:
        """Delete a child that the spec no longer wants, only if it is ours."""
        key = self._key(key)
        if self.owned(key):
            self._api(key).delete(name=key[2], namespace=self.names.namespace)
            self.live[key] = None
            logger.info("deleted %s %s (no longer in the spec)", key[1], key[2])


def _controller_of(obj: dict) -> str:
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return f"controller: {ref.get('kind')} {ref.get('name')}"
    return "no controller"


def drifted(desired: dict, live: dict) -> bool:
    want = desired["metadata"].get("annotations", {}).get(B.HASH_ANNOTATION)
    have = ((live.get("metadata") or {}).get("annotations") or {}).get(B.HASH_ANNOTATION)
    return want != have or not _contains(live, desired)


def _contains(live: Any, want: Any) -> bool:
    """Every field of ``want`` is in ``live`` with the same value (lists: same length)."""
    if isinstance(want, dict):
        return isinstance(live, dict) and all(
            k in live and _contains(live[k], v) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(live, list) and len(live) == len(want) and all(
            _contains(a, b) for a, b in zip(live, want, strict=False))
    return live == want or _same_scalar(live, want)


def _same_scalar(a: Any, b: Any) -> bool:
    """The API server returns quantities and ints-as-strings in canonical form."""
    if isinstance(a, (dict, list)) or isinstance(b, (dict, list)):
        return False
    if str(a) == str(b):
        return True
    try:
        return parse_quantity(a) == parse_quantity(b)
    except (ValueError, TypeError):
        return False
