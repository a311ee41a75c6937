"""Kubernetes' RBAC authorizer, for auditing the requests our components make.

No API server runs on these machines (the integration tests run against KMock, which allows
everything), so the tests check each recorded request the way the API server would:
1. `request_info` turns the HTTP request into attributes as k8s.io/apiserver's
   RequestInfoFactory does (pkg/endpoints/request/requestinfo.go): verb from the method
   (GET on a collection = list, with ?watch=true = watch, DELETE on a collection =
   deletecollection), API group, resource, subresource, namespace, name.
2. `Authorizer.authorize` evaluates them as the RBAC authorizer does
   (plugin/pkg/auth/authorizer/rbac/rbac.go and pkg/apis/rbac/v1/evaluation_helpers.go):
   ClusterRoleBindings grant their ClusterRole everywhere; a RoleBinding grants its Role or
   ClusterRole only in its own namespace; a rule allows a request when its verbs, apiGroups,
   resources (`resource/subresource`, `*`, `*/subresource`) and resourceNames all match.
   resourceNames never match a request without a name (list, watch, create, deletecollection).

Hand-written because no maintained Python library evaluates RBAC: the Kubernetes Python
client only calls the API server's SubjectAccessReview, which needs a running API server.
The bootstrap roles that every cluster binds to all authenticated users (discovery, the
self-reviews) are included in DEFAULT_POLICY, as kube-apiserver creates them at start-up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

# Paths under /api/v1/namespaces/<ns>/ that are subresources of the Namespace itself
# (requestinfo.go: namespaceSubresources).
NAMESPACE_SUBRESOURCES = {"status", "finalize"}
VERB_OF_METHOD = {"POST": "create", "GET": "get", "HEAD": "get", "PUT": "update",
                  "PATCH": "patch", "DELETE": "delete"}


@dataclasses.dataclass(frozen=True)
class RequestInfo:
    verb: str
    path: str
    resource_request: bool = False
    api_group: str = ""
    api_version: str = ""
    namespace: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""

    def __str__(self) -> str:
        if not self.resource_request:
            return f"{self.verb} {self.path} (non-resource URL)"
        what = self.resource + (f"/{self.subresource}" if self.subresource else "")
        group = self.api_group or "core"
        where = f" in namespace {self.namespace}" if self.namespace else " (cluster scope)"
        named = f" {self.name!r}" if self.name else ""
        return f"{self.verb} {what}{named} [{group}]{where}"


def request_info(method: str, path: str, query: Mapping[str, str] | None = None) -> RequestInfo:
    """The attributes the API server authorizes, from one HTTP request (as requestinfo.go)."""
    query = query or {}
    verb = VERB_OF_METHOD.get(method.upper(), method.lower())
    parts = [p for p in path.strip("/").split("/") if p]
    if not parts or parts[0] not in ("api", "apis"):
        return RequestInfo(verb=method.lower(), path=path)
    prefix, rest = parts[0], parts[1:]
    if prefix == "apis":
        if len(rest) < 3:  # /apis, /apis/<group>, /apis/<group>/<version>: discovery
            return RequestInfo(verb=method.lower(), path=path)
        group, version, rest = rest[0], rest[1], rest[2:]
    else:
        if len(rest) < 2:  # /api, /api/v1
            return RequestInfo(verb=method.lower(), path=path)
        group, version, rest = "", rest[0], rest[1:]
    if rest and rest[0] == "watch":  # the deprecated /watch/ prefix
        verb, rest = "watch", rest[1:]
    namespace = ""
    if rest and rest[0] == "namespaces":
        if len(rest) > 1:
            namespace = rest[1]
            # /namespaces/<ns>/<resource>...: the namespace is a scope, not the object.
            if len(rest) > 2 and rest[2] not in NAMESPACE_SUBRESOURCES:
                rest = rest[2:]
    resource = rest[0] if rest else ""
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    # GET or DELETE without a name acts on the collection.
    if not name and verb == "get":
        verb = "watch" if str(query.get("watch", "")).lower() in ("true", "1") else "list"
        # A list or watch of one object by field selector names it (resourceNames apply).
        for term in query.get("fieldSelector", "").split(","):
            key, _, value = term.replace("==", "=").partition("=")
            if key.strip() == "metadata.name" and value and not key.endswith("!"):
                name = value.strip()
    if not name and verb == "delete":
        verb = "deletecollection"
    return RequestInfo(verb=verb, path=path, resource_request=True, api_group=group,
                       api_version=version, namespace=namespace, resource=resource,
                       subresource=subresource, name=name)


def forbidden_message(user: User, info: RequestInfo) -> str:
    """The API server's 403 message (responsewriters/errors.go: forbiddenMessage)."""
    if not info.resource_request:
        return f'User "{user.name}" cannot {info.verb} path "{info.path}"'
    what = info.resource + (f"/{info.subresource}" if info.subresource else "")
    head = f'User "{user.name}" cannot {info.verb} resource "{what}" in API group "{info.api_group}"'
    return head + (f' in the namespace "{info.namespace}"' if info.namespace else " at the cluster scope")


def rule_allows(info: RequestInfo, rule: Mapping[str, Any]) -> bool:
    """One PolicyRule against one request (evaluation_helpers.go: RuleAllows)."""
    verbs = rule.get("verbs") or []
    if "*" not in verbs and info.verb not in verbs:
        return False
    if not info.resource_request:
        return any(u == "*" or u == info.path or (u.endswith("*") and info.path.startswith(u[:-1]))
                   for u in rule.get("nonResourceURLs") or [])
    groups = rule.get("apiGroups") or []
    if "*" not in groups and info.api_group not in groups:
        return False
    combined = info.resource + (f"/{info.subresource}" if info.subresource else "")
    if not any(r == "*" or r == combined
               or (info.subresource and r == f"*/{info.subresource}")
               for r in rule.get("resources") or []):
        return False
    names = rule.get("resourceNames") or []
    return not names or info.name in names


@dataclasses.dataclass(frozen=True)
class User:
    name: str
    groups: tuple[str, ...] = ()

    @classmethod
    def service_account(cls, namespace: str, name: str) -> User:
        return cls(f"system:serviceaccount:{namespace}:{name}",
                   ("system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                    "system:authenticated"))


@dataclasses.dataclass(frozen=True)
class Decision:
    allowed: bool
    # Every (role key, rule index) whose rule allows the request, for finding unused rules.
    matched: tuple[tuple[str, int], ...] = ()


def role_key(kind: str, name: str, namespace: str = "") -> str:
    return f"{kind}/{namespace}/{name}" if namespace else f"{kind}/{name}"


def _subject_matches(subject: Mapping[str, Any], user: User, binding_namespace: str) -> bool:
    kind = subject.get("kind")
    if kind == "ServiceAccount":
        ns = subject.get("namespace") or binding_namespace
        return user.name == f"system:serviceaccount:{ns}:{subject.get('name')}"
    if kind == "User":
        return user.name == subject.get("name")
    if kind == "Group":
        return subject.get("name") in user.groups
    return False


class Authorizer:
    """The RBAC authorizer over a set of ClusterRoles, Roles and their bindings."""

    def __init__(self, objects: Iterable[Mapping[str, Any]]):
        self.roles: dict[str, list[Mapping[str, Any]]] = {}
        self.bindings: list[Mapping[str, Any]] = []
        for obj in objects:
            kind, meta = obj.get("kind"), obj.get("metadata") or {}
            if kind == "ClusterRole":
                self.roles[role_key(kind, meta["name"])] = list(obj.get("rules") or [])
            elif kind == "Role":
                self.roles[role_key(kind, meta["name"], meta["namespace"])] = list(obj.get("rules") or [])
            elif kind in ("ClusterRoleBinding", "RoleBinding"):
                self.bindings.append(obj)

    def _roles_for(self, user: User, namespace: str) -> Iterable[str]:
        for b in self.bindings:
            meta, ref = b.get("metadata") or {}, b["roleRef"]
            ns = meta.get("namespace", "") if b["kind"] == "RoleBinding" else ""
            if b["kind"] == "RoleBinding" and ns != namespace:
                continue  # a RoleBinding grants only in its own namespace
            if not any(_subject_matches(s, user, ns) for s in b.get("subjects") or []):
                continue
            if ref["kind"] == "ClusterRole":
                yield role_key("ClusterRole", ref["name"])
            elif b["kind"] == "RoleBinding":  # a Role, always the binding's namespace
                yield role_key("Role", ref["name"], ns)

    def authorize(self, user: User, info: RequestInfo) -> Decision:
        matched = []
        for key in dict.fromkeys(self._roles_for(user, info.namespace)):
            for i, rule in enumerate(self.roles.get(key, [])):  # a missing role grants nothing
                if rule_allows(info, rule):
                    matched.append((key, i))
        return Decision(bool(matched), tuple(matched))


def _cluster_role(name: str, rules: list[dict], group: str) -> list[dict]:
    return [{"kind": "ClusterRole", "metadata": {"name": name}, "rules": rules},
            {"kind": "ClusterRoleBinding", "metadata": {"name": name},
             "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": name},
             "subjects": [{"kind": "Group", "name": group}]}]


# kube-apiserver's bootstrap policy for every authenticated user
# (plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go): discovery and self-reviews.
DEFAULT_POLICY: list[dict] = [
    *_cluster_role("system:discovery", [{"verbs": ["get"], "nonResourceURLs": [
        "/api", "/api/*", "/apis", "/apis/*", "/healthz", "/livez", "/openapi", "/openapi/*",
        "/readyz", "/version", "/version/"]}], "system:authenticated"),
    *_cluster_role("system:basic-user", [{"verbs": ["create"], "apiGroups": ["authorization.k8s.io"],
                                          "resources": ["selfsubjectaccessreviews",
                                                        "selfsubjectrulesreviews"]}],
                   "system:authenticated"),
    *_cluster_role("system:public-info-viewer", [{"verbs": ["get"], "nonResourceURLs": [
        "/healthz", "/livez", "/readyz", "/version", "/version/"]}], "system:authenticated"),
]
