"""The RBAC audit's session summary (issue 24): run last (conftest.py moves it there).

After each test of the audited suites, the `api` fixture has already failed the test if any of
its requests would have been refused (rbac_audit.Audit.check). This test looks at them all
together: every permission that the chart grants the operator, and that ROUTER_RBAC_RULES
grant a router, must have been used by some flow, or be listed below with the reason why the
suites cannot use it. Least privilege stays checked: a new verb in the chart that no code
calls fails here, and so does an entry below once a flow starts using it.
"""

from __future__ import annotations

import pytest

from .conftest import AUDITED_TESTS, audit_of
from .rbac_audit import AUDITED

# Granted on purpose but not requested by any emulated flow: (who, group, resource, verb) -> why.
UNUSED_ON_PURPOSE: dict[tuple[str, str, str, str], str] = {}


def test_every_request_was_allowed_and_every_permission_was_used(
        request: pytest.FixtureRequest) -> None:
    audit = audit_of(request.config)
    wanted = request.config.stash.get(AUDITED_TESTS, set())
    missing = sorted(wanted - audit.finished)
    modules = {nodeid.split("::")[0].rsplit("/", 1)[-1] for nodeid in wanted}
    if modules != set(AUDITED) or missing or audit.failed:
        pytest.skip(f"the audit needs every test of {', '.join(AUDITED)} to run and pass; "
                    f"suites collected: {sorted(modules)}; not run: {missing[:5]}; "
                    f"failed: {sorted(audit.failed)[:5]}")
    assert audit.verdicts, "no request was recorded: the emulator's request log is empty"
    denied = sorted({f"{v.who} ({v.layout}): {v.info}" for v in audit.verdicts
                     if not v.decision.allowed})
    assert not denied, "would be refused with 403 Forbidden:\n  " + "\n  ".join(denied)
    granted, used = audit.granted(), audit.used()
    problems = []
    for who in granted:
        for group, resource, verb in sorted(granted[who] - used[who]):
            if (who, group, resource, verb) not in UNUSED_ON_PURPOSE:
                problems.append(f"{who}: {verb} {resource} [{group or 'core'}] is granted "
                                "but no flow used it")
    for (who, group, resource, verb), why in UNUSED_ON_PURPOSE.items():
        if (group, resource, verb) in used.get(who, set()):
            problems.append(f"{who}: {verb} {resource} [{group or 'core'}] is used now: "
                            f"drop it from UNUSED_ON_PURPOSE ({why})")
        elif (group, resource, verb) not in granted.get(who, set()):
            problems.append(f"{who}: {verb} {resource} [{group or 'core'}] is no longer granted: "
                            "drop it from UNUSED_ON_PURPOSE")
    assert not problems, "\n".join(problems)
