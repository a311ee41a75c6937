"""gRPC `sentiric.llm.v1.LLMLocalService` over mutual TLS, with hot certificate reload.

The servicer is a front door like the HTTP ones: it turns the contract's request into the
generation core's :class:`Conversation` and streams the core's turn, so gRPC and HTTP users
share one prompt path, one set of parameter checks and one batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

import grpc
from google.protobuf import json_format
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from llamafleet.common import protocol as P
from llamafleet.common import tenants, tracing
from llamafleet.common.contract import env_name
from llamafleet.common.errors import BadRequest, LlamafleetError, RateLimited, Unauthorized, mapping_for
from llamafleet.common.logs import request_id_from_headers
from llamafleet.common.sampling import SamplingParameters
from llamafleet.common.tenants import Caller
from pydantic import ValidationError

from .generation_core import Conversation, Core, Done
from .proto import local_pb2 as pb
from .proto import local_pb2_grpc as pb_grpc
from .serving import Serving
from .settings import Settings
from .tls import WatchedFiles

log = logging.getLogger(__name__)

SERVICE = "sentiric.llm.v1.LLMLocalService"
ROLES = {"user": "user", "assistant": "assistant", "model": "assistant", "system": "system"}
# engine_specific_params keys and their types; anything else is refused by name.
ENGINE_PARAMS = {"min_p": float, "presence_penalty": float, "frequency_penalty": float,
                 "ignore_eos": bool, "json": bool}
# GenerationParams fields named otherwise in SamplingParameters, and back.
SAMPLING_NAMES = {"max_new_tokens": "max_tokens", "repetition_penalty": "repeat_penalty"}
CONTRACT_NAMES = {v: k for k, v in SAMPLING_NAMES.items()} | {
    k: k for k in ("temperature", "top_k", "top_p", "seed")}


def conversation(req: pb.LLMLocalServiceGenerateStreamRequest) -> Conversation:
    """Contract request -> the core's input: the system prompt, the history, the user prompt
    (with its RAG context) and the sampling parameters. Raises BadRequest naming the
    contract's field. The text streams as the model writes it (``reasoning_format`` none:
    the contract has no place for thoughts)."""
    messages = []
    if req.system_prompt:
        messages.append(P.ChatMessage(role="system", content=req.system_prompt))
    for i, turn in enumerate(req.history):
        role = ROLES.get(turn.role.lower())
        if role is None:
            raise BadRequest(f"history[{i}].role must be user, assistant or system, "
                             f"got {turn.role!r}", param=f"history[{i}].role")
        messages.append(P.ChatMessage(role=role, content=turn.content))
    if not req.user_prompt.strip():
        raise BadRequest("user_prompt must not be empty", param="user_prompt")
    messages.append(P.ChatMessage(role="user", content=req.user_prompt))
    sampling, options = _sampling(req.params)
    return Conversation(messages, sampling=sampling, stop=tuple(req.params.stop_sequences),
                        stop_param="params.stop_sequences", max_tokens_param="params.max_new_tokens",
                        rag_context=req.rag_context if req.HasField("rag_context") else None,
                        reasoning_format="none", prompt_param="user_prompt", **options)


def _sampling(p: pb.GenerationParams) -> tuple[SamplingParameters, dict[str, bool]]:
    """GenerationParams -> SamplingParameters and the engine options (ignore_eos, json)."""
    # Contract name -> SamplingParameters name; the model checks the ranges (as for HTTP).
    given = {SAMPLING_NAMES.get(name, name): getattr(p, name)
             for name in ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty",
                          "seed") if p.HasField(name)}
    options: dict[str, bool] = {}
    if p.HasField("engine_specific_params"):
        extra = json_format.MessageToDict(p.engine_specific_params)
        unknown = sorted(set(extra) - set(ENGINE_PARAMS))
        if unknown:
            raise BadRequest(f"unknown engine_specific_params {unknown}; supported: "
                             f"{sorted(ENGINE_PARAMS)}", param="params.engine_specific_params")
        for key, value in extra.items():
            want = ENGINE_PARAMS[key]
            if want is bool and not isinstance(value, bool) or \
                    want is float and (isinstance(value, bool) or not isinstance(value, (int, float))):
                raise BadRequest(f"engine_specific_params.{key} must be a {want.__name__}",
                                 param=f"params.engine_specific_params.{key}")
            if want is float:
                given[key] = value
        options = {"ignore_eos": bool(extra.get("ignore_eos", False)),
                   "json_object": bool(extra.get("json", False))}
    try:
        return SamplingParameters(**given), options
    except ValidationError as e:
        err = e.errors()[0]
        field = str(err["loc"][0])
        name = CONTRACT_NAMES.get(field, f"engine_specific_params.{field}")
        raise BadRequest(f"params.{name}: {err['msg']}, got {err['input']!r}",
                         param=f"params.{name}") from None


class LLMLocalServicer(pb_grpc.LLMLocalServiceServicer):
    """A thin front door: the contract's request -> :func:`conversation` -> the core's turn,
    whose steps go out as tokens and whose end goes out as FinishDetails."""

    def __init__(self, serving: Serving):
        self.core = Core(serving)

    async def GenerateStream(self, request, context: grpc.aio.ServicerContext):
        metadata = dict(context.invocation_metadata() or ())
        rid = request_id_from_headers(metadata)
        caller = Caller()
        try:
            caller = self.caller(metadata)
            prepared = await self.core.prepare(conversation(request))
            turn = self.core.start(prepared, api="grpc", request_id=rid, caller=caller,
                                   trace=tracing.extract(metadata))
        except LlamafleetError as e:
            if caller.lease is not None:
                caller.lease.release()
            await context.abort(grpc_status(e), e.message)
            return
        try:
            async for step in turn.steps():
                if isinstance(step, Done):
                    yield pb.LLMLocalServiceGenerateStreamResponse(
                        finish_details=pb.FinishDetails(
                            finish_reason=step.reason, prompt_tokens=step.prompt_tokens,
                            completion_tokens=step.completion_tokens))
                elif step.content:
                    yield pb.LLMLocalServiceGenerateStreamResponse(token=step.content)
        except LlamafleetError as e:
            await context.abort(grpc_status(e), e.message)
        finally:
            turn.cancel()  # client gone or done: free the sequence at the next step
            if caller.lease is not None:
                caller.lease.release()

    def caller(self, metadata: dict) -> Caller:
        """The tenant of a call that presents a tenant's key (``authorization: Bearer <key>``
        metadata) when the pod has a tenants file, admitted by its limits; no key: no tenant
        (mutual TLS is gRPC's authentication)."""
        serving = self.core.serving
        tf = serving.tenants
        token = tenants.bearer_token(str(metadata.get("authorization", "")))
        if tf is None or token is None:
            return Caller()
        config = tf.current()
        entry = config.lookup(token)
        if entry is None:
            raise Unauthorized("Incorrect API key provided in the 'authorization' metadata.")
        caller = Caller(entry.tenant, tenants.priority_of(
            entry, metadata.get(tenants.OBJECTIVE_HEADER)))
        label = tenants.tenant_label(entry.tenant, config)
        try:
            caller.lease = serving.limiter.admit(entry.tenant, config.limits.get(entry.tenant,
                                                                                tenants.Limits()))
        except RateLimited as e:
            serving.metrics.tenant_rejected.labels(label, e.reason).inc()
            raise
        serving.metrics.tenant_requests.labels(label).inc()
        return caller


def grpc_status(err: LlamafleetError) -> grpc.StatusCode:
    """The gRPC status of a domain error (its row in common.errors.ERROR_TABLE)."""
    return grpc.StatusCode[mapping_for(err).grpc_status]


class ReloadingCredentials:
    """Server credentials that re-read the PEM files on each new handshake.

    Kubernetes updates a mounted Secret by swapping files in place; gRPC's dynamic
    credentials ask us for a new configuration per handshake, and we give one only when
    the files' content changed. Open connections keep the certificate they began with.
    """

    def __init__(self, ca: Path, cert: Path, key: Path):
        self.files = WatchedFiles(ca, cert, key)

    def _config(self, material: tuple[bytes, ...]):
        ca, cert, key = material
        return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=ca)

    def fetch(self):
        material = self.files.changed()
        if material is None:
            return None
        self.files.commit(material)
        return self._config(material)

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(
            self._config(self.files.current), self.fetch, require_client_authentication=True)


async def start_grpc(settings: Settings, serving: Serving, port: int | None = None
                     ) -> grpc.aio.Server:
    server = grpc.aio.server(options=[
        ("grpc.so_reuseport", 0),
        ("grpc.max_receive_message_length", settings.request_bytes_limit)])
    pb_grpc.add_LLMLocalServiceServicer_to_server(LLMLocalServicer(serving), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = settings.grpc_port if port is None else port
    if settings.tls_enabled:
        creds = ReloadingCredentials(settings.grpc_ca_path, settings.grpc_cert_path,  # type: ignore[arg-type]
                                     settings.grpc_key_path)  # type: ignore[arg-type]
        bound = server.add_secure_port(f"{settings.host}:{port}", creds.credentials())
        log.info("gRPC on %s:%d with mutual TLS", settings.host, bound)
    else:
        bound = server.add_insecure_port(f"127.0.0.1:{port}")
        log.warning("gRPC on 127.0.0.1:%d WITHOUT TLS (loopback only): set %s, _CERT_PATH and "
                    "_KEY_PATH for mTLS", bound, env_name("grpc_ca_path"))
    server.bound_port = bound  # type: ignore[attr-defined]
    await server.start()
    for name in ("", SERVICE):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    return server
