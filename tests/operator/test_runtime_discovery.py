"""The operator's Kubernetes client, shared by kopf's handler threads: looking up a kind the
cluster does not serve (a CRD not installed) from many threads at once gives each of them
the precise miss, never a corrupted discovery cache (``KeyError: 'resources'``, which sent
a reconcile into kopf's 60-second error backoff)."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor

from kubernetes.dynamic import DynamicClient
from kubernetes.dynamic.exceptions import ResourceNotFoundError
from llamafleet.operator import runtime
from llamafleet.operator.settings import OperatorSettings


def _lookups(dyn: DynamicClient, start: threading.Barrier, rounds: int) -> list[str]:
    outcomes = []
    start.wait(30)
    for i in range(rounds):
        kind = ("inference.networking.k8s.io/v1", "InferencePool") if i % 2 else ("v1", "Secret")
        try:
            dyn.resources.get(api_version=kind[0], kind=kind[1])
            outcomes.append("found")
        except ResourceNotFoundError:
            outcomes.append("missing")
    return outcomes


async def test_concurrent_lookups_of_a_missing_kind_each_get_the_miss(api, kmock, tmp_path) -> None:
    del kmock.resources["inference.networking.k8s.io/v1/inferencepools"]
    # The client asks the API server as it is built: off the loop that serves the emulator.
    dyn = await asyncio.to_thread(DynamicClient, runtime.api_client(OperatorSettings()),
                                  cache_file=str(tmp_path / "discovery.json"),
                                  discoverer=runtime.ThreadSafeDiscoverer)
    threads, rounds = 8, 6
    start = threading.Barrier(threads)
    pool = ThreadPoolExecutor(threads)  # all at once (the default pool may be smaller)
    loop = asyncio.get_running_loop()
    try:  # every lookup ends before the loop (which serves the emulator) is given back
        results = await asyncio.gather(*(
            loop.run_in_executor(pool, _lookups, dyn, start, rounds) for _ in range(threads)),
            return_exceptions=True)
    finally:
        pool.shutdown(wait=False)
    assert results == [["found", "missing"] * (rounds // 2)] * threads
