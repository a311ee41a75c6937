"""Tenants at the router (common.tenants): who a request is, its admission by the tenant's
limits, and the tokens its answer cost, read from what the replica reports."""

from __future__ import annotations

from dataclasses import dataclass

from llamafleet.common import tenants as T

# Request headers a client may not set when the router names the tenant itself.
ROUTER_SET = {T.TENANT_HEADER.encode(), T.PRIORITY_HEADER.encode(),
              T.USAGE_TRAILER_HEADER.encode(), b"authorization", b"x-api-key"}
# Paths whose caller the pods check themselves with their own key (never a tenant's).
ADMIN_PATHS = ("/info", "/metrics", "/v1/adapters")
# A generous first charge per body byte, corrected by the replica's count at the end.
BYTES_PER_TOKEN = 4


def client_key(headers) -> str | None:
    """The key a client presented: ``Authorization: Bearer`` or Anthropic's ``x-api-key``."""
    key = headers.get("x-api-key")
    if key is not None:
        return key.strip()
    return T.bearer_token(headers.get("authorization", ""))


@dataclass
class Charge:
    """What one request has been charged so far (its prompt's estimate at first)."""

    lease: T.Lease | None
    tenant_label: str
    estimate: int = 0
    done: bool = False


class UsageTrailer:
    """Removes the pod's usage comment (common.tenants.USAGE_COMMENT, sent last on a stream
    when the router asks) from an SSE body as it passes, and reads it. Only the bytes that
    may begin that comment are held back, until the next chunk shows whether they do."""

    MARK = T.USAGE_COMMENT  # at the start of a line

    def __init__(self) -> None:
        self.pending = b""
        self.before = b"\n"  # the byte before ``pending``: the last one passed on
        self.trailer: bytes | None = None  # the comment's payload, once complete

    def _line_start(self, data: bytes, at: int) -> bool:
        return (data[at - 1:at] if at else self.before) == b"\n"

    def feed(self, chunk: bytes) -> bytes:
        if self.trailer is not None:
            self.trailer += chunk
            return b""
        data = self.pending + chunk
        self.pending = b""
        at = data.find(self.MARK)
        while at >= 0 and not self._line_start(data, at):
            at = data.find(self.MARK, at + 1)
        if at >= 0:
            self.trailer = data[at + len(self.MARK):]
            return data[:at]
        for k in range(min(len(self.MARK) - 1, len(data)), 0, -1):
            if data.endswith(self.MARK[:k]) and self._line_start(data, len(data) - k):
                self.pending = data[-k:]
                data = data[:-k]
                break
        if data:
            self.before = data[-1:]
        return data

    def flush(self) -> bytes:
        out, self.pending = self.pending, b""
        return out

    def usage(self) -> tuple[int, int] | None:
        if self.trailer is None:
            return None
        return T.parse_usage(self.trailer.split(b"\n", 1)[0])
