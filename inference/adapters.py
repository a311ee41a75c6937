"""LoRA adapters on the served model: their names, and loading and unloading them at start-up
(``--lora NAME=PATH[:SCALE]``) and at run time (``POST /v1/adapters``, ``DELETE
/v1/adapters/{name}``).

A request whose ``model`` names an adapter runs with it: :meth:`Adapters.submit` turns the name
into the request's adapter set (``()`` for the base model) and submits the request while it
holds the registry's lock, so an adapter can never be freed between the look-up and the
engine's record of the request. llama.cpp's model keeps a list of its adapters that each
context reads when it reserves its compute graph, so loading and freeing happen on the engine
thread (:meth:`Engine.call`), between two steps. Unloading an adapter that running or waiting
requests use is refused with 409 ``adapter_in_use`` (the caller retries once they are done);
new requests cannot name it once it is gone.

No llama.cpp here: the backend (``load_adapter``, ``free_adapter``) does the loading.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from llamafleet.common.contract import ADAPTER_NAME_PATTERN
from llamafleet.common.errors import BadRequest, Conflict, ModelNotFound

NAME = re.compile(ADAPTER_NAME_PATTERN)  # an adapter's name (the contract says which)
LOAD_TIMEOUT_S = 300  # a load waits for the engine's current step, then reads the file


@dataclass(frozen=True, eq=False)
class Adapter:
    """One loaded adapter. Compared by identity: an adapter loaded again under the same name is
    another adapter, and cells cached under the old one never serve it."""

    name: str
    path: Path
    scale: float
    handle: Any  # the backend's (llama_adapter_lora *)
    created: int

    def __repr__(self) -> str:
        return f"Adapter({self.name!r}, scale={self.scale:g})"


def parse_spec(spec: str) -> tuple[str, Path, float]:
    """``NAME=PATH[:SCALE]`` (the ``--lora`` flag) -> (name, path, scale); scale 1 unless given.
    ValueError says what is wrong."""
    name, sep, rest = spec.partition("=")
    if not sep or not rest:
        raise ValueError(f"{spec!r} is not NAME=PATH[:SCALE]")
    check_name(name)
    path, scale = rest, 1.0
    head, colon, tail = rest.rpartition(":")
    if colon and head:
        try:
            scale = float(tail)
        except ValueError:
            pass  # a colon in the path itself
        else:
            path = head
    check_scale(scale)
    return name, Path(path), scale


def check_name(name: str) -> None:
    if not NAME.fullmatch(name):
        raise ValueError(f"adapter name {name!r}: 1 to 128 letters, digits and . _ - / :, "
                         "starting with a letter or digit")


def check_scale(scale: float) -> None:
    if not math.isfinite(scale):
        raise ValueError(f"adapter scale {scale}: must be a finite number")


class AdapterBackend(Protocol):
    def load_adapter(self, path: Path) -> Any: ...

    def free_adapter(self, handle: Any) -> None: ...


class EngineCalls(Protocol):
    def call(self, fn: Callable[[], Any]) -> Any: ...

    def requests_with(self, uses: Callable[[tuple], bool]) -> int: ...


class Adapters:
    """The loaded adapters by name; thread-safe."""

    def __init__(self, base_id: str, engine: EngineCalls, backend: AdapterBackend):
        self.base_id = base_id
        self._engine = engine
        self._backend = backend
        self._lock = threading.Lock()
        self._by_name: dict[str, Adapter] = {}
        self._loading: set[str] = set()

    def all(self) -> list[Adapter]:
        with self._lock:
            return list(self._by_name.values())

    def resolve(self, model: str | None) -> tuple[Adapter, ...]:
        """A request's ``model`` as an adapter set: () for the base model (also when ``model``
        is empty or missing); ModelNotFound (404 model_not_found) for an unknown name."""
        if not model or model == self.base_id:
            return ()
        adapter = self._by_name.get(model)
        if adapter is None:
            known = ", ".join(repr(n) for n in [self.base_id, *self._by_name])
            raise ModelNotFound(f"The model '{model}' does not exist. This server serves "
                                f"{known}.", param="model")
        return (adapter,)

    def submit(self, model: str | None, submit: Callable[[tuple[Adapter, ...]], Any]) -> Any:
        """``submit(adapter set)`` under the lock that unloading takes: the request is in the
        engine's books before the adapter could be freed."""
        with self._lock:
            return submit(self.resolve(model))

    def load(self, name: str, path: Path, scale: float = 1.0) -> Adapter:
        """Loads an adapter under a new name (blocking: the engine thread reads the file
        between two steps). BadRequest for a bad name, scale or file; Conflict (409
        adapter_exists) for a name taken."""
        try:
            check_name(name)
        except ValueError as e:
            raise BadRequest(str(e), param="name") from None
        try:
            check_scale(scale)
        except ValueError as e:
            raise BadRequest(str(e), param="scale") from None
        if not path.is_absolute():
            raise BadRequest(f"path {str(path)!r}: give an absolute path on the pod",
                             param="path")
        if not path.is_file():
            raise BadRequest(f"path {str(path)!r}: no such file on the pod", param="path",
                             code="adapter_file_not_found")
        with self._lock:
            if name == self.base_id or name in self._by_name or name in self._loading:
                raise Conflict(f"The name '{name}' is taken"
                               + (" by the base model" if name == self.base_id else "")
                               + "; unload it first, or choose another name.", param="name",
                               code="adapter_exists")
            self._loading.add(name)
        try:
            handle = self._engine.call(lambda: self._backend.load_adapter(path)).result(
                LOAD_TIMEOUT_S)
            adapter = Adapter(name, path, scale, handle, int(time.time()))
            with self._lock:
                self._by_name[name] = adapter
            return adapter
        finally:
            with self._lock:
                self._loading.discard(name)

    def unload(self, name: str) -> Adapter:
        """Frees an adapter (blocking, on the engine thread). ModelNotFound for an unknown
        name; Conflict (409 adapter_in_use) while running or waiting requests use it."""

        def free() -> Adapter:
            with self._lock:
                adapter = self._by_name.get(name)
                if adapter is None:
                    raise ModelNotFound(f"No adapter named '{name}' is loaded.", param="name",
                                        code="adapter_not_found")
                n = self._engine.requests_with(lambda key: adapter in key)
                if n:
                    raise Conflict(f"The adapter '{name}' is in use by {n} running or waiting "
                                   "requests; retry when they have finished.",
                                   param="name", code="adapter_in_use")
                del self._by_name[name]
            self._backend.free_adapter(adapter.handle)
            return adapter

        return self._engine.call(free).result(LOAD_TIMEOUT_S)
