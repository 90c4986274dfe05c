"""Register the compute function with Globus Compute and keep `globus_compute` Endpoints pointing at it.

Functions belong to the account that registers them, so registration runs once per service account in
use: the gateway's (GLOBUS_COMPUTE_CLIENT_ID) and each override in an Endpoint's backend config. The id
is kept in `ComputeFunction`, with a digest of the code sent, so that a re-run registers again only when
the function changed. Endpoints that ran the previous registration then follow to the new id; endpoints
set by hand to another function id are left alone and reported.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import globus_sdk
from django.utils import timezone
from pydantic import ValidationError

from compute_functions import inference
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

FUNCTION_NAME = "inference"


class RegistrationError(Exception):
    """Registration cannot proceed; the message says what to fix."""


@dataclass
class Registration:
    """What one run did for one service account."""

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
    """Register `compute_functions.inference` for every service account in use; report what changed."""
    digest = hashlib.sha256(function_code(inference).encode()).hexdigest()
    report = []
    for client_id, (credentials, served) in _accounts().items():
        row = ComputeFunction.objects.filter(name=FUNCTION_NAME, client_id=client_id).first()
        previous = str(row.function_uuid) if row is not None else None
        if row is not None and row.source_sha256 == digest and not force:
            registration = Registration(client_id, str(row.function_uuid), "unchanged", previous)
        else:
            try:
                function_uuid = endpoints.client(credentials).register_function(inference)
            except globus_sdk.GlobusError as exc:
                raise RegistrationError(
                    f"Globus Compute refused the registration for client {client_id}: {exc}"
                ) from exc
            ComputeFunction.objects.update_or_create(
                name=FUNCTION_NAME,
                client_id=client_id,
                defaults={"function_uuid": function_uuid, "source_sha256": digest, "registered_at": timezone.now()},
            )
            outcome = "registered" if row is None else "re-registered"
            registration = Registration(client_id, function_uuid, outcome, previous)
        for endpoint, config in served:
            current = str(config.function_id)
            if current == registration.function_uuid:
                continue
            if current == previous:
                endpoint.backend_config = {**endpoint.backend_config, "function_id": registration.function_uuid}
                endpoint.save(update_fields=["backend_config", "updated_at"])
                registration.followed.append(_endpoint_name(endpoint))
            else:
                registration.pinned.append((_endpoint_name(endpoint), current))
        report.append(registration)
    return report
