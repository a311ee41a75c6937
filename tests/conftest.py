"""The pytest fixtures and hooks that tests of every part share, built on tests/support (one
module per real component: servers.py, kube.py with the RBAC audit, browser.py).

- The embedded models and the session's real servers on loopback (tests/support/servers.py).
- The Kubernetes API emulator (`api`, `kmock_options`: tests/support/kube.py) and the RBAC
  audit's hooks (tests/support/rbac_audit.py): they apply to the audited suites wherever they
  live, and test_rbac_audit.py runs last.
- Debian's chromium through Playwright (`browser`: tests/support/browser.py).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from llamafleet.common import tracing
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tests.support.browser import launch_chromium
from tests.support.kube import RESOURCES, VERBS, Emulator
from tests.support.rbac_audit import AUDITED, OPERATOR_TOKEN, Audit, Seen
from tests.support.servers import RunningServer, start_server

AUDIT = pytest.StashKey[Audit]()
AUDITED_TESTS = pytest.StashKey[set[str]]()


def audit_of(config: pytest.Config) -> Audit:
    """The session's RBAC audit (tests/support/rbac_audit.py), made on first use."""
    if AUDIT not in config.stash:
        config.stash[AUDIT] = Audit()
    return config.stash[AUDIT]


def audited(item: pytest.Item) -> bool:
    return Path(str(item.fspath)).name in AUDITED and "api" in getattr(item, "fixturenames", ())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Before -k/-m deselect: which audited tests exist. The audit's summary test runs last.
    config.stash[AUDITED_TESTS] = {i.nodeid for i in items if audited(i)}
    items.sort(key=lambda i: Path(str(i.fspath)).name == "test_rbac_audit.py")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed and audited(item):
        # A flow that failed may have stopped before using all of its permissions.
        audit_of(item.config).failed.add(item.nodeid)
    return report


@pytest.fixture()
def kmock_options() -> dict:
    return {"cls": Emulator}


@pytest.fixture()
async def api(kmock, tmp_path, monkeypatch, request):
    for name, info in RESOURCES.items():
        kmock.resources[name] = {**info, "verbs": VERBS}
    url = str(kmock.url).rstrip("/")
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": url, "insecure-skip-tls-verify": True}}],
        # The operator's identity (the router writes its own: kube.Router).
        "users": [{"name": "u", "user": {"token": OPERATOR_TOKEN}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "u"}}]}))
    monkeypatch.setenv("KMOCK_URL", url)
    # The operator's settings are read by its startup handler, when KopfRunner starts it.
    monkeypatch.setenv("LLAMAFLEET_OPERATOR_KUBECONFIG", str(kubeconfig))
    # No /metrics listener per test (test_operator_metrics.py covers it; the port is fixed).
    monkeypatch.setenv("LLAMAFLEET_OPERATOR_METRICS_PORT", "0")
    async with httpx.AsyncClient(base_url=url, timeout=10) as client:
        yield client
    if audited(request.node):
        denied = audit_of(request.config).check(request.node.nodeid, [Seen.of(r) for r in kmock])
        assert not denied, ("requests that Kubernetes RBAC would refuse with 403 Forbidden "
                            "(the chart's charts/llamafleet/files/rbac-rules.yaml or the router's "
                            "ROUTER_RBAC_RULES lack them):\n  " + "\n  ".join(denied))


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Tracing on in this process, its spans kept in memory (common/tracing.py)."""
    exporter = InMemorySpanExporter()
    tracing.install(SimpleSpanProcessor(exporter), "llamafleet-test")
    yield exporter
    tracing.uninstall()
    assert not tracing.ON


# --- the embedded models and real servers (tests/support/servers.py) ---------------------------


@pytest.fixture(scope="session")
def model_path() -> Path:
    """Gemma 3 270M (a base model): the benchmark model, for tests that are not about chat."""
    from llamafleet.common.contract import GEMMA
    from llamafleet.inference.model_packages import embedded_model_path

    return embedded_model_path(GEMMA.name)


@pytest.fixture(scope="session")
def instruct_model_path() -> Path:
    """SmolLM2-135M-Instruct (ChatML template in the GGUF): for tests about chatting."""
    from llamafleet.common.contract import SMOLLM2
    from llamafleet.inference.model_packages import embedded_model_path

    return embedded_model_path(SMOLLM2.name)


@pytest.fixture(scope="session")
def server(model_path: Path) -> Iterator[RunningServer]:
    srv = start_server(model_path=model_path)
    yield srv
    srv.stop()


@pytest.fixture(scope="session")
def instruct_server(instruct_model_path: Path) -> Iterator[RunningServer]:
    """The server as `llamafleet serve` starts by default: no model path, the default
    embedded model (SmolLM2-135M-Instruct), from the cache that instruct_model_path filled."""
    srv = start_server(embedded_model_dir=instruct_model_path.parent)
    yield srv
    srv.stop()


# --- Debian's chromium (tests/support/browser.py) ---------------------------------------------


@pytest.fixture(scope="module")
def browser():
    """Chromium through Playwright, by executable path (no browser is downloaded)."""
    with launch_chromium() as b:
        yield b
