"""Settings from env and flags; one clear line per invalid value; logs."""

from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
from llamafleet.common.cli import main
from llamafleet.common.logs import JSONFormatter, request_id_from_headers
from llamafleet.inference.settings import Settings


def test_env_prefix_and_defaults(monkeypatch) -> None:
    monkeypatch.setenv("LLM_LLAMA_SERVICE_CONTEXT_SIZE", "2048")
    monkeypatch.setenv("LLM_LLAMA_SERVICE_MAX_BATCH_SIZE", "3")
    s = Settings()
    assert (s.context_size, s.max_batch_size, s.http_port, s.grpc_port, s.metrics_port) == \
        (2048, 3, 16070, 16071, 16072)
    assert s.effective_log_format == "console"
    monkeypatch.setenv("LLM_LLAMA_SERVICE_ENV", "production")
    assert Settings().effective_log_format == "json"


def test_every_setting_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


@pytest.mark.parametrize("env, needle", [
    ({"LLM_LLAMA_SERVICE_CONTEXT_SIZE": "lots"}, "LLM_LLAMA_SERVICE_CONTEXT_SIZE"),
    ({"LLM_LLAMA_SERVICE_MAX_BATCH_SIZE": "0"}, "LLM_LLAMA_SERVICE_MAX_BATCH_SIZE"),
    ({"LLM_LLAMA_SERVICE_LOG_FORMAT": "xml"}, "LLM_LLAMA_SERVICE_LOG_FORMAT"),
    ({"LLM_LLAMA_SERVICE_GRPC_CA_PATH": "/x"}, "GRPC_CERT_PATH"),
])
def test_invalid_values_stop_start_up_with_one_clear_line(env, needle) -> None:
    import os

    r = subprocess.run([sys.executable, "-m", "llamafleet.common.cli", "serve"],
                       env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    lines = [line for line in r.stderr.splitlines() if line.startswith("llamafleet:")]
    assert len(lines) == 1 and needle in lines[0], r.stderr


def test_flags_override_env_and_unset_flags_keep_it(monkeypatch) -> None:
    import argparse

    from llamafleet.common import cli

    monkeypatch.setenv("LLM_LLAMA_SERVICE_CONTEXT_SIZE", "2048")
    monkeypatch.setenv("LLM_LLAMA_SERVICE_MAX_BATCH_SIZE", "3")
    p = argparse.ArgumentParser()
    cli.add_settings_flags(p, Settings)
    s = cli.load_settings(p.parse_args(["--context-size", "512", "--http-tls", "--grpc-ca-path",
                                        "/a", "--grpc-cert-path", "/b", "--grpc-key-path", "/c"]),
                          Settings)
    assert s.context_size == 512 and s.http_tls is True
    assert s.max_batch_size == 3  # from env: the flag was not given


def test_serve_help_lists_env_vars(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert "--max-batch-size" in out and "LLM_LLAMA_SERVICE_MAX_BATCH_SIZE" in out


def test_missing_model_file_is_a_clear_error(tmp_path) -> None:
    from llamafleet.inference.model import ModelError, resolve_model_path

    with pytest.raises(ModelError, match="not found"):
        resolve_model_path(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOTGGUF")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model_path(bad)


def test_json_logs_carry_extra_fields() -> None:
    rec = logging.LogRecord("x", logging.INFO, "f", 1, "request %s", ("done",), None)
    rec.request_id, rec.ttft_s = "abc", 0.1
    out = json.loads(JSONFormatter().format(rec))
    assert out["msg"] == "request done" and out["request_id"] == "abc" and out["ttft_s"] == 0.1


def test_request_id_from_headers() -> None:
    assert request_id_from_headers({"x-request-id": "r1"}) == "r1"
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert request_id_from_headers({"traceparent": tp}) == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert len(request_id_from_headers({})) == 32


def test_chat_template_fallback_for_gemma_puts_system_into_the_first_turn() -> None:
    from llamafleet.inference.model import ChatFormatter

    f = ChatFormatter.for_model(None, {"general.architecture": "gemma3"}, "<bos>", "<eos>")
    text = f.render([{"role": "system", "content": "Be brief."},
                     {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                     {"role": "user", "content": "Bye"}])
    assert text == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n"
                    "<start_of_turn>model\nHello<end_of_turn>\n"
                    "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    chatml = ChatFormatter.for_model(None, {"general.architecture": "qwen2"}, "", "")
    assert chatml.render([{"role": "user", "content": "x"}]).endswith("<|im_start|>assistant\n")


def test_chat_template_is_sandboxed() -> None:
    from jinja2.exceptions import SecurityError
    from llamafleet.inference.model import ChatFormatter

    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(SecurityError):
        ChatFormatter(evil, "", "").render([{"role": "user", "content": "x"}])


def test_request_size_cap_follows_the_context_unless_set() -> None:
    assert Settings(context_size=4096).request_bytes_limit == 1024 * 1024 + 32 * 4096
    assert Settings(context_size=4096, max_request_bytes=5000).request_bytes_limit == 5000
    assert (Settings().drain_timeout_s, Settings().engine_stall_timeout_s) == (25, 60)
