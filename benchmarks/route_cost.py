"""python -m benchmarks.route_cost: the CPU the route stage's choice among endpoints adds to each request.

Times `candidates_ordered` (each candidate's state read from the status board's dict, this worker's in-flight
count, the admin's preference) and the `X-Gateway-Route` header it yields, encoded as the doors send it, for a
model served by one endpoint and by two. The best of 5 repeats of 200,000 calls each, in this process: a
micro-benchmark of the added work, beside the harness's whole-request figures (docs/performance.md).
"""

from __future__ import annotations

import os
import timeit

RUNS = 200_000


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "gateway.settings")
    import django

    django.setup()
    from resource_server.adapters.inflight import InFlight
    from resource_server.dispatch.direct import DirectConfig
    from resource_server.selectors.endpoints import AccessRule, EndpointRoute, candidates_ordered
    from resource_server.status.base import EndpointStatus, State

    everyone = AccessRule(frozenset(), frozenset())
    statuses = {1: EndpointStatus(State.LIVE, since=0.0), 2: EndpointStatus(State.LIVE, since=0.0)}

    class Board:
        def status(self, endpoint_id: int) -> EndpointStatus:
            return statuses[endpoint_id]

    def route(endpoint_id: int) -> EndpointRoute:
        return EndpointRoute(
            id=endpoint_id,
            model="m",
            framework="vllm",
            cluster=f"cluster{endpoint_id}",
            backend="direct",
            config=DirectConfig(base_url="http://node:8000/v1"),
            created=0,
            maintenance_message=None,
            rules=(everyone, everyone),
            preference=0,
            header=f"cluster=cluster{endpoint_id}; endpoint={endpoint_id}; reason=",
        )

    board, in_flight = Board(), InFlight()
    for count in (1, 2):
        routes = [route(endpoint_id) for endpoint_id in range(1, count + 1)]

        def choose(routes: list[EndpointRoute] = routes) -> None:
            candidates_ordered(routes, board, in_flight).route_header(0).encode()

        seconds = min(timeit.repeat(choose, number=RUNS, repeat=5)) / RUNS
        print(f"{count} endpoint(s): {seconds * 1e6:.2f} us per request (ordering and X-Gateway-Route)")


if __name__ == "__main__":
    main()
