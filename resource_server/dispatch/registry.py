"""The one registry of backends: the class that serves each name stored in `Endpoint.backend`.

Names, labels and config models are in `backend_kinds.py` (which models can import without loading any
backend); importing this module checks that both name the same backends with the same config models, so a
backend missing from either fails at boot, not on the first request.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.exceptions import ImproperlyConfigured
from pydantic import BaseModel

from resource_server.adapters.relay import RelayHub
from resource_server.backend_kinds import BACKEND_KINDS
from resource_server.dispatch.base import Backend
from resource_server.dispatch.direct import DirectBackend, DirectConfig
from resource_server.dispatch.globus_compute import ComputeEndpoints, GlobusComputeBackend, GlobusComputeConfig
from resource_server.dispatch.local import LocalBackend, LocalConfig, LocalExecutors
from resource_server.errors import GatewayError


@dataclass(frozen=True, slots=True)
class BackendParts:
    """What backends share across endpoints, handed to each backend the pool builds."""

    relay_hub: RelayHub
    compute_endpoints: ComputeEndpoints
    local_executors: LocalExecutors


@dataclass(frozen=True)
class Registered:
    config_model: type[BaseModel]
    build: Callable[[Any, BackendParts], Backend]


def registered(backends: dict[str, Registered]) -> dict[str, Registered]:
    """`backends`, once checked against `BACKEND_KINDS`; raise ImproperlyConfigured on any difference."""
    if set(backends) != set(BACKEND_KINDS):
        raise ImproperlyConfigured(
            f"The backend registry ({', '.join(sorted(backends))}) and backend_kinds "
            f"({', '.join(sorted(BACKEND_KINDS))}) name different backends."
        )
    for name, backend in backends.items():
        if BACKEND_KINDS[name].config_model() is not backend.config_model:
            raise ImproperlyConfigured(
                f"Backend {name!r}: backend_kinds names {BACKEND_KINDS[name].config_path}, "
                f"the registry {backend.config_model.__module__}:{backend.config_model.__qualname__}."
            )
    return backends


BACKENDS: dict[str, Registered] = registered(
    {
        "direct": Registered(DirectConfig, lambda config, _parts: DirectBackend(config)),
        "globus_compute": Registered(
            GlobusComputeConfig,
            lambda config, parts: GlobusComputeBackend(
                config, relay_hub=parts.relay_hub, endpoints=parts.compute_endpoints
            ),
        ),
        "local": Registered(
            LocalConfig,
            lambda config, parts: LocalBackend(config, relay_hub=parts.relay_hub, executors=parts.local_executors),
        ),
    }
)


class BackendPool:
    """Live backend instances, one per endpoint and config; a changed config gets a fresh instance.

    Built by the composition root (`resource_server/bootstrap.py`), which hands it the parts backends share.
    """

    def __init__(self, parts: BackendParts) -> None:
        self.parts = parts
        # endpoint id -> (backend name, config as JSON, the config object last seen, the instance)
        self._live: dict[int, tuple[str, str, BaseModel, Backend]] = {}
        self._closing: set[asyncio.Task[None]] = set()
        self._waking: set[asyncio.Task[None]] = set()

    def get(self, endpoint_id: int, backend: str, config: BaseModel) -> Backend:
        live = self._live.get(endpoint_id)
        if live is not None and live[2] is config and live[0] == backend:
            return live[3]  # the routing table hands the same config object until it reloads: no dump per request
        dumped = config.model_dump_json()
        if live is not None and live[:2] == (backend, dumped):
            self._live[endpoint_id] = (backend, dumped, config, live[3])
            return live[3]
        instance = BACKENDS[backend].build(config, self.parts)
        self._live[endpoint_id] = (backend, dumped, config, instance)
        if live is not None:
            with contextlib.suppress(RuntimeError):  # no running loop: nothing open to close
                closing = asyncio.get_running_loop().create_task(live[3].aclose())
                # Keep a reference until it is done: the loop holds tasks only weakly.
                self._closing.add(closing)
                closing.add_done_callback(self._closing.discard)
        return instance

    def wake(self, endpoint_id: int, backend: str, config: BaseModel) -> None:
        """Ask the endpoint to start its model (`Backend.wake`) in the background: a cold answer never waits."""
        try:
            instance = self.get(endpoint_id, backend, config)
        except GatewayError:
            return  # a misconfigured backend (logged where it was built) has nothing to wake
        waking = asyncio.get_running_loop().create_task(instance.wake())
        self._waking.add(waking)  # the loop holds tasks only weakly
        waking.add_done_callback(self._waking.discard)
