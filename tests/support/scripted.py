"""A pod without a model, for the front doors' unit tests: the real Serving, Engine, core and
FastAPI app over a scripted backend (our own boundary, as fake_backend.FakeBackend), reached
through the official clients with an in-process ASGI transport.

Every request's answer is ``ScriptedBackend.script``: one generated token per piece."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import httpx
from llamafleet.inference.engine import Engine
from llamafleet.inference.http_api import create_app
from llamafleet.inference.metrics import Metrics
from llamafleet.inference.serving import Serving, deliver
from llamafleet.inference.settings import Settings

from tests.support.fake_backend import EOG, FakeBackend

BASE = 100_000  # the last prompt token; generated piece i is token BASE + 1 + i

CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
          "{% if m.tool_calls %}{{ m.tool_calls | tojson }}{% endif %}"
          "{% if m.tool_call_id %} for {{ m.tool_call_id }}{% endif %}<|im_end|>\n"
          "{% endfor %}{% if tools %}TOOLS:{{ tools | tojson }}{% endif %}"
          "<|im_start|>assistant\n")
# A template that knows tools (Hermes: "<tool_call>" and "tools" in its text).
HERMES = CHATML.replace("TOOLS:", "<tool_call> tools: ")
# Qwen3's way: the generation prompt opens the thoughts.
THINKING = CHATML + "<think>\n"


class ScriptedBackend(FakeBackend):
    n_batch = 512

    def __init__(self, script: list[str]):
        super().__init__()
        self.script = script
        self.params: list = []  # every request's SamplingParams (grammar and all)
        self.gates: dict[int, threading.Event] = {}

    def hold(self, piece: int) -> threading.Event:
        """A gate that piece ``piece`` of every answer waits for (set it to go on): what a
        client has received while it is shut was sent before that piece was generated."""
        gate = self.gates[piece] = threading.Event()
        return gate

    def new_sampler(self, params):
        self.params.append(params)
        return super().new_sampler(params)

    def sample(self, sampler, batch_index: int) -> int:
        last = self._token_at[batch_index]
        if BASE <= last < BASE + len(self.script):
            gate = self.gates.get(last - BASE)
            if gate is not None:
                gate.wait(30)  # a bound for a failing test, not a synchronisation
            return last + 1
        return EOG

    def token_bytes(self, token: int) -> bytes:
        return self.script[token - BASE - 1].encode() if token > BASE else b""


class FakeModel:
    """What Serving reads of a model; records the last rendered prompt."""

    path = Path("scripted.gguf")
    bos_text = eos_text = ""
    add_bos = False
    n_vocab = BASE + 1000

    def __init__(self, template: str):
        self.meta = {"tokenizer.chat_template": template}
        self.prompts: list[str] = []

    def tokenize(self, text: str, add_bos: bool) -> list[int]:
        self.prompts.append(text)
        return [b + 1 for b in text.encode()][-2000:] + [BASE]

    def grammar_ok(self, grammar: str) -> bool:
        return True

    def token_bytes(self, token: int) -> bytes:
        return self.backend.token_bytes(token) if token >= BASE else bytes([token - 1])


class ScriptedPod:
    def __init__(self, script: list[str], template: str = CHATML, **settings: Any):
        self.backend = ScriptedBackend(script)
        self.model = FakeModel(template)
        self.model.backend = self.backend
        self.engine = Engine(self.backend, max_batch_size=4, queue_size=8, context_size=8192,
                             deliver=deliver)
        self.engine.start()
        self.settings = Settings(**{"model_name": "scripted", **settings})
        self.serving = Serving(self.settings, self.model, self.engine, Metrics(), plan=None)
        self.app = create_app(self.settings, self.serving)

    @property
    def script(self) -> list[str]:
        return self.backend.script

    @script.setter
    def script(self, pieces: list[str]) -> None:
        self.backend.script = pieces

    def client(self, **headers: str) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app),
                                 base_url="http://pod", headers=headers)

    def client2(self):
        """The same, with httpx2 (what the `anthropic` SDK is built on)."""
        import httpx2

        return httpx2.AsyncClient(transport=httpx2.ASGITransport(app=self.app), base_url="http://pod")

    def close(self) -> None:
        for gate in self.backend.gates.values():
            gate.set()
        self.engine.stop()


class ServedPod:
    """A :class:`ScriptedPod`'s app on a loopback port (uvicorn in a thread of its own), for
    tests that need a real HTTP replica without a model (the router in front of it)."""

    def __init__(self, pod: ScriptedPod):
        import asyncio

        import uvicorn

        from tests.support.servers import free_port, wait_until

        self.pod, self.port = pod, free_port()
        self.server = uvicorn.Server(uvicorn.Config(pod.app, host="127.0.0.1", port=self.port,
                                                    log_config=None, lifespan="off"))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()),
                                       name="served-pod", daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.pod.close()
