"""spec.adapters, the pure parts: the spec's checks, the pod template and ConfigMap the builders
write (validated against the Kubernetes 1.33 schemas), where the plan puts them, and what
llamafleet.operator.adapters decides for a pod. End to end: test_adapters_kopf.py."""

from __future__ import annotations

import hashlib
import json

import kubernetes_validate
import pytest
from llamafleet.inference.settings import Settings
from llamafleet.operator import adapters as A
from llamafleet.operator import builders as B
from llamafleet.operator.planning import plan_service
from llamafleet.operator.reconcile_steps import (
    ADAPTERS,
    Apply,
    Delete,
    Ensure,
    Observed,
    adapters_key,
    plan_steps,
)
from llamafleet.operator.settings import OperatorSettings
from llamafleet.operator.spec import SpecError, parse_spec

NAMES = B.Names("chat", "team-a")
SHA = "a" * 64
PEER = {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ops"}},
        "podSelector": {"matchLabels": {"app": "op"}}}


def pvc(name: str, path: str, claim: str = "loras", scale: float | None = None) -> dict:
    out: dict = {"name": name, "source": {"pvc": {"claimName": claim, "path": path}}}
    if scale is not None:
        out["scale"] = scale
    return out


def url(name: str, where: str = "https://hf.example/a.gguf", sha: str = SHA) -> dict:
    return {"name": name, "source": {"url": {"url": where, "sha256": sha}}}


def spec(*adapters: dict, **over):
    raw = {"model": {"source": {"pvc": {"claimName": "models", "path": "base.gguf"}}},
           "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"}, "adapters": list(adapters)}
    raw.update(over)
    return parse_spec(raw)


def deployment(s) -> dict:
    return B.build_deployment(NAMES, s, plan_service(s, []), "llamafleet:0.1.0")


def template(s) -> dict:
    return deployment(s)["spec"]["template"]


# --- the spec ---------------------------------------------------------------------------------


@pytest.mark.parametrize("adapters, needle", [
    ([pvc("a", "x.gguf"), pvc("a", "y.gguf")], "each name must be unique (a repeated)"),
    ([pvc("has space", "x.gguf")], "spec.adapters.0.name"),
    ([pvc("-lead", "x.gguf")], "spec.adapters.0.name"),
    ([{"name": "a", "source": {}}], "exactly one of source.pvc or source.url"),
    ([{"name": "a", "source": {**pvc("a", "x")["source"], **url("a")["source"]}}],
     "exactly one of source.pvc or source.url"),
    ([pvc("a", "x,y.gguf")], "spec.adapters.0.source.pvc.path"),
    ([url("a", sha="")], "spec.adapters.0.source.url.sha256"),
    ([url("a", where="ftp://x")], "spec.adapters.0.source.url.url"),
    ([{**pvc("a", "x"), "scale": float("nan")}], "finite"),
    ([pvc(f"a{i}", "x") for i in range(33)], "spec.adapters"),
])
def test_invalid_adapters_say_what_to_fix(adapters, needle) -> None:
    with pytest.raises(SpecError, match=".*") as e:
        spec(*adapters)
    assert needle in str(e.value)


def test_names_as_requests_give_them_pass() -> None:
    s = spec(pvc("org/sql-v1.2:q4", "x.gguf"), pvc("7b_chat", "y.gguf", scale=-0.5))
    assert [a.name for a in s.adapters] == ["org/sql-v1.2:q4", "7b_chat"]
    assert s.adapters[1].scale == -0.5 and spec(pvc("a", "x")).adapters[0].scale == 1.0


# --- the pod template and the ConfigMap ----------------------------------------------------------


def test_url_adapters_are_fetched_and_pvc_adapters_mounted_read_only() -> None:
    s = spec(url("web"), url("again"), url("other", "https://hf.example/b.gguf"),
             pvc("sql", "sql/a.gguf"), pvc("base-claim", "/lora.gguf", claim="models"))
    dep = deployment(s)
    kubernetes_validate.validate(dep, "1.33.0", strict=True)
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    # Two URLs (the same one twice is fetched once), each by a verifying init container.
    fetches = pod["initContainers"]
    assert len(fetches) == 2 and all(c["name"].startswith("fetch-adapter-") for c in fetches)
    web = next(c for c in fetches if "https://hf.example/a.gguf" in c["command"])
    assert web["command"][:2] == ["llamafleet", "fetch"] and SHA in web["command"]
    out = web["command"][web["command"].index("--out") + 1]
    assert out == B.adapter_path(s, s.adapters[0]) == B.adapter_path(s, s.adapters[1])
    assert out.startswith("/adapters/") and web["securityContext"]["readOnlyRootFilesystem"]
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in server["volumeMounts"]
    # The other claim is mounted read-only; the model's claim is the model's volume.
    volume = "adapter-pvc-" + hashlib.sha256(b"loras").hexdigest()[:12]
    assert {"name": volume, "persistentVolumeClaim": {"claimName": "loras", "readOnly": True}} \
        in pod["volumes"]
    assert {"name": volume, "mountPath": "/adapter-claims/loras", "readOnly": True} \
        in server["volumeMounts"]
    assert [v for v in pod["volumes"] if (v.get("persistentVolumeClaim") or {}).get(
        "claimName") == "models"] == [{"name": "model", "persistentVolumeClaim": {
            "claimName": "models", "readOnly": True}}]
    assert B.adapter_path(s, s.adapters[3]) == "/adapter-claims/loras/sql/a.gguf"
    assert B.adapter_path(s, s.adapters[4]) == "/models/lora.gguf"
    # The start-up list comes from the ConfigMap; the template lists the sources it has.
    env = {e["name"]: e for e in server["env"]}
    assert env["LLM_LLAMA_SERVICE_LORA_ADAPTERS"]["valueFrom"] == {"configMapKeyRef": {
        "name": "chat-adapters", "key": "adapters", "optional": True}}
    sources = json.loads(dep["spec"]["template"]["metadata"]["annotations"][
        B.ADAPTER_SOURCES_ANNOTATION])
    assert sources == sorted({B.adapter_source(a) for a in s.adapters})
    assert {"pvc:loras", "pvc:models"} < set(sources) and len(sources) == 4


def test_the_config_map_is_what_the_pod_reads_at_start_up() -> None:
    s = spec(pvc("sql", "a//b/./sql.gguf", scale=0.123456789), url("org/web"))
    cm = B.build_adapters_config_map(NAMES, s)
    kubernetes_validate.validate(cm, "1.33.0", strict=True)
    assert cm["metadata"]["name"] == "chat-adapters"
    lora = Settings(lora_adapters=cm["data"]["adapters"]).lora  # as the pod parses its env
    assert [(n, str(p), sc) for n, p, sc in lora] == [
        (a.name, B.adapter_path(s, a), a.scale) for a in s.adapters]
    assert str(lora[0][1]) == "/adapter-claims/loras/a/b/sql.gguf"  # as the pod writes it back
    # An adapter a running pod refused would stop a starting pod: it is left out.
    value = B.build_adapters_config_map(NAMES, s, refused={"sql"})["data"]["adapters"]
    assert [n for n, _, _ in Settings(lora_adapters=value).lora] == ["org/web"]


def test_only_files_shape_the_template_so_a_renamed_or_rescaled_list_rolls_no_pod() -> None:
    before = template(spec(pvc("sql", "a.gguf"), url("web")))
    assert template(spec(pvc("sql2", "b.gguf", scale=0.3), url("web2"), pvc("x", "c.gguf"))
                    ) == before
    assert template(spec(pvc("sql", "a.gguf"), url("web", "https://hf.example/new.gguf"))) \
        != before  # a new file to fetch
    assert template(spec(pvc("sql", "a.gguf", claim="other"), url("web"))) != before  # a new claim


def test_without_adapters_the_template_is_as_before() -> None:
    t = template(spec())
    assert "initContainers" not in t["spec"]
    assert set(t["metadata"]["annotations"]) == {"prometheus.io/scrape", "prometheus.io/port"}
    assert not any("LORA" in e["name"] for e in t["spec"]["containers"][0]["env"])


def test_the_network_policy_lets_the_operator_reach_the_pods_only_with_adapters() -> None:
    def operator_rules(s) -> list:
        return [r for r in B.build_network_policy(NAMES, s, operator_peer=PEER)["spec"]["ingress"]
                if r["from"] == [PEER]]

    assert operator_rules(spec()) == []
    assert operator_rules(spec(pvc("a", "x"))) == [{"from": [PEER], "ports": [
        {"port": 16070, "protocol": "TCP"}]}]


# --- the plan ------------------------------------------------------------------------------


def steps(s, observed: Observed | None = None):
    return plan_steps(s, plan_service(s, []), NAMES, observed or Observed(replicas_set=True),
                      OperatorSettings())


def test_the_config_map_comes_before_the_pods_and_the_pods_are_synced_last() -> None:
    plan = steps(spec(pvc("a", "x")))
    keys = [st.action if isinstance(st, Ensure) else st.key for st in plan]
    cm = keys.index(adapters_key(NAMES))
    assert isinstance(plan[cm], Apply) and cm < keys.index(("apps/v1", "Deployment", "chat"))
    assert keys[-1] == ADAPTERS
    # Without adapters: the ConfigMap is deleted if ours, and the pods are left alone unless
    # the status says that they held some.
    plain = steps(spec())
    assert any(isinstance(st, Delete) and st.key == adapters_key(NAMES) for st in plain)
    assert ADAPTERS not in [st.action for st in plain if isinstance(st, Ensure)]
    assert steps(spec(), Observed(True, adapters_reported=True))[-1].action == ADAPTERS
    refused = steps(spec(pvc("a", "x"), pvc("b", "y")), Observed(
        True, adapters_reported=True, adapters_refused=frozenset({"a"})))
    assert refused[cm].obj["data"]["adapters"] == "b=/adapter-claims/loras/y:1.0"


# --- what a pod is asked to do -------------------------------------------------------------------


def test_a_pod_loads_what_it_lacks_and_unloads_what_changed_or_went() -> None:
    wanted = {"a": ("/x/a.gguf", 1.0), "b": ("/x/b.gguf", 0.5), "c": ("/x/c.gguf", 1.0)}
    held = {"a": ("/x/a.gguf", 1.0), "b": ("/x/b.gguf", 1.0), "old": ("/x/o.gguf", 1.0)}
    assert A.plan_pod(wanted, held) == (["b", "old"], [("b", "/x/b.gguf", 0.5),
                                                      ("c", "/x/c.gguf", 1.0)])
    assert A.plan_pod(wanted, wanted) == ([], [])


def test_a_pod_is_asked_only_for_the_files_its_template_gave_it() -> None:
    s = spec(pvc("sql", "a.gguf"), url("web"))
    pod = {"metadata": {"annotations": {B.ADAPTER_SOURCES_ANNOTATION: json.dumps(["pvc:loras"])}}}
    assert A.wanted_on(s, A.pod_sources(pod)) == {"sql": ("/adapter-claims/loras/a.gguf", 1.0)}
    assert A.pod_sources({}) == [] and A.pod_sources(
        {"metadata": {"annotations": {B.ADAPTER_SOURCES_ANNOTATION: "{bad"}}}) == []


def test_the_condition_says_whether_every_ready_pod_holds_the_list() -> None:
    s = spec(pvc("a", "x"), url("b"))
    ok = A.PodAdapters("p0", held=["a", "b"])
    assert A.condition(s, [ok]).reason == "Loaded" and A.condition(s, [ok]).status == "True"
    assert A.condition(s, []).status == "Unknown"
    rolling = A.PodAdapters("p1", held=["a"], missing=["b"])
    assert A.condition(s, [ok, rolling]).reason == "RollingOut"
    assert rolling.to_status() == {"pod": "p1", "adapters": ["a"], "awaitingRollout": ["b"]}
    broken = A.PodAdapters("p2", held=["a"], problems=["load b: 400 invalid_adapter: bad"],
                           refused=["b"])
    assert broken.to_status()["refused"] == ["b"]
    c = A.condition(s, [ok, broken])
    assert (c.status, c.reason) == ("False", "AdapterError") and "p2: load b: 400" in c.message
