"""`llamafleet fetch` against real HTTP servers on loopback: resume with Range, sha256, progress."""

from __future__ import annotations

import hashlib
import http.server
import json
import subprocess
import sys
import threading
from functools import partial

import pytest
from llamafleet.common.contract import FETCH_EXIT_PERMANENT, FETCH_PROGRESS_EVENT
from llamafleet.inference.fetch import FetchError, fetch

BODY = b"GGUF" + bytes(range(256)) * 400  # 102,404 bytes
SHA = hashlib.sha256(BODY).hexdigest()


@pytest.fixture()
def files(tmp_path):
    (tmp_path / "srv").mkdir()
    (tmp_path / "srv" / "m.gguf").write_bytes(b"GGUF" + b"x" * 5000)
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "srv"))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    t = threading.Thread(target=httpd.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", tmp_path
    httpd.shutdown()


def test_fetch_verifies_sha256(files) -> None:
    base, tmp = files
    good = hashlib.sha256(b"GGUF" + b"x" * 5000).hexdigest()
    out = fetch(f"{base}/m.gguf", good, tmp / "out" / "model.gguf")
    assert out.read_bytes().startswith(b"GGUF")
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(f"{base}/m.gguf", "0" * 64, tmp / "out" / "other.gguf")
    assert not (tmp / "out" / "other.gguf").exists()
    assert not (tmp / "out" / "other.gguf.part").exists()  # a wrong file is not resumed
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{base}/missing.gguf", good, tmp / "out" / "x.gguf")


class RangeServer:
    """Serves BODY with Range support. ``drop_after``: each of the first ``drops`` answers
    closes the connection after that many body bytes (Content-Length promised more);
    ``ranges`` False ignores Range (answers 200 with the whole file)."""

    def __init__(self, drop_after: int | None = None, drops: int = 0, ranges: bool = True):
        self.drop_after, self.drops, self.ranges = drop_after, drops, ranges
        self.requests: list[str | None] = []  # the Range header of each GET
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_GET(self) -> None:
                asked = self.headers.get("Range")
                server.requests.append(asked)
                start = int(asked.removeprefix("bytes=").split("-")[0]) if asked and \
                    server.ranges else 0
                if start >= len(BODY):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(BODY)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                rest = BODY[start:]
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range",
                                     f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
                self.send_header("Content-Length", str(len(rest)))
                self.end_headers()
                if server.drops > 0 and server.drop_after is not None:
                    server.drops -= 1
                    self.wfile.write(rest[:server.drop_after])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(rest)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/model.gguf"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def serve():
    servers: list[RangeServer] = []

    def start(**kw) -> RangeServer:
        servers.append(RangeServer(**kw))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


def test_a_dropped_connection_resumes_with_range_and_the_file_checks(serve, tmp_path) -> None:
    srv = serve(drop_after=30_000, drops=2)
    seen: list[tuple[int, int | None]] = []
    out = fetch(srv.url, SHA, tmp_path / "c" / f"{SHA}.gguf", backoff=0,
                progress=lambda d, t: seen.append((d, t)))
    assert out.read_bytes() == BODY
    # Two cut-short answers, each resumed where the part file ended.
    assert srv.requests == [None, "bytes=30000-", "bytes=60000-"]
    assert not out.with_name(out.name + ".part").exists()
    assert seen[-1] == (len(BODY), len(BODY))


def test_a_part_left_by_an_earlier_process_is_resumed(serve, tmp_path) -> None:
    out = tmp_path / f"{SHA}.gguf"
    out.with_name(out.name + ".part").write_bytes(BODY[:40_000])  # a pod killed mid-way
    srv = serve()
    fetch(srv.url, SHA, out)
    assert srv.requests == ["bytes=40000-"]
    assert out.read_bytes() == BODY


def test_a_complete_part_gets_416_and_is_kept(serve, tmp_path) -> None:
    out = tmp_path / f"{SHA}.gguf"
    out.with_name(out.name + ".part").write_bytes(BODY)  # killed before the rename
    srv = serve()
    fetch(srv.url, SHA, out)
    assert srv.requests == [f"bytes={len(BODY)}-"]
    assert out.read_bytes() == BODY


def test_a_server_without_range_support_restarts_from_zero(serve, tmp_path) -> None:
    out = tmp_path / f"{SHA}.gguf"
    out.with_name(out.name + ".part").write_bytes(b"junk" * 1000)
    srv = serve(ranges=False)
    fetch(srv.url, SHA, out)
    assert out.read_bytes() == BODY  # the part was overwritten, not appended to


def test_a_wrong_sha256_after_a_resume_deletes_the_part(serve, tmp_path) -> None:
    out = tmp_path / "x.gguf"
    out.with_name(out.name + ".part").write_bytes(b"Z" * 40_000)  # not BODY's prefix
    srv = serve()
    with pytest.raises(FetchError, match="sha256 mismatch"):
        fetch(srv.url, SHA, out)
    assert srv.requests == ["bytes=40000-"]
    assert not out.exists() and not out.with_name(out.name + ".part").exists()


def test_out_of_retries_keeps_the_part_for_the_next_attempt(serve, tmp_path) -> None:
    srv = serve(drop_after=10_000, drops=10)
    out = tmp_path / f"{SHA}.gguf"
    with pytest.raises(FetchError, match="failed 2 times") as failed:
        fetch(srv.url, SHA, out, retries=1, backoff=0)
    assert not failed.value.permanent  # the cache Job retries it in a new pod
    assert out.with_name(out.name + ".part").stat().st_size == 20_000
    srv.drops = 0
    fetch(srv.url, SHA, out)  # the next attempt (the Job's next pod) finishes it
    assert srv.requests[-1] == "bytes=20000-" and out.read_bytes() == BODY


def test_an_existing_file_is_not_downloaded_again(serve, tmp_path) -> None:
    out = tmp_path / f"{SHA}.gguf"
    out.write_bytes(BODY)
    srv = serve()
    fetch(srv.url, SHA, out)
    assert srv.requests == []


def test_the_cli_prints_progress_lines_and_says_why_it_failed(serve, tmp_path) -> None:
    srv = serve(drop_after=50_000, drops=1)
    cmd = [sys.executable, "-m", "llamafleet.common.cli", "fetch", "--url", srv.url,
           "--sha256", SHA, "--out", str(tmp_path / "m.gguf")]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert all(rec["event"] == FETCH_PROGRESS_EVENT for rec in lines)
    assert lines[-1] == {"event": FETCH_PROGRESS_EVENT, "bytes": len(BODY), "total": len(BODY)}
    bad = subprocess.run([*cmd[:-3], "0" * 64, "--out", str(tmp_path / "n.gguf")],
                         capture_output=True, text=True, timeout=120)
    # Exit 2: the cache Job's podFailurePolicy fails the Job at once (no retry can help).
    assert bad.returncode == FETCH_EXIT_PERMANENT and "sha256 mismatch" in bad.stderr
