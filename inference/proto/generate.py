"""Regenerate the gRPC stubs from the .proto (reproducible: pinned grpcio-tools, fixed flags).

    python -m llamafleet.inference.proto.generate          # write the stubs
    python -m llamafleet.inference.proto.generate --check  # fail if they are stale
"""

from __future__ import annotations

import sys
import tempfile
from importlib import resources
from pathlib import Path

HERE = Path(__file__).parent
PROTO = "sentiric/llm/v1/local.proto"
OUTPUTS = ("local_pb2.py", "local_pb2.pyi", "local_pb2_grpc.py")


def generate() -> dict[str, str]:
    from grpc_tools import protoc

    include = str(resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory() as out:
        rc = protoc.main(["protoc", f"-I{HERE}", f"-I{include}", f"--python_out={out}",
                          f"--pyi_out={out}", f"--grpc_python_out={out}", str(HERE / PROTO)])
        if rc != 0:
            raise SystemExit(f"protoc failed with {rc}")
        gen = Path(out) / Path(PROTO).parent
        files = {name: (gen / name).read_text() for name in OUTPUTS}
    # protoc writes absolute imports; the stubs live inside our package.
    files["local_pb2_grpc.py"] = files["local_pb2_grpc.py"].replace(
        "from sentiric.llm.v1 import local_pb2", "from . import local_pb2")
    return files


def main(argv: list[str]) -> int:
    files = generate()
    if "--check" in argv:
        stale = [n for n, text in files.items()
                 if not (HERE / n).exists() or (HERE / n).read_text() != text]
        if stale:
            print(f"stale gRPC stubs: {stale}; run python -m llamafleet.inference.proto.generate")
            return 1
        return 0
    for name, text in files.items():
        (HERE / name).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
