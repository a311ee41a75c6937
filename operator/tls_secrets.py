"""An LLMService's TLS Secrets: the CA Secret's codec, and issuing, renewing and rotating
the CA, server and client certificates in them. The X.509 work itself is in
:mod:`llamafleet.operator.certs`; this module reads and writes the Secrets."""

from __future__ import annotations

import datetime as dt
import logging

import kopf

from . import builders as B
from . import certs
from .children import Children
from .reconcile_steps import secret_key
from .spec import LLMServiceSpec

ROTATION_PHASE = "llamafleet.io/ca-rotation"
ROTATION_SINCE = "llamafleet.io/ca-rotation-since"


def _pair(secret: dict | None, key: str, cert: str) -> certs.KeyPair | None:
    if secret is None:
        return None
    k, c = B.secret_bytes(secret, key), B.secret_bytes(secret, cert)
    return certs.KeyPair(k, c) if k and c else None


def read_ca(secret: dict | None) -> certs.CAState | None:
    if secret is None:
        return None
    bundle = B.secret_bytes(secret, "ca.crt")
    signer = _pair(secret, "ca.key", "signer.crt") or _pair(secret, "ca.key", "ca.crt")
    if signer is None or bundle is None:
        return None
    annotations = (secret.get("metadata") or {}).get("annotations") or {}
    phase = annotations.get(ROTATION_PHASE, "")
    try:
        since = dt.datetime.fromisoformat(annotations[ROTATION_SINCE])
    except (KeyError, ValueError):
        since = dt.datetime.fromtimestamp(0, dt.UTC)
    return certs.CAState(signer, bundle, _pair(secret, "next.key", "next.crt"),
                         phase if phase in ("overlap", "reissued") else "", since)


def build_ca_secret(names: B.Names, ca: certs.CAState) -> dict:
    data = {"ca.crt": ca.bundle, "ca.key": ca.signer.key_pem, "signer.crt": ca.signer.cert_pem}
    if ca.next is not None:
        data.update({"next.crt": ca.next.cert_pem, "next.key": ca.next.key_pem})
    annotations = {ROTATION_PHASE: ca.phase, ROTATION_SINCE: ca.since.isoformat()} \
        if ca.phase and ca.since else None
    return B.build_secret(names, names.ca_secret, data, False, annotations=annotations)


def ensure_certificates(children: Children, owner: kopf.Body, names: B.Names,
                        spec: LLMServiceSpec, logger: logging.Logger,
                        cluster_domain: str) -> dt.datetime:
    """CA, server and client Secrets: issue what is missing, renew what is due, and rotate
    the CA with an overlap (certs.advance_ca). Returns the earliest leaf expiry."""
    validity = certs.parse_duration(spec.tls.validity)
    renew = certs.parse_duration(spec.tls.renewBefore)
    overlap = certs.parse_duration(spec.tls.caOverlap)
    now = dt.datetime.now(dt.UTC)
    before = read_ca(children.get(secret_key(names.ca_secret)))
    leaves = {secret_name: _pair(children.get(secret_key(secret_name)), "tls.key", "tls.crt")
              for secret_name in (names.server_secret, names.client_secret)}
    due = certs.renewal_due(before, leaves, renew_before=renew, overlap=overlap, now=now)
    due_leaves = set(due.leaves)
    server = leaves[names.server_secret]
    sans = names.dns_names(cluster_domain)
    if server is not None and certs.subject_names(server) != set(sans):
        due_leaves.add(names.server_secret)  # the Services' names changed (e.g. <name>-pods)
    ca = certs.advance_ca(before, f"{names.name}.{names.namespace} llamafleet CA",
                          validity=validity, renew_before=renew, overlap=overlap, now=now)
    if due.ca:
        logger.info("CA of %s: %s", names.name, {
            "new": "issued a new CA", "rotate": "published a new CA beside the old one",
            "switch": "leaf certificates move to the new CA",
            "drop": "dropped the old CA"}[due.ca])
    children.apply(owner, build_ca_secret(names, ca), logger)
    not_after = []
    for secret_name, leaf in leaves.items():
        client = secret_name == names.client_secret
        if secret_name in due_leaves:
            leaf = certs.issue(ca.signer, f"{names.name}-{'client' if client else 'server'}",
                               validity, sans=[] if client else sans, client=client)
            logger.info("%s %s certificate, valid until %s",
                        "renewed" if children.get(secret_key(secret_name)) is not None
                        else "issued", "client" if client else "server",
                        leaf.not_after.isoformat())
        assert leaf is not None  # renewal_due names every missing leaf
        children.apply(owner, B.build_secret(names, secret_name, {
            "tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem, "ca.crt": ca.bundle}, True),
            logger)
        not_after.append(leaf.not_after)
    return min(not_after)
