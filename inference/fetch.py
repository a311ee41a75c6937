"""`llamafleet fetch`: download a model to a file, resuming, and verify its sha256.

The bytes go to ``<out>.part`` first. A download cut short (the connection dropped, the pod
killed) leaves the part file; the next attempt, in this process or a later one (the model
cache's Job retries in a new pod on the same volume), asks the server for the rest with an
HTTP ``Range`` request and appends it. A server that ignores ``Range`` (HTTP 200) gets a
fresh download. The sha256 covers the whole file, the resumed prefix included (hashed again
on resume); only a file whose sha256 matches is renamed to ``out`` (atomically), so a
reader never sees a partial or wrong file. A mismatch deletes the part file: it is not the
file wanted, and resuming it would never be.

Progress goes to a callback (bytes done, total or None), which the CLI prints as JSON lines
(:func:`progress_line`) that the operator reads back from the Job's pod log.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from llamafleet.common.contract import FETCH_PROGRESS_EVENT

from .model_packages import sha256_of

Progress = Callable[[int, "int | None"], None]


class FetchError(Exception):
    """The download did not succeed. ``permanent``: trying again cannot help (a wrong
    sha256, HTTP 4xx); otherwise it ran out of retries and a later attempt resumes."""

    def __init__(self, message: str, permanent: bool = True):
        super().__init__(message)
        self.permanent = permanent


class _Interrupted(Exception):
    """A download cut short: the part file holds what arrived; retrying resumes it."""


def progress_line(done: int, total: int | None) -> str:
    """One progress record, as the Job's log carries it to the operator."""
    return json.dumps({"event": FETCH_PROGRESS_EVENT, "bytes": done, "total": total})


def fetch(url: str, sha256: str, out: Path, timeout: float = 60.0, retries: int = 5,
          backoff: float = 1.0, progress: Progress | None = None) -> Path:
    """``out`` holding the file whose sha256 is ``sha256``, downloaded from ``url`` unless it
    is there already. A cut-short download is resumed up to ``retries`` times (waiting
    ``backoff`` seconds, doubled each time, at most 30 s); FetchError otherwise."""
    want = sha256.lower()
    if out.exists():
        if sha256_of(out) == want:
            if progress:
                size = out.stat().st_size
                progress(size, size)
            return out  # already there: a restarted init container, a reused cache entry
        out.unlink()  # not the file wanted (it was never renamed there by us)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    failures = 0
    while True:
        try:
            h = _download(url, part, timeout, progress)
            break
        except _Interrupted as e:
            failures += 1
            if failures > retries:
                raise FetchError(f"download of {url} failed {failures} times, the last: {e}; "
                                 f"{_size(part)} bytes kept in {part.name} for the next "
                                 "attempt", permanent=False) from None
            time.sleep(min(30.0, backoff * 2 ** (failures - 1)))
    got = h.hexdigest()
    if got != want:
        part.unlink(missing_ok=True)
        raise FetchError(f"sha256 mismatch for {url}: expected {want}, got {got}")
    os.replace(part, out)
    return out


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _download(url: str, part: Path, timeout: float, progress: Progress | None) -> Any:
    """Fetch what ``part`` lacks; the sha256 of the whole file so far (a hashlib object)."""
    have = _size(part)
    headers = {"Range": f"bytes={have}-"} if have else {}
    h = hashlib.sha256()
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True,
                          timeout=timeout) as r:
            if r.status_code == 416 and have:
                # Nothing left past `have`: the part is complete when its size is the file's.
                total = _range_total(r.headers.get("content-range"))
                if total == have:
                    with part.open("rb") as f:
                        h = hashlib.file_digest(f, "sha256")
                    if progress:
                        progress(have, total)
                    return h
                part.unlink()
                raise _Interrupted(f"HTTP 416 for a {have}-byte part of a {total}-byte file; "
                                   "starting again")
            if r.status_code >= 500 or r.status_code == 429:
                raise _Interrupted(f"GET {url} answered HTTP {r.status_code}")
            if r.status_code == 206 and have:
                start = _range_start(r.headers.get("content-range"))
                if start != have:
                    part.unlink()
                    raise _Interrupted(f"asked for bytes from {have}, got a range from {start}")
                with part.open("rb") as f:
                    h = hashlib.file_digest(f, "sha256")
                mode = "ab"
            elif r.status_code == 200:
                have, mode = 0, "wb"  # no Range support (or no part): from the start
            else:
                raise FetchError(f"GET {url} answered HTTP {r.status_code}")
            length = r.headers.get("content-length")
            total = have + int(length) if length is not None else None
            done, last = have, 0.0
            with part.open(mode) as f:
                for chunk in r.iter_bytes():  # as read: nothing held back on a drop
                    f.write(chunk)
                    h.update(chunk)
                    done += len(chunk)
                    if progress and time.monotonic() - last >= 1.0:
                        last = time.monotonic()
                        progress(done, total)
            if total is not None and done < total:
                raise _Interrupted(f"the connection closed after {done} of {total} bytes")
            if progress:
                progress(done, total)
            return h
    except httpx.HTTPError as e:
        raise _Interrupted(f"{type(e).__name__}: {e}") from e


def _range_start(content_range: str | None) -> int | None:
    """``bytes 100-199/200`` -> 100."""
    try:
        return int((content_range or "").split()[1].split("-")[0])
    except (IndexError, ValueError):
        return None


def _range_total(content_range: str | None) -> int | None:
    """``bytes */200`` or ``bytes 100-199/200`` -> 200."""
    try:
        return int((content_range or "").rsplit("/", 1)[1])
    except (IndexError, ValueError):
        return None
