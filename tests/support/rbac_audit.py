"""The RBAC audit of the kopf + KMock suites (issue 24).

KMock allows every request. The emulator (kube.Emulator) therefore records each request it
receives with the bearer token that sent it. Every component logs in with its own token, so
each request is attributed to the identity it would have in a cluster:
- the operator (kopf and the operator's own client) runs as the chart's ServiceAccount, and
  is authorized by the chart's rendered ClusterRole/Roles and bindings (`helm template`), in both
  layouts: cluster-wide (the default) and `operator.watchNamespaces`;
- each router runs as the ServiceAccount of its LLMService's router Deployment, authorized by
  the Role and RoleBinding that the operator creates for it (build_router_role/_binding);
- the test itself (no token) plays users and other controllers and is not audited.
After each test the `api` fixture fails it when a request would have been denied
(`Audit.check`). test_rbac_audit.py, run last, fails on permissions that nothing used.
"""

from __future__ import annotations

import dataclasses
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml
from llamafleet.common.contract import ROUTER_RBAC_RULES
from llamafleet.operator.builders import Names, build_router_role, build_router_role_binding

from tests.support.kube import NS, RESOURCES
from tests.support.rbac import (
    DEFAULT_POLICY,
    Authorizer,
    Decision,
    RequestInfo,
    User,
    forbidden_message,
    request_info,
)

ROOT = Path(__file__).resolve().parents[2]
HELM = ROOT / ".tools/bin/helm"
CHART = ROOT / "charts/llamafleet"
RELEASE, RELEASE_NS = "rel", "llm"
OPERATOR_TOKEN = "llamafleet-operator"
ROUTER_TOKEN = "llamafleet-router."  # + the LLMService's name
# The suites whose flows the audit covers (all of their tests that talk to the emulator).
# File names are unique across tests/ (tests/common/test_layout.py holds it).
AUDITED = ("test_kopf.py", "test_router_kopf.py", "test_discovery_kmock.py",
           "test_autoscaling_kopf.py", "test_model_cache_kopf.py", "test_adapters_kopf.py")
CLUSTER_WIDE, PER_NAMESPACE = "cluster-wide", f"operator.watchNamespaces={{{NS}}}"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@dataclasses.dataclass(frozen=True)
class Seen:
    """One request as the emulator received it."""

    token: str
    user_agent: str
    method: str
    path: str
    query: tuple[tuple[str, str], ...]

    @classmethod
    def of(cls, request: Any) -> Seen:
        headers = {k.lower(): v for k, v in request.headers.items()}
        auth = headers.get("authorization", "")
        return cls(token=auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else "",
                   user_agent=headers.get("user-agent", ""),
                   method=str(request.method.value if hasattr(request.method, "value")
                              else request.method),
                   path=request.url.path, query=tuple(sorted(request.params.items())))


@dataclasses.dataclass(frozen=True)
class Verdict:
    test: str
    who: str
    user: User
    layout: str
    info: RequestInfo
    decision: Decision


def render(*sets: str) -> list[dict]:
    if not HELM.exists():
        raise RuntimeError("helm is missing: run scripts/system-deps.sh")
    args = [str(HELM), "template", RELEASE, str(CHART), "-n", RELEASE_NS]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    return [d for d in yaml.safe_load_all(out) if d]


def rbac_objects(docs: Iterable[dict]) -> list[dict]:
    kinds = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
    return [d for d in docs if d.get("kind") in kinds]


def namespaced(info: RequestInfo) -> bool:
    key = f"{info.api_group}/{info.api_version}/{info.resource}".lstrip("/")
    return bool(RESOURCES.get(key, {}).get("namespaced"))


class Audit:
    """The chart's and the routers' rules, and every verdict of this session."""

    def __init__(self) -> None:
        self.layouts = {CLUSTER_WIDE: render(), PER_NAMESPACE: render(PER_NAMESPACE)}
        dep = next(d for d in self.layouts[CLUSTER_WIDE] if d["kind"] == "Deployment")
        self.operator = User.service_account(RELEASE_NS, dep["spec"]["template"]["spec"]
                                             ["serviceAccountName"])
        self.authorizers = {k: Authorizer(DEFAULT_POLICY + rbac_objects(v))
                            for k, v in self.layouts.items()}
        self.verdicts: list[Verdict] = []
        self.finished: set[str] = set()  # audited tests whose requests were checked
        self.failed: set[str] = set()

    def granted(self) -> dict[str, set[tuple[str, str, str]]]:
        """What the chart grants the operator (cluster-wide layout, the same rules file as
        the per-namespace one) and what ROUTER_RBAC_RULES grant a router: (group, resource, verb)."""
        chart = yaml.safe_load((CHART / "files/rbac-rules.yaml").read_text())
        return {"operator": set(expand(chart["cluster"] + chart["namespaced"])),
                "router": set(expand(ROUTER_RBAC_RULES))}

    def used(self) -> dict[str, set[tuple[str, str, str]]]:
        out: dict[str, set[tuple[str, str, str]]] = {"operator": set(), "router": set()}
        for v in self.verdicts:
            if v.decision.allowed and v.info.resource_request and v.layout != PER_NAMESPACE:
                what = v.info.resource + (f"/{v.info.subresource}" if v.info.subresource else "")
                out[v.who.split()[0]].add((v.info.api_group, what, v.info.verb))
        return out

    def _judge(self, test: str, seen: Seen) -> list[Verdict]:
        info = request_info(seen.method, seen.path, dict(seen.query))
        if seen.token == OPERATOR_TOKEN:
            out = []
            for layout, authorizer in self.authorizers.items():
                asked = info
                if (layout == PER_NAMESPACE and seen.user_agent.startswith("kopf/")
                        and info.resource_request and not info.namespace and namespaced(info)):
                    # kopf -A lists and watches namespaced kinds cluster-wide; given the chart's
                    # --namespace flags (watchNamespaces) it asks in each namespace instead.
                    asked = dataclasses.replace(info, namespace=NS)
                out.append(Verdict(test, "operator", self.operator, layout, asked,
                                   authorizer.authorize(self.operator, asked)))
            return out
        if seen.token.startswith(ROUTER_TOKEN):
            names = Names(seen.token.removeprefix(ROUTER_TOKEN), NS)
            authorizer = Authorizer(DEFAULT_POLICY + [build_router_role(names),
                                                      build_router_role_binding(names)])
            user = User.service_account(NS, names.router)
            return [Verdict(test, f"router {names.name}", user, "router Role", info,
                            authorizer.authorize(user, info))]
        return []  # the test playing users and controllers

    def check(self, test: str, seen: Iterable[Seen]) -> list[str]:
        """Judge one test's requests; the denied ones, as the API server would log them."""
        verdicts = [v for s in dict.fromkeys(seen) for v in self._judge(test, s)]
        self.verdicts += verdicts
        self.finished.add(test)
        return sorted({f"{v.who} ({v.layout}): {forbidden_message(v.user, v.info)}"
                       for v in verdicts if not v.decision.allowed})


def expand(rules: Iterable[dict]) -> Iterable[tuple[str, str, str]]:
    for rule in rules:
        for group in rule.get("apiGroups") or []:
            for resource in rule.get("resources") or []:
                for verb in rule.get("verbs") or []:
                    yield group, resource, verb
