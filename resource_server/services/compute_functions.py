"""Register the compute functions with Globus Compute and keep `globus_compute` Endpoints pointing at them.

Two functions: `inference` (`compute_functions/inference.py`), which Endpoints run beside vLLM, and `scheduler`
(`compute_functions/scheduler.py`), which a cluster's login-node endpoint runs to read its batch jobs.

Functions belong to the account that registers them, so registration runs once per service account in
use: the gateway's (GLOBUS_COMPUTE_CLIENT_ID) and each override in an Endpoint's backend config. The id
is kept in `ComputeFunction` (by the names below), with a digest of the code sent, so that a re-run registers
again only when the function changed. Endpoints that ran the previous `inference` registration then follow to
the new id; endpoints set by hand to another function id are left alone and reported.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import globus_sdk
from django.utils import timezone
from pydantic import ValidationError

from compute_functions import inference, scheduler_jobs
from resource_server.dispatch.compute_serde import function_code
from resource_server.dispatch.globus_compute import (
    ComputeEndpoints,
    Credentials,
    GlobusComputeConfig,
    MissingCredentials,
    credentials_for,
    default_credentials,
)
from resource_server.models import ComputeFunction, Endpoint

logger = logging.getLogger(__name__)

# Registered under these names (ComputeFunction.name); Endpoints' backend configs name the `inference` one.
FUNCTIONS: dict[str, Callable[..., Any]] = {"inference": inference, "scheduler": scheduler_jobs}
ENDPOINT_FUNCTION = "inference"


class RegistrationError(Exception):
    """Registration cannot proceed; the message says what to fix."""


@dataclass
class Registration:
    """What one run did for one function of one service account."""

    function: str  # its name in FUNCTIONS
    client_id: str
    function_uuid: str
    outcome: str  # "registered" (first time), "re-registered" (the code changed, or forced), "unchanged"
    previous_uuid: str | None = None
    followed: list[str] = field(default_factory=list)  # endpoints moved to function_uuid
    pinned: list[tuple[str, str]] = field(default_factory=list)  # endpoints on another function, left alone


def _endpoint_name(endpoint: Endpoint) -> str:
    return f"{endpoint.cluster.name}/{endpoint.framework}/{endpoint.model}"


def _accounts() -> dict[str, tuple[Credentials, list[tuple[Endpoint, GlobusComputeConfig]]]]:
    """Each service account in use, with the Endpoints that submit with it."""
    accounts: dict[str, tuple[Credentials, list[tuple[Endpoint, GlobusComputeConfig]]]] = {}
    default = default_credentials()
    if default is not None:  # registered even before any Endpoint uses it: the first run comes first
        accounts[default.client_id] = (default, [])
    for endpoint in Endpoint.objects.filter(backend="globus_compute").select_related("cluster"):
        try:
            config = GlobusComputeConfig.model_validate(endpoint.backend_config)
        except ValidationError:
            logger.warning("endpoint %s has an invalid backend config; skipped", _endpoint_name(endpoint))
            continue
        try:
            credentials = credentials_for(config.credentials)
        except MissingCredentials as exc:
            raise RegistrationError(f"Endpoint {_endpoint_name(endpoint)}: {exc}.") from None
        accounts.setdefault(credentials.client_id, (credentials, []))[1].append((endpoint, config))
    if not accounts:
        raise RegistrationError("Set GLOBUS_COMPUTE_CLIENT_ID and GLOBUS_COMPUTE_CLIENT_SECRET (see .env.example).")
    return accounts


def compute_functions_register(*, endpoints: ComputeEndpoints, force: bool = False) -> list[Registration]:
    """Register each of `FUNCTIONS` for every service account in use; report what changed."""
    report = []
    for client_id, (credentials, served) in _accounts().items():
        for name, function in FUNCTIONS.items():
            registration = _register(name, function, client_id, credentials, endpoints=endpoints, force=force)
            if name == ENDPOINT_FUNCTION:
                _follow(registration, served)
            report.append(registration)
    return report


def _register(
    name: str,
    function: Callable[..., Any],
    client_id: str,
    credentials: Credentials,
    *,
    endpoints: ComputeEndpoints,
    force: bool,
) -> Registration:
    digest = hashlib.sha256(function_code(function).encode()).hexdigest()
    row = ComputeFunction.objects.filter(name=name, client_id=client_id).first()
    previous = str(row.function_uuid) if row is not None else None
    if row is not None and row.source_sha256 == digest and not force:
        return Registration(name, client_id, str(row.function_uuid), "unchanged", previous)
    try:
        function_uuid = endpoints.client(credentials).register_function(function)
    except globus_sdk.GlobusError as exc:
        raise RegistrationError(f"Globus Compute refused the registration for client {client_id}: {exc}") from exc
    ComputeFunction.objects.update_or_create(
        name=name,
        client_id=client_id,
        defaults={"function_uuid": function_uuid, "source_sha256": digest, "registered_at": timezone.now()},
    )
    return Registration(name, client_id, function_uuid, "registered" if row is None else "re-registered", previous)


def _follow(registration: Registration, served: list[tuple[Endpoint, GlobusComputeConfig]]) -> None:
    """Move the Endpoints that ran the previous registration to the new one; report those set by hand."""
    for endpoint, config in served:
        current = str(config.function_id)
        if current == registration.function_uuid:
            continue
        if current == registration.previous_uuid:
            endpoint.backend_config = {**endpoint.backend_config, "function_id": registration.function_uuid}
            endpoint.save(update_fields=["backend_config", "updated_at"])
            registration.followed.append(_endpoint_name(endpoint))
        else:
            registration.pinned.append((_endpoint_name(endpoint), current))
