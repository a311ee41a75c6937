"""Speculative decoding with a draft model, on real llama.cpp: two random llamas of one
vocabulary (benchmarks/make_random_gguf.py, float32, different shapes and seeds) serve and
draft. Greedy output with the draft model is the output without it, token for token, one
request at a time and several at once; a draft model that is the served model itself has
every draft accepted; a draft model of another vocabulary is refused at start-up."""

from __future__ import annotations

import concurrent.futures
from pathlib import Path

import httpx
import numpy as np
import pytest
from llamafleet.common.errors import ModelError
from llamafleet.inference.draft_model import DraftModel
from llamafleet.inference.engine import Engine
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel
from llamafleet.inference.serving import load_draft_model
from llamafleet.inference.settings import Settings
from prometheus_client.parser import text_string_to_metric_families

from tests.support.fake_backend import submit
from tests.support.random_gguf import generator
from tests.support.servers import start_server

pytestmark = pytest.mark.integration

TARGET = dict(dim=64, layers=2, ff=128, heads=4, kv_heads=4, context=512, seed=1)
DRAFT = dict(dim=32, layers=1, ff=64, heads=2, kv_heads=2, context=512, seed=2)
PROMPTS = ["The cat sat on", "Hello there, how", "Once upon a time", "1, 2, 3, 4,",
           "Kubernetes pods", "llama.cpp drafts"]
SLOTS = 4
CONTEXT = 256


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("draft")
    gen = generator()
    out = {"target": folder / "target.gguf", "draft": folder / "draft.gguf"}
    gen.write(out["target"], **TARGET, dtype=np.float32)
    gen.write(out["draft"], **DRAFT, dtype=np.float32)
    return out


@pytest.fixture(scope="module")
def target(paths):
    m = LlamaModel(paths["target"], gpu_layers=0)
    yield m
    m.close()


def generate(target: LlamaModel, draft_path: Path | None, together: bool, **params):
    """Each prompt's text and Finished, greedy; with ``draft_path``, the engine drafts with
    that model. The draft context's batch (16 tokens) is shorter than the prompts (a byte
    per token): their catch-up takes several steps."""
    be = LlamaBackend(target, n_seq=SLOTS, context_size=CONTEXT, n_batch=64, threads=2)
    draft_model = dm = None
    if draft_path is not None:
        dm = LlamaModel(draft_path, gpu_layers=0)
        draft_model = DraftModel(LlamaBackend(dm, n_seq=SLOTS, context_size=CONTEXT, n_batch=16,
                                              threads=2), SLOTS, target.is_eog)
    eng = Engine(be, max_batch_size=SLOTS, queue_size=8, context_size=CONTEXT,
                 speculative_k=4 if draft_path else 0, draft_model=draft_model)
    eng.start()
    try:
        def one(i: int, prompt: str):
            # Lengths differ, so sequences leave while others run and slots are reused.
            return submit(eng, target.tokenize(prompt, add_bos=True), temperature=0.0,
                          max_tokens=24 + 6 * i, **params)

        if together:  # more requests than slots: some wait, then take a freed slot
            runs = [one(i, p) for i, p in enumerate(PROMPTS)]
            for c in runs:
                assert c.done.wait(120)
        else:
            runs = []
            for i, p in enumerate(PROMPTS):
                runs.append(one(i, p))
                assert runs[-1].done.wait(120)
        for c in runs:
            assert c.final.reason in ("stop", "length"), c.events
        if draft_model is not None:  # every slot's draft cells went with its sequence
            assert [draft_model.cells(s) for s in range(SLOTS)] == [0] * SLOTS
        return [(c.text, c.final) for c in runs], eng.speculation
    finally:
        eng.stop()
        if draft_model is not None:
            draft_model.backend.close()
            dm.close()
        be.close()


@pytest.mark.parametrize("together", [False, True], ids=["one-at-a-time", "together"])
@pytest.mark.parametrize("params", [{}, {"repeat_penalty": 1.0, "ignore_eos": True}],
                         ids=["default-penalty", "no-penalty"])
def test_greedy_output_with_a_draft_model_is_the_output_without(target, paths, together,
                                                                 params) -> None:
    off, _ = generate(target, None, together, **params)
    on, stats = generate(target, paths["draft"], together, **params)
    assert on == off
    assert stats["draft"].drafted > 0 and stats["ngram"].drafted == 0


def test_the_served_model_as_its_own_draft_model_has_every_draft_accepted(target, paths) -> None:
    # The draft model's argmax is the served model's greedy token, on the same tokens, so
    # every draft token is accepted. No penalty (the draft model has none) and no end of
    # generation (a draft is never cut by one); drafts never go past max_tokens. The rows are
    # computed in other batch shapes by the two contexts: a change of argmax would need two
    # logits within float32 rounding of each other.
    off, _ = generate(target, None, False, repeat_penalty=1.0, ignore_eos=True)
    on, stats = generate(target, paths["target"], False, repeat_penalty=1.0, ignore_eos=True)
    assert on == off
    drafted = stats["draft"].drafted
    assert drafted > 50 and stats["draft"].accepted == drafted


def _settings(draft: Path) -> Settings:
    return Settings(speculative="draft", draft_model=str(draft), threads=2,
                    context_size=CONTEXT)


@pytest.mark.parametrize("change", ["swap two tokens", "fewer tokens"])
def test_a_draft_model_of_another_vocabulary_is_refused(target, tmp_path, change) -> None:
    gen = generator()
    tokens = list(gen.TOKENS)
    if change == "swap two tokens":
        tokens[65], tokens[66] = tokens[66], tokens[65]
    else:
        tokens = tokens[:-8]
    gen.TOKENS, gen.N_VOCAB = tokens, len(tokens)
    other = tmp_path / "other.gguf"
    gen.write(other, **DRAFT)
    with pytest.raises(ModelError) as e:
        load_draft_model(_settings(other), target, n_seq=1, n_batch=16, kv_layout="unified")
    assert str(e.value).startswith(f"the draft model {other} has another vocabulary than the "
                                   "served model (")
    assert ("token 65 is" if change == "swap two tokens" else "251 tokens, the served model "
            "has 259") in str(e.value)


def test_a_missing_draft_model_is_refused_with_the_setting_named(target, tmp_path) -> None:
    with pytest.raises(ModelError, match="draft model not found: .*LLM_LLAMA_SERVICE_DRAFT_MODEL"):
        load_draft_model(_settings(tmp_path / "nope.gguf"), target, n_seq=1, n_batch=16,
                         kv_layout="unified")


def _complete(url: str, prompt: str, n: int) -> str:
    r = httpx.post(f"{url}/v1/completions", timeout=120, json={
        "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


def _speculation_metrics(server) -> dict[tuple[str, str], float]:
    text = httpx.get(f"{server.url}/metrics").text
    return {(s.name, s.labels.get("kind", "")): s.value
            for f in text_string_to_metric_families(text) for s in f.samples
            if s.name.startswith("llamafleet_speculative_")}


def test_a_server_with_a_draft_model_answers_as_without_and_counts_its_drafts(paths) -> None:
    common = dict(model_path=paths["target"], max_batch_size=SLOTS, context_size=CONTEXT,
                  embeddings=False)
    plain = start_server(**common)
    try:
        want = {p: _complete(plain.url, p, 32) for p in PROMPTS}
    finally:
        plain.stop()
    srv = start_server(**common, speculative="draft", draft_model=str(paths["draft"]))
    try:
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            got = dict(zip(PROMPTS, pool.map(lambda p: _complete(srv.url, p, 32), PROMPTS),
                           strict=True))
        assert got == want
        m = _speculation_metrics(srv)
        drafted = m[("llamafleet_speculative_draft_tokens_total", "draft")]
        accepted = m[("llamafleet_speculative_accepted_tokens_total", "draft")]
        assert drafted > 0 and 0 <= accepted <= drafted
        assert m[("llamafleet_speculative_acceptance_rate", "draft")] == accepted / drafted
        assert m[("llamafleet_speculative_draft_tokens_total", "ngram")] == 0
    finally:
        srv.stop()
