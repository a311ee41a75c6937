"""Tenants: API keys that name tenants, each with an optional priority and optional limits,
read from one file (a Secret mounted as a volume) and reloaded when it changes.

The pod (``llamafleet serve``) and the router read the same file. The file (YAML or JSON)::

    keys:
      - key: sk-team-a-1            # or sha256: <64 hex digits of the key's SHA-256>
        tenant: team-a
        priority: 0                 # optional, default 0; higher first at admission
        limits:                     # optional, each optional; the tenant's, shared by its keys
          requestsPerSecond: 5      # > 0, bursts of up to one second's worth (at least 1)
          tokensPerMinute: 20000    # prompt + completion tokens, > 0
          concurrentRequests: 4     # >= 1
        allowObjectiveHeader:       # optional: x-gateway-inference-objective -> priority
          critical: 10
          sheddable: -1

Keys are looked up by their SHA-256 and compared with ``hmac.compare_digest``; neither a key
nor its hash is ever logged. A tenant's keys must give the same ``limits`` (a rotated key is
a second entry of the same tenant: both work until the old one is removed). A malformed file
is refused whole with a message naming the entry and the field: at start-up the process does
not start; on a reload the last good configuration stays in force and the error is logged.

Limits are counted per tenant: requests per second and tokens per minute as token buckets,
concurrent requests as a count. A tokens-per-minute budget is charged with the prompt's
tokens at admission and the completion's as the answer ends; a request is admitted while the
budget is not in debt, so it is exceeded by at most one request's tokens."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import math
import re
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import AfterValidator

from .errors import RateLimited

log = logging.getLogger(__name__)

# Request headers.
OBJECTIVE_HEADER = "x-gateway-inference-objective"  # the Gateway API Inference Extension's
TENANT_HEADER = "x-llamafleet-tenant"  # router -> pod (trusted only with the pods' API key)
PRIORITY_HEADER = "x-llamafleet-priority"  # router -> pod (likewise)
USAGE_TRAILER_HEADER = "x-llamafleet-usage-trailer"  # router -> pod: "1" = end SSE with usage
# Answer header of a whole (non-streamed) answer, and the SSE comment that ends a stream when
# the router asks (USAGE_TRAILER_HEADER): "<prompt tokens> <completion tokens>". SSE clients
# ignore comment lines; the router removes it anyway.
USAGE_HEADER = "x-llamafleet-usage"
USAGE_COMMENT = b": llamafleet-usage "

# Metric label values for callers that are no configured tenant (bounded cardinality).
NO_TENANT_LABEL = "-"  # no tenant: no tenants file, the pods' own API key, no key at all
UNKNOWN_TENANT_LABEL = "_unknown"  # a tenant name the configuration does not hold

# Rejection reasons (metrics' ``reason`` label, and the 429's message).
REQUESTS_PER_SECOND, TOKENS_PER_MINUTE, CONCURRENT_REQUESTS = (
    "requests_per_second", "tokens_per_minute", "concurrent_requests")

RELOAD_INTERVAL_S = 1.0  # the file is read at most this often
_TENANT_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,62})$")
_OBJECTIVE_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,252})$")
PRIORITY_RANGE = (-1000, 1000)


class TenantConfigError(ValueError):
    """The tenants file is malformed; the message says where (never a key)."""


@dataclass(frozen=True)
class Limits:
    requests_per_second: float | None = None
    tokens_per_minute: int | None = None
    concurrent_requests: int | None = None


@dataclass(frozen=True)
class KeyEntry:
    digest: bytes  # SHA-256 of the key
    tenant: str
    priority: int = 0
    objectives: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class TenantConfig:
    keys: Mapping[bytes, KeyEntry]  # SHA-256 digest of the key -> entry
    limits: Mapping[str, Limits]  # tenant -> its limits

    def lookup(self, key: str | bytes) -> KeyEntry | None:
        raw = key.encode("latin-1") if isinstance(key, str) else key
        digest = hashlib.sha256(raw).digest()
        entry = self.keys.get(digest)
        if entry is None:
            return None
        # The dict found it by the digest; compare in constant time all the same.
        return entry if hmac.compare_digest(entry.digest, digest) else None


_LIMIT_FIELDS = {"requestsPerSecond": "requests_per_second", "tokensPerMinute": "tokens_per_minute",
                 "concurrentRequests": "concurrent_requests"}
_KEY_FIELDS = {"key", "sha256", "tenant", "priority", "limits", "allowObjectiveHeader"}


def _number(value: Any, where: str, *, integer: bool, minimum: float, strict: bool) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or \
            (integer and not float(value).is_integer()) or not math.isfinite(value):
        raise TenantConfigError(f"{where}: must be {'an integer' if integer else 'a number'}, "
                                f"got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise TenantConfigError(f"{where}: must be {'>' if strict else '>='} {minimum:g}, "
                                f"got {value!r}")
    return int(value) if integer else float(value)


def _priority(value: Any, where: str) -> int:
    lo, hi = PRIORITY_RANGE
    p = _number(value, where, integer=True, minimum=lo, strict=False)
    if p > hi:
        raise TenantConfigError(f"{where}: must be <= {hi}, got {value!r}")
    return p


def parse(text: str) -> TenantConfig:
    """The configuration in ``text``; TenantConfigError naming the entry and field."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise TenantConfigError(f"not valid YAML or JSON{where}") from None
    if doc is None:
        doc = {}
    if not isinstance(doc, dict) or set(doc) - {"keys"}:
        raise TenantConfigError("the file must be a mapping with one field, 'keys' (a list)")
    entries = doc.get("keys") or []
    if not isinstance(entries, list):
        raise TenantConfigError("keys: must be a list")
    keys: dict[bytes, KeyEntry] = {}
    limits: dict[str, Limits] = {}
    for i, e in enumerate(entries):
        at = f"keys[{i}]"
        if not isinstance(e, dict):
            raise TenantConfigError(f"{at}: must be a mapping")
        if unknown := sorted(set(map(str, e)) - _KEY_FIELDS):
            raise TenantConfigError(f"{at}: unknown field(s) {unknown}; known: {sorted(_KEY_FIELDS)}")
        tenant = e.get("tenant")
        if not isinstance(tenant, str) or not _TENANT_NAME.match(tenant):
            raise TenantConfigError(f"{at}.tenant: a name of 1-63 letters, digits, '.', '_' or "
                                    "'-', starting with a letter or digit")
        at = f"{at} (tenant {tenant})"
        if ("key" in e) == ("sha256" in e):
            raise TenantConfigError(f"{at}: give exactly one of 'key' and 'sha256'")
        if "key" in e:
            key = e["key"]
            if not isinstance(key, str) or not key or key != key.strip() or \
                    any(ord(c) < 0x21 or ord(c) > 0xFF for c in key):
                raise TenantConfigError(f"{at}.key: a non-empty string of printable Latin-1 "
                                        "characters without spaces")
            digest = hashlib.sha256(key.encode("latin-1")).digest()
        else:
            h = e["sha256"]
            if not isinstance(h, str) or not re.fullmatch(r"[0-9a-fA-F]{64}", h):
                raise TenantConfigError(f"{at}.sha256: 64 hexadecimal digits")
            digest = bytes.fromhex(h)
        if digest in keys:
            raise TenantConfigError(f"{at}: the same key is given twice")
        priority = _priority(e.get("priority", 0), f"{at}.priority")
        objectives: dict[str, int] = {}
        allowed = e.get("allowObjectiveHeader")
        if allowed is not None:
            if not isinstance(allowed, dict):
                raise TenantConfigError(f"{at}.allowObjectiveHeader: a mapping of objective "
                                        "names to priorities")
            for name, p in allowed.items():
                if not isinstance(name, str) or not _OBJECTIVE_NAME.match(name):
                    raise TenantConfigError(f"{at}.allowObjectiveHeader: {name!r} is not an "
                                            "objective name")
                objectives[name] = _priority(p, f"{at}.allowObjectiveHeader.{name}")
        raw_limits = e.get("limits") or {}
        if not isinstance(raw_limits, dict):
            raise TenantConfigError(f"{at}.limits: a mapping")
        if unknown := sorted(set(map(str, raw_limits)) - set(_LIMIT_FIELDS)):
            raise TenantConfigError(f"{at}.limits: unknown field(s) {unknown}; known: "
                                    f"{sorted(_LIMIT_FIELDS)}")
        got = {}
        for name, attr in _LIMIT_FIELDS.items():
            if (v := raw_limits.get(name)) is not None:
                got[attr] = _number(v, f"{at}.limits.{name}",
                                    integer=attr != "requests_per_second",
                                    minimum=0 if attr == "requests_per_second" else 1,
                                    strict=attr == "requests_per_second")
        lim = Limits(**got)
        if tenant in limits and limits[tenant] != lim:
            raise TenantConfigError(f"{at}.limits: differ from those of another key of tenant "
                                    f"{tenant}; a tenant's keys share its limits, give the same")
        limits[tenant] = lim
        keys[digest] = KeyEntry(digest, tenant, priority, objectives)
    return TenantConfig(keys, limits)


class TenantFile:
    """The tenants file, re-read at most every RELOAD_INTERVAL_S when asked for: a changed
    content is parsed, and a malformed one is logged and ignored (the last good stays)."""

    def __init__(self, path: str | Path, interval: float = RELOAD_INTERVAL_S):
        self.path = Path(path)
        self.interval = interval
        self._lock = threading.Lock()
        text = self._read()  # OSError / TenantConfigError: the caller refuses to start
        self._hash = hashlib.sha256(text.encode()).digest()
        self._config = parse(text)
        self._checked = time.monotonic()
        self.reloads = 0
        self.errors = 0

    def _read(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def current(self) -> TenantConfig:
        now = time.monotonic()
        if now - self._checked < self.interval:
            return self._config
        with self._lock:
            if now - self._checked < self.interval:
                return self._config
            self._checked = now
            try:
                text = self._read()
            except (OSError, UnicodeDecodeError) as e:
                log.error("tenants file %s could not be read (%s); keeping the last good one",
                          self.path, type(e).__name__)
                return self._config
            digest = hashlib.sha256(text.encode()).digest()
            if digest == self._hash:
                return self._config
            self._hash = digest
            try:
                self._config = parse(text)
            except TenantConfigError as e:
                self.errors += 1
                log.error("tenants file %s is malformed: %s; keeping the last good one",
                          self.path, e)
                return self._config
            self.reloads += 1
            log.info("tenants file %s reloaded: %d keys, %d tenants", self.path,
                     len(self._config.keys), len(self._config.limits))
            return self._config


def load(path: str | Path) -> TenantFile:
    """The tenants file at start-up; ValueError with a message for the user when it cannot
    be read or is malformed (the process then does not start)."""
    try:
        return TenantFile(path)
    except OSError as e:
        raise ValueError(f"tenants file {path}: {e.strerror or e}") from None
    except TenantConfigError as e:
        raise ValueError(f"tenants file {path} is malformed: {e}") from None


def _checked(path: Path | None) -> Path | None:
    if path is not None:
        load(path)  # ValueError naming the entry and field: the process does not start
    return path


# A settings field: the pod's and the router's tenants file, read once at start to refuse a
# missing or malformed one before anything listens.
TenantsPath = Annotated[Path | None, AfterValidator(_checked)]


# --- the caller of one request ----------------------------------------------------------


@dataclass
class Caller:
    """Who sent a request: its tenant ("" = none), its priority, and its lease on the
    tenant's limits (None = nothing to count)."""

    tenant: str = ""
    priority: int = 0
    lease: Lease | None = None
    admin: bool = False  # the pods' own API key (API_KEY / the router's backend key)


def priority_of(entry: KeyEntry, objective: str | None) -> int:
    """The key's priority, or the one its ``allowObjectiveHeader`` maps the GIE objective
    header's value to (an objective it does not map leaves the key's)."""
    if objective and entry.objectives:
        return entry.objectives.get(objective.strip(), entry.priority)
    return entry.priority


def tenant_label(tenant: str, config: TenantConfig | None) -> str:
    """A metric label for ``tenant``: a configured name, else a fixed value."""
    if not tenant:
        return NO_TENANT_LABEL
    return tenant if config is not None and tenant in config.limits else UNKNOWN_TENANT_LABEL


# --- limits -----------------------------------------------------------------------------


class _Budget:
    def __init__(self) -> None:
        self.rps_level = 0.0
        self.rps_at = time.monotonic()
        self.rps_full = True
        self.tpm_level = 0.0
        self.tpm_at = time.monotonic()
        self.tpm_full = True
        self.in_flight = 0


class Lease:
    """One admitted request's hold on its tenant's budget: charge tokens, release at the end
    (idempotent)."""

    def __init__(self, limiter: Limiter, tenant: str):
        self.limiter, self.tenant = limiter, tenant
        self.charged = 0
        self._released = False

    def charge(self, tokens: int) -> None:
        if tokens:
            self.charged += tokens
            self.limiter._charge(self.tenant, tokens)

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.limiter._release(self.tenant)


class Limiter:
    """Every tenant's budgets (kept across reloads; a tenant's limits are read at each
    admission, so a changed limit applies to the next request)."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self._budgets: dict[str, _Budget] = {}
        self._limits: dict[str, Limits] = {}
        self._lock = threading.Lock()

    def _budget(self, tenant: str) -> _Budget:
        b = self._budgets.get(tenant)
        if b is None:
            b = self._budgets[tenant] = _Budget()
        return b

    def admit(self, tenant: str, limits: Limits) -> Lease:
        """A lease, or RateLimited (the first limit that refuses, with when to retry)."""
        with self._lock:
            self._limits[tenant] = limits
            b = self._budget(tenant)
            now = self.clock()
            rps, tpm, conc = limits.requests_per_second, limits.tokens_per_minute, \
                limits.concurrent_requests
            if rps is not None:
                cap = max(1.0, rps)
                b.rps_level = cap if b.rps_full else min(cap, b.rps_level + (now - b.rps_at) * rps)
                b.rps_full, b.rps_at = False, now
                if b.rps_level < 1.0:
                    wait = (1.0 - b.rps_level) / rps
                    raise RateLimited(
                        f"Rate limit reached for tenant {tenant}: {rps:g} requests per second. "
                        f"Retry after {math.ceil(wait)} s.", reason=REQUESTS_PER_SECOND,
                        retry_after_s=max(1, math.ceil(wait)))
            if tpm is not None:
                self._refill_tpm(b, tpm, now)
                if b.tpm_level < 0:  # in debt: refused until it is paid back
                    wait = -b.tpm_level / (tpm / 60.0)
                    raise RateLimited(
                        f"Rate limit reached for tenant {tenant}: {tpm} tokens per minute "
                        f"(prompt and completion). Retry after {math.ceil(wait)} s.",
                        reason=TOKENS_PER_MINUTE, retry_after_s=max(1, math.ceil(wait)))
            if conc is not None and b.in_flight >= conc:
                # No honest time can be known (it is when one of its requests ends): 1 s.
                raise RateLimited(
                    f"Rate limit reached for tenant {tenant}: {conc} concurrent requests. "
                    "Retry when one of them has finished.", reason=CONCURRENT_REQUESTS,
                    retry_after_s=1)
            if rps is not None:
                b.rps_level -= 1.0
            b.in_flight += 1
            return Lease(self, tenant)

    def _refill_tpm(self, b: _Budget, tpm: int, now: float) -> None:
        b.tpm_level = float(tpm) if b.tpm_full else \
            min(float(tpm), b.tpm_level + (now - b.tpm_at) * tpm / 60.0)
        b.tpm_full, b.tpm_at = False, now

    def _charge(self, tenant: str, tokens: int) -> None:
        with self._lock:
            lim = self._limits.get(tenant)
            if lim is None or lim.tokens_per_minute is None:
                return
            b = self._budget(tenant)
            self._refill_tpm(b, lim.tokens_per_minute, self.clock())
            b.tpm_level -= tokens

    def _release(self, tenant: str) -> None:
        with self._lock:
            b = self._budgets.get(tenant)
            if b is not None:
                b.in_flight = max(0, b.in_flight - 1)

    def tokens_left(self, tenant: str) -> float | None:
        """The tenant's tokens-per-minute budget now (None without that limit)."""
        with self._lock:
            lim = self._limits.get(tenant)
            if lim is None or lim.tokens_per_minute is None:
                return None
            b = self._budget(tenant)
            self._refill_tpm(b, lim.tokens_per_minute, self.clock())
            return b.tpm_level


def bearer_token(authorization: str) -> str | None:
    scheme, _, token = authorization.partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None


def parse_usage(value: str | bytes) -> tuple[int, int] | None:
    """(prompt, completion) tokens of a USAGE_HEADER value or USAGE_COMMENT payload
    ("<prompt> <completion>"); None when it is not one."""
    with contextlib.suppress(ValueError, UnicodeDecodeError):
        text = value.decode("ascii") if isinstance(value, bytes) else value
        parts = [int(p) for p in text.split()]
        if len(parts) == 2 and min(parts) >= 0:
            return parts[0], parts[1]
    return None
