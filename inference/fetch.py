"""`llamafleet fetch`: download a model to a file and verify its sha256 (atomic rename)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import httpx

from .model_packages import sha256_of


class FetchError(Exception):
    pass


def fetch(url: str, sha256: str, out: Path, timeout: float = 60.0) -> Path:
    want = sha256.lower()
    if out.exists() and sha256_of(out) == want:
        return out  # already there (restarted init container)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_suffix(out.suffix + ".part")
    h = hashlib.sha256()
    try:
        with httpx.stream("GET", url, follow_redirects=True, timeout=timeout) as r:
            if r.status_code != 200:
                raise FetchError(f"GET {url} answered HTTP {r.status_code}")
            with part.open("wb") as f:
                for chunk in r.iter_bytes(1 << 20):
                    h.update(chunk)
                    f.write(chunk)
    except httpx.HTTPError as e:
        part.unlink(missing_ok=True)
        raise FetchError(f"download of {url} failed: {e}") from e
    got = h.hexdigest()
    if got != want:
        part.unlink(missing_ok=True)
        raise FetchError(f"sha256 mismatch for {url}: expected {want}, got {got}")
    os.replace(part, out)
    return out



