"""The tenants file (common.tenants): parsing, clear refusals, reloads on a real file rewrite,
and the limits' arithmetic (an honest Retry-After)."""

from __future__ import annotations

import hashlib
import logging
import os

import pytest
from llamafleet.common import tenants as T
from llamafleet.common.errors import RateLimited, http_error

GOOD = """
keys:
  - key: sk-a-1
    tenant: team-a
    priority: 2
    limits: {requestsPerSecond: 2, tokensPerMinute: 600, concurrentRequests: 1}
    allowObjectiveHeader: {critical: 9, sheddable: -1}
  - sha256: SHA
    tenant: team-b
""".replace("SHA", hashlib.sha256(b"sk-b-1").hexdigest())


def test_keys_name_tenants_with_priority_limits_and_objectives() -> None:
    c = T.parse(GOOD)
    a = c.lookup("sk-a-1")
    assert a is not None and a.tenant == "team-a" and a.priority == 2
    assert c.limits["team-a"] == T.Limits(2.0, 600, 1)
    assert T.priority_of(a, "critical") == 9 and T.priority_of(a, "unknown") == 2
    assert T.priority_of(a, None) == 2
    b = c.lookup(b"sk-b-1")
    assert b is not None and b.tenant == "team-b" and c.limits["team-b"] == T.Limits()
    assert T.priority_of(b, "critical") == 0  # no allowObjectiveHeader: the header is ignored
    assert c.lookup("sk-a-2") is None and c.lookup("") is None
    assert T.tenant_label("team-a", c) == "team-a"
    assert T.tenant_label("nobody", c) == T.UNKNOWN_TENANT_LABEL
    assert T.tenant_label("", c) == T.NO_TENANT_LABEL


@pytest.mark.parametrize("text, says", [
    ("keys: [{key: k, tenant: a, limits: {tokensPerMinute: -5}}]",
     "keys[0] (tenant a).limits.tokensPerMinute: must be >= 1"),
    ("keys: [{key: k, tenant: a, limits: {requestsPerSecond: 0}}]", "requestsPerSecond: must be > 0"),
    ("keys: [{key: k, tenant: a, limits: {concurrentRequests: 1.5}}]",
     "concurrentRequests: must be an integer"),
    ("keys: [{key: k, tenant: a, limits: {burst: 3}}]", "unknown field(s) ['burst']"),
    ("keys: [{key: k}]", "keys[0].tenant"),
    ("keys: [{tenant: a}]", "exactly one of 'key' and 'sha256'"),
    ("keys: [{tenant: a, sha256: abc}]", "sha256: 64 hexadecimal digits"),
    ("keys: [{key: k, tenant: a}, {key: k, tenant: b}]", "keys[1] (tenant b): the same key is given twice"),
    ("keys: [{key: k, tenant: a, limits: {tokensPerMinute: 5}}, {key: j, tenant: a}]",
     "a tenant's keys share its limits"),
    ("keys: [{key: k, tenant: a, priority: high}]", "priority: must be an integer"),
    ("keys: [{key: k, tenant: a, allowObjectiveHeader: [x]}]", "allowObjectiveHeader: a mapping"),
    ("keys: {a: b}", "keys: must be a list"),
    ("users: []", "one field, 'keys'"),
    ("keys: [", "not valid YAML or JSON"),
])
def test_a_malformed_file_is_refused_with_where_and_never_the_key(text: str, says: str) -> None:
    with pytest.raises(T.TenantConfigError) as e:
        T.parse(text)
    assert says in str(e.value)
    assert "k," not in str(e.value) and "'k'" not in str(e.value)


def test_start_up_refuses_a_missing_or_malformed_file(tmp_path) -> None:
    with pytest.raises(ValueError, match="tenants file .*missing.yaml"):
        T.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("keys: [{key: secret-key, tenant: a, limits: {tokensPerMinute: -1}}]")
    with pytest.raises(ValueError, match=r"is malformed: keys\[0\] \(tenant a\)") as e:
        T.load(bad)
    assert "secret-key" not in str(e.value)


def test_a_rewritten_file_applies_and_a_malformed_one_keeps_the_last_good(tmp_path, caplog) -> None:
    path = tmp_path / "tenants.yaml"
    path.write_text("keys: [{key: old-key, tenant: a}]")
    tf = T.TenantFile(path, interval=0)
    assert tf.current().lookup("old-key") is not None
    # As the kubelet updates a mounted Secret: a new file swapped in place.
    new = tmp_path / "tenants.yaml.new"
    new.write_text("keys: [{key: new-key, tenant: a}]")
    os.replace(new, path)
    assert tf.current().lookup("new-key") is not None and tf.current().lookup("old-key") is None
    with caplog.at_level(logging.ERROR):
        path.write_text("keys: [{key: newer-key, tenant: a, limits: {concurrentRequests: 0}}]")
        assert tf.current().lookup("new-key") is not None  # the last good one stays
    assert tf.errors == 1 and "concurrentRequests" in caplog.text
    assert "newer-key" not in caplog.text and "new-key" not in caplog.text
    path.unlink()  # a Secret between two versions: the last good one stays
    assert tf.current().lookup("new-key") is not None


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_requests_per_second_refuses_with_an_honest_retry_after() -> None:
    clock = Clock()
    lim = T.Limiter(clock)
    limits = T.Limits(requests_per_second=0.25)
    lim.admit("a", limits).release()
    with pytest.raises(RateLimited) as e:
        lim.admit("a", limits)
    assert e.value.reason == T.REQUESTS_PER_SECOND and e.value.retry_after_s == 4
    body, status, headers = http_error(e.value)
    assert status == 429 and headers == {"Retry-After": "4"}
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "rate_limit_error"
    clock.t += 3.9
    with pytest.raises(RateLimited):
        lim.admit("a", limits)
    clock.t += 0.1
    lim.admit("a", limits)  # the Retry-After was honest: it goes then


def test_tokens_per_minute_admits_while_not_in_debt_and_charges_what_ran() -> None:
    clock = Clock()
    lim = T.Limiter(clock)
    limits = T.Limits(tokens_per_minute=60)  # one token a second
    lease = lim.admit("a", limits)
    lease.charge(50)
    lease.release()
    lim.admit("a", limits).charge(40)  # 10 left: admitted, then 30 over
    with pytest.raises(RateLimited) as e:
        lim.admit("a", limits)
    assert e.value.reason == T.TOKENS_PER_MINUTE
    assert e.value.retry_after_s == 30  # 30 tokens owed, one a second
    clock.t += 29.9
    with pytest.raises(RateLimited):
        lim.admit("a", limits)
    clock.t += 0.1
    lim.admit("a", limits)
    assert lim.tokens_left("b") is None


def test_concurrent_requests_count_until_released() -> None:
    lim = T.Limiter(Clock())
    limits = T.Limits(concurrent_requests=2)
    first, _ = lim.admit("a", limits), lim.admit("a", limits)
    with pytest.raises(RateLimited) as e:
        lim.admit("a", limits)
    assert e.value.reason == T.CONCURRENT_REQUESTS and e.value.retry_after_s == 1
    lim.admit("b", limits)  # another tenant's own count
    first.release()
    first.release()  # idempotent
    lim.admit("a", limits)
    with pytest.raises(RateLimited):
        lim.admit("a", limits)


def test_usage_values() -> None:
    assert T.parse_usage("12 30") == (12, 30)
    assert T.parse_usage(b"12 30") == (12, 30)
    assert T.parse_usage("") is None and T.parse_usage("x y") is None
    assert T.parse_usage("-1 2") is None
