"""The model cache with the real kopf runtime against KMock (tests/support/kube.py): the Job
that downloads a URL model once, the Deployment that waits for it and mounts the cache, a
second LLMService that shares the copy, scaling that never downloads again, and a failed
download. The test plays the Job controller and the kubelet: it creates the Job's pod, gives
it a log of `llamafleet fetch`'s own progress lines, and sets the Job's status."""

from __future__ import annotations

import hashlib
import os

import httpx
import pytest
from llamafleet.common.contract import JOB_NAME_LABEL
from llamafleet.inference.fetch import progress_line

from tests.support.kube import LLMS, NS, condition, create, env_of, get, kopf_runner, llmservice, patch
from tests.support.servers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

# Both timers' intervals are fixed when the handlers module is imported.
os.environ.setdefault("LLAMAFLEET_OPERATOR_RESYNC_SECONDS", "0.5")
os.environ.setdefault("LLAMAFLEET_OPERATOR_MODEL_CACHE_POLL_SECONDS", "0.2")

SHA = hashlib.sha256(b"a model").hexdigest()
JOB = f"llamafleet-fetch-{SHA[:16]}"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
PVCS = f"/api/v1/namespaces/{NS}/persistentvolumeclaims"
DEPS = f"/apis/apps/v1/namespaces/{NS}/deployments"
PODS = f"/api/v1/namespaces/{NS}/pods"
MiB = 2**20


@pytest.fixture()
def cache_on(monkeypatch):
    monkeypatch.setenv("LLAMAFLEET_OPERATOR_MODEL_CACHE_ENABLED", "true")
    monkeypatch.setenv("LLAMAFLEET_OPERATOR_MODEL_CACHE_STORAGE_CLASS", "nfs")


def url_service(name: str, url: str = "https://models.example/m.gguf", **over) -> dict:
    return llmservice(name, model={
        "source": {"url": {"url": url, "sha256": SHA}}, "contextSize": 2048,
        "shape": {"sizeBytes": 300_000_000, "layers": 16, "kvHeads": 4, "keyLength": 64,
                  "valueLength": 64}},
        resources={"gpus": 0, "cpu": "2", "memory": "4Gi"}, **over)


async def _status(api: httpx.AsyncClient, name: str, pred) -> dict | None:
    obj = await get(api, f"{LLMS}/{name}")
    return obj if obj and pred(obj.get("status") or {}) else None


async def _jobs(api: httpx.AsyncClient) -> list[dict]:
    return (await get(api, JOBS))["items"]


async def _job_pod(api: httpx.AsyncClient, kmock, name: str, *lines: str) -> None:
    """What the Job controller and the kubelet do: a pod of the Job, with a log."""
    await create(api, PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": name, "namespace": NS, "labels": {JOB_NAME_LABEL: JOB, "job-name": JOB}}})
    if not hasattr(kmock, "logs"):
        kmock.logs = {}
    kmock.logs[(NS, name)] = "".join(line + "\n" for line in lines)


async def test_a_url_model_is_fetched_once_and_shared_and_scaling_never_fetches_again(
        api, kmock, cache_on) -> None:
    async with kopf_runner() as runner:
        alpha = await create(api, LLMS, url_service("alpha"))
        # The claim and the Job; no Deployment while the file is not there.
        job = await wait_until(lambda: get(api, f"{JOBS}/{JOB}"))
        pvc = await wait_until(lambda: get(api, f"{PVCS}/llamafleet-model-cache"))
        assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
        assert pvc["spec"]["storageClassName"] == "nfs"
        (c,) = job["spec"]["template"]["spec"]["containers"]
        assert c["command"][:2] == ["llamafleet", "fetch"] and f"/cache/{SHA}.gguf" in c["command"]
        assert job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"] == {
            "claimName": "llamafleet-model-cache"}
        assert [o["uid"] for o in job["metadata"]["ownerReferences"]] == [alpha["metadata"]["uid"]]
        assert not job["metadata"]["ownerReferences"][0]["controller"]
        # The download's progress, read from the Job pod's log, reaches the status.
        await _job_pod(api, kmock, f"{JOB}-a", progress_line(10 * MiB, 40 * MiB),
                       progress_line(30 * MiB, 40 * MiB))
        obj = await wait_until(lambda: _status(api, "alpha", lambda s: (
            s.get("modelCache") or {}).get("bytesDone") == 30 * MiB))
        assert obj["status"]["modelCache"]["state"] == "Downloading"
        assert obj["status"]["modelCache"]["bytesTotal"] == 40 * MiB
        cached = condition(obj, "ModelCached")
        assert cached["status"] == "False" and cached["reason"] == "Downloading"
        assert "30.0 MiB of 40.0 MiB (75%)" in cached["message"]
        assert condition(obj, "Ready")["reason"] == "ModelDownloading"
        assert await get(api, f"{DEPS}/alpha") is None
        # The Job completes: the Deployment mounts the cached file read-only.
        kmock.logs[(NS, f"{JOB}-a")] += progress_line(40 * MiB, 40 * MiB) + "\n"
        await patch(api, f"{JOBS}/{JOB}/status", {"status": {"succeeded": 1, "conditions": [
            {"type": "Complete", "status": "True"}]}})
        dep = await wait_until(lambda: get(api, f"{DEPS}/alpha"))
        pod = dep["spec"]["template"]["spec"]
        assert "initContainers" not in pod
        assert {"name": "model", "persistentVolumeClaim": {
            "claimName": "llamafleet-model-cache", "readOnly": True}} in pod["volumes"]
        assert env_of(dep)["MODEL_PATH"] == f"/models/{SHA}.gguf"
        obj = await wait_until(lambda: _status(api, "alpha", lambda s: (
            s.get("modelCache") or {}).get("state") == "Cached"))
        assert condition(obj, "ModelCached")["status"] == "True"
        assert obj["status"]["modelCache"]["bytesDone"] == 40 * MiB

        # A second LLMService with the same sha256 (from another URL) shares the copy: no
        # second Job, and its Deployment is written at once.
        beta = await create(api, LLMS, url_service("beta", "https://mirror.example/m.gguf"))
        dep_b = await wait_until(lambda: get(api, f"{DEPS}/beta"))
        assert env_of(dep_b)["MODEL_PATH"] == f"/models/{SHA}.gguf"
        job = await wait_until(lambda: _owned_by(api, beta["metadata"]["uid"]))
        assert [o["uid"] for o in job["metadata"]["ownerReferences"]] == [
            alpha["metadata"]["uid"], beta["metadata"]["uid"]]
        assert [j["metadata"]["name"] for j in await _jobs(api)] == [JOB]

        # Scaling to zero and out again changes the Deployment only.
        version = job["metadata"]["resourceVersion"]
        await patch(api, f"{LLMS}/alpha", {"spec": {"replicas": 0}})
        await wait_until(lambda: _replicas(api, "alpha", 0))
        await patch(api, f"{LLMS}/alpha", {"spec": {"replicas": 3}})
        dep = await wait_until(lambda: _replicas(api, "alpha", 3))
        assert "initContainers" not in dep["spec"]["template"]["spec"]
        assert [j["metadata"]["name"] for j in await _jobs(api)] == [JOB]
        assert (await get(api, f"{JOBS}/{JOB}"))["metadata"]["resourceVersion"] == version
    assert runner.exception is None


async def _owned_by(api: httpx.AsyncClient, uid: str) -> dict | None:
    job = await get(api, f"{JOBS}/{JOB}")
    return job if any(o["uid"] == uid for o in job["metadata"]["ownerReferences"]) else None


async def _replicas(api: httpx.AsyncClient, name: str, n: int) -> dict | None:
    dep = await get(api, f"{DEPS}/{name}")
    return dep if dep and dep["spec"]["replicas"] == n else None


async def test_a_failed_download_is_a_condition_and_no_pods_start(api, kmock, cache_on) -> None:
    async with kopf_runner() as runner:
        await create(api, LLMS, url_service("gamma"))
        await wait_until(lambda: get(api, f"{JOBS}/{JOB}"))
        await _job_pod(api, kmock, f"{JOB}-x", progress_line(5 * MiB, 40 * MiB),
                       f"llamafleet fetch: sha256 mismatch for x: expected {SHA}, got 00")
        await patch(api, f"{JOBS}/{JOB}/status", {"status": {"failed": 1, "conditions": [
            {"type": "Failed", "status": "True", "reason": "PodFailurePolicy"}]}})
        obj = await wait_until(lambda: _status(api, "gamma", lambda s: s.get("phase") == "Degraded"))
        cached = condition(obj, "ModelCached")
        assert cached["reason"] == "DownloadFailed" and "sha256 mismatch" in cached["message"]
        assert condition(obj, "Ready")["reason"] == "ModelDownloadFailed"
        assert obj["status"]["modelCache"]["state"] == "Failed"
        assert await get(api, f"{DEPS}/gamma") is None
    assert runner.exception is None


async def test_without_the_cache_each_pod_downloads_its_model(api) -> None:
    async with kopf_runner() as runner:
        await create(api, LLMS, url_service("delta"))
        dep = await wait_until(lambda: get(api, f"{DEPS}/delta"))
        assert dep["spec"]["template"]["spec"]["initContainers"][0]["name"] == "fetch-model"
        obj = await wait_until(lambda: _status(api, "delta", lambda s: condition(
            {"status": s}, "ModelCached") is not None))
        assert condition(obj, "ModelCached")["reason"] == "PerPodDownload"
        assert await _jobs(api) == []
    assert runner.exception is None
