"""Fixtures for integration tests against the Kubernetes API emulator (tests/integration/kube.py)."""

from __future__ import annotations

import httpx
import pytest
import yaml

from .kube import RESOURCES, VERBS, Emulator


@pytest.fixture()
def kmock_options() -> dict:
    return {"cls": Emulator}


@pytest.fixture()
async def api(kmock, tmp_path, monkeypatch):
    for name, info in RESOURCES.items():
        kmock.resources[name] = {**info, "verbs": VERBS}
    url = str(kmock.url).rstrip("/")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url, "insecure-skip-tls-verify": True}}],
        "users": [{"name": "u", "user": {"token": "test"}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}]}))
    monkeypatch.setenv("KMOCK_URL", url)
    # The operator's settings are read by its startup handler, when KopfRunner starts it.
    monkeypatch.setenv("LLAMAFLEET_OPERATOR_KUBECONFIG", str(kubeconfig))
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client
