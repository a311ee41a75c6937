"""/v1/embeddings on the real instruct model, judged by the official client."""

from __future__ import annotations

import base64

import httpx
import numpy as np
import openai
import pytest

pytestmark = pytest.mark.integration

TEXTS = ["The cat sat on the mat.", "Kubernetes schedules pods onto nodes.",
         "A short one", "Llamas are domesticated South American camelids."]


@pytest.fixture()
def client(instruct_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=instruct_server.url + "/v1", api_key="unused", max_retries=0)


def vectors(client, inputs, **kw) -> np.ndarray:
    r = client.embeddings.create(model=client.models.list().data[0].id, input=inputs, **kw)
    assert [d.index for d in r.data] == list(range(len(r.data)))
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def test_embeddings_are_deterministic_normalised_and_batch_consistent(client) -> None:
    batch = vectors(client, TEXTS)
    assert batch.shape[0] == len(TEXTS) and batch.shape[1] > 100
    np.testing.assert_allclose(np.linalg.norm(batch, axis=1), 1, atol=1e-5)
    np.testing.assert_array_equal(vectors(client, TEXTS), batch)  # deterministic
    alone = np.concatenate([vectors(client, t) for t in TEXTS])
    # One input alone or among others: the same vector (batch shapes differ, so within
    # float tolerance).
    np.testing.assert_allclose(alone, batch, atol=2e-3)
    assert np.all(np.sum(alone * batch, axis=1) > 0.9999)
    # Different texts, different vectors.
    assert float(batch[0] @ batch[1]) < 0.999


def test_base64_and_token_arrays(client, instruct_server) -> None:
    floats = vectors(client, TEXTS[0])
    r = client.embeddings.create(model=client.models.list().data[0].id, input=TEXTS[0],
                                 encoding_format="base64")
    # Little-endian float32, as OpenAI sends it.
    decoded = np.frombuffer(base64.b64decode(r.data[0].embedding), dtype="<f4")
    np.testing.assert_array_equal(decoded, floats[0])
    model = instruct_server.serving.model
    ids = model.tokenize(TEXTS[0], model.add_bos)
    np.testing.assert_array_equal(vectors(client, [ids]), floats)
    assert r.usage.prompt_tokens == len(ids)


@pytest.mark.parametrize("body, param", [
    ({"input": "x", "dimensions": 3}, "dimensions"),
    ({"input": ""}, "input"),
    ({"input": [[10 ** 9]]}, "prompt"),
    ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
    ({"input": "x", "colour": 1}, "colour"),
])
def test_bad_embedding_requests(instruct_server, body, param) -> None:
    r = httpx.post(instruct_server.url + "/v1/embeddings", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param
