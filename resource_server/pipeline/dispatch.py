"""The dispatch stage: the request goes to the first candidate endpoint's backend, or on to the next one.

Failing over is safe only when the request cannot have run: the backend marks such an error `never_reached`
(connection refused, endpoint offline; for a stream, before its first event). Any other error, or the last
candidate's, is the caller's answer. With one candidate this is exactly one backend call.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from resource_server.dispatch.base import Backend, UpstreamRequest, UpstreamStream
from resource_server.dispatch.registry import BackendPool
from resource_server.errors import ErrorCode, GatewayError, UpstreamError
from resource_server.pipeline.meter import Meter
from resource_server.selectors.endpoints import EndpointRoute

logger = logging.getLogger(__name__)
Answer = TypeVar("Answer")


def dispatch_submit(
    *, backends: BackendPool, candidates: Sequence[EndpointRoute], request: UpstreamRequest, meter: Meter
) -> Awaitable[bytes]:
    """The JSON answer of the first candidate that takes the request (not a coroutine itself: one frame less)."""
    return _first_taker(backends, candidates, meter, request, lambda backend: backend.submit(request))


def dispatch_stream(
    *, backends: BackendPool, candidates: Sequence[EndpointRoute], request: UpstreamRequest, meter: Meter
) -> Awaitable[UpstreamStream]:
    """The opened stream of the first candidate that takes the request."""
    return _first_taker(backends, candidates, meter, request, lambda backend: backend.open_stream(request))


async def _first_taker(
    backends: BackendPool,
    candidates: Sequence[EndpointRoute],
    meter: Meter,
    request: UpstreamRequest,
    call: Callable[[Backend], Awaitable[Answer]],
) -> Answer:
    for endpoint in candidates:
        meter.dispatching(endpoint.id)
        try:
            return await call(backends.get(endpoint.id, endpoint.backend, endpoint.config))
        except GatewayError as error:
            if not error.never_reached or endpoint is candidates[-1]:
                if error.code == ErrorCode.ROUTE_NOT_SERVED:
                    raise _route_not_served(request) from None
                raise
            logger.warning(
                "endpoint %s did not take the request (%s); trying the next candidate", endpoint.id, error.code
            )
    raise AssertionError("the route stage gives at least one candidate")


def _route_not_served(request: UpstreamRequest) -> GatewayError:
    """The model exists, but not for this route: say so, rather than the model server's bare "Not Found"."""
    return UpstreamError(
        f"The model '{request.body.get('model')}' does not serve POST /v1/{request.route.value} "
        "(its server runs it for other routes). See the user guide's table of routes.",
        status=404,
        error_type="invalid_request_error",
        code=ErrorCode.ROUTE_NOT_SERVED,
    )
