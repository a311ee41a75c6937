"""The router's view of a replica's load, from its /metrics text (pure)."""

from __future__ import annotations

from llamafleet.router.replicas import Replica, parse_metrics

POD_METRICS = """\
# HELP llamafleet_running_sequences Sequences in the batch.
# TYPE llamafleet_running_sequences gauge
llamafleet_running_sequences 3.0
# HELP llamafleet_queue_depth Requests waiting.
# TYPE llamafleet_queue_depth gauge
llamafleet_queue_depth 2.0
# HELP llamafleet_kv_cache_cells_used KV cells holding tokens.
# TYPE llamafleet_kv_cache_cells_used gauge
llamafleet_kv_cache_cells_used 512.0
# HELP llamafleet_kv_cache_cells_total KV cells in the context.
# TYPE llamafleet_kv_cache_cells_total gauge
llamafleet_kv_cache_cells_total 2048.0
# HELP llamafleet_max_batch_size Sequences that may run at once.
# TYPE llamafleet_max_batch_size gauge
llamafleet_max_batch_size 4.0
# HELP llamafleet_steps_total x
# TYPE llamafleet_steps_total counter
llamafleet_steps_total 9.0
"""


def test_the_pods_gauges_are_read_and_nothing_else() -> None:
    assert parse_metrics(POD_METRICS) == {
        "llamafleet_running_sequences": 3.0, "llamafleet_queue_depth": 2.0,
        "llamafleet_kv_cache_cells_used": 512.0, "llamafleet_kv_cache_cells_total": 2048.0,
        "llamafleet_max_batch_size": 4.0}


def test_load_is_ours_now_plus_the_others_of_the_last_poll() -> None:
    b = Replica("http://x", in_flight=2, others=3.0)
    assert b.load == 5.0
    b.in_flight = 0
    assert b.load == 3.0

