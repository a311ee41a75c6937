"""Debian's chromium through Playwright for Python, by executable path: no browser is
downloaded (`scripts/system-deps.sh` installs chromium). The `browser` fixture in
tests/conftest.py opens one per test module."""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless in a container: no sandbox, no GPU, and nothing that reaches the network by itself.
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]


@contextlib.contextmanager
def launch_chromium() -> Iterator:
    """A headless chromium (a Playwright ``Browser``), closed on exit; fails the test, with
    what to run, where chromium is not installed."""
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        pytest.fail("chromium is not installed: run scripts/system-deps.sh")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            yield b
        finally:
            b.close()
