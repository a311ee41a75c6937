"""`llamafleet bench` against a live server: the table with its ratios, the JSON record,
the interleaved --compare run, and clear errors for bad options. (Speed itself is judged
by benchmarks/, not here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llamafleet.inference.cli", "bench", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


def test_bench_prints_ratios_and_writes_json(server, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = _bench("--url", server.url, "--compare", server.url, "--concurrent", "1,2",
               "--requests", "2", "--max-tokens", "8", "--json", str(out))
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.startswith("server"))
    assert "vs c1" in header and "vs target" in header
    rows = [line.split() for line in lines if line.startswith(("target", "compare"))]
    assert [(row[0], row[1]) for row in rows] == [
        ("target", "1"), ("compare", "1"), ("target", "2"), ("compare", "2")]
    assert all(row[-2].endswith("x") and row[-1].endswith("x") for row in rows), rows
    assert rows[0][-2] == "1.00x"  # concurrency 1 is its own reference

    record = json.loads(out.read_text())
    assert record["commit"] and record["machine"]["cores"] >= 1
    assert "+llamafleet." in record["llama_cpp_python"]
    assert record["settings"]["concurrent"] == [1, 2] and record["settings"]["ignore_eos"]
    for level in record["results"]:
        assert level["completed"] == level["requests"] == 2 and level["failed"] == 0, level
        assert level["completion_tokens"] == 2 * 8  # ignore_eos: exact lengths


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrent", "0"], "--concurrent needs positive integers"),
    (["--concurrent", "four"], "--concurrent needs positive integers"),
    (["--requests", "-1"], "--requests must be >= 0"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
])
def test_bench_rejects_bad_options(args: list[str], message: str) -> None:
    r = _bench("--url", "http://127.0.0.1:9", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_bench_reports_an_unreachable_server() -> None:
    r = _bench("--url", "http://127.0.0.1:9", "--concurrent", "1")
    assert r.returncode == 1 and "cannot reach the server" in r.stderr, r.stderr
