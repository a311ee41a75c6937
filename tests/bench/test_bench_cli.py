"""`llamafleet bench` against a live server: the table with its ratios, the JSON record,
the interleaved --compare run, load spread over client processes, the --self-test against
the no-op server, and clear errors for bad options. (Speed itself is judged by
benchmarks/, not here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "llamafleet.common.cli", "bench", *args]
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


def test_bench_spreads_streams_over_processes(server, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    r = _bench("--url", server.url, "--concurrent", "3", "--requests", "5", "--max-tokens", "4",
               "--processes", "2", "--seed", "7", "--json", str(out))
    assert r.returncode == 0, r.stderr
    record = json.loads(out.read_text())
    assert record["settings"]["processes"] == "2"
    (level,) = record["results"]
    # every request ran once, in one of the two processes, with exact lengths
    assert level["processes"] == 2 and level["completed"] == level["requests"] == 5, level
    assert level["completion_tokens"] == 5 * 4 and level["wall_s"] > 0
    assert level["ttft_p50_s"] is not None and level["itl_p50_s"] is not None


def test_bench_self_test_measures_the_client_against_a_noop_server(tmp_path: Path) -> None:
    out = tmp_path / "self.json"
    r = _bench("--self-test", "--concurrent", "4", "--requests", "8", "--max-tokens", "50",
               "--processes", "2", "--json", str(out))
    assert r.returncode == 0, r.stderr
    assert "client ceiling at 4 streams:" in r.stdout and "with 2" in r.stdout, r.stdout
    record = json.loads(out.read_text())
    assert record["settings"]["self_test"] and record["settings"]["models"]
    one, many = record["results"]
    assert (one["server"], one["processes"]) == ("client-1p", 1)
    assert (many["server"], many["processes"]) == ("client-Np", 2)
    for level in (one, many):
        assert level["completed"] == 8 and level["completion_tokens"] == 8 * 50, level
        assert level["tokens_per_s"] > 0


def test_processes_auto_follows_streams_and_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    from llamafleet.bench import load as bench

    monkeypatch.setattr(bench.os, "cpu_count", lambda: 16)
    assert [bench.processes_for(c, None) for c in (1, 4, 16, 64, 128)] == [1, 1, 2, 8, 8]
    assert bench.processes_for(4, 6) == 4  # never more processes than streams
    monkeypatch.setattr(bench.os, "cpu_count", lambda: 2)
    assert bench.processes_for(64, None) == 1


@pytest.mark.parametrize(("args", "message"), [
    (["--concurrent", "0"], "--concurrent needs positive integers"),
    (["--concurrent", "four"], "--concurrent needs positive integers"),
    (["--requests", "-1"], "--requests must be >= 0"),
    (["--max-tokens", "0"], "--max-tokens must be >= 1"),
    (["--processes", "0"], "--processes needs 'auto' or an integer >= 1"),
    (["--processes", "many"], "--processes needs 'auto' or an integer >= 1"),
    (["--self-test", "--compare", "http://127.0.0.1:9"], "--self-test runs its own server"),
])
def test_bench_rejects_bad_options(args: list[str], message: str) -> None:
    r = _bench("--url", "http://127.0.0.1:9", *args)
    assert r.returncode == 2 and message in r.stderr, r.stderr


def test_bench_reports_an_unreachable_server() -> None:
    r = _bench("--url", "http://127.0.0.1:9", "--concurrent", "1")
    assert r.returncode == 1 and "cannot reach the server" in r.stderr, r.stderr
