"""`llamafleet fetch` against a real HTTP server on loopback."""

from __future__ import annotations

import hashlib
import http.server
import threading
from functools import partial

import pytest
from llamafleet.inference.fetch import FetchError, fetch


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
    with pytest.raises(FetchError, match="HTTP 404"):
        fetch(f"{base}/missing.gguf", good, tmp / "out" / "x.gguf")
