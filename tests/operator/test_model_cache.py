"""The model cache's pure parts (llamafleet.operator.model_cache): the claim, the Job, the
Deployment that mounts the cache, the plan's ordering rule 9, and what the Job's log and
status say; the kopf flows are in test_model_cache_kopf.py."""

from __future__ import annotations

import hashlib

import kubernetes_validate
import pytest
from llamafleet.common.contract import (
    FETCH_EXIT_PERMANENT,
    JOB_NAME_LABEL,
    USER_ID,
    cache_file_name,
)
from llamafleet.inference.fetch import progress_line
from llamafleet.operator import builders as B
from llamafleet.operator import model_cache as M
from llamafleet.operator.planning import plan_service
from llamafleet.operator.reconcile_steps import (
    MODEL_CACHE,
    Apply,
    Ensure,
    Observed,
    plan_steps,
)
from llamafleet.operator.settings import OperatorSettings
from llamafleet.operator.spec import parse_spec
from llamafleet.operator.status import model_condition, status_from

SHA = hashlib.sha256(b"model").hexdigest()
URL = "https://models.example/m.gguf"
NAMES = B.Names("chat", "team-a")
ON = OperatorSettings(model_cache_enabled=True, model_cache_storage_class="nfs",
                      model_cache_size="20Gi")
DEPLOYMENT = ("apps/v1", "Deployment", "chat")


def spec(source=None, **over):
    raw = {"model": {"source": source or {"url": {"url": URL, "sha256": SHA}}},
           "resources": {"gpus": 0, "memory": "16Gi"}}
    raw.update(over)
    return parse_spec(raw)


def validate(obj: dict) -> None:
    kubernetes_validate.validate(obj, "1.33.0", strict=True)


ENTRY = M.Entry(URL, SHA)


def test_the_entry_is_keyed_by_the_sha256_and_only_for_url_sources_with_the_cache_on() -> None:
    assert M.model_entry(spec(), True) == ENTRY
    assert ENTRY.file == f"{SHA}.gguf" == cache_file_name(SHA.upper())
    assert ENTRY.job == f"llamafleet-fetch-{SHA[:16]}"
    assert M.model_entry(spec(), False) is None
    assert M.model_entry(spec({"embedded": True}), True) is None
    # Another URL with the same sha256 is the same file and the same Job.
    other = spec({"url": {"url": "https://mirror.example/x.gguf", "sha256": SHA}})
    assert M.model_entry(other, True).job == ENTRY.job


def test_the_claim_follows_the_settings() -> None:
    pvc = M.build_cache_pvc("team-a", ON)
    validate(pvc)
    assert pvc["metadata"]["name"] == "llamafleet-model-cache"
    assert pvc["spec"] == {"accessModes": ["ReadWriteMany"], "storageClassName": "nfs",
                           "resources": {"requests": {"storage": "20Gi"}}}
    assert "storageClassName" not in M.build_cache_pvc("team-a", OperatorSettings())["spec"]


def test_the_fetch_job_writes_the_keyed_file_and_stops_on_a_permanent_failure() -> None:
    owner = {"apiVersion": "llamafleet.io/v1alpha1", "kind": "LLMService",
             "metadata": {"name": "chat", "uid": "u1"}}
    s = spec(imagePullSecrets=[{"name": "regcred"}])
    job = M.build_fetch_job("team-a", ENTRY, "cache", "llamafleet:0.1.0", s,
                            [M.owner_reference(owner)])
    validate(job)
    pod = job["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["command"] == ["llamafleet", "fetch", "--url", URL, "--sha256", SHA,
                            "--out", f"{M.CACHE_DIR}/{SHA}.gguf"]
    assert {"name": "cache", "mountPath": M.CACHE_DIR} in c["volumeMounts"]
    assert {"name": "cache", "persistentVolumeClaim": {"claimName": "cache"}} in pod["volumes"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["fsGroup"] == USER_ID
    assert pod["imagePullSecrets"] == [{"name": "regcred"}]
    assert job["spec"]["podFailurePolicy"]["rules"][0]["onExitCodes"]["values"] == \
        [FETCH_EXIT_PERMANENT]
    # Shared: the LLMService owns it, but does not control it.
    assert job["metadata"]["ownerReferences"] == [{
        "apiVersion": "llamafleet.io/v1alpha1", "kind": "LLMService", "name": "chat",
        "uid": "u1", "controller": False, "blockOwnerDeletion": False}]
    assert job["metadata"]["annotations"][M.SHA_ANNOTATION] == SHA


def test_a_cached_model_is_mounted_read_only_without_an_init_container() -> None:
    s = spec()
    dep = B.build_deployment(NAMES, s, plan_service(s, []), "img:1", model_cache="cache")
    validate(dep)
    pod = dep["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert {"name": "model", "persistentVolumeClaim": {"claimName": "cache", "readOnly": True}} \
        in pod["volumes"]
    (server,) = pod["containers"]
    assert {"name": "model", "mountPath": B.MODEL_DIR, "readOnly": True} in server["volumeMounts"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["LLM_LLAMA_SERVICE_MODEL_PATH"] == f"{B.MODEL_DIR}/{SHA}.gguf"
    # The fallback (no cache): each pod downloads its copy.
    per_pod = B.build_deployment(NAMES, s, plan_service(s, []), "img:1")
    assert per_pod["spec"]["template"]["spec"]["initContainers"][0]["name"] == "fetch-model"


def _state(state: str) -> M.CacheState:
    return M.CacheState(ENTRY, "cache", state, claim_exists=True, job_exists=True)


def test_rule_9_the_cache_before_the_deployment_which_waits_for_the_file() -> None:
    s = spec()
    plan = plan_service(s, [])

    def steps(cache):
        return plan_steps(s, plan, NAMES, Observed(replicas_set=True, cache=cache), ON)

    waiting = steps(_state("Downloading"))
    assert any(isinstance(st, Ensure) and st.action == MODEL_CACHE for st in waiting)
    assert DEPLOYMENT not in [st.key for st in waiting if isinstance(st, Apply)]
    ready = steps(_state("Cached"))
    actions = [st.action if isinstance(st, Ensure) else st.key for st in ready
               if isinstance(st, (Ensure, Apply))]
    assert actions.index(MODEL_CACHE) < actions.index(DEPLOYMENT)
    dep = next(st.obj for st in ready if isinstance(st, Apply) and st.key == DEPLOYMENT)
    assert dep["spec"]["template"]["spec"]["volumes"][-1]["persistentVolumeClaim"][
        "claimName"] == "cache"
    # No cache: no action, and the Deployment as before.
    plain = plan_steps(s, plan, NAMES, Observed(replicas_set=True), OperatorSettings())
    assert not any(isinstance(st, Ensure) and st.action == MODEL_CACHE for st in plain)
    assert DEPLOYMENT in [st.key for st in plain if isinstance(st, Apply)]


def test_the_log_gives_the_last_progress_and_error() -> None:
    log = "\n".join(["some noise", progress_line(10, 100), progress_line(60, 100),
                     "llamafleet fetch: download of x failed 6 times, the last: boom"])
    assert M.parse_log(log) == (60, 100, "download of x failed 6 times, the last: boom")
    assert M.parse_log("") == (None, None, None)


def _job(**status) -> dict:
    return {"metadata": {"name": ENTRY.job, "annotations": {M.SHA_ANNOTATION: SHA},
                         "ownerReferences": [{"uid": "other"}]}, "status": status}


PVC = {"status": {"phase": "Bound"}}


def test_the_state_of_an_entry() -> None:
    none = M.cache_state(ENTRY, "cache", None, None, "", "me")
    assert none.state == "Pending" and not none.claim_exists and not none.job_exists
    going = M.cache_state(ENTRY, "cache", PVC, _job(active=1),
                          progress_line(50 * 2**20, 200 * 2**20), "me")
    assert going.state == "Downloading" and not going.has_owner
    assert going.job_owners == ({"uid": "other"},)
    assert going.message == f"downloading {SHA}.gguf: 50.0 MiB of 200.0 MiB (25%)"
    assert going.condition().reason == "Downloading"
    assert going.status() == {"claim": "cache", "file": f"{SHA}.gguf", "job": ENTRY.job,
                              "state": "Downloading", "bytesDone": 50 * 2**20,
                              "bytesTotal": 200 * 2**20, "message": going.message}
    done = M.cache_state(ENTRY, "cache", PVC, _job(succeeded=1, conditions=[
        {"type": "Complete", "status": "True"}]), progress_line(7, 7), "other")
    assert done.ready and done.has_owner and done.bytes_done == 7
    assert done.condition().status == "True" and done.status()["message"] is None
    failed = M.cache_state(ENTRY, "cache", PVC, _job(failed=1, conditions=[
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]),
        "llamafleet fetch: sha256 mismatch for x", "me")
    assert failed.state == "Failed" and "sha256 mismatch" in failed.message
    assert "delete the Job" in failed.message
    unbound = M.cache_state(ENTRY, "cache", {"status": {"phase": "Pending"}}, _job(), "", "me")
    assert unbound.state == "Downloading" and "to be bound" in unbound.message
    clash = M.cache_state(ENTRY, "cache", PVC, {"metadata": {"annotations": {
        M.SHA_ANNOTATION: "f" * 64}}}, "", "me")
    assert clash.state == "Failed" and "f" * 64 in clash.message


@pytest.mark.parametrize("state, ready, phase, reason", [
    ("Downloading", 0, "Progressing", "ModelDownloading"),
    ("Failed", 0, "Degraded", "ModelDownloadFailed"),
    ("Downloading", 1, "Ready", "ReplicasReady"),  # the old pods keep serving meanwhile
])
def test_the_status_while_the_model_is_not_cached(state, ready, phase, reason) -> None:
    s = spec()
    dep = {"metadata": {"labels": {}}, "status": {"readyReplicas": ready, "replicas": ready}}
    st = status_from(s, plan_service(s, []), {DEPLOYMENT: dep}, _state(state))
    conds = {c.type: c for c in st.conditions}
    assert st.phase == phase and conds["Ready"].reason == reason
    assert conds["Progressing"].reason in ("ModelDownloading", "ModelDownloadFailed")


def test_the_model_cached_condition_of_each_source() -> None:
    assert model_condition(spec(), False, None).reason == "PerPodDownload"
    assert model_condition(spec({"embedded": True}), True, None).reason == "NoDownload"
    assert model_condition(spec(), True, _state("Cached")).status == "True"


def test_the_job_pods_label_is_the_one_the_job_controller_sets() -> None:
    assert JOB_NAME_LABEL == "batch.kubernetes.io/job-name"


def test_the_fetch_job_uses_the_cpu_image_unless_the_spec_names_one() -> None:
    from llamafleet.operator.model_cache_io import fetch_image

    settings = OperatorSettings(image_repository="reg/lf", image_tag="1.0",
                                gpu_image_repository="reg/lf", gpu_image_tag="1.0-cuda")
    assert fetch_image(spec(resources={"gpus": 1, "memory": "16Gi"}), settings) == "reg/lf:1.0"
    own = spec(image={"repository": "mine/lf", "tag": "2"})
    assert fetch_image(own, settings) == "mine/lf:2"
