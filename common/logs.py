"""Structured logs: JSON lines in production, readable lines on a console.

The JSON formatter is a dozen lines over the standard library, so we keep it here
rather than add a dependency; it puts every `extra=` field at the top level.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime

_STD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-([0-9a-f]{32})-[0-9a-f]{16}-[0-9a-f]{2}$")


def _extras(record: logging.LogRecord) -> dict:
    return {k: v for k, v in record.__dict__.items() if k not in _STD and not k.startswith("_")}


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
            **_extras(record),
        }
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def _console_value(v: object) -> str:
    """A field's value on one console line: quoted and escaped (JSON string syntax) when it
    holds anything but printable characters without spaces, so a client's value (``user``,
    a request id) can never end the line and forge another, nor fake a ``key=value``."""
    text = str(v)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text)


class ConsoleFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extras = _extras(record)
        if extras:
            line += " " + " ".join(f"{k}={_console_value(v)}" for k, v in extras.items()
                                   if v is not None)
        return line


def configure(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if fmt == "json" else ConsoleFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "kopf"):
        lg = logging.getLogger(name)
        lg.handlers[:] = []
        lg.propagate = True
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)


def request_id_from_headers(headers: Mapping[str, str]) -> str:
    """x-request-id, else the trace id of a W3C traceparent, else a new id."""
    rid = headers.get("x-request-id")
    if rid:
        return rid[:128]
    tp = headers.get("traceparent", "")
    m = _TRACEPARENT.match(tp.strip().lower())
    if m:
        return m.group(1)
    return uuid.uuid4().hex
