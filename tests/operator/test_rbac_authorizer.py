"""tests/support/rbac.py against the behaviour of Kubernetes' RequestInfoFactory and RBAC authorizer
(the integration suites' RBAC audit relies on both)."""

from __future__ import annotations

import pytest

from tests.support.rbac import (
    DEFAULT_POLICY,
    Authorizer,
    RequestInfo,
    User,
    forbidden_message,
    request_info,
    rule_allows,
)

SA = User.service_account("ops", "op")


@pytest.mark.parametrize(("method", "path", "query", "want"), [
    ("GET", "/api/v1/namespaces/a/pods", {}, ("list", "", "pods", "", "a", "")),
    ("GET", "/api/v1/namespaces/a/pods", {"watch": "true"}, ("watch", "", "pods", "", "a", "")),
    ("GET", "/api/v1/pods", {"watch": "1"}, ("watch", "", "pods", "", "", "")),
    ("GET", "/api/v1/namespaces/a/pods/p", {}, ("get", "", "pods", "", "a", "p")),
    ("GET", "/api/v1/watch/namespaces/a/pods/p", {}, ("watch", "", "pods", "", "a", "p")),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": "metadata.name=p"},
     ("list", "", "pods", "", "a", "p")),
    ("GET", "/api/v1/namespaces/a/pods", {"fieldSelector": "metadata.name!=p"},
     ("list", "", "pods", "", "a", "")),
    ("POST", "/api/v1/namespaces/a/events", {}, ("create", "", "events", "", "a", "")),
    ("PUT", "/apis/apps/v1/namespaces/a/deployments/d", {}, ("update", "apps", "deployments", "", "a", "d")),
    ("PATCH", "/apis/llamafleet.io/v1alpha1/namespaces/a/llmservices/x/scale", {},
     ("patch", "llamafleet.io", "llmservices", "scale", "a", "x")),
    ("DELETE", "/api/v1/namespaces/a/secrets", {}, ("deletecollection", "", "secrets", "", "a", "")),
    ("DELETE", "/api/v1/namespaces/a/secrets/s", {}, ("delete", "", "secrets", "", "a", "s")),
    ("GET", "/api/v1/nodes", {}, ("list", "", "nodes", "", "", "")),
    # A Namespace is named by the namespace segment; status and finalize are its subresources.
    ("GET", "/api/v1/namespaces/a", {}, ("get", "", "namespaces", "", "a", "a")),
    ("PUT", "/api/v1/namespaces/a/finalize", {}, ("update", "", "namespaces", "finalize", "a", "a")),
])
def test_request_info_as_the_api_server_parses_it(method, path, query, want) -> None:
    info = request_info(method, path, query)
    assert info.resource_request
    assert (info.verb, info.api_group, info.resource, info.subresource, info.namespace,
            info.name) == want


@pytest.mark.parametrize("path", ["/api", "/api/v1", "/apis", "/apis/apps", "/apis/apps/v1",
                                  "/version", "/openapi/v2"])
def test_discovery_paths_are_non_resource_requests(path: str) -> None:
    info = request_info("GET", path)
    assert not info.resource_request and info.verb == "get"


def allows(rule: dict, method: str, path: str, query: dict | None = None) -> bool:
    return rule_allows(request_info(method, path, query), rule)


def test_verbs_groups_and_wildcards() -> None:
    rule = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}
    assert allows(rule, "GET", "/api/v1/namespaces/a/pods")
    assert not allows(rule, "GET", "/api/v1/namespaces/a/pods", {"watch": "true"})
    assert not allows(rule, "PATCH", "/api/v1/namespaces/a/pods/p")
    assert not allows(rule, "GET", "/apis/apps/v1/namespaces/a/pods")  # another group
    star = {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}
    assert allows(star, "PATCH", "/apis/apps/v1/namespaces/a/deployments/d/status")


def test_subresources_are_their_own_resources() -> None:
    main = {"apiGroups": ["llamafleet.io"], "resources": ["llmservices"], "verbs": ["patch"]}
    scale = {"apiGroups": ["llamafleet.io"], "resources": ["llmservices/scale"], "verbs": ["patch"]}
    any_scale = {"apiGroups": ["llamafleet.io"], "resources": ["*/scale"], "verbs": ["patch"]}
    path = "/apis/llamafleet.io/v1alpha1/namespaces/a/llmservices/x"
    assert allows(main, "PATCH", path) and not allows(main, "PATCH", path + "/scale")
    assert allows(scale, "PATCH", path + "/scale") and not allows(scale, "PATCH", path)
    assert not allows(scale, "PATCH", path + "/status")
    assert allows(any_scale, "PATCH", path + "/scale") and not allows(any_scale, "PATCH", path)


def test_resource_names_never_match_requests_without_a_name() -> None:
    rule = {"apiGroups": [""], "resources": ["secrets"], "resourceNames": ["k"],
            "verbs": ["get", "list", "watch", "create", "delete"]}
    assert allows(rule, "GET", "/api/v1/namespaces/a/secrets/k")
    assert not allows(rule, "GET", "/api/v1/namespaces/a/secrets/other")
    assert not allows(rule, "GET", "/api/v1/namespaces/a/secrets")
    assert not allows(rule, "GET", "/api/v1/namespaces/a/secrets", {"watch": "true"})
    assert not allows(rule, "POST", "/api/v1/namespaces/a/secrets")
    assert not allows(rule, "DELETE", "/api/v1/namespaces/a/secrets")
    # ...unless the list names its one object by field selector, as kubectl get --watch NAME does.
    assert allows(rule, "GET", "/api/v1/namespaces/a/secrets",
                  {"watch": "true", "fieldSelector": "metadata.name=k"})


def binding(kind: str, role_kind: str, role: str, namespace: str = "", subject: dict | None = None) -> dict:
    meta = {"name": "b", **({"namespace": namespace} if namespace else {})}
    return {"kind": kind, "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role},
            "subjects": [subject or {"kind": "ServiceAccount", "name": "op", "namespace": "ops"}]}


PODS = {"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list"]}


def test_a_role_grants_only_in_its_namespace_and_never_cluster_wide() -> None:
    authz = Authorizer([{"kind": "Role", "metadata": {"name": "r", "namespace": "a"}, "rules": [PODS]},
                        binding("RoleBinding", "Role", "r", "a")])
    assert authz.authorize(SA, request_info("GET", "/api/v1/namespaces/a/pods")).allowed
    assert not authz.authorize(SA, request_info("GET", "/api/v1/namespaces/b/pods")).allowed
    assert not authz.authorize(SA, request_info("GET", "/api/v1/pods")).allowed


def test_a_cluster_role_through_a_role_binding_grants_in_that_namespace_only() -> None:
    authz = Authorizer([{"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": [PODS]},
                        binding("RoleBinding", "ClusterRole", "c", "a")])
    assert authz.authorize(SA, request_info("GET", "/api/v1/namespaces/a/pods")).allowed
    assert not authz.authorize(SA, request_info("GET", "/api/v1/pods")).allowed
    authz = Authorizer([{"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": [PODS]},
                        binding("ClusterRoleBinding", "ClusterRole", "c")])
    assert authz.authorize(SA, request_info("GET", "/api/v1/pods")).allowed
    assert authz.authorize(SA, request_info("GET", "/api/v1/namespaces/b/pods")).allowed


def test_subjects_must_name_this_account_or_its_groups() -> None:
    role = {"kind": "ClusterRole", "metadata": {"name": "c"}, "rules": [PODS]}
    pods = request_info("GET", "/api/v1/pods")
    other = binding("ClusterRoleBinding", "ClusterRole", "c",
                    subject={"kind": "ServiceAccount", "name": "op", "namespace": "elsewhere"})
    assert not Authorizer([role, other]).authorize(SA, pods).allowed
    group = binding("ClusterRoleBinding", "ClusterRole", "c",
                    subject={"kind": "Group", "name": "system:serviceaccounts:ops"})
    assert Authorizer([role, group]).authorize(SA, pods).allowed
    # A binding whose role does not exist grants nothing.
    assert not Authorizer([binding("ClusterRoleBinding", "ClusterRole", "c")]).authorize(SA, pods).allowed


def test_every_account_may_discover_but_not_read() -> None:
    authz = Authorizer(DEFAULT_POLICY)
    assert authz.authorize(SA, request_info("GET", "/apis/apps/v1")).allowed
    assert authz.authorize(SA, request_info("GET", "/api")).allowed
    assert not authz.authorize(SA, request_info("GET", "/api/v1/namespaces/a/pods")).allowed
    assert not authz.authorize(SA, RequestInfo(verb="post", path="/apis")).allowed


def test_the_refusal_reads_as_the_api_server_words_it() -> None:
    info = request_info("PATCH", "/apis/llamafleet.io/v1alpha1/namespaces/a/llmservices/x/scale")
    assert forbidden_message(SA, info) == (
        'User "system:serviceaccount:ops:op" cannot patch resource "llmservices/scale" in API '
        'group "llamafleet.io" in the namespace "a"')
    assert forbidden_message(SA, request_info("GET", "/api/v1/nodes")).endswith(
        'cannot list resource "nodes" in API group "" at the cluster scope')
