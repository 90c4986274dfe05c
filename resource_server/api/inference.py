"""OpenAI-compatible routes, under /resource_server/v1/ and FIRST's /resource_server/{cluster}/{framework}/v1/.

These ninja views are the OpenAPI schema of the inference routes and their fallback door: the lean ASGI app
(`api/fast.py`) serves the same inference POSTs faster and hands everything else on, and when it is off (the
middleware was changed) these views serve them too. Both doors run the same pipeline (`pipeline/run.py`),
which authenticates the caller itself, so the inference operations take no ninja auth and only document
the bearer scheme; the models list still uses ninja's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any

from django.http import HttpRequest, HttpResponse, StreamingHttpResponse
from django.http.request import RawPostDataException
from ninja import Path, Router

from resource_server.api.edge import JSON, stream_response
from resource_server.api.openapi import AUTHENTICATED, documented, inference_doc, json_response
from resource_server.api.security import bearer_auth, request_authorization
from resource_server.bootstrap import runtime
from resource_server.errors import InvalidRequest
from resource_server.pipeline.respond import JsonResult
from resource_server.pipeline.run import inference_run
from resource_server.routes import ROUTES, RouteDescriptor
from resource_server.schemas import ModelList, schema_ref
from resource_server.selectors.endpoints import model_list

router = Router(auth=bearer_auth, tags=["OpenAI-compatible"])

FIRST_PREFIX = "/{cluster}/{framework}"
_BLOCK = 64 * 1024


async def _infer(
    request: HttpRequest, descriptor: RouteDescriptor, cluster: str | None, framework: str | None
) -> HttpResponse | StreamingHttpResponse:
    async def read_body(limit: int | None) -> bytes:
        try:
            return request.body  # Django's ASGI handler has read it already
        except RawPostDataException:
            raise InvalidRequest("The request body could not be read.") from None

    async def body_chunks() -> AsyncIterator[bytes]:
        # Django's ASGI handler has received the body into a spooled temporary file: read it in blocks.
        while chunk := request.read(_BLOCK):
            yield chunk

    length = request.headers.get("Content-Length", "")
    result = await inference_run(
        parts=runtime(),
        route=descriptor.route,
        authorization=request_authorization(request),
        content_length=int(length) if length.isdigit() else None,
        read_body=read_body,
        body_chunks=body_chunks(),
        content_type=request.headers.get("Content-Type", ""),
        request_id=request.request_id,  # type: ignore[attr-defined]
        client_request_id=request.client_request_id,  # type: ignore[attr-defined]
        cluster=cluster,
        framework=framework,
        max_wait=request.headers.get("X-Gateway-Max-Wait", ""),
        project=request.headers.get("OpenAI-Project", ""),
        # Django's handler cancels the view when the client leaves: a held request then ends as a 499.
    )
    if isinstance(result, JsonResult):
        response = HttpResponse(result.content, content_type=JSON)
        for name, value in result.headers:
            response[name] = value
        return response
    return stream_response(result.events, result.headers)


# FIRST's path parameters, with the values the docs page's "Try it out" fills in.
ClusterName = Annotated[
    str, Path(..., description="A cluster's name, as `owned_by` in `GET /v1/models` shows it.", example="demo")
]
FrameworkName = Annotated[
    str,
    Path(..., description="The serving framework on that cluster; `api`: any framework there.", example="vllm"),
]


def _add_inference_routes(descriptor: RouteDescriptor) -> None:
    async def generic(request: HttpRequest) -> HttpResponse | StreamingHttpResponse:
        return await _infer(request, descriptor, None, None)

    async def on_cluster(
        request: HttpRequest, cluster: ClusterName, framework: FrameworkName
    ) -> HttpResponse | StreamingHttpResponse:
        return await _infer(request, descriptor, cluster, framework)

    name = descriptor.path.replace("/", "_")
    for path, view, suffix in (
        (f"/v1/{descriptor.path}", generic, ""),
        (f"{FIRST_PREFIX}/v1/{descriptor.path}", on_cluster, "_on_cluster"),
    ):
        router.add_api_operation(
            path,
            ["POST"],
            view,
            auth=None,  # the pipeline authenticates (inference_doc documents the bearer scheme)
            operation_id=f"{name}{suffix}",
            summary=descriptor.summary + (" on a given cluster and framework" if suffix else ""),
            openapi_extra=inference_doc(descriptor, on_cluster=bool(suffix)),
        )


for _descriptor in ROUTES.values():
    _add_inference_routes(_descriptor)


def _models_response(models: list[dict[str, object]]) -> dict[str, Any]:
    return {"object": "list", "data": models}


_MODELS = "The models your credentials may use, each once by name, with the cluster that serves it."
_MODELS_OK = json_response("The models, sorted by name.", schema_ref(ModelList))


@router.get(
    "/v1/models",
    summary="List the models you can use",
    operation_id="models_list",
    openapi_extra=documented(_MODELS, *AUTHENTICATED, ok=_MODELS_OK),
)
async def models(request: HttpRequest) -> dict[str, Any]:
    principal = request.auth  # type: ignore[attr-defined]
    parts = runtime()
    return _models_response(
        await model_list(routing=parts.routing, principal=principal, cards=parts.status.model_card, status=parts.status)
    )


@router.get(
    f"{FIRST_PREFIX}/v1/models",
    summary="List the models you can use on a cluster",
    operation_id="models_list_on_cluster",
    openapi_extra=documented(
        _MODELS.removesuffix(".") + ", on the named cluster and framework (FIRST's path).",
        *AUTHENTICATED,
        "404",
        ok=_MODELS_OK,
    ),
)
async def models_on_cluster(request: HttpRequest, cluster: ClusterName, framework: FrameworkName) -> dict[str, Any]:
    principal = request.auth  # type: ignore[attr-defined]
    parts = runtime()
    return _models_response(
        await model_list(
            routing=parts.routing,
            principal=principal,
            cluster=cluster,
            framework=framework,
            cards=parts.status.model_card,
            status=parts.status,
        )
    )
