"""spec.adapters end to end: the real kopf runtime against KMock's emulator, with real
`llamafleet serve` processes on loopback standing in for the pods (the random llama and random
LoRA adapters of benchmarks/make_random_gguf.py).

The emulator has no kubelet and no Deployment controller, so the test plays them, from what the
operator wrote: a pod is started by running its init containers' commands (the real
`llamafleet fetch`, against a loopback file server), then a server with the start-up adapters
that its env reads from ConfigMap `<name>-adapters`, and a Pod object that carries the
template's labels and annotations, `podIP` 127.0.0.1, Ready, and the server's port as its
container port `http`. The pod's mount points are folders under tmp_path: the builders'
directory constants, pointed there (volumes the test mounts by putting the files in place).
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import http.server
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from llamafleet.operator import builders as B

from tests.support.kube import LLMS, NS, condition, create, get, kopf_runner, llmservice, patch
from tests.support.random_gguf import generator
from tests.support.servers import RunningServer, start_server, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio]

# The resync timer's interval is fixed when the handlers module is imported.
os.environ.setdefault("LLAMAFLEET_OPERATOR_RESYNC_SECONDS", "0.5")
SHAPE = dict(dim=64, layers=2, ff=128, heads=4, kv_heads=4, context=512)
KEY = "adapters-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
NAME = "chat"
DEPLOYMENT = f"/apis/apps/v1/namespaces/{NS}/deployments/{NAME}"
CONFIG_MAP = f"/api/v1/namespaces/{NS}/configmaps/{NAME}-adapters"
PODS = f"/api/v1/namespaces/{NS}/pods"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """The random llama and three random adapters for it."""
    gen = generator()
    folder = tmp_path_factory.mktemp("adapters")
    out = {}
    for seed in (1, 2, 3):
        paths = gen.write_lora_set(folder, **SHAPE, lora_seed=seed)
        out["base"], out[f"lora{seed}"] = paths["base"], paths["lora"]
    return out


@pytest.fixture()
def volumes(tmp_path, monkeypatch, files) -> dict[str, Path]:
    """The pods' mount points under tmp_path: the claim `loras` holds lora1 and lora2; the
    URL adapters' emptyDir starts empty (the init containers fill it)."""
    dirs = {"model": tmp_path / "models", "claims": tmp_path / "adapter-claims",
            "fetched": tmp_path / "adapters"}
    for d in dirs.values():
        d.mkdir()
    (dirs["claims"] / "loras").mkdir()
    shutil.copy(files["lora1"], dirs["claims"] / "loras" / "one.gguf")
    shutil.copy(files["lora2"], dirs["claims"] / "loras" / "two.gguf")
    monkeypatch.setattr(B, "MODEL_DIR", str(dirs["model"]))
    monkeypatch.setattr(B, "ADAPTER_CLAIMS_DIR", str(dirs["claims"]))
    monkeypatch.setattr(B, "ADAPTER_DIR", str(dirs["fetched"]))
    return dirs


@pytest.fixture()
def file_server(files) -> Iterator[str]:
    """A loopback HTTP server with lora3.gguf, where a URL adapter comes from."""
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(files["lora3"].parent))
    handler.log_message = lambda *a: None  # type: ignore[attr-defined]
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


class Kubelet:
    """Starts and stops the stand-in pods from the Deployment and ConfigMap the operator wrote."""

    def __init__(self, api: httpx.AsyncClient, model: Path):
        self.api, self.model = api, model
        self.pods: dict[str, RunningServer] = {}

    async def start(self, pod: str) -> dict:
        dep = await get(self.api, DEPLOYMENT)
        template = dep["spec"]["template"]
        for init in template["spec"].get("initContainers") or []:
            cmd = [str(Path(sys.executable).parent / init["command"][0]), *init["command"][1:]]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, done.stdout + done.stderr
        env = template["spec"]["containers"][0]["env"]
        ref = next(e["valueFrom"]["configMapKeyRef"] for e in env
                   if e["name"] == "LLM_LLAMA_SERVICE_LORA_ADAPTERS")
        cm = await get(self.api, f"/api/v1/namespaces/{NS}/configmaps/{ref['name']}")
        lora = tuple(cm["data"][ref["key"]].split(",")) if cm else ()
        server = await _in_thread(start_server, model_path=self.model, model_name="base",
                                  api_key=KEY, max_batch_size=2, context_size=256,
                                  embeddings=False, lora_adapters=lora, prompt_cache_mib=0)
        self.pods[pod] = server
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        return await create(self.api, PODS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": pod, "namespace": NS, "labels": template["metadata"]["labels"],
                         "annotations": template["metadata"]["annotations"]},
            "spec": {"containers": [{"name": "server", "ports": [
                {"name": "http", "containerPort": server.settings.http_port}]}]},
            "status": {"podIP": "127.0.0.1", "conditions": [
                {"type": "Ready", "status": "True", "lastTransitionTime": now}]}})

    async def stop(self, pod: str) -> None:
        r = await self.api.delete(f"{PODS}/{pod}")
        assert r.status_code < 300, r.text
        await _in_thread(self.pods.pop(pod).stop)

    def cards(self, pod: str) -> dict[str, dict]:
        r = httpx.get(f"{self.pods[pod].url}/v1/models", headers=AUTH)
        return {m["id"]: m for m in r.json()["data"] if m.get("parent")}

    def complete(self, pod: str, model: str) -> int:
        return httpx.post(f"{self.pods[pod].url}/v1/completions", headers=AUTH, timeout=60, json={
            "model": model, "prompt": "Once upon a time", "max_tokens": 4}).status_code

    async def close(self) -> None:
        for pod in list(self.pods):
            await _in_thread(self.pods.pop(pod).stop)


async def _in_thread(fn, *args, **kwargs):
    import asyncio

    return await asyncio.to_thread(fn, *args, **kwargs)


async def _status_where(api: httpx.AsyncClient, check, timeout: float = 60) -> dict:
    async def probe():
        obj = await get(api, f"{LLMS}/{NAME}") or {}
        return obj if check(obj) else None
    return await wait_until(probe, timeout=timeout)


async def _config_map_without(api: httpx.AsyncClient, text: str) -> dict | None:
    cm = await get(api, CONFIG_MAP)
    return cm if cm and text not in cm["data"]["adapters"] else None


def _held(obj: dict) -> dict[str, list[str]]:
    return {p["pod"]: p["adapters"] for p in (obj.get("status") or {}).get("adapters") or []}


def _ready(obj: dict) -> str | None:
    return (condition(obj, "AdaptersReady") or {}).get("reason")


def _pvc(name: str, path: str, scale: float = 1.0) -> dict:
    return {"name": name, "source": {"pvc": {"claimName": "loras", "path": path}}, "scale": scale}


async def test_adapters_are_fetched_loaded_at_run_time_and_reported(
        api, volumes, files, file_server) -> None:
    await create(api, f"/api/v1/namespaces/{NS}/secrets", {
        "apiVersion": "v1", "kind": "Secret", "metadata": {"name": "key", "namespace": NS},
        "data": {"api-key": base64.b64encode(KEY.encode()).decode()}})
    kubelet = Kubelet(api, files["base"])
    try:
        async with kopf_runner() as runner:
            await create(api, LLMS, llmservice(
                NAME, resources={"gpus": 0, "cpu": "2", "memory": "16Gi"},
                auth={"apiKeySecret": "key"}, adapters=[_pvc("one", "one.gguf", 0.5)]))
            # The pods read their start-up list from the ConfigMap; the claim is mounted.
            cm = await wait_until(lambda: get(api, CONFIG_MAP))
            one = volumes["claims"] / "loras" / "one.gguf"
            assert cm["data"]["adapters"] == f"one={one}:0.5"
            dep = await wait_until(lambda: get(api, DEPLOYMENT))
            template = dep["spec"]["template"]
            assert {"name": "adapter-pvc-" + hashlib.sha256(b"loras").hexdigest()[:12],
                    "persistentVolumeClaim": {"claimName": "loras", "readOnly": True}
                    } in template["spec"]["volumes"]
            await kubelet.start("chat-0")
            await patch(api, DEPLOYMENT + "/status", {"status": {"replicas": 1,
                                                                 "readyReplicas": 1}})
            obj = await _status_where(api, lambda o: _ready(o) == "Loaded")
            assert _held(obj) == {"chat-0": ["one"]}
            assert condition(obj, "AdaptersReady")["status"] == "True"

            # A changed list on the mounted claim: loaded at run time, no pod replaced.
            await patch(api, f"{LLMS}/{NAME}", {"spec": {"adapters": [
                _pvc("one", "one.gguf", 1.0), _pvc("org/two", "two.gguf")]}})
            obj = await _status_where(api, lambda o: _held(o) == {"chat-0": ["one", "org/two"]}
                                      and _ready(o) == "Loaded")
            cards = kubelet.cards("chat-0")
            assert cards["one"]["scale"] == 1.0  # reloaded at its new scale
            assert cards["org/two"]["root"] == str(volumes["claims"] / "loras" / "two.gguf")
            assert kubelet.complete("chat-0", "org/two") == 200
            dep = await get(api, DEPLOYMENT)
            assert dep["spec"]["template"] == template  # the pods are not rolled

            # A URL adapter needs a new file: the template changes (a rollout); the old pod
            # waits for it, and the new one fetches it before it starts.
            lora3 = files["lora3"]
            url = {"url": f"{file_server}/{lora3.name}",
                   "sha256": hashlib.sha256(lora3.read_bytes()).hexdigest()}
            await patch(api, f"{LLMS}/{NAME}", {"spec": {"adapters": [
                _pvc("one", "one.gguf", 1.0), _pvc("org/two", "two.gguf"),
                {"name": "web", "source": {"url": url}}]}})
            obj = await _status_where(api, lambda o: _ready(o) == "RollingOut")
            assert obj["status"]["adapters"] == [{"pod": "chat-0", "adapters": ["one", "org/two"],
                                                  "awaitingRollout": ["web"]}]
            dep = await get(api, DEPLOYMENT)
            (init,) = dep["spec"]["template"]["spec"]["initContainers"]
            assert init["command"][:2] == ["llamafleet", "fetch"]
            assert not list(volumes["fetched"].iterdir())
            await kubelet.start("chat-1")  # runs the init container: the real fetch
            assert (volumes["fetched"] / f"{init['name'].removeprefix('fetch-adapter-')}.gguf"
                    ).read_bytes() == lora3.read_bytes()
            await kubelet.stop("chat-0")
            obj = await _status_where(api, lambda o: _ready(o) == "Loaded")
            assert _held(obj) == {"chat-1": ["one", "org/two", "web"]}
            assert kubelet.complete("chat-1", "web") == 200

            # Removing one unloads it at run time.
            await patch(api, f"{LLMS}/{NAME}", {"spec": {"adapters": [
                _pvc("one", "one.gguf", 1.0), {"name": "web", "source": {"url": url}}]}})
            obj = await _status_where(api, lambda o: _held(o) == {"chat-1": ["one", "web"]}
                                      and _ready(o) == "Loaded")
            assert set(kubelet.cards("chat-1")) == {"one", "web"}
            assert kubelet.complete("chat-1", "org/two") == 404

            # A file the pod refuses is reported, and the others stay.
            await patch(api, f"{LLMS}/{NAME}", {"spec": {"adapters": [
                _pvc("one", "one.gguf", 1.0), {"name": "web", "source": {"url": url}},
                _pvc("gone", "missing.gguf")]}})
            obj = await _status_where(api, lambda o: _ready(o) == "AdapterError")
            (pod,) = obj["status"]["adapters"]
            assert pod["adapters"] == ["one", "web"]
            assert "load gone: 400 adapter_file_not_found" in pod["problems"][0]
            assert "chat-1: load gone" in condition(obj, "AdaptersReady")["message"]
            # A pod would not start with it: it leaves the start-up list.
            assert pod["refused"] == ["gone"]
            await wait_until(lambda: _config_map_without(api, "gone="))

            # No adapters at all: the ConfigMap goes, the pods unload theirs, the status clears.
            await patch(api, f"{LLMS}/{NAME}", {"spec": {"adapters": []}})
            obj = await _status_where(api, lambda o: not (o.get("status") or {}).get("adapters"))
            assert kubelet.cards("chat-1") == {}
            assert await get(api, CONFIG_MAP) is None
        assert runner.exception is None
    finally:
        await kubelet.close()
