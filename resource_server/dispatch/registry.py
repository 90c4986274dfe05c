"""The one registry of backends, by the name stored in `Endpoint.backend`."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from resource_server.dispatch.base import Backend
from resource_server.dispatch.direct import DirectBackend, DirectConfig
from resource_server.dispatch.globus_compute import GlobusComputeBackend, GlobusComputeConfig
from resource_server.dispatch.local import LocalBackend, LocalConfig


@dataclass(frozen=True)
class BackendKind:
    name: str
    label: str
    config_model: type[BaseModel]
    build: Callable[[Any], Backend]
    # Heavy modules the backend imports where it uses them: loaded ahead of time, off the event loop.
    preload: tuple[str, ...] = ()

    def load_modules(self) -> None:
        for module in self.preload:
            importlib.import_module(module)


BACKENDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind("direct", "Direct HTTP (OpenAI-compatible server)", DirectConfig, DirectBackend),
        BackendKind(
            "globus_compute",
            "Globus Compute endpoint",
            GlobusComputeConfig,
            GlobusComputeBackend,
            preload=("globus_compute_sdk", "resource_server.dispatch.compute_serde"),
        ),
        BackendKind(
            "local",
            "Local process pool (demo / workstation)",
            LocalConfig,
            LocalBackend,
            preload=("resource_server.dispatch.compute_serde",),
        ),
    )
}
BACKEND_CHOICES = [(kind.name, kind.label) for kind in BACKENDS.values()]


def backend_config_errors(backend: str, config: object) -> list[str]:
    """Human-readable problems with an Endpoint's backend config, each naming the field."""
    kind = BACKENDS.get(backend)
    if kind is None:
        return [f"Unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}."]
    try:
        kind.config_model.model_validate(config)
    except ValidationError as exc:
        return [f"{'.'.join(str(part) for part in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()]
    return []


class BackendPool:
    """Live backend instances, one per endpoint and config; a changed config gets a fresh instance."""

    def __init__(self) -> None:
        self._live: dict[int, tuple[tuple[str, str], Backend]] = {}
        self._closing: set[asyncio.Task[None]] = set()

    def get(self, endpoint_id: int, backend: str, config: BaseModel) -> Backend:
        identity = (backend, config.model_dump_json())
        live = self._live.get(endpoint_id)
        if live is not None and live[0] == identity:
            return live[1]
        instance = BACKENDS[backend].build(config)
        self._live[endpoint_id] = (identity, instance)
        if live is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing open to close
                closing = asyncio.get_running_loop().create_task(live[1].aclose())
                # Keep a reference until it is done: the loop holds tasks only weakly.
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        return instance


backend_pool = BackendPool()
