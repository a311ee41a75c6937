"""The prompt cache beyond the slots (inference/prompt_cache.py) on the real model: a
restored state answers like the prefilled one and costs a fraction of the prefill, and a
replica with one slot serves two alternating tenants without prefilling their prompts
again."""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from llamafleet.inference.llama_backend import LlamaBackend, LlamaModel
from llamafleet.inference.llama_backend import llama_cpp as _llama_cpp

from tests.support.servers import start_server

pytestmark = pytest.mark.integration
C = _llama_cpp.llama_cpp


def tenant_prompt(tenant: int) -> str:
    rules = " ".join(f"Rule {i}: tenant {tenant} answers about order {i * 7 + tenant}." for i in range(32))
    return f"You are the assistant of tenant {tenant}. {rules}\n"


def _logits(be: LlamaBackend) -> np.ndarray:
    return np.ctypeslib.as_array(C.llama_get_logits_ith(be.ctx, 0), shape=(be.model.n_vocab,)).copy()


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_a_restored_state_answers_like_its_prefill_and_costs_far_less(model_path: Path,
                                                                       layout: str) -> None:
    model = LlamaModel(model_path, gpu_layers=0)
    be = LlamaBackend(model, n_seq=3, context_size=1024, n_batch=512, threads=2,
                      kv_layout=layout)
    try:
        prompt = model.tokenize(tenant_prompt(1), True)
        assert 400 < len(prompt) < 600
        prefill_s = []
        for seq in (0, 1):  # the same prompt prefilled twice: the numerical yardstick
            t0 = time.perf_counter()
            be.decode(prompt, list(range(len(prompt))), [seq] * len(prompt), [False] * len(prompt))
            prefill_s.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state = be.save_sequence(0)
        save_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        assert be.restore_sequence(2, state)
        restore_s = time.perf_counter() - t0
        # The next token after each copy. Cells at other places in the shared KV buffer sum
        # in another order (llama.cpp is not batch-invariant), so even two prefills differ a
        # little; the restored copy must differ from the original no more than that.
        nxt = model.tokenize(" Rule", False)[0]
        logits = []
        for seq in (0, 1, 2):
            be.decode([nxt], [len(prompt)], [seq], [True])
            logits.append(_logits(be))
        a, b, restored = logits
        assert int(np.argmax(a)) == int(np.argmax(restored)) == int(np.argmax(b))
        noise = float(np.max(np.abs(a - b)))
        assert float(np.max(np.abs(a - restored))) <= 1.5 * noise + 1e-3
        prefill = min(prefill_s)
        print(f"\nprompt {len(prompt)} tokens: prefill {prefill * 1000:.1f} ms, save "
              f"{save_s * 1000:.1f} ms, restore {restore_s * 1000:.1f} ms, state "
              f"{len(state) / 2**20:.1f} MiB")
        assert save_s + restore_s < prefill / 3
        assert not be.restore_sequence(0, b"not a state")  # refused, and nothing left behind
        assert C.llama_memory_seq_pos_max(C.llama_get_memory(be.ctx), 0) == -1
    finally:
        be.close()
        model.close()


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_a_shared_prefix_answers_like_its_own_prefill(model_path: Path, layout: str) -> None:
    """copy_sequence (running sequences sharing a prompt's cells): the copy continues the
    prompt as its own prefill would, within the noise of two identical prefills."""
    model = LlamaModel(model_path, gpu_layers=0)
    be = LlamaBackend(model, n_seq=3, context_size=1024, n_batch=512, threads=2,
                      kv_layout=layout)
    try:
        prompt = model.tokenize(tenant_prompt(2), True)
        head = prompt[:-1]
        for seq in (0, 2):  # the donor, and a second prefill as the yardstick
            be.decode(head, list(range(len(head))), [seq] * len(head), [False] * len(head))
        be.decode([prompt[-1], 42], [len(head), len(head) + 1], [0, 0], [False, False])
        assert be.copy_sequence(0, 1, len(head))  # the donor ran on; the copy takes the head
        logits = []
        for seq in (2, 1):
            be.decode([prompt[-1]], [len(head)], [seq], [True])
            logits.append(_logits(be))
        be.clear_sequence(0)
        be.decode(head + [prompt[-1]], list(range(len(prompt))), [0] * len(prompt),
                  [False] * len(head) + [True])
        again = be.logits()[0].copy()
        fresh, copied = logits
        noise = float(np.max(np.abs(fresh - again)))
        assert int(np.argmax(copied)) == int(np.argmax(fresh))
        assert float(np.max(np.abs(copied - fresh))) <= 1.5 * noise + 1e-3
    finally:
        be.close()
        model.close()


@pytest.mark.parametrize("layout", ["split", "unified"])
def test_one_slot_serves_alternating_tenants_from_host_ram(model_path: Path, layout: str) -> None:
    srv = start_server(model_path=model_path, max_batch_size=1, context_size=2048,
                       grpc_port=0, metrics_port=0, prompt_cache_mib=64, kv_layout=layout)
    try:
        engine = srv.serving.engine

        def ask(tenant: int) -> None:
            r = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                "prompt": tenant_prompt(tenant) + "Question: where is my order?",
                "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text

        ask(1)
        ask(2)  # takes the only slot: tenant 1's cells are gone from the context
        before = (engine.prompt_cache_restores, engine.prefix_tokens_reused)
        ask(1)
        assert engine.prompt_cache_restores == before[0] + 1
        assert engine.prefix_tokens_reused - before[1] > 400
        assert engine.prompt_cache is not None and len(engine.prompt_cache) == 2  # A held once
        assert engine.prompt_cache.bytes <= 64 << 20
    finally:
        srv.stop()


def test_a_slot_whose_window_slid_past_the_prefix_is_served_from_host_ram(model_path: Path) -> None:
    """Gemma 3's sliding-window layers keep the last 512 positions of a sequence. After a
    long answer the slot still lists the tenant's prompt, but its cells no longer serve it:
    the prefix then comes from the host prompt cache instead of a full prefill."""
    # llama.cpp sizes the sliding-window cache n_swa + n_ubatch cells and overwrites masked
    # cells (padded to 256) only when it runs out: with a small n_batch, 300 tokens of answer.
    srv = start_server(model_path=model_path, max_batch_size=1, context_size=1024, n_batch=64,
                       grpc_port=0, metrics_port=0, prompt_cache_mib=64)
    try:
        engine = srv.serving.engine
        assert engine.backend.n_swa == 512

        def ask(question: str, max_tokens: int) -> None:
            r = httpx.post(srv.url + "/v1/completions", timeout=300, json={
                "prompt": tenant_prompt(3) + question, "max_tokens": max_tokens,
                "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200, r.text

        ask("Question: list every order.", 300)  # ends past the window cache: it slid
        before = (engine.prompt_cache_restores, engine.prefix_tokens_reused)
        ask("Question: where is my order?", 4)
        assert engine.prompt_cache_restores == before[0] + 1
        assert engine.prefix_tokens_reused - before[1] > 400
    finally:
        srv.stop()
