"""A real Prometheus on loopback: Debian's `prometheus` binary (scripts/system-deps.sh installs
the package; its service is never started), run with a temporary config and TSDB folder on a
free port, scraping static targets every second. Queries go through its HTTP API.

    prom = start_prometheus(tmp_path, [scrape_job("pod", "127.0.0.1:9100", {"pod": "a"})])
    prom.wait_for("sum(up) == 1")
    prom.query("rate(llamafleet_prompt_tokens_total[1m])")
    prom.stop()
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.servers import free_port, wait_until


def scrape_job(name: str, target: str, labels: dict[str, str], path: str = "/metrics",
               honor_labels: bool = False) -> dict[str, Any]:
    """One scrape config: ``target`` (host:port) with ``labels`` added to every series, as a
    PodMonitor adds its target labels (namespace, pod, app_kubernetes_io_instance, ...)."""
    return {"job_name": name, "metrics_path": path, "honor_labels": honor_labels,
            "static_configs": [{"targets": [target], "labels": labels}]}


@dataclass
class Prometheus:
    proc: subprocess.Popen
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def api(self, path: str, **params: Any) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=30)
        body = r.json()
        if body.get("status") != "success":
            raise AssertionError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (a scalar comes back as a one-sample vector)."""
        data = self.api("query", query=expr)
        if data["resultType"] == "scalar":
            return [{"metric": {}, "value": data["result"]}]
        return data["result"]

    def value(self, expr: str) -> float | None:
        """The sum of an instant query's samples; None when it returns nothing."""
        result = self.query(expr)
        return sum(float(s["value"][1]) for s in result) if result else None

    def label_values(self, label: str, match: str) -> list[str]:
        return self.api(f"label/{label}/values", **{"match[]": match})

    def wait_for(self, expr: str, timeout: float = 60) -> list[dict]:
        """Poll until ``expr`` returns something (a comparison such as `x >= 3` filters)."""
        return wait_until(lambda: self.query(expr), timeout=timeout)

    def stop(self) -> str:
        self.proc.terminate()
        try:
            return self.proc.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.communicate()[0]


def start_prometheus(folder: Path, jobs: list[dict[str, Any]], interval: str = "1s") -> Prometheus:
    """Prometheus scraping ``jobs`` every ``interval``, once its /-/ready answers."""
    binary = shutil.which("prometheus")
    if binary is None:
        raise AssertionError("prometheus is missing: run scripts/system-deps.sh (Debian's package)")
    folder.mkdir(parents=True, exist_ok=True)
    config = folder / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": interval, "scrape_timeout": interval,
                   "evaluation_interval": interval},
        "scrape_configs": jobs}))
    port = free_port()
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    prom = Prometheus(proc, port)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"prometheus exited {proc.returncode}: {proc.stdout.read()[-3000:]}")
        try:
            return httpx.get(f"{prom.url}/-/ready", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, timeout=60)
    return prom
