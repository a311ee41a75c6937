"""StepHistogram exposes what prometheus_client's Histogram would for the same values."""

from hypothesis import given, settings
from hypothesis import strategies as st
from llamafleet.inference.metrics import TOKEN_GAP_BUCKETS, StepHistogram
from prometheus_client import CollectorRegistry, Histogram, generate_latest

BOUNDS = st.sampled_from([*TOKEN_GAP_BUCKETS, 0.0, 100.0])  # exact bucket bounds: le


def series(registry: CollectorRegistry) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines()
                  if line and not line.startswith("#") and "_created" not in line)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.lists(st.floats(0, 10) | BOUNDS, max_size=70), max_size=5))
def test_same_series_as_a_histogram(steps: list[list[float]]) -> None:
    ours, theirs = CollectorRegistry(), CollectorRegistry()
    h = StepHistogram("x_seconds", "doc", TOKEN_GAP_BUCKETS, ours)
    ref = Histogram("x_seconds", "doc", buckets=TOKEN_GAP_BUCKETS, registry=theirs)
    for step in steps:
        h.observe_many(step)
        for v in step:
            ref.observe(v)
    got, want = series(ours), series(theirs)
    # The sum adds a step's values first: equal up to rounding.
    got_sum, want_sum = (float(next(x for x in lines if x.startswith("x_seconds_sum")).split()[1])
                         for lines in (got, want))
    assert abs(got_sum - want_sum) <= 1e-9 * max(1.0, want_sum)
    assert [x for x in got if "_sum" not in x] == [x for x in want if "_sum" not in x]
