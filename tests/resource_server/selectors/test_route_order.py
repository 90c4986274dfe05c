"""The route stage's order: state first (RANK), then load, then the admin's preference, then the registry's order;
and the X-Gateway-Route header that says why."""

from __future__ import annotations

import pytest

from resource_server.adapters.inflight import InFlight
from resource_server.dispatch.direct import DirectConfig
from resource_server.selectors.endpoints import AccessRule, EndpointRoute, candidates_ordered
from resource_server.status.base import RANK, SERVING, State
from tests.status import ScriptedStatus

EVERYONE = AccessRule(frozenset(), frozenset())


def _route(endpoint_id: int, cluster: str, *, preference: int = 0) -> EndpointRoute:
    return EndpointRoute(
        id=endpoint_id,
        model="demo-model",
        framework="vllm",
        cluster=cluster,
        backend="direct",
        config=DirectConfig.model_validate({"base_url": "http://127.0.0.1:9/v1"}),
        created=0,
        maintenance_message=None,
        rules=(EVERYONE, EVERYONE),
        preference=preference,
        header=f"cluster={cluster}; endpoint={endpoint_id}; reason=",
    )


def test_states_go_in_rank_order_whatever_the_load_and_preference() -> None:
    status, in_flight = ScriptedStatus(), InFlight()
    states = list(reversed(State))  # maintenance first in the registry, live last
    routes = [_route(index, f"c{index}", preference=-index) for index in range(len(states))]
    for route, state in zip(routes, states, strict=True):
        status.set(route.id, state)
    for _ in range(5):
        in_flight.begin(routes[-1].id)  # the live one is the busiest and the least preferred
    ordered = candidates_ordered(routes, status, in_flight)
    assert [state.state for state in ordered.statuses] == sorted(State, key=RANK.__getitem__)
    assert ordered.serving == len(SERVING) == 3
    assert ordered.reason == "live,best_state"
    assert ordered.route_header() == f"cluster=c{routes[-1].id}; endpoint={routes[-1].id}; reason=live,best_state"


def test_among_equal_states_the_least_loaded_goes_first() -> None:
    status, in_flight = ScriptedStatus(), InFlight()
    busy, idle = _route(1, "polaris", preference=5), _route(2, "sophia")
    for route in (busy, idle):
        status.set(route.id, State.LIVE)
    in_flight.begin(busy.id)
    ordered = candidates_ordered([busy, idle], status, in_flight)
    assert [route.id for route in ordered.routes] == [idle.id, busy.id]
    assert ordered.route_header() == "cluster=sophia; endpoint=2; reason=live,least_loaded"
    in_flight.end(busy.id)
    assert [route.id for route in candidates_ordered([busy, idle], status, in_flight).routes] == [busy.id, idle.id]


def test_among_equally_loaded_the_preferred_goes_first_then_the_registrys_order() -> None:
    status, in_flight = ScriptedStatus(), InFlight()
    first, second, preferred = _route(1, "aurora"), _route(2, "crux"), _route(3, "polaris", preference=1)
    ordered = candidates_ordered([first, second, preferred], status, in_flight)  # all unknown: not probed yet
    assert [route.id for route in ordered.routes] == [3, 1, 2]
    assert (ordered.reason, ordered.serving) == ("unknown,preferred", 3)
    ordered = candidates_ordered([first, second], status, in_flight)
    assert [route.id for route in ordered.routes] == [1, 2]
    assert ordered.reason == "unknown,registry_order"


def test_one_candidate_is_the_only_one_and_a_cold_one_serves_nothing() -> None:
    status = ScriptedStatus()
    only = _route(7, "polaris")
    assert candidates_ordered([only], status, InFlight()).route_header() == (
        "cluster=polaris; endpoint=7; reason=unknown,only"
    )
    status.set(only.id, State.QUEUED, queue_position=3)
    cold = candidates_ordered([only], status, InFlight())
    assert (cold.serving, cold.reason) == (0, "queued,only")


@pytest.mark.parametrize(
    ("index", "held", "header"),
    [
        (0, True, "cluster=polaris; endpoint=1; reason=live,least_loaded,held"),
        (1, False, "cluster=sophia; endpoint=2; reason=live,failover_from=1"),
        (2, True, "cluster=crux; endpoint=3; reason=draining,failover_from=1,failover_from=2,held"),
    ],
)
def test_the_route_header_names_the_endpoints_failed_over_from_and_a_hold(index: int, held: bool, header: str) -> None:
    status, in_flight = ScriptedStatus(), InFlight()
    routes = [_route(1, "polaris"), _route(2, "sophia"), _route(3, "crux")]
    status.set(1, State.LIVE)
    status.set(2, State.LIVE)
    status.set(3, State.DRAINING)
    in_flight.begin(2)
    ordered = candidates_ordered(routes, status, in_flight)
    assert [route.id for route in ordered.routes] == [1, 2, 3]
    assert ordered.route_header(index, held=held) == header
