"""The pod contract (llamafleet.common.contract) is what the images and the distribution say."""

from __future__ import annotations

from importlib.metadata import version
from pathlib import Path

import pytest
from llamafleet.common import contract as C

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("dockerfile", ["docker/Dockerfile", "docker/Dockerfile.cuda"])
def test_images_run_as_the_contracts_user_and_expose_its_ports(dockerfile: str) -> None:
    lines = (ROOT / dockerfile).read_text().splitlines()
    assert f"USER {C.USER_ID}:{C.USER_ID}" in lines
    assert f"EXPOSE {C.HTTP_PORT} {C.GRPC_PORT} {C.METRICS_PORT}" in lines
    assert "COPY common /src/common" in lines  # the image installs llamafleet.common


def test_the_distribution_version_is_the_contracts() -> None:
    assert version("llamafleet") == C.VERSION
    assert C.GPU_IMAGE_TAG == f"{C.VERSION}-cuda"


def test_env_name_follows_the_prefix() -> None:
    assert C.env_name("context_size") == "LLM_LLAMA_SERVICE_CONTEXT_SIZE"
