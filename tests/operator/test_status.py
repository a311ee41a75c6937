"""The reconcile's pure decisions: status from what was read back, certificates due."""

from __future__ import annotations

import base64
import datetime as dt

from llamafleet.operator import certs
from llamafleet.operator.planning import ServicePlan
from llamafleet.operator.spec import parse_spec
from llamafleet.operator.status import Condition, merge, status_from

FITS = ServicePlan(4, "4 sequences fit", "gpu", 24576, None)
TOO_BIG = ServicePlan(0, "needs 30 GiB, largest node has 16 GiB", "gpu", None, None)
DAY = dt.timedelta(days=1)


def spec(replicas: int = 2, tls: bool = False):
    return parse_spec({"model": {"source": {"pvc": {"claimName": "m", "path": "m.gguf"}}},
                       "replicas": replicas, "tls": {"enabled": tls}})


def deployment(ready: int | None, replicas: int = 2) -> dict:
    status = {"replicas": replicas} | ({"readyReplicas": ready} if ready is not None else {})
    return {"kind": "Deployment", "status": status}


def leaf_secret(pair: certs.KeyPair) -> dict:
    return {"data": {"tls.crt": base64.b64encode(pair.cert_pem).decode()}}


def conds(status) -> dict[str, tuple[str, str]]:
    return {c.type: (c.status, c.reason) for c in status.conditions}


def test_status_follows_the_deployment_read_back() -> None:
    dep = ("apps/v1", "Deployment", "chat")
    rolling = status_from(spec(), FITS, {dep: deployment(1)})
    assert rolling.phase == "Progressing" and (rolling.replicas, rolling.ready_replicas) == (2, 1)
    assert conds(rolling) == {"CapacityPlanned": ("True", "Planned"),
                              "CertificatesReady": ("True", "Disabled"),
                              "Ready": ("False", "ReplicasNotReady"),
                              "Progressing": ("True", "RollingOut")}
    ready = status_from(spec(), FITS, {dep: deployment(2)})
    assert ready.phase == "Ready" and conds(ready)["Ready"] == ("True", "ReplicasReady")
    assert conds(ready)["Progressing"] == ("False", "Complete")
    # A Deployment without a status yet (just created) counts no ready replicas.
    assert status_from(spec(), FITS, {dep: {"kind": "Deployment"}}).phase == "Progressing"
    zero = status_from(spec(replicas=0), FITS, {dep: deployment(None, 0)})
    assert zero.phase == "Pending" and conds(zero)["Ready"] == ("False", "ScaledToZero")


def test_status_when_the_model_does_not_fit_names_the_plan() -> None:
    st = status_from(spec(), TOO_BIG, {})
    assert st.phase == "Degraded"
    assert st.conditions == (
        Condition("CapacityPlanned", "False", "InsufficientMemory", TOO_BIG.reason),
        Condition("Ready", "False", "InsufficientMemory",
                  "No schedulable node has enough GPU memory for one sequence."))


def test_certificates_condition_gives_the_earliest_leaf_expiry() -> None:
    ca = certs.new_ca("ca", 10 * DAY)
    server, client = certs.issue(ca, "s", 3 * DAY), certs.issue(ca, "c", 2 * DAY, client=True)
    children = {("v1", "Secret", "chat-tls"): leaf_secret(server),
                ("v1", "Secret", "chat-client-tls"): leaf_secret(client),
                ("v1", "Secret", "chat-api-key"): {"data": {"api-key": "eA=="}},
                ("apps/v1", "Deployment", "chat"): deployment(2)}
    cert = next(c for c in status_from(spec(tls=True), FITS, children).conditions
                if c.type == "CertificatesReady")
    assert (cert.status, cert.reason) == ("True", "Issued")
    assert client.not_after.isoformat() in cert.message
    missing = status_from(spec(tls=True), FITS, {("apps/v1", "Deployment", "chat"): deployment(2)})
    assert conds(missing)["CertificatesReady"] == ("False", "Missing")


def test_merge_moves_the_transition_time_only_when_the_status_changes() -> None:
    t0, t1 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC), dt.datetime(2026, 1, 2, tzinfo=dt.UTC)
    first = merge([], [Condition("Ready", "False", "ReplicasNotReady", "0/1")], t0)
    same = merge(first, [Condition("Ready", "False", "ReplicasNotReady", "0/2")], t1)
    assert same[0]["lastTransitionTime"] == "2026-01-01T00:00:00Z" and same[0]["message"] == "0/2"
    flipped = merge(same + [{"type": "Other", "status": "True"}],
                    [Condition("Ready", "True", "ReplicasReady", "2/2")], t1)
    assert flipped[0]["lastTransitionTime"] == "2026-01-02T00:00:00Z"
    assert flipped[1] == {"type": "Other", "status": "True"}  # untouched
    assert first[0]["status"] == "False"  # the input list is not changed


def test_renewal_due_names_what_to_issue_through_a_rotation() -> None:
    validity, renew, overlap = 10 * DAY, 3 * DAY, dt.timedelta(hours=1)
    kw = dict(renew_before=renew, overlap=overlap)
    t = dt.datetime.now(dt.UTC)
    assert certs.renewal_due(None, {"srv": None, "cli": None}, now=t, **kw) == \
        certs.Renewal("new", ("srv", "cli"))
    ca = certs.advance_ca(None, "ca", validity=validity, now=t, **kw)
    srv, cli = certs.issue(ca.signer, "s", validity), certs.issue(ca.signer, "c", validity)
    assert certs.renewal_due(ca, {"srv": srv, "cli": cli}, now=t, **kw) == certs.Renewal("", ())
    assert certs.renewal_due(ca, {"srv": srv, "cli": None}, now=t, **kw).leaves == ("cli",)
    # A leaf close to its expiry is due on its own; the CA (twice the validity) is not.
    late = max(srv.not_after, cli.not_after) - renew
    assert certs.renewal_due(ca, {"srv": srv, "cli": cli}, now=late, **kw) == \
        certs.Renewal("", ("srv", "cli"))
    # The CA's turn: a new CA is published, and due leaves wait for the switch...
    due_at = ca.signer.not_after - renew
    old_srv = certs.issue(ca.signer, "s", validity)  # valid for 10 days from now: due then
    assert certs.renewal_due(ca, {"srv": old_srv}, now=due_at, **kw) == certs.Renewal("rotate", ())
    rotating = certs.advance_ca(ca, "ca", validity=validity, now=due_at, **kw)
    assert certs.renewal_due(rotating, {"srv": old_srv}, now=due_at + overlap / 2, **kw) == \
        certs.Renewal("", ())
    # ...then every leaf of the old CA moves to the new one at once.
    assert certs.renewal_due(rotating, {"srv": old_srv}, now=due_at + overlap, **kw) == \
        certs.Renewal("switch", ("srv",))
    switched = certs.advance_ca(rotating, "ca", validity=validity, now=due_at + overlap, **kw)
    assert certs.renewal_due(switched, {}, now=due_at + 2 * overlap, **kw) == \
        certs.Renewal("drop", ())
    # An expired CA is replaced at once, and every leaf with it.
    gone = ca.signer.not_after + dt.timedelta(seconds=1)
    assert certs.renewal_due(ca, {"srv": srv}, now=gone, **kw) == certs.Renewal("new", ("srv",))


def test_the_router_deployment_never_counts_as_the_replicas() -> None:
    router = {"kind": "Deployment", "metadata": {"labels": {"app.kubernetes.io/component": "router"}},
              "status": {"replicas": 1, "readyReplicas": 1}}
    # Read first (as a dict keeps it), the router's ready pod must not make the service Ready.
    st = status_from(spec(), FITS, {("apps/v1", "Deployment", "chat-router"): router,
                                    ("apps/v1", "Deployment", "chat"): deployment(0)})
    assert st.phase == "Progressing" and (st.replicas, st.ready_replicas) == (2, 0)
