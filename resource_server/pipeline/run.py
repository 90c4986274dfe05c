"""One inference request, stage by stage. This is the order; each stage lives in the module named beside it.

    1 authenticate  services/authentication.py  the bearer credential -> Principal (401/403 leave no usage row)
      body          pipeline/parse.py           413 on the declared size, then the body read within the limit
    2 parse         pipeline/parse.py           the route's descriptor (routes.py): the few fields the gateway reads
    3 route         selectors/endpoints.py      candidate endpoints best first: by state, load, preference
      cold          pipeline/cold.py            none serving: 503 with state and ETA, or held (X-Gateway-Max-Wait)
    4 admit         pipeline/admit.py           limits and budgets: reserve now (limits/), settle in the meter stage
    5 dispatch      pipeline/dispatch.py        the best candidate's backend; the next one if it did not take it
    6 respond       pipeline/respond.py         JSON, or the SSE events relayed as they arrive
    7 meter         pipeline/meter.py           one usage row from the body on, whatever the outcome (499 included)

Both doors call `inference_run`: the lean ASGI app (api/fast.py) and the ninja views (api/inference.py). They
only read the HTTP request and write the HTTP answer (api/edge.py), and hand in the process's long-lived
objects (`resource_server/bootstrap.py` builds them; `PipelineParts` says which the stages use).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from typing import Protocol

from resource_server.adapters.inflight import InFlight
from resource_server.dispatch.registry import BackendPool
from resource_server.errors import ErrorCode, GatewayError
from resource_server.limits.limiter import Limiter
from resource_server.pipeline.admit import admit
from resource_server.pipeline.cold import (
    ClientGoneWaiter,
    Expired,
    Hold,
    cold_answer,
    held_stream,
    holds_for,
    max_wait_parse,
    wake_cold,
)
from resource_server.pipeline.dispatch import dispatch_stream, dispatch_submit
from resource_server.pipeline.form import FormUpload, form_parse, form_read
from resource_server.pipeline.meter import Meter
from resource_server.pipeline.parse import BodyReader, ClientGone, body_read, request_parse, upstream_request
from resource_server.pipeline.respond import (
    JsonResult,
    StreamResult,
    StreamWishes,
    answer_json,
    stream_relay,
)
from resource_server.routes import ROUTES, Route
from resource_server.selectors.endpoints import Candidates, RoutingCache, endpoint_candidates, model_of_path
from resource_server.services.authentication import Authenticators
from resource_server.services.usage import UsageSink
from resource_server.status.base import RouteStatus


class PipelineParts(Protocol):
    """The long-lived objects the stages use (the composition root's `Runtime` has them)."""

    @property
    def authenticators(self) -> Authenticators: ...

    @property
    def routing(self) -> RoutingCache: ...

    @property
    def status(self) -> RouteStatus: ...

    @property
    def in_flight(self) -> InFlight: ...

    @property
    def backend_pool(self) -> BackendPool: ...

    @property
    def usage_sink(self) -> UsageSink: ...

    @property
    def limiter(self) -> Limiter: ...


async def inference_run(
    *,
    parts: PipelineParts,
    route: Route,
    authorization: str,
    content_length: int | None,
    read_body: BodyReader,
    body_chunks: AsyncIterator[bytes],
    request_id: str,
    content_type: str = "",
    client_request_id: str = "",
    cluster: str | None = None,
    framework: str | None = None,
    max_wait: str = "",
    project: str = "",
    client_gone: ClientGoneWaiter | None = None,
) -> JsonResult | StreamResult:
    """Answer one OpenAI request; from its body on, every outcome leaves exactly one usage record.

    A JSON body is read whole (`read_body`); a form (the audio routes) only up to the fields the gateway
    reads, the rest being read from `body_chunks` as it goes on to the model server (pipeline/form.py).
    `max_wait` is the X-Gateway-Max-Wait header; `project` the OpenAI-Project header; `client_gone`, if the
    door can tell, returns when the client leaves (a request held for a cold model is then let go as a 499).
    Every answer from the route stage on carries the X-Gateway-Route header, which the usage record keeps, and
    from the admit stage on the caller's x-ratelimit-* headers (the result's `headers`, an error's headers).
    """
    principal = await parts.authenticators.principal_from_authorization(authorization)
    descriptor = ROUTES[route]
    form: FormUpload | None = None
    if descriptor.form:
        form = await form_read(content_type=content_type, content_length=content_length, chunks=body_chunks)
    else:
        raw = await body_read(content_length=content_length, read=read_body)
    meter = Meter(
        sink=parts.usage_sink,
        in_flight=parts.in_flight,
        principal=principal,
        route=route,
        request_id=request_id,
        client_request_id=client_request_id,
    )
    hold: Hold | None = None
    try:
        request = form_parse(descriptor, form) if form is not None else request_parse(descriptor, raw)
        meter.parsed(request)
        wait = max_wait_parse(max_wait)
        model, chosen = request.model, None
        if model is None:
            model = chosen = await model_of_path(
                routing=parts.routing, principal=principal, cluster=cluster, framework=framework
            )
            meter.record.model = model

        def reroute() -> Awaitable[Candidates]:
            """The route stage, for this request (again, while it is held)."""
            return endpoint_candidates(
                routing=parts.routing,
                status=parts.status,
                in_flight=parts.in_flight,
                principal=principal,
                model=model,
                cluster=cluster,
                framework=framework,
            )

        candidates = await reroute()
        served = candidates.routes[0].model
        if served != request.model:
            # The name matched only by case: the model server knows the model by its registered name.
            request = replace(request, model=served, body={**request.body, descriptor.fields.model: served})
            meter.routed(served)
        if not candidates.serving:
            wake_cold(parts.backend_pool, candidates)
            if not wait:
                raise cold_answer(candidates, model=served, status=parts.status, meter=meter)
            hold = Hold(wait=wait, status=parts.status, client_gone=None if request.stream else client_gone)
            if not request.stream:
                candidates = await _until_serving(hold, candidates, reroute, parts, meter, served)
        meter.reservation = await admit(
            limiter=parts.limiter,
            rules=parts.routing.current.limits,
            principal=principal,
            descriptor=descriptor,
            request=request,
            candidates=candidates.routes,
            project=project,
            record=meter.record,
        )
        upstream = upstream_request(descriptor, request, request_id, model=chosen)
        if request.stream:
            wishes = StreamWishes.of(request)
            if hold is None:
                try:
                    stream = await dispatch_stream(
                        backends=parts.backend_pool, candidates=candidates, request=upstream, meter=meter
                    )
                    return StreamResult(stream_relay(stream, descriptor, meter, client=wishes), meter.answer_headers())
                except GatewayError as error:
                    if not (wait and holds_for(error, upstream)):
                        raise
                    hold = Hold(wait=wait, status=parts.status)
            # Held: the answer starts now (200), with progress comments until a candidate serves.
            meter.cold_route(candidates.routes[0].id, candidates.route_header(held=True))
            events = held_stream(
                hold=hold,
                candidates=candidates,
                reroute=reroute,
                backends=parts.backend_pool,
                status=parts.status,
                upstream=upstream,
                descriptor=descriptor,
                meter=meter,
                wishes=wishes,
                model=served,
                tried=candidates.serving > 0,
            )
            hold = None  # the held stream owns it now
            return StreamResult(events, meter.answer_headers())
        while True:
            try:
                content = await dispatch_submit(
                    backends=parts.backend_pool,
                    candidates=candidates,
                    request=upstream,
                    meter=meter,
                    held=hold is not None,
                )
                break
            except GatewayError as error:
                # Every serving candidate refused it as a cold endpoint does: wait on, if asked to and time is left.
                if not (wait and holds_for(error, upstream)):
                    raise
                hold = hold or Hold(wait=wait, status=parts.status, client_gone=client_gone)
                if hold.remaining <= 0:
                    raise
                await hold.pause()
                candidates = await _until_serving(hold, await reroute(), reroute, parts, meter, served)
    except GatewayError as error:
        if meter.record.gateway_route:
            error.headers = {**dict(meter.answer_headers()), **error.headers}
        meter.finish(status=error.status, error_code=error.code)
        await meter.reservation.settled()
        raise
    except (ClientGone, asyncio.CancelledError):
        # The client left: while its upload went on to the model server, or while it was held for a cold model
        # (the lean door notices; Django cancels the view).
        meter.finish(status=499, error_code="client_disconnected")
        raise
    except BaseException:
        meter.finish(status=500, error_code=ErrorCode.INTERNAL_ERROR)
        raise
    finally:
        if form is not None:
            form.close()
        if hold is not None:
            hold.close()
    answer = answer_json(content, descriptor, meter)
    await meter.reservation.settled()  # so that the caller's next request finds its slot and tokens back
    return answer


async def _until_serving(
    hold: Hold,
    candidates: Candidates,
    reroute: Callable[[], Awaitable[Candidates]],
    parts: PipelineParts,
    meter: Meter,
    model: str,
) -> Candidates:
    """Hold a JSON request until a candidate serves; the cold 503 when its wait ends first."""
    try:
        return await hold.until_serving(candidates, reroute)
    except Expired as expired:
        raise cold_answer(expired.candidates, model=model, status=parts.status, meter=meter, waited=hold.wait) from None
