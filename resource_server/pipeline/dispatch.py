"""The dispatch stage: the request goes to the best candidate endpoint's backend, or on to the next one.

Failing over is safe only while the client has had no byte of the model's answer and the request cannot have
run, or was refused whole: the backend marks an error `never_reached` (connection refused, endpoint offline or
without workers; for a compute stream, before its first event), and a model server's 503 ran nothing. Such an
error moves the request to the next serving candidate, at most ROUTE_MAX_TRIES endpoints in all; any other
error, or the last try's, is the caller's answer. With one candidate this is exactly one backend call.
Each try names its endpoint and route (X-Gateway-Route: `failover_from=<id>` for the ones before) to the meter.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from django.conf import settings

from resource_server.dispatch.base import Backend, UpstreamRequest, UpstreamStream
from resource_server.dispatch.registry import BackendPool
from resource_server.errors import ErrorCode, GatewayError, UpstreamError
from resource_server.pipeline.meter import Meter
from resource_server.selectors.endpoints import Candidates

logger = logging.getLogger(__name__)
Answer = TypeVar("Answer")


def fails_over(error: GatewayError, request: UpstreamRequest) -> bool:
    """Whether the next candidate may be tried after `error`: the request did not run (a connect failure, an
    endpoint found offline or starting) or was refused whole (the model server's 503). An audio upload goes to
    the model server as the client sends it and cannot be sent twice: only one that never reached one may."""
    if error.never_reached:
        return True
    return error.code == ErrorCode.UPSTREAM_UNAVAILABLE and request.form is None


def dispatch_submit(
    *, backends: BackendPool, candidates: Candidates, request: UpstreamRequest, meter: Meter, held: bool = False
) -> Awaitable[bytes]:
    """The JSON answer of the first candidate that takes the request (not a coroutine itself: one frame less)."""
    return _first_taker(backends, candidates, meter, request, lambda backend: backend.submit(request), held)


def dispatch_stream(
    *, backends: BackendPool, candidates: Candidates, request: UpstreamRequest, meter: Meter, held: bool = False
) -> Awaitable[UpstreamStream]:
    """The opened stream of the first candidate that takes the request."""
    return _first_taker(backends, candidates, meter, request, lambda backend: backend.open_stream(request), held)


async def _first_taker(
    backends: BackendPool,
    candidates: Candidates,
    meter: Meter,
    request: UpstreamRequest,
    call: Callable[[Backend], Awaitable[Answer]],
    held: bool,
) -> Answer:
    """Try the serving candidates in order (they come first), at most ROUTE_MAX_TRIES of them."""
    tries = candidates.serving
    if tries > 1:
        tries = min(tries, settings.GATEWAY.ROUTE_MAX_TRIES)
    for index in range(tries):
        endpoint = candidates.routes[index]
        meter.dispatching(endpoint.id, candidates.route_header(index, held=held))
        try:
            return await call(backends.get(endpoint.id, endpoint.backend, endpoint.config))
        except GatewayError as error:
            if not fails_over(error, request):
                raise
            meter.not_taken()
            if index == tries - 1:
                if error.code == ErrorCode.ROUTE_NOT_SERVED:
                    raise _route_not_served(request) from None
                raise
            logger.warning(
                "endpoint %s did not take the request (%s); trying the next candidate", endpoint.id, error.code
            )
    raise AssertionError("dispatched without a serving candidate")


def _route_not_served(request: UpstreamRequest) -> GatewayError:
    """The model exists, but not for this route: say so, rather than the model server's bare "Not Found"."""
    return UpstreamError(
        f"The model '{request.body.get('model')}' does not serve POST /v1/{request.route.value} "
        "(its server runs it for other routes). See the user guide's table of routes.",
        status=404,
        error_type="invalid_request_error",
        code=ErrorCode.ROUTE_NOT_SERVED,
    )
