"""One inference request, stage by stage. This is the order; each stage lives in the module named beside it.

    1 authenticate  services/authentication.py  the bearer credential -> Principal (401/403 leave no usage row)
      body          pipeline/parse.py           413 on the declared size, then the body read within the limit
    2 parse         pipeline/parse.py           the route's descriptor (routes.py): the few fields the gateway reads
    3 route         selectors/endpoints.py      candidate endpoints in order: allowed, not under maintenance
    4 admit         pipeline/admit.py           limits: reserve now, settle in the meter stage (no limits yet)
    5 dispatch      pipeline/dispatch.py        the first candidate's backend; the next one if it was never reached
    6 respond       pipeline/respond.py         JSON, or the SSE events relayed as they arrive
    7 meter         pipeline/meter.py           one usage row from the body on, whatever the outcome (499 included)

Both doors call `inference_run`: the lean ASGI app (api/fast.py) and the ninja views (api/inference.py). They
only read the HTTP request and write the HTTP answer (api/edge.py), and hand in the process's long-lived
objects (`resource_server/bootstrap.py` builds them; `PipelineParts` says which the stages use).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Protocol

from resource_server.dispatch.registry import BackendPool
from resource_server.errors import ErrorCode, GatewayError
from resource_server.pipeline.admit import admit
from resource_server.pipeline.dispatch import dispatch_stream, dispatch_submit
from resource_server.pipeline.form import FormUpload, form_parse, form_read
from resource_server.pipeline.meter import Meter
from resource_server.pipeline.parse import BodyReader, ClientGone, body_read, request_parse, upstream_request
from resource_server.pipeline.respond import JsonResult, StreamResult, StreamWishes, answer_json, stream_relay
from resource_server.routes import ROUTES, Route
from resource_server.selectors.endpoints import RoutingCache, endpoint_candidates, model_of_path
from resource_server.services.authentication import Authenticators
from resource_server.services.usage import UsageSink
from resource_server.status.board import StatusBoard


class PipelineParts(Protocol):
    """The long-lived objects the stages use (the composition root's `Runtime` has them)."""

    @property
    def authenticators(self) -> Authenticators: ...

    @property
    def routing(self) -> RoutingCache: ...

    @property
    def status(self) -> StatusBoard: ...

    @property
    def backend_pool(self) -> BackendPool: ...

    @property
    def usage_sink(self) -> UsageSink: ...


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
) -> JsonResult | StreamResult:
    """Answer one OpenAI request; from its body on, every outcome leaves exactly one usage record.

    A JSON body is read whole (`read_body`); a form (the audio routes) only up to the fields the gateway
    reads, the rest being read from `body_chunks` as it goes on to the model server (pipeline/form.py).
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
        principal=principal,
        route=route,
        request_id=request_id,
        client_request_id=client_request_id,
    )
    try:
        request = form_parse(descriptor, form) if form is not None else request_parse(descriptor, raw)
        meter.parsed(request)
        model, chosen = request.model, None
        if model is None:
            model = chosen = await model_of_path(
                routing=parts.routing, principal=principal, cluster=cluster, framework=framework
            )
            meter.record.model = model
        candidates = await endpoint_candidates(
            routing=parts.routing,
            status=parts.status,
            principal=principal,
            model=model,
            cluster=cluster,
            framework=framework,
        )
        served = candidates[0].model
        if served != request.model:
            # The name matched only by case: the model server knows the model by its registered name.
            request = replace(request, model=served, body={**request.body, descriptor.fields.model: served})
            meter.routed(served)
        meter.reservation = await admit(principal=principal, request=request, candidates=candidates)
        upstream = upstream_request(descriptor, request, request_id, model=chosen)
        if request.stream:
            stream = await dispatch_stream(
                backends=parts.backend_pool, candidates=candidates, request=upstream, meter=meter
            )
            return StreamResult(stream_relay(stream, descriptor, meter, client=StreamWishes.of(request)))
        content = await dispatch_submit(
            backends=parts.backend_pool, candidates=candidates, request=upstream, meter=meter
        )
    except GatewayError as error:
        meter.finish(status=error.status, error_code=error.code)
        raise
    except ClientGone:
        meter.finish(status=499, error_code="client_disconnected")  # while its upload went on to the model server
        raise
    except BaseException:
        meter.finish(status=500, error_code=ErrorCode.INTERNAL_ERROR)
        raise
    finally:
        if form is not None:
            form.close()
    return answer_json(content, descriptor, meter)
