"""LoRA adapter sets in the scheduler and the caches, and the adapter registry, against the fake
model boundary (no llama.cpp): one adapter set per llama_decode, every set served in turn,
cells reused only under the set that computed them."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from llamafleet.common.errors import BadRequest, Conflict, ModelNotFound
from llamafleet.inference.adapters import Adapters, parse_spec
from llamafleet.inference.engine import Engine, Finished, GenerationRequest, SamplingParams
from llamafleet.inference.prompt_cache import PromptCache

from tests.support.fake_backend import Collector, FakeBackend, make_engine
from tests.support.servers import wait_until

A, B = ("lora-a",), ("lora-b",)
# Each set's prompts start in its own range of token ids; FakeBackend's tokens count up by one,
# so every token of a batch tells which set it belongs to.
FIRST = {(): 3000, A: 1000, B: 2000}


def _set_of(token: int) -> tuple:
    return next(k for k, first in FIRST.items() if first <= token < first + 1000)


def _submit(eng: Engine, adapters: tuple, offset: int = 0, n: int = 3, **params) -> Collector:
    c = Collector()
    first = FIRST[adapters] + offset
    eng.submit(GenerationRequest(list(range(first, first + n)),
                                 SamplingParams(**{"max_tokens": 6, **params}), c,
                                 adapters=adapters))
    return c


def _mixed_run(be: FakeBackend, sets: list[tuple]) -> list[Collector]:
    """The requests of ``sets`` running together: the first decode is held until all are
    submitted."""
    be.gate = threading.Event()
    eng = make_engine(be, max_batch_size=len(sets), queue_size=len(sets))
    try:
        cs = [_submit(eng, k, offset=10 * i) for i, k in enumerate(sets)]
        be.gate.set()
        for c in cs:
            assert c.done.wait(5)
    finally:
        eng.stop()
    return cs


def test_one_decode_holds_one_adapter_set_and_it_is_the_one_applied() -> None:
    be = FakeBackend()
    cs = _mixed_run(be, [(), A, B, A, (), B])
    assert all(c.final.reason == "length" for c in cs)
    for (tokens, _, _, _), applied in zip(be.batches, be.decode_adapters, strict=True):
        assert {_set_of(t) for t in tokens} == {applied}, (tokens, applied)


def test_each_output_is_what_the_request_gives_alone() -> None:
    alone = {}
    for k in ((), A, B):
        alone[k] = _mixed_run(FakeBackend(), [k])[0].text
    mixed = _mixed_run(FakeBackend(), [(), A, B, (), A, B])
    for i, (c, k) in enumerate(zip(mixed, [(), A, B, (), A, B], strict=True)):
        first = FIRST[k] + 10 * i
        assert c.text == " ".join(str(t) for t in range(first + 3, first + 9)) + " "
        assert len(c.text) == len(alone[k])


def test_sets_take_turns_so_none_waits_more_than_one_step_per_other_set() -> None:
    be = FakeBackend()
    _mixed_run(be, [A, B, ()])
    # Once all three run, no set is applied twice before the others had their step: in any
    # window of three decodes while all have work, the three sets each appear once.
    seen = be.decode_adapters[1:]  # after the held first decode
    assert len(seen) >= 3
    for i in range(len(seen) - 2):
        window = seen[i:i + 3]
        if len(set(window)) < 3:
            break  # a set has finished: from here fewer sets take turns
        assert set(window) == {(), A, B}


def test_a_set_that_arrives_later_runs_at_the_next_turn() -> None:
    be = FakeBackend()
    be.gate = threading.Event()
    eng = make_engine(be, max_batch_size=3, queue_size=3)
    try:
        a = _submit(eng, A, max_tokens=40)
        b = _submit(eng, (), max_tokens=40)
        be.gate.set()
        late = _submit(eng, B, max_tokens=2)
        assert late.done.wait(5)
        assert a.done.wait(5) and b.done.wait(5)
    finally:
        eng.stop()
    first_b = next(i for i, k in enumerate(be.decode_adapters) if k == B)
    # B's prefill and then its one decode step each come within one turn of A and ().
    b_steps = [i for i, k in enumerate(be.decode_adapters) if k == B]
    assert len(b_steps) == 2 and b_steps[1] - b_steps[0] <= 3, be.decode_adapters[:first_b + 4]


def test_without_adapters_the_backend_is_never_asked_to_change_them() -> None:
    be = FakeBackend()
    cs = _mixed_run(be, [(), (), ()])
    assert all(isinstance(c.final, Finished) for c in cs)
    assert be.adapter_changes == []
    assert set(be.decode_adapters) == {()}


def test_a_free_slots_cells_serve_only_the_adapter_set_that_computed_them() -> None:
    be = FakeBackend()
    eng = make_engine(be, max_batch_size=1)
    try:
        prompt = list(range(1000, 1040))

        def run(adapters: tuple) -> None:
            c = Collector()
            eng.submit(GenerationRequest(prompt, SamplingParams(max_tokens=2), c,
                                         adapters=adapters))
            assert c.done.wait(5)

        run(A)
        reused = eng.prefix_tokens_reused
        run(B)  # the same prompt under another adapter: a full prefill
        assert eng.prefix_tokens_reused == reused
        run(B)  # and again under B: its own cells serve it
        assert eng.prefix_tokens_reused > reused
    finally:
        eng.stop()


def test_prefixes_are_not_shared_in_flight_across_adapter_sets() -> None:
    be = FakeBackend()
    be.n_batch = 64
    be.gate = threading.Event()
    eng = Engine(be, max_batch_size=2, queue_size=2, context_size=256)
    eng.start()
    try:
        prompt = list(range(1000, 1050))
        cs = []
        for k in (A, B):
            c = Collector()
            eng.submit(GenerationRequest(prompt, SamplingParams(max_tokens=2), c, adapters=k))
            cs.append(c)
        be.gate.set()
        assert all(c.done.wait(5) for c in cs)
    finally:
        eng.stop()
    assert be.copied == []


def test_the_prompt_cache_holds_each_adapter_sets_states_apart() -> None:
    cache = PromptCache(1 << 20, min_tokens=2)
    cache.put([1, 2, 3, 4], b"base")
    cache.put([1, 2, 3, 4], b"under-a", A)
    assert cache.longest([1, 2, 3, 4, 5])[1] == b"base"
    assert cache.longest([1, 2, 3, 4, 5], A)[1] == b"under-a"
    assert cache.longest([1, 2, 3, 4, 5], B) is None
    assert not cache.wants([1, 2, 3, 4], A) and cache.wants([1, 2, 3, 4], B)


def test_engine_call_runs_on_the_engine_thread_between_steps() -> None:
    eng = make_engine(FakeBackend())
    try:
        assert eng.call(lambda: threading.current_thread().name).result(5) == "llamafleet-engine"
        with pytest.raises(ZeroDivisionError):
            eng.call(lambda: 1 / 0).result(5)
    finally:
        eng.stop()


# --- the registry -----------------------------------------------------------------------------


@pytest.fixture()
def registry(tmp_path: Path):
    be = FakeBackend()
    eng = make_engine(be)
    (tmp_path / "a.gguf").write_bytes(b"x")
    (tmp_path / "bad.gguf").write_bytes(b"x")
    yield Adapters("base", eng, be), eng, be, tmp_path
    eng.stop()


def test_a_loaded_adapter_resolves_by_name_and_unknown_names_are_404(registry) -> None:
    reg, _, be, d = registry
    a = reg.load("sql", d / "a.gguf", 0.5)
    assert reg.resolve("sql") == (a,) and a.scale == 0.5 and be.loaded[a.handle] == d / "a.gguf"
    assert reg.resolve("base") == () and reg.resolve(None) == () and reg.resolve("") == ()
    with pytest.raises(ModelNotFound) as e:
        reg.resolve("nope")
    assert "'base', 'sql'" in str(e.value)


@pytest.mark.parametrize(("name", "path", "scale", "err", "param"), [
    ("sql", "a.gguf", 1.0, BadRequest, "path"),  # relative
    ("sql", "/no/such.gguf", 1.0, BadRequest, "path"),
    ("sql", "{d}/bad.gguf", 1.0, BadRequest, "path"),  # llama.cpp refuses it
    ("has space", "{d}/a.gguf", 1.0, BadRequest, "name"),
    ("sql", "{d}/a.gguf", float("nan"), BadRequest, "scale"),
    ("base", "{d}/a.gguf", 1.0, Conflict, "name"),
])
def test_bad_loads_get_precise_errors(registry, name, path, scale, err, param) -> None:
    reg, eng, _, d = registry
    with pytest.raises(err) as e:
        reg.load(name, Path(path.format(d=d)), scale)
    assert e.value.param == param
    assert reg.all() == [] and eng.alive


def test_a_name_taken_is_409_and_unloading_frees_it(registry) -> None:
    reg, _, be, d = registry
    a = reg.load("sql", d / "a.gguf")
    with pytest.raises(Conflict) as e:
        reg.load("sql", d / "a.gguf")
    assert e.value.code == "adapter_exists"
    assert reg.unload("sql") is a and be.freed == [a.handle]
    with pytest.raises(ModelNotFound):
        reg.unload("sql")
    assert reg.load("sql", d / "a.gguf") is not a  # the name is free again


def test_an_adapter_in_use_is_not_unloaded(registry) -> None:
    reg, eng, be, d = registry
    reg.load("sql", d / "a.gguf")
    be.gate = threading.Event()  # the request's first decode waits for the unload to queue
    c = Collector()
    reg.submit("sql", lambda k: eng.submit(GenerationRequest([1, 2], SamplingParams(max_tokens=4),
                                                             c, adapters=k)))
    outcome: list = []
    unloading = threading.Thread(target=lambda: outcome.append(_try(reg.unload, "sql")))
    unloading.start()
    wait_until(lambda: not eng._calls.empty(), timeout=5)
    be.gate.set()  # the unload runs after this step, with the request still running
    unloading.join(5)
    assert isinstance(outcome[0], Conflict), outcome
    assert outcome[0].code == "adapter_in_use" and "1 running or waiting" in str(outcome[0])
    assert c.done.wait(5) and c.final.reason == "length"
    reg.unload("sql")
    assert reg.all() == []


def _try(fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - the test looks at it
        return e


def test_parse_spec() -> None:
    assert parse_spec("sql=/m/sql.gguf") == ("sql", Path("/m/sql.gguf"), 1.0)
    assert parse_spec("sql=/m/sql.gguf:0.25") == ("sql", Path("/m/sql.gguf"), 0.25)
    assert parse_spec("x=/m/a:b.gguf") == ("x", Path("/m/a:b.gguf"), 1.0)
    for bad in ("sql", "sql=", "=/a", "sql=/a:inf"):
        with pytest.raises(ValueError):
            parse_spec(bad)
