"""The module KopfRunner loads in operator tests: our real handlers plus a login to KMock.

In production kopf logs in through the in-cluster account or kubeconfig; here the API
server is KMock on loopback (URL in $KMOCK_URL).
"""

from __future__ import annotations

import os
from typing import Any

import kopf
from llamafleet.operator import handlers  # noqa: F401 - registers the real handlers

from tests.support.rbac_audit import OPERATOR_TOKEN


@kopf.on.login()
def login_to_kmock(**_: Any) -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server=os.environ["KMOCK_URL"], insecure=True, scheme="Bearer",
                               token=OPERATOR_TOKEN)  # the RBAC audit's name for the operator
