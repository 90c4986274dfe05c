"""The backends by name: what models, the admin and the routing table need, without importing any backend.

`Endpoint.backend` holds one of these names. Each backend's config model is found from its dotted path when
first needed, so `django.setup()` (models, admin) loads no backend, SDK or relay. The backend classes are in
`dispatch/registry.py`, which checks at import (so at boot) that it registers exactly these names with
exactly these config models.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

from pydantic import BaseModel, ValidationError


@dataclass(frozen=True, slots=True)
class BackendKind:
    name: str
    label: str
    config_path: str  # "module:Class" of the pydantic model that validates `Endpoint.backend_config`
    # Heavy modules the backend imports where it uses them: loaded ahead of time, off the event loop.
    preload: tuple[str, ...] = ()

    def config_model(self) -> type[BaseModel]:
        return _config_model(self.config_path)

    def load_modules(self) -> None:
        for module in self.preload:
            importlib.import_module(module)


@functools.cache
def _config_model(path: str) -> type[BaseModel]:
    module, _, name = path.partition(":")
    model = getattr(importlib.import_module(module), name)
    if not (isinstance(model, type) and issubclass(model, BaseModel)):
        raise TypeError(f"{path} is not a pydantic model")
    return model


BACKEND_KINDS: dict[str, BackendKind] = {
    kind.name: kind
    for kind in (
        BackendKind(
            "direct",
            "Direct HTTP (OpenAI-compatible server)",
            "resource_server.dispatch.direct:DirectConfig",
        ),
        BackendKind(
            "globus_compute",
            "Globus Compute endpoint",
            "resource_server.dispatch.globus_compute:GlobusComputeConfig",
            preload=("globus_compute_sdk", "resource_server.dispatch.compute_serde"),
        ),
        BackendKind(
            "local",
            "Local process pool (demo / workstation)",
            "resource_server.dispatch.local:LocalConfig",
            preload=("resource_server.dispatch.compute_serde",),
        ),
    )
}
BACKEND_CHOICES = [(kind.name, kind.label) for kind in BACKEND_KINDS.values()]


def backend_config_errors(backend: str, config: object) -> list[str]:
    """Human-readable problems with an Endpoint's backend config, each naming the field."""
    kind = BACKEND_KINDS.get(backend)
    if kind is None:
        return [f"Unknown backend {backend!r}; choose one of {', '.join(BACKEND_KINDS)}."]
    try:
        kind.config_model().model_validate(config)
    except ValidationError as exc:
        return [f"{'.'.join(str(part) for part in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()]
    return []


# `Cluster.scheduler`'s model: found from its path like the backends' configs, so models load no backend.
SCHEDULER_CONFIG_PATH = "resource_server.status.scheduler:SchedulerConfig"


def scheduler_config_errors(config: object) -> list[str]:
    """Human-readable problems with a Cluster's scheduler config, each naming the field (an empty object: none)."""
    if config in (None, {}):
        return []
    try:
        _config_model(SCHEDULER_CONFIG_PATH).model_validate(config)
    except ValidationError as exc:
        return [f"{'.'.join(str(part) for part in err['loc']) or 'config'}: {err['msg']}" for err in exc.errors()]
    return []
