"""The routing table: reloaded ahead of time in the background, waited for only when past its lifetime."""

from __future__ import annotations

from typing import Any

import pytest
from django.conf import settings
from django.utils import timezone

from resource_server.auth.base import AuthKind, Principal
from resource_server.bootstrap import Runtime
from resource_server.errors import GatewayError
from resource_server.models import Cluster, Endpoint, MaintenanceWindow
from resource_server.selectors.endpoints import endpoint_candidates
from tests.conftest import Seeded


@pytest.fixture
def lifetime(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(settings.GATEWAY, "ROUTING_CACHE_SECONDS", 10.0)
    return 10.0


async def _disable_endpoint(seeded: Seeded) -> None:
    await Endpoint.objects.filter(pk=seeded.endpoint.pk).aupdate(enabled=False)


async def test_a_table_past_half_its_lifetime_is_served_while_a_new_one_loads(
    seeded: Seeded, lifetime: float, runtime: Runtime
) -> None:
    routing = runtime.routing
    first = await routing.table()
    assert "demo-model" in first.by_model
    await _disable_endpoint(seeded)
    first.loaded_at -= lifetime * 0.6

    assert await routing.table() is first, "a busy worker must not wait for the database"
    assert routing.reloading is not None
    await routing.reloading
    assert "demo-model" not in (await routing.table()).by_model


async def test_a_table_past_its_lifetime_is_reloaded_before_it_is_used(
    seeded: Seeded, lifetime: float, runtime: Runtime
) -> None:
    first = await runtime.routing.table()
    await _disable_endpoint(seeded)
    first.loaded_at -= lifetime + 1

    assert "demo-model" not in (await runtime.routing.table()).by_model, "admin changes must apply within the lifetime"


def _route_parts(runtime: Runtime) -> dict[str, Any]:
    """What the route stage is handed from the runtime."""
    return {"routing": runtime.routing, "status": runtime.status, "in_flight": runtime.in_flight}


def _caller(seeded: Seeded, groups: frozenset[str] = frozenset()) -> Principal:
    user = seeded.user
    return Principal(user.pk, user.identity_id, user.username, AuthKind.API_KEY, groups=groups)


async def _endpoint(cluster: str, *, maintenance: bool = False, groups: tuple[str, ...] = ()) -> Endpoint:
    where = await Cluster.objects.acreate(name=cluster, allowed_groups=list(groups))
    if maintenance:
        await MaintenanceWindow.objects.acreate(cluster=where, starts_at=timezone.now(), message="Upgrades.")
    return await Endpoint.objects.acreate(
        cluster=where,
        framework="vllm",
        model="demo-model",
        backend="direct",
        backend_config={"base_url": "http://x/v1"},
    )


async def test_the_route_stage_gives_every_allowed_endpoint_not_in_maintenance_in_order(
    seeded: Seeded, runtime: Runtime
) -> None:
    route = _route_parts(runtime)
    first = await _endpoint("aurora")
    await _endpoint("crux", maintenance=True)
    await _endpoint("sophia", groups=("other-group",))
    candidates = await endpoint_candidates(**route, principal=_caller(seeded), model="demo-model")
    assert [route.id for route in candidates.routes] == [first.pk, seeded.endpoint.pk]
    on_polaris = await endpoint_candidates(**route, principal=_caller(seeded), model="demo-model", cluster="polaris")
    assert [route.id for route in on_polaris.routes] == [seeded.endpoint.pk]
    with_group = await endpoint_candidates(
        **route, principal=_caller(seeded, frozenset({"other-group"})), model="demo-model"
    )
    assert len(with_group.routes) == 3


@pytest.mark.parametrize(
    ("case", "status", "code"),
    [
        ("unknown model", 404, "model_not_found"),
        ("unknown cluster", 404, "cluster_not_found"),
        ("no access", 403, "model_access_denied"),
        ("maintenance", 503, "cluster_maintenance"),
    ],
)
async def test_the_route_stage_says_why_no_endpoint_may_serve(
    seeded: Seeded, case: str, status: int, code: str, runtime: Runtime
) -> None:
    route = _route_parts(runtime)
    model, cluster = ("nope" if case == "unknown model" else "demo-model"), None
    if case == "unknown cluster":
        cluster = "nowhere"
    elif case == "no access":
        await Cluster.objects.filter(pk=seeded.cluster.pk).aupdate(allowed_groups=["admins"])
    elif case == "maintenance":
        await MaintenanceWindow.objects.acreate(cluster=seeded.cluster, starts_at=timezone.now(), message="Upgrades.")
    with pytest.raises(GatewayError) as refused:
        await endpoint_candidates(**route, principal=_caller(seeded), model=model, cluster=cluster)
    assert (refused.value.status, refused.value.code) == (status, code)


async def _named(model: str, cluster: str = "polaris") -> Endpoint:
    where, _ = await Cluster.objects.aget_or_create(name=cluster)
    return await Endpoint.objects.acreate(
        cluster=where, model=model, backend="direct", backend_config={"base_url": "http://x/v1"}
    )


async def test_a_name_in_another_case_finds_the_one_model_it_folds_to(seeded: Seeded, runtime: Runtime) -> None:
    candidates = await endpoint_candidates(**_route_parts(runtime), principal=_caller(seeded), model="Demo-MODEL")
    assert [(route.id, route.model) for route in candidates.routes] == [(seeded.endpoint.pk, "demo-model")]
    table = await runtime.routing.table()
    assert table.by_folded_name == {"demo-model": ("demo-model",)}, "the lookup is computed once, with the table"


async def test_an_exact_name_wins_over_names_that_differ_only_by_case(seeded: Seeded, runtime: Runtime) -> None:
    upper = await _named("Demo-Model")
    route = _route_parts(runtime)
    exact = await endpoint_candidates(**route, principal=_caller(seeded), model="Demo-Model")
    assert [candidate.id for candidate in exact.routes] == [upper.pk]
    exact = await endpoint_candidates(**route, principal=_caller(seeded), model="demo-model")
    assert [candidate.id for candidate in exact.routes] == [seeded.endpoint.pk]
    with pytest.raises(GatewayError) as ambiguous:
        await endpoint_candidates(**route, principal=_caller(seeded), model="DEMO-MODEL")
    assert (ambiguous.value.status, ambiguous.value.code, ambiguous.value.param) == (404, "model_not_found", "model")
    assert "`Demo-Model`, `demo-model`" in ambiguous.value.message


async def test_the_api_framework_scope_is_every_framework_of_the_named_cluster(
    seeded: Seeded, runtime: Runtime
) -> None:
    on_sglang = await Endpoint.objects.acreate(
        cluster=seeded.cluster,
        framework="sglang",
        model="demo-model",
        backend="direct",
        backend_config={"base_url": "http://x/v1"},
    )
    await _named("demo-model", cluster="aurora")
    route = _route_parts(runtime)
    on_polaris = await endpoint_candidates(
        **route, principal=_caller(seeded), model="demo-model", cluster="polaris", framework="api"
    )
    assert {candidate.id for candidate in on_polaris.routes} == {seeded.endpoint.pk, on_sglang.pk}
    only_vllm = await endpoint_candidates(
        **route, principal=_caller(seeded), model="demo-model", cluster="polaris", framework="vllm"
    )
    assert [candidate.id for candidate in only_vllm.routes] == [seeded.endpoint.pk]
