"""Finding, checking and describing the GGUF model; chat templates; tokenisation."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2.sandbox import ImmutableSandboxedEnvironment
from llamafleet.common.contract import DEFAULT_EMBEDDED_MODEL, env_name
from llamafleet.common.errors import BadRequest, ModelError

from .model_packages import embedded_model_path

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def resolve_model_path(path: Path | None, embedded: str = DEFAULT_EMBEDDED_MODEL,
                       embedded_dir: Path | None = None) -> Path:
    """``path`` checked, or without one the embedded model named ``embedded``."""
    if path is None:
        return embedded_model_path(embedded, embedded_dir)
    if not path.is_file():
        raise ModelError(f"model file not found: {path} (set {env_name('model_path')})")
    with path.open("rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise ModelError(f"{path} is not a GGUF file (its first bytes are not 'GGUF')")
    return path


# Built-in chat templates, used when the GGUF carries none. Gemma has no system role:
# the system text opens the first user turn, as Google's own template does.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' ~ role ~ '\n' }}"
    "{{ (first_user_prefix if loop.first else '') ~ message['content'] | trim }}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)

CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' ~ message['role'] ~ '\n' ~ message['content'] ~ '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}"
)

FAMILY_TEMPLATES = {"gemma": GEMMA_TEMPLATE, "gemma2": GEMMA_TEMPLATE, "gemma3": GEMMA_TEMPLATE}


@dataclass(frozen=True)
class ModelShape:
    """What capacity planning needs to know about a model (from GGUF metadata)."""

    architecture: str
    n_layer: int
    n_head_kv: int
    key_length: int
    value_length: int
    n_ctx_train: int
    sliding_window: int | None
    size_bytes: int


def model_shape(meta: dict[str, str], size_bytes: int) -> ModelShape:
    arch = meta.get("general.architecture", "llama")

    def num(key: str, default: int) -> int:
        v = meta.get(f"{arch}.{key}")
        try:
            return int(float(v)) if v is not None else default
        except ValueError:
            return default

    n_head = num("attention.head_count", 1)
    embd = num("embedding_length", 0)
    head_dim = embd // n_head if n_head and embd else 128
    sw = meta.get(f"{arch}.attention.sliding_window")
    return ModelShape(
        architecture=arch,
        n_layer=num("block_count", 1),
        n_head_kv=num("attention.head_count_kv", n_head),
        key_length=num("attention.key_length", head_dim),
        value_length=num("attention.value_length", head_dim),
        n_ctx_train=num("context_length", 0),
        sliding_window=int(sw) if sw and sw.isdigit() else None,
        size_bytes=size_bytes,
    )


class ChatFormatter:
    """Renders OpenAI-style messages through a sandboxed Jinja chat template."""

    def __init__(self, template: str, bos_token: str, eos_token: str):
        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

        def raise_exception(message: str) -> None:
            raise BadRequest(f"chat template: {message}", param="messages")

        env.globals["raise_exception"] = raise_exception
        self.template = env.from_string(template)
        self.source = template
        self.bos_token = bos_token
        self.eos_token = eos_token

    @classmethod
    def for_model(cls, configured: str | None, meta: dict[str, str], bos: str, eos: str
                  ) -> ChatFormatter:
        if configured:
            path = Path(configured)
            text = path.read_text() if len(configured) < 4096 and path.is_file() else configured
            source = "configured"
        elif meta.get("tokenizer.chat_template"):
            text, source = meta["tokenizer.chat_template"], "GGUF metadata"
        else:
            arch = meta.get("general.architecture", "")
            text = FAMILY_TEMPLATES.get(arch, CHATML_TEMPLATE)
            source = f"built-in for {arch or 'unknown'} family"
        log.info("chat template: %s", source)
        return cls(text, bos, eos)

    def render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None
               ) -> str:
        return self.template.render(
            messages=normalise_messages(messages),
            tools=tools,
            add_generation_prompt=True,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
        )


def normalise_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Merge system/developer messages into one leading system message; other roles than
    assistant and tool become user (tool messages and calls come from
    tool_calls.template_messages)."""
    system = [m["content"] for m in messages if m["role"] in ("system", "developer")]
    rest = [
        {**m, "role": m["role"] if m["role"] in ("assistant", "tool") else "user"}
        for m in messages
        if m["role"] not in ("system", "developer")
    ]
    if system:
        return [{"role": "system", "content": "\n\n".join(system)}, *rest]
    return rest


_RAG_SLOT = re.compile(r"\{(context|question)\}")


def apply_rag(template: str, context: str, question: str) -> str:
    """The template with both slots filled in one pass: neither str.format (user text may
    hold braces) nor two replaces (a context holding "{question}" would get the question
    spliced into it)."""
    values = {"context": context, "question": question}
    return _RAG_SLOT.sub(lambda m: values[m.group(1)], template)
