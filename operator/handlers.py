"""kopf handlers: only the decorators and thin bodies, as crate-operator's main.py.

- the reconcile (create, spec update, resume, and a resync timer):
  :mod:`llamafleet.operator.reconcile`, which walks the ordered steps of
  :mod:`llamafleet.operator.reconcile_steps`;
- the builtin autoscaler's timer: :mod:`llamafleet.operator.scaling_loop`;
- while a model downloads into the model cache, a faster resync of that LLMService;
- start-up (kopf's settings, the Kubernetes client, the locks): :mod:`llamafleet.operator.runtime`.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf
from llamafleet.common.contract import API_GROUP, API_VERSION, LLMSERVICE_PLURAL

from . import reconcile as R
from . import runtime, scaling_loop
from .metrics import OperatorMetrics
from .planning import NodeGPU
from .settings import OperatorSettings

GROUP, VERSION, PLURAL = API_GROUP, API_VERSION, LLMSERVICE_PLURAL


@kopf.on.startup()
def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    runtime.start(settings, memo)


@kopf.index("v1", "nodes")
def gpu_nodes(name: str, labels: dict, **_: Any) -> dict[str, NodeGPU] | None:
    node = NodeGPU.from_labels(name, dict(labels))
    return {name: node} if node else None


def _nodes(index: kopf.Index) -> list[NodeGPU]:
    return [node for store in index.values() for node in store]


def _metrics(memo: kopf.Memo) -> OperatorMetrics:
    """The operator's series (runtime.start); a throwaway set when a test brought its own memo."""
    if "metrics" not in memo:
        memo.metrics = OperatorMetrics()
    return memo.metrics


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def reconcile(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
              gpu_nodes: kopf.Index, **_: Any) -> None:
    with _metrics(memo).reconcile(body, patch):
        R.run(body, patch, logger, memo, _nodes(gpu_nodes), event=True)


# kopf fixes a timer's interval when the handler is registered, before any startup handler
# runs: the one setting read at import time.
@kopf.timer(GROUP, VERSION, PLURAL, interval=OperatorSettings().resync_seconds, idle=0)
def resync(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger, memo: kopf.Memo,
           gpu_nodes: kopf.Index, **_: Any) -> None:
    with _metrics(memo).reconcile(body, patch):
        R.run(body, patch, logger, memo, _nodes(gpu_nodes), event=False)


def _downloading(status: kopf.Status, **_: Any) -> bool:
    return ((status or {}).get("modelCache") or {}).get("state") in ("Pending", "Downloading")


# While the model cache downloads an LLMService's model: its progress to status, and the
# Deployment as soon as the file is there (llamafleet.operator.model_cache). A timer, not a
# retry: a temporary error would post an Event at every poll of a long download.
@kopf.timer(GROUP, VERSION, PLURAL, interval=OperatorSettings().model_cache_poll_seconds,
            idle=0, when=_downloading)
def model_cache_poll(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                     memo: kopf.Memo, gpu_nodes: kopf.Index, **_: Any) -> None:
    R.run(body, patch, logger, memo, _nodes(gpu_nodes), event=False)


def _builtin_scaling(spec: kopf.Spec, **_: Any) -> bool:
    scaling = spec.get("scaling") or {}
    return bool(scaling) and scaling.get("mode", "builtin") == "builtin"


# Like resync's, this interval is fixed at import.
@kopf.timer(GROUP, VERSION, PLURAL, interval=OperatorSettings().autoscale_interval, idle=0,
            backoff=OperatorSettings().autoscale_interval, when=_builtin_scaling)
async def autoscale(body: kopf.Body, patch: kopf.Patch, logger: logging.Logger,
                    memo: kopf.Memo, **_: Any) -> None:
    """spec.scaling.mode builtin: read the load, decide, write the scale subresource and
    status.autoscaling."""
    with _metrics(memo).autoscale(body, patch):
        await scaling_loop.timer_round(dict(body), patch, logger, memo.dyn, memo.settings)


__all__ = ["reconcile", "resync", "model_cache_poll", "autoscale", "gpu_nodes", "startup"]
