"""The pods' API key: the generated ``<name>-api-key`` Secret (its value kept once made), or
a check of the user's Secret named by spec.auth.apiKeySecret. That a user's Secret replaces
the generated one (which is then deleted) is a step of the reconcile plan
(:mod:`llamafleet.operator.reconcile_steps`)."""

from __future__ import annotations

import logging
import secrets

import kopf
from kubernetes.dynamic.exceptions import NotFoundError

from . import builders as B
from .children import Children
from .reconcile_steps import secret_key
from .spec import LLMServiceSpec


def ensure_api_key(children: Children, owner: kopf.Body, names: B.Names,
                   spec: LLMServiceSpec, logger: logging.Logger) -> str | None:
    """Generate `<name>-api-key` (kept once made), or check the user's Secret; returns a
    problem to report, or None."""
    if spec.auth.apiKeySecret:
        secret_name, key = B.api_key_ref(names, spec)
        try:
            user = children.dyn.resources.get(api_version="v1", kind="Secret").get(
                name=secret_name, namespace=names.namespace).to_dict()
        except NotFoundError:
            return f"spec.auth.apiKeySecret names Secret {secret_name}, which does not exist"
        if not B.secret_bytes(user, key):
            return f"Secret {secret_name} has no key {key!r} (spec.auth.apiKeySecretKey)"
        return None
    current = children.get(secret_key(names.api_key_secret))
    value = B.secret_bytes(current, B.API_KEY_KEY) if current else None
    if not value:
        value = secrets.token_urlsafe(32).encode()
    children.apply(owner, B.build_secret(names, names.api_key_secret, {B.API_KEY_KEY: value},
                                         False, component="auth"), logger)
    return None
