"""Which endpoint serves a model for a caller, read from a routing table each worker keeps.

The route stage (`endpoint_candidates`) orders a model's endpoints that the caller may use: by state (`RANK`:
live, draining, unknown, starting, queued, offline, maintenance), then least loaded (requests in flight, as
this gateway counts them: `adapters/inflight.py`), then the admin's `Endpoint.preference` (higher first),
then the registry's order. It only reads what is kept in memory: the table, the states, the counts.

The table is reloaded from the database at most every ROUTING_CACHE_SECONDS, so admin changes
reach every worker within that time without a query on each request.

Model names are matched exactly first; a name that matches no model exactly matches the one model whose name
differs from it only by case, if there is exactly one (FIRST matched names case-insensitively). On FIRST's
paths the framework `api` means any framework on the cluster (FIRST's CLI builds `<cluster>/api/v1/...` for
clusters whose framework it does not know; no endpoint can be registered with a framework named `api`).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from django.conf import settings
from django.db import DatabaseError
from django.utils import timezone
from pydantic import BaseModel, ValidationError

from resource_server.adapters.inflight import InFlight
from resource_server.auth.base import Principal
from resource_server.backend_kinds import BACKEND_KINDS
from resource_server.db import DATABASE_PATIENCE_SECONDS, db_run
from resource_server.errors import ErrorCode, InvalidRequest, NotFound, PermissionDenied, ServiceUnavailable
from resource_server.limits.policy import LimitRules
from resource_server.models import Cluster, Endpoint, MaintenanceWindow
from resource_server.selectors.limits import limit_rules_load
from resource_server.status.base import RANK, EndpointStatus, State, StatusView
from resource_server.status.scheduler import SchedulerConfig, scheduler_config

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AccessRule:
    groups: frozenset[str]
    domains: frozenset[str]

    def allows(self, principal: Principal) -> bool:
        if not self.groups and not self.domains:
            return True
        return bool(self.groups & principal.groups) or principal.domain in self.domains


def _rule(groups: list[str], domains: list[str]) -> AccessRule:
    return AccessRule(frozenset(groups), frozenset(domain.lower() for domain in domains))


# FIRST's framework alias: on `/resource_server/<cluster>/api/v1/...`, any framework on that cluster.
ANY_FRAMEWORK = "api"


@dataclass(frozen=True, slots=True)
class ClusterRoute:
    """A cluster as the routing table knows it (with or without enabled endpoints)."""

    name: str
    maintenance_message: str | None  # the message of the maintenance window in force when the table was read
    rule: AccessRule
    maintenance_ends: float | None = None  # that window's end (wall clock); None: open-ended, or no window
    scheduler: SchedulerConfig | None = None  # how its batch jobs are read (Cluster.scheduler); None: they are not

    def allows(self, principal: Principal) -> bool:
        return self.rule.allows(principal)


@dataclass(frozen=True, slots=True)
class Window:
    """A maintenance window in force: what researchers are told, and when it ends (None: until an admin ends it)."""

    message: str
    ends_at: float | None


def _windows_in_force() -> tuple[dict[int, Window], dict[int, Window]]:
    """The maintenance windows in force now, by cluster id and by endpoint id: of several on one target, the one
    that ends last (an open-ended one first), since the target is back only when all have ended."""
    now = timezone.now()
    by_cluster: dict[int, Window] = {}
    by_endpoint: dict[int, Window] = {}
    for row in MaintenanceWindow.objects.filter(starts_at__lte=now).exclude(ends_at__lte=now):
        window = Window(row.message, None if row.ends_at is None else row.ends_at.timestamp())
        if row.cluster_id is not None:
            by_cluster[row.cluster_id] = _later(by_cluster.get(row.cluster_id), window)
        elif row.endpoint_id is not None:
            by_endpoint[row.endpoint_id] = _later(by_endpoint.get(row.endpoint_id), window)
    return by_cluster, by_endpoint


def _later(one: Window | None, other: Window) -> Window:
    if one is None:
        return other
    if one.ends_at is None or (other.ends_at is not None and one.ends_at >= other.ends_at):
        return one
    return other


def _window_of(cluster: Window | None, endpoint: Window | None) -> Window | None:
    """An endpoint's window: its own or its cluster's, whichever ends last."""
    return endpoint if cluster is None else _later(endpoint, cluster)


def _scheduler_of(cluster: Cluster) -> SchedulerConfig | None:
    try:
        return scheduler_config(cluster.scheduler)
    except ValidationError:
        logger.error("cluster %s has an invalid scheduler config; its jobs are not read", cluster.name)
        return None


@dataclass(frozen=True, slots=True)
class EndpointRoute:
    id: int
    model: str
    framework: str
    cluster: str
    backend: str
    config: BaseModel
    created: int
    maintenance_message: str | None  # of the maintenance window in force (its own or its cluster's) at the read
    rules: tuple[AccessRule, AccessRule]
    preference: int  # among endpoints in the same state and equally loaded, the higher goes first
    header: str  # the start of its X-Gateway-Route answer header, "cluster=polaris; endpoint=17; reason="
    job_name: str = ""  # the batch job that runs its model server (Endpoint.scheduler_job_name)
    maintenance_ends: float | None = None  # that window's end (wall clock); None: open-ended, or no window
    context_length: int | None = None  # Endpoint.context_length: what token limits reserve without max_tokens

    def allows(self, principal: Principal) -> bool:
        return all(rule.allows(principal) for rule in self.rules)

    def serves(self, cluster: str | None, framework: str | None) -> bool:
        """Whether this route is in the scope of a FIRST path (None: any cluster / framework)."""
        return (cluster is None or self.cluster == cluster) and (framework is None or self.framework == framework)


@dataclass(slots=True)
class RoutingTable:
    by_model: dict[str, list[EndpointRoute]] = field(default_factory=dict)
    # A model name case-folded -> the registered names that fold to it (one, unless several differ
    # only by case): the case-insensitive lookup, computed once per table rather than by a scan per request.
    by_folded_name: dict[str, tuple[str, ...]] = field(default_factory=dict)
    clusters: dict[str, ClusterRoute] = field(default_factory=dict)
    limits: LimitRules = field(default_factory=LimitRules)  # read with the endpoints: one reload, one lifetime
    loaded_at: float = float("-inf")  # when it counts as loaded, for its lifetime; moved on by failed reloads
    read_at: float = float("-inf")  # when the database last answered
    failing: bool = False  # the last reload failed: requests use this table and never wait for a reload


def _load_table() -> RoutingTable:
    by_model: dict[str, list[EndpointRoute]] = defaultdict(list)
    cluster_windows, endpoint_windows = _windows_in_force()
    for endpoint in Endpoint.objects.filter(enabled=True).select_related("cluster"):
        cluster = endpoint.cluster
        kind = BACKEND_KINDS.get(endpoint.backend)
        try:
            config = kind.config_model().model_validate(endpoint.backend_config) if kind else None
        except ValidationError:
            config = None
        if kind is None or config is None:
            logger.error("endpoint %s has an invalid backend config; it is not served", endpoint.pk)
            continue
        kind.load_modules()  # here, in a thread, rather than on the event loop at its first request
        window = _window_of(cluster_windows.get(cluster.pk), endpoint_windows.get(endpoint.pk))
        by_model[endpoint.model].append(
            EndpointRoute(
                id=endpoint.pk,
                model=endpoint.model,
                framework=endpoint.framework,
                cluster=cluster.name,
                backend=endpoint.backend,
                config=config,
                created=int(endpoint.created_at.timestamp()),
                maintenance_message=None if window is None else window.message,
                maintenance_ends=None if window is None else window.ends_at,
                rules=(
                    _rule(cluster.allowed_groups, cluster.allowed_domains),
                    _rule(endpoint.allowed_groups, endpoint.allowed_domains),
                ),
                preference=endpoint.preference,
                header=f"cluster={cluster.name}; endpoint={endpoint.pk}; reason=",
                job_name=endpoint.scheduler_job_name,
                context_length=endpoint.context_length,
            )
        )
    folded: dict[str, list[str]] = defaultdict(list)
    for name in sorted(by_model):
        folded[name.casefold()].append(name)
    clusters = {
        cluster.name: ClusterRoute(
            name=cluster.name,
            maintenance_message=None if (window := cluster_windows.get(cluster.pk)) is None else window.message,
            rule=_rule(cluster.allowed_groups, cluster.allowed_domains),
            maintenance_ends=None if window is None else window.ends_at,
            scheduler=_scheduler_of(cluster),
        )
        for cluster in Cluster.objects.all()
    }
    now = time.monotonic()
    return RoutingTable(
        by_model=dict(by_model),
        by_folded_name={key: tuple(names) for key, names in folded.items()},
        clusters=clusters,
        limits=limit_rules_load(),
        loaded_at=now,
        read_at=now,
    )


_RETRY_AFTER_DB_ERROR = 2.0
_OUTAGE_LOG_INTERVAL = 10.0  # an outage is retried every _RETRY_AFTER_DB_ERROR, but not logged every time


class RoutingCache:
    """The routing table this worker keeps (built by the composition root, `resource_server/bootstrap.py`)."""

    def __init__(self) -> None:
        self._table = RoutingTable()
        self._reload: asyncio.Task[RoutingTable] | None = None
        self._outage_logged_at = float("-inf")

    @property
    def current(self) -> RoutingTable:
        """The table as this worker holds it now, without reloading it."""
        return self._table

    @property
    def reloading(self) -> asyncio.Task[RoutingTable] | None:
        """The reload under way, if any (a finished one too, until the next starts)."""
        return self._reload

    async def table(self) -> RoutingTable:
        """The current table. Past half its lifetime it is reloaded in the background while requests keep
        using it, so a busy worker never waits for the database; only a table past its whole lifetime (an idle
        worker, or the first request) is waited for, so admin changes still apply within ROUTING_CACHE_SECONDS.
        During a database outage (a reload failed, or took longer than DATABASE_PATIENCE_SECONDS) requests
        use the table they have and reloads are tried in the background every few seconds.
        """
        table = self._table
        age = time.monotonic() - table.loaded_at
        lifetime = settings.GATEWAY.ROUTING_CACHE_SECONDS
        if age < lifetime / 2:
            return table
        reload = self._start_reload()
        if age < lifetime or table.failing:
            return table
        # Shielded: a caller that goes away, or stops waiting, must not cancel the read the others wait for.
        if table.read_at == float("-inf"):
            return await asyncio.shield(reload)
        try:
            return await asyncio.wait_for(asyncio.shield(reload), DATABASE_PATIENCE_SECONDS)
        except TimeoutError:
            # The database is slow to answer: route with what we have; the reload goes on and replaces it.
            table.failing = True
            return table

    def forget(self) -> None:
        """Make the next request reload the table (after admin edits in this process)."""
        self._table = RoutingTable()
        self._reload = None

    def _start_reload(self) -> asyncio.Task[RoutingTable]:
        """The reload under way, or a new one: one at a time, however many requests find the table old."""
        loop = asyncio.get_running_loop()
        reload = self._reload
        if reload is None or reload.done() or reload.get_loop() is not loop:
            reload = self._reload = loop.create_task(self._reload_table())
            # Retrieved: if no caller waits for it, an error is not reported as unhandled.
            reload.add_done_callback(lambda done: None if done.cancelled() else done.exception())
        return reload

    async def _reload_table(self) -> RoutingTable:
        now = time.monotonic()
        try:
            self._table = await db_run(_load_table)
        except DatabaseError:
            table = self._table
            if table.loaded_at == float("-inf"):
                raise ServiceUnavailable(
                    "The gateway cannot read its model registry right now. Please retry shortly.",
                    retry_after=5,
                    code=ErrorCode.REGISTRY_UNAVAILABLE,
                ) from None
            # Keep serving what we knew during a database outage; try again in a few seconds.
            if now - self._outage_logged_at >= _OUTAGE_LOG_INTERVAL:
                self._outage_logged_at = now
                logger.warning("database unavailable; routing with the table read %.0f s ago", now - table.read_at)
            table.loaded_at = now - settings.GATEWAY.ROUTING_CACHE_SECONDS / 2 + _RETRY_AFTER_DB_ERROR
            table.failing = True
        return self._table


def _framework_scope(table: RoutingTable, cluster: str | None, framework: str | None) -> str | None:
    """The framework a FIRST path names, checked: None for any framework (the `api` alias, or no FIRST path)."""
    if cluster is not None and cluster not in table.clusters:
        raise NotFound(f"There is no cluster named {cluster!r} on this gateway.", code=ErrorCode.CLUSTER_NOT_FOUND)
    return None if framework == ANY_FRAMEWORK else framework


def _routes_named(table: RoutingTable, model: str) -> list[EndpointRoute]:
    """The endpoints of the model named exactly `model`, else of the one model whose name differs only by case."""
    routes = table.by_model.get(model)
    if routes is not None:
        return routes
    names = table.by_folded_name.get(model.casefold(), ())
    if len(names) > 1:
        listed = ", ".join(f"`{name}`" for name in names)
        raise NotFound(
            f"The model `{model}` does not exist; models whose names differ from it only by case do: {listed}. "
            "Send one of them exactly.",
            code=ErrorCode.MODEL_NOT_FOUND,
            param="model",
        )
    return table.by_model[names[0]] if names else []


# Why the first candidate beat the one after it (the X-Gateway-Route header's reason, after the state).
ONLY = "only"  # the model has one endpoint the caller may use (on the path's cluster)
BEST_STATE = "best_state"  # the others are in states further down RANK
LEAST_LOADED = "least_loaded"  # as good a state, fewer requests in flight
PREFERRED = "preferred"  # as good a state, as loaded, a higher Endpoint.preference
REGISTRY_ORDER = "registry_order"  # equal in all that: the registry's order (model, then cluster name)
HELD = "held"  # the request was held for a cold model (X-Gateway-Max-Wait)
FAILOVER_FROM = "failover_from="  # + an endpoint id: that endpoint was tried first and did not take the request
# "live,only", ...: made once, so the common header is one concatenation.
_REASONS = {
    (state, why): f"{state},{why}"
    for state in State
    for why in (ONLY, BEST_STATE, LEAST_LOADED, PREFERRED, REGISTRY_ORDER)
}
_ONLY_REASONS = {state: _REASONS[state, ONLY] for state in State}  # the common case, by the state alone


@dataclass(slots=True)  # not frozen: made for every request, and a frozen dataclass's __init__ costs 3x
class Candidates:
    """The route stage's answer: the endpoints that may serve the model to the caller, best first, each with
    its status. The first `serving` of them are in a state that is sent requests (live, draining, unknown):
    the route stage's order puts them first. `reason` says why the first one beat the others."""

    routes: list[EndpointRoute]
    statuses: list[EndpointStatus]
    serving: int
    reason: str

    def route_header(self, index: int = 0, *, held: bool = False) -> str:
        """The X-Gateway-Route header of the request sent to `routes[index]` (after the ones before it failed to
        take it): `cluster=polaris; endpoint=17; reason=live,least_loaded`."""
        route = self.routes[index]
        if index == 0 and not held:
            return route.header + self.reason
        tokens = [self.reason] if index == 0 else [self.statuses[index].state.value]
        tokens += [f"{FAILOVER_FROM}{failed.id}" for failed in self.routes[:index]]
        if held:
            tokens.append(HELD)
        return route.header + ",".join(tokens)


def candidates_ordered(routes: list[EndpointRoute], status: StatusView, in_flight: InFlight) -> Candidates:
    """`routes` (in the registry's order) best first: by state, then load, then preference, then that order."""
    if len(routes) == 1:
        only = status.status(routes[0].id)
        return Candidates(routes, [only], 1 if only.serving else 0, _ONLY_REASONS[only.state])
    statuses = [status.status(route.id) for route in routes]
    keyed = sorted(
        (
            (RANK[state.state], in_flight.load(route.id), -route.preference, index)
            for index, (route, state) in enumerate(zip(routes, statuses, strict=True))
        )
    )
    first, second = keyed[0], keyed[1]
    why = (
        BEST_STATE
        if first[0] < second[0]
        else LEAST_LOADED
        if first[1] < second[1]
        else PREFERRED
        if first[2] < second[2]
        else REGISTRY_ORDER
    )
    ordered = [statuses[key[3]] for key in keyed]
    return Candidates(
        routes=[routes[key[3]] for key in keyed],
        statuses=ordered,
        serving=sum(1 for state in ordered if state.serving),
        reason=_REASONS[ordered[0].state, why],
    )


async def endpoint_candidates(
    *,
    routing: RoutingCache,
    status: StatusView,
    in_flight: InFlight,
    principal: Principal,
    model: str,
    cluster: str | None = None,
    framework: str | None = None,
) -> Candidates:
    """The route stage: the endpoints that may serve `model` to `principal`, best first (see the module's
    docstring), or the error that explains why none may (no such model or cluster, no access, every one under
    maintenance). Each candidate's `model` is the name as served, which differs from `model` when that matched
    it only by case. Candidates in a state that is not sent requests (starting, queued, offline, maintenance)
    come last; when every one is, the model is cold (the pipeline answers 503 or holds the request).
    """
    table = await routing.table()
    scope = _framework_scope(table, cluster, framework)
    in_scope = [route for route in _routes_named(table, model) if route.serves(cluster, scope)]
    if not in_scope:
        where = f" on {cluster}/{framework}" if cluster else ""
        raise NotFound(
            f"The model `{model}` does not exist{where}. GET /v1/models lists the models you can use.",
            code=ErrorCode.MODEL_NOT_FOUND,
            param="model",
        )
    allowed = [route for route in in_scope if route.allows(principal)]
    if not allowed:
        raise PermissionDenied(
            f"You do not have access to the model `{model}`. Ask the gateway administrators which group grants it.",
            code=ErrorCode.MODEL_ACCESS_DENIED,
            param="model",
        )
    candidates = [route for route in allowed if route.maintenance_message is None]
    if not candidates:
        raise ServiceUnavailable(
            f"The model `{model}` is unavailable: {allowed[0].maintenance_message}",
            retry_after=maintenance_retry_after(allowed, now=time.time()),
            code=ErrorCode.CLUSTER_MAINTENANCE,
        )
    return candidates_ordered(candidates, status, in_flight)


# Retry-After of a model whose every endpoint is in an open-ended maintenance window: when to look again.
OPEN_ENDED_RETRY_AFTER = 300


def maintenance_retry_after(routes: list[EndpointRoute], *, now: float) -> int:
    """Seconds until the first of these endpoints' maintenance windows ends (300 for an open-ended one), >= 1."""
    waits = [
        OPEN_ENDED_RETRY_AFTER if route.maintenance_ends is None else math.ceil(route.maintenance_ends - now)
        for route in routes
        if route.maintenance_message is not None
    ]
    return max(1, min(waits, default=OPEN_ENDED_RETRY_AFTER))


# The card fields that are the gateway's own: its name for the model, its registration time, and its cluster.
# (endpoint id, model name) -> the model card its server lists, if known (StatusBoard.model_card).
ModelCards = Callable[[int, str], dict[str, Any] | None]
_GATEWAY_CARD_FIELDS = ("id", "object", "created", "owned_by")


async def model_list(
    *,
    routing: RoutingCache,
    principal: Principal,
    cluster: str | None = None,
    framework: str | None = None,
    cards: ModelCards | None = None,
    status: StatusView | None = None,
) -> list[dict[str, object]]:
    """Models the caller may use, in OpenAI's list shape, one entry per model name.

    Each entry carries the model card its server last listed (`cards`: vLLM's max_model_len, root, parent,
    permission...) from the first endpoint of the caller's that has one; the gateway's own fields win. With
    `status`, each entry also says the model's best state over the caller's endpoints (`status`) and each of
    those endpoints' state (`clusters`, best first), as the route stage would order them.
    """
    table = await routing.table()
    framework = _framework_scope(table, cluster, framework)
    models: dict[str, dict[str, object]] = {}
    usable: dict[str, list[EndpointRoute]] = defaultdict(list)
    for name, routes in table.by_model.items():
        for route in routes:
            if not (route.serves(cluster, framework) and route.allows(principal)):
                continue
            usable[name].append(route)
            card = cards(route.id, name) if cards is not None else None
            if name not in models or (card and len(models[name]) == len(_GATEWAY_CARD_FIELDS)):
                ours = {"id": name, "object": "model", "created": route.created, "owned_by": route.cluster}
                models[name] = {**(card or {}), **ours}
    if status is not None:
        for name, routes in usable.items():
            models[name].update(_model_states(routes, status))
    return [models[name] for name in sorted(models)]


def _model_states(routes: list[EndpointRoute], status: StatusView) -> dict[str, object]:
    """A model's `status` (its best endpoint's state) and `clusters`: each endpoint's state, best first."""
    states = sorted(((status.status(route.id), route) for route in routes), key=lambda pair: RANK[pair[0].state])
    clusters = [
        {
            "cluster": route.cluster,
            "framework": route.framework,
            "status": state.state.value,
            "since": int(state.since) if state.since else None,
            "eta_seconds": None if state.eta_seconds is None else round(state.eta_seconds),
            "queue_position": state.queue_position,
        }
        for state, route in states
    ]
    return {"status": states[0][0].state.value, "clusters": clusters}


@dataclass(frozen=True, slots=True)
class ClusterListing:
    """What a caller may see of one cluster: the models it may use there, by framework, and whether it is up."""

    name: str
    frameworks: dict[str, list[str]]  # framework -> model names, sorted
    up: bool
    states: dict[str, dict[str, str]]  # framework -> model name -> its endpoint's state (status/base.py State)
    maintenance_message: str | None  # the cluster's maintenance window in force, if any


async def cluster_list(*, routing: RoutingCache, status: StatusView, principal: Principal) -> list[ClusterListing]:
    """The clusters the caller may use, by name, each with the models it may use there (FIRST's list-endpoints
    and status). A cluster is up when it is not under maintenance and, if it has endpoints the caller may use,
    some of them is serving: live, draining, or unknown (not checked yet, or no source can tell).
    """
    table = await routing.table()
    usable: dict[str, list[EndpointRoute]] = {
        name: [] for name, cluster in table.clusters.items() if cluster.allows(principal)
    }
    for routes in table.by_model.values():
        for route in routes:
            if route.cluster in usable and route.allows(principal):
                usable[route.cluster].append(route)
    listings = []
    for name in sorted(usable):
        routes = usable[name]
        frameworks: dict[str, set[str]] = defaultdict(set)
        states: dict[str, dict[str, str]] = defaultdict(dict)
        serving = False
        for route in routes:
            endpoint = status.status(route.id)
            serving = serving or endpoint.serving
            frameworks[route.framework].add(route.model)
            states[route.framework][route.model] = endpoint.state.value
        all_down = bool(routes) and not serving
        maintenance = table.clusters[name].maintenance_message
        listings.append(
            ClusterListing(
                name=name,
                frameworks={framework: sorted(models) for framework, models in sorted(frameworks.items())},
                up=maintenance is None and not all_down,
                states={framework: dict(sorted(models.items())) for framework, models in sorted(states.items())},
                maintenance_message=maintenance,
            )
        )
    return listings


async def model_of_path(
    *, routing: RoutingCache, principal: Principal, cluster: str | None, framework: str | None
) -> str:
    """The model a body that names none goes to: on a FIRST path, the only one its cluster and framework serve
    the caller (vLLM, serving one model, answers with it too); anywhere else, or when there are several, a 400.
    """
    names = (
        []
        if cluster is None
        else [
            str(model["id"])
            for model in await model_list(routing=routing, principal=principal, cluster=cluster, framework=framework)
        ]
    )
    if len(names) == 1:
        return names[0]
    if cluster is None:
        where = "The gateway routes each request by its `model`"
    elif names:
        where = f"{cluster}/{framework} serves several models you may use ({', '.join(names)})"
    else:
        where = f"{cluster}/{framework} serves no model you may use"
    raise InvalidRequest(
        f"Missing required parameter: 'model'. {where}: name one (GET /v1/models lists them).",
        code=ErrorCode.MISSING_REQUIRED_PARAMETER,
        param="model",
    )
