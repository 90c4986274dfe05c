"""The meter stage: the one place that sees every outcome of a request that passed authentication.

It opens the request's usage record when the body has been read and writes it exactly once when the outcome
is known: an answer, an error at any stage, a stream cut by the client (499) or by the model server. That is
also where the admit stage's reservation is settled, where a request is counted in flight on the endpoint it
went to (the route stage's load, `adapters/inflight.py`) until it ends (and where metrics will be counted).
"""

from __future__ import annotations

import time

from django.conf import settings

from resource_server.adapters.inflight import InFlight
from resource_server.auth.base import Principal
from resource_server.pipeline.admit import UNLIMITED, Headers
from resource_server.pipeline.parse import ParsedRequest
from resource_server.routes import Route
from resource_server.services.usage import UsageRecord, UsageSink

# Where the route stage sent the request, and why (`cluster=polaris; endpoint=17; reason=live,least_loaded`): on
# every answer from the route stage on, JSON, stream or error, and in the usage record.
ROUTE_HEADER = "X-Gateway-Route"


class Meter:
    """A request's usage record from its opening to its single write."""

    __slots__ = ("_counted", "_in_flight", "_opened", "_sink", "_started", "record", "reservation")

    def __init__(
        self,
        *,
        sink: UsageSink,
        in_flight: InFlight,
        principal: Principal,
        route: Route,
        request_id: str,
        client_request_id: str,
    ) -> None:
        self._sink = sink
        self._in_flight = in_flight
        self._counted: int | None = None  # the endpoint this request is counted in flight on
        self._opened = False
        self._started = time.perf_counter()
        self.reservation = UNLIMITED
        self.record = UsageRecord(
            request_id=request_id,
            client_request_id=client_request_id,
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
            api_key_prefix=principal.api_key_prefix,
            route=route.value,
        )

    def parsed(self, request: ParsedRequest) -> None:
        self.record.model = request.model or ""
        self.record.streamed = request.stream
        if settings.GATEWAY.LOG_REQUEST_BODIES:
            self.record.request_body = request.body

    def routed(self, model: str) -> None:
        """The model is served under this name (the request named it with another case)."""
        self.record.model = model

    def dispatching(self, endpoint_id: int, gateway_route: str) -> None:
        """The request goes to this endpoint, by this route (the X-Gateway-Route header), and is counted in flight
        there. The first time, it is marked open: from here a worker crash could cut it (the next start records a
        marked request it never saw finish as lost)."""
        record = self.record
        record.endpoint_id = endpoint_id  # the row names the endpoint that answered, or was tried last
        record.gateway_route = gateway_route
        in_flight = self._in_flight
        if self._counted is not None:
            in_flight.end(self._counted)
        in_flight.begin(endpoint_id)
        self._counted = endpoint_id
        if not self._opened:
            self._opened = True
            self._sink.opened(record)

    def not_taken(self) -> None:
        """The endpoint did not take the request (it may go to another): no longer in flight there."""
        if self._counted is not None:
            self._in_flight.end(self._counted)
            self._counted = None

    def cold_route(self, endpoint_id: int, gateway_route: str) -> None:
        """The model is cold: the request is answered (503, or a held stream's start) in the name of its best
        endpoint, without going to it (yet)."""
        self.record.endpoint_id = endpoint_id
        self.record.gateway_route = gateway_route

    def answer_headers(self) -> Headers:
        """The headers every answer from the route stage on carries: where it went, and the caller's rate limits."""
        return ((ROUTE_HEADER, self.record.gateway_route), *self.reservation.headers)

    def first_event(self) -> None:
        if self.record.time_to_first_token_ms is None:
            self.record.time_to_first_token_ms = (time.perf_counter() - self._started) * 1000

    def finish(self, *, status: int, error_code: str = "") -> None:
        """Write the record with the request's outcome and settle its reservation."""
        if self._counted is not None:
            self._in_flight.end(self._counted)
            self._counted = None
        record = self.record
        record.status_code = status
        record.error_code = error_code
        record.latency_ms = (time.perf_counter() - self._started) * 1000
        self._sink.record(record)
        self.reservation.settle(record)
