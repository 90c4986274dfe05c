"""FIRST's users keep their scripts: its listing routes and shapes, whoami's fields, the `api` framework alias and
model names in another case, through the full Django stack and, for the inference routes, the lean door too."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import orjson
import pytest
from asgiref.sync import sync_to_async
from django.test import AsyncClient
from django.utils import timezone

from fakes.scheduler import FakeJob, Scenario
from gateway.asgi import http_application
from resource_server.bootstrap import runtime
from resource_server.models import Cluster, Endpoint, Framework, MaintenanceWindow, RequestLog, User
from resource_server.selectors.endpoints import ANY_FRAMEWORK
from tests.conftest import FakeScheduler, Seeded
from tests.gateway.test_asgi import call
from tests.resource_server.status.conftest import scheduler_commands
from tests.servers import free_port

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "demo-model", "messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 5}
ROUTE_PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/messages/count_tokens",
    "/v1/tokenize",
    "/v1/detokenize",
    "/v1/score",
    "/v1/rerank",
    "/v1/pooling",
    "/v1/classify",
    "/v1/audio/transcriptions",
    "/v1/audio/translations",
]


async def get(path: str, seeded: Seeded) -> Any:
    response = await AsyncClient().get(f"/resource_server{path}", headers=seeded.auth)
    assert response.status_code == 200, response.content
    return orjson.loads(response.content)


async def post(door: str, path: str, body: dict[str, Any], seeded: Seeded) -> tuple[int, dict[str, Any]]:
    """An inference POST through one of the two doors: the lean ASGI app, or the ninja views."""
    raw = orjson.dumps(body)
    if door == "ninja":
        response = await AsyncClient().post(path, raw, content_type="application/json", headers=seeded.auth)
        return response.status_code, orjson.loads(response.content)
    answer = await call(http_application, path, raw, headers=seeded.auth)
    return answer.status, orjson.loads(answer.body)


async def usage_models() -> list[str]:
    assert await sync_to_async(runtime().usage_sink.flush)(timeout=10)
    return [row.model async for row in RequestLog.objects.order_by("created_at")]


async def _clusters(seeded: Seeded) -> None:
    """Beside polaris: crux (open, no endpoints), sophia (another group's), and on polaris a model of another group."""
    await Cluster.objects.acreate(name="crux")
    sophia = await Cluster.objects.acreate(name="sophia", allowed_groups=["other-group"])
    config = seeded.endpoint.backend_config
    await Endpoint.objects.acreate(cluster=sophia, model="demo-model", backend="direct", backend_config=config)
    await Endpoint.objects.acreate(
        cluster=seeded.cluster, model="secret-model", backend="direct", backend_config=config, allowed_groups=["x"]
    )
    await Endpoint.objects.acreate(
        cluster=seeded.cluster, framework="sglang", model="org/model.v1", backend="direct", backend_config=config
    )


async def test_list_endpoints_has_firsts_shape_with_only_what_the_caller_may_use(seeded: Seeded) -> None:
    await _clusters(seeded)
    assert await get("/list-endpoints", seeded) == {
        "clusters": {
            "crux": {"base_url": "/resource_server/crux", "frameworks": {}},
            "polaris": {
                "base_url": "/resource_server/polaris",
                "frameworks": {
                    "sglang": {
                        "models": ["org/model.v1"],
                        "endpoints": ROUTE_PATHS,
                        "status": {"org/model.v1": "unknown"},
                    },
                    "vllm": {"models": ["demo-model"], "endpoints": ROUTE_PATHS, "status": {"demo-model": "unknown"}},
                },
            },
        }
    }


async def test_status_is_each_usable_cluster_true_while_it_is_up(seeded: Seeded) -> None:
    await _clusters(seeded)
    assert await get("/status", seeded) == {"crux": True, "polaris": True}

    await MaintenanceWindow.objects.acreate(
        cluster=await Cluster.objects.aget(name="crux"), starts_at=timezone.now(), message="Upgrades."
    )
    runtime().routing.forget()
    assert await get("/status", seeded) == {"crux": False, "polaris": True}
    detail = await get("/status?detail=true", seeded)
    assert detail["crux"] == {"up": False, "maintenance": "Upgrades.", "models": {}}
    assert detail["polaris"]["up"] is True and detail["polaris"]["models"]["vllm"] == {"demo-model": "unknown"}


async def test_a_cluster_whose_usable_endpoints_all_fail_their_health_check_is_down(seeded: Seeded) -> None:
    await Endpoint.objects.filter(cluster=seeded.cluster).aupdate(
        backend_config={"base_url": f"http://127.0.0.1:{free_port()}/v1"}  # nothing listens there
    )
    other = await Cluster.objects.acreate(name="aurora")
    await Endpoint.objects.acreate(
        cluster=other, model="demo-model", backend="direct", backend_config=seeded.endpoint.backend_config
    )
    runtime().routing.forget()
    await runtime().routing.table()
    await runtime().status.probe()
    assert await get("/status", seeded) == {"aurora": True, "polaris": False}
    listed = (await get("/list-endpoints", seeded))["clusters"]
    assert listed["polaris"]["frameworks"]["vllm"]["status"]["demo-model"] == "offline"
    assert listed["aurora"]["frameworks"]["vllm"]["status"] == {"demo-model": "live"}


async def test_list_endpoints_needs_credentials() -> None:
    response = await AsyncClient().get("/resource_server/list-endpoints")
    assert response.status_code == 401
    assert orjson.loads(response.content)["error"]["code"] == "missing_credentials"
    assert "WWW-Authenticate" in response.headers


async def test_status_without_a_token_lists_the_public_clusters_as_first_does(seeded: Seeded) -> None:
    await Cluster.objects.acreate(name="private", description="", allowed_groups=["some-group"])
    opened = await Cluster.objects.acreate(name="open", description="")
    await MaintenanceWindow.objects.acreate(cluster=opened, starts_at=timezone.now(), message="Upgrades.")
    runtime().routing.forget()
    response = await AsyncClient().get("/resource_server/status")
    assert response.status_code == 200, response.content
    assert orjson.loads(response.content) == {"open": False, "polaris": True}
    bad = await AsyncClient().get("/resource_server/status", headers={"Authorization": "Bearer igw_not-a-key"})
    assert bad.status_code == 401, "a token that is sent is checked"


async def test_status_and_list_endpoints_take_an_x_api_key_as_the_inference_routes_do(seeded: Seeded) -> None:
    await Cluster.objects.acreate(name="anl-only", allowed_domains=["anl.gov"])  # hidden from anonymous callers
    runtime().routing.forget()
    x_api_key = {"X-Api-Key": seeded.key}

    status = await AsyncClient().get("/resource_server/status", headers=x_api_key)
    assert status.status_code == 200, status.content
    assert orjson.loads(status.content) == await get("/status", seeded) == {"anl-only": True, "polaris": True}
    listing = await AsyncClient().get("/resource_server/list-endpoints", headers=x_api_key)
    assert orjson.loads(listing.content) == await get("/list-endpoints", seeded)
    bad = await AsyncClient().get("/resource_server/status", headers={"X-Api-Key": "igw_not-a-key"})
    assert bad.status_code == 401, "a key that is sent is checked, whichever header carries it"


async def test_whoami_carries_firsts_fields_besides_ours(seeded: Seeded) -> None:
    await User.objects.filter(pk=seeded.user.pk).aupdate(identity_provider="Argonne National Laboratory")
    me = await get("/whoami", seeded)
    assert me == {
        "identity_id": seeded.user.identity_id,
        "username": "ada@anl.gov",
        "auth_kind": "api_key",
        "groups": [],
        "id": seeded.user.identity_id,
        "name": "Ada",
        "user_group_uuids": [],
        "idp_id": "",  # Globus's id of the provider is known only from a Globus token
        "idp_name": "Argonne National Laboratory",
        "auth_service": "api_key",
    }


@pytest.mark.parametrize("door", ["lean", "ninja"])
async def test_the_api_framework_stands_for_any_framework_on_the_cluster(seeded: Seeded, door: str) -> None:
    status, body = await post(door, "/resource_server/polaris/api/v1/chat/completions", CHAT, seeded)
    assert status == 200, body
    assert body["model"] == "demo-model"
    status, body = await post(door, "/resource_server/nowhere/api/v1/chat/completions", CHAT, seeded)
    assert (status, body["error"]["code"]) == (404, "cluster_not_found")
    # The alias widens the framework, never the cluster.
    await Endpoint.objects.acreate(
        cluster=await Cluster.objects.acreate(name="crux"),
        model="org/model.v1",
        backend="direct",
        backend_config=seeded.endpoint.backend_config,
    )
    runtime().routing.forget()
    status, body = await post(
        door, "/resource_server/polaris/api/v1/completions", {"model": "org/model.v1", "prompt": "a"}, seeded
    )
    assert (status, body["error"]["code"]) == (404, "model_not_found")


async def test_the_api_framework_lists_every_model_on_the_cluster(seeded: Seeded) -> None:
    await _clusters(seeded)
    listed = await get("/polaris/api/v1/models", seeded)
    assert [model["id"] for model in listed["data"]] == ["demo-model", "org/model.v1"]
    assert [model["id"] for model in (await get("/polaris/vllm/v1/models", seeded))["data"]] == ["demo-model"]


def test_no_endpoint_can_be_registered_with_a_framework_named_like_the_alias() -> None:
    assert ANY_FRAMEWORK not in Framework.values, "`api` would then be ambiguous on FIRST's paths"


@pytest.mark.parametrize("door", ["lean", "ninja"])
@pytest.mark.parametrize(
    "path", ["/resource_server/v1/chat/completions", "/resource_server/polaris/vllm/v1/chat/completions"]
)
async def test_a_model_name_in_another_case_reaches_the_model_as_served(seeded: Seeded, door: str, path: str) -> None:
    status, body = await post(door, path, {**CHAT, "model": "DEMO-Model"}, seeded)
    assert status == 200, body
    assert body["model"] == "demo-model", "the model server must be sent the name it serves"
    assert await usage_models() == ["demo-model"]


@pytest.mark.parametrize("door", ["lean", "ninja"])
async def test_names_that_differ_only_by_case_are_matched_exactly_or_named(seeded: Seeded, door: str) -> None:
    await Endpoint.objects.acreate(
        cluster=seeded.cluster, model="Demo-Model", backend="direct", backend_config=seeded.endpoint.backend_config
    )
    status, body = await post(door, "/resource_server/v1/chat/completions", {**CHAT, "model": "DEMO-MODEL"}, seeded)
    assert (status, body["error"]["code"], body["error"]["param"]) == (404, "model_not_found", "model")
    assert "`Demo-Model`, `demo-model`" in body["error"]["message"]
    status, body = await post(door, "/resource_server/v1/chat/completions", CHAT, seeded)
    assert (status, body["model"]) == (200, "demo-model")


async def test_jobs_lists_the_clusters_model_jobs_in_firsts_shape(
    seeded: Seeded, fake_scheduler: FakeScheduler, tmp_path: Path
) -> None:
    """Read through the runtime's own status board: the scheduler function in the local pool, over fake PBS."""
    commands = scheduler_commands(fake_scheduler.state_file, tmp_path / "bin")
    now = time.time()
    fake_scheduler.write(
        Scenario(
            server="polaris-pbs-01",
            jobs=[
                FakeJob(
                    id="7001",
                    name="gw-demo",
                    user="svc",
                    queue="demand",
                    state="running",
                    submitted_at=now - 90,
                    started_at=now - 60,
                ),
                FakeJob(id="7002", name="gw-other", user="svc", queue="demand", state="queued", submitted_at=now),
            ],
        )
    )
    await Cluster.objects.filter(pk=seeded.cluster.pk).aupdate(
        scheduler={"kind": "pbs", "backend": "local", "user": "svc", "commands_dir": str(commands)}
    )
    await Endpoint.objects.filter(pk=seeded.endpoint.pk).aupdate(scheduler_job_name="gw-demo")
    runtime().routing.forget()
    board = runtime().status
    for _ in range(60):  # the first reading starts a process pool: a hang guard, not a timing assertion
        await board.probe()
        if board.jobs("polaris").jobs is not None:
            break
        await asyncio.sleep(0.5)

    response = await AsyncClient().get("/resource_server/polaris/jobs", headers=seeded.auth)

    assert response.status_code == 200
    body = orjson.loads(response.content)
    [job] = body["running"]
    assert (job["Job ID"], job["Models"], job["Cluster"], job["Framework"]) == (
        "7001.polaris-pbs-01",
        "demo-model",
        "polaris",
        "vllm",
    )
    assert job["Model Status"] == "running", "its model answers the health check"
    assert body["queued"] == [], "a job that runs no registered model is not listed"
    assert body["cluster_status"]["jobs"] == "known" and body["cluster_status"]["scheduler"] == "pbs"


async def test_jobs_of_a_cluster_without_a_scheduler_are_unknown_and_an_unknown_cluster_is_404(seeded: Seeded) -> None:
    body = orjson.loads((await AsyncClient().get("/resource_server/polaris/jobs", headers=seeded.auth)).content)
    assert body["cluster_status"]["jobs"] == "unknown" and body["running"] == []
    missing = await AsyncClient().get("/resource_server/nowhere/jobs", headers=seeded.auth)
    assert missing.status_code == 404 and orjson.loads(missing.content)["error"]["code"] == "cluster_not_found"
    assert (await AsyncClient().get("/resource_server/polaris/jobs")).status_code == 401
