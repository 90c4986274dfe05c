"""FIRST's listing routes, in FIRST's shapes, so that its users' scripts keep working (docs/migrating-from-first.md).

`GET /resource_server/list-endpoints`: the clusters the caller may use, each with its base URL and, by
framework, the models the caller may use there and the OpenAI routes. `GET /resource_server/status`: each of
those clusters, true while it is up. `GET /resource_server/{cluster}/jobs`: the cluster's batch jobs that
run models the caller may use, in FIRST's buckets (selectors/jobs.py). All are filtered by the routing
table's access rules, as /v1/models is. As in FIRST, `/status` needs no token (monitoring scripts call it
without one): it then lists the public clusters only, those with no access rule.
"""

from __future__ import annotations

from typing import Annotated, Any

from django.http import HttpRequest
from ninja import Field, Query, Router, Schema

from resource_server.api.inference import ClusterName
from resource_server.api.openapi import AUTHENTICATED, REQUEST_ID_HEADER, documented
from resource_server.api.security import bearer_auth, request_authorization
from resource_server.auth.base import AuthKind, Principal
from resource_server.bootstrap import runtime
from resource_server.routes import ROUTES
from resource_server.selectors.endpoints import ClusterListing, cluster_list
from resource_server.selectors.jobs import cluster_jobs_list

router = Router(auth=bearer_auth, tags=["FIRST compatibility"])

# What FIRST lists as a framework's endpoints: the OpenAI routes, relative to the framework's base URL.
_ROUTE_PATHS = [f"/v1/{descriptor.path}" for descriptor in ROUTES.values()]


class FrameworkSummary(Schema):
    models: list[str]
    endpoints: list[str]
    status: dict[str, str] = Field(
        description="Each model's state on this cluster: live, draining, unknown, starting, queued, offline or "
        "maintenance (the gateway's field; FIRST has none)."
    )


class ClusterSummary(Schema):
    base_url: str
    frameworks: dict[str, FrameworkSummary]


class ListEndpoints(Schema):
    clusters: dict[str, ClusterSummary]


def _summary(listing: ClusterListing) -> ClusterSummary:
    return ClusterSummary(
        base_url=f"/resource_server/{listing.name}",
        frameworks={
            framework: FrameworkSummary(models=models, endpoints=_ROUTE_PATHS, status=listing.states[framework])
            for framework, models in listing.frameworks.items()
        },
    )


# Who asks `/status` without a token: a caller in no group and of no identity provider, whom only the clusters
# and endpoints without access rules admit.
ANONYMOUS = Principal(user_id=0, identity_id="", username="", auth_kind=AuthKind.SERVICE)


async def _listings(principal: Principal) -> list[ClusterListing]:
    parts = runtime()
    return await cluster_list(routing=parts.routing, status=parts.status, principal=principal)


def _ok(description: str) -> dict[str, object]:
    return {"description": description, "headers": REQUEST_ID_HEADER}


@router.get(
    "/list-endpoints",
    response=ListEndpoints,
    summary="List clusters, frameworks and models (FIRST's shape)",
    operation_id="list_endpoints",
    openapi_extra=documented(
        "FIRST's listing: every cluster you may use, with its base URL and, by serving framework, the models "
        "you may use there and the OpenAI routes under `<base_url>/<framework>`. A cluster you may use that "
        "has no model for you is listed with no frameworks. `GET /v1/models` lists the same models by name.",
        *AUTHENTICATED,
        ok=_ok("Your clusters, by name."),
    ),
)
async def list_endpoints(request: HttpRequest) -> ListEndpoints:
    listings = await _listings(request.auth)  # type: ignore[attr-defined]
    return ListEndpoints(clusters={listing.name: _summary(listing) for listing in listings})


class ClusterState(Schema):
    up: bool = Field(description="As without `detail`.")
    maintenance: str | None = Field(description="The message of the maintenance window in force, if any.")
    models: dict[str, dict[str, str]] = Field(description="By framework, each model's state on the cluster.")


StatusDetail = Annotated[
    bool,
    Query(description="Each cluster as an object with its models' states, rather than true/false.", example=True),
]


@router.get(
    "/status",
    auth=None,
    response=dict[str, bool] | dict[str, ClusterState],
    summary="Which clusters are up (FIRST's shape)",
    operation_id="cluster_status",
    openapi_extra=documented(
        "FIRST's status: every cluster you may use (without a token, as in FIRST: every public cluster), "
        "`true` while it is up. Up means no maintenance window is in force on it and, if it has models for "
        "you, some of their endpoints is serving: `live`, `draining`, or `unknown` (not checked yet, or no "
        "source can tell). A cluster whose models are only `starting`, `queued`, `offline` or in maintenance "
        "is down. With `?detail=true` (the gateway's addition), each cluster is an object instead: `up`, the "
        "maintenance message, and each model's state by framework.",
        *AUTHENTICATED,
        "400",
        ok=_ok("Your clusters, by name."),
    ),
)
async def status(request: HttpRequest, detail: StatusDetail = False) -> dict[str, bool] | dict[str, ClusterState]:
    authorization = request_authorization(request)
    caller = await runtime().authenticators.principal_from_authorization(authorization) if authorization else ANONYMOUS
    listings = await _listings(caller)
    if detail:
        return {
            listing.name: ClusterState(up=listing.up, maintenance=listing.maintenance_message, models=listing.states)
            for listing in listings
        }
    return {listing.name: listing.up for listing in listings}


class JobsByStatus(Schema):
    """FIRST's jobs listing. Each job is FIRST's `JobInfo`: `Models`, `Framework`, `Cluster`, `Job ID`,
    `Job State`, `Model Status`, `Host Name`, `Job Comments`, `Nodes Reserved`, `Walltime`, `Estimated Start
    Time`, and the gateway's `Queue`, `Queue Position`, `Submitted`, `Started`, `Ends` (ISO 8601, UTC)."""

    running: list[dict[str, Any]]
    queued: list[dict[str, Any]]
    stopped: list[dict[str, Any]]
    others: list[dict[str, Any]]
    private_batch_running: list[dict[str, Any]]
    private_batch_queued: list[dict[str, Any]]
    cluster_status: dict[str, Any]


@router.get(
    "/{cluster}/jobs",
    response=JobsByStatus,
    summary="A cluster's model jobs (FIRST's shape)",
    operation_id="cluster_jobs",
    openapi_extra=documented(
        "FIRST's jobs listing: the cluster's batch jobs that run models you may use, as `running`, `queued`, "
        "`stopped` and `others`, each with its model's state (`Model Status`: running, starting, stopping, "
        "queued) and, for a queued job, its place in the queue and the scheduler's estimated start. "
        "`cluster_status.jobs` says whether the lists are `known`, `stale` (the last reading failed; they are the "
        "last known ones) or `unknown` (never read, or the cluster's scheduler is not read: empty lists then "
        "mean nothing is known, not that nothing runs). The gateway reads the scheduler in the background; "
        "this answer never waits for it.",
        *AUTHENTICATED,
        "404",
        ok=_ok("The cluster's model jobs, by state."),
    ),
)
async def jobs(request: HttpRequest, cluster: ClusterName) -> dict[str, Any]:
    parts = runtime()
    return await cluster_jobs_list(
        routing=parts.routing,
        status=parts.status,
        principal=request.auth,  # type: ignore[attr-defined]
        cluster=cluster,
    )
