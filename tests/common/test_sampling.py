"""The one sampling-parameters model: ranges, defaults, layering, and the CRD held to it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from llamafleet.common.protocol import ChatCompletionRequest
from llamafleet.common.sampling import DEFAULTS, SamplingParameters
from llamafleet.inference.settings import Settings
from llamafleet.operator.spec import Sampling
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]


def snake(camel: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", camel).lower()


def test_a_request_wins_over_pod_defaults_which_win_over_the_built_in_ones() -> None:
    request = SamplingParameters(temperature=0.0, seed=7)
    pod = SamplingParameters(temperature=1.5, top_k=5, max_tokens=9)
    merged = request.over(pod, DEFAULTS)
    assert merged == SamplingParameters(
        temperature=0.0, seed=7, top_k=5, max_tokens=9, top_p=DEFAULTS.top_p, min_p=DEFAULTS.min_p,
        repeat_penalty=DEFAULTS.repeat_penalty, presence_penalty=0.0, frequency_penalty=0.0)


def test_built_in_defaults_set_everything_but_the_seed() -> None:
    unset = {k for k, v in DEFAULTS.model_dump().items() if v is None}
    assert unset == {"seed"}


def test_the_pod_settings_default_to_the_built_in_values_and_layer_over_them() -> None:
    assert Settings().sampling_defaults.over(DEFAULTS) == DEFAULTS
    s = Settings(default_temperature=0.1, default_top_k=3)
    merged = SamplingParameters(top_k=8).over(s.sampling_defaults, DEFAULTS)
    assert (merged.temperature, merged.top_k) == (0.1, 8)


@pytest.mark.parametrize("field, bad", [
    ("temperature", 2.5), ("temperature", float("nan")), ("top_p", 0.0), ("top_k", -1),
    ("min_p", 1.5), ("repeat_penalty", 0.0), ("presence_penalty", -3.0), ("max_tokens", 0),
    ("seed", 2**63),
])
def test_each_transport_and_setting_refuses_the_same_out_of_range_value(field, bad) -> None:
    with pytest.raises(ValidationError):
        SamplingParameters(**{field: bad})
    with pytest.raises(ValidationError):  # HTTP
        ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **{field: bad})
    if f"default_{field}" in Settings.model_fields:
        with pytest.raises(ValidationError):
            Settings(**{f"default_{field}": bad})
    camel = re.sub(r"_([a-z])", lambda m: m.group(1).upper(), field)
    if camel in Sampling.model_fields:
        with pytest.raises(ValidationError):
            Sampling(**{camel: bad})


def _bounds(schema: dict) -> dict:
    """A property's numeric bounds, OpenAPI 3.0 style (as the CRD writes them)."""
    if "anyOf" in schema:  # pydantic: X | None
        schema = next(s for s in schema["anyOf"] if s.get("type") != "null")
    out = {"type": schema["type"]}
    for key in ("minimum", "maximum"):
        if key in schema:
            out[key] = schema[key]
    exclusive = schema.get("exclusiveMinimum")
    if isinstance(exclusive, bool):  # OpenAPI 3.0: a flag on minimum
        out["exclusiveMinimum"] = exclusive
    elif exclusive is not None:  # JSON Schema 2020-12 (pydantic): the bound itself
        out.update(minimum=exclusive, exclusiveMinimum=True)
    return out


def test_the_crd_sampling_schema_is_the_models() -> None:
    # (the chart's copy is held to crds/ in tests/operator/test_builders.py)
    crd = yaml.safe_load((ROOT / "crds/llmservice.yaml").read_text())
    spec = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    crd_sampling = spec["properties"]["sampling"]["properties"]
    assert set(crd_sampling) == set(Sampling.model_fields)
    model = SamplingParameters.model_json_schema()["properties"]
    for name, schema in crd_sampling.items():
        assert _bounds(schema) == _bounds(model[snake(name)]), name


def test_the_engine_http_and_grpc_default_alike() -> None:
    """A request that sets nothing samples as the engine's own defaults say, over HTTP and
    gRPC alike: all three are the one model's DEFAULTS (the engine once capped at 256)."""
    from llamafleet.inference import grpc_server
    from llamafleet.inference.engine import SamplingParams
    from llamafleet.inference.front_doors import openai_chat
    from llamafleet.inference.proto import local_pb2 as pb
    from llamafleet.inference.serving import Serving

    class Pod:
        """What the transports use of a Serving: its real sampling(), no model."""

        settings = Settings()
        sampling = Serving.sampling

        def chat_prompt(self, messages, rag_context=None, tools=None) -> list[int]:
            return [1]

    pod = Pod()
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    conv = openai_chat.conversation(body)  # the chat front door's request -> the core's input
    http = pod.sampling(conv.sampling, stop=conv.stop)
    rpc = grpc_server.conversation(pb.LLMLocalServiceGenerateStreamRequest(user_prompt="hi"))
    grpc = pod.sampling(rpc.sampling, stop=rpc.stop)
    engine = SamplingParams()
    assert http == grpc == engine == SamplingParams(**DEFAULTS.model_dump())
    assert engine.max_tokens == 1024
