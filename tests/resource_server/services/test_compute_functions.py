"""Registering the compute functions with Globus Compute (the real SDK, the stood-in service), and Endpoints
following the registration of `inference`."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from io import StringIO
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from globus_compute_sdk.serialize import ComputeSerializer, PureSourceTextInspect
from globus_compute_sdk.serialize.base import IDENTIFIER_LENGTH
from pydantic import SecretStr

from fakes.compute_service import RunningCompute
from resource_server.dispatch.globus_compute import ComputeEndpoints
from resource_server.models import Cluster, ComputeFunction, Endpoint
from resource_server.services.compute_functions import Registration, RegistrationError, compute_functions_register
from tests.conftest import COMPUTE_CLIENT_ID as CLIENT_ID
from tests.conftest import COMPUTE_CLIENT_SECRET as CLIENT_SECRET
from tests.conftest import SITE_CLIENT_ID as SITE_ID
from tests.conftest import SITE_CLIENT_SECRET as SITE_SECRET

pytestmark = pytest.mark.django_db


@pytest.fixture
def endpoints(compute: RunningCompute) -> Iterator[ComputeEndpoints]:
    fresh = ComputeEndpoints()
    yield fresh
    fresh.close()


def registrations(compute: RunningCompute) -> int:
    return compute.service.stats.calls.get("POST /v3/functions", 0)


@pytest.fixture
def service_account(settings: Any) -> Any:
    settings.GATEWAY = settings.GATEWAY.model_copy(
        update={"GLOBUS_COMPUTE_CLIENT_ID": CLIENT_ID, "GLOBUS_COMPUTE_CLIENT_SECRET": SecretStr(CLIENT_SECRET)}
    )
    return settings


def inference_of(report: list[Registration]) -> Registration:
    """The inference function's registration, for an account that registered every function."""
    [registration] = [registration for registration in report if registration.function == "inference"]
    return registration


def endpoint(model: str, function_id: str, **config: Any) -> Endpoint:
    cluster, _ = Cluster.objects.get_or_create(name="polaris")
    row = Endpoint(
        cluster=cluster,
        model=model,
        backend="globus_compute",
        backend_config={"endpoint_id": str(uuid.uuid4()), "function_id": function_id, "vllm": {"port": 8001}, **config},
    )
    row.full_clean()
    row.save()
    return row


@pytest.mark.usefixtures("service_account")
def test_the_first_run_registers_each_function_as_source_text(
    compute: RunningCompute, endpoints: ComputeEndpoints
) -> None:
    report = compute_functions_register(endpoints=endpoints)

    assert [(r.function, r.client_id, r.outcome) for r in report] == [
        ("inference", CLIENT_ID, "registered"),
        ("scheduler", CLIENT_ID, "registered"),
    ]
    for registration, python_name in zip(report, ["inference", "scheduler_jobs"], strict=True):
        stored = compute.service.functions[registration.function_uuid]
        assert (stored.owner, stored.name) == (CLIENT_ID, python_name)
        assert ComputeSerializer.unpack_buffers(stored.code)[0][:IDENTIFIER_LENGTH] == PureSourceTextInspect.identifier
    rows = [(row.name, row.client_id, str(row.function_uuid)) for row in ComputeFunction.objects.order_by("name")]
    assert rows == [(r.function, CLIENT_ID, r.function_uuid) for r in report]


@pytest.mark.usefixtures("service_account")
def test_running_again_changes_nothing(compute: RunningCompute, endpoints: ComputeEndpoints) -> None:
    first = inference_of(compute_functions_register(endpoints=endpoints))
    follower = endpoint("demo-model", first.function_uuid)
    before = registrations(compute)

    report = compute_functions_register(endpoints=endpoints)
    again = inference_of(report)

    assert (again.outcome, again.function_uuid, again.followed, again.pinned) == (
        "unchanged",
        first.function_uuid,
        [],
        [],
    )
    assert {registration.outcome for registration in report} == {"unchanged"}
    assert registrations(compute) == before
    follower.refresh_from_db()
    assert follower.backend_config["function_id"] == first.function_uuid


@pytest.mark.usefixtures("service_account")
def test_a_changed_function_is_registered_again_and_endpoints_on_the_old_one_follow(
    compute: RunningCompute, endpoints: ComputeEndpoints
) -> None:
    first = inference_of(compute_functions_register(endpoints=endpoints))
    follower = endpoint("demo-model", first.function_uuid)
    pinned_to = str(uuid.uuid4())
    pinned = endpoint("other-model", pinned_to)
    ComputeFunction.objects.filter(name="inference").update(source_sha256="0" * 64)  # its code has changed since

    report = compute_functions_register(endpoints=endpoints)
    second = inference_of(report)

    assert (second.outcome, second.previous_uuid) == ("re-registered", first.function_uuid)
    assert second.function_uuid != first.function_uuid
    assert second.followed == ["polaris/vllm/demo-model"]
    assert second.pinned == [("polaris/vllm/other-model", pinned_to)]
    follower.refresh_from_db()
    pinned.refresh_from_db()
    assert follower.backend_config["function_id"] == second.function_uuid
    assert follower.backend_config["vllm"] == {"port": 8001}  # the rest of the config is kept
    assert pinned.backend_config["function_id"] == pinned_to
    assert str(ComputeFunction.objects.get(name="inference").function_uuid) == second.function_uuid
    [scheduler] = [registration for registration in report if registration.function == "scheduler"]
    assert (scheduler.outcome, scheduler.followed, scheduler.pinned) == ("unchanged", [], [])  # no Endpoint runs it


@pytest.mark.usefixtures("service_account")
def test_force_registers_an_unchanged_function_again(compute: RunningCompute, endpoints: ComputeEndpoints) -> None:
    compute_functions_register(endpoints=endpoints)
    before = registrations(compute)
    forced = compute_functions_register(endpoints=endpoints, force=True)

    assert {registration.outcome for registration in forced} == {"re-registered"}
    assert registrations(compute) == before + 2


@pytest.mark.usefixtures("service_account")
def test_each_service_account_in_use_owns_its_registration(
    compute: RunningCompute, endpoints: ComputeEndpoints, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SITE_COMPUTE_SECRET", SITE_SECRET)
    site_endpoint = endpoint(
        "site-model",
        str(uuid.uuid4()),
        credentials={"client_id": SITE_ID, "client_secret_env": "SITE_COMPUTE_SECRET"},
    )

    registered = compute_functions_register(endpoints=endpoints)
    report = {
        registration.client_id: registration for registration in registered if registration.function == "inference"
    }

    assert set(report) == {CLIENT_ID, SITE_ID}
    assert compute.service.functions[report[SITE_ID].function_uuid].owner == SITE_ID
    assert report[SITE_ID].pinned == [("polaris/vllm/site-model", site_endpoint.backend_config["function_id"])]
    assert ComputeFunction.objects.count() == 4  # both functions, for each account


def test_without_a_service_account_registration_says_what_to_set(endpoints: ComputeEndpoints) -> None:
    with pytest.raises(RegistrationError, match="GLOBUS_COMPUTE_CLIENT_ID"):
        compute_functions_register(endpoints=endpoints)
    with pytest.raises(CommandError, match="GLOBUS_COMPUTE_CLIENT_SECRET"):
        call_command("register_functions", stdout=StringIO())


@pytest.mark.usefixtures("service_account")
def test_an_override_without_its_secret_is_named(endpoints: ComputeEndpoints) -> None:
    endpoint("site-model", str(uuid.uuid4()), credentials={"client_id": SITE_ID, "client_secret_env": "NOT_SET_HERE"})

    with pytest.raises(RegistrationError, match="NOT_SET_HERE"):
        compute_functions_register(endpoints=endpoints)


def test_a_refused_registration_is_reported_and_records_nothing(settings: Any, endpoints: ComputeEndpoints) -> None:
    # A wrong secret: Globus Auth refuses the client-credentials grant, so there is no token to register with.
    settings.GATEWAY = settings.GATEWAY.model_copy(
        update={"GLOBUS_COMPUTE_CLIENT_ID": CLIENT_ID, "GLOBUS_COMPUTE_CLIENT_SECRET": SecretStr("wrong")}
    )

    with pytest.raises(RegistrationError, match=f"client {CLIENT_ID}"):
        compute_functions_register(endpoints=endpoints)

    assert not ComputeFunction.objects.exists()
