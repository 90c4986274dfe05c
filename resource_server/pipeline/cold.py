"""The route stage's cold path: no candidate endpoint of the model is in a state that is sent requests.

Every cold candidate is asked to start its model (`Backend.wake`, in the background: a Globus Compute endpoint
without workers gets a warm-up task). Then either:
- the answer is 503 in the name of the best candidate (`cold_answer`): its state as the code (`model_starting`,
  `model_queued`, `model_offline`, `cluster_maintenance`), `Retry-After` from its ETA (or the window's end),
  and `status`, `eta_seconds` and `queue_position` in the `error` object; or,
- with `X-Gateway-Max-Wait: <seconds>`, the request is held (`Hold`) until a candidate serves or the wait ends
  (then the same 503). A held request looks again at each change of an endpoint's state and every
  MAX_WAIT_PROGRESS_SECONDS. A held stream starts its SSE response at once and gets a comment line at each of
  those looks (`held_stream`), which OpenAI clients ignore; its model's events follow when one serves.

A request whose serving candidates all refused it the way a cold endpoint does (a 503 before it ran: `holds_for`)
is held the same way when it asked to wait, rather than answered with that 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import AsyncGenerator, Awaitable, Callable
from datetime import UTC, datetime

from django.conf import settings

from resource_server.dispatch.base import UpstreamRequest
from resource_server.dispatch.registry import BackendPool
from resource_server.errors import ErrorCode, GatewayError, InvalidRequest, ModelCold
from resource_server.pipeline.dispatch import dispatch_stream, fails_over
from resource_server.pipeline.meter import Meter
from resource_server.pipeline.parse import ClientGone
from resource_server.pipeline.respond import StreamWishes, stream_relay
from resource_server.routes import RouteDescriptor
from resource_server.selectors.endpoints import Candidates
from resource_server.status.base import EndpointStatus, RouteStatus, State

logger = logging.getLogger(__name__)

MAX_WAIT_HEADER = "X-Gateway-Max-Wait"
# Retry-After of a cold model whose ETA is unknown, and of a maintenance window without an end.
COLD_RETRY_AFTER_SECONDS = 60
MAINTENANCE_RETRY_AFTER_SECONDS = 300
COLD_CODES = {
    State.STARTING: ErrorCode.MODEL_STARTING,
    State.QUEUED: ErrorCode.MODEL_QUEUED,
    State.OFFLINE: ErrorCode.MODEL_OFFLINE,
    State.MAINTENANCE: ErrorCode.CLUSTER_MAINTENANCE,
}
_SECONDS = re.compile(r"^[0-9]{1,9}(\.[0-9]{1,6})?$")

# Waits for the client to go away (the lean door reads its ASGI `http.disconnect`); None where the door cannot.
ClientGoneWaiter = Callable[[], Awaitable[None]]
# The route stage again, for the same request: its candidates as they are now.
Reroute = Callable[[], Awaitable[Candidates]]


def max_wait_parse(raw: str) -> float:
    """The seconds `X-Gateway-Max-Wait` asks to be held for a cold model (0 when absent): at most
    MAX_WAIT_SECONDS, else 400 `invalid_max_wait`."""
    if not raw:
        return 0.0
    limit = settings.GATEWAY.MAX_WAIT_SECONDS
    text = raw.strip()
    seconds = float(text) if _SECONDS.match(text) else -1.0
    if not 0 <= seconds <= limit:
        shown = raw if len(raw) <= 40 else raw[:40] + "..."
        raise InvalidRequest(
            f"{MAX_WAIT_HEADER} must be a number of seconds from 0 to {limit:g}, the longest this gateway holds "
            f"a request for a cold model; got {shown!r}.",
            code=ErrorCode.INVALID_MAX_WAIT,
            param=MAX_WAIT_HEADER,
        )
    return seconds


def holds_for(error: GatewayError, request: UpstreamRequest) -> bool:
    """Whether a request that asked to wait is held after its serving candidates refused it with `error`: they
    refused it as a cold endpoint does, unavailable before it ran (not a 404 route the model does not serve)."""
    return fails_over(error, request) and error.status == 503


def wake_cold(backends: BackendPool, candidates: Candidates) -> None:
    """Ask every cold candidate (not one in maintenance) to start its model, in the background."""
    for route, status in zip(
        candidates.routes[candidates.serving :], candidates.statuses[candidates.serving :], strict=True
    ):
        if status.state is not State.MAINTENANCE:
            backends.wake(route.id, route.backend, route.config)


def _eta_text(seconds: float) -> str:
    if seconds < 90:
        return f"about {max(1, math.ceil(seconds))} s"
    if seconds < 90 * 60:
        return f"about {round(seconds / 60)} min"
    return f"about {seconds / 3600:.1f} h"


def _eta_seconds(status: EndpointStatus, now: float) -> int | None:
    if status.eta_seconds is not None:
        return max(0, math.ceil(status.eta_seconds))
    if status.state is State.MAINTENANCE and status.maintenance_ends is not None:
        return max(0, math.ceil(status.maintenance_ends - now))
    return None


def _message(model: str, cluster: str, status: EndpointStatus, eta: int | None, waited: float | None) -> str:
    if status.state is State.MAINTENANCE:
        text = f"The model `{model}` is unavailable: {cluster} is in maintenance"
        if status.maintenance_message:
            text += f" ({status.maintenance_message.rstrip('.')})"
        if status.maintenance_ends is not None:
            text += f" until {datetime.fromtimestamp(status.maintenance_ends, UTC):%Y-%m-%d %H:%M} UTC"
        text += "."
    else:
        position = f" (position {status.queue_position})" if status.queue_position is not None else ""
        text = f"The model `{model}` is {status.state} on {cluster}{position}; "
        text += f"expected to answer in {_eta_text(eta)}." if eta is not None else "no estimate yet of when it answers."
    if waited is not None:
        return f"{text} It did not answer within the {waited:g} s you asked to wait."
    if status.state is State.MAINTENANCE:
        return text
    return f"{text} Retry later, or send `{MAX_WAIT_HEADER}: <seconds>` to be held until it answers."


def cold_answer(
    candidates: Candidates, *, model: str, status: RouteStatus, meter: Meter, waited: float | None = None
) -> ModelCold:
    """The 503 for a cold model, in the name of its best candidate (counted as turned away there)."""
    best, state = candidates.routes[0], candidates.statuses[0]
    now = time.time()
    eta = _eta_seconds(state, now)
    if eta is not None:
        retry_after = max(1, eta)
    elif state.state is State.MAINTENANCE:
        retry_after = MAINTENANCE_RETRY_AFTER_SECONDS
    else:
        retry_after = COLD_RETRY_AFTER_SECONDS
    status.turned_away(best.id)
    meter.cold_route(best.id, candidates.route_header(held=waited is not None))
    return ModelCold(
        _message(model, best.cluster, state, eta, waited),
        retry_after=retry_after,
        code=COLD_CODES.get(state.state, ErrorCode.MODEL_OFFLINE),
        state=state.state.value,
        eta_seconds=eta,
        queue_position=state.queue_position,
    )


def progress_comment(status: EndpointStatus) -> bytes:
    """A held stream's progress, as an SSE comment line: `: status=queued position=3 eta=240`."""
    line = f": status={status.state}"
    if status.queue_position is not None:
        line += f" position={status.queue_position}"
    eta = _eta_seconds(status, time.time())
    if eta is not None:
        line += f" eta={eta}"
    return line.encode() + b"\n\n"


class Hold:
    """A request held until a candidate serves, a state changes, the next look is due, or its wait ends."""

    def __init__(self, *, wait: float, status: RouteStatus, client_gone: ClientGoneWaiter | None = None) -> None:
        self.wait = wait
        self._status = status
        self._client_gone = client_gone
        self._gone: asyncio.Future[None] | None = None
        self.deadline = time.monotonic() + wait

    @property
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    async def pause(self) -> None:
        """Until a state changes or MAX_WAIT_PROGRESS_SECONDS pass (at most until the deadline); ClientGone if
        the client leaves meanwhile."""
        timeout = max(0.0, min(settings.GATEWAY.MAX_WAIT_PROGRESS_SECONDS, self.remaining))
        if self._client_gone is None:
            await self._status.wait_for_change(timeout)
            return
        if self._gone is None:
            self._gone = asyncio.ensure_future(self._client_gone())
        change = asyncio.ensure_future(self._status.wait_for_change(timeout))
        try:
            await asyncio.wait((change, self._gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            change.cancel()
        if self._gone.done():
            raise ClientGone

    def close(self) -> None:
        if self._gone is not None:
            self._gone.cancel()

    async def until_serving(self, candidates: Candidates, reroute: Reroute) -> Candidates:
        """The candidates once one serves; raises `Expired` (with the last candidates) when the wait ends first."""
        while not candidates.serving:
            if self.remaining <= 0:
                raise Expired(candidates)
            await self.pause()
            candidates = await reroute()
        return candidates


class Expired(Exception):
    """The wait ended with every candidate still cold."""

    def __init__(self, candidates: Candidates) -> None:
        super().__init__("the wait ended")
        self.candidates = candidates


def _comment(text: str) -> bytes:
    return b": " + text.encode("latin1", "replace") + b"\n\n"


async def held_stream(
    *,
    hold: Hold,
    candidates: Candidates,
    reroute: Reroute,
    backends: BackendPool,
    status: RouteStatus,
    upstream: UpstreamRequest,
    descriptor: RouteDescriptor,
    meter: Meter,
    wishes: StreamWishes,
    model: str,
    tried: bool = False,
) -> AsyncGenerator[bytes, None]:
    """A streamed request held for its model, as the events its client gets: a progress comment at once and at
    each look, then (a candidate serves) a comment naming the route and the model's events, or (the wait
    ended) an error event in OpenAI's envelope. The response's status is 200 already, whatever follows.
    `tried`: the serving candidates have just refused it (as cold endpoints do); they are tried again after a look.
    """
    framing = descriptor.framing
    relaying = False
    shown, shown_at = b"", 0.0
    tick = settings.GATEWAY.MAX_WAIT_PROGRESS_SECONDS
    try:
        while True:
            if candidates.serving and not tried:
                try:
                    stream = await dispatch_stream(
                        backends=backends, candidates=candidates, request=upstream, meter=meter, held=True
                    )
                except GatewayError as error:
                    if not holds_for(error, upstream) or hold.remaining <= 0:
                        raise
                    tried = True
                else:
                    yield _comment(f"x-gateway-route: {meter.record.gateway_route}")
                    relaying = True  # from here the relay records the outcome
                    async with contextlib.aclosing(stream_relay(stream, descriptor, meter, client=wishes)) as events:
                        async for event in events:
                            yield event
                    return
            elif not candidates.serving and hold.remaining <= 0:
                raise cold_answer(candidates, model=model, status=status, meter=meter, waited=hold.wait)
            line = progress_comment(candidates.statuses[0])
            now = time.monotonic()
            if line != shown or now - shown_at >= tick:
                shown, shown_at = line, now
                yield line
            await hold.pause()
            candidates, tried = await reroute(), False
    except GatewayError as error:
        if relaying:
            raise
        meter.finish(status=error.status, error_code=error.code)
        yield framing.error_event(error.body())
        if framing.done_event is not None:
            yield framing.done_event
    except (asyncio.CancelledError, GeneratorExit):
        if not relaying:
            meter.finish(status=499, error_code="client_disconnected")
        raise
    except Exception:
        if relaying:
            raise
        logger.exception("held stream %s failed", meter.record.request_id)
        meter.finish(status=500, error_code=ErrorCode.INTERNAL_ERROR)
        yield framing.error_event(GatewayError("The gateway failed while holding the stream.").body())
        if framing.done_event is not None:
            yield framing.done_event
    finally:
        hold.close()
