"""The meter stage: the one place that sees every outcome of a request that passed authentication.

It opens the request's usage record when the body has been read and writes it exactly once when the outcome
is known: an answer, an error at any stage, a stream cut by the client (499) or by the model server. That is
also where the admit stage's reservation is settled (and metrics will be counted).
"""

from __future__ import annotations

import time

from django.conf import settings

from resource_server.auth.base import Principal
from resource_server.pipeline.admit import UNLIMITED
from resource_server.pipeline.parse import ParsedRequest
from resource_server.routes import Route
from resource_server.services.usage import UsageRecord, UsageSink


class Meter:
    """A request's usage record from its opening to its single write."""

    __slots__ = ("_sink", "_started", "record", "reservation")

    def __init__(
        self, *, sink: UsageSink, principal: Principal, route: Route, request_id: str, client_request_id: str
    ) -> None:
        self._sink = sink
        self._started = time.perf_counter()
        self.reservation = UNLIMITED
        self.record = UsageRecord(
            request_id=request_id,
            client_request_id=client_request_id,
            user_id=principal.user_id,
            api_key_id=principal.api_key_id,
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

    def dispatching(self, endpoint_id: int) -> None:
        """The request goes to this endpoint. The first time, it is marked open: from here a worker crash could
        cut it (the next start records a marked request it never saw finish as lost)."""
        first = self.record.endpoint_id is None
        self.record.endpoint_id = endpoint_id  # the row names the endpoint that answered, or was tried last
        if first:
            self._sink.opened(self.record)

    def first_event(self) -> None:
        if self.record.time_to_first_token_ms is None:
            self.record.time_to_first_token_ms = (time.perf_counter() - self._started) * 1000

    def finish(self, *, status: int, error_code: str = "") -> None:
        """Write the record with the request's outcome and settle its reservation."""
        record = self.record
        record.status_code = status
        record.error_code = error_code
        record.latency_ms = (time.perf_counter() - self._started) * 1000
        self._sink.record(record)
        self.reservation.settle(record)
