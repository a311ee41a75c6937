"""Versions of the installed distributions, read from their metadata (never by importing
them: llama_cpp loads its shared libraries when imported)."""

from __future__ import annotations


def llama_cpp_python_version() -> str | None:
    """e.g. ``0.3.36+llamafleet.5aa057bc``: the local label names the llama.cpp patches built in
    (scripts/build-llama-cpp-python.sh)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        return None
